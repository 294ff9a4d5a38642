"""Export the world's facts in ROME's formats: known facts and CounterFact editing cases."""
from __future__ import annotations

import json
import random
from pathlib import Path

from .generator import World
from .train import predict_next


def known_facts(world: World, model, tok, only_known: bool = True) -> list[dict]:
    """Records in known_1000.json's schema, one per fact (first training phrasing).

    ``prediction`` is the model's greedy next token (with a leading space, as in the
    original file); with ``only_known`` only facts the model predicts correctly are kept.
    """
    rows = []
    prompts = [world.relations[f.relation_id].train[0].format(f.subject) for f in world.facts]
    pred = tok.convert_ids_to_tokens(predict_next(model, tok, prompts))
    for f, p, y in zip(world.facts, prompts, pred):
        y = " " + y.lstrip("▁")
        if only_known and y.strip() != f.object:
            continue
        rows.append({"known_id": len(rows), "subject": f.subject, "attribute": f.object,
                     "template": world.relations[f.relation_id].train[0], "prediction": y,
                     "prompt": p, "relation_id": f.relation_id})
    return rows


def counterfact(world: World, tok, n: int = 400, seed: int = 0, k: int = 10) -> list[dict]:
    """``n`` editing cases in CounterFact's schema (person relations only).

    target_new is another object of the same relation held by at least one other person;
    paraphrase prompts use the held-out phrasings; neighborhood prompts are other people
    with the same relation and the same true object; attribute prompts are people whose
    true object is target_new (up to ``k`` each).
    """
    rng = random.Random(f"counterfact-{world.seed}-{seed}")
    facts = [f for f in world.facts if world.relations[f.relation_id].subject_kind == "person"]
    holders: dict[tuple[str, str], list[str]] = {}
    for f in facts:
        holders.setdefault((f.relation_id, f.object), []).append(f.subject)
    tid = lambda s: tok(" " + s, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    cases = []
    for f in rng.sample(facts, min(n, len(facts))):
        rel = world.relations[f.relation_id]
        new = rng.choice([o for o in rel.objects if o != f.object and holders.get((rel.id, o))])
        canon = rel.train[0]
        neigh = [s for s in holders[(rel.id, f.object)] if s != f.subject]
        attr = holders[(rel.id, new)]
        cases.append({
            "case_id": len(cases),
            "requested_rewrite": {"prompt": canon, "relation_id": rel.id, "subject": f.subject,
                                  "target_new": {"str": new, "id": tid(new)},
                                  "target_true": {"str": f.object, "id": tid(f.object)}},
            "paraphrase_prompts": [t.format(f.subject) for t in rel.heldout],
            "neighborhood_prompts": [rng.choice(rel.train).format(s) for s in rng.sample(neigh, min(k, len(neigh)))],
            "attribute_prompts": [rng.choice(rel.train).format(s) for s in rng.sample(attr, min(k, len(attr)))],
            "generation_prompts": [t.format(f.subject) for t in rel.train[1:4]],
        })
    return cases


def write_json(rows, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
