"""Matplotlib helpers shared by the notebooks: one consistent look, no state.

Each function draws on a given ``ax`` (or a new figure) and returns the ``Axes``.
Modules add their own plot helpers at the end of this file.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


# One colour per method (and per role, token, curve kind) across the whole course: a method drawn in two plots,
# or in two notebooks, keeps its colour. Names are matched exactly, then by their first word ("ROME (sequential)"
# -> ROME, "keys (r=8)" -> keys); other names take matplotlib's cycle.
PALETTE = {
    "unedited": "#7f7f7f", "untuned": "#7f7f7f", "random baseline": "#7f7f7f", "chance": "#7f7f7f",
    "ROME": "#1f77b4", "MEMIT": "#d62728", "FT-keys": "#2ca02c", "FT-values": "#ff7f0e", "KN": "#9467bd",
    "keys": "#2ca02c", "values": "#ff7f0e", "attention": "#17becf",
    "last": "#d62728", "first": "#1f77b4", "random": "#7f7f7f",
    "hidden": "#6a51a3", "mlp": "#238b45", "attn": "#cb181d",
    "ES": "#1f77b4", "PS": "#2ca02c", "NS": "#ff7f0e", "S": "#000000", "recall": "#8c564b",
    "paper": "#000000",
}
PAPER_STYLE = dict(color="black", marker="*", markersize=11, ls=":", lw=1.2, zorder=5)


def method_color(name: str):
    """The course colour of a method, role or curve (:data:`PALETTE`); None (matplotlib's cycle) if it has none."""
    if name in PALETTE:
        return PALETTE[name]
    head = str(name).replace("(", " ").split()[0] if str(name).strip() else ""
    return PALETTE.get(head)


def legend_outside(ax, **kw):
    """The legend to the right of the axes, off the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)
    return ax


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def new_ax(ax=None, figsize=(6, 3.5)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def heatmap(values, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
            ax=None, title: str = "", xlabel: str = "", ylabel: str = "", cmap: str = "Purples",
            colorbar: str = "", vmin=None, vmax=None, figsize=(6, 3.5)):
    """A labelled heatmap (rows × columns), e.g. causal-tracing scores[token, layer].

    NaN cells (nothing measured, e.g. a token group a prompt does not have) are drawn hatched grey, not as the
    colour of zero, and an all-NaN row's label says "(none)". Pass the same ``vmin``/``vmax`` to panels that are
    compared.
    """
    v = _np(values).astype(float)
    ax = new_ax(ax, figsize)
    cm = plt.get_cmap(cmap).with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(v), aspect="auto", cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
    missing = np.isnan(v)
    if missing.any():
        ys, xs = np.nonzero(missing)
        ax.scatter(xs, ys, marker="x", s=12, color="#969696", linewidths=0.8)
    if row_labels is not None:
        row_labels = [f"{r} (none)" if v.ndim == 2 and missing[i].all() else r for i, r in enumerate(row_labels)]
        ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    if col_labels is not None:
        step = max(1, len(col_labels) // 16)
        ax.set_xticks(range(0, len(col_labels), step), labels=list(col_labels)[::step])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    finite = v[~missing]
    over = vmax is not None and finite.size and finite.max() > vmax
    cb = ax.figure.colorbar(im, ax=ax, extend="max" if over else "neither")
    cb.set_label(colorbar)
    return ax


def lines(series: dict[str, Sequence[float]], x: Sequence | None = None, ax=None, title: str = "",
          xlabel: str = "", ylabel: str = "", reference: dict[str, float] | None = None, figsize=(6, 3.5),
          marker: str = "o", bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
          paper: dict[str, Sequence[tuple[float, float]]] | None = None, ylim0: bool = False):
    """Several named curves on one axes, in the course colours (:func:`method_color`).

    A series may be numbers or :class:`kvlab.checks.Interval` values (their 95% intervals are drawn as a band);
    ``bands`` gives (lo, hi) bands for named series explicitly. ``reference`` draws dashed horizontal lines for
    baselines that hold at every x (chance, an untuned model); ``paper`` draws a paper's measured points,
    ``{label: [(x, y), ...]}`` at the x where the paper measured them (e.g. its layers mapped onto ours), as
    black stars. NaN values are gaps, not zeros. ``ylim0`` starts the y axis at 0. The legend sits outside.
    """
    ax = new_ax(ax, figsize)
    bands = dict(bands or {})
    for name, ys in series.items():
        ys = list(ys) if not isinstance(ys, (np.ndarray, torch.Tensor)) else ys
        if len(ys) and hasattr(ys[0], "lo"):            # Intervals
            bands.setdefault(name, ([v.lo for v in ys], [v.hi for v in ys]))
            ys = [v.value for v in ys]
        ys = _np(ys).astype(float)
        xs = list(range(len(ys))) if x is None else list(x)
        ax.plot(xs, ys, marker=marker, label=name, color=method_color(name))
        if name in bands:
            lo, hi = (_np(b).astype(float) for b in bands[name])
            ax.fill_between(xs, lo, hi, alpha=0.2, color=ax.lines[-1].get_color(), lw=0, label="_band")
    for name, y in (reference or {}).items():
        ax.axhline(y, ls="--", lw=1, color=method_color(name) or "gray", label=name)
    for name, pts in (paper or {}).items():
        px, py = zip(*pts)
        ax.plot(px, py, label=name, **PAPER_STYLE)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ylim0:
        ax.set_ylim(bottom=0)
    legend_outside(ax)
    return ax


def bars(values: dict[str, float] | Sequence[float], labels: Sequence[str] | None = None, ax=None,
         title: str = "", ylabel: str = "", errors: Sequence[float] | None = None, figsize=(6, 3.5),
         color=None, horizontal: bool = False, xlabel: str = "", chance: float | None = None):
    """A bar chart from a dict (label -> value) or values + labels; ``xlabel`` names what the bars are (e.g.
    "neuron i"); bars whose label has a course colour (:func:`method_color`) get it. ``errors``: symmetric error bars,
    or a (2, n) array of lower/upper lengths (e.g. from 95% intervals); ``chance`` draws a dashed chance line."""
    if isinstance(values, dict):
        labels, values = list(values.keys()), list(values.values())
    v = _np(values)
    labels = list(labels) if labels is not None else [str(i) for i in range(len(v))]
    if color is None and any(method_color(lb) for lb in labels):
        color = [method_color(lb) or "#4c72b0" for lb in labels]
    ax = new_ax(ax, figsize)
    if horizontal:
        ax.barh(labels, v, xerr=errors, color=color)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
        ax.set_ylabel(xlabel)
    else:
        ax.bar(labels, v, yerr=errors, color=color, capsize=3 if errors is not None else 0)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
    if chance is not None:
        (ax.axvline if horizontal else ax.axhline)(chance, ls="--", lw=1, color="gray", label="chance")
        legend_outside(ax)
        if max(len(s) for s in labels) > 6:
            ax.tick_params(axis="x", labelrotation=45)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x" if horizontal else "y")
    return ax


def grouped_bars(groups: dict[str, dict[str, float]], ax=None, title: str = "", ylabel: str = "",
                 figsize=(7, 3.5), errors: dict[str, dict[str, tuple[float, float]]] | None = None, xlabel: str = ""):
    """Bars grouped by outer key, one colour per inner key: {"layer 0": {"shallow": .6, "semantic": .2}}.

    ``errors[outer][inner] = (lo, hi)`` draws an interval on a bar; a missing (NaN) value is marked "n/a", not
    drawn as 0.
    """
    ax = new_ax(ax, figsize)
    outer = list(groups)
    inner = list(dict.fromkeys(k for g in groups.values() for k in g))
    w = 0.8 / max(1, len(inner))
    for j, name in enumerate(inner):
        xs = np.arange(len(outer)) + j * w - 0.4 + w / 2
        ys = np.array([float(groups[o].get(name, np.nan)) for o in outer])
        ax.bar(xs, np.nan_to_num(ys), w, label=name, color=method_color(name))
        for xi, yi in zip(xs, ys):
            if np.isnan(yi):
                ax.annotate("n/a", (xi, 0), ha="center", va="bottom", fontsize=7, color="gray")
        if errors:
            lo = np.array([errors.get(o, {}).get(name, (np.nan, np.nan))[0] for o in outer], dtype=float)
            hi = np.array([errors.get(o, {}).get(name, (np.nan, np.nan))[1] for o in outer], dtype=float)
            ok = ~np.isnan(lo)
            ax.errorbar(xs[ok], ys[ok], yerr=[ys[ok] - lo[ok], hi[ok] - ys[ok]], fmt="none", ecolor="black",
                        capsize=2, lw=0.8)
    ax.set_xticks(range(len(outer)), labels=outer)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    legend_outside(ax)
    ax.grid(alpha=0.3, axis="y")
    return ax


def table(rows: list[dict], columns: Sequence[str] | None = None, floatfmt: str = "{:.1f}") -> str:
    """Format a list of dicts as a Markdown table (display with IPython.display.Markdown)."""
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: floatfmt.format(v) if isinstance(v, float) else str(v)  # noqa: E731
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


# --- trigger examples and vocabulary projection (kvlab.triggers, kvlab.vocab, kvlab.lens) ---------

def trigger_bars(index, layer: int, key: int, n: int = 10, ax=None, title: str = "", figsize=(7, 3.5)):
    """Horizontal bars of a key's top-``n`` trigger prefixes (kvlab.triggers.TriggerIndex) and coefficients."""
    trig = index.triggers(layer, key, n)
    labels = [("…" + p[-45:]) if len(p) > 45 else p for p, _ in trig]
    return bars([c for _, c in trig], labels, ax=ax, horizontal=True, ylabel="coefficient m_i",
                title=title or f"layer {layer}, key {key}: top trigger prefixes", figsize=figsize)


def stacked_bars(groups: dict[str, dict[str, float]], ax=None, title: str = "", ylabel: str = "",
                 figsize=(7, 3.5)):
    """Stacked bars, one per outer key: {"layer 0": {"keep": .5, "override": .1, "compose": .4}}."""
    ax = new_ax(ax, figsize)
    outer = list(groups)
    inner = list(dict.fromkeys(k for g in groups.values() for k in g))
    bottom = np.zeros(len(outer))
    for name in inner:
        v = np.array([float(groups[o].get(name, 0)) for o in outer])
        ax.bar(range(len(outer)), v, bottom=bottom, label=name, color=method_color(name))
        bottom += v
    ax.set_xticks(range(len(outer)), labels=outer)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    legend_outside(ax)
    ax.grid(alpha=0.3, axis="y")
    return ax


# --- causal tracing (kvlab.tracing) ------------------------------------------------------

def shared_vmax(grids, skip_last_row: bool = True) -> float:
    """One colour-scale maximum for heatmap panels that are compared: the largest finite value over all
    ``grids`` (tensors or arrays, rows × columns), leaving out their last row when ``skip_last_row`` (causal
    tracing: the last token's top layers carry the whole effect by construction and would wash out every other
    cell; they saturate instead, and the colour bar says so)."""
    vals = []
    for g in grids:
        a = _np(g).astype(float)
        a = a[:-1] if skip_last_row and a.shape[0] > 1 else a
        a = a[np.isfinite(a)]
        if a.size:
            vals.append(a.max())
    return max(max(vals, default=0.0), 1e-9)

TRACE_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TRACE_NAMES = {"hidden": "single restored layer (hidden state)", "mlp": "restored MLP", "attn": "restored attention"}


def causal_trace(result, ax=None, title: str | None = None, figsize=(5, 3.2), vmax: float | None = None):
    """ROME-style heatmap of a ``TraceResult``: rows = tokens (subject marked *), columns = layers.

    Colours are p(answer) with one state restored, from the corrupted score (white) to the clean score (``vmax``
    default): one scale for the three kinds of one prompt, so their panels compare.
    """
    n_layers = result.scores.shape[1]
    if title is None:
        window = f", window {result.window}" if result.kind != "hidden" else ""
        title = (f"{TRACE_NAMES[result.kind]}{window}\nclean p={result.high_score:.3f}, "
                 f"corrupted p={result.low_score:.3f}")
    return heatmap(result.scores, row_labels=result.labels(), col_labels=list(range(n_layers)), ax=ax,
                   title=title, xlabel="layer (restored at)", cmap=TRACE_CMAPS[result.kind],
                   colorbar=f"p({result.answer.strip()})", vmin=result.low_score,
                   vmax=result.high_score if vmax is None else vmax, figsize=figsize)


def average_trace(avg, kind: str, ax=None, title: str | None = None, figsize=(5, 2.8), vmax: float | None = None):
    """Average indirect effect of an ``AverageTrace`` for one kind: rows = token groups, columns = layers.

    One scale for every kind, 0 to the average total effect (``vmax`` default), so hidden, MLP and attention panels
    compare; groups no prompt has (NaN) are hatched grey and labelled "(none)".
    """
    e = avg.effects[kind]
    if title is None:
        title = f"AIE, {TRACE_NAMES[kind]} ({avg.n_facts} facts)"
    return heatmap(e, row_labels=list(avg.rows), col_labels=list(range(e.shape[1])), ax=ax, title=title,
                   xlabel="layer", cmap=TRACE_CMAPS[kind], colorbar="AIE", vmin=0,
                   vmax=max(float(avg.total_effect), 1e-9) if vmax is None else vmax, figsize=figsize)


# --- knowledge neurons (kvlab.neurons) ---------------------------------------------------

def neuron_heatmap(scores, neurons=(), ax=None, title: str = "", max_cols: int = 512, figsize=(9, 3.2),
                   colorbar: str = "IG attribution"):
    """Layer × neuron heatmap of attributions (n_layers, d_ff); ``neurons`` [(layer, i)] are circled.

    Wide layers are max-pooled to at most ``max_cols`` columns (by absolute value, sign kept) so
    single strong neurons stay visible; the x axis keeps the neuron index.
    """
    s = scores.detach().float().cpu() if isinstance(scores, torch.Tensor) else torch.as_tensor(scores).float()
    n_layers, d_ff = s.shape
    width = max(1, -(-d_ff // max_cols))                       # neurons per column
    pad = torch.zeros(n_layers, width * -(-d_ff // width) - d_ff)
    blocks = torch.cat([s, pad], 1).view(n_layers, -1, width)  # (n_layers, cols, width)
    pooled = blocks.gather(2, blocks.abs().argmax(2, keepdim=True))[..., 0]
    lim = float(pooled.abs().max()) or 1.0
    own = ax is None
    ax = new_ax(ax, figsize)
    im = ax.imshow(_np(pooled), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest",
                   extent=(-0.5 * width, pooled.shape[1] * width - 0.5 * width, n_layers - 0.5, -0.5))
    for l, i in neurons:
        ax.scatter([i], [l], s=90, facecolors="none", edgecolors="black", linewidths=1.5)
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("neuron i" + (f" (max-pooled over {width})" if width > 1 else ""))
    ax.set_ylabel("layer")
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax).set_label(colorbar)
    if own:
        ax.figure.tight_layout()
    return ax
