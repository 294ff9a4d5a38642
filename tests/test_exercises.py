"""The exercise checkers (kvlab.exercises) accept the solutions in notebooks/solutions/ and reject typical
wrong answers with a message that names the mistake, on the built-in model and on tiny random models; the
course runner puts the solutions in place of the stubs; every stub in the notebooks has a solution."""
import re
from pathlib import Path

import nbformat
import pytest
import torch

import kvlab
from kvlab import course, exercises
from kvlab.exercises import ExerciseError
from kvlab.testing import tiny

SOLUTIONS = course.NOTEBOOKS / "solutions"


def solution(ex_id: str):
    """The function that the solution of exercise ``ex_id`` defines (run as the notebook would)."""
    text = (SOLUTIONS / f"{ex_id[:2]}.py").read_text()
    parts = re.split(r"^# %% exercise (\S+)[ \t]*\n", text, flags=re.M)
    code = dict(zip(parts[1::2], parts[2::2]))[ex_id]
    ns = {}
    exec(compile(code, f"solutions/{ex_id[:2]}.py", "exec"), ns)
    fns = [v for v in ns.values() if getattr(v, "__code__", None) is not None]
    assert len(fns) == 1, f"solution {ex_id} should define one function"
    return fns[0]


@pytest.fixture(scope="module")
def world():
    return kvlab.load()


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


@pytest.fixture(scope="module")
def neox():
    return tiny("gpt_neox")


def _stub(*args, **kwargs):
    raise NotImplementedError("exercise: fill me in")


# --- every checker accepts its solution --------------------------------------------------------------


@pytest.mark.parametrize("ex_id", sorted(exercises.CHECKERS))
def test_solution_passes_on_the_builtin_model(ex_id, world, capsys):
    model, tok, _ = world
    assert exercises.CHECKERS[ex_id](solution(ex_id), model, tok) is True
    assert f"exercise {ex_id}" in capsys.readouterr().out


@pytest.mark.parametrize("ex_id", sorted(exercises.CHECKERS))
@pytest.mark.parametrize("family", ["llama", "neox"])
def test_solution_passes_on_tiny_models(ex_id, family, request):
    model, tok, _ = request.getfixturevalue(family)
    assert exercises.CHECKERS[ex_id](solution(ex_id), model, tok) is True


@pytest.mark.parametrize("ex_id", sorted(exercises.CHECKERS))
def test_solution_passes_in_bfloat16(ex_id):
    """Tolerances follow the dtype (notebooks 01, 03 and 05 run in bfloat16 in `make course-lowp`)."""
    model, tok, _ = tiny("llama")
    assert exercises.CHECKERS[ex_id](solution(ex_id), model.to(torch.bfloat16), tok) is True


@pytest.mark.parametrize("ex_id", sorted(exercises.CHECKERS))
def test_unfilled_stub_is_not_done_and_does_not_raise(ex_id, llama, capsys):
    model, tok, _ = llama
    assert exercises.CHECKERS[ex_id](_stub, model, tok) is False
    assert "not done yet" in capsys.readouterr().out


# --- typical wrong answers are named -----------------------------------------------------------------


def test_coefficients_mistakes(world, llama):
    ok = solution("01.1")
    model, tok, arch = world
    no_act = lambda arch, l, x: x @ arch.key_matrix(l).T + arch.key_biases(l)[0]  # noqa: E731
    with pytest.raises(ExerciseError, match="forgot the activation"):
        exercises.check_coefficients(no_act, model, tok)
    no_bias = lambda arch, l, x: arch.act(l)(x @ arch.key_matrix(l).T)  # noqa: E731
    with pytest.raises(ExerciseError, match="forgot the key bias"):
        exercises.check_coefficients(no_bias, model, tok)
    gate_only = lambda arch, l, x: arch.act(l)(x @ arch.key_matrix(l).T)  # noqa: E731
    with pytest.raises(ExerciseError, match="gate only"):
        exercises.check_coefficients(gate_only, *llama[:2])
    with pytest.raises(ExerciseError, match=r"shape .* expected"):
        exercises.check_coefficients(lambda arch, l, x: ok(arch, l, x)[..., :-1], model, tok)


