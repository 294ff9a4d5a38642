"""Vocabulary projection of values, key-value agreement and sub-updates (Geva et al. 2021 §4, 2022)."""
import pytest
import torch

from kvlab import checks, memory, triggers, vocab
from kvlab.hooks import capture
from kvlab.testing import FAMILIES, tiny

from test_triggers import KEY, corpus, detector


def plant_value(arch, layer, key, token_id, scale=5.0):
    """Make value row ``key`` of ``layer`` equal to (a multiple of) the unembedding row of a token."""
    with torch.no_grad():
        arch.value_matrix(layer)[key] = scale * arch.unembed.weight[token_id]


@pytest.mark.parametrize("family", FAMILIES)
def test_value_equal_to_an_unembedding_row_promotes_that_token(family):
    model, tok, arch = tiny(family)
    for word in ("paris", "piano", "king"):
        tid = tok(" " + word, add_special_tokens=False)["input_ids"][-1]
        plant_value(arch, 1, 7, tid)
        top = vocab.value_tokens(model, tok, 1, keys=[7], top=3)
        assert top.ids.shape == (1, 3) and int(top.ids[0, 0]) == tid
        assert top.tokens[0][0].strip() == word
    all_keys = vocab.value_tokens(model, tok, 1, top=2)
    assert all_keys.ids.shape == (arch.d_ff, 2) and int(all_keys.ids[7, 0]) == tid


def test_project_matches_the_model_head():
    """Projecting the last block's output gives exactly the model's own logits and top tokens."""
    model, tok, arch = tiny("gpt2")
    batch = tok(["the king of france speaks"], return_tensors="pt")
    with capture(model, {"b": arch.layer(arch.n_layers - 1)}) as st:
        logits = model(**batch).logits[0, -1]
    top = vocab.project(model, tok, st["b"][0, -1], top=5)
    assert torch.equal(top.ids[0], logits.topk(5).indices)
    # the same final norm and unembedding on one row instead of the whole sequence: 64 ulps of the logits
    torch.testing.assert_close(vocab.to_logits(model, st["b"][0, -1:])[0], logits,
                               atol=checks.tolerance(model, scale=logits), rtol=0)


def test_agreement_on_a_planted_key_value_pair():
    """Key KEY fires on ' piano', always followed by ' rome'; its value is E[rome]: agreement 1."""
    model, tok, arch, tid = detector()
    rome = tok(" rome")["input_ids"][-1]
    plant_value(arch, 0, KEY, rome)
    index = triggers.mine_triggers(model, tok, corpus(), layers=0, k=5)
    rate, base = vocab.agreement(model, tok, index, 0, keys=[KEY])
    assert rate == 1.0
    assert base == pytest.approx(1 / arch.unembed.weight.shape[0])
    rate_all, base_all = vocab.agreement(model, tok, index, 0)
    assert 1 / arch.d_ff <= rate_all <= 1.0 and base_all > 0
    # More examples can only raise the hit rate and the baseline.
    r5, b5 = vocab.agreement(model, tok, index, 0, n_examples=5)
    assert r5 >= rate_all and b5 >= base_all


def test_top_sub_updates_finds_the_planted_memory():
    model, tok, arch = tiny("gpt2")
    paris = tok(" paris")["input_ids"][-1]
    with torch.no_grad():
        arch.key_biases(1)[0][9] = 10.0           # m_9 ≈ 10 whatever the input
        arch.value_matrix(1)[9] = 50 * arch.unembed.weight[paris]
    su = vocab.top_sub_updates(model, tok, "the king of france speaks", 1, n=4, top=3)
    assert int(su.keys[0]) == 9 and su.m[0] > 5
    assert su.tokens[0][0].strip() == "paris"
    assert (su.score[:-1] >= su.score[1:]).all()
    # Scores are |m_i|·‖v_i‖ of the decomposition at the last position.
    d = memory.decompose(model, tok, "the king of france speaks", 1)
    m = d.m[0, -1]
    expect = (m.abs() * d.values.norm(dim=-1)).topk(4)
    torch.testing.assert_close(su.score, expect.values)
    assert len(su.rows()) == 4 and su.prediction


@pytest.mark.parametrize("family", FAMILIES)
def test_smoke_every_family(family):
    model, tok, arch = tiny(family)
    su = vocab.top_sub_updates(model, tok, "anna berg lives in", 2, n=3, top=2)
    assert su.keys.shape == (3,) and len(su.tokens) == 3 and len(su.tokens[0]) == 2
    index = triggers.mine_triggers(model, tok, corpus(n=10, seed=3), layers=2, k=3)
    rate, base = vocab.agreement(model, tok, index, 2, n_examples=2)
    assert 0 <= rate <= 1 and 0 < base < 1


def test_bad_input():
    model, tok, arch = tiny("gpt2")
    with pytest.raises(ValueError, match="d_model"):
        vocab.project(model, tok, torch.zeros(3, arch.d_model + 1))
    with pytest.raises(ValueError, match="top"):
        vocab.project(model, tok, torch.zeros(arch.d_model), top=0)
    with pytest.raises(ValueError, match="keys"):
        vocab.value_tokens(model, tok, 0, keys=[arch.d_ff])
    with pytest.raises(ValueError, match="single prompt"):
        vocab.top_sub_updates(model, tok, ["a", "b"], 0)
    index = triggers.mine_triggers(model, tok, ["the king of france"], layers=1, k=2)
    with pytest.raises(ValueError, match="not mined"):
        vocab.agreement(model, tok, index, 0)
