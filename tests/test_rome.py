"""ROME: W k* = v* after the edit on every family, exact undo, clear errors for bad requests."""
import random

import pytest
import torch

from kvlab.editing import (EditRequest, WeightEdit, apply_rome, compute_key, context_templates, current_answer,
                           key_covariance, recording, rome_update, same_weights, snapshot, value_at)
from kvlab.editing.covariance import cache_dir
from kvlab.testing import FAMILIES, WORDS, tiny

TEMPLATES = ["{}", "the king of france. {}", "one two three. {}"]
_rng = random.Random(0)
TEXTS = [" ".join(_rng.choice(WORDS) for _ in range(12)) for _ in range(60)]  # C well conditioned (d_ff=64)


def _request(model, tok) -> EditRequest:
    """A rewrite whose new target is not the model's current answer."""
    now = current_answer(model, tok, "anna berg lives in")
    new = next(w for w in ("rome", "paris", "berlin") if w != now)
    return EditRequest("{} lives in", "anna berg", new)


@pytest.fixture(scope="module")
def models():
    return {f: tiny(f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_inserts_key_value_pair(models, family):
    model, tok, arch = models[family]
    req = _request(model, tok)
    C = key_covariance(model, tok, 1, texts=TEXTS, cache=False, progress=False)
    before = snapshot(model)
    edit = apply_rome(model, tok, req, layer=1, cov=C, templates=TEMPLATES, v_steps=10)
    k, v = edit.info["k_star"], edit.info["v_star"]
    assert k.shape == (arch.d_ff,) and v.shape == (arch.d_model,)
    # W k* + b = v* (value module applied to k*), to float32 tolerance
    torch.testing.assert_close(value_at(model, 1, k), v, atol=1e-4 * max(1.0, float(v.abs().max())), rtol=1e-4)
    # only the value matrix of layer 1 changed, by a rank-one matrix
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == list(edit.params)
    sv = torch.linalg.svdvals(edit.delta().double())
    assert sv[1] < 1e-4 * sv[0]           # rank one up to float32 rounding
    edit.undo()
    assert same_weights(model, before)


def test_rome_makes_new_target_more_likely(models):
    from kvlab.editing import target_prob
    model, tok, _ = models["gpt2"]
    # subject at the end of the prompt: the random tiny model's attention is nearly one-hot,
    # so only an edit at the predicting position is guaranteed to reach the output
    now = current_answer(model, tok, "the city of anna berg")
    req = EditRequest("the city of {}", "anna berg", next(w for w in ("rome", "paris") if w != now))
    p0 = float(target_prob(model, tok, [req.text], [req.target_new]))
    C = key_covariance(model, tok, 1, texts=TEXTS, cache=False, progress=False)
    with apply_rome(model, tok, req, layer=1, cov=C, templates=TEMPLATES):
        p1 = float(target_prob(model, tok, [req.text], [req.target_new]))
    assert p1 > p0


def test_context_manager_and_idempotent_undo(models):
    model, tok, _ = models["llama"]
    before = snapshot(model)
    C = key_covariance(model, tok, 0, texts=TEXTS, cache=False, progress=False)
    with apply_rome(model, tok, _request(model, tok), layer=0, cov=C, templates=TEMPLATES, v_steps=3) as edit:
        assert not same_weights(model, before)
        edited = snapshot(model, edit.params)
    assert same_weights(model, before)
    edit.undo()                       # second undo: no-op
    assert same_weights(model, before)
    edit.apply()
    edit.apply()                      # second apply: no-op
    assert same_weights(model, edited)
    edit.undo()
    assert same_weights(model, before)


def test_recording_restores_on_error(models):
    model, _, arch = models["gpt2"]
    before = snapshot(model)
    name = "transformer.h.0.mlp.c_proj.weight"
    with pytest.raises(RuntimeError):
        with recording(model, [name]):
            with torch.no_grad():
                model.get_parameter(name).add_(1.0)
            raise RuntimeError("boom")
    assert same_weights(model, before)
    with pytest.raises(ValueError, match="never committed"):
        WeightEdit(model, [name]).apply()


def test_bad_requests(models):
    model, tok, _ = models["gpt2"]
    with pytest.raises(ValueError, match="not found"):
        EditRequest.from_text("tom lee lives in", "anna berg", "rome")
    with pytest.raises(ValueError, match="placeholder"):
        EditRequest("anna berg lives in", "anna berg", "rome")
    with pytest.raises(ValueError, match="empty target"):
        EditRequest("{} lives in", "anna berg", "  ")
    with pytest.raises(ValueError, match="equals target_true"):
        EditRequest("{} lives in", "anna berg", "rome", target_true="rome")
    now = current_answer(model, tok, "anna berg lives in")
    with pytest.raises(ValueError, match="already answers"):
        apply_rome(model, tok, EditRequest("{} lives in", "anna berg", now), layer=1, cov=torch.eye(64))
    with pytest.raises(ValueError, match="not a CounterFact record"):
        EditRequest.from_counterfact({"requested_rewrite": {"prompt": "{} is"}})


def test_rome_update_is_exact_and_rank_one():
    g = torch.Generator().manual_seed(0)
    V, b = torch.randn(16, 8, generator=g), torch.randn(8, generator=g)
    A = torch.randn(16, 16, generator=g)
    C = (A @ A.T / 16 + 0.1 * torch.eye(16)).double()
    k, v = torch.randn(16, generator=g), torch.randn(8, generator=g)
    dV = rome_update(V, b, k, v, C)
    torch.testing.assert_close((V.double() + dV).T @ k.double() + b.double(), v.double())
    assert torch.linalg.matrix_rank(dV) == 1


def test_key_covariance_and_cache(models, tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path))
    model, tok, arch = models["gpt_neox"]
    C = key_covariance(model, tok, 1, texts=TEXTS, progress=False)
    assert C.dtype == torch.float64 and C.shape == (arch.d_ff, arch.d_ff)
    torch.testing.assert_close(C, C.T)
    assert torch.linalg.eigvalsh(C).min() > -1e-8
    files = list(cache_dir().glob("cov_*.pt"))
    assert len(files) == 1 and cache_dir() == tmp_path
    torch.testing.assert_close(key_covariance(model, tok, 1, texts=TEXTS, progress=False), C)
    # same as an explicit average of k kᵀ over the tokens of one text
    one = key_covariance(model, tok, 1, texts=TEXTS[:1], cache=False, progress=False)  # 12 tokens
    from kvlab.memory import coefficients
    m = coefficients(model, tok, TEXTS[0], 1)[0].double()       # (seq, d_ff)
    torch.testing.assert_close(one, m.T @ m / m.shape[0])


def test_compute_key_averages_templates(models):
    model, tok, _ = models["gptj"]
    req = _request(model, tok)
    temps = context_templates(model, tok, n=4, length=3)
    assert temps[0] == "{}" and len(temps) == 5 and all(t.endswith("{}") for t in temps)
    k_all = compute_key(model, tok, req, 1, temps)
    k_each = torch.stack([compute_key(model, tok, req, 1, [t]) for t in temps])
    torch.testing.assert_close(k_all, k_each.mean(0))


def _builtin():
    """The built-in model and its CounterFact set, or skip."""
    import importlib.util
    from kvlab.loading import world_model_dir
    if not world_model_dir().exists() or importlib.util.find_spec("kvlab.data") is None:
        pytest.skip("built-in model or kvlab.data not available (data/world/model)")
    import kvlab
    from kvlab.data import load_counterfact
    return kvlab.load(), load_counterfact()


def test_rome_on_builtin_model_counterfact():
    """ROME at the built-in model's defaults (layer 1, 40 v* steps at lr 1.0) over ≥ 50 edits: ES 96 when
    measured (2026-12-01), guarded at ≥ 90; NS within 10 points of the unedited model."""
    from kvlab.editing import evaluate, evaluate_edits
    (model, tok, arch), records = _builtin()
    records = records[:50]
    layer = __import__("kvlab.editing", fromlist=["default_layer"]).default_layer(model)
    C = key_covariance(model, tok, layer, progress=False)
    templates = context_templates(model, tok, n=10)
    before = snapshot(model)
    unedited = evaluate(model, tok, records)
    res = evaluate_edits(model, tok, records, apply_rome, progress=False, layer=layer, cov=C, templates=templates)
    assert same_weights(model, before)
    assert res["n"] >= 50 - res["skipped"] and res["n"] >= 45
    assert res["ES"] >= 90, res
    assert res["NS"] >= unedited["NS"] - 10, (res, unedited)