def test_ffn_by_hand_mistakes(world):
    model, tok, _ = world
    with pytest.raises(ExerciseError, match="forgot the value bias"):
        exercises.check_ffn_by_hand(lambda arch, l, m: m @ arch.value_matrix(l), model, tok)
    ok = solution("01.2")
    with pytest.raises(ExerciseError, match="off by a constant factor"):
        exercises.check_ffn_by_hand(lambda arch, l, m: 2 * ok(arch, l, m), model, tok)


def test_top_triggers_mistakes(world, neox):
    ok = solution("02.1")
    model, tok, _ = world

    def ascending(model, tok, texts, layer, key, k=5):
        return ok(model, tok, texts, layer, key, k)[::-1]
    with pytest.raises(ExerciseError, match="best first"):
        exercises.check_top_triggers(ascending, model, tok)

    def padded(model, tok, texts, layer, key, k=5):   # a position past the end of sentence 0
        n = len(tok(texts[0])["input_ids"])
        return [(0, n + 3, 0.0)] + ok(model, tok, texts, layer, key, k)[1:]
    with pytest.raises(ExerciseError, match="is padding"):
        exercises.check_top_triggers(padded, model, tok)

    def first_texts_only(model, tok, texts, layer, key, k=5):
        return ok(model, tok, texts[:3], layer, key, k)
    with pytest.raises(ExerciseError, match="corpus has a prefix"):
        exercises.check_top_triggers(first_texts_only, model, tok)


def test_project_value_mistakes(world, llama):
    model, tok, _ = world
    no_norm = lambda arch, l, i: arch.unembed(arch.value_matrix(l)[i][None])[0]  # noqa: E731
    with pytest.raises(ExerciseError, match="skipped the final layer norm"):
        exercises.check_project_value(no_norm, model, tok)
    with pytest.raises(ExerciseError, match="skipped the final layer norm"):
        exercises.check_project_value(no_norm, *llama[:2])
    key = lambda arch, l, i: arch.unembed(arch.final_norm(arch.key_matrix(l)[i][None]))[0]  # noqa: E731
    with pytest.raises(ExerciseError, match="projected the key"):
        exercises.check_project_value(key, model, tok)


def test_classify_update_mistakes(world):
    model, tok, _ = world
    with pytest.raises(ExerciseError, match="return one of"):
        exercises.check_classify_update(lambda model, tok, p, l: "composition", model, tok)
    with pytest.raises(ExerciseError, match="expected 'compose'|expected 'override'"):
        exercises.check_classify_update(lambda model, tok, p, l: "keep", model, tok)


def test_restored_prob_mistakes(world):
    ok = solution("05.1")
    model, tok, _ = world

    def no_restore(model, tok, prompt, subject, answer_id, noise, eps, token, layer):
        return _corrupted(model, tok, prompt, subject, answer_id, noise, eps)
    with pytest.raises(ExerciseError, match="not restored"):
        exercises.check_restored_prob(no_restore, model, tok)
    with pytest.raises(ExerciseError, match="equals the clean p"):
        exercises.check_restored_prob(lambda *a: ok(*a[:5], 0.0, *a[6:]), model, tok)


def _corrupted(model, tok, prompt, subject, answer_id, noise, eps):
    """p(answer) with the subject corrupted and nothing restored."""
    arch = kvlab.adapter(model)
    batch = kvlab.text.encode(model, tok, prompt)
    b, e = kvlab.text.subject_token_range(tok, prompt, subject)

    def corrupt(x):
        x = x.clone()
        x[:, b:e] += noise * eps.to(x.dtype)
        return x
    with torch.no_grad(), kvlab.hooks.patch(arch.embed, corrupt):
        logits = model(input_ids=batch.input_ids.repeat(eps.shape[0], 1)).logits[:, -1]
    return float(logits.float().softmax(-1)[:, answer_id].mean())


