"""Run the course: execute every notebook with papermill and write an HTML index.

    python -m kvlab.course run                      # all notebooks, built-in model
    python -m kvlab.course run --only 05 07         # a subset, by number
    python -m kvlab.course run --model gpt2-xl --device cuda -p N_FACTS 1000
    python -m kvlab.course run --quick -p DTYPE float16 --keep-going   # smaller sizes, every failing cell
    python -m kvlab.course list | check | clear | sync

Executed notebooks, their HTML renderings, ``index.html`` and ``times.json`` go to
``build/course/``. A failing notebook is reported with the failing cell's number (its index in
``notebooks/NN_*.ipynb``, and ``In [k]`` of the executed copy), the exception and the first lines of the
cell's source; the exit code is 1.

Every argument is checked before anything is written or deleted: ``--only`` items must name notebooks (a full
number such as ``05``, or a name; ``0`` names none), ``-p`` values must be JSON values (int, float, str, bool, None,
lists and dicts of them: papermill would pass a tuple, set, bytes or complex as a string), and ``--out`` must be a
folder that is not the notebooks folder (the executed copies would overwrite the course).

Options of ``run`` besides ``--only``, ``--model``, ``--device``, ``--out``, ``-p``:

``--keep-going`` (alias ``--all-errors``)
    execute every cell of a notebook even after a cell failed (nbclient's ``allow_errors``) and report every
    failing cell, not only the first; the exit code is still 1 when any cell failed. Without it a notebook
    stops at its first failing cell, as before (the later cells are not executed).
``--cell-timeout SECONDS`` (default 1800; 0: none)
    the longest one cell may run: the kernel is interrupted and the cell is reported as a failure
    (``CellTimeoutError``); with ``--keep-going`` the next cells still run.
``--quick``
    the quick profile: per notebook the smaller sizes of :data:`QUICK` (the same code paths with smaller
    N's: every interval over ≥ 2 items, every sweep ≥ 2 points), so that all ten notebooks run in float16 on a
    2-core CPU in a CI job (``make course-fp16``). ``-p`` values override the profile. Its claims are
    recorded, not graded (see ``--grade-claims``).
``--grade-claims`` / ``--no-grade-claims``
    whether a claim not reproduced on the built-in model fails its notebook (``checks.ClaimNotReproduced``).
    Default: graded in the reference configuration only, full sizes in float32 (``DTYPE`` float32, or auto on a
    CPU; auto is float16 on a GPU); when not graded the kernels get ``KVLAB_CLAIMS_STRICT=0`` and the index
    says "claims recorded, not graded" (``checks.claim`` itself grades only a float32 built-in model).

For each notebook ``index.html`` and ``times.json`` give the wall time, the device and dtype the model ran in,
and the peak GPU memory of the kernel (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, "—" when
CUDA was not used): the runner appends a probe cell to the copy it executes and removes it from the executed
notebook. ``times.json`` also lists each notebook's failures (cell, exception, message, first source lines).
"""
from __future__ import annotations

import argparse
import ast
import html
import keyword
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
BUILD = REPO / "build" / "course"
# The course's address, in this one place: the index links, the notebooks' Colab badges and the setup cell's
# clone command are written from it (``python -m kvlab.course sync``; ``check`` and the tests fail on a copy
# that differs).
REPO_URL = "https://github.com/kvlab/kvlab"
COLAB = "https://colab.research.google.com/github/kvlab/kvlab/blob/main/notebooks/{name}"
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
CLONE = '    subprocess.run(["git", "clone", "-q", "{url}", "/content/kvlab"], check=True)'
# The kernels draw with the inline backend, so every plt.show() becomes an image output of the executed
# notebook (and of its HTML); a headless backend such as Agg would drop every figure.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


# A cell that runs longer is interrupted and reported as a failure (``--cell-timeout``; 0: no limit).
CELL_TIMEOUT = 1800
TIMEOUT_ENAME = "CellTimeoutError"
PROBE_TAG = "kvlab-probe"            # the runner's last cell: device, dtype and peak GPU memory of the kernel
_ERROR_TAG = "papermill-error-cell-tag"   # papermill's banner cells (it removes them when it runs a notebook again)
_BANNER_STYLE = "color:red; font-family:Helvetica Neue, Helvetica, Arial, sans-serif; font-size:1.5em;"
_PROBE_MARK = "KVLAB_PROBE "
_PROBE = f"""# kvlab.course probe: the kernel's device, dtype and peak GPU memory (removed from the executed notebook)
def _kvlab_probe():
    import json, sys
    out = {{}}
    try:
        p = next(globals()["model"].parameters())
        out["device"], out["dtype"] = str(p.device), str(p.dtype).replace("torch.", "")
    except Exception:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        n = torch.cuda.device_count()
        out["gpu"] = ", ".join(sorted({{torch.cuda.get_device_name(i) for i in range(n)}}))
        out["peak_allocated"] = sum(torch.cuda.max_memory_allocated(i) for i in range(n))
        out["peak_reserved"] = sum(torch.cuda.max_memory_reserved(i) for i in range(n))
    print({_PROBE_MARK!r} + json.dumps(out))
_kvlab_probe()
del _kvlab_probe"""

