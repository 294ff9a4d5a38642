"""MEMIT: least-squares optimality of the update, exact targets at λ = 0 on every family,
bit-for-bit undo of batch edits, target probabilities go up, clear errors, stress-test loop."""
import pytest
import torch

from kvlab.editing import EditRequest, current_answer, key_covariance, rome_update, same_weights, snapshot, \
    target_prob
from kvlab.editing.memit import apply_memit, default_lambda, default_layers, keys_and_residuals, memit_update, \
    residual_at, weight_drift
from kvlab.testing import FAMILIES, tiny

TEXTS = ["anna berg lives in paris .", "tom lee works in rome", "the king of france is", "one two three four",
         "the queen plays the piano", "berlin is a city in germany", "london is in england"] * 3
TEMPLATES = ["{}", "the king of france. {}", "one two three. {}"]


@pytest.fixture(scope="module")
def models():
    return {f: tiny(f) for f in FAMILIES}


def _requests(model, tok) -> list[EditRequest]:
    """Three rewrites of different subjects whose new target is not the model's current answer."""
    out = []
    for prompt, subject in (("{} lives in", "anna berg"), ("the city of {}", "tom lee"), ("{} plays", "the queen")):
        now = current_answer(model, tok, prompt.format(subject))
        out.append(EditRequest(prompt, subject, next(w for w in ("rome", "paris", "berlin") if w != now)))
    return out


def _covs(model, tok, layers):
    return {l: key_covariance(model, tok, l, texts=TEXTS, cache=False, progress=False) for l in layers}


def test_memit_update_solves_the_regularised_least_squares():
    g = torch.Generator().manual_seed(0)
    n, d_ff, d = 5, 12, 6
    K, R = torch.randn(n, d_ff, generator=g).double(), torch.randn(n, d, generator=g).double()
    A = torch.randn(d_ff, d_ff, generator=g).double()
    C = A @ A.T / d_ff + 0.5 * torch.eye(d_ff, dtype=torch.float64)
    lam = 3.0
    dV = memit_update(K, R, C, lam)
    # closed form of argmin ‖KΔ − R‖² + λ tr(Δᵀ C Δ), with the ridge kvlab's solve adds to C
    Cr = C + 1e-6 * C.diagonal().mean() * torch.eye(d_ff, dtype=torch.float64)
    torch.testing.assert_close(dV, torch.linalg.solve(lam * Cr + K.T @ K, K.T @ R))
    # the gradient of the objective vanishes there
    grad = K.T @ (K @ dV - R) + lam * Cr @ dV
    assert grad.abs().max() < 1e-9
    # λ = 0: every key maps exactly onto its residual
    torch.testing.assert_close(K @ memit_update(K, R, C, 0.0), R)


def test_single_key_lambda_zero_is_rome():
    g = torch.Generator().manual_seed(1)
    V, b = torch.randn(16, 8, generator=g), torch.randn(8, generator=g)
    A = torch.randn(16, 16, generator=g)
    C = (A @ A.T / 16 + 0.1 * torch.eye(16)).double()
    k, v = torch.randn(16, generator=g), torch.randn(8, generator=g)
    r = v.double() - (V.double().T @ k.double() + b.double())     # what ROME adds at k
    torch.testing.assert_close(memit_update(k[None], r[None], C, 0.0), rome_update(V, b, k, v, C))


@pytest.mark.parametrize("family", FAMILIES)
def test_lambda_zero_reaches_every_target(models, family):
    """λ = 0, bare prompts as the only template: after the spread over layers 0..2 the residual at
    the last layer equals each request's target z (the last layer closes what is left exactly)."""
    model, tok, arch = models[family]
    reqs = _requests(model, tok)
    before = snapshot(model)
    layers = (0, 1, 2)
    edit = apply_memit(model, tok, reqs, layers=layers, lam=0.0, covs=_covs(model, tok, layers),
                       templates=["{}"], check=False, progress=False, v_steps=4)
    z = edit.info["targets"]
    assert z.shape == (3, arch.d_model)
    torch.testing.assert_close(residual_at(model, tok, reqs, 2), z, atol=1e-3, rtol=1e-4)
    assert edit.info["residual_norms"][-1] < 1e-4 * edit.info["residual_norms"][0]
    # only the three value matrices changed
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(changed) == sorted(edit.params) and len(changed) == 3
    edit.undo()
    assert same_weights(model, before)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])
