"""Matplotlib helpers shared by the notebooks: one consistent look, no state.

Each function draws on a given ``ax`` (or a new figure) and returns the ``Axes``.
Modules add their own plot helpers at the end of this file.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def new_ax(ax=None, figsize=(6, 3.5)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def heatmap(values, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
            ax=None, title: str = "", xlabel: str = "", ylabel: str = "", cmap: str = "Purples",
            colorbar: str = "", vmin=None, vmax=None, figsize=(6, 3.5)):
    """A labelled heatmap (rows × columns), e.g. causal-tracing scores[token, layer]."""
    v = _np(values)
    ax = new_ax(ax, figsize)
    im = ax.imshow(v, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    if col_labels is not None:
        step = max(1, len(col_labels) // 16)
        ax.set_xticks(range(0, len(col_labels), step), labels=list(col_labels)[::step])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    cb = ax.figure.colorbar(im, ax=ax)
    cb.set_label(colorbar)
    return ax


def lines(series: dict[str, Sequence[float]], x: Sequence | None = None, ax=None, title: str = "",
          xlabel: str = "", ylabel: str = "", reference: dict[str, float] | None = None, figsize=(6, 3.5),
          marker: str = "o"):
    """Several named curves on one axes; ``reference`` draws dashed horizontal lines (e.g. paper values)."""
    ax = new_ax(ax, figsize)
    for name, ys in series.items():
        ys = _np(ys)
        ax.plot(range(len(ys)) if x is None else list(x), ys, marker=marker, label=name)
    for name, y in (reference or {}).items():
        ax.axhline(y, ls="--", lw=1, color="gray")
        ax.annotate(name, (0, y), textcoords="offset points", xytext=(2, 2), fontsize=8, color="gray")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return ax


def bars(values: dict[str, float] | Sequence[float], labels: Sequence[str] | None = None, ax=None,
         title: str = "", ylabel: str = "", errors: Sequence[float] | None = None, figsize=(6, 3.5),
         color=None, horizontal: bool = False):
    """A bar chart from a dict (label -> value) or values + labels."""
    if isinstance(values, dict):
        labels, values = list(values.keys()), list(values.values())
    v = _np(values)
    labels = list(labels) if labels is not None else [str(i) for i in range(len(v))]
    ax = new_ax(ax, figsize)
    if horizontal:
        ax.barh(labels, v, xerr=errors, color=color)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
    else:
        ax.bar(labels, v, yerr=errors, color=color)
        ax.set_ylabel(ylabel)
        if max(len(s) for s in labels) > 6:
            ax.tick_params(axis="x", labelrotation=45)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x" if horizontal else "y")
    return ax


def grouped_bars(groups: dict[str, dict[str, float]], ax=None, title: str = "", ylabel: str = "",
                 figsize=(7, 3.5)):
    """Bars grouped by outer key, one colour per inner key: {"layer 0": {"shallow": .6, "semantic": .2}}."""
    ax = new_ax(ax, figsize)
    outer = list(groups)
    inner = list(dict.fromkeys(k for g in groups.values() for k in g))
    w = 0.8 / max(1, len(inner))
    for j, name in enumerate(inner):
        ax.bar(np.arange(len(outer)) + j * w - 0.4 + w / 2, [groups[o].get(name, 0) for o in outer], w, label=name)
    ax.set_xticks(range(len(outer)), labels=outer)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
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
        ax.bar(range(len(outer)), v, bottom=bottom, label=name)
        bottom += v
    ax.set_xticks(range(len(outer)), labels=outer)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return ax


# --- causal tracing (kvlab.tracing) ------------------------------------------------------
TRACE_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TRACE_NAMES = {"hidden": "single restored layer (hidden state)", "mlp": "restored MLP", "attn": "restored attention"}


def causal_trace(result, ax=None, title: str | None = None, figsize=(5, 3.2)):
    """ROME-style heatmap of a ``TraceResult``: rows = tokens (subject marked *), columns = layers.

    Colours are p(answer) with one state restored, from the corrupted score (white) upwards.
    """
    n_layers = result.scores.shape[1]
    if title is None:
        window = f", window {result.window}" if result.kind != "hidden" else ""
        title = (f"{TRACE_NAMES[result.kind]}{window}\nclean p={result.high_score:.3f}, "
                 f"corrupted p={result.low_score:.3f}")
    return heatmap(result.scores, row_labels=result.labels(), col_labels=list(range(n_layers)), ax=ax,
                   title=title, xlabel="layer (restored at)", cmap=TRACE_CMAPS[result.kind],
                   colorbar=f"p({result.answer.strip()})", vmin=result.low_score, figsize=figsize)


def average_trace(avg, kind: str, ax=None, title: str | None = None, figsize=(5, 2.8)):
    """Average indirect effect of an ``AverageTrace`` for one kind: rows = token groups, columns = layers."""
    e = avg.effects[kind]
    if title is None:
        title = f"AIE, {TRACE_NAMES[kind]} ({avg.n_facts} facts)"
    return heatmap(e, row_labels=list(avg.rows), col_labels=list(range(e.shape[1])), ax=ax, title=title,
                   xlabel="layer", cmap=TRACE_CMAPS[kind], colorbar="AIE", vmin=0, figsize=figsize)


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
