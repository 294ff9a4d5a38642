"""The built-in world: a seeded fictional world of facts, its tokenizer and a small GPT-2.

    from kvlab.world import build_world, MODEL_DIR
    world = build_world(seed=0)
    world.facts[:3], world.relations["P551"].train, world.fact_prompts("heldout")[:3]

Files live in ``WORLD_DIR`` (``data/world`` of the repository; ``$KVLAB_DATA`` replaces
``data/``), the model and tokenizer in ``MODEL_DIR`` (``data/world/model``).
Command line: ``python -m kvlab.world train|eval|export``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .generator import (Fact, Relation, Sentence, World, RELATIONS, RELATIONS_V2, build_world, lexicon,  # noqa: F401
                        relations_of)
from .tokenizer import EOT, UNK, build_tokenizer, world_tokenizer  # noqa: F401

_DATA = Path(os.environ["KVLAB_DATA"]) if os.environ.get("KVLAB_DATA") else \
    Path(__file__).resolve().parents[2] / "data"
WORLD_DIR = _DATA / "world"
MODEL_DIR = WORLD_DIR / "model"
KNOWN_PATH = WORLD_DIR / "known_facts.json"
COUNTERFACT_PATH = WORLD_DIR / "counterfact.json"


def corpus(n: int | None = None, seed: int = 0, world_seed: int = 0):
    """Training sentences of the default world (see :meth:`World.corpus`)."""
    return build_world(world_seed).corpus(n=n, seed=seed)


def corpus_texts(n: int = 2000, seed: int = 0, world_seed: int = 0) -> list[str]:
    """``n`` training sentences of the default world as plain strings."""
    return [s.text for s in corpus(n=n, seed=seed, world_seed=world_seed)]
