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
