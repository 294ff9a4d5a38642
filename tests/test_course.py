import nbformat
import pytest

from kvlab import course


def _nb(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nb, path)


def test_committed_notebooks_are_clean():
    assert course.notebooks(), "no notebooks found"
    assert course.check() == []


def test_run_reports_failing_cell_and_writes_index(tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    params = nbformat.v4.new_code_cell("MODEL = 'x'\nDEVICE = 'cpu'")
    params.metadata["tags"] = ["parameters"]
    _nb(src / "01_ok.ipynb", [params, nbformat.v4.new_code_cell("assert MODEL == 'kvlab/world'")])
    _nb(src / "02_bad.ipynb", [params, nbformat.v4.new_code_cell("x = 1"),
                                nbformat.v4.new_code_cell("raise ValueError('broken science')")])
    out = tmp_path / "out"
    runs = []
    for p in course.notebooks(folder=src):
        runs.append(course.run_notebook(p, out, {"MODEL": "kvlab/world", "DEVICE": "cpu"}, progress=False))
    assert runs[0].ok and not runs[1].ok
    assert "ValueError" in runs[1].error and "broken science" in runs[1].error
    assert "raise ValueError" in runs[1].error  # the failing cell's source is shown
    course.write_index(runs, out, "kvlab/world")
    assert "02_bad.ipynb" in (out / "index.html").read_text()


def test_only_filter_and_errors():
    names = [p.name for p in course.notebooks(["01"])]
    assert names and all(n.startswith("01") for n in names)
    with pytest.raises(SystemExit, match="no notebook matches"):
        course.notebooks(["99"])


def test_coerce():
    assert course._coerce("3") == 3 and course._coerce("0.5") == 0.5
    assert course._coerce("true") is True and course._coerce("gpt2-xl") == "gpt2-xl"
    assert course._coerce("[2, 4]") == [2, 4] and course._coerce("None") is None
    assert course._coerce("'a b'") == "a b" and course._coerce("data/known_1000.json") == "data/known_1000.json"
    assert course._coerce("__import__('os')") == "__import__('os')"       # not evaluated: a string


def _params_nb(folder, name, source):
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    _nb(folder / name, [cell, nbformat.v4.new_code_cell("x = 1")])
    return folder / name


def test_parameter_names_must_exist_and_be_identifiers(tmp_path):
    a = _params_nb(tmp_path, "01_a.ipynb", "MODEL = 'x'\nDEVICE = 'cpu'\nN_FACTS = 10  # facts")
    b = _params_nb(tmp_path, "02_b.ipynb", "MODEL = 'x'\nDEVICE = 'cpu'\nCOUNTS = [1, 2]")
    assert course.parameter_names(a) == {"MODEL", "DEVICE", "N_FACTS"}
    per = course.notebook_parameters([a, b], {"MODEL": "m", "N_FACTS": 5, "COUNTS": [2, 4]})
    assert per[a] == {"MODEL": "m", "N_FACTS": 5} and per[b] == {"MODEL": "m", "COUNTS": [2, 4]}
    with pytest.raises(SystemExit, match="unknown parameter.*N_FACT\\b.*take"):
        course.notebook_parameters([a, b], {"N_FACT": 5})
    for bad in ("x = __import__('os').system('echo pwned'); y", "1x", "class", "A B"):
        with pytest.raises(SystemExit, match="not a Python identifier"):
            course.notebook_parameters([a], {bad: 1})


def test_no_notebooks_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no course notebooks"):
        course.notebooks(folder=tmp_path)
    with pytest.raises(SystemExit, match="--only needs"):
        course.notebooks([""])


def test_main_rejects_unknown_parameter(tmp_path):
    with pytest.raises(SystemExit, match="unknown parameter"):
        course.main(["run", "--only", "00", "--no-html", "--out", str(tmp_path), "-p", "NOT_A_PARAM", "1"])


def test_claims_collected_into_json_and_scorecard(tmp_path):
    import json
    rows = [dict(key="05.ate", text="subject corruption", ours=0.7, expect="> 0.1", verdict="reproduced",
                 paper=0.186, source="ROME Fig. 1", model="kvlab/world", partly=None),
            dict(key="06.amp", text="amplify <b>", ours=0.07, expect="> 0.2", verdict="not reproduced",
                 paper=0.31, source="Dai et al.", model="kvlab/world", partly=None)]
    lines = [json.dumps(r) for r in rows] + [json.dumps({**rows[0], "ours": 0.5})]   # re-recorded: last wins
    (tmp_path / "claims.jsonl").write_text("\n".join(lines) + "\n")
    claims = course.collect_claims(tmp_path)
    assert [c["key"] for c in claims] == ["05.ate", "06.amp"] and claims[0]["ours"] == 0.5
    assert json.loads((tmp_path / "claims.json").read_text()) == claims
    course.write_index([course.NotebookRun("05_x.ipynb", 1.0, True)], tmp_path, "kvlab/world", claims)
    page = (tmp_path / "index.html").read_text()
    assert "Reproduction scorecard" in page and "1 reproduced, 0 partly reproduced, 1 not reproduced" in page
    assert "amplify &lt;b&gt;" in page


def _notebook_calls(name: str):
    """(notebook, call node) for every call of ``checks.<name>`` in the committed notebooks' code."""
    import ast
    for path in course.notebooks():
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "checks":
                    yield path, node


def test_notebook_claims_have_unique_keys_and_known_references():
    import ast
    from kvlab.reference import PAPER
    keys = []
    for path, call in _notebook_calls("claim"):
        key = call.args[0]
        if isinstance(key, ast.JoinedStr):        # f"08.{role}_loss": check the literal prefix only
            prefix = key.values[0].value if isinstance(key.values[0], ast.Constant) else ""
            assert prefix.startswith(path.name[:2] + "."), (path.name, prefix)
            continue
        assert isinstance(key, ast.Constant) and key.value.startswith(path.name[:2] + "."), (path.name, ast.dump(key))
        keys.append(key.value)
        kw = {k.arg: k.value for k in call.keywords}
        assert "model" in kw, f"{key.value}: pass model= so the claim is strict on the built-in model"
        if "ref" in kw:
            assert kw["ref"].value in PAPER, f"{key.value}: unknown reference {kw['ref'].value!r}"
        else:
            assert "source" in kw, f"{key.value}: cite the paper (ref= or source=)"
    assert keys and len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)