def test_integrated_gradients_mistakes(world):
    ok = solution("06.1")
    model, tok, _ = world
    with pytest.raises(ExerciseError, match="summed the gradients"):
        exercises.check_integrated_gradients(lambda *a: ok(*a) * a[-1], model, tok)

    def left(model, tok, prompt, answer, layer, neuron, steps):
        return exercises._ig_variant(model, tok, prompt, answer, layer, neuron, [k / steps for k in range(steps)])
    with pytest.raises(ExerciseError, match="left Riemann"):
        exercises.check_integrated_gradients(left, model, tok)


def test_rome_update_mistakes(world, llama):
    model, tok, _ = world

    def no_C(V, b, C, k, v):
        return torch.outer(k, (v - V.T @ k - b) / (k @ k))
    with pytest.raises(ExerciseError, match="left out C"):
        exercises.check_rome_update(no_C, model, tok)

    def no_bias(V, b, C, k, v):
        u = torch.linalg.solve(C, k)
        return torch.outer(u, (v - V.T @ k) / (u @ k))
    with pytest.raises(ExerciseError, match="bias is missing"):
        exercises.check_rome_update(no_bias, model, tok)
    with pytest.raises(ExerciseError, match="transpose"):
        exercises.check_rome_update(lambda *a: solution("07.1")(*a).T, *llama[:2])


def test_memit_update_mistakes(world):
    model, tok, _ = world
    with pytest.raises(ExerciseError, match="left out C"):
        exercises.check_memit_update(lambda K, R, C, lam: torch.linalg.solve(
            lam * torch.eye(C.shape[0], dtype=C.dtype) + K.T @ K, K.T @ R), model, tok)
    with pytest.raises(ExerciseError, match="one key at a time"):
        exercises.check_memit_update(lambda K, R, C, lam: sum(
            torch.outer(torch.linalg.solve(C, k), r) / (k @ torch.linalg.solve(C, k)) for k, r in zip(K, R)),
            model, tok)


def test_lora_targets_mistakes(world):
    model, tok, _ = world

    def leaves(arch, role):
        return list(arch.key_names() if role == "keys" else arch.value_names())
    with pytest.raises(ExerciseError, match="ambiguous"):
        exercises.check_lora_targets(leaves, model, tok)

    def first_key_only(arch, role):
        f = arch.family
        leaf = f.keys[0] if role == "keys" else f.value
        return [f"{f.layers}.{l}.{f.mlp}.{leaf}" for l in range(arch.n_layers)]
    with pytest.raises(ExerciseError, match="two key matrices"):
        exercises.check_lora_targets(first_key_only, model, tok)

    def swapped(arch, role):
        return solution("08.1")(arch, "values" if role == "keys" else "keys")
    with pytest.raises(ExerciseError, match="these are the values"):
        exercises.check_lora_targets(swapped, model, tok)


def test_checker_needs_a_function(world):
    with pytest.raises(ExerciseError, match="pass your function"):
        exercises.check_ffn_by_hand(None, *world[:2])


# --- the course runner and the notebooks -------------------------------------------------------------


def _toy(tmp_path, stubs: dict[str, str], solutions: str | None):
    nbs = tmp_path / "nbs"
    (nbs / "solutions").mkdir(parents=True)
    cells = [nbformat.v4.new_code_cell("MODEL = 'x'")]
    cells[0].metadata["tags"] = ["parameters"]
    for ex_id, src in stubs.items():
        c = nbformat.v4.new_code_cell(src)
        c.metadata.update(tags=["exercise"], exercise=ex_id)
        cells += [c, nbformat.v4.new_code_cell("print('answer', answer())")]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nb, nbs / "01_toy.ipynb")
    if solutions is not None:
        (nbs / "solutions" / "01.py").write_text(solutions)
    return nbs / "01_toy.ipynb"