def test_single_layer_maps_key_to_its_residual_share(models, family):
    """One layer, λ = 0, one request: the edited value module outputs old value + (z − h) at k."""
    model, tok, arch = models[family]
    req = _requests(model, tok)[:1]
    C = _covs(model, tok, [1])
    K, h = keys_and_residuals(model, tok, req, 1, 1, TEMPLATES)
    v_old = arch.value_module(1)(K.float())                        # (1, d_model)
    with apply_memit(model, tok, req, layers=[1], lam=0.0, covs=C, templates=TEMPLATES, check=False,
                     progress=False, v_steps=4) as edit:
        v_new = arch.value_module(1)(K.float())
        z = edit.info["targets"]
        torch.testing.assert_close((v_new - v_old).double(), z - h, atol=1e-3, rtol=1e-4)
        assert torch.linalg.matrix_rank(edit.delta().double(), rtol=1e-5) == 1


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen2"])
def test_batch_edit_undo_is_exact(models, family):
    model, tok, _ = models[family]
    before = snapshot(model)
    with apply_memit(model, tok, _requests(model, tok), layers=[0, 2], lam=5.0,
                     covs=_covs(model, tok, [0, 2]), templates=TEMPLATES, check=False, progress=False,
                     v_steps=3) as edit:
        assert not same_weights(model, before)
        assert all(d > 0 for d in weight_drift(edit).drift)
        edited = snapshot(model, edit.params)
    assert same_weights(model, before)
    edit.undo()                                   # idempotent
    assert same_weights(model, before)
    edit.apply()
    assert same_weights(model, edited)
    edit.undo()
    assert same_weights(model, before)
    assert all(d == 0 for d in weight_drift(edit).drift)


def test_several_requests_become_more_likely(models):
    model, tok, _ = models["gpt2"]
    # subjects at the end of the prompt: the random tiny model's attention is nearly one-hot,
    # so an edit at the subject's position must reach the prediction there
    reqs = []
    for prompt, subject in (("the city of {}", "anna berg"), ("the river of {}", "tom lee"),
                            ("the capital of {}", "the queen")):
        now = current_answer(model, tok, prompt.format(subject))
        reqs.append(EditRequest(prompt, subject, next(w for w in ("rome", "paris", "berlin") if w != now)))
    texts, targets = [r.text for r in reqs], [r.target_new for r in reqs]
    p0 = target_prob(model, tok, texts, targets)
    with apply_memit(model, tok, reqs, layers=[0, 1, 2], lam=1.0, covs=_covs(model, tok, [0, 1, 2]),
                     templates=TEMPLATES, progress=False):
        p1 = target_prob(model, tok, texts, targets)
    assert (p1 > p0).all(), (p0, p1)


