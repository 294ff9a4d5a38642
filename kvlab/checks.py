"""Two kinds of checks in the notebooks, kept apart.

**Identities** hold on any model in any dtype (Σ mᵢvᵢ + b equals the FFN output; the fast tracer
equals the slow one). They are asserted everywhere, with a tolerance derived from the dtype::

    tol = checks.tolerance(model, scale=out.abs().max())   # float32 ≈ 1e-5·scale, float16 ≈ 6e-2·scale
    checks.identity("Σ m_i v_i + b = FFN output", err, tol)

**Claims** are the papers' findings. Each is measured and recorded with both numbers, the
criterion stated up front, and a verdict: reproduced, partly reproduced or not reproduced::

    checks.claim("05.ate", "Corrupting the subject removes most of p(answer)", ours=avg.total_effect,
                 expect=(">", 0.1), paper=0.186, source="Meng et al. 2022, Fig. 1e (GPT-2 XL)", model=model)

**Intervals** (:func:`wilson` for a share of n items, :func:`mean_ci` for a mean over seeds,
:func:`bootstrap` for any statistic of n items) say how far a measured number may be from the
one a larger sample would give; a claim can carry one (``ci=``), and the scorecard shows it.

**Prose from numbers**: :func:`trend`, :func:`compare` and :func:`summary` write a notebook's
findings as sentences from this run's values and recorded claims, so no summary states a number or
a direction that the run did not measure::

    display(checks.summary("03", [checks.trend("value agreement", agree, layers, where="layer")]))

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
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

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
    ci: list[float] | None = None  # [lo, hi]: a 95% confidence interval of ours, where the notebook gives one
    n: int | None = None         # items (or seeds) behind ours, where the notebook gives them


def _criterion(expect) -> tuple[str, float]:
    if not (isinstance(expect, tuple) and len(expect) == 2 and expect[0] in OPS):
        raise ValueError(f"expect must be (op, value) with op in {tuple(OPS)}, got {expect!r}")
    return expect[0], float(expect[1])


def _holds(ours: float, expect) -> bool:
    op, value = _criterion(expect)
    return OPS[op](ours, value)


def claim(key: str, text: str, ours, expect: tuple, paper=None, source: str = "", model=None,
          partly: tuple | None = None, strict: bool | None = None, ref: str | None = None,
          ci=None, n: int | None = None) -> Claim:
    """Record a paper's claim as measured by this run; returns the :class:`Claim` (and prints it).

    ``expect``: (op, value), the criterion for "reproduced" (e.g. ``(">", 0.1)``); ``partly``: a
    weaker one for "partly reproduced". ``ref``: a key of :data:`kvlab.reference.PAPER`, which gives
    ``paper`` and ``source``. ``strict``: raise :class:`ClaimNotReproduced` when the claim is not
    reproduced. Default: True on the built-in model in float32 (the configuration the claims' criteria were
    set on), unless ``$KVLAB_CLAIMS_STRICT`` is ``0``, as the course runner sets it for ``--quick`` runs and
    other dtypes; elsewhere the claim is recorded with its verdict and the run goes on.
    """
    from .loading import hub_name, is_builtin

    if ref is not None:
        from .reference import paper as reference
        paper, source = reference(ref)
    if isinstance(ours, Interval):
        ci, n, ours = (ours.lo, ours.hi) if ci is None else ci, ours.n if n is None else n, ours.value
    if ci is not None:
        ci = [float(ci[0]), float(ci[1])]
        if not ci[0] <= ci[1]:
            raise ValueError(f"claim {key!r}: ci must be (lo, hi) with lo <= hi, got {ci}")
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
    c = Claim(key, text, ours, fmt(expect), verdict, paper, source, name, fmt(partly), ci, n)
    global _RECORDED
    _RECORDED = [r for r in _RECORDED if r.key != key] + [c]
    path = os.environ.get("KVLAB_CLAIMS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(c)) + "\n")
    paper_txt = "" if paper is None else f"; paper: {paper}"
    ci_txt = "" if ci is None else f" [95% CI {ci[0]:.4g}, {ci[1]:.4g}" + ("" if n is None else f"; n={n}") + "]"
    print(f"[{verdict}] {key}: {text} — ours {ours:.4g}{ci_txt} (criterion {c.expect}{paper_txt})")
    if strict is None:
        strict = (model is not None and is_builtin(model) and _dtype(model) == torch.float32
                  and os.environ.get("KVLAB_CLAIMS_STRICT", "1") != "0")
    if strict and verdict == VERDICTS[2]:
        raise ClaimNotReproduced(f"claim {key!r} is not reproduced on {name}: {text}; measured {ours:.4g}, "
                                 f"criterion {c.expect}")
    return c


def recorded() -> list[Claim]:
    """The claims recorded in this process, in order (a re-recorded key replaces the earlier one)."""
    return list(_RECORDED)


def get(key: str) -> Claim:
    """The claim recorded under ``key`` in this process; a clear error if there is none."""
    for c in _RECORDED:
        if c.key == key:
            return c
    raise KeyError(f"no claim {key!r} recorded in this run; recorded: {', '.join(c.key for c in _RECORDED) or 'none'}")


# --- intervals --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A measured value with a confidence interval: ``value`` in [``lo``, ``hi``] at ``level``, from ``n`` items."""

    value: float
    lo: float
    hi: float
    n: int
    level: float = 0.95
    method: str = ""

    def __float__(self) -> float:
        return float(self.value)

    def fmt(self, scale: float = 1.0, unit: str = "", digits: int = 1) -> str:
        """``'41.2% (95% CI 30.1–52.8%, n=40)'`` with ``scale=100, unit='%'``."""
        f = lambda x: f"{scale * x:.{digits}f}"  # noqa: E731
        sep = " to " if min(self.lo, self.hi) * scale < 0 else "–"      # "-39.0 to -27.8", not "-39.0–-27.8"
        return f"{f(self.value)}{unit} ({100 * self.level:.0f}% CI {f(self.lo)}{sep}{f(self.hi)}{unit}, n={self.n})"

    def __str__(self) -> str:
        return self.fmt(digits=3)

    def overlaps(self, other: "Interval") -> bool:
        return self.lo <= other.hi and other.lo <= self.hi


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return statistics.NormalDist().inv_cdf(0.5 + level / 2)


