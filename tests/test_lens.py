"""Logit lens and composition statistics (Geva et al. 2021 §5)."""
import pytest
import torch

from kvlab import checks, lens
from kvlab.hooks import capture, patch
from kvlab.text import encode
from kvlab.testing import FAMILIES, tiny

PROMPTS = ["anna berg lives in", "the king of france speaks", "tom lee plays the", "the capital of italy is",
           "one two three four", "the queen of england was born in"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lens_last_layer_is_the_model_output(family):
    model, tok, arch = tiny(family)
    L = lens.logit_lens(model, tok, PROMPTS, batch_size=4)
    n = len(PROMPTS)
    assert L.top_ids.shape == (n, arch.n_layers) and L.final_prob.shape == (n, arch.n_layers)
    assert len(L.tokens) == n and len(L.tokens[0]) == arch.n_layers
    agree = L.agreement()
    assert agree.shape == (arch.n_layers,) and agree[-1] == 1.0
    # The final prediction is the argmax at the last layer, so its probability is the max there.
    assert ((L.final_prob >= 0) & (L.final_prob <= 1)).all()
    s = lens.composition_stats(model, tok, PROMPTS, batch_size=4)
    for f in ("active", "ffn_no_memory", "after_no_memory", "before_agrees_final", "keep", "override", "compose"):
        v = getattr(s, f)
        assert v.shape == (arch.n_layers,) and ((v >= 0) & (v <= 1)).all()
    torch.testing.assert_close(s.keep + s.override + s.compose, torch.ones(arch.n_layers))
    assert s.after_agrees_final[-1] == 1.0
    assert len(s.rows()) == arch.n_layers


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_residual_before_plus_ffn_is_block_output(family):
    """Zeroing the FFN output leaves exactly the 'residual before the FFN' (sequential and parallel)."""
    model, tok, arch = tiny(family)
    rs = lens.residual_stream(model, tok, PROMPTS[:2], layers=[1])
    batch = encode(model, tok, PROMPTS[:2])
    with patch(arch.mlp(1), lambda o: torch.zeros_like(o)), capture(model, {"b": arch.layer(1)}) as st:
        model(**batch.inputs())
    before = st["b"][torch.arange(2), batch.last]
    # (before + ffn) − ffn rounds at the size of its terms: 64 ulps of it (kvlab.checks.tolerance)
    tol = checks.tolerance(model, scale=rs["block"][1].abs() + rs["ffn"][1].abs())
    torch.testing.assert_close(rs["block"][1] - rs["ffn"][1], before, atol=tol, rtol=0)


def test_single_direction_values_leave_nothing_to_compose():
    """All values point to E[paris]: every memory and the FFN predict ' paris' -> no composition."""
    model, tok, arch = tiny("gpt2")
    paris = tok(" paris")["input_ids"][-1]
    with torch.no_grad():
        arch.value_matrix(1)[:] = 100 * arch.unembed.weight[paris]
        arch.value_bias(1).zero_()
        arch.key_biases(1)[0].fill_(3.0)           # every coefficient positive: Σ m_i > 0
    s = lens.composition_stats(model, tok, PROMPTS, layers=[1])
    assert s.active[0] > 0.5
    assert s.ffn_no_memory[0] == 0 and s.after_no_memory[0] == 0
    # The huge FFN output decides the residual: the prediction is kept or overridden, never composed.
    assert s.compose[0] == 0 and s.keep[0] + s.override[0] == 1
    L = lens.logit_lens(model, tok, PROMPTS, layers=[1])
    assert (L.top_ids[:, 0] == paris).all()


def test_bad_input():
    model, tok, arch = tiny("gpt2")
    with pytest.raises(ValueError, match="no prompts"):
        lens.logit_lens(model, tok, [])
    with pytest.raises(ValueError, match="no layers"):
        lens.composition_stats(model, tok, PROMPTS, layers=[])
    with pytest.raises(IndexError):
        lens.logit_lens(model, tok, PROMPTS, layers=[arch.n_layers])
