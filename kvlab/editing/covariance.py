"""Key statistics for ROME/MEMIT: C = E[k kᵀ] of the value-module inputs at one layer.

The "keys" ROME edits are the inputs k = m of the value projection (the memory
coefficients, d_ff wide). ROME needs their uncentred second moment C so that an edit
changes W mainly along directions that rarely occur (the update is ∝ C⁻¹k*).

    C = key_covariance(model, tok, layer=3)               # world corpus, cached on disk
    C = key_covariance(model, tok, 17, texts=wiki_texts)  # any list of texts (e.g. for gpt2-xl)

Every non-pad token of every text contributes one k. Streamed on the model's device: each
batch's Σ k kᵀ is added to a float64 accumulator there (the batch product itself in float64 on
a CPU, float32 on a GPU, where float64 matrix products are slow), so no activations travel to
the host and the only memory beyond a forward pass is C itself (d_ff² · 8 bytes: 0.31 GiB for
GPT-2 XL; Apple's MPS has no float64: there each batch's product goes to an accumulator on the CPU).
C is returned on the CPU; accumulate one layer at a time and drop what you no longer use.

Cache. C is kept in memory and on disk, keyed by :func:`cache_key`: everything that
determines C and nothing else —

* every parameter and buffer the value-module input at ``layer`` depends on
  (:func:`upstream_tensors`: embeddings, the blocks below, and in the layer itself
  everything up to the key projections and the activation), hashed exactly
  (:func:`tensor_digest`), so any change of any entry gives a new key. The value
  projection of the layer, the blocks above and the head are left out: editing the
  values at ``layer`` (sequential ROME) reuses the same C instead of writing a new copy;
* the config, the tokenizer (vocabulary and how it encodes the first texts), the texts,
  their number, ``max_length``, the device type and train/eval mode.

``batch_size`` is not part of the key: batches are right-padded and padding is masked,
so it changes C only by float rounding (~1e-8 relative).

Files live in ``$KVLAB_CACHE``, else ``$XDG_CACHE_HOME/kvlab``, else ``~/.cache/kvlab``
(never the source tree; ``$KVLAB_DATA`` is for data only). They are written atomically
(a temporary file, then ``os.replace``); an unreadable file is removed and C recomputed;
the folder holds at most ``$KVLAB_CACHE_MAX_MB`` MiB (default 2048, 0 disables the disk
cache), least recently used files go first. The in-memory cache holds at most
``$KVLAB_CACHE_MEMORY_MB`` MiB (default 1024). An unwritable folder only costs a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import adapter, model_device
from ..env import cache_dir
from ..hooks import capture
from ..text import ensure_pad, right_padded

DEFAULT_CACHE_MAX_MB = 2048
DEFAULT_MEMORY_MAX_MB = 1024
_MEMORY: OrderedDict[str, torch.Tensor] = OrderedDict()  # key -> C, least recently used first
_WARNED: set[str] = set()


# --- where -------------------------------------------------------------------------------
def _megabytes(name: str, default: float) -> int:
    """The size limit in env ``name`` (MiB), in bytes."""
    raw = os.environ.get(name, "").strip()
    try:
        mb = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number of MiB, got {raw!r}") from None
    if not mb >= 0:
        raise ValueError(f"{name} must be ≥ 0 MiB, got {raw!r}")
    return int(min(mb, 2.0**40) * 2**20)  # inf: no limit


# --- what C depends on -------------------------------------------------------------------
def upstream_tensors(model, layer: int) -> list[tuple[str, torch.Tensor]]:
    """Named parameters and buffers that the input of ``layer``'s value projection depends on.

    All of the model except what runs after that input: the value projection itself, the
    blocks above, the final norm and the unembedding (a tied unembedding is still hashed
    as the input embedding). In a parallel block the FFN does not read the attention, so
    only its norm and the MLP of ``layer`` count.
    """
    arch = adapter(model)
    layer = arch._check_layer(layer)
    after = [arch.value_module(layer), arch.final_norm, arch.unembed]
    after += [arch.layer(l) for l in range(layer + 1, arch.n_layers)]
    if arch.parallel:
        keep = (arch.mlp(layer), arch.mlp_norm(layer))
        after += [c for c in arch.layer(layer).children() if not any(c is k for k in keep)]
    skip = {id(m) for a in after if a is not None for m in a.modules()}
    out, seen = [], set()
    for name, m in model.named_modules():
        if id(m) in skip:
            continue
        for pname, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append((f"{name}.{pname}" if name else pname, t))
    return out


_ROW = 1 << 15  # words per checksum
_SLAB = 64      # rows per step: temporaries of 64·2·2¹⁵ int64 = 32 MiB
_WORD = {1: torch.int8, 2: torch.int16, 4: torch.int32}


@lru_cache(maxsize=None)
def _coefficients(device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 1 << 15, (2, _ROW), generator=g) * 2 + 1).to(device)  # (2, _ROW), odd, < 2¹⁶


def checksums(t: torch.Tensor) -> torch.Tensor:
    """Exact integer checksums of ``t``'s raw bits, computed on ``t``'s device. (rows, 2) int64 on the CPU.

    The bits are read as integer words w (|w| ≤ 2³¹: one per element of ≤ 4 bytes, two per
    8-byte element); each row of 2¹⁵ words gives Σ w_j c_j for two sets of odd coefficients
    1 ≤ c < 2¹⁶. Every sum is below 2⁶², so it is exact in int64 — the same on every device
    and in any summation order — and changing any one word (any one element of ≤ 4 bytes)
    changes its row's sums for certain; several changes cancel only by coincidence in both.
    """
    w = t.detach().reshape(-1)
    w = w.view(_WORD.get(w.element_size(), torch.int32)).reshape(-1)
    c = _coefficients(w.device)
    sums = [torch.zeros(0, 2, dtype=torch.int64, device=w.device)]
    for i in range(0, w.numel(), _ROW * _SLAB):
        x = w[i:i + _ROW * _SLAB].long()
        if x.numel() % _ROW:  # the last row: pad with zeros (the shape is hashed separately)
            x = torch.cat([x, x.new_zeros(-x.numel() % _ROW)])
        x = x.view(-1, 1, _ROW)
        sums.append((x * c).sum(-1))  # (rows, 2)
    return torch.cat(sums).cpu()


def tensor_digest(t: torch.Tensor) -> str:
    """A hash of ``t``'s dtype, shape and every bit of its data.

    On the CPU: SHA-256 of the raw bytes (no copy, ~1.5 GB/s, small next to the forward
    passes C needs). On an accelerator: :func:`checksums` computed there, so the weights never
    travel to the host (a GPU reads them in milliseconds; copying gigabytes would cost seconds
    on every ROME edit).
    """
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)} {t.device.type}".encode())
    t = t.detach()
    if t.device.type == "cpu":
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    else:
        h.update(checksums(t).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model, layer: int) -> str:
    """A hash of the config and every tensor in :func:`upstream_tensors` (names, dtypes, shapes, values)."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # where it was loaded from does not change C
    config["_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in upstream_tensors(model, layer):
        h.update(f"\x00{name}\x00{tensor_digest(t)}".encode())
    return h.hexdigest()


def _tokenizer_digest(tok, texts: list[str], max_length: int) -> str:
    """The vocabulary and the ids of the first texts (catches BOS/normalisation/truncation changes)."""
    probe = tok(texts[:16], truncation=True, max_length=max_length)["input_ids"]
    return hashlib.sha256(repr((type(tok).__name__, sorted(tok.get_vocab().items()), probe)).encode()).hexdigest()


def cache_key(model, tok, layer: int, texts: list[str], max_length: int) -> str:
    """The cache key of ``key_covariance(model, tok, layer, texts, max_length=max_length)``."""
    layer = adapter(model)._check_layer(layer)
    h = hashlib.sha256()
    for part in (model_fingerprint(model, layer), _tokenizer_digest(tok, texts, max_length),
                 hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
                 f"n={len(texts)} max_length={max_length} device={model_device(model).type} "
                 f"training={model.training}"):
        h.update(part.encode() + b"\x01")
    return f"cov_L{layer}_{h.hexdigest()[:32]}"


# --- memory and disk -----------------------------------------------------------------------
def _remember(key: str, C: torch.Tensor) -> None:
    """Keep C in memory, dropping the least recently used entries beyond the byte limit."""
    _MEMORY[key] = C
    _MEMORY.move_to_end(key)
    limit = _megabytes("KVLAB_CACHE_MEMORY_MB", DEFAULT_MEMORY_MAX_MB)
    while _MEMORY and sum(c.nbytes for c in _MEMORY.values()) > limit:
        _MEMORY.popitem(last=False)


def _warn(msg: str, once: str | None = None) -> None:
    if once is not None:
        if once in _WARNED:
            return
        _WARNED.add(once)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _load(path: Path, d_ff: int) -> torch.Tensor | None:
    """C from a cache file; None if there is none or it is unreadable (a corrupt file is removed)."""
    if not path.is_file():
        return None
    try:
        C = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:  # evicted by another process meanwhile
        return None
    except PermissionError as e:  # not ours to read: leave the file alone
        _warn(f"kvlab: cannot read the covariance cache {path} ({e}); computing C", once=str(path))
        return None
    except Exception as e:  # truncated or corrupt (a crash mid-write, a full disk)
        _warn(f"kvlab: removing the unreadable covariance cache {path} ({type(e).__name__}: {e}); "
              "recomputing C")
        _remove(path)
        return None
    if not (isinstance(C, torch.Tensor) and C.dtype == torch.float64 and tuple(C.shape) == (d_ff, d_ff)):
        _warn(f"kvlab: removing the covariance cache {path}: it does not hold a float64 ({d_ff}, {d_ff}) "
              "tensor; recomputing C")
        _remove(path)
        return None
    try:
        os.utime(path)  # mark as recently used (mtime: atime is often not updated)
    except OSError:
        pass
    return C


def _save(C: torch.Tensor, path: Path) -> None:
    """Write C atomically (unless it alone exceeds the limit), then evict beyond the size limit."""
    limit = _megabytes("KVLAB_CACHE_MAX_MB", DEFAULT_CACHE_MAX_MB)
    folder = path.parent
    if C.nbytes <= limit:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(C, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                _remove(Path(tmp))
                raise
        except (OSError, RuntimeError) as e:  # read-only or full disk (torch.save may wrap it)
            _warn(f"kvlab: cannot write the covariance cache in {folder} ({e}); C is computed but not "
                  "cached. Set KVLAB_CACHE to a writable folder.", once=str(folder))
            return
    evict(folder, limit)


def evict(folder: Path | None = None, limit: int | None = None) -> None:
    """Remove least recently used ``cov_*.pt`` files until they take at most ``limit`` bytes.

    Also removes temporary files a crashed writer left behind (older than an hour).
    Defaults: :func:`cache_dir` and ``$KVLAB_CACHE_MAX_MB``.
    """
    folder = cache_dir() if folder is None else Path(folder)
    limit = _megabytes("KVLAB_CACHE_MAX_MB", DEFAULT_CACHE_MAX_MB) if limit is None else limit
    try:
        found = [*folder.glob("cov_*.pt"), *folder.glob(".cov_*.tmp")]
    except OSError:  # no such folder, not a folder, not readable
        return
    files = []
    for p in found:
        try:
            st = p.stat()
        except OSError:  # removed by another process meanwhile
            continue
        if p.suffix == ".tmp":
            if st.st_mtime < time.time() - 3600:
                _remove(p)
            continue
        files.append((st.st_mtime_ns, st.st_size, p))
    total = sum(size for _, size, _ in files)
    for _, size, p in sorted(files):  # oldest first
        if total <= limit:
            break
        _remove(p)
        total -= size


# --- C -------------------------------------------------------------------------------------
def default_texts(n: int) -> tuple[list[str], str]:
    """``n`` sentences of the built-in world's training corpus, and a name for them."""
    try:
        from ..world import corpus_texts
    except ImportError as e:  # pragma: no cover
        raise ValueError("no texts given and kvlab.world is unavailable: pass texts=[...]") from e
    return corpus_texts(n=n, seed=12345), "world"


@torch.no_grad()
def key_covariance(model, tok, layer: int, texts: list[str] | None = None, n: int = 2000,
                   batch_size: int = 64, max_length: int = 128, cache: bool = True,
                   progress: bool = True, stats=None) -> torch.Tensor:
    """C = E[k kᵀ] over all tokens of ``n`` texts, k = input of the value projection at ``layer``.

    Returns a float64 tensor (d_ff, d_ff) on the CPU. ``texts=None`` uses the world corpus
    (ROME uses 100k Wikipedia samples for GPT-2 XL; pass your own texts for hub models, e.g.
    ``kvlab.data.load_corpus``). ``stats``: C precomputed instead, a tensor or a file in ROME's
    ``layer_stats`` format (``kvlab.data.fetch_layer_stats`` gets ROME's published ones); only its
    shape is checked. ``cache=False`` neither reads nor writes the caches (see the module docstring).
    """
    arch = adapter(model)
    layer = arch._check_layer(layer)
    if stats is not None:
        from ..data import load_layer_stats
        C = stats if isinstance(stats, torch.Tensor) else load_layer_stats(stats)
        if tuple(C.shape) != (arch.d_ff, arch.d_ff):
            raise ValueError(f"key_covariance: stats of shape {tuple(C.shape)} do not fit layer {layer}, whose keys "
                             f"have d_ff={arch.d_ff}")
        return C.to("cpu", torch.float64)
    if texts is None:
        texts, _ = default_texts(n)
    else:
        texts = [t for t in texts if isinstance(t, str) and t.strip()][:n]
        if not texts:
            raise ValueError("key_covariance: no non-empty texts given")
    d_ff = arch.d_ff
    if cache:
        key = cache_key(model, tok, layer, texts, max_length)
        if key in _MEMORY:
            _MEMORY.move_to_end(key)
            return _MEMORY[key]
        path = cache_dir() / f"{key}.pt"
        C = _load(path, d_ff)
        if C is not None:
            _remember(key, C)
            return C

    ensure_pad(tok)
    dev = model_device(model)
    product = torch.float64 if dev.type == "cpu" else torch.float32    # one batch's k kᵀ
    # Σ k kᵀ in float64 on the model's device; Apple's MPS has no float64: there on the CPU
    acc = torch.zeros(d_ff, d_ff, dtype=torch.float64, device="cpu" if dev.type == "mps" else dev)
    count = 0
    it = range(0, len(texts), batch_size)
    for i in tqdm(it, desc=f"key covariance L{layer}", disable=not progress, leave=False):
        chunk = texts[i:i + batch_size]
        with right_padded(tok):   # whatever the caller's padding_side; masked either way, but C's key assumes it
            enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        ids = enc["input_ids"].to(dev)
        mask = enc["attention_mask"].to(dev)
        with capture(model, {"k": arch.value_module(layer)}, what="input") as st:
            model(input_ids=ids, attention_mask=mask)
        k = st["k"][mask.bool()].to(product)  # (n_tokens, d_ff), on the model's device
        kk = k.T @ k                                                   # (d_ff, d_ff)
        acc += (kk if kk.device == acc.device else kk.cpu()).double()
        count += k.shape[0]
        del st, k
    C = (acc / max(count, 1)).cpu()
    del acc
    if cache:
        _save(C, path)
        _remember(key, C)
    return C


def solve(C: torch.Tensor, k: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """C⁻¹k in float64, with a tiny ridge (ridge·mean diag) so dead units do not make C singular.

    C: (d_ff, d_ff), k: (d_ff,) or (d_ff, n). Returns the same shape as k, float64.
    """
    C = C.double()
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    reg = ridge * C.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(C + reg * eye, k.double().to(C.device))
