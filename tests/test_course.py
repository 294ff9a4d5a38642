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
