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
  (:func:`tensor_digest`), so any change of any entry gives a new key; and the class and
  plain settings (eps, flags, functions) of every module they sit in, so swapping the
  activation or changing a norm's eps gives a new key too. The value
  projection of the layer, the blocks above and the head are left out: editing the
  values at ``layer`` (sequential ROME) reuses the same C instead of writing a new copy;
* the config, the tokenizer (vocabulary, truncation side and how it encodes the first texts),
  the texts, their number, ``max_length``, the device type and autocast (on/off, its dtype).

State a key cannot capture bypasses the cache: while any forward hook or pre-hook is registered
(on any module of the model, or globally in torch), a module's ``forward`` is replaced, or a module
is in training mode (dropout makes C random), C is computed fresh, neither read from nor written to
either cache, and a ``RuntimeWarning`` says why (exact but slower). A hooked model's C is the hooked
model's, never the plain model's.

``batch_size`` is not part of the key: batches are right-padded and padding is masked,
so it changes C only by float rounding (~1e-8 relative).

Files live in ``$KVLAB_CACHE``, else ``$XDG_CACHE_HOME/kvlab``, else ``~/.cache/kvlab``
(never the source tree; ``$KVLAB_DATA`` is for data only). They are written atomically
(a temporary file, then ``os.replace``) and hold C with the key it was computed for and a
SHA-256 of its bits, checked on every read: an unreadable file, one written for another key or
one whose contents no longer match its checksum is removed with a warning naming it, and C
recomputed. The folder holds at most ``$KVLAB_CACHE_MAX_MB`` MiB (default 2048; 0 disables the
disk cache: no file is read, written or removed), least recently used files go first. The
in-memory cache holds at most ``$KVLAB_CACHE_MEMORY_MB`` MiB (default 1024; 0 disables it); a C
that was changed in place after it was returned is noticed (its version counter) and recomputed.
Both settings are read before any work: a value that is not a number ≥ 0 raises ``ValueError``
naming the variable. An unwritable folder only costs a warning.

C is never cached or returned with NaN or inf entries: a non-finite parameter upstream of the keys,
or keys that overflow in the forward pass, raise ``ValueError`` naming the parameter or the layer
and the text.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
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
from ..text import ensure_pad, max_positions, right_padded

DEFAULT_CACHE_MAX_MB = 2048
DEFAULT_MEMORY_MAX_MB = 1024
DEFAULT_MAX_LENGTH = 128   # tokens per text, at most the model's positions
FILE_FORMAT = "kvlab.key_covariance/2"  # a cache file: {"format", "key", "sha256", "C"}
_MEMORY: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()  # key -> (C, C._version), LRU first
_WARNED: set[str] = set()


# --- where -------------------------------------------------------------------------------
def _megabytes(name: str, default: float) -> int:
    """The size limit in env ``name`` (MiB), in bytes; 0 means that cache is off.

    Unset or empty: ``default``. ``inf``: no limit. Anything else that is not a number ≥ 0 (a word,
    ``nan``, a negative number) raises ``ValueError`` naming the variable.
    """
    raw = os.environ.get(name, "").strip()
    try:
        mb = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number of MiB (0 turns that cache off), got {raw!r}") from None
    if math.isnan(mb):
        raise ValueError(f"{name} must be a number of MiB (0 turns that cache off), got {raw!r}")
    if not mb >= 0:
        raise ValueError(f"{name} must be ≥ 0 MiB (0 turns that cache off), got {raw!r}")
    return int(min(mb, 2.0**40) * 2**20)  # inf: no limit


# --- what C depends on -------------------------------------------------------------------
def upstream_modules(model, layer: int) -> list[tuple[str, torch.nn.Module]]:
    """Named modules that the input of ``layer``'s value projection depends on (see :func:`upstream_tensors`)."""
    arch = adapter(model)
    layer = arch._check_layer(layer)
    after = [arch.value_module(layer), arch.final_norm, arch.unembed]
    after += [arch.layer(l) for l in range(layer + 1, arch.n_layers)]
    if arch.parallel:
        keep = (arch.mlp(layer), arch.mlp_norm(layer))
        after += [c for c in arch.layer(layer).children() if not any(c is k for k in keep)]
    skip = {id(m) for a in after if a is not None for m in a.modules()}
    return [(name, m) for name, m in model.named_modules() if id(m) not in skip]