def test_every_notebook_takes_a_dtype():
    for path in course.notebooks():
        assert "DTYPE" in course.parameter_names(path), path.name
        source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert "dtype=DTYPE" in source, f"{path.name}: pass dtype=DTYPE to kvlab.load"
        assert "REFERENCE.md" not in source and "../shared" not in source, path.name


def test_executed_notebook_carries_its_figures(tmp_path, monkeypatch):
    """Under the course runner a plt.show() is an image output of the executed notebook, whatever backend the
    caller's shell exports (Agg would drop it), and save_figures writes it as a PNG."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    src = tmp_path / "nbs"
    src.mkdir()
    params = nbformat.v4.new_code_cell("MODEL = 'x'")
    params.metadata["tags"] = ["parameters"]
    plot = nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()")
    _nb(src / "01_plot.ipynb", [params, plot])
    out = tmp_path / "out"
    r = course.run_notebook(src / "01_plot.ipynb", out, {"MODEL": "kvlab/world"}, progress=False)
    assert r.ok, r.error
    import os
    assert os.environ["MPLBACKEND"] == "Agg"                 # the caller's setting is restored
    nb = nbformat.read(out / "01_plot.ipynb", as_version=4)
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1
    files = course.save_figures(out / "01_plot.ipynb", out / "figures")
    assert len(files) == 1 and files[0].read_bytes()[:4] == b"\x89PNG"        # papermill adds a cell: index varies
    html = course.to_html(out / "01_plot.ipynb").read_text()
    assert "data:image/png;base64" in html


def test_colab_address_in_one_place(tmp_path, monkeypatch):
    """Every committed notebook's badge and clone command come from course.COLAB / REPO_URL; sync rewrites a
    stale copy and check reports it."""
    for p in course.notebooks():
        assert course.address_problems(p) == [], p.name
    import shutil
    folder = tmp_path / "nbs"
    folder.mkdir()
    shutil.copy(course.notebooks(["01"])[0], folder)
    monkeypatch.setattr(course, "REPO_URL", "https://example.org/fork/kvlab")
    monkeypatch.setattr(course, "COLAB", "https://colab.example.org/fork/{name}")
    path = next(folder.glob("*.ipynb"))
    assert len(course.address_problems(path)) == 2 and any("sync" in p for p in course.check(folder))
    assert course.sync(folder) == [path] and course.address_problems(path) == []
    text = path.read_text()
    assert "https://example.org/fork/kvlab" in text and "colab.example.org/fork/" + path.name in text
    assert "github.com/kvlab/kvlab" not in text


def test_no_doc_refers_to_a_file_outside_the_repository():
    """README, CONTRIBUTING and the notebooks name no file the repository does not hold (REFERENCE.md lived
    outside it; ../shared is a workspace folder)."""
    import re
    docs = [course.REPO / "README.md", course.REPO / "CONTRIBUTING.md", *course.notebooks()]
    for path in docs:
        text = path.read_text(encoding="utf-8")
        assert "REFERENCE.md" not in text, path.name
        assert not re.search(r"\.\./(shared|work)|/work/", text), path.name
        # every relative markdown link must point at a file of the repository
        if path.suffix == ".ipynb":
            text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
        for target in re.findall(r"\]\(((?!https?:|#|mailto:)[^)\s]+)\)", text):
            assert (path.parent / target.split("#")[0]).exists(), f"{path.name} links to missing {target}"


def test_scorecard_shows_intervals(tmp_path):
    row = dict(key="08.keys_beat_values", text="keys beat values", ours=0.02, expect="> 0", verdict="reproduced",
               paper="keys > values", source="Qiu", model="kvlab/world", partly=None, ci=[-0.05, 0.09], n=3)
    course.write_index([], tmp_path, "kvlab/world", [row])
    page = (tmp_path / "index.html").read_text()
    assert "0.02 [-0.05, 0.09] (n=3)" in page


def test_load_shows_no_loading_bar_and_restores_the_setting(capfd):
    """No frozen "Loading weights 0%" bar in executed notebooks: kvlab.load turns transformers' bar off while
    loading and restores the caller's setting."""
    import kvlab
    from transformers.utils import logging as hf_logging
    hf_logging.enable_progress_bar()
    kvlab.load()
    err = capfd.readouterr().err
    assert "Loading" not in err and "%|" not in err
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        kvlab.load()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def _tiny(folder, name, *sources, params="MODEL = 'x'\nDEVICE = 'cpu'"):
    """A throwaway course notebook: a parameters cell, then one code cell per source."""
    folder.mkdir(exist_ok=True)
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    _nb(folder / name, [nbformat.v4.new_markdown_cell("# tiny"), cell,
                        *(nbformat.v4.new_code_cell(s) for s in sources)])
    return folder / name


