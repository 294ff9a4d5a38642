"""Key statistics for ROME/MEMIT: C = E[k kᵀ] of the value-module inputs at one layer.

The "keys" ROME edits are the inputs k = m of the value projection (the memory
coefficients, d_ff wide). ROME needs their uncentred second moment C so that an edit
changes W mainly along directions that rarely occur (the update is ∝ C⁻¹k*).

    C = key_covariance(model, tok, layer=3)               # world corpus, cached on disk
    C = key_covariance(model, tok, 17, texts=wiki_texts)  # any list of texts (e.g. for gpt2-xl)

Every non-pad token of every text contributes one k. Accumulated in float64; the result is
cached under ``data/cache/`` keyed by a hash of the model (config + weights of the layer),
the corpus, the layer and the number of texts.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import adapter, model_device
from ..hooks import capture
from ..text import ensure_pad

_MEMORY: dict[str, torch.Tensor] = {}


def cache_dir() -> Path:
    """``data/cache`` of the repository (``$KVLAB_DATA/cache`` if set)."""
    root = Path(os.environ["KVLAB_DATA"]) if os.environ.get("KVLAB_DATA") else \
        Path(__file__).resolve().parents[2] / "data"
    return root / "cache"


def model_fingerprint(model, layer: int) -> str:
    """A short hash identifying the model: config, name and a sample of the layer's key weights."""
    arch = adapter(model)
    h = hashlib.sha1()
    h.update(model.config.to_json_string(use_diff=False).encode())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    for w in arch.key_matrices(layer) + [arch.value_matrix(layer)]:
        sample = w.detach().flatten()[:: max(1, w.numel() // 4096)].float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def default_texts(n: int) -> tuple[list[str], str]:
    """``n`` sentences of the built-in world's training corpus, and a name for the cache key."""
    try:
        from ..world import corpus_texts
    except ImportError as e:  # pragma: no cover
        raise ValueError("no texts given and kvlab.world is unavailable: pass texts=[...]") from e
    return corpus_texts(n=n, seed=12345), "world"


@torch.no_grad()
def key_covariance(model, tok, layer: int, texts: list[str] | None = None, n: int = 2000,
                   batch_size: int = 64, max_length: int = 128, cache: bool = True,
                   progress: bool = True) -> torch.Tensor:
    """C = E[k kᵀ] over all tokens of ``n`` texts, k = input of the value projection at ``layer``.

    Returns a float64 tensor (d_ff, d_ff) on the CPU. ``texts=None`` uses the world corpus
    (ROME uses 100k Wikipedia samples for GPT-2 XL; pass your own texts for hub models).
    """
    arch = adapter(model)
    layer = arch._check_layer(layer)
    if texts is None:
        texts, corpus_name = default_texts(n)
    else:
        texts = [t for t in texts if isinstance(t, str) and t.strip()][:n]
        if not texts:
            raise ValueError("key_covariance: no non-empty texts given")
        corpus_name = hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:12]
    key = f"cov_{model_fingerprint(model, layer)}_{corpus_name}_L{layer}_n{len(texts)}_t{max_length}"
    if cache and key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir() / f"{key}.pt"
    if cache and path.exists():
        C = torch.load(path)
        _MEMORY[key] = C
        return C

    ensure_pad(tok)
    d_ff = arch.d_ff
    acc = torch.zeros(d_ff, d_ff, dtype=torch.float64)  # Σ k kᵀ
    count = 0
    it = range(0, len(texts), batch_size)
    for i in tqdm(it, desc=f"key covariance L{layer}", disable=not progress, leave=False):
        chunk = texts[i:i + batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        ids = enc["input_ids"].to(model_device(model))
        mask = enc["attention_mask"].to(ids.device)
        with capture(model, {"k": arch.value_module(layer)}, what="input") as st:
            model(input_ids=ids, attention_mask=mask)
        k = st["k"][mask.bool()].double().cpu()  # (n_tokens, d_ff)
        acc += k.T @ k
        count += k.shape[0]
    C = acc / max(count, 1)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(C, path)
        _MEMORY[key] = C
    return C


def solve(C: torch.Tensor, k: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """C⁻¹k in float64, with a tiny ridge (ridge·mean diag) so dead units do not make C singular.

    C: (d_ff, d_ff), k: (d_ff,) or (d_ff, n). Returns the same shape as k, float64.
    """
    C = C.double()
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    reg = ridge * C.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(C + reg * eye, k.double().to(C.device))
