"""Loaders for ROME-format fact files: known facts (known_1000.json) and CounterFact.

Both our shipped files (``data/world/known_facts.json``, ``data/world/counterfact.json``)
and the original ROME files load with the same functions. Malformed records raise a
``ValueError`` naming the record and the field.

Which file a notebook uses is its ``KNOWN`` / ``COUNTERFACT`` parameter, read by
:func:`load_known` / :func:`load_counterfact`:

- ``"auto"``: the built-in world's facts on the built-in model, ROME's files on any other model
  (a hub model has never seen the world's fictional people);
- ``"world"``: the built-in world's files (``data/world``);
- ``"rome"``: ROME's published files (Meng et al. 2022: 1,209 known facts, 21,919 CounterFact
  cases), downloaded once from :data:`ROME_DATA` into ``kvlab.env.cache_dir()/rome`` (:func:`fetch`);
- a path to a file in the same schema, or an ``http(s)://`` / ``file://`` URL (downloaded once).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# ROME's published data sets (the addresses its own code downloads from).
ROME_DATA = "https://rome.baulab.info/data/dsets/"
ROME_FILES = {"known": "known_1000.json", "counterfact": "counterfact.json"}
SOURCES = ("auto", "world", "rome")


@dataclass(frozen=True)
class KnownFact:
    """One record of known_1000.json. ``prompt`` (what the model is asked) contains ``subject``; it is
    usually ``template.format(subject)`` but not always (in ROME's record 0 the template ends "... the
    continent" and the prompt "... the continent of"): methods use ``prompt``."""

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


def _download(url: str, path: Path) -> Path:
    """Fetch ``url`` to ``path`` (atomically: a partial download never takes its place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as r:
            while chunk := r.read(1 << 20):
                out.write(chunk)
        json.loads(Path(tmp).read_text(encoding="utf-8"))      # a JSON file, not an error page
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(
            f"could not download {url} ({e}). This machine may be offline (no network, or no access to "
            f"that host). Download the file where you have access, then pass its path, e.g. "
            f"KNOWN='/path/known_1000.json' or COUNTERFACT='/path/counterfact.json' in a notebook's "
            f"parameters, or load_known('/path/known_1000.json').") from e
    return path


def fetch(name: str, url: str | None = None) -> Path:
    """The local path of ROME's ``name`` file ("known" or "counterfact"), downloaded once into
    ``cache_dir()/rome`` from :data:`ROME_DATA` (or ``url``)."""
    from .env import cache_dir

    if name not in ROME_FILES:
        raise ValueError(f"unknown ROME data set {name!r}; choose from {tuple(ROME_FILES)}")
    path = cache_dir() / "rome" / ROME_FILES[name]
    return path if path.exists() else _download(url or ROME_DATA + ROME_FILES[name], path)


def fetch_known() -> list[KnownFact]:
    """ROME's known_1000.json (downloaded once; see :func:`fetch`)."""
    return load_known("rome")


def fetch_counterfact() -> list[EditCase]:
    """ROME's counterfact.json (downloaded once; see :func:`fetch`)."""
    return load_counterfact("rome")


def source_path(source: str | Path | None, name: str, model=None) -> Path:
    """The file a ``KNOWN`` / ``COUNTERFACT`` parameter names (see the module docstring); ``name`` is
    "known" or "counterfact". ``"auto"`` needs the model."""
    from .loading import is_builtin

    world = {"known": "known_facts.json", "counterfact": "counterfact.json"}[name]
    if source is None or source == "world":
        return _default(world)
    if source == "auto":
        if model is None:
            raise ValueError(f"{name} source 'auto' needs the model: load_{name}('auto', model=model)")
        return _default(world) if is_builtin(model) else fetch(name)
    if source == "rome":
        return fetch(name)
    text = str(source)
    if text.startswith(("http://", "https://", "file://")):
        from .env import cache_dir
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        path = cache_dir() / "downloads" / f"{digest}-{Path(text).name or name + '.json'}"
        return path if path.exists() else _download(text, path)
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name} file {text!r} not found; a source is one of {SOURCES}, a path or a URL")
    return path


def load_known(source: str | Path | None = None, model=None) -> list[KnownFact]:
    """Known facts in known_1000.json's schema: ``source`` as in the module docstring (default: the
    world's ``known_facts.json``)."""
    return parse_known(_read(source_path(source, "known", model)))


def load_counterfact(source: str | Path | None = None, model=None) -> list[EditCase]:
    """Editing cases in CounterFact's schema: ``source`` as in the module docstring (default: the
    world's ``counterfact.json``)."""
    return parse_counterfact(_read(source_path(source, "counterfact", model)))