# The quick profile (``--quick``): per notebook (by number), smaller sizes for the parameters its ``parameters``
# cell declares, so that the same code paths run with smaller N's (every interval still over >= 2 items, every
# sweep >= 2 points) and all ten notebooks run in float16 on a 2-core CPU in a CI job. ``-p`` overrides them.
QUICK: dict[str, dict] = {
    "00": {},
    "01": {"N_TEXTS": 60},
    "02": {"N_SENTENCES": 500, "K": 20, "N_KEYS": 10, "N_TRIGGERS": 10},
    "03": {"N_SENTENCES": 500},
    "04": {"N_PREFIXES": 400, "N_FACTS": 40},
    "05": {"N_FACTS": 12, "SAMPLES": 3, "N_SWEEP": 6},
    "06": {"N_FACTS": 8, "N_UNRELATED": 3, "N_TRACE": 6},
    "07": {"N_EDITS": 4, "SWEEP_EDITS": 2, "N_TEMPLATES": 2, "COV_SAMPLES": 300, "FT_STEPS": 5},
    "08": {"N_TRAIN": 48, "N_TEST": 24, "EPOCHS": 2, "N_SEEDS": 2},
    "09": {"COUNTS": [2, 4], "N_TEMPLATES": 2, "V_STEPS": 10},
}


@dataclass
class NotebookRun:
    name: str
    seconds: float
    ok: bool
    error: str = ""               # the first failure, formatted (cell, exception, first source lines)
    cell: int | None = None       # the first failing cell's index in the notebook
    parameters: dict = field(default_factory=dict)
    figures: int = 0          # image outputs of the executed notebook (saved under figures/)
    failures: list[dict] = field(default_factory=list)   # every failing cell: see :func:`failures`
    device: str = ""              # what the model ran on ("cuda:0 (NVIDIA H200)", "cpu"), else the requested one
    dtype: str = ""               # the model's dtype ("float16"), else the requested DTYPE
    peak_allocated: int | None = None   # bytes, torch.cuda.max_memory_allocated of the kernel (None: no CUDA)
    peak_reserved: int | None = None    # bytes, torch.cuda.max_memory_reserved of the kernel


def _matches(path: Path, wanted: str) -> bool:
    """Whether ``--only`` item ``wanted`` names the notebook ``path``: its full number ("05"), its stem or file name
    ("05_rome", "05_rome.ipynb", also as a path), or a prefix of its name that goes past the number ("05_ro").
    A prefix of the number alone ("0") names no notebook (it would select every notebook 00-09)."""
    number = path.name[:2]
    name = Path(wanted).name
    return (wanted == number or name in (path.stem, path.name)
            or (len(wanted) > len(number) and wanted.startswith(number + "_") and path.name.startswith(wanted)))


def notebooks(only: list[str] | None = None, folder: Path = NOTEBOOKS) -> list[Path]:
    """The course notebooks in order; ``only`` filters by number ("05"), name ("05_rome") or a prefix of the name
    that goes past the number. Every item of ``only`` must name a notebook (SystemExit listing them if not)."""
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise SystemExit(f"no course notebooks (NN_name.ipynb) in {folder}")
    if only is not None:
        wanted = [o.strip() for o in only]
        if not wanted or not all(wanted):
            raise SystemExit(f"--only needs notebook numbers or names, got {only!r}")
        unmatched = [w for w in wanted if not any(_matches(p, w) for p in paths)]
        if unmatched:
            raise SystemExit(f"no notebook matches {', '.join(map(repr, unmatched))} (give a full notebook number "
                             f"such as {paths[0].name[:2]!r}, or a name); available: "
                             f"{', '.join(p.name for p in paths)}")
        paths = [p for p in paths if any(_matches(p, w) for w in wanted)]
    return paths


