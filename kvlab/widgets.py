"""ipywidgets explorers for the notebooks.

Every explorer is a function ``explore_x(model, tok, ...) -> ipywidgets.Widget`` that the
notebook displays as its last expression. They compute with kvlab's functions and draw
with :mod:`kvlab.plots`; under papermill they render once with their default values.
Modules add their explorers at the end of this file.
"""
from __future__ import annotations

import ipywidgets as W


def interactive_output(fn, **controls) -> W.Widget:
    """Controls in a row above the output of ``fn(**values)``; re-run on every change."""
    out = W.interactive_output(fn, controls)
    return W.VBox([W.HBox(list(controls.values())), out])