def test_with_solutions_replaces_only_the_stubs(tmp_path):
    path = _toy(tmp_path, {"01.1": "def answer():\n    raise NotImplementedError('exercise 1.1')"},
                '"""header"""\n\n# %% exercise 01.1\ndef answer():\n    return 42\n')
    out = course.with_solutions(path, tmp_path / "filled" / path.name)
    cells = nbformat.read(out, as_version=4).cells
    assert cells[1].source == "def answer():\n    return 42"
    assert cells[0].source == "MODEL = 'x'" and cells[2].source == "print('answer', answer())"
    assert "NotImplementedError" in nbformat.read(path, as_version=4).cells[1].source   # the original is kept


def test_with_solutions_names_missing_and_unused(tmp_path):
    path = _toy(tmp_path, {"01.1": "pass", "01.2": "pass"}, "# %% exercise 01.1\nx = 1\n# %% exercise 01.3\ny = 2\n")
    with pytest.raises(SystemExit, match=r"without a solution .*\['01.2'\].*without a stub: \['01.3'\]"):
        course.with_solutions(path, tmp_path / "out.ipynb")


def test_run_notebook_with_solutions(tmp_path):
    path = _toy(tmp_path, {"01.1": "def answer():\n    raise NotImplementedError('exercise 1.1')"},
                "# %% exercise 01.1\ndef answer():\n    return 42\n")
    r = course.run_notebook(path, tmp_path / "out", {"MODEL": "kvlab/world"}, progress=False, solutions=True)
    assert r.ok, r.error
    text = (tmp_path / "out" / path.name).read_text()
    assert "answer 42" in text
    r = course.run_notebook(path, tmp_path / "out2", {"MODEL": "kvlab/world"}, progress=False, solutions=False)
    assert not r.ok and "NotImplementedError" in r.error


def _exercise_cells():
    for p in course.notebooks():
        nb = nbformat.read(p, as_version=4)
        for i, c in enumerate(nb.cells):
            if "exercise" in c.metadata.get("tags", []):
                yield p, i, c, nb


def test_every_notebook_from_01_has_exercises_with_solutions_and_checks(tmp_path):
    by_nb = {}
    for p, i, c, nb in _exercise_cells():
        ex_id = c.metadata.get("exercise")
        assert ex_id and ex_id.startswith(p.name[:2] + "."), f"{p.name} cell {i}: exercise id {ex_id!r}"
        assert "NotImplementedError" in c.source, f"{p.name} {ex_id}: the stub must raise NotImplementedError"
        check = nb.cells[i + 1].source
        checker = exercises.CHECKERS[ex_id].__name__
        assert f"exercises.{checker}(" in check, f"{p.name} {ex_id}: the cell after the stub must call {checker}"
        by_nb.setdefault(p.name, []).append(ex_id)
    assert sorted(n[:2] for n in by_nb) == [f"{i:02d}" for i in range(1, 10)]
    assert sorted(x for v in by_nb.values() for x in v) == sorted(exercises.CHECKERS)
    for name in by_nb:     # every stub has a solution, every solution a stub (else SystemExit)
        course.with_solutions(course.NOTEBOOKS / name, tmp_path / name)


def test_stub_defines_the_function_the_check_cell_uses():
    for p, i, c, nb in _exercise_cells():
        ex_id = c.metadata["exercise"]
        stub_names = set(re.findall(r"^def (\w+)\(", c.source, flags=re.M))
        sol_names = {solution(ex_id).__name__}
        assert stub_names == sol_names, f"{p.name} {ex_id}: stub defines {stub_names}, solution {sol_names}"
        assert re.search(rf"exercises\.\w+\({solution(ex_id).__name__}\b", nb.cells[i + 1].source)