def _coerce(value: str):
    """A parameter value from the command line: a Python literal where it parses as one (``3``, ``0.5``,
    ``[2, 4]``, ``None``, ``'a b'``; also ``true``/``false``/``none``), else the string itself."""
    lower = value.strip().lower()
    if lower in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lower]
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def parameter_names(path: Path) -> set[str]:
    """The names a notebook's ``parameters`` cell assigns (what papermill may override)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise SystemExit(f"{path.name}: {len(cells)} cells tagged 'parameters' (need exactly 1)")
    names = set()
    for node in ast.walk(ast.parse(cells[0].source)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


# What papermill writes into a notebook faithfully (a JSON value); anything else it writes as its str().
PARAMETER_KINDS = "int, float (finite), str, bool, None, and lists and dicts (with str keys) of them"


def _parameter_problem(value, depth: int = 0) -> str | None:
    """Why papermill would not pass ``value`` to a notebook as it is (None: it would). papermill writes JSON
    values (int, float, str, bool, None, lists, dicts with str keys) as code; any other value (a tuple, a set,
    bytes, a complex number), also nested in a list, becomes a string in the notebook."""
    if depth > 100:
        return "nested more than 100 levels deep"
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"the non-finite float {value!r}"
    if isinstance(value, list):
        return next((p for v in value if (p := _parameter_problem(v, depth + 1))), None)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"the dict key {k!r} ({type(k).__name__}; papermill writes keys as strings)"
            if p := _parameter_problem(v, depth + 1):
                return p
        return None
    hint = "; write a list such as [2, 3]" if isinstance(value, (tuple, set, frozenset)) else ""
    return f"a {type(value).__name__} ({value!r}), which papermill would pass as the string {str(value)!r}{hint}"


def check_parameter_values(params: dict) -> None:
    """SystemExit naming the first parameter whose value papermill would not pass as it is (see
    :data:`PARAMETER_KINDS`): a tuple, set, bytes or complex value, also nested, reaches the notebook as a string."""
    for name, value in params.items():
        problem = _parameter_problem(value)
        if problem:
            raise SystemExit(f"parameter {name} = {value!r}: holds {problem}. A notebook parameter is one of "
                             f"{PARAMETER_KINDS}; quote it to pass a string")


def notebook_parameters(paths: list[Path], params: dict) -> dict[Path, dict]:
    """Each notebook's share of ``params``: the names its parameters cell has. A name that is not a
    Python identifier, or that no selected notebook has, is an error (papermill writes the names into
    the notebook as code), and so is a value papermill would not pass as it is (:func:`check_parameter_values`)."""
    for name in params:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise SystemExit(f"parameter name {name!r} is not a Python identifier")
    check_parameter_values(params)
    declared = {p: parameter_names(p) for p in paths}
    unknown = sorted(set(params) - set().union(*declared.values()))
    if unknown:
        known = ", ".join(sorted(set().union(*declared.values())))
        raise SystemExit(f"unknown parameter(s) {', '.join(unknown)}: the selected notebooks take {known}")
    return {p: {k: v for k, v in params.items() if k in names} for p, names in declared.items()}


def check_out_dir(out_dir: Path, paths: list[Path], folder: Path = NOTEBOOKS) -> None:
    """SystemExit unless ``out_dir`` can take the run's files without overwriting the course: it must not be the
    course's notebooks folder (``folder``, :data:`NOTEBOOKS`) or the folder of any selected notebook (the executed
    copy would replace the notebook, solutions in place of the stubs), and must not be or lie under a file."""
    target = Path(out_dir).expanduser().resolve()
    sources = {Path(folder).resolve(), NOTEBOOKS.resolve(), *(p.resolve().parent for p in paths)}
    if target in sources:
        raise SystemExit(f"--out {out_dir} is the notebooks folder {target} (it holds the course's notebooks): the "
                         f"executed copies would overwrite them; pass another folder (default {BUILD})")
    for parent in (target, *target.parents):
        if parent.exists():
            if not parent.is_dir():
                raise SystemExit(f"--out {out_dir}: {parent} is a file, not a folder; pass a folder "
                                 f"(default {BUILD})")
            break


def with_solutions(path: Path, dest: Path, folder: Path | None = None) -> Path:
    """Write ``path`` to ``dest`` with every exercise stub (a code cell tagged ``exercise``, its id in the cell
    metadata ``exercise``) replaced by its solution: the section ``# %% exercise <id>`` of ``NN.py`` in
    ``folder`` (default ``solutions/`` beside the notebook). A stub without a solution, or a solution
    without a stub, is an error (SystemExit naming it)."""
    import re

    import nbformat

    nb = nbformat.read(path, as_version=4)
    stubs = [c for c in nb.cells if "exercise" in c.get("metadata", {}).get("tags", [])]
    file = (folder or path.parent / "solutions") / f"{path.name[:2]}.py"
    parts = re.split(r"^# %% exercise (\S+)[ \t]*\n", file.read_text(encoding="utf-8"), flags=re.M) \
        if file.exists() else [""]
    solutions = {k: v.strip() + "\n" for k, v in zip(parts[1::2], parts[2::2])}
    ids = [c.metadata.get("exercise") for c in stubs]
    missing = [i for i in ids if i not in solutions]
    unused = sorted(set(solutions) - set(ids))
    if missing or unused:
        raise SystemExit(f"{path.name}: exercise stubs without a solution in {file}: {missing}; "
                         f"solutions without a stub: {unused}")
    for c in stubs:
        c.source = solutions[c.metadata["exercise"]].rstrip("\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest


def quick_parameters(paths: list[Path], quick: dict[str, dict] | None = None) -> dict[Path, dict]:
    """Each notebook's quick-profile sizes (:data:`QUICK`, by the notebook's number). A name its parameters cell
    does not declare is an error (SystemExit naming it), so the profile cannot drift from the notebooks."""
    quick = QUICK if quick is None else quick
    out = {}
    for path in paths:
        sizes = dict(quick.get(path.name[:2], {}))
        unknown = sorted(set(sizes) - parameter_names(path))
        if unknown:
            raise SystemExit(f"quick profile of {path.name}: {', '.join(unknown)} not in its parameters cell "
                             f"(it takes {', '.join(sorted(parameter_names(path)))})")
        out[path] = sizes
    return out


def _prepare(path: Path, dest: Path, solutions: bool) -> Path:
    """The copy the runner executes: the exercises solved (``solutions``), the probe cell appended."""
    import nbformat

    if solutions:
        with_solutions(path, dest)
        nb = nbformat.read(dest, as_version=4)
    else:
        nb = nbformat.read(path, as_version=4)
    probe = nbformat.v4.new_code_cell(_PROBE)
    probe.metadata["tags"] = [PROBE_TAG]
    nb.cells.append(probe)
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest


def _inserted(cell) -> bool:
    """A cell papermill or the runner added (injected parameters, the error banner, the probe)."""
    tags = cell.get("metadata", {}).get("tags", [])
    return any(t in tags for t in ("injected-parameters", _ERROR_TAG, PROBE_TAG))


def _describe(cell, index: int | None, ename: str, evalue: str, timed_out: bool = False) -> dict:
    return {"cell": index, "execution_count": cell.get("execution_count") if cell is not None else None,
            "ename": ename, "evalue": evalue, "timed_out": timed_out,
            "source": "\n".join((cell.source if cell is not None else "").splitlines()[:8])}


def failures(nb) -> list[dict]:
    """Every failing cell of an executed notebook, in order: ``cell`` (its index in the notebook as written, not
    counting the cells papermill and the runner add), ``execution_count``, ``ename``, ``evalue``, ``timed_out``
    and ``source`` (the first 8 lines). A ``SystemExit`` with no or a zero code is no failure (as in papermill)."""
    out, index = [], 0
    for cell in nb.cells:
        if _inserted(cell):
            continue
        i, index = index, index + 1
        if cell.cell_type != "code":
            continue
        meta = cell.get("metadata", {})
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"
                  and not (o.get("ename") == "SystemExit" and str(o.get("evalue", "")) in ("", "0"))]
        if meta.get("kvlab", {}).get("timed_out"):
            out.append(_describe(cell, i, TIMEOUT_ENAME, f"still running after {meta['kvlab']['timed_out']} s "
                                 "(--cell-timeout): interrupted", timed_out=True))
        elif errors:
            out.append(_describe(cell, i, errors[0].get("ename", "Error"), str(errors[0].get("evalue", ""))))
        elif meta.get("papermill", {}).get("exception"):
            out.append(_describe(cell, i, "CellExecutionError", "the cell failed without an error output"))
    return out


def format_failure(f: dict) -> str:
    """``cell 12 (execution count 9): ValueError: message`` and the cell's first lines, indented."""
    where = "notebook" if f.get("cell") is None else f"cell {f['cell']}"
    where += f" (execution count {f['execution_count']})" if f.get("execution_count") else ""
    lines = "\n".join("    " + s for s in f.get("source", "").splitlines())
    return f"{where}: {f['ename']}: {f['evalue']}" + (f"\n{lines}" if lines else "")


