"""Notebook code that works on the CPU but breaks on a GPU, caught without one.

On a GPU a tensor's ``.numpy()`` raises ("can't convert cuda:0 device type tensor to numpy"), so every
``.numpy()`` in the notebooks and their solutions must come right after ``.cpu()``. CI has no GPU: this
static check is what keeps that class of bug out (``make course-gpu`` runs the rest on a real one).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")) + sorted((REPO / "notebooks" / "solutions").glob("*.py"))
# `.numpy()` whose receiver is not `<...>.cpu()` (a `.detach()` or `.float()` may sit between them)
BARE_NUMPY = re.compile(r"(?<!\.cpu\(\))(?<!\.cpu\(\)\.detach\(\))(?<!\.cpu\(\)\.float\(\))\.numpy\(\)")


def code_lines(path: Path) -> list[tuple[str, str]]:
    """(where, line) for every line of code in a notebook (code cells) or a solutions file."""
    if path.suffix == ".py":
        return [(f"{path.name}:{i}", ln) for i, ln in enumerate(path.read_text().splitlines(), 1)]
    cells = json.loads(path.read_text())["cells"]
    return [(f"{path.name} cell {c}", ln) for c, cell in enumerate(cells) if cell["cell_type"] == "code"
            for ln in "".join(cell["source"]).splitlines()]


def bare_numpy(lines: list[tuple[str, str]]) -> list[str]:
    return [f"{where}: {ln.strip()}" for where, ln in lines if BARE_NUMPY.search(ln.split("#")[0])]


def test_the_rule_catches_and_passes():
    assert bare_numpy([("x", "plt.hist(m.numpy())")])
    assert bare_numpy([("x", "a = t.float().numpy()")])
    assert not bare_numpy([("x", "plt.hist(m.cpu().numpy())"), ("x", "t.detach().cpu().numpy()"),
                           ("x", "t.cpu().float().numpy()"), ("x", "y = 1  # no .numpy() here")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_numpy_only_after_cpu(path):
    found = bare_numpy(code_lines(path))
    assert not found, "`.numpy()` fails on a GPU tensor; call `.cpu()` first:\n" + "\n".join(found)
