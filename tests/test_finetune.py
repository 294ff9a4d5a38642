"""Fine-tuning edits of FFN keys vs values: the right parameters move, budget respected, exact undo."""
import pytest
import torch

from kvlab.editing import EditRequest, current_answer, ffn_params, finetune_edit, same_weights, snapshot, target_nll
from kvlab.testing import FAMILIES, tiny

EXPECTED = {"gpt2": ("c_fc", "c_proj"), "gptj": ("fc_in", "fc_out"), "gpt_neo": ("c_fc", "c_proj"),
            "gpt_neox": ("dense_h_to_4h", "dense_4h_to_h"), "llama": ("gate_proj", "down_proj"),
            "mistral": ("gate_proj", "down_proj"), "qwen2": ("gate_proj", "down_proj")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", ["keys", "values"])
def test_finetune_changes_only_target_and_undoes(family, target):
    model, tok, arch = tiny(family)
    now = current_answer(model, tok, "anna berg lives in")
    req = EditRequest("{} lives in", "anna berg", "rome" if now != "rome" else "paris")
    before = snapshot(model)
    nll0 = float(target_nll(model, tok, [req.text], [req.target_new])[0])
    edit = finetune_edit(model, tok, req, target=target, layers=[1], steps=5, lr=1e-2)
    names = ffn_params(model, target, [1])
    key_name, value_name = EXPECTED[family]
    assert all((key_name if target == "keys" else value_name) in n or "up_proj" in n for n in names)
    if target == "keys" and arch.family.gated:
        assert len(names) == 2                                   # gate_proj and up_proj
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and set(changed) <= set(names)
    assert edit.n_params == sum(model.get_parameter(n).numel() for n in names)
    assert float(target_nll(model, tok, [req.text], [req.target_new])[0]) < nll0
    assert not any(p.requires_grad for p in model.parameters())
    edit.undo()
    assert same_weights(model, before)


def test_norm_constraint_bounds_change():
    model, tok, _ = tiny("gpt2")
    now = current_answer(model, tok, "anna berg lives in")
    req = EditRequest("{} lives in", "anna berg", "rome" if now != "rome" else "paris")
    edit = finetune_edit(model, tok, req, target="values", layers=[0, 1], steps=5, lr=1e-2, norm_constraint=1e-3)
    for n in edit.params:
        assert edit.delta(n).abs().max() <= 1e-3 + 1e-6
    edit.undo()


def test_bad_arguments():
    model, tok, _ = tiny("gpt2")
    req = EditRequest("{} lives in", "anna berg", "rome", target_true="paris")
    with pytest.raises(ValueError, match="target must be"):
        finetune_edit(model, tok, req, target="queries", check=False)
    with pytest.raises(ValueError, match="unknown option"):
        finetune_edit(model, tok, req, target="keys", stepz=3, check=False)
