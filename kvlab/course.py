"""Run the course: execute every notebook with papermill and write an HTML index.

    python -m kvlab.course run                      # all notebooks, built-in model
    python -m kvlab.course run --only 05 07         # a subset, by number
    python -m kvlab.course run --model gpt2-xl --device cuda -p N_FACTS 1000
    python -m kvlab.course list | check | clear | sync

Executed notebooks, their HTML renderings, ``index.html`` and ``times.json`` go to
``build/course/``. A failing notebook is reported with the failing cell's number, the
exception and the first lines of the cell's source; the exit code is 1.
"""
from __future__ import annotations

import argparse
import ast
import html
import keyword
import json
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


@dataclass
class NotebookRun:
    name: str
    seconds: float
    ok: bool
    error: str = ""
    cell: int | None = None
    parameters: dict = field(default_factory=dict)
    figures: int = 0          # image outputs of the executed notebook (saved under figures/)


def notebooks(only: list[str] | None = None, folder: Path = NOTEBOOKS) -> list[Path]:
    """The course notebooks in order; ``only`` filters by number prefix ("05") or name."""
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise SystemExit(f"no course notebooks (NN_name.ipynb) in {folder}")
    if only is not None:
        wanted = [o.strip() for o in only]
        if not wanted or not all(wanted):
            raise SystemExit(f"--only needs notebook numbers or names, got {only!r}")
        paths = [p for p in paths if any(p.name.startswith(w) or p.stem == w for w in wanted)]
        if not paths:
            raise SystemExit(f"no notebook matches {only}; available: "
                             f"{', '.join(p.name for p in notebooks(folder=folder))}")
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


def notebook_parameters(paths: list[Path], params: dict) -> dict[Path, dict]:
    """Each notebook's share of ``params``: the names its parameters cell has. A name that is not a
    Python identifier, or that no selected notebook has, is an error (papermill writes the names into
    the notebook as code)."""
    for name in params:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise SystemExit(f"parameter name {name!r} is not a Python identifier")
    declared = {p: parameter_names(p) for p in paths}
    unknown = sorted(set(params) - set().union(*declared.values()))
    if unknown:
        known = ", ".join(sorted(set().union(*declared.values())))
        raise SystemExit(f"unknown parameter(s) {', '.join(unknown)}: the selected notebooks take {known}")
    return {p: {k: v for k, v in params.items() if k in names} for p, names in declared.items()}


def _failure(exc, nb_path: Path) -> tuple[str, int | None]:
    """Describe a papermill failure: which cell, which exception, the cell's first lines."""
    import nbformat

    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    cell_index = getattr(exc, "cell_index", None)
    exec_count = getattr(exc, "exec_count", None)
    source = ""
    try:  # papermill adds cells (injected parameters, an error banner): find the cell by execution count
        nb = nbformat.read(nb_path, as_version=4)
        code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        hit = [(i, c) for i, c in code if exec_count is not None and c.get("execution_count") == exec_count]
        if hit:
            cell_index, source = hit[0][0], hit[0][1].source
        elif cell_index is not None:
            source = nb.cells[cell_index].source
    except Exception:  # pragma: no cover - reporting only
        pass
    lines = "\n".join("    " + s for s in source.splitlines()[:8])
    where = f"cell {cell_index}" + (f" (execution count {exec_count})" if exec_count else "")
    return f"{where}: {ename}: {evalue}\n{lines}", cell_index


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


def run_notebook(path: Path, out_dir: Path, parameters: dict, progress: bool = True,
                 solutions: bool = False) -> NotebookRun:
    import tempfile

    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    t0 = time.perf_counter()
    backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = INLINE_BACKEND      # the kernel inherits it: figures become image outputs
    try:
        with tempfile.TemporaryDirectory() as tmp:   # the exercises solved: a copy, run where the notebook is
            src = with_solutions(path, Path(tmp) / path.name) if solutions else path
            pm.execute_notebook(str(src), str(out), parameters=parameters, progress_bar=progress,
                                cwd=str(path.parent), kernel_name="python3", language="python")
        ok, error, cell = True, "", None
    except Exception as exc:  # papermill raises PapermillExecutionError for cell errors
        ok = False
        error, cell = _failure(exc, out if out.exists() else path)
    finally:
        if backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = backend
    return NotebookRun(path.name, time.perf_counter() - t0, ok, error, cell, parameters)


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