def upstream_tensors(model, layer: int) -> list[tuple[str, torch.Tensor]]:
    """Named parameters and buffers that the input of ``layer``'s value projection depends on.

    All of the model except what runs after that input: the value projection itself, the
    blocks above, the final norm and the unembedding (a tied unembedding is still hashed
    as the input embedding). In a parallel block the FFN does not read the attention, so
    only its norm and the MLP of ``layer`` count.
    """
    out, seen = [], set()
    for name, m in upstream_modules(model, layer):
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
    for name, m in upstream_modules(model, layer):
        h.update(f"\x02{name}\x00{_module_settings(m)}".encode())
    return h.hexdigest()


_PLAIN = (bool, int, float, str, type(None))


def _plain(v):
    """A stable description of a module attribute that can change what the module computes, or None to skip it."""
    if isinstance(v, _PLAIN):
        return repr(v)
    if isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v):
        return repr(tuple(v))
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, torch.Tensor):  # a plain tensor attribute (not a parameter or buffer)
        return tensor_digest(v)
    if callable(v) and hasattr(v, "__qualname__"):  # an activation function, a rope initialiser
        return f"{getattr(v, '__module__', '')}.{v.__qualname__}"
    return None  # configs, submodules, caches: covered elsewhere or not part of the computation


def _module_settings(m: torch.nn.Module) -> str:
    """The class of ``m`` and its plain settings (eps, flags, sizes, functions): swapping the activation or
    changing a norm's eps changes C but no parameter, so they are part of the key. ``training`` and
    private attributes are left out (training mode bypasses the cache, see :func:`uncacheable`)."""
    parts = [f"{type(m).__module__}.{type(m).__qualname__}"]
    for k, v in sorted(vars(m).items()):
        if k.startswith("_") or k == "training":
            continue
        d = _plain(v)
        if d is not None:
            parts.append(f"{k}={d}")
    return "\x00".join(parts)


def _is_device_hook(m: torch.nn.Module) -> bool:
    """``m.forward`` was replaced by accelerate only to move tensors between devices (``device_map``)."""
    hook = getattr(m, "_hf_hook", None)
    hooks = getattr(hook, "hooks", [hook])  # a SequentialHook holds several
    return hook is not None and all(type(x).__name__ == "AlignDevicesHook" for x in hooks)


