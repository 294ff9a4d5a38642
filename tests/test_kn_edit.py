"""Knowledge-neuron edit: value vectors move by λ(E[new] − E[old]); nothing else; exact undo."""
import importlib.util

import pytest
import torch

from kvlab.editing import EditRequest, current_answer, same_weights, snapshot
from kvlab.editing.kn import answer_embedding, kn_edit
from kvlab.testing import FAMILIES, tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_kn_edit_moves_value_vectors(family):
    model, tok, arch = tiny(family)
    now = current_answer(model, tok, "anna berg lives in")
    req = EditRequest("{} lives in", "anna berg", "rome" if now != "rome" else "paris", target_true=now)
    before = snapshot(model)
    V0 = {l: arch.value_matrix(l).detach().clone() for l in (0, 2)}
    neurons = [(0, 3), (2, 5), (2, 7)]
    edit = kn_edit(model, tok, req, neurons=neurons, lam=2.0)
    shift = 2.0 * (answer_embedding(model, tok, req.target_new) - answer_embedding(model, tok, now))
    for l in (0, 2):
        diff = arch.value_matrix(l) - V0[l]                      # (d_ff, d_model)
        rows = [i for ll, i in neurons if ll == l]
        torch.testing.assert_close(diff[rows], shift.expand(len(rows), -1), atol=1e-5, rtol=1e-5)
        others = [i for i in range(arch.d_ff) if i not in rows]
        assert torch.equal(diff[others], torch.zeros_like(diff[others]))
    assert edit.n_params == 3 * arch.d_model
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(edit.params) and len(changed) == 2
    edit.undo()
    assert same_weights(model, before)


def test_kn_edit_bad_input():
    model, tok, _ = tiny("gpt2")
    req = EditRequest("{} lives in", "anna berg", "rome", target_true="paris")
    with pytest.raises(ValueError, match="out of range"):
        kn_edit(model, tok, req, neurons=[(0, 10_000)], check=False)
    with pytest.raises(ValueError, match="lam"):
        kn_edit(model, tok, req, neurons=[(0, 1)], lam=0, check=False)


@pytest.mark.skipif(importlib.util.find_spec("kvlab.neurons") is None, reason="kvlab.neurons not available")
def test_kn_edit_with_found_neurons():
    model, tok, arch = tiny("gpt2")
    now = current_answer(model, tok, "anna berg lives in")
    req = EditRequest("{} lives in", "anna berg", "rome" if now != "rome" else "paris", target_true=now)
    before = snapshot(model)
    with kn_edit(model, tok, req, prompts=["anna berg lives in", "the city of anna berg is"]) as edit:
        neurons = edit.info["neurons"]
        assert all(0 <= l < arch.n_layers and 0 <= i < arch.d_ff for l, i in neurons)
        assert edit.n_params == len(set(neurons)) * arch.d_model
    assert same_weights(model, before)