def _running_cell(nb):
    """(index as written, cell) of the last cell papermill started, for an exception outside any cell output;
    (None, None) when that was the probe or no cell started."""
    hit, index = (None, None), 0
    for cell in nb.cells:
        started = cell.cell_type == "code" and cell.get("metadata", {}).get("papermill", {}).get("start_time")
        if PROBE_TAG in cell.get("metadata", {}).get("tags", []):
            hit = (None, None) if started else hit
        elif not _inserted(cell):
            hit = (index, cell) if started else hit
            index += 1
    return hit


def _banners(nb, fails: list[dict]) -> None:
    """Replace papermill's error banner (it names one failing cell) by one naming every failing cell, each linked
    to an anchor above its cell."""
    import nbformat

    nb.cells = [c for c in nb.cells if _ERROR_TAG not in c.get("metadata", {}).get("tags", [])]
    if not fails:
        return
    failing = {f["cell"]: k for k, f in enumerate(fails) if f["cell"] is not None}
    cells, index = [], 0
    for cell in nb.cells:
        if not _inserted(cell):
            if index in failing:
                k = failing[index]
                anchor = nbformat.v4.new_markdown_cell(
                    f'<span id="kvlab-failure-{k + 1}" style="{_BANNER_STYLE}">Failure {k + 1} of {len(fails)}: '
                    f'{html.escape(fails[k]["ename"])} in the next cell</span>')
                anchor.metadata["tags"] = [_ERROR_TAG]
                cells.append(anchor)
            index += 1
        cells.append(cell)
    links = ", ".join(f'<a href="#kvlab-failure-{k + 1}">In [{f.get("execution_count") or "?"}]</a>'
                      for k, f in enumerate(fails) if f["cell"] is not None)
    top = nbformat.v4.new_markdown_cell(
        f'<span style="{_BANNER_STYLE}">{len(fails)} failing cell{"s" if len(fails) != 1 else ""}'
        + (f": {links}" if links else "") + "</span>")
    top.metadata["tags"] = [_ERROR_TAG]
    nb.cells = [top] + cells


def _finish(out: Path, fails: list[dict]) -> dict:
    """Read the probe's line from the executed notebook at ``out``, then rewrite it as the learner's notebook would
    run: the probe cell removed, the runner's marks (skipped cells, timed-out cells) taken off, one banner naming
    every failure in ``fails``. Returns the probe's values ({} when the probe did not run)."""
    import nbformat

    nb = nbformat.read(out, as_version=4)
    probe = {}
    for cell in [c for c in nb.cells if PROBE_TAG in c.get("metadata", {}).get("tags", [])]:
        for o in cell.get("outputs", []):
            text = o.get("text", "") if o.get("output_type") == "stream" else ""
            for line in text.splitlines():
                if line.startswith(_PROBE_MARK):
                    try:
                        probe = json.loads(line[len(_PROBE_MARK):])
                    except ValueError:  # pragma: no cover - the probe prints JSON
                        pass
        nb.cells.remove(cell)
    for cell in nb.cells:
        mark = cell.get("metadata", {}).pop("kvlab", None) or {}
        if mark.get("skipped"):
            cell.metadata["tags"] = [t for t in cell.metadata.get("tags", []) if t != "skip-execution"]
            if not cell.metadata["tags"]:
                del cell.metadata["tags"]
            cell.metadata.get("papermill", {})["status"] = "pending"
    _banners(nb, fails)
    nbformat.write(nb, out)
    return probe


