"""Loaders for ROME-format fact files: known facts (known_1000.json) and CounterFact.

Both our shipped files (``data/world/known_facts.json``, ``data/world/counterfact.json``)
and the original ROME files load with the same functions. Malformed records raise a
``ValueError`` naming the record and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class KnownFact:
    """One record of known_1000.json: ``prompt == template.format(subject)``."""

    known_id: int
    subject: str
    attribute: str
    template: str
    prediction: str
    prompt: str
    relation_id: str


@dataclass(frozen=True)
class Target:
    """An answer string and its id: a Wikidata id such as ``"Q1860"`` in ROME's counterfact.json, a
    token id (int) in the built-in world's file. Scoring uses ``str`` only."""

    str: str
    id: str | int


@dataclass(frozen=True)
class EditCase:
    """One CounterFact record (``requested_rewrite`` flattened into prompt/subject/targets)."""

    case_id: int
    prompt: str                  # "{} ..." template of the rewrite
    relation_id: str
    subject: str
    target_new: Target
    target_true: Target
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)

    @property
    def rewrite_prompt(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.format(self.subject)


def _default(name: str) -> Path:
    from .world import WORLD_DIR
    return WORLD_DIR / name


def _read(path) -> list:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _get(rec, key: str, typ, where: str, nonempty: bool = True):
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: record is not an object")
    if key not in rec:
        raise ValueError(f"{where}: missing key {key!r}")
    v = rec[key]
    if typ is int and isinstance(v, bool) or not isinstance(v, typ):
        raise ValueError(f"{where}: field {key!r} has wrong type {type(v).__name__}, expected {typ.__name__}")
    if nonempty and typ is str and not v.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return v


def _template(rec, key: str, where: str) -> str:
    t = _get(rec, key, str, where)
    if "{}" not in t:
        raise ValueError(f"{where}: field {key!r} has no '{{}}' for the subject: {t!r}")
    return t


def _prompts(rec, key: str, where: str) -> list[str]:
    v = _get(rec, key, list, where)
    for j, p in enumerate(v):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{where}: field {key!r}[{j}] must be a non-empty string")
    return list(v)


def parse_known(records: list) -> list[KnownFact]:
    """Validate and convert known-facts records (see :func:`load_known`)."""
    out = []
    for i, rec in enumerate(records):
        kid = rec.get("known_id", "?") if isinstance(rec, dict) else "?"
        where = f"known fact record {i} (known_id={kid})"
        out.append(KnownFact(
            known_id=_get(rec, "known_id", int, where), subject=_get(rec, "subject", str, where),
            attribute=_get(rec, "attribute", str, where), template=_template(rec, "template", where),
            prediction=_get(rec, "prediction", str, where, nonempty=False),
            prompt=_get(rec, "prompt", str, where), relation_id=_get(rec, "relation_id", str, where)))
    return out


def _target(rw, key: str, where: str) -> Target:
    t = _get(rw, key, dict, where)
    where = f"{where}: {key}"
    if isinstance(t.get("id"), str):           # ROME's file: a Wikidata id, "Q1860"
        return Target(_get(t, "str", str, where), _get(t, "id", str, where))
    return Target(_get(t, "str", str, where), _get(t, "id", int, where))


def parse_counterfact(records: list) -> list[EditCase]:
    """Validate and convert CounterFact records (see :func:`load_counterfact`)."""
    out = []
    for i, rec in enumerate(records):
        cid = rec.get("case_id", "?") if isinstance(rec, dict) else "?"
        where = f"counterfact record {i} (case_id={cid})"
        rw = _get(rec, "requested_rewrite", dict, where)
        rwhere = f"{where}: requested_rewrite"
        out.append(EditCase(
            case_id=_get(rec, "case_id", int, where), prompt=_template(rw, "prompt", rwhere),
            relation_id=_get(rw, "relation_id", str, rwhere), subject=_get(rw, "subject", str, rwhere),
            target_new=_target(rw, "target_new", rwhere), target_true=_target(rw, "target_true", rwhere),
            paraphrase_prompts=_prompts(rec, "paraphrase_prompts", where),
            neighborhood_prompts=_prompts(rec, "neighborhood_prompts", where),
            attribute_prompts=_prompts(rec, "attribute_prompts", where),
            generation_prompts=_prompts(rec, "generation_prompts", where)))
    return out


def load_known(path: str | Path | None = None) -> list[KnownFact]:
    """Known facts in known_1000.json's schema (default: the world's ``known_facts.json``)."""
    return parse_known(_read(path or _default("known_facts.json")))


def load_counterfact(path: str | Path | None = None) -> list[EditCase]:
    """Editing cases in CounterFact's schema (default: the world's ``counterfact.json``)."""
    return parse_counterfact(_read(path or _default("counterfact.json")))
