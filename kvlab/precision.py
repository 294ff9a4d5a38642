"""Training float16 / bfloat16 weights: float32 master copies and dynamic loss scaling.

Why. On a GPU kvlab runs models in float16 (or bfloat16), and training such weights directly fails:

* Adam's ``eps = 1e-8`` rounds to 0 in float16, so a weight whose gradient is 0 gets 0 / 0 = NaN;
* an update below half the spacing of the weight's dtype rounds away (lr 5e-4 on a weight of 0.5:
  float16 spacing 4.9e-4, bfloat16 3.9e-3), so small learning rates change nothing;
* float16 gradients under 6e-8 flush to zero, over 65504 they overflow.

The remedy of mixed-precision training (Micikevicius et al. 2018; Apex O2, transformers' Trainer, peft's
float32 adapters): the optimiser steps float32 **master copies** of the trained parameters, and after each
step the model's weights receive the masters rounded to the model's dtype. In float16 the loss is also
**scaled** by S before backward (small gradients move up, away from underflow); the gradients are divided
by S in float32, and when one of them is inf/NaN, S is halved and *that step is redone* (torch.amp.GradScaler
skips it instead; an edit has a budget of a few dozen steps, so none is lost), with bounded retries and then
a ValueError. S doubles after ``growth_interval`` good steps. bfloat16 has float32's range: masters, no
scaling. float32 (or float64) parameters are their own masters and S = 1: training is exactly as without
this class.

    prec = MixedPrecision(params, compute_dtype(model), where="finetune_edit")
    opt = torch.optim.Adam(prec.masters, lr=lr)
    with prec:                                   # requires_grad on; flags and .grad restored on exit
        for step in range(steps):
            loss = loss_fn()
            prec.backward(loss, again=loss_fn)   # scaled backward, float32 grads on the masters
            prec.step(opt)                       # Adam on the masters, weights <- masters in their dtype
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

WIDE = (torch.float32, torch.float64)   # dtypes that are their own master copy


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: float16 if any floating parameter is float16 (it needs loss scaling),
    else bfloat16 if any is, else float32. A peft model in float16 has float32 adapters: float16."""
    return _narrowest(model.parameters())