def run_notebook(path: Path, out_dir: Path, parameters: dict, progress: bool = True,
                 solutions: bool = False, keep_going: bool = False,
                 cell_timeout: float | None = CELL_TIMEOUT) -> NotebookRun:
    """Execute ``path`` with papermill into ``out_dir``. ``keep_going``: every cell runs even after a failure
    and every failing cell is reported; else cells after the first failure are skipped (as papermill does; the
    probe cell still runs). ``cell_timeout``: seconds a cell may run before it is interrupted and reported as
    a failure (None or 0: no limit)."""
    import tempfile

    import nbformat
    import papermill as pm

    out = Path(out_dir) / path.name
    if out.resolve() == path.resolve():
        raise SystemExit(f"out_dir {out_dir} holds the notebook {path.name} itself: the executed copy would overwrite "
                         f"it; pass another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    timeout = int(math.ceil(cell_timeout)) if cell_timeout else None
    failed = []

    def on_cell_start(cell, cell_index):      # stop at the first failure, except for the probe
        if failed and not keep_going and cell.cell_type == "code" \
                and PROBE_TAG not in cell.metadata.get("tags", []) \
                and "skip-execution" not in cell.metadata.get("tags", []):
            cell.metadata.setdefault("tags", []).append("skip-execution")
            cell.metadata["kvlab"] = {"skipped": True}

    def on_cell_error(cell, cell_index, execute_reply):
        failed.append(cell_index)
        if execute_reply.get("content", {}).get("ename") == TIMEOUT_ENAME:
            cell.metadata["kvlab"] = {"timed_out": timeout}
            cell.outputs.append(nbformat.v4.new_output(
                "stream", name="stderr", text=f"kvlab.course: interrupted after {timeout} s (--cell-timeout)\n"))

    t0 = time.perf_counter()
    backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = INLINE_BACKEND      # the kernel inherits it: figures become image outputs
    exc_found = None
    try:
        with tempfile.TemporaryDirectory() as tmp:   # the exercises solved, the probe appended: a copy
            src = _prepare(path, Path(tmp) / path.name, solutions)
            pm.execute_notebook(
                str(src), str(out), parameters=parameters, progress_bar=progress, cwd=str(path.parent),
                kernel_name="python3", language="python",
                # nbclient: every cell runs (the hooks skip the rest after a failure unless keep_going), a cell
                # over the timeout is interrupted and answered with an error reply
                allow_errors=True, execution_timeout=timeout, interrupt_on_timeout=True,
                error_on_timeout={"ename": TIMEOUT_ENAME, "evalue": f"cell ran longer than {timeout} s",
                                  "traceback": []},
                on_cell_start=on_cell_start, on_cell_error=on_cell_error)
    except pm.PapermillExecutionError:
        pass                                     # the executed notebook holds every error: read below
    except Exception as exc:  # a timeout the kernel did not answer, a dead kernel, ...
        exc_found = exc
    finally:
        if backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = backend
    seconds = time.perf_counter() - t0
    fails, probe = [], {}
    nb = nbformat.read(out, as_version=4) if out.exists() else None
    if nb is not None:
        fails = failures(nb)
    if exc_found is not None:   # name the cell that was running, unless its output already shows the error
        index, cell = _running_cell(nb) if nb is not None else (None, None)
        if not any(f["cell"] == index for f in fails):
            timed = isinstance(exc_found, TimeoutError)
            message = (f"still running after {timeout} s (--cell-timeout); the kernel did not answer the interrupt"
                       if timed else (str(exc_found).strip().splitlines() or [""])[0])
            fails.append(_describe(cell, index, TIMEOUT_ENAME if timed else type(exc_found).__name__,
                                   message, timed_out=timed))
            fails.sort(key=lambda f: (f["cell"] is None, f["cell"] or 0))
    if nb is not None:
        probe = _finish(out, fails)
    gpu = probe.get("gpu")
    device = probe.get("device") or str(parameters.get("DEVICE", "auto"))
    return NotebookRun(path.name, seconds, not fails, format_failure(fails[0]) if fails else "",
                       fails[0]["cell"] if fails else None, parameters, failures=fails,
                       device=device + (f" ({gpu})" if gpu and device.startswith("cuda") else ""),
                       dtype=probe.get("dtype") or str(parameters.get("DTYPE", "auto")),
                       peak_allocated=probe.get("peak_allocated"), peak_reserved=probe.get("peak_reserved"))


def save_figures(executed: Path, folder: Path) -> list[Path]:
    """Write every PNG output of an executed notebook to ``folder/<notebook>/cell<NN>_<k>.png``; returns the files
    (none when the kernels drew no figure, e.g. under a headless backend)."""
    import base64

    import nbformat

    nb = nbformat.read(executed, as_version=4)
    target = folder / executed.stem
    if target.exists():
        for old in target.glob("*.png"):
            old.unlink()
    files = []
    for i, cell in enumerate(nb.cells):
        pngs = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        for k, data in enumerate(pngs):
            target.mkdir(parents=True, exist_ok=True)
            path = target / f"cell{i:02d}_{k}.png"
            path.write_bytes(base64.b64decode(data))
            files.append(path)
    return files


def to_html(executed: Path) -> Path:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(executed))
    target = executed.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target


def collect_claims(out_dir: Path) -> list[dict]:
    """The claims the notebooks recorded (``kvlab.checks.claim``) into ``claims.jsonl`` during the run,
    written to ``claims.json`` (one per key, the last recording wins)."""
    path = out_dir / "claims.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    claims = list({r["key"]: r for r in rows}.values())
    (out_dir / "claims.json").write_text(json.dumps(claims, indent=1))
    return claims


def _ours(c: dict) -> str:
    """Our number, with its 95% interval and sample size where the notebook gave them."""
    ci = c.get("ci")
    n = c.get("n")
    return f"{c['ours']:.4g}" + ("" if not ci else f" [{ci[0]:.3g}, {ci[1]:.3g}]") + ("" if n is None else f" (n={n})")