def test_bad_requests_raise(models):
    model, tok, arch = models["gpt2"]
    reqs = _requests(model, tok)
    C = _covs(model, tok, [1])
    kw = dict(layers=[1], covs=C, templates=TEMPLATES, progress=False, v_steps=2)
    with pytest.raises(ValueError, match="no edit requests"):
        apply_memit(model, tok, [], **kw)
    dup = EditRequest(reqs[0].prompt, reqs[0].subject, "london")
    with pytest.raises(ValueError, match="two requests rewrite"):
        apply_memit(model, tok, [reqs[0], dup], check=False, **kw)
    now = current_answer(model, tok, "anna berg lives in")
    with pytest.raises(ValueError, match="already answers"):
        apply_memit(model, tok, [EditRequest("{} lives in", "anna berg", now)], **kw)
    with pytest.raises(ValueError, match="λ must be"):
        apply_memit(model, tok, reqs, lam=-1.0, check=False, **kw)
    with pytest.raises(ValueError, match="out of range"):
        apply_memit(model, tok, reqs, layers=[7], covs=C, templates=TEMPLATES, check=False, progress=False)
    with pytest.raises(ValueError, match="empty layer range"):
        apply_memit(model, tok, reqs, layers=[], covs=C, check=False, progress=False)
    with pytest.raises(ValueError, match="targets are"):
        apply_memit(model, tok, reqs, targets=torch.zeros(2, arch.d_model), check=False, **kw)
    with pytest.raises(ValueError, match="unknown option"):
        apply_memit(model, tok, reqs, check=False, no_such_option=1, **kw)
    with pytest.raises(ValueError, match="linearly dependent"):
        memit_update(torch.ones(2, 4), torch.ones(2, 3), None, 0.0)
    before = snapshot(model)
    with pytest.raises(ValueError):
        apply_memit(model, tok, reqs, covs={1: torch.eye(3)}, layers=[1], templates=TEMPLATES, check=False,
                    progress=False)
    assert same_weights(model, before)


def test_defaults_for_known_models(models):
    model, _, arch = models["gpt2"]
    layers = default_layers(model)
    assert layers and all(0 <= l < arch.n_layers for l in layers) and list(layers) == sorted(layers)
    assert default_lambda(model) > 0
    old = model.config._name_or_path
    try:
        model.config._name_or_path = "gpt2-xl"
        assert default_layers(model) == (13, 14, 15, 16, 17) and default_lambda(model) == 20_000
        model.config._name_or_path = "EleutherAI/gpt-j-6b"
        assert default_layers(model) == (3, 4, 5, 6, 7, 8) and default_lambda(model) == 15_000
    finally:
        model.config._name_or_path = old


def test_stress_loops_restore_the_model(models):
    from kvlab.editing.stress import pick_records, stress_memit, stress_sequential_rome, unedited_points
    model, tok, _ = models["gpt2"]
    cf = []
    for i, (subject, new, true) in enumerate((("anna berg", "rome", "paris"), ("tom lee", "berlin", "london"),
                                              ("the queen", "paris", "rome"))):
        cf.append({"case_id": i, "requested_rewrite": {"prompt": "the city of {}", "subject": subject,
                                                       "target_new": {"str": new, "id": 0},
                                                       "target_true": {"str": true, "id": 0}},
                   "paraphrase_prompts": [f"the river of {subject}"], "neighborhood_prompts": ["the city of the king"]})
    known = [{"prompt": "the king of france is", "subject": "the king", "attribute": "paris"},
             {"prompt": "anna berg lives in", "subject": "anna berg", "attribute": "rome"}]
    recs, unrelated = pick_records(model, tok, cf, known)
    assert all(k["subject"] != "anna berg" for k in unrelated) and len(recs) >= 2
    before = snapshot(model)
    kw = dict(templates=TEMPLATES, progress=False)
    base = unedited_points(model, tok, recs, [1, 2], unrelated)
    rome = stress_sequential_rome(model, tok, recs, [1, 2], unrelated, layer=1, cov=_covs(model, tok, [1])[1],
                                  v_steps=2, **kw)
    memit = stress_memit(model, tok, recs, [1, 2], unrelated, layers=[0, 1], lam=1.0, covs=_covs(model, tok, [0, 1]),
                         **kw)
    assert same_weights(model, before)
    assert [p.n_edits for p in base + rome + memit] == [1, 2] * 3
    assert all(p.drift == 0 for p in base) and all(p.drift > 0 for p in rome + memit)
    with pytest.raises(ValueError, match="counts"):
        stress_memit(model, tok, recs, [5], unrelated, layers=[0], **kw)