def _scorecard(claims: list[dict]) -> str:
    if not claims:
        return "<p>No claims recorded.</p>"
    colour = {"reproduced": "#d7f0d7", "partly reproduced": "#fbeec2", "not reproduced": "#f6d4d4"}
    rows = "".join(
        f"<tr style='background:{colour.get(c['verdict'], '#fff')}'><td>{html.escape(c['key'])}</td>"
        f"<td>{html.escape(c['text'])}</td><td>{html.escape(str(c['paper']))}</td><td>{_ours(c)}</td>"
        f"<td>{html.escape(c['expect'])}</td><td>{html.escape(c['verdict'])}</td>"
        f"<td>{html.escape(c['source'])}</td></tr>" for c in claims)
    counts = ", ".join(f"{sum(c['verdict'] == v for c in claims)} {v}" for v in colour)
    return (f"<h2>Reproduction scorecard</h2><p>{len(claims)} claims: {counts} "
            f"(<a href='claims.json'>claims.json</a>).</p><table><tr><th>claim</th><th></th><th>paper</th>"
            f"<th>ours [95% CI] (n)</th><th>criterion</th><th>verdict</th><th>source</th></tr>{rows}</table>")


def write_index(runs: list[NotebookRun], out_dir: Path, model: str, claims: list[dict] | None = None) -> Path:
    total = sum(r.seconds for r in runs)
    rows = []
    for r in runs:
        status = "ok" if r.ok else f"FAILED: {html.escape(r.error.splitlines()[0])}"
        link = Path(r.name).with_suffix(".html").name
        rows.append(f"<tr><td><a href='{link}'>{html.escape(r.name)}</a></td><td>{r.seconds:.1f}</td>"
                    f"<td>{r.figures}</td><td>{status}</td><td><a href='{COLAB.format(name=r.name)}'>Colab</a></td></tr>")
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>kvlab course</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}td,th{{padding:4px 12px;text-align:left}}
tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>kvlab: feed-forward layers as key-value memories</h1>
<p>Executed {time.strftime('%Y-%m-%d %H:%M')} on model <code>{html.escape(model)}</code>;
total {total:.0f} s ({total / 60:.1f} min).</p>
<table><tr><th>notebook</th><th>seconds</th><th>figures</th><th>status</th><th></th></tr>{''.join(rows)}</table>
{_scorecard(claims or [])}
</body></html>"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def run(only=None, model: str = "kvlab/world", device: str = "auto", extra: dict | None = None,
        out_dir: Path = BUILD, html_out: bool = True, progress: bool = True,
        solutions: bool = True) -> list[NotebookRun]:
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if model == "kvlab/world" else os.environ.get("HF_HUB_OFFLINE", "0"))
    paths = notebooks(only)
    claims_log = out_dir / "claims.jsonl"
    claims_log.unlink(missing_ok=True)
    os.environ["KVLAB_CLAIMS"] = str(claims_log.resolve())   # the kernels append what they measure
    per_notebook = notebook_parameters(paths, {"MODEL": model, "DEVICE": device, **(extra or {})})
    runs = []
    bar = tqdm(paths, desc="course", unit="notebook", disable=None)  # no bar in logs
    for path in bar:
        bar.set_postfix_str(path.name)
        r = run_notebook(path, out_dir, per_notebook[path], progress=progress, solutions=solutions)
        runs.append(r)
        if (out_dir / path.name).exists():
            r.figures = len(save_figures(out_dir / path.name, out_dir / "figures"))
            if html_out:
                to_html(out_dir / path.name)
        tqdm.write(f"{'ok' if r.ok else 'FAILED':6s} {r.seconds:7.1f} s  {r.figures:3d} figures  {path.name}")
        if not r.ok:
            tqdm.write(f"       {r.error}".replace("\n", "\n       "))
    (out_dir / "times.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    claims = collect_claims(out_dir)
    write_index(runs, out_dir, model, claims)
    total = sum(r.seconds for r in runs)
    verdicts = ", ".join(f"{sum(c['verdict'] == v for c in claims)} {v}"
                         for v in ("reproduced", "partly reproduced", "not reproduced"))
    print(f"\n{sum(r.ok for r in runs)}/{len(runs)} notebooks ok in {total:.0f} s ({total / 60:.1f} min); "
          f"{len(claims)} claims: {verdicts}; index: {out_dir / 'index.html'}")
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
    runs = run(a.only, a.model, a.device, extra, a.out, not a.no_html, not a.quiet, a.solutions)
    return 0 if runs and all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