def _few(names: list[str], k: int = 3) -> str:
    names = [n or "the model itself" for n in names]
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def uncacheable(model) -> str | None:
    """Why C of ``model`` cannot be cached in its present state, or None when it can.

    A key hashes weights and settings, not code that runs on the side: any forward hook or pre-hook
    (kvlab's context managers or anyone's; on a module of the model or global in torch), a replaced
    ``forward`` (except accelerate's device placement) or a module in training mode (dropout: C is
    random) makes C something other than the plain model's, so it must neither come from nor go
    to the cache.
    """
    import torch.nn.modules.module as nnm
    for g in ("_global_forward_pre_hooks", "_global_forward_hooks"):
        if getattr(nnm, g, None):
            return f"global forward hooks are registered in torch (torch.nn.modules.module.{g})"
    mods = list(model.named_modules())
    hooked = [n for n, m in mods if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        return f"forward hooks are registered on {_few(hooked)}"
    replaced = [n for n, m in mods if "forward" in vars(m) and not _is_device_hook(m)]
    if replaced:
        return f"the forward of {_few(replaced)} is replaced"
    training = [n for n, m in mods if m.training]
    if training:
        return (f"{_few(training)} {'is' if len(training) == 1 else 'are'} in training mode (dropout makes C "
                "random; call model.eval())")
    return None


def _tokenizer_digest(tok, texts: list[str], max_length: int) -> str:
    """The vocabulary and the ids of the first texts (catches BOS/normalisation/truncation changes)."""
    probe = tok(texts[:16], truncation=True, max_length=max_length)["input_ids"]
    side = getattr(tok, "truncation_side", None)  # which end of a long text is kept
    return hashlib.sha256(repr((type(tok).__name__, sorted(tok.get_vocab().items()), side, probe)).encode()
                          ).hexdigest()


def _texts_digest(texts: list[str]) -> str:
    """Every text, length-prefixed (no separator inside a text can make two lists collide)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def _autocast(device: torch.device) -> str:
    """Whether autocast is on for the model's device, and in which dtype (it changes the activations)."""
    try:
        on = torch.is_autocast_enabled(device.type)
        return f"{device.type}:{torch.get_autocast_dtype(device.type)}" if on else "off"
    except (TypeError, RuntimeError, AttributeError):  # a device type autocast does not know
        return "off"


def check_max_length(model, max_length) -> int:
    """The number of tokens a text is cut to: ``max_length``, checked; None: 128, or the model's positions if fewer.

    An explicit ``max_length`` longer than the model's positions raises ``ValueError`` naming both
    (the position embedding lookup would fail deep inside the forward pass).
    """
    limit = max_positions(model)
    default = min(DEFAULT_MAX_LENGTH, limit[0]) if limit is not None else DEFAULT_MAX_LENGTH
    if max_length is None:
        return default
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
        raise ValueError(f"key_covariance: max_length must be a positive int or None, got {max_length!r} "
                         f"({type(max_length).__name__})")
    if limit is not None and max_length > limit[0]:
        raise ValueError(f"key_covariance: max_length={max_length} exceeds the model's {limit[0]} positions "
                         f"(config.{limit[1]}); pass max_length ≤ {limit[0]}, or None for {default}")
    return int(max_length)


def cache_key(model, tok, layer: int, texts: list[str], max_length: int | None = None) -> str:
    """The cache key of ``key_covariance(model, tok, layer, texts, max_length=max_length)``."""
    layer = adapter(model)._check_layer(layer)
    max_length = check_max_length(model, max_length)
    dev = model_device(model)
    h = hashlib.sha256()
    for part in (model_fingerprint(model, layer), _tokenizer_digest(tok, texts, max_length),
                 _texts_digest(texts),
                 f"n={len(texts)} max_length={max_length} device={dev.type} autocast={_autocast(dev)} "
                 f"training={model.training}"):
        h.update(part.encode() + b"\x01")
    return f"cov_L{layer}_{h.hexdigest()[:32]}"


# --- memory and disk -----------------------------------------------------------------------
def _remember(key: str, C: torch.Tensor, limit: int) -> None:
    """Keep C in memory, dropping the least recently used entries beyond ``limit`` bytes (0: keep none)."""
    _MEMORY[key] = (C, C._version)
    _MEMORY.move_to_end(key)
    while _MEMORY and sum(c.nbytes for c, _ in _MEMORY.values()) > limit:
        _MEMORY.popitem(last=False)


def _recall(key: str) -> torch.Tensor | None:
    """C from memory, or None; a C changed in place since it was stored (its version moved) is dropped."""
    if key not in _MEMORY:
        return None
    C, version = _MEMORY[key]
    if C._version != version:
        del _MEMORY[key]
        _warn(f"kvlab: the cached key covariance {key} was changed in place after key_covariance returned "
              "it; recomputing C (copy C before changing it)")
        return None
    _MEMORY.move_to_end(key)
    return C


def _warn(msg: str, once: str | None = None, depth: int = 2) -> None:
    """A RuntimeWarning pointing at the caller of :func:`key_covariance`, ``depth`` calls above the caller
    of this function (2: from a helper of key_covariance; key_covariance's no_grad wrapper is one more)."""
    if once is not None:
        if once in _WARNED:
            return
        _WARNED.add(once)
    warnings.warn(msg, RuntimeWarning, stacklevel=3 + depth)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _entry_problem(obj, d_ff: int, key: str) -> str | None:
    """What is wrong with a loaded cache entry for ``key``, or None if it is sound."""
    fields = ("format", "key", "sha256", "C")
    if not (isinstance(obj, dict) and all(f in obj for f in fields) and obj["format"] == FILE_FORMAT):
        return (f"it is not a {FILE_FORMAT} file with {', '.join(fields)} (written by an older kvlab or by "
                "something else)")
    C = obj["C"]
    if not (isinstance(C, torch.Tensor) and C.dtype == torch.float64 and tuple(C.shape) == (d_ff, d_ff)):
        return f"it does not hold a float64 ({d_ff}, {d_ff}) tensor"
    if obj["key"] != key:
        return f"it holds C for key {obj['key']!r}, not for {key!r}"
    if obj["sha256"] != tensor_digest(C):
        return "its contents do not match its checksum (the file was changed after it was written)"
    if not bool(torch.isfinite(C).all()):
        return "it holds NaN or inf entries"
    return None


def _load(path: Path, d_ff: int, key: str) -> torch.Tensor | None:
    """C from a cache file; None if there is none or it is unreadable or unsound (such a file is removed).

    Sound: a :data:`FILE_FORMAT` dict for ``key`` whose float64 (d_ff, d_ff) C matches its SHA-256.
    """
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
    problem = _entry_problem(obj, d_ff, key)
    if problem is not None:
        _warn(f"kvlab: removing the covariance cache {path}: {problem}; recomputing C")
        _remove(path)
        return None
    try:
        os.utime(path)  # mark as recently used (mtime: atime is often not updated)
    except OSError:
        pass
    return obj["C"]


def _save(C: torch.Tensor, path: Path, key: str, limit: int) -> None:
    """Write C with its key and checksum atomically (unless it alone exceeds ``limit`` bytes), then evict
    beyond the limit. ``limit`` 0: the disk cache is off, nothing is written or removed."""
    if limit <= 0:
        return
    folder = path.parent
    if C.nbytes <= limit:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save({"format": FILE_FORMAT, "key": key, "sha256": tensor_digest(C), "C": C}, f)
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
    Defaults: :func:`cache_dir` and ``$KVLAB_CACHE_MAX_MB``; with the setting 0 (the disk cache is
    off) nothing is removed. An explicit ``limit=0`` empties the folder of covariance files.
    """
    folder = cache_dir() if folder is None else Path(folder)
    if limit is None:
        limit = _megabytes("KVLAB_CACHE_MAX_MB", DEFAULT_CACHE_MAX_MB)
        if limit <= 0:
            return
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


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"key_covariance: {name} must be a positive int, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_texts(texts, n: int) -> list[str]:
    """The first ``n`` non-blank texts (blank ones are skipped); anything but a list of strings raises."""
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"key_covariance: texts must be a list of strings, got one {type(texts).__name__} "
                         f"({texts[:40]!r}); wrap it in a list")
    try:
        texts = list(texts)
    except TypeError:
        raise ValueError(f"key_covariance: texts must be a list of strings, got {type(texts).__name__}") from None
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"key_covariance: texts[{bad}] is a {type(texts[bad]).__name__} ({texts[bad]!r}), "
                         "not a string")
    texts = [t for t in texts if t.strip()][:n]
    if not texts:
        raise ValueError("key_covariance: no non-empty texts given")
    return texts


def _check_finite_weights(model, layer: int) -> None:
    """ValueError naming the first parameter upstream of ``layer``'s keys with a NaN or inf entry."""
    params = {id(p) for p in model.parameters()}
    for name, t in upstream_tensors(model, layer):
        if id(t) in params and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"key_covariance: parameter {name} has NaN or inf entries, and layer {layer}'s keys "
                             "depend on it: C would not be finite. Restore or fix that weight")


