"""The FFN as a key-value memory: coefficients m and the decomposition FF(x) = Σ m_i v_i + b.

For every supported family the coefficient vector m is the input of the value
projection (see :mod:`kvlab.arch`), so reading m costs one hook and no extra compute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks
from .arch import adapter
from .hooks import capture
from .text import Batch, encode
from .tracing import eval_mode


@dataclass
class FFNDecomposition:
    """One layer's FFN on a batch, written as a sum of weighted values.

    ``output == m @ values + bias`` (up to float error): :meth:`reconstruct` computes it.
    """

    layer: int
    m: torch.Tensor            # (batch, seq, d_ff) memory coefficients
    values: torch.Tensor       # (d_ff, d_model) value vectors v_i
    bias: torch.Tensor         # (d_model,) value-projection bias (zeros if none)
    output: torch.Tensor       # (batch, seq, d_model) the module's real output
    ffn_input: torch.Tensor    # (batch, seq, d_model) the FFN's input (after its layer norm)
    batch: Batch

    def reconstruct(self) -> torch.Tensor:
        """Σ_i m_i v_i + b, (batch, seq, d_model)."""
        return self.m @ self.values + self.bias

    def sub_updates(self, b: int, pos: int | None = None) -> torch.Tensor:
        """The individual sub-updates m_i·v_i at one position, (d_ff, d_model)."""
        pos = int(self.batch.last[b]) if pos is None else pos
        return self.m[b, pos, :, None] * self.values


def run_with_memories(model, batch: Batch, layers: list[int]) -> dict[str, dict[int, torch.Tensor]]:
    """One forward pass recording, per layer, the coefficients m, the FFN input and the FFN output.

    The model runs in eval mode (dropout off) for the pass, its mode given back afterwards."""
    arch = adapter(model)
    mods = {}
    for l in layers:
        mods[f"m{l}"] = arch.value_module(l)
    ins = {f"x{l}": arch.mlp(l) for l in layers}
    with torch.no_grad(), capture(model, mods, "input") as m, capture(model, ins, "input") as xs, \
            capture(model, {f"o{l}": arch.mlp(l) for l in layers}, "output") as outs, eval_mode(model):
        model(**batch.inputs())
    return {
        "m": {l: m[f"m{l}"] for l in layers},
        "x": {l: xs[f"x{l}"] for l in layers},
        "out": {l: outs[f"o{l}"] for l in layers},
    }


def coefficients(model, tok, prompts: str | list[str], layers: int | list[int] | None = None
                 ) -> torch.Tensor | dict[int, torch.Tensor]:
    """Memory coefficients m = f(x·Kᵀ) for the prompts.

    One layer -> (batch, seq, d_ff); a list (or None = all layers) -> {layer: tensor}.
    Pad positions are zeroed. The model runs in eval mode (its mode given back afterwards); NaN/inf
    coefficients raise ValueError naming the weight that caused them.
    """
    arch = adapter(model)
    single = layers is not None and not isinstance(layers, (list, tuple, range)) and getattr(layers, "ndim", 0) == 0
    ls = [arch.check_layer(layers)] if single else arch.check_layers(layers)
    batch = encode(model, tok, prompts)
    rec = run_with_memories(model, batch, ls)["m"]
    mask = batch.attention_mask[..., None].to(rec[ls[0]].dtype)  # (batch, seq, 1)
    out = {l: rec[l] * mask for l in ls}
    for l in ls:
        checks.finite_output(model, out[l], "coefficients", f"the coefficients m of layer {l}")
    return out[ls[0]] if single else out


def decompose(model, tok, prompts: str | list[str], layer: int) -> FFNDecomposition:
    """Decompose layer ``layer``'s FFN output on the prompts into Σ m_i v_i + b."""
    arch = adapter(model)
    layer = arch.check_layer(layer)
    batch = encode(model, tok, prompts)
    rec = run_with_memories(model, batch, [layer])
    checks.finite_output(model, rec["m"][layer], "decompose", f"the coefficients m of layer {layer}")
    checks.finite_output(model, rec["out"][layer], "decompose", f"the FFN output of layer {layer}")
    V = arch.value_matrix(layer).detach()
    b = arch.value_bias(layer)
    bias = b.detach() if b is not None else torch.zeros(arch.d_model, dtype=V.dtype, device=V.device)
    return FFNDecomposition(layer, rec["m"][layer], V, bias, rec["out"][layer], rec["x"][layer], batch)


def coefficients_from_keys(model, layer: int, ffn_input: torch.Tensor) -> torch.Tensor:
    """Recompute m = f(x·Kᵀ + b) from an FFN input with the key matrices. (..., d_model) -> (..., d_ff)."""
    return adapter(model).coefficients_from_input(layer, ffn_input)


def sparsity(m: torch.Tensor, mask: torch.Tensor | None = None, threshold: float = 0.0) -> float:
    """Fraction of memories with coefficient > threshold (positive = 'active' for GELU/ReLU-like f).

    ``m``: (batch, seq, d_ff), finite; ``mask``: (batch, seq), the positions counted (at least one);
    ``threshold``: a finite number.
    """
    threshold = checks.number("sparsity", "threshold", threshold, accepted="a coefficient counts as active above it")
    if not torch.is_tensor(m) or m.numel() == 0:
        raise ValueError(f"sparsity: m must be a non-empty tensor of coefficients, got "
                         f"{tuple(m.shape) if torch.is_tensor(m) else type(m).__name__}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"sparsity: m has {int((~torch.isfinite(m)).sum())} NaN/inf entries; NaN would count as "
                         f"inactive")
    active = (m > threshold).float()  # (batch, seq, d_ff)
    if mask is not None:
        if tuple(mask.shape) != tuple(m.shape[:-1]):
            raise ValueError(f"sparsity: mask has shape {tuple(mask.shape)}, expected {tuple(m.shape[:-1])} "
                             f"(m without its last dimension)")
        if not bool((mask != 0).any()):
            raise ValueError("sparsity: mask selects no position; nothing to average")
        mask = mask.to(active.dtype)
        return float((active.mean(-1) * mask).sum() / mask.sum())
    return float(active.mean())