def _scorecard(claims: list[dict], graded: bool = True) -> str:
    if not claims:
        return "<p>No claims recorded.</p>"
    colour = {"reproduced": "#d7f0d7", "partly reproduced": "#fbeec2", "not reproduced": "#f6d4d4"}
    rows = "".join(
        f"<tr style='background:{colour.get(c['verdict'], '#fff')}'><td>{html.escape(c['key'])}</td>"
        f"<td>{html.escape(c['text'])}</td><td>{html.escape(str(c['paper']))}</td><td>{_ours(c)}</td>"
        f"<td>{html.escape(c['expect'])}</td><td>{html.escape(c['verdict'])}</td>"
        f"<td>{html.escape(c['source'])}</td></tr>" for c in claims)
    counts = ", ".join(f"{sum(c['verdict'] == v for c in claims)} {v}" for v in colour)
    note = "" if graded else (" <b>Claims recorded, not graded</b>: this run's sizes or dtype are not the "
                              "reference configuration, so a claim not reproduced failed no notebook.")
    return (f"<h2>Reproduction scorecard</h2><p>{len(claims)} claims: {counts} "
            f"(<a href='claims.json'>claims.json</a>).{note}</p><table><tr><th>claim</th><th></th><th>paper</th>"
            f"<th>ours [95% CI] (n)</th><th>criterion</th><th>verdict</th><th>source</th></tr>{rows}</table>")


def _memory(r: NotebookRun) -> str:
    """Peak GPU memory of a notebook's kernel, allocated / reserved; "—" when CUDA was not used."""
    if r.peak_allocated is None:
        return "—"
    reserved = r.peak_reserved or 0
    if max(r.peak_allocated, reserved) < 2**30:
        return f"{r.peak_allocated / 2**20:.0f} / {reserved / 2**20:.0f} MiB"
    return f"{r.peak_allocated / 2**30:.2f} / {reserved / 2**30:.2f} GiB"


def _failures_html(runs: list[NotebookRun]) -> str:
    failed = [r for r in runs if r.failures]
    if not failed:
        return ""
    parts = ["<h2>Failures</h2>"]
    for r in failed:
        items = "".join(
            f"<li>{html.escape(format_failure({**f, 'source': ''}))}"
            + (f"<pre>{html.escape(f['source'])}</pre>" if f.get("source") else "") + "</li>" for f in r.failures)
        parts.append(f"<h3 id='fail-{html.escape(r.name)}'>{html.escape(r.name)}: {len(r.failures)} failing "
                     f"cell{'s' if len(r.failures) != 1 else ''}</h3><ol>{items}</ol>")
    return "\n".join(parts)


