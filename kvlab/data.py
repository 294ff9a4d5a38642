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
import math
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


def _decode(raw: bytes, path) -> str:
    """A file's bytes as text: UTF-8, with or without a byte-order mark (as some Windows editors write it);
    ValueError naming the file and the first bad byte otherwise."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r}); save it as "
                         f"UTF-8") from None


def _json(text: str, path, where: str = "") -> object:
    """``json.loads(text)``, its errors as a ValueError naming the file (and ``where`` in it)."""
    at = f"{path}{where}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        page = " (it is an HTML page, e.g. a web server's error page)" if text.lstrip()[:1] == "<" else ""
        raise ValueError(f"{at}: not valid JSON{page}: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise ValueError(f"{at}: JSON nested too deeply to read (records are a few levels deep)") from None


def _read(path) -> list:
    """The list of records of a JSON file; ValueError naming the file when it is not UTF-8 JSON holding a list."""
    data = _json(_decode(Path(path).read_bytes(), path), path)
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
    """A template with exactly one ``{}`` for the subject and no other braces (``str.format`` of it with the
    subject must give the prompt: a second ``{}`` or a named field such as ``{sport}`` would fail there)."""
    t = _get(rec, key, str, where)
    if "{}" not in t:
        raise ValueError(f"{where}: field {key!r} has no '{{}}' for the subject: {t!r}")
    if t.count("{}") != 1:
        raise ValueError(f"{where}: field {key!r} has {t.count('{}')} '{{}}', needs exactly one for the subject: {t!r}")
    rest = t.replace("{}", "")
    if "{" in rest or "}" in rest:
        raise ValueError(f"{where}: field {key!r} has braces besides the one '{{}}' for the subject (a field such as "
                         f"'{{sport}}' is not filled in): {t!r}")
    return t


def _prompts(rec, key: str, where: str) -> list[str]:
    v = _get(rec, key, list, where)
    for j, p in enumerate(v):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{where}: field {key!r}[{j}] must be a non-empty string")
    return list(v)


def _unique(seen: dict, key: str, value, i: int, where: str) -> None:
    if value in seen:
        raise ValueError(f"{where}: duplicate {key} {value!r} (record {seen[value]} has it too)")
    seen[value] = i


def parse_known(records: list, source=None) -> list[KnownFact]:
    """Validate and convert known-facts records (see :func:`load_known`); ``source`` (the file) prefixes every
    message. Each prompt contains its subject, each template one ``{}``, and the ids are unique."""
    out, seen = [], {}
    for i, rec in enumerate(records):
        kid = rec.get("known_id", "?") if isinstance(rec, dict) else "?"
        where = f"{source}: " * (source is not None) + f"known fact record {i} (known_id={kid})"
        fact = KnownFact(
            known_id=_get(rec, "known_id", int, where), subject=_get(rec, "subject", str, where),
            attribute=_get(rec, "attribute", str, where), template=_template(rec, "template", where),
            prediction=_get(rec, "prediction", str, where, nonempty=False),
            prompt=_get(rec, "prompt", str, where), relation_id=_get(rec, "relation_id", str, where))
        if fact.subject not in fact.prompt:
            raise ValueError(f"{where}: field 'prompt' {fact.prompt!r} does not contain the subject "
                             f"{fact.subject!r}")
        _unique(seen, "known_id", fact.known_id, i, where)
        out.append(fact)
    return out


def _target(rw, key: str, where: str) -> Target:
    t = _get(rw, key, dict, where)
    where = f"{where}: {key}"
    if isinstance(t.get("id"), str):           # ROME's file: a Wikidata id, "Q1860"
        return Target(_get(t, "str", str, where), _get(t, "id", str, where))
    return Target(_get(t, "str", str, where), _get(t, "id", int, where))


def parse_counterfact(records: list, source=None) -> list[EditCase]:
    """Validate and convert CounterFact records (see :func:`load_counterfact`); ``source`` (the file) prefixes
    every message. Each rewrite prompt has one ``{}`` and no other braces, and the ids are unique."""
    out, seen = [], {}
    for i, rec in enumerate(records):
        cid = rec.get("case_id", "?") if isinstance(rec, dict) else "?"
        where = f"{source}: " * (source is not None) + f"counterfact record {i} (case_id={cid})"
        rw = _get(rec, "requested_rewrite", dict, where)
        rwhere = f"{where}: requested_rewrite"
        _unique(seen, "case_id", _get(rec, "case_id", int, where), i, where)
        out.append(EditCase(
            case_id=_get(rec, "case_id", int, where), prompt=_template(rw, "prompt", rwhere),
            relation_id=_get(rw, "relation_id", str, rwhere), subject=_get(rw, "subject", str, rwhere),
            target_new=_target(rw, "target_new", rwhere), target_true=_target(rw, "target_true", rwhere),
            paraphrase_prompts=_prompts(rec, "paraphrase_prompts", where),
            neighborhood_prompts=_prompts(rec, "neighborhood_prompts", where),
            attribute_prompts=_prompts(rec, "attribute_prompts", where),
            generation_prompts=_prompts(rec, "generation_prompts", where)))
    return out


def _check_json(tmp: str) -> None:
    _json(_decode(Path(tmp).read_bytes(), tmp), tmp)      # a JSON file, not an error page


_DATA_ADVICE = ("Download the file where you have access, then pass its path, e.g. KNOWN='/path/known_1000.json' "
                "or COUNTERFACT='/path/counterfact.json' in a notebook's parameters, or "
                "load_known('/path/known_1000.json').")


def _download(url: str, path: Path, check=_check_json, advice: str = _DATA_ADVICE) -> Path:
    """Fetch ``url`` to ``path`` (atomically: a partial download never takes its place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as r:
            while chunk := r.read(1 << 20):
                out.write(chunk)
        check(tmp)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(
            f"could not download {url} ({e}). This machine may be offline (no network, or no access to "
            f"that host). {advice}") from e
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
    path = source_path(source, "known", model)
    return parse_known(_read(path), source=path)


def load_counterfact(source: str | Path | None = None, model=None) -> list[EditCase]:
    """Editing cases in CounterFact's schema: ``source`` as in the module docstring (default: the
    world's ``counterfact.json``)."""
    path = source_path(source, "counterfact", model)
    return parse_counterfact(_read(path), source=path)


# ---------------------------------------------------------------------------------------------
# Corpus texts (trigger mining, vocabulary statistics, ROME's key covariance)

CORPORA = ("auto", "world", "wikitext")
WIKITEXT = ("wikitext", "wikitext-103-raw-v1")      # ROME's choice besides Wikipedia (layer_stats.py)


def _wikitext(n: int) -> list[str]:
    """The first ``n`` paragraphs of WikiText-103's training split (headings and blank lines left out)."""
    advice = ("pass a text file instead (CORPUS='/path/texts.txt', one text per line, or a .jsonl file "
              "with a \"text\" field), or CORPUS='world' for the built-in world's corpus")
    try:
        import datasets
    except ImportError as e:
        raise OSError(f"the wikitext corpus needs the optional package `datasets` (pip install datasets) and "
                      f"access to the Hugging Face hub; or {advice}") from e
    try:
        ds = datasets.load_dataset(*WIKITEXT, split="train", streaming=True)
        out = []
        for row in ds:
            t = row["text"].strip()
            if t and not t.startswith("="):
                out.append(t)
                if len(out) >= n:
                    break
    except Exception as e:  # offline, hub unreachable, a datasets version that cannot read it
        raise OSError(f"could not load {WIKITEXT[0]}/{WIKITEXT[1]} with `datasets` ({type(e).__name__}: {e}). "
                      f"This machine may be offline; {advice}") from e
    return out


def _text_file(path: Path, n: int) -> list[str]:
    """Texts of a .txt file (one per non-empty line) or a .jsonl file (a string, or an object with "text"). UTF-8,
    a byte-order mark accepted; a file that is not is a ValueError naming it (and the line, for bad JSON)."""
    out = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                if path.suffix == ".jsonl":
                    rec = _json(line, path, f": line {i + 1}")
                    text = rec.get("text") if isinstance(rec, dict) else rec
                    if not isinstance(text, str):
                        raise ValueError(f"{path}: line {i + 1} is neither a string nor an object with a 'text' "
                                         f"string")
                    line = text.strip()
                if line:
                    out.append(line)
                    if len(out) >= n:
                        break
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a read block); save it as "
                         f"UTF-8") from None
    if not out:
        raise ValueError(f"{path}: no texts in the file")
    return out