def _narrowest(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    return next((dt for dt in (torch.float16, torch.bfloat16) if dt in dtypes), torch.float32)


def _step_ulp(w: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``w`` (float16 / bfloat16) moved one representable value up where ``up``, else down. (shape of w)"""
    u = w.view(torch.int16).to(torch.int32) & 0xFFFF                 # raw bits, 0 … 65535
    key = torch.where(u < 0x8000, u, 0x8000 - u)                     # monotone in the value; ±0 -> 0
    key = key + torch.where(up, 1, -1)
    u = torch.where(key >= 0, key, 0x8000 - key)
    return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16).view(w.dtype)


def round_into(m: torch.Tensor, dtype: torch.dtype, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``m`` (float32, inside [lo, hi]) rounded to ``dtype`` without leaving [lo, hi].

    Round to nearest, except where that crosses a bound: then the neighbour on the inner side (it lies
    between m and the original weight, which is representable and inside the box). Keeps FT+L's
    ‖W − W₀‖∞ ≤ ε exact in the model's dtype.
    """
    w = m.to(dtype)
    if dtype in WIDE:
        return w
    above, below = w.float() > hi, w.float() < lo
    if above.any() or below.any():
        w = torch.where(above | below, _step_ulp(w, below), w)
    return w


class MixedPrecision:
    """float32 master copies of ``params`` and, when the model computes in float16, dynamic loss scaling.

    ``params``: the tensors being trained (model weights, LoRA matrices, ROME's δ). ``dtype``: the
    dtype the model computes in (:func:`compute_dtype`); float16 turns loss scaling on, also for float32
    parameters whose gradient flows back through a float16 model (ROME's δ, peft's float32 adapters).
    Give the optimiser :attr:`masters`. Scale schedule as torch.amp.GradScaler's defaults (2¹⁶, ×½ on
    overflow, ×2 after ``growth_interval`` good steps); a step whose gradient overflows is redone, at most
    ``max_retries`` times in a row, then ValueError.
    """

    def __init__(self, params: Iterable[torch.Tensor], dtype: torch.dtype | None = None, *,
                 init_scale: float = 2.0 ** 16, growth_interval: int = 2000, max_retries: int = 32,
                 where: str = "training"):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{where}: no parameters to train")
        for p in self.params:
            if not isinstance(p, torch.Tensor) or not p.is_floating_point() or not p.is_leaf:
                raise ValueError(f"{where}: can only train floating-point leaf tensors, got "
                                 f"{type(p).__name__} {getattr(p, 'dtype', '')}")
        if not (init_scale > 0 and growth_interval >= 1 and max_retries >= 0):
            raise ValueError(f"{where}: need init_scale > 0, growth_interval ≥ 1, max_retries ≥ 0, got "
                             f"{init_scale}, {growth_interval}, {max_retries}")
        self.dtype = dtype if dtype is not None else _narrowest(self.params)
        self.where = where
        # float32 / float64 tensors are their own masters: no copy, the optimiser steps them in place
        self.masters = [p if p.dtype in WIDE else p.detach().to(torch.float32, copy=True) for p in self.params]
        self.scaling = self.dtype == torch.float16
        self.scale = float(init_scale) if self.scaling else 1.0
        self.growth_interval, self.max_retries = growth_interval, max_retries
        self.good_steps = 0       # steps since the scale last changed
        self.redone = 0           # backward passes redone at a lower scale, in all
        self._saved: list | None = None

    # -- requires_grad and .grad, restored on exit (also on error) ------------------------------
    def __enter__(self) -> "MixedPrecision":
        self._saved = [(p.requires_grad, p.grad) for p in self.params]
        for p in self.params:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc) -> None:
        for p, m, (flag, grad) in zip(self.params, self.masters, self._saved or []):
            p.requires_grad_(flag)
            p.grad = grad
            if m is not p:
                m.grad = None
        self._saved = None

    # -- one step -------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, again: Callable[[], torch.Tensor] | None = None) -> None:
        """Gradient of ``loss`` into ``masters[i].grad`` (float32, unscaled).

        In float16, ``loss · S`` is back-propagated; if a gradient is inf/NaN, S is halved and the
        backward redone on ``again()`` (a fresh loss, same computation), or on ``loss``'s retained graph
        when ``again`` is None. ValueError after ``max_retries`` halvings in a row, or for a NaN/inf loss.
        """
        if not self.scaling:
            self._clear()
            loss.backward()
            self._unscale()
            return
        for attempt in range(self.max_retries + 1):
            if attempt and again is not None:
                loss = again()
            if not bool(torch.isfinite(loss.detach()).all()):
                raise ValueError(f"{self.where}: the loss is {float(loss.detach().float().sum())} (NaN/inf) at "
                                 f"loss scale {self.scale:g}; the step was not taken")
            self._clear()
            (loss.float() * self.scale).backward(retain_graph=again is None)
            if self._unscale():
                return
            self.scale /= 2               # overflow: a smaller scale, the same step again
            self.good_steps = 0
            self.redone += 1
        self._clear()
        raise ValueError(f"{self.where}: the gradient has NaN/inf entries at every loss scale down to "
                         f"{self.scale * 2:g} ({self.max_retries + 1} tries in a row) although the loss is finite; "
                         f"the step was not taken (the {str(self.dtype).removeprefix('torch.')} backward overflows: "
                         f"use float32 or bfloat16)")

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer,
             bounds: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """``optimizer.step()`` on the masters, clamp them into ``bounds`` (per parameter (lo, hi), float32),
        then write them into the parameters in their own dtype (never outside the bounds)."""
        optimizer.step()
        if bounds is not None:
            for m, (lo, hi) in zip(self.masters, bounds, strict=True):
                m.copy_(torch.clamp(m, lo, hi))
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            if m is not p:
                p.copy_(round_into(m, p.dtype, *bounds[i]) if bounds is not None else m)
        if self.scaling:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= 2
                self.good_steps = 0

    # -- internals ----------------------------------------------------------------------------------
    def _clear(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = None
            m.grad = None

    @torch.no_grad()
    def _unscale(self) -> bool:
        """Move the gradients to the masters in float32, divided by the scale; True if all are finite."""
        grads = []
        for p, m in zip(self.params, self.masters):
            g = p.grad
            if g is None:
                continue
            if m is not p:
                m.grad, p.grad = g.float(), None
            if self.scaling:
                m.grad.div_(self.scale)   # a power of two: exact
            grads.append(m.grad)
        if not self.scaling or not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
