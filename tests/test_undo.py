"""WeightEdit.undo/apply never write wrong weights: overlapping edits undo in reverse order, else a clear error."""
import random

import pytest
import torch

from kvlab.editing import EditRequest, apply_rome, current_answer, key_covariance, same_weights, snapshot
from kvlab.editing.base import EditStateError, recording
from kvlab.testing import WORDS, tiny


@pytest.fixture
def gpt2():
    return tiny("gpt2")


def _edit(model, name, fn, method):
    """A cheap edit: ``fn`` changes parameter ``name`` in place."""
    with torch.no_grad(), recording(model, [name], method=method) as edit:
        fn(model.get_parameter(name))
    return edit


def _value_weight(arch, layer):
    return f"{arch.module_name(arch.value_module(layer))}.weight"


def test_overlapping_edits_undo_in_reverse_order_only(gpt2):
    model, _, arch = gpt2
    name = _value_weight(arch, 1)
    before = snapshot(model)
    e1 = _edit(model, name, lambda p: p.add_(1.0), "first")
    e2 = _edit(model, name, lambda p: p.mul_(2.0), "second")
    both = snapshot(model, [name])
    with pytest.raises(RuntimeError, match=r"cannot undo first edit #\d+.*undo second edit #\d+ first") as err:
        e1.undo()                                     # e2 is applied on top of e1
    assert isinstance(err.value, EditStateError)
    assert same_weights(model, both) and e1.applied and e2.applied     # nothing written
    e2.undo()
    e1.undo()
    assert same_weights(model, before)                # bit-for-bit (torch.equal) the original
    assert not e1.applied and not e2.applied
    # re-applying goes in the order the edits were made
    with pytest.raises(EditStateError, match=r"cannot apply second edit #\d+.*apply first edit #\d+ first"):
        e2.apply()
    assert same_weights(model, before)
    e1.apply()
    e2.apply()
    assert same_weights(model, both)
    # the context-manager form checks too: leaving `with e1` while e2 is still applied raises
    with pytest.raises(EditStateError, match="undo second edit"):
        with e1:
            pass
    assert same_weights(model, both)
    with e2:                                          # applied already: undone on exit
        pass
    with e1:
        with e2:
            assert same_weights(model, both)
        assert not same_weights(model, before)
    assert same_weights(model, before)


def test_disjoint_edits_undo_in_any_order(gpt2):
    model, _, arch = gpt2
    before = snapshot(model)
    e1 = _edit(model, _value_weight(arch, 0), lambda p: p.add_(1.0), "a")
    e2 = _edit(model, _value_weight(arch, 1), lambda p: p.add_(1.0), "b")
    e1.undo()
    e2.undo()
    assert same_weights(model, before)


def test_weights_changed_outside_an_edit_are_not_overwritten(gpt2):
    model, _, arch = gpt2
    name = _value_weight(arch, 2)
    edit = _edit(model, name, lambda p: p.add_(1.0), "e")
    with torch.no_grad():
        model.get_parameter(name)[0, 0] += 1.0        # e.g. a training step
    changed = snapshot(model, [name])
    with pytest.raises(EditStateError, match="changed by something else"):
        edit.undo()
    assert same_weights(model, changed) and edit.applied


def test_nan_weights_still_undo_bit_for_bit(gpt2):
    model, _, arch = gpt2
    name = _value_weight(arch, 1)
    before = snapshot(model)
    edit = _edit(model, name, lambda p: p.fill_(float("nan")), "diverged")
    edit.undo()                                       # NaN == NaN bitwise: the edit's own state
    assert same_weights(model, before)
    edit.apply()
    assert torch.isnan(model.get_parameter(name)).all()
    edit.undo()
    assert same_weights(model, before)


def test_two_rome_edits_same_layer():
    model, tok, _ = tiny("gpt2")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(60)]
    C = key_covariance(model, tok, 1, texts=texts, cache=False, progress=False)
    kw = dict(layer=1, cov=C, templates=["{}", "one two three. {}"], v_steps=10, check=False)
    prompts = ["the city of anna berg", "the city of tom lee"]
    old = [current_answer(model, tok, p) for p in prompts]
    new = [next(w for w in ("rome", "paris", "berlin") if w != o) for o in old]
    before = snapshot(model)
    e1 = apply_rome(model, tok, EditRequest("the city of {}", "anna berg", new[0]), **kw)
    e2 = apply_rome(model, tok, EditRequest("the city of {}", "tom lee", new[1]), **kw)
    edited = snapshot(model)
    with pytest.raises(EditStateError, match=r"cannot undo ROME edit #\d+ \('the city of anna berg'.*"
                                             r"undo ROME edit #\d+ \('the city of tom lee'"):
        e1.undo()
    assert same_weights(model, edited)
    e2.undo()
    e1.undo()
    assert same_weights(model, before)
    assert [current_answer(model, tok, p) for p in prompts] == old


def _interrupt_copy_after(monkeypatch, params, calls: int, exc=KeyboardInterrupt):
    """Make the ``calls``-th copy into one of ``params`` write, then raise ``exc`` (an interrupt that lands right
    after a parameter was written); every other copy works."""
    original = torch.Tensor.copy_
    ids = {id(p) for p in params}
    seen = []

    def copy_(self, src, *a, **kw):
        out = original(self, src, *a, **kw)
        if id(self) in ids:
            seen.append(1)
            if len(seen) == calls:
                raise exc("interrupted mid-way")
        return out
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_undo_and_apply_are_all_or_nothing(gpt2, exc):
    """An undo or apply interrupted between parameters (a 3-layer edit, like MEMIT's) puts back what it wrote:
    the edit stays in its state with its weights whole, so undo/apply work afterwards."""
    model, _, arch = gpt2
    names = [_value_weight(arch, layer) for layer in range(3)]
    before = snapshot(model)
    with torch.no_grad(), recording(model, names, method="MEMIT-like") as edit:
        for n in names:
            model.get_parameter(n).add_(0.5)
    edited = snapshot(model)
    params = [model.get_parameter(n) for n in names]
    for calls in (1, 2, 3):
        with pytest.MonkeyPatch.context() as mp, pytest.raises(exc, match="interrupted mid-way"):
            _interrupt_copy_after(mp, params, calls, exc)
            edit.undo()
        assert same_weights(model, edited) and edit.applied, calls      # nothing half-restored
    edit.undo()
    assert same_weights(model, before) and not edit.applied
    for calls in (1, 2, 3):
        with pytest.MonkeyPatch.context() as mp, pytest.raises(exc, match="interrupted mid-way"):
            _interrupt_copy_after(mp, params, calls, exc)
            edit.apply()
        assert same_weights(model, before) and not edit.applied, calls
    edit.apply()
    assert same_weights(model, edited)
    edit.undo()
    assert same_weights(model, before)


def test_undo_after_a_dtype_change_names_it(gpt2):
    """After model.half() the weights differ from the edit's float32 copies because of the conversion, not
    training: the message says so (from -> to), and nothing is written."""
    model, _, arch = gpt2
    name = _value_weight(arch, 1)
    edit = _edit(model, name, lambda p: p.add_(1.0), "e")
    model.half()
    halved = snapshot(model)
    with pytest.raises(EditStateError, match=rf"cannot undo e edit #\d+: {name} changed dtype from float32 to "
                                             r"float16 .*model.half\(\).*Nothing was changed") as err:
        edit.undo()
    assert "training" not in str(err.value)
    assert same_weights(model, halved) and edit.applied