def corpus_name(source: str | Path = "auto", model=None) -> str | Path:
    """What a ``CORPUS`` parameter stands for: "auto" resolved to "world" (built-in model) or "wikitext"."""
    from .loading import is_builtin

    if source == "auto":
        if model is None:
            raise ValueError("corpus source 'auto' needs the model: load_corpus('auto', model=model)")
        return "world" if is_builtin(model) else "wikitext"
    return source


def load_corpus(source: str | Path = "auto", model=None, n: int = 2000, seed: int = 0) -> list[str]:
    """Up to ``n`` texts for corpus statistics (a notebook's ``CORPUS`` parameter).

    ``"auto"``: the built-in world's corpus on the built-in model, WikiText-103 on any other;
    ``"world"``: the world's training sentences (``seed`` picks them); ``"wikitext"``: WikiText-103
    (``wikitext-103-raw-v1``, as in ROME's ``layer_stats``), through the optional ``datasets`` package
    and the hub; or a path to a ``.txt`` (one text per line) or ``.jsonl`` file.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    source = corpus_name(source, model)
    if source == "world":
        from .world import corpus_texts
        return corpus_texts(n=n, seed=seed)
    if source == "wikitext":
        return _wikitext(n)
    path = Path(str(source)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"corpus {str(source)!r} not found; a corpus is one of {CORPORA} or a path to a "
                                f".txt / .jsonl file")
    return _text_file(path, n)


# ---------------------------------------------------------------------------------------------
# ROME's published key statistics

ROME_STATS = "https://rome.baulab.info/data/stats/"


def layer_stats_name(model_name: str, layer_name: str, dataset: str = "wikipedia", precision: str = "float32",
                     sample_size: int | None = 100000) -> str:
    """The relative path ROME's ``layer_stats`` stores a layer's second moment under, e.g.
    ``gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz`` (the model's
    hub id with "/" replaced by "_"; the layer is the value projection, whose input is the key)."""
    size = "" if sample_size is None else f"_{sample_size}"
    return f"{model_name.replace('/', '_')}/{dataset}_stats/{layer_name}_{precision}_mom2{size}.npz"


def _stats_problem(path) -> str | None:
    """Why ``path`` is not an .npz archive (a zip file), from its first bytes; None if it looks like one."""
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return None
    text = head.lstrip().lower()
    if text.startswith(b"<"):
        kind = "an HTML page (e.g. a web server's error or login page saved in its place)"
    elif head.startswith(b"\x93NUMPY"):
        kind = "a single .npy array, not an .npz archive"
    elif text.startswith((b"{", b"[")):
        kind = "JSON text"
    elif not head:
        kind = "empty"
    else:
        kind = f"not a zip archive (it starts with {head[:16]!r})"
    return (f"{path}: not a stats file (ROME's layer_stats .npz, a zip archive of mom2.mom2 and mom2.count): "
            f"the file is {kind}")


def _open_npz(path):
    """``np.load(path)`` of an .npz archive; ValueError naming the file when it is none (an HTML page, a damaged
    or partial download)."""
    import zipfile

    import numpy as np

    problem = _stats_problem(path)
    if problem:
        raise ValueError(problem)
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable stats file (a damaged or partial .npz download: {e})") from None


def load_layer_stats(path: str | Path) -> "torch.Tensor":
    """C = E[k kᵀ] from a file in ROME's ``layer_stats`` format, in kvlab's convention: float64,
    (d_ff, d_ff), on the CPU. The file holds ``mom2.mom2`` (Σ k kᵀ over ``mom2.count`` tokens). A file that is not
    one (an HTML error page, a damaged download, non-finite numbers) is a ValueError naming it."""
    import zipfile

    import numpy as np
    import torch

    z = _open_npz(path)
    with z:
        missing = [k for k in ("mom2.mom2", "mom2.count") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: not a ROME second-moment file (missing {missing}; has {z.files})")
        try:
            mom2, count = z["mom2.mom2"], float(z["mom2.count"])
        except (ValueError, TypeError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise ValueError(f"{path}: mom2.mom2 / mom2.count cannot be read as numbers ({e}); kvlab reads numeric "
                             f"arrays only, never pickled objects") from None
    if not np.issubdtype(mom2.dtype, np.number):
        raise ValueError(f"{path}: mom2.mom2 holds {mom2.dtype} values, not numbers")
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or not count > 0:
        raise ValueError(f"{path}: mom2.mom2 has shape {mom2.shape} and count {count}; expected a square "
                         f"matrix and a positive count")
    if not math.isfinite(count) or not np.isfinite(mom2).all():
        bad = int((~np.isfinite(mom2)).sum())
        raise ValueError(f"{path}: mom2.count is {count} and mom2.mom2 has {bad} non-finite entries; expected "
                         f"finite numbers")
    return torch.from_numpy(mom2.astype(np.float64) / count)


def fetch_layer_stats(model_name: str, layer_name: str, dataset: str = "wikipedia", precision: str = "float32",
                      sample_size: int | None = 100000, url: str | None = None) -> "torch.Tensor":
    """ROME's published C = E[k kᵀ] for one layer of a hub model (gpt2-xl, EleutherAI/gpt-j-6B), downloaded
    once from :data:`ROME_STATS` into ``cache_dir()/rome/stats`` (see :func:`layer_stats_name`); returned
    by :func:`load_layer_stats`. Pass it to ``key_covariance(..., stats=...)``."""
    from .env import cache_dir

    name = layer_stats_name(model_name, layer_name, dataset, precision, sample_size)
    path = cache_dir() / "rome" / "stats" / name
    if not path.exists():
        _download(url or ROME_STATS + name, path, check=_check_npz,
                  advice=f"download {ROME_STATS + name} where you have access and pass its path to "
                         f"kvlab.data.load_layer_stats, or compute C from texts (key_covariance)")
    return load_layer_stats(path)


def _check_npz(tmp: str) -> None:
    with _open_npz(tmp) as z:          # a readable zip archive, not an error page
        z.files  # noqa: B018
