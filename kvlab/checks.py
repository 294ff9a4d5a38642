"""Two kinds of checks in the notebooks, kept apart.

**Identities** hold on any model in any dtype (Σ mᵢvᵢ + b equals the FFN output; the fast tracer
equals the slow one). They are asserted everywhere, with a tolerance derived from the dtype::

    tol = checks.tolerance(model, scale=out.abs().max())   # float32 ≈ 1e-5·scale, float16 ≈ 6e-2·scale
    checks.identity("Σ m_i v_i + b = FFN output", err, tol)

**Claims** are the papers' findings. Each is measured and recorded with both numbers, the
criterion stated up front, and a verdict: reproduced, partly reproduced or not reproduced::

    checks.claim("05.ate", "Corrupting the subject removes most of p(answer)", ours=avg.total_effect,
                 expect=(">", 0.1), paper=0.186, source="Meng et al. 2022, Fig. 1e (GPT-2 XL)", model=model)

A claim that is not reproduced fails the run only on the built-in model (whose behaviour the
course documents, so a change there is a regression); on any other model it is reported and the
notebook goes on. Every claim of the process is kept (:func:`recorded`) and, when ``$KVLAB_CLAIMS``
names a file, appended to it as one JSON line (the course runner collects them into ``claims.json``).
"""
from __future__ import annotations

import json
import math
import operator
import os
from dataclasses import asdict, dataclass

import torch

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
VERDICTS = ("reproduced", "partly reproduced", "not reproduced")
_RECORDED: list["Claim"] = []


class IdentityError(AssertionError):
    """An identity that must hold on any model does not: a bug, not a finding."""


class ClaimNotReproduced(AssertionError):
    """A paper's claim that the built-in model used to reproduce no longer does."""


def _dtype(x) -> torch.dtype:
    if isinstance(x, torch.dtype):
        return x
    if torch.is_tensor(x):
        return x.dtype
    if isinstance(x, torch.nn.Module):
        return next(x.parameters()).dtype
    raise TypeError(f"tolerance: need a model, a tensor or a torch.dtype, got {type(x).__name__}")


def tolerance(x, scale: float | torch.Tensor = 1.0, factor: float = 64.0) -> float:
    """Absolute tolerance for an identity computed in the dtype of ``x`` (a model, tensor or dtype)
    on values of size ``scale``: ``factor`` · machine epsilon · max(1, scale).

    float32: 7.6e-6·scale, bfloat16: 0.5·scale, float16: 0.063·scale. Sums of many terms in low
    precision round at every step; 64 ulps of the result's size covers sums of a few thousand terms.
    """
    scale = float(scale.abs().max()) if torch.is_tensor(scale) else abs(float(scale))
    return factor * torch.finfo(_dtype(x)).eps * max(1.0, scale)


def identity(name: str, err: float | torch.Tensor, tol: float) -> float:
    """Assert an identity: ``err`` (a number, or a tensor of errors: its largest magnitude; an empty tensor
    has none, 0) ≤ ``tol``."""
    if torch.is_tensor(err):
        err = float(err.detach().abs().max()) if err.numel() else 0.0
    else:
        err = float(err)
    if not err <= tol:                    # also catches NaN
        raise IdentityError(f"identity {name!r} fails: error {err:.3g} > tolerance {tol:.3g}")
    return err


@dataclass
class Claim:
    """One measured claim of a paper, as the scorecard shows it."""

    key: str                     # "05.ate": notebook and a short name, unique in the course
    text: str                    # the claim, in words
    ours: float                  # what this run measured
    expect: str                  # the criterion for "reproduced", e.g. "> 0.1"
    verdict: str                 # one of VERDICTS
    paper: float | str | None    # the paper's number (or a phrase where it gives none)
    source: str                  # paper, figure / table, model
    model: str                   # the model this run measured
    partly: str | None = None    # the weaker criterion for "partly reproduced", if any


def _criterion(expect) -> tuple[str, float]:
    if not (isinstance(expect, tuple) and len(expect) == 2 and expect[0] in OPS):
        raise ValueError(f"expect must be (op, value) with op in {tuple(OPS)}, got {expect!r}")
    return expect[0], float(expect[1])


def _holds(ours: float, expect) -> bool:
    op, value = _criterion(expect)
    return OPS[op](ours, value)


def claim(key: str, text: str, ours: float, expect: tuple, paper=None, source: str = "", model=None,
          partly: tuple | None = None, strict: bool | None = None, ref: str | None = None) -> Claim:
    """Record a paper's claim as measured by this run; returns the :class:`Claim` (and prints it).

    ``expect``: (op, value), the criterion for "reproduced" (e.g. ``(">", 0.1)``); ``partly``: a
    weaker one for "partly reproduced". ``ref``: a key of :data:`kvlab.reference.PAPER`, which gives
    ``paper`` and ``source``. ``strict`` (default: True on the built-in model): raise
    :class:`ClaimNotReproduced` when the claim is not reproduced.
    """
    from .loading import hub_name, is_builtin

    if ref is not None:
        from .reference import paper as reference
        paper, source = reference(ref)
    ours = float(ours)
    if not math.isfinite(ours):
        raise ValueError(f"claim {key!r}: measured value is {ours}")
    if _holds(ours, expect):
        verdict = VERDICTS[0]
    elif partly is not None and _holds(ours, partly):
        verdict = VERDICTS[1]
    else:
        verdict = VERDICTS[2]
    name = "?" if model is None else ("kvlab/world" if is_builtin(model) else hub_name(model))
    fmt = lambda c: None if c is None else f"{_criterion(c)[0]} {_criterion(c)[1]:g}"  # noqa: E731
    c = Claim(key, text, ours, fmt(expect), verdict, paper, source, name, fmt(partly))
    global _RECORDED
    _RECORDED = [r for r in _RECORDED if r.key != key] + [c]
    path = os.environ.get("KVLAB_CLAIMS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(c)) + "\n")
    paper_txt = "" if paper is None else f"; paper: {paper}"
    print(f"[{verdict}] {key}: {text} — ours {ours:.4g} (criterion {c.expect}{paper_txt})")
    if strict is None:
        strict = model is not None and is_builtin(model)
    if strict and verdict == VERDICTS[2]:
        raise ClaimNotReproduced(f"claim {key!r} is not reproduced on {name}: {text}; measured {ours:.4g}, "
                                 f"criterion {c.expect}")
    return c


def recorded() -> list[Claim]:
    """The claims recorded in this process, in order (a re-recorded key replaces the earlier one)."""
    return list(_RECORDED)