def _code_outputs(path):
    nb = nbformat.read(path, as_version=4)
    return {c.source: c.get("outputs", []) for c in nb.cells if c.cell_type == "code"}


@pytest.fixture
def run_env(monkeypatch):
    """course.run sets variables for its kernels in os.environ: put them back after the test."""
    for name in ("KVLAB_CLAIMS", "KVLAB_CLAIMS_STRICT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def test_keep_going_reports_every_failing_cell(tmp_path, run_env):
    """--keep-going runs every cell after an error and reports each failing cell (index in the notebook as
    written, exception, message, source); without it the notebook stops at its first failure, as before."""
    import json
    src = tmp_path / "nbs"
    _tiny(src, "01_ok.ipynb", "x = 1")
    _tiny(src, "02_bad.ipynb", "x = 1", "raise ValueError('first <failure>')", "y = 2", "raise KeyError('second')",
          "print('the end')")
    for keep_going, out in ((True, tmp_path / "all"), (False, tmp_path / "first")):
        runs = course.run(out_dir=out, progress=False, html_out=False, folder=src, keep_going=keep_going)
        ok, bad = runs
        assert ok.ok and ok.failures == [] and not bad.ok
        cells = [(f["cell"], f["ename"]) for f in bad.failures]
        assert cells == ([(3, "ValueError"), (5, "KeyError")] if keep_going else [(3, "ValueError")])
        assert bad.cell == 3 and "ValueError: first <failure>" in bad.error and "raise ValueError" in bad.error
        assert bad.failures[0]["source"] == "raise ValueError('first <failure>')"
        outputs = _code_outputs(out / "02_bad.ipynb")
        assert bool(outputs["print('the end')"]) == keep_going          # later cells ran only with keep_going
        assert not any(course.PROBE_TAG in c.metadata.get("tags", [])   # the probe is not in the executed copy
                       for c in nbformat.read(out / "02_bad.ipynb", as_version=4).cells)
        times = json.loads((out / "times.json").read_text())
        assert [[f["ename"] for f in t["failures"]] for t in times] == [[], [e for _, e in cells]]
        page = (out / "index.html").read_text()
        assert "first &lt;failure&gt;" in page and ("KeyError" in page) == keep_going
        assert ("every cell run after a failure" in page) == keep_going


def test_main_options(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(course, "run", lambda *a, **kw: seen.update(kw) or [course.NotebookRun("x", 1.0, False)])
    assert course.main(["run", "--all-errors", "--cell-timeout", "5", "--quick", "--no-grade-claims"]) == 1
    assert seen == dict(keep_going=True, cell_timeout=5, quick=True, grade_claims=False)
    assert course.main(["run", "--cell-timeout", "0"]) == 1
    assert seen == dict(keep_going=False, cell_timeout=None, quick=False, grade_claims=None)
    with pytest.raises(SystemExit, match="--cell-timeout must be >= 0"):
        course.main(["run", "--cell-timeout", "-1"])


def test_cell_timeout_is_a_failure(tmp_path):
    """A cell over --cell-timeout is interrupted and reported (CellTimeoutError); with keep_going the next cells
    run, without it they are skipped. The run does not hang."""
    import time
    path = _tiny(tmp_path / "nbs", "01_slow.ipynb", "import time\ntime.sleep(60)", "print('after')")
    for keep_going in (True, False):
        t0 = time.perf_counter()
        r = course.run_notebook(path, tmp_path / f"out{keep_going}", {"MODEL": "m"}, progress=False,
                                keep_going=keep_going, cell_timeout=2)
        assert time.perf_counter() - t0 < 30
        assert not r.ok and [(f["cell"], f["ename"], f["timed_out"]) for f in r.failures] == \
            [(2, "CellTimeoutError", True)]
        assert "still running after 2 s" in r.error and "time.sleep(60)" in r.error
        outputs = _code_outputs(tmp_path / f"out{keep_going}" / path.name)
        assert bool(outputs["print('after')"]) == keep_going
        assert any("--cell-timeout" in o.get("text", "") for o in outputs["import time\ntime.sleep(60)"])


def test_probe_reports_device_dtype_and_memory(tmp_path):
    """The runner's probe cell reads the model's device and dtype (and CUDA's peak memory) in the kernel, after a
    failed cell too, and is removed from the executed notebook; on CPU the index shows "—"."""
    import torch
    path = _tiny(tmp_path / "nbs", "01_model.ipynb",
                 "import torch\nmodel = torch.nn.Linear(4, 4).to(torch.float16)", "raise RuntimeError('late')")
    r = course.run_notebook(path, tmp_path / "out", {"MODEL": "m", "DEVICE": "cpu"}, progress=False)
    assert not r.ok and r.failures[0]["ename"] == "RuntimeError"
    assert (r.device, r.dtype, r.peak_allocated) == ("cpu", "float16", None)
    text = (tmp_path / "out" / path.name).read_text()
    assert "KVLAB_PROBE" not in text and "_kvlab_probe" not in text
    course.write_index([r], tmp_path / "out", "kvlab/world")
    page = (tmp_path / "out" / "index.html").read_text()
    assert "dtype <code>float16</code>" in page and "<td>—</td>" in page and "device\n<code>cpu</code>" in page
    gpu = course.NotebookRun("05_x.ipynb", 1.0, True, device="cuda:0 (NVIDIA H200)", dtype="bfloat16",
                             peak_allocated=2**30, peak_reserved=3 * 2**29)
    assert course._memory(gpu) == "1.00 / 1.50 GiB"
    gpu.peak_allocated, gpu.peak_reserved = 37448704, 37748736
    assert course._memory(gpu) == "36 / 36 MiB"
    if torch.cuda.is_available():   # on a GPU machine: the kernel's own peak
        path = _tiny(tmp_path / "nbs", "02_cuda.ipynb", "import torch\nmodel = torch.nn.Linear(1024, 1024).cuda()")
        r = course.run_notebook(path, tmp_path / "out", {"MODEL": "m"}, progress=False)
        assert r.ok and r.device.startswith("cuda:0 (") and r.dtype == "float32"
        assert r.peak_allocated >= 1024 * 1024 * 4 and r.peak_reserved >= r.peak_allocated


def _literal_defaults(path):
    """name -> default value of a notebook's parameters cell."""
    import ast
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    return {t.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body
            if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def test_quick_profile_covers_every_notebook_with_smaller_sizes():
    paths = course.notebooks()
    sizes = course.quick_parameters(paths)          # every name is declared by its notebook
    assert set(course.QUICK) == {p.name[:2] for p in paths}
    for path in paths:
        defaults = _literal_defaults(path)
        for name, quick in sizes[path].items():
            default = defaults[name]
            if isinstance(quick, list):             # a sweep: >= 2 points, each no larger than the default's
                assert len(quick) >= 2 and max(quick) < max(default), (path.name, name)
            elif default is None:                   # a notebook default (e.g. V_STEPS): any small number
                assert isinstance(quick, int) and quick >= 2, (path.name, name)
            else:                                   # >= 2 items (an interval, a mean over seeds)
                assert 2 <= quick < default, (path.name, name, quick, default)
    with pytest.raises(SystemExit, match="quick profile of 01_.*NOT_THERE not in its parameters cell"):
        course.quick_parameters(course.notebooks(["01"]), {"01": {"NOT_THERE": 1}})


def test_quick_profile_sizes_overrides_and_ungraded_claims(tmp_path, monkeypatch, run_env):
    """--quick gives each notebook its profile's sizes, -p overrides them, and the kernels run claims ungraded
    (KVLAB_CLAIMS_STRICT=0), which index.html states; the default run grades them."""
    import json
    src = tmp_path / "nbs"
    show = "import os\nprint('N', N, 'M', M, 'strict', os.environ.get('KVLAB_CLAIMS_STRICT'))"
    _tiny(src, "01_a.ipynb", show, params="MODEL = 'x'\nDEVICE = 'cpu'\nN = 100\nM = 50")
    monkeypatch.setattr(course, "QUICK", {"01": {"N": 3, "M": 2}})
    assert not course.grades_claims(False, {"DTYPE": "float16"}) and not course.grades_claims(True, {})
    assert course.grades_claims(False, {"DTYPE": "float32"}) and course.grades_claims(False, {}, "cpu")
    assert not course.grades_claims(False, {}, "cuda")   # auto is float16 on a GPU
    cases = [(dict(quick=True, extra={"M": 7}), "N 3 M 7 strict 0", False),
             (dict(), "N 100 M 50 strict 1", True),
             (dict(quick=True, grade_claims=True), "N 3 M 2 strict 1", True)]
    for k, (kw, printed, graded) in enumerate(cases):
        out = tmp_path / f"out{k}"
        [r] = course.run(out_dir=out, progress=False, html_out=False, folder=src, **kw)
        assert r.ok, r.error
        assert printed in "".join(o.get("text", "") for o in _code_outputs(out / "01_a.ipynb")[show])
        page = (out / "index.html").read_text()
        assert ("claims recorded, not graded" in page) != graded
        assert ("quick profile" in page) == bool(kw.get("quick"))
        parameters = json.loads((out / "times.json").read_text())[0]["parameters"]
        assert parameters.get("N") == (3 if kw.get("quick") else None)
    import os
    assert "KVLAB_CLAIMS_STRICT" not in os.environ      # restored after the run


# ---------------------------------------------------------------------------------------------
# Arguments are checked before the disk is touched; the course itself is never overwritten


def test_parameter_values_papermill_cannot_pass_are_rejected(tmp_path):
    """papermill writes a tuple, set, bytes or complex value (also nested) into the notebook as its str(): the
    notebook would get "(2, 3)" while times.json records [2, 3]. Such a value is refused, naming the parameter."""
    a = _params_nb(tmp_path, "01_a.ipynb", "MODEL = 'x'\nCOUNTS = [1, 2]\nOPTS = {}")
    for value in [(2, 3), [1, (2, 3)], {1, 2}, b"x", 1j, [[1, {"a": (1,)}]], {"k": b"v"}, {1: "a"},
                  float("inf"), [float("nan")]]:
        with pytest.raises(SystemExit, match=r"parameter COUNTS = .*holds .*A notebook parameter is one of int, "
                                             r"float \(finite\), str, bool, None"):
            course.notebook_parameters([a], {"COUNTS": value})
    ok = {"COUNTS": [1, [2, 3], None, True, 0.5], "OPTS": {"a": [1, {"b": "c"}], "d": None}, "MODEL": "m"}
    assert course.notebook_parameters([a], ok)[a] == ok
    with pytest.raises(SystemExit, match=r"parameter COUNTS = \[1, \(2, 3\)\].*tuple.*write a list"):
        course.main(["run", "--no-html", "--out", str(tmp_path / "out"), "-p", "COUNTS", "[1, (2, 3)]"])
    assert not (tmp_path / "out").exists()


def test_notebook_gets_exactly_the_recorded_parameters_and_index_names_its_model(tmp_path, run_env):
    """What times.json records is what the kernel received, nested values too; index.html names the model the
    notebooks got (-p MODEL), not --model."""
    import json
    src = tmp_path / "nbs"
    show = "import json\nprint('GOT', json.dumps([MODEL, COUNTS, OPTS]))"
    _tiny(src, "01_a.ipynb", show, params="MODEL = 'x'\nDEVICE = 'cpu'\nCOUNTS = [1]\nOPTS = {}")
    extra = {"MODEL": "kvlab/world-variant", "COUNTS": [1, [2, 3], None, True, 0.25, "é\"\\"],
             "OPTS": {"a": [1, {"b": "c d"}], "e": None}}
    out = tmp_path / "out"
    [r] = course.run(out_dir=out, progress=False, html_out=False, folder=src, extra=extra)
    assert r.ok, r.error
    text = "".join(o.get("text", "") for o in _code_outputs(out / "01_a.ipynb")[show])
    got = json.loads(text.split("GOT ", 1)[1])
    recorded = json.loads((out / "times.json").read_text())[0]["parameters"]
    assert got == [recorded["MODEL"], recorded["COUNTS"], recorded["OPTS"]] \
        == [extra["MODEL"], extra["COUNTS"], extra["OPTS"]]
    page = (out / "index.html").read_text()
    assert "on model <code>kvlab/world-variant</code>" in page


def test_out_may_not_be_the_notebooks_folder(tmp_path, monkeypatch, run_env):
    """An --out that is the folder of the notebooks would replace each notebook by its executed copy (solutions
    in place of the stubs): refused before anything runs or is written."""
    src = tmp_path / "nbs"
    path = _tiny(src, "01_a.ipynb", "x = 1")
    before = path.read_bytes()
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    for out in (src, src / ".", tmp_path / "link", tmp_path / "nbs" / ".." / "nbs"):
        with pytest.raises(SystemExit, match=r"--out .* is the notebooks folder .*nbs.*would overwrite"):
            course.run(out_dir=out, progress=False, html_out=False, folder=src)
    with pytest.raises(SystemExit, match="holds the notebook 01_a.ipynb itself"):
        course.run_notebook(path, src, {"MODEL": "m"}, progress=False)
    assert path.read_bytes() == before and sorted(p.name for p in src.iterdir()) == ["01_a.ipynb"]

    # the CLI with the course's own folder (nothing may run: run_notebook would overwrite a course notebook)
    def must_not_run(*a, **kw):
        raise AssertionError("run_notebook called: the course notebook would be overwritten")
    monkeypatch.setattr(course, "run_notebook", must_not_run)
    monkeypatch.chdir(course.REPO)
    with pytest.raises(SystemExit, match=r"--out notebooks is the notebooks folder"):
        course.main(["run", "--only", "01", "--out", "notebooks", "--no-html"])
    assert not (course.NOTEBOOKS / "claims.jsonl").exists()


def test_rejected_run_leaves_out_as_it_was(tmp_path, run_env):
    """Arguments are checked before the disk is touched: a rejected -p leaves the last run's claims.jsonl and
    creates no folder; a file as --out is a SystemExit with a message, not a FileExistsError."""
    src = tmp_path / "nbs"
    _tiny(src, "01_a.ipynb", "x = 1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "claims.jsonl").write_text('{"key": "01.x"}\n')
    for extra in ({"NOT_A_PARAM": 1}, {"MODEL": (1, 2)}):
        with pytest.raises(SystemExit, match="unknown parameter|holds a tuple"):
            course.run(out_dir=out, progress=False, html_out=False, folder=src, extra=extra)
        assert (out / "claims.jsonl").read_text() == '{"key": "01.x"}\n'
        with pytest.raises(SystemExit):
            course.run(out_dir=tmp_path / "new", progress=False, html_out=False, folder=src, extra=extra)
        assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit, match="no notebook matches"):
        course.run(["07"], out_dir=tmp_path / "new", progress=False, html_out=False, folder=src)
    assert not (tmp_path / "new").exists()
    file = tmp_path / "a_file"
    file.write_text("keep me")
    for target in (file, file / "sub"):
        with pytest.raises(SystemExit, match=r"--out .*a_file is a file, not a folder"):
            course.run(out_dir=target, progress=False, html_out=False, folder=src)
    assert file.read_text() == "keep me"
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        course.main(["run", "--only", "00", "--out", str(file)])


def test_only_needs_a_full_notebook_number():
    """"0" is a prefix of 00-09, not a notebook: it matches nothing (it used to run all ten); every item of --only
    must name a notebook."""
    names = [p.name for p in course.notebooks()]
    with pytest.raises(SystemExit, match=r"no notebook matches '0' .*available: " + names[0]):
        course.notebooks(["0"])
    with pytest.raises(SystemExit, match=r"no notebook matches '99'"):
        course.notebooks(["01", "99"])
    first = course.notebooks()[1]
    for spec in ("01", first.stem, first.name, f"notebooks/{first.name}", first.stem[:4]):
        assert course.notebooks([spec]) == [first], spec
    assert [p.name[:2] for p in course.notebooks(["05", "01"])] == ["01", "05"]
