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