@torch.no_grad()
def key_covariance(model, tok, layer: int, texts: list[str] | None = None, n: int = 2000,
                   batch_size: int = 64, max_length: int | None = None, cache: bool = True,
                   progress: bool = True, stats=None) -> torch.Tensor:
    """C = E[k kᵀ] over all tokens of ``n`` texts, k = input of the value projection at ``layer``.

    Returns a float64 tensor (d_ff, d_ff) on the CPU. ``texts=None`` uses the world corpus
    (ROME uses 100k Wikipedia samples for GPT-2 XL; pass your own texts for hub models, e.g.
    ``kvlab.data.load_corpus``); blank texts are skipped. Each text is cut to ``max_length`` tokens
    (None: 128, or the model's positions if fewer; more than the model's positions raises).
    ``stats``: C precomputed instead, a tensor or a file in ROME's ``layer_stats`` format
    (``kvlab.data.fetch_layer_stats`` gets ROME's published ones); its shape and finiteness are
    checked. ``cache=False`` neither reads nor writes the caches; a hooked model, a replaced forward or
    training mode bypass them too, with a warning (see the module docstring).

    Raises ValueError for a bad argument, a non-finite parameter upstream of the keys, and keys
    that are not finite (C is never NaN).
    """
    arch = adapter(model)
    layer = arch._check_layer(layer)
    if stats is not None:
        from ..data import load_layer_stats
        C = stats if isinstance(stats, torch.Tensor) else load_layer_stats(stats)
        if tuple(C.shape) != (arch.d_ff, arch.d_ff):
            raise ValueError(f"key_covariance: stats of shape {tuple(C.shape)} do not fit layer {layer}, whose keys "
                             f"have d_ff={arch.d_ff}")
        if not bool(torch.isfinite(C).all()):
            raise ValueError(f"key_covariance: stats for layer {layer} have NaN or inf entries")
        return C.to("cpu", torch.float64)
    n = _positive_int("n", n)
    batch_size = _positive_int("batch_size", batch_size)
    max_length = check_max_length(model, max_length)
    texts = default_texts(n)[0] if texts is None else _check_texts(texts, n)
    d_ff = arch.d_ff
    if cache:  # the settings first: a bad one raises before any work
        disk_limit = _megabytes("KVLAB_CACHE_MAX_MB", DEFAULT_CACHE_MAX_MB)
        memory_limit = _megabytes("KVLAB_CACHE_MEMORY_MB", DEFAULT_MEMORY_MAX_MB)
        why = uncacheable(model)
        if why is not None:
            _warn(f"kvlab: computing the key covariance of layer {layer} without the covariance cache: {why}, "
                  "so C is not the plain model's; it is neither read from nor written to the cache", depth=1)
            cache = False
    if cache:
        key = cache_key(model, tok, layer, texts, max_length)
        C = _recall(key)
        if C is not None:
            return C
        path = cache_dir() / f"{key}.pt"
        C = _load(path, d_ff, key) if disk_limit > 0 else None
        if C is not None:
            _remember(key, C, memory_limit)
            return C

    _check_finite_weights(model, layer)
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
        real = mask.bool()
        bad = (~torch.isfinite(st["k"]).all(-1) & real).any(-1)       # (batch,) rows with a non-finite key
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(f"key_covariance: the keys of layer {layer} are NaN or inf for text {i + j} "
                             f"({chunk[j][:60]!r}): the forward pass overflows in {st['k'].dtype}; C would not "
                             "be finite (try float32)")
        k = st["k"][real].to(product)  # (n_tokens, d_ff), on the model's device
        kk = k.T @ k                                                   # (d_ff, d_ff)
        acc += (kk if kk.device == acc.device else kk.cpu()).double()
        count += k.shape[0]
        del st, k
    if count == 0:
        raise ValueError(f"key_covariance: the {len(texts)} texts tokenised to no tokens")
    C = (acc / count).cpu()
    del acc
    if not bool(torch.isfinite(C).all()):  # finite keys whose products overflow (float32 on a GPU)
        raise ValueError(f"key_covariance: C of layer {layer} has NaN or inf entries: Σ k kᵀ overflows in "
                         f"{product} (keys too large)")
    if cache:
        _save(C, path, key, disk_limit)
        _remember(key, C, memory_limit)
    return C


def solve(C: torch.Tensor, k: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """C⁻¹k in float64, with a tiny ridge (ridge·mean diag) so dead units do not make C singular.

    C: (d_ff, d_ff), k: (d_ff,) or (d_ff, n). Returns the same shape as k, float64.
    """
    C = C.double()
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    reg = ridge * C.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(C + reg * eye, k.double().to(C.device))