def wilson(k: int | float, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval of a proportion: ``k`` successes of ``n`` items (well behaved at 0 and 1 and for
    small n, unlike the normal approximation)."""
    if n <= 0:
        raise ValueError(f"wilson: need n > 0 items, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson: successes k={k} must lie in [0, n={n}]")
    z = _z(level)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n, level, "Wilson")


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci(values: Sequence[float]) -> Interval:
    """95% t interval of the mean of a few independent runs (e.g. seeds): mean ± t·sd/√n."""
    xs = [float(v) for v in values]
    if len(xs) < 2:
        raise ValueError(f"mean_ci: need at least 2 values (e.g. seeds), got {len(xs)}")
    m, sd = statistics.fmean(xs), statistics.stdev(xs)
    t = _T95[len(xs) - 2] if len(xs) - 1 <= len(_T95) else 1.96
    half = t * sd / math.sqrt(len(xs))
    return Interval(m, m - half, m + half, len(xs), 0.95, "t")


def bootstrap(values: Sequence[float], stat: Callable[[list[float]], float] = statistics.fmean,
              n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``stat`` over ``values`` (n items resampled with replacement).

    ``values`` may be any items when ``stat`` takes a list of them, e.g. per-record metric rows with
    ``stat=lambda rows: summarize(rows)["S"]``, or record indices for a paired difference of two methods.
    """
    xs = [float(v) for v in values] if stat is statistics.fmean else list(values)
    if not xs:
        raise ValueError("bootstrap: no values")
    rng = random.Random(seed)
    boots = sorted(stat(rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    a = (1 - level) / 2
    lo, hi = boots[int(a * (n_boot - 1))], boots[int(round((1 - a) * (n_boot - 1)))]
    return Interval(float(stat(xs)), float(lo), float(hi), len(xs), level, "bootstrap")


def ratio_ci(num, den, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Bootstrap interval of a ratio of sums Σ num / Σ den over n items (resampled together; vectorised)."""
    num, den = torch.as_tensor(num, dtype=torch.float64).flatten(), torch.as_tensor(den, dtype=torch.float64).flatten()
    if num.numel() == 0 or num.shape != den.shape:
        raise ValueError(f"ratio_ci: need two equally long non-empty samples, got {num.numel()} and {den.numel()}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(num.numel(), (n_boot, num.numel()), generator=g)             # (n_boot, n)
    boots = (num[idx].sum(1) / den[idx].sum(1)).sort().values                        # (n_boot,)
    q = (1 - level) / 2
    return Interval(float(num.sum() / den.sum()), float(boots[int(q * (n_boot - 1))]),
                    float(boots[int(round((1 - q) * (n_boot - 1)))]), num.numel(), level, "bootstrap")


def diff_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95,
            seed: int = 0) -> Interval:
    """Bootstrap interval of mean(a) − mean(b) for two independent samples (items or seeds)."""
    xa, xb = [float(v) for v in a], [float(v) for v in b]
    if not xa or not xb:
        raise ValueError("diff_ci: both samples need values")
    rng = random.Random(seed)
    boots = sorted(statistics.fmean(rng.choices(xa, k=len(xa))) - statistics.fmean(rng.choices(xb, k=len(xb)))
                   for _ in range(n_boot))
    q = (1 - level) / 2
    return Interval(statistics.fmean(xa) - statistics.fmean(xb), boots[int(q * (n_boot - 1))],
                    boots[int(round((1 - q) * (n_boot - 1)))], min(len(xa), len(xb)), level, "bootstrap")


# --- findings in words, from this run's numbers ----------------------------------------------------------

def _num(v, scale: float, unit: str, digits: int) -> str:
    if isinstance(v, Interval):
        return v.fmt(scale, unit, digits)
    return f"{scale * float(v):.{digits}f}{unit}"


def _value(v) -> float:
    return float(v.value) if isinstance(v, Interval) else float(v)


def trend(what: str, values: Sequence, at: Sequence | None = None, where: str = "layer", scale: float = 100.0,
          unit: str = "%", digits: int = 1, flat: float | None = None) -> str:
    """One sentence on how ``values`` (numbers or :class:`Interval`) change from the first point to the last:
    "value agreement falls from 12.6% at layer 2 to 4.1% at layer 5 (peak 13.0% at layer 3)".

    The direction is the sign of last − first; with intervals, "changes … within the confidence intervals"
    when the end points' intervals overlap; ``flat`` (in the values' own units) calls a smaller change
    "stays at about".
    """
    vals = list(values)
    if len(vals) < 2:
        raise ValueError(f"trend of {what!r}: need at least 2 values, got {len(vals)}")
    at = list(range(len(vals))) if at is None else list(at)
    if len(at) != len(vals):
        raise ValueError(f"trend of {what!r}: {len(vals)} values but {len(at)} positions")
    first, last = vals[0], vals[-1]
    d = _value(last) - _value(first)
    ends = f"from {_num(first, scale, unit, digits)} at {where} {at[0]} to {_num(last, scale, unit, digits)} " \
           f"at {where} {at[-1]}"
    if flat is not None and abs(d) <= flat:
        s = f"{what} stays at about the same level, {ends}"
    elif isinstance(first, Interval) and isinstance(last, Interval) and first.overlaps(last):
        s = f"{what} changes {ends}, within the confidence intervals (no clear trend)"
    else:
        s = f"{what} {'rises' if d > 0 else 'falls' if d < 0 else 'stays'} {ends}"
    k = max(range(len(vals)), key=lambda i: _value(vals[i]))
    if 0 < k < len(vals) - 1:
        s += f" (peak {scale * _value(vals[k]):.{digits}f}{unit} at {where} {at[k]})"
    return s[:1].upper() + s[1:]


def compare(what: str, a_name: str, a, b_name: str, b, scale: float = 100.0, unit: str = "%",
            digits: int = 1, higher: str = "higher") -> str:
    """One sentence comparing two measured values (numbers or :class:`Interval`): which is ``higher``, and
    whether their confidence intervals overlap (then the difference is not clear)."""
    va, vb = _value(a), _value(b)
    what = what[:1].upper() + what[1:]
    nums = f"{a_name} {_num(a, scale, unit, digits)}, {b_name} {_num(b, scale, unit, digits)}"
    if va == vb:
        return f"{what}: {nums} — equal"
    top = a_name if va > vb else b_name
    if isinstance(a, Interval) and isinstance(b, Interval) and a.overlaps(b):
        return f"{what}: {nums} — {top} {higher}, but the intervals overlap: not a clear difference"
    return f"{what}: {nums} — {top} {higher}"


def sentence(key: str) -> str:
    """A recorded claim as one line: verdict, claim, our number (and interval), the paper's number."""
    c = get(key)
    ours = f"{c.ours:.3g}" + ("" if c.ci is None else f" (95% CI {c.ci[0]:.3g}–{c.ci[1]:.3g}"
                                                       + ("" if c.n is None else f", n={c.n}") + ")")
    paper = "" if c.paper is None else f"; paper: {c.paper} ({c.source})"
    return f"**{c.verdict}** — {c.text}: ours {ours}, criterion {c.expect}{paper}"


def summary(prefix: str, findings: Sequence[str] = ()):
    """A notebook's findings from this run: the generated sentences ``findings`` (from :func:`trend`,
    :func:`compare`, f-strings of measured values), then every claim recorded under ``prefix`` ("05")
    with its verdict. Returns an ``IPython.display.Markdown`` (a plain string without IPython)."""
    lines = ["**What this run found**", ""] + [f"- {f}" for f in findings]
    mine = [c for c in _RECORDED if c.key.split(".")[0] == prefix.rstrip(".")]
    if mine:
        lines += ["", f"**Claims** ({sum(c.verdict == VERDICTS[0] for c in mine)} of {len(mine)} reproduced)", ""]
        lines += [f"- `{c.key}` {sentence(c.key)}" for c in mine]
    text = "\n".join(lines)
    try:
        from IPython.display import Markdown
    except ImportError:  # pragma: no cover - IPython ships with the notebook dependencies
        return text
    return Markdown(text)


# --- argument and output validators (the error contract, CONTRIBUTING.md) ---------------------------------

def number(where: str, name: str, value, low: float | None = None, strict: bool = False,
           high: float | None = None, high_strict: bool = False, accepted: str = "") -> float:
    """``value`` as a float if it is a finite real number within the bounds, else ValueError naming ``name``,
    the value and what is accepted.

    Numbers in any form are accepted: int, float, numpy scalars, one-element tensors and arrays; bools and
    strings are not. ``low``/``high``: bounds (excluded when ``strict``/``high_strict``). ``accepted``: words
    added to the message (what the argument means, what else it may be, e.g. "None = 3σ").
    """
    x = None
    if not isinstance(value, (bool, str, bytes)) and value is not None \
            and not (torch.is_tensor(value) and value.dtype == torch.bool):
        try:
            x = float(value)
        except (TypeError, ValueError, RuntimeError):
            x = None
    ok = x is not None and math.isfinite(x)
    if ok and low is not None:
        ok = x > low if strict else x >= low
    if ok and high is not None:
        ok = x < high if high_strict else x <= high
    if not ok:
        need = "a finite number"
        if low is not None:
            need += f" {'>' if strict else '≥'} {low:g}"
        if high is not None:
            need += f"{' and' if low is not None else ''} {'<' if high_strict else '≤'} {high:g}"
        shown = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) and value.numel() != 1 else \
            repr(value)
        raise ValueError(f"{where}: {name} must be {need}{f' ({accepted})' if accepted else ''}, got {shown}")
    return x


def integer(where: str, name: str, value, low: int = 1) -> int:
    """``value`` as an int if it is an integer (numpy/torch integer scalars too, not bool) ≥ ``low``, else
    ValueError naming ``name`` and the value."""
    import operator as _op
    try:
        i = None if isinstance(value, bool) else _op.index(value)
    except TypeError:
        i = None
    if i is None or i < low:
        raise ValueError(f"{where}: {name} must be an integer ≥ {low}, got {value!r}")
    return i


def nonfinite_weights(model) -> list[tuple[str, int, tuple[int, ...]]]:
    """The model's parameters (or, when none is, its floating-point buffers) holding NaN/inf entries:
    (name, number of such entries, index of the first one). Reads every weight: call it on a failure path."""
    def scan(named):
        out = []
        for name, p in named:
            if not (p.is_floating_point() or p.is_complex()):
                continue
            bad = ~torch.isfinite(p.detach())
            if bool(bad.any()):
                first = tuple(int(i) for i in bad.nonzero()[0].tolist())
                out.append((name, int(bad.sum()), first))
        return out
    return scan(model.named_parameters()) or scan(model.named_buffers())


def finite_output(model, x: torch.Tensor, where: str, what: str = "the model's output") -> torch.Tensor:
    """``x`` (a tensor the model computed) if every entry is finite, else ValueError naming the cause: the
    non-finite weight(s) of ``model`` (found only now, on the failure path), or, when every weight is finite,
    the dtype whose range the activations leave. Never a silent NaN result."""
    if bool(torch.isfinite(x.detach()).all()):
        return x
    n = int((~torch.isfinite(x.detach())).sum())
    said = f"{what} is {float(x.detach().reshape(-1)[0])}" if x.numel() == 1 else \
        f"{n} of the {x.numel()} entries of {what} are NaN/inf"
    bad = nonfinite_weights(model)
    if bad:
        named = "; ".join(f"{name!r} has {k} NaN/inf entr{'y' if k == 1 else 'ies'} (first at index "
                          f"{list(i)})" for name, k, i in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{where}: {said} because the model's weights are not all finite: {named}{more}; "
                         f"restore them (undo the edit that wrote them, or reload the model)")
    dtype = str(_dtype(model)).removeprefix("torch.")
    raise ValueError(f"{where}: {said} although every weight is finite: the activations "
                     f"leave the range of {dtype} (use float32 or bfloat16) or an input is not finite")