def write_index(runs: list[NotebookRun], out_dir: Path, model: str, claims: list[dict] | None = None,
                settings: dict | None = None) -> Path:
    """``index.html``: per notebook the time, peak GPU memory, figures and status (every failing cell listed
    below the table), the device and dtype of the run, the profile, then the claims' scorecard. ``settings``:
    ``quick``, ``graded`` (claims), ``keep_going``, ``cell_timeout`` of the run."""
    settings = {"quick": False, "graded": True, "keep_going": False, "cell_timeout": CELL_TIMEOUT, **(settings or {})}
    total = sum(r.seconds for r in runs)
    rows = []
    for r in runs:
        if r.ok:
            status = "ok"
        else:
            n = len(r.failures) or 1
            status = (f"<a href='#fail-{html.escape(r.name)}'>FAILED</a>" + (f" ({n} cells)" if n > 1 else "")
                      + f": {html.escape(r.error.splitlines()[0])}")
        link = Path(r.name).with_suffix(".html").name
        rows.append(f"<tr><td><a href='{link}'>{html.escape(r.name)}</a></td><td>{r.seconds:.1f}</td>"
                    f"<td>{_memory(r)}</td><td>{r.figures}</td><td>{status}</td>"
                    f"<td><a href='{COLAB.format(name=r.name)}'>Colab</a></td></tr>")
    devices = ", ".join(dict.fromkeys(r.device for r in runs if r.device)) or "—"
    dtypes = ", ".join(dict.fromkeys(r.dtype for r in runs if r.dtype)) or "—"
    profile = ("quick profile (<code>--quick</code>: smaller sizes, the parameters of each notebook in "
               "<a href='times.json'>times.json</a>)" if settings["quick"] else "full sizes")
    claims_mode = "graded" if settings["graded"] else "recorded, not graded"
    timeout = f"{settings['cell_timeout']:.0f} s" if settings["cell_timeout"] else "none"
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>kvlab course</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}td,th{{padding:4px 12px;text-align:left}}
tr:nth-child(even){{background:#f3f3f3}}pre{{background:#f6f6f6;padding:4px}}</style></head><body>
<h1>kvlab: feed-forward layers as key-value memories</h1>
<p>Executed {time.strftime('%Y-%m-%d %H:%M')} on model <code>{html.escape(model)}</code>, device
<code>{html.escape(devices)}</code>, dtype <code>{html.escape(dtypes)}</code>; total {total:.0f} s
({total / 60:.1f} min).</p>
<p>Profile: {profile}; claims {claims_mode}; {'every cell run after a failure (--keep-going)' if settings['keep_going']
    else 'each notebook stops at its first failing cell'}; cell timeout {timeout}.</p>
<table><tr><th>notebook</th><th>seconds</th><th>peak GPU memory (allocated / reserved)</th><th>figures</th>
<th>status</th><th></th></tr>{''.join(rows)}</table>
{_failures_html(runs)}
{_scorecard(claims or [], settings['graded'])}
</body></html>"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def grades_claims(quick: bool, parameters: dict, device: str = "auto") -> bool:
    """The default of ``--grade-claims``: claims fail a notebook only in the reference configuration, full sizes
    in float32 (DTYPE float32, or auto on a CPU: auto is float16 on a GPU)."""
    dtype = str(parameters.get("DTYPE", "auto")).lower()
    if dtype == "auto":
        from .loading import resolve_device
        dtype = "float32" if resolve_device(device).type == "cpu" else "float16"
    return not quick and dtype == "float32"


def run(only=None, model: str = "kvlab/world", device: str = "auto", extra: dict | None = None,
        out_dir: Path = BUILD, html_out: bool = True, progress: bool = True,
        solutions: bool = True, keep_going: bool = False, cell_timeout: float | None = CELL_TIMEOUT,
        quick: bool = False, grade_claims: bool | None = None,
        folder: Path = NOTEBOOKS) -> list[NotebookRun]:
    from tqdm.auto import tqdm

    # everything is checked before the disk is touched: a rejected argument leaves --out as it was
    out_dir = Path(out_dir)
    paths = notebooks(only, folder)
    per_notebook = notebook_parameters(paths, {"MODEL": model, "DEVICE": device, **(extra or {})})
    if quick:   # the profile's sizes, under what -p gave
        sizes = quick_parameters(paths)
        per_notebook = {p: {**sizes[p], **per_notebook[p]} for p in paths}
    check_out_dir(out_dir, paths, folder)
    given = {"MODEL": model, "DEVICE": device, **(extra or {})}     # -p MODEL / DEVICE override the options
    model, device = given["MODEL"], given["DEVICE"]
    try:
        graded = grades_claims(quick, extra or {}, str(device)) if grade_claims is None else grade_claims
    except RuntimeError as e:   # torch.device("gpu") in resolve_device
        raise SystemExit(f"device {device!r} is not a device torch knows ({e}); e.g. auto, cpu, cuda, cuda:1, mps")

    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if model == "kvlab/world" else os.environ.get("HF_HUB_OFFLINE", "0"))
    claims_log = out_dir / "claims.jsonl"
    claims_log.unlink(missing_ok=True)
    os.environ["KVLAB_CLAIMS"] = str(claims_log.resolve())   # the kernels append what they measure
    strict_before = os.environ.get("KVLAB_CLAIMS_STRICT")
    os.environ["KVLAB_CLAIMS_STRICT"] = "1" if graded else "0"   # the kernels inherit it (kvlab.checks.claim)
    settings = {"quick": quick, "graded": graded, "keep_going": keep_going, "cell_timeout": cell_timeout or 0}
    runs = []
    try:
        bar = tqdm(paths, desc="course", unit="notebook", disable=None)  # no bar in logs
        for path in bar:
            bar.set_postfix_str(path.name)
            r = run_notebook(path, out_dir, per_notebook[path], progress=progress, solutions=solutions,
                             keep_going=keep_going, cell_timeout=cell_timeout)
            runs.append(r)
            if (out_dir / path.name).exists():
                r.figures = len(save_figures(out_dir / path.name, out_dir / "figures"))
                if html_out:
                    to_html(out_dir / path.name)
            memory = "" if r.peak_allocated is None else f"  (peak GPU memory {_memory(r)})"
            tqdm.write(f"{'ok' if r.ok else 'FAILED':6s} {r.seconds:7.1f} s  {r.figures:3d} figures  "
                       f"{path.name}{memory}")
            for f in r.failures:
                tqdm.write(f"       {format_failure(f)}".replace("\n", "\n       "))
    finally:
        if strict_before is None:
            os.environ.pop("KVLAB_CLAIMS_STRICT", None)
        else:
            os.environ["KVLAB_CLAIMS_STRICT"] = strict_before
    (out_dir / "times.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    claims = collect_claims(out_dir)
    shown = ", ".join(dict.fromkeys(str(r.parameters.get("MODEL", model)) for r in runs)) or str(model)
    write_index(runs, out_dir, shown, claims, settings)   # the model the notebooks got (-p MODEL wins)
    total = sum(r.seconds for r in runs)
    verdicts = ", ".join(f"{sum(c['verdict'] == v for c in claims)} {v}"
                         for v in ("reproduced", "partly reproduced", "not reproduced"))
    print(f"\n{sum(r.ok for r in runs)}/{len(runs)} notebooks ok in {total:.0f} s ({total / 60:.1f} min); "
          f"{len(claims)} claims{'' if graded else ' (recorded, not graded)'}: {verdicts}; "
          f"index: {out_dir / 'index.html'}")
    return runs


_BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
_CLONE_RE = re.compile(r'^ *subprocess\.run\(\["git", "clone".*$', re.M)


def _addresses(nb, name: str) -> tuple[str, str]:
    """A notebook's first markdown cell and setup cell with the Colab badge and the clone command written from
    :data:`COLAB` and :data:`REPO_URL` (the source unchanged where it has neither)."""
    badge = BADGE.format(url=COLAB.format(name=name))
    clone = CLONE.format(url=REPO_URL)
    md = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    setup = next((c for c in nb.cells if c.cell_type == "code" and '"git", "clone"' in c.source), None)
    return (_BADGE_RE.sub(lambda _: badge, md.source) if md is not None else "",
            _CLONE_RE.sub(lambda _: clone, setup.source) if setup is not None else "")


def address_problems(path: Path) -> list[str]:
    """Where a notebook's Colab badge or clone command is missing or differs from :data:`COLAB` /
    :data:`REPO_URL`."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    md = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    setup = next((c for c in nb.cells if c.cell_type == "code" and '"git", "clone"' in c.source), None)
    problems = []
    if md is None or BADGE.format(url=COLAB.format(name=path.name)) not in md.source:
        problems.append(f"{path.name}: the first markdown cell has no Colab badge for COLAB "
                        f"(run: python -m kvlab.course sync)")
    if setup is None or CLONE.format(url=REPO_URL) not in setup.source.splitlines():
        problems.append(f"{path.name}: the setup cell does not clone REPO_URL (run: python -m kvlab.course sync)")
    return problems


def sync(folder: Path = NOTEBOOKS) -> list[Path]:
    """Rewrite every notebook's Colab badge and clone command from :data:`COLAB` and :data:`REPO_URL`;
    returns the notebooks that changed."""
    import nbformat

    changed = []
    for p in notebooks(folder=folder):
        nb = nbformat.read(p, as_version=4)
        md_src, setup_src = _addresses(nb, p.name)
        md = next((c for c in nb.cells if c.cell_type == "markdown"), None)
        setup = next((c for c in nb.cells if c.cell_type == "code" and '"git", "clone"' in c.source), None)
        if md is not None and md_src != md.source or setup is not None and setup_src != setup.source:
            if md is not None:
                md.source = md_src
            if setup is not None:
                setup.source = setup_src
            nbformat.write(nb, p)
            changed.append(p)
    return changed


def check(folder: Path = NOTEBOOKS) -> list[str]:
    """Problems with the committed notebooks: outputs not cleared, no single parameters cell, a Colab badge or
    clone address that is not the one of :data:`COLAB` / :data:`REPO_URL`."""
    import nbformat

    problems = []
    for p in notebooks(folder=folder):
        problems += address_problems(p)
        nb = nbformat.read(p, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        if len(tagged) != 1:
            problems.append(f"{p.name}: {len(tagged)} cells tagged 'parameters' (need exactly 1)")
        if any(c.cell_type == "code" and (c.get("outputs") or c.get("execution_count")) for c in nb.cells):
            problems.append(f"{p.name}: outputs not cleared (run: python -m kvlab.course clear)")
    return problems


def clear(folder: Path = NOTEBOOKS) -> None:
    import nbformat

    for p in notebooks(folder=folder):
        nb = nbformat.read(p, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                c.outputs, c.execution_count = [], None
            c.get("metadata", {}).pop("execution", None)
            c.get("metadata", {}).pop("papermill", None)
        nb.metadata.pop("papermill", None)
        nbformat.write(nb, p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvlab.course", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute notebooks with papermill")
    r.add_argument("--only", nargs="+", help="notebook numbers or names, e.g. 01 05")
    r.add_argument("--model", default="kvlab/world", help="built-in model (default) or a Hugging Face id / folder")
    r.add_argument("--device", default="auto")
    r.add_argument("--out", type=Path, default=BUILD)
    r.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a name from the notebooks' parameters cells and a Python literal (else a "
                        "string), e.g. -p N_FACTS 1000 -p COUNTS '[2, 4]'")
    r.add_argument("--no-html", action="store_true")
    r.add_argument("--quiet", action="store_true", help="no per-cell progress bars")
    r.add_argument("--solutions", action=argparse.BooleanOptionalAction, default=True,
                   help="run the exercises with their solutions (notebooks/solutions/NN.py) in place of the "
                        "stubs (default); --no-solutions runs the stubs as a learner gets them")
    r.add_argument("--keep-going", "--all-errors", dest="keep_going", action="store_true",
                   help="execute every cell even after a cell failed and report every failing cell (exit code "
                        "still 1); default: a notebook stops at its first failing cell")
    r.add_argument("--cell-timeout", type=float, default=CELL_TIMEOUT, metavar="SECONDS",
                   help=f"interrupt a cell that runs longer and report it as a failure (default {CELL_TIMEOUT}; "
                        "0: no limit)")
    r.add_argument("--quick", action="store_true",
                   help="the quick profile: smaller sizes per notebook (kvlab.course.QUICK; -p overrides them); "
                        "claims recorded, not graded")
    r.add_argument("--grade-claims", action=argparse.BooleanOptionalAction, default=None,
                   help="fail a notebook whose claim is not reproduced on the built-in model (default: only "
                        "without --quick and with DTYPE auto or float32)")
    sub.add_parser("list", help="list the notebooks")
    sub.add_parser("check", help="verify notebooks are cleared and have one parameters cell")
    sub.add_parser("clear", help="clear all notebook outputs in place")
    sub.add_parser("sync", help="write every notebook's Colab badge and clone address from kvlab.course")
    a = ap.parse_args(argv)
    if a.cmd == "list":
        for p in notebooks():
            print(p.name)
        return 0
    if a.cmd == "check":
        problems = check()
        print("\n".join(problems) or f"{len(notebooks())} notebooks ok")
        return 1 if problems else 0
    if a.cmd == "clear":
        clear()
        return 0
    if a.cmd == "sync":
        print("\n".join(f"updated {p.name}" for p in sync()) or "all notebooks up to date")
        return 0
    extra = {k: _coerce(v) for k, v in a.parameter}
    if not 0 <= a.cell_timeout < math.inf:
        raise SystemExit(f"--cell-timeout must be >= 0 seconds and finite (0: no limit), got {a.cell_timeout:g}")
    runs = run(a.only, a.model, a.device, extra, a.out, not a.no_html, not a.quiet, a.solutions,
               keep_going=a.keep_going, cell_timeout=a.cell_timeout or None, quick=a.quick,
               grade_claims=a.grade_claims)
    return 0 if runs and all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
