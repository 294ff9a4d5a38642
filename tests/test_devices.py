"""The device/dtype tier: every method on one device in each dtype (settings and fixtures: tests/conftest.py).

    KVLAB_TEST_DTYPES=float16,bfloat16 python -m pytest -q -m devices tests/test_devices.py
    KVLAB_TEST_DEVICE=cuda KVLAB_TEST_DTYPES=float16,bfloat16,float32 python -m pytest -q -m devices tests/test_devices.py

Off (one skip line) unless KVLAB_TEST_DTYPES is set. Models: :func:`kvlab.testing.tiny` of the families
moved with ``.to(device, dtype)``, and the built-in model (``kvlab.load(device=..., dtype=...)``) where a
trained one is needed. For each method: it runs in that dtype on that device, its results are finite, the
fast path equals the plain one, weights keep their dtype and device, and every edit is undone bit-for-bit.

Bounds come from the dtype (:func:`kvlab.checks.tolerance`: ``factor`` ulps, eps = 2⁻²³ float32, 2⁻¹⁰
float16, 2⁻⁷ bfloat16) times the size of what is compared: for a sum, Σ|terms| (the rounding of a sum grows
with its terms, not with its result); for probabilities, the largest p. An optimiser-based editor (ROME's and
MEMIT's v*, fine-tuning, LoRA) that fails in a dtype (NaN, no progress) fails its test: that is a bug.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import _TIER
from kvlab import checks
from kvlab.testing import FAMILIES

if _TIER is None:
    pytest.skip("the device/dtype tier is off: set KVLAB_TEST_DTYPES=float16,bfloat16 (and KVLAB_TEST_DEVICE=cuda)",
                allow_module_level=True)

pytestmark = pytest.mark.devices

EDIT_FAMILIES = ("gpt2", "gpt_neox", "llama")        # Conv1D with biases; parallel block + rotary; gated, GQA
PROMPT, SUBJECT = "of anna berg is in", "anna berg"
SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"


def rel(dtype: torch.dtype, scale, factor: float = 16.0) -> float:
    """``factor`` ulps of ``dtype`` relative to ``scale`` (a number or a tensor: its largest magnitude)."""
    scale = float(scale.detach().abs().max()) if torch.is_tensor(scale) else abs(float(scale))
    return checks.tolerance(dtype, 1.0, factor) * scale


def bound(dtype: torch.dtype, scale, terms: int, factor: float = 16.0) -> float:
    """:func:`rel` plus ``terms`` float32 ulps of ``scale``: the rounding of sums of that many terms, which a
    float32 matrix product accumulates in float32 itself, in an order that depends on the kernel (float16 and
    bfloat16 products accumulate in float32 too and round once, so there the first part dominates)."""
    return rel(dtype, scale, factor) + rel(torch.float32, scale, terms)


def ratio(err: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Elementwise |err| / bound, for bounds that differ per entry (checked against 1)."""
    err, bound = err.detach().abs().cpu().double(), torch.as_tensor(bound).cpu().double()   # (MPS has no float64)
    return err / bound.clamp_min(torch.finfo(torch.float64).tiny)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality on the tensors' own device (NaN equals itself, 0.0 differs from -0.0)."""
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and torch.equal(a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8)))


def changed(model, saved) -> list[str]:
    return [n for n, p in model.named_parameters() if not same_bits(p, saved[n])]


def assert_placed(model, device, dtype):
    """Every weight still has the tier's dtype and lives on its device, and none is NaN/inf."""
    where = {(p.dtype, p.device) for p in model.parameters()}
    assert where == {(dtype, device)}, f"weights now in {where}, expected {(dtype, device)}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"non-finite weights in {bad[:3]}"


def other_word(model, tok, prompt: str, words=("rome", "paris", "berlin")) -> str:
    from kvlab.editing import current_answer

    now = current_answer(model, tok, prompt)
    return next(w for w in words if w != now)


# ---------------------------------------------------------------------------------------------- tracing
@pytest.mark.parametrize("family", FAMILIES)
def test_tracing_fast_equals_plain(on_device, dtype, family, within):
    """The fast tracer (cut blocks, cached keys/values, shared rows, one group per token, no cut at all) equals
    the one-forward-per-cell reference in this dtype: 16 ulps of the largest p, plus d_ff float32 ulps of it
    (:func:`bound`)."""
    from test_tracing import reference_trace

    from kvlab import tracing
    from kvlab.text import subject_token_range

    model, tok, arch = on_device(family, n_layers=4)
    b, e = subject_token_range(tok, PROMPT, SUBJECT)
    eps = tracing.sample_noise(4, e - b, arch.d_model, seed=1)
    tr = tracing.Tracer(model, tok, PROMPT, SUBJECT, noise=0.5, samples=4, eps=eps)
    assert tr.split, tr.split_off
    grouped, effect = tr.call_tokens, 0.0
    for kind in tracing.KINDS:
        ref, low, high, ans = reference_trace(model, tok, PROMPT, SUBJECT, kind, 0.5, eps, 3)
        assert tr.answer_id == ans
        tol = bound(dtype, max(high, float(ref.max())), arch.d_ff)
        within(f"{kind}: high score", tr.high_score - high, tol)
        within(f"{kind}: low score", tr.low_score - low, tol)
        for path, split, call_tokens in (("grouped", True, grouped), ("per token", True, 0), ("no cut", False, 0)):
            tr.split, tr.call_tokens = split, call_tokens
            got = tr.trace(kind, 3).scores
            assert torch.isfinite(got).all() and got.shape == ref.shape
            within(f"{kind} ({path})", got - ref, tol)
        tr.split, tr.call_tokens = True, grouped
        effect = max(effect, float((ref - low).abs().max()))
    # the restorations matter beyond the bound, or the comparison proves nothing
    assert effect > 2 * tol, (effect, tol)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tracing_sdpa_equals_plain(device, dtype, family, within):
    """sdpa attention (no mask passed to the blocks; the tracer builds one in this dtype)."""
    from test_tracing import reference_trace

    from kvlab import tracing
    from kvlab.testing import tiny
    from kvlab.text import subject_token_range

    model, tok, arch = tiny(family, n_layers=4)
    model.to(device, dtype).set_attn_implementation("sdpa")
    b, e = subject_token_range(tok, PROMPT, SUBJECT)
    eps = tracing.sample_noise(3, e - b, arch.d_model, seed=4)
    tr = tracing.Tracer(model, tok, PROMPT, SUBJECT, noise=0.5, samples=3, eps=eps)
    assert tr.split, tr.split_off
    tr.call_tokens = 0
    for kind in tracing.KINDS:
        ref, low, high, _ = reference_trace(model, tok, PROMPT, SUBJECT, kind, 0.5, eps, 3)
        within(kind, tr.trace(kind, 3).scores - ref, bound(dtype, max(high, float(ref.max())), arch.d_ff))


def test_tracing_builtin_model(world, dtype, within):
    """A fact the built-in model knows: traced in this dtype, it still predicts the answer, corrupting the
    subject lowers p, and the fast tracer equals the reference (hidden states and MLP windows)."""
    from test_tracing import reference_trace

    from kvlab import tracing
    from kvlab.data import load_known
    from kvlab.editing import current_answer_ids
    from kvlab.text import subject_token_range, token_ids

    model, tok, arch = world
    fact = next(f for f in load_known()[:20] if current_answer_ids(model, tok, f.prompt) == token_ids(tok, f.attribute)[:1])
    b, e = subject_token_range(tok, fact.prompt, fact.subject)
    noise = tracing.noise_level(model, tok, [fact.subject])
    eps = tracing.sample_noise(3, e - b, arch.d_model, seed=0)
    res = tracing.trace_all_kinds(model, tok, fact.prompt, fact.subject, kinds=("hidden", "mlp"), noise=noise,
                                  samples=3, window=3, eps=eps)
    assert res["hidden"].total_effect > 0.1
    for kind, r in res.items():
        ref, low, high, _ = reference_trace(model, tok, fact.prompt, fact.subject, kind, noise, eps, 3)
        within(kind, r.scores - ref, bound(dtype, high, arch.d_ff))


# ---------------------------------------------------------------------------------------------- neurons
@pytest.mark.parametrize("family", FAMILIES)
def test_integrated_gradients_cached_equals_plain(on_device, dtype, family, within):
    """Cached IG (rows start at their layer, only the last positions) equals the plain one (64 ulps of the
    scores' scale, plus d_ff float32 ulps: :func:`bound`), and both are complete: Σ_i Attr_{l,i} = p_full − p_baseline[l] within the Riemann error
    of 64 midpoints (2% of it) plus 64 ulps of Σ|Attr| — also for a multi-token answer, whose p (~1e-10)
    underflows float16's gradients unless kvlab differentiates log p."""
    from kvlab import neurons as N

    model, tok, arch = on_device(family)
    for answer in ("paris", "the city of rome"):
        fast = N.attribute(model, tok, "anna berg lives in", answer, steps=64)
        plain = N.attribute(model, tok, "anna berg lives in", answer, steps=64, method="plain")
        assert torch.isfinite(fast.scores).all() and fast.scores.dtype == torch.float32
        scale = plain.scores.abs().max()
        assert scale > 0, "the attribution is all zero"
        within(f"{answer!r}: scores", fast.scores - plain.scores, bound(dtype, scale, arch.d_ff, 64))
        within(f"{answer!r}: p_full", fast.p_full - plain.p_full, bound(dtype, plain.p_full, arch.d_ff, 64))
        within(f"{answer!r}: p_baseline", fast.p_baseline - plain.p_baseline,
               bound(dtype, plain.p_baseline, arch.d_ff, 64))
        assert torch.equal(fast.activations, plain.activations)
        dp = (fast.p_full - fast.p_baseline).abs()                              # (n_layers,)
        sizes = fast.scores.abs().sum(-1)                                       # Σ_i |Attr_{l,i}|
        err = fast.completeness_error().abs()
        within(f"{answer!r}: completeness / bound", ratio(err, 0.02 * dp + rel(dtype, 1.0, 64) * sizes), 1.0)


def test_knowledge_neurons_and_interventions(on_device, dtype):
    """Find knowledge neurons, suppress and amplify them: finite effects, a factor of 1 changes nothing."""
    from kvlab import neurons as N

    model, tok, arch = on_device("gpt2")
    prompts = ["anna berg lives in", "the city of anna berg is", "tom lee lives in"]
    kn = N.find_knowledge_neurons(model, tok, prompts, "paris", p=0.5, target=None, steps=8)
    assert all(0 <= l < arch.n_layers and 0 <= i < arch.d_ff for l, i in kn.neurons)
    neurons = kn.neurons or [(1, 3), (2, 5)]
    assert N.intervention_effect(model, tok, neurons, prompts, "paris", 1.0).abs().max() == 0
    for factor in (0.0, 2.0):
        effect = N.intervention_effect(model, tok, neurons, prompts, "paris", factor)
        assert effect.shape == (3,) and torch.isfinite(effect).all() and (effect >= -1).all()


# ---------------------------------------------------------------------------------------------- editors
TEXTS = ["anna berg lives in paris", "tom lee works in rome", "the king of france is", "one two three four",
         "the queen plays the piano", "berlin is a city in germany", "london is in england"] * 3
TEMPLATES = ["{}", "the king of france. {}", "one two three. {}"]


@pytest.fixture(scope="module")
def covs(on_device):
    """{(family, layer): C} of the tier's models, computed once per dtype."""
    from kvlab.editing import key_covariance

    cache = {}

    def get(family, layer):
        if (family, layer) not in cache:
            model, tok, _ = on_device(family)
            cache[family, layer] = key_covariance(model, tok, layer, texts=TEXTS, cache=False, progress=False)
        return cache[family, layer]
    return get


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_rome(on_device, covs, device, dtype, family, within):
    """ROME in this dtype: v*'s optimisation lowers its loss, W k* + b = v* up to the dtype's rounding of the
    new weights and of the d_ff-term sum (:func:`bound` of Σ|k_i W_i| + |b|), only the value matrix changes,
    p(new) rises, and undo restores every bit."""
    from kvlab.editing import EditRequest, apply_rome, target_prob, value_at

    model, tok, arch = on_device(family)
    req = EditRequest("the city of {}", "anna berg", other_word(model, tok, "the city of anna berg"))
    before = snapshot(model)
    p0 = float(target_prob(model, tok, [req.text], [req.target_new])[0])
    edit = apply_rome(model, tok, req, layer=1, cov=covs(family, 1), templates=TEMPLATES, v_steps=10)
    try:
        assert_placed(model, device, dtype)
        loss = edit.info["loss"]
        assert all(map(torch.isfinite, map(torch.tensor, loss))) and loss[-1] < loss[0], loss
        assert changed(model, before) == list(edit.params)
        k, v, b = edit.info["k_star"], edit.info["v_star"], arch.value_bias(1)
        size = k.abs().float() @ arch.value_matrix(1).abs().float()              # (d_model,) Σ_i |k_i W_i| + |b|
        size = size + (0 if b is None else b.abs().float())
        within("W k* + b = v*", value_at(model, 1, k).float() - v.float(), bound(dtype, size, arch.d_ff))
        assert float(target_prob(model, tok, [req.text], [req.target_new])[0]) > p0
    finally:
        edit.undo()
    assert not changed(model, before)
    assert_placed(model, device, dtype)


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_memit(on_device, covs, device, dtype, family):
    """MEMIT in this dtype, λ = 0 over layers 0-2: the targets' optimisation stays finite, the residual at
    the last layer shrinks to a small part of what it was (the rest is the dtype's rounding), exactly the three
    value matrices change, and undo restores every bit."""
    from kvlab.editing import EditRequest
    from kvlab.editing.memit import apply_memit

    model, tok, arch = on_device(family)
    reqs = [EditRequest(p, s, other_word(model, tok, p.format(s)))
            for p, s in (("{} lives in", "anna berg"), ("the city of {}", "tom lee"), ("{} plays", "the queen"))]
    before = snapshot(model)
    edit = apply_memit(model, tok, reqs, layers=(0, 1, 2), lam=0.0, covs={l: covs(family, l) for l in (0, 1, 2)},
                       templates=["{}"], check=False, progress=False, v_steps=4)
    try:
        assert_placed(model, device, dtype)
        for log in edit.info["target_logs"]:
            assert torch.isfinite(torch.tensor(log["loss"])).all(), log["loss"]
        assert torch.isfinite(edit.info["targets"]).all()
        norms = edit.info["residual_norms"]
        assert torch.isfinite(torch.tensor(norms)).all() and norms[-1] < 0.25 * norms[0], norms
        assert sorted(changed(model, before)) == sorted(edit.params) and len(edit.params) == 3
    finally:
        edit.undo()
    assert not changed(model, before)
    assert_placed(model, device, dtype)


@pytest.mark.parametrize("target", ["keys", "values"])
@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_finetune(on_device, device, dtype, family, target):
    """Fine-tuning the FFN keys / values in this dtype (Adam on the weights themselves): the loss stays finite
    and falls, only the target weights change, nothing is left requiring grad, and undo restores every bit."""
    from kvlab.editing import EditRequest, ffn_params, finetune_edit

    model, tok, arch = on_device(family)
    req = EditRequest("{} lives in", "anna berg", other_word(model, tok, "anna berg lives in"))
    before = snapshot(model)
    edit = finetune_edit(model, tok, req, target=target, layers=[1], steps=5, lr=1e-2)
    try:
        loss = edit.info["loss"]
        assert all(map(torch.isfinite, map(torch.tensor, loss))) and loss[-1] < loss[0], loss
        assert_placed(model, device, dtype)
        moved = changed(model, before)
        assert moved and set(moved) <= set(ffn_params(model, target, [1]))
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        edit.undo()
    assert not changed(model, before)
    assert_placed(model, device, dtype)


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_kn_edit(on_device, device, dtype, family, within):
    """The knowledge-neuron edit in this dtype: the neurons' value rows move by λ(E[new] − E[old]) up to one
    rounding at the size of the row (16 ulps), every other weight keeps its bits, undo restores every bit;
    and with the neurons found by integrated gradients in this dtype."""
    from kvlab.editing import EditRequest, current_answer
    from kvlab.editing.kn import answer_embedding, kn_edit

    model, tok, arch = on_device(family)
    now = current_answer(model, tok, "anna berg lives in")
    req = EditRequest("{} lives in", "anna berg", other_word(model, tok, "anna berg lives in"), target_true=now)
    before = snapshot(model)
    neurons = [(0, 3), (2, 5), (2, 7)]
    V0 = {l: arch.value_matrix(l).detach().clone() for l in (0, 2)}
    with kn_edit(model, tok, req, neurons=neurons, lam=2.0) as edit:
        assert_placed(model, device, dtype)
        shift = 2.0 * (answer_embedding(model, tok, req.target_new) - answer_embedding(model, tok, now)).float()
        for l in (0, 2):
            rows = [i for ll, i in neurons if ll == l]
            diff = arch.value_matrix(l).float() - V0[l].float()                 # (d_ff, d_model)
            size = V0[l][rows].abs().float() + shift.abs()
            within(f"layer {l} rows / bound", ratio(diff[rows] - shift, rel(dtype, 1.0) * size), 1.0)
            others = [i for i in range(arch.d_ff) if i not in rows]
            assert same_bits(arch.value_matrix(l)[others], V0[l][others])
        assert sorted(changed(model, before)) == sorted(edit.params)
    assert not changed(model, before)
    prompts = ["anna berg lives in", "the city of anna berg is"]
    with kn_edit(model, tok, req, prompts=prompts, t=0.1, steps=8) as edit:
        assert edit.info["neurons"] and set(changed(model, before)) == set(edit.params)
        assert_placed(model, device, dtype)
    assert not changed(model, before)


def test_rome_on_the_builtin_model(world, device, dtype):
    """ROME with the built-in model's settings, in this dtype: the model then answers the new object, and
    undo restores every bit."""
    from kvlab.data import load_known
    from kvlab.editing import EditRequest, apply_rome, current_answer, key_covariance
    from kvlab.world import corpus_texts

    model, tok, arch = world
    known = load_known()
    fact = known[0]
    new = next(k.attribute for k in known if k.relation_id == fact.relation_id and k.attribute != fact.attribute)
    req = EditRequest.from_text(fact.prompt, fact.subject, new)
    before = snapshot(model)
    C = key_covariance(model, tok, 1, texts=list(corpus_texts(n=300, seed=1)), cache=False, progress=False)
    with apply_rome(model, tok, req, cov=C, n_templates=5) as edit:
        assert_placed(model, device, dtype)
        assert current_answer(model, tok, req.text) == new, edit.info.get("loss")
    assert not changed(model, before)


# ---------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_lora_wrap_train_unload(on_device, device, dtype, family):
    """peft LoRA on the values in this dtype: at the start (B = 0) the model's output is unchanged, a few
    AdamW steps lower the answer loss without NaN, the base weights never change, and unload gives the model
    back with every bit and its dtype and device."""
    from kvlab import lora, lora_train
    from kvlab.lora_train import Example, TrainConfig
    from kvlab.text import encode

    model, tok, arch = on_device(family)
    before = snapshot(model)
    batch = encode(model, tok, ["anna berg lives in", "tom lee plays the"])
    with torch.no_grad():
        clean = model(**batch.inputs()).logits
    pm = lora.wrap(model, "values", r=2, dropout=0.0, copy_model=False)
    try:
        with torch.no_grad():
            assert torch.equal(pm(**batch.inputs()).logits, clean)
        train = [Example(p, a) for p, a in (("anna berg lives in", "rome"), ("tom lee lives in", "paris"),
                                            ("the queen lives in", "berlin"), ("the king lives in", "london"))]
        hist = lora_train.train(pm, tok, train, config=TrainConfig(epochs=4, lr=1e-2, batch_size=4, warmup=0.0,
                                                                    progress=False))
        assert all(map(torch.isfinite, map(torch.tensor, hist.step_loss))), hist.step_loss
        assert hist.train_loss[-1] < hist.train_loss[0], hist.train_loss
        assert all(torch.isfinite(p).all() for p in pm.parameters())
    finally:
        base = lora.unload(pm)
    assert base is model and not lora.lora_modules(base)
    assert not changed(model, before) and set(dict(model.named_parameters())) == set(before)
    assert_placed(model, device, dtype)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------- covariance
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_key_covariance(on_device, device, dtype, family, within):
    """C = E[k kᵀ] accumulated on the device from keys in this dtype equals the same keys' second moment in
    float64 on the CPU, up to the float32 sums of a GPU (n_tokens ulps of the size Σ|k_i k_j|/n); float64 on
    the CPU, symmetric, cached (a hash of the weights computed on the device) and found again."""
    from kvlab.editing import key_covariance
    from kvlab.hooks import capture
    from kvlab.text import right_padded

    model, tok, arch = on_device(family)
    texts = TEXTS[:7]
    C = key_covariance(model, tok, 1, texts=texts, cache=False, progress=False)
    assert C.dtype == torch.float64 and C.device.type == "cpu" and torch.isfinite(C).all()
    with torch.no_grad(), right_padded(tok):                                   # as key_covariance pads
        enc = tok(texts, return_tensors="pt", padding=True)
        with capture(model, {"k": arch.value_module(1)}, what="input") as st:
            model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
    K = st["k"][enc["attention_mask"].to(device).bool()].cpu().double()           # (n_tokens, d_ff)
    n = K.shape[0]
    size = K.abs().T @ K.abs() / n                                                # Σ|k_i k_j| / n
    bound = rel(torch.float32, 1.0, n) * size                                    # n float32 ulps of it
    within("C = KᵀK / n, / bound", ratio(C - K.T @ K / n, bound), 1.0)
    assert torch.equal(C, C.T)
    cached = key_covariance(model, tok, 1, texts=texts, progress=False)
    assert key_covariance(model, tok, 1, texts=texts, progress=False) is cached
    within("cached C / bound", ratio(cached - C, bound), 1.0)


# ---------------------------------------------------------------------------------------------- exercises
def solution(ex_id: str):
    """The function the solution of exercise ``ex_id`` defines (notebooks/solutions/NN.py), as the notebook
    would run it."""
    text = (SOLUTIONS / f"{ex_id[:2]}.py").read_text()
    parts = re.split(r"^# %% exercise (\S+)[ \t]*\n", text, flags=re.M)
    ns: dict = {}
    exec(compile(dict(zip(parts[1::2], parts[2::2]))[ex_id], f"solutions/{ex_id[:2]}.py", "exec"), ns)
    fns = [v for v in ns.values() if getattr(v, "__code__", None) is not None]
    assert len(fns) == 1, f"solution {ex_id} should define one function"
    return fns[0]


def wrong(ex_id: str):
    """A wrong answer to each exercise, made from its solution: a doubled result, the wrong label, the roles
    swapped. Each checker must reject it in every dtype (a tolerance too loose for the dtype would not)."""
    ok = solution(ex_id)
    if ex_id in ("01.1", "01.2", "03.1", "05.1", "06.1", "07.1", "09.1"):
        return lambda *a, **kw: 2 * ok(*a, **kw)
    if ex_id == "02.1":
        return lambda *a, **kw: [(s, p, 2 * c) for s, p, c in ok(*a, **kw)]
    if ex_id == "04.1":
        return lambda *a, **kw: "override" if ok(*a, **kw) == "keep" else "keep"
    if ex_id == "08.1":
        return lambda arch, role: ok(arch, "values" if role == "keys" else "keys")
    raise KeyError(f"no wrong answer for exercise {ex_id}: add one")


def _exercise_ids():
    from kvlab import exercises
    return sorted(exercises.CHECKERS)


@pytest.mark.parametrize("ex_id", _exercise_ids())
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exercise_checkers_on_tiny_models(on_device, family, ex_id):
    """Each checker accepts the solution and rejects a wrong answer, on this device in this dtype."""
    from kvlab import exercises

    model, tok, _ = on_device(family)
    check = exercises.CHECKERS[ex_id]
    before = snapshot(model)
    assert check(solution(ex_id), model, tok) is True
    with pytest.raises(exercises.ExerciseError):
        check(wrong(ex_id), model, tok)
    assert not changed(model, before)


@pytest.mark.parametrize("ex_id", _exercise_ids())
def test_exercise_checkers_on_the_builtin_model(world, ex_id):
    """The course's own setting: the built-in model, on this device in this dtype."""
    from kvlab import exercises

    model, tok, _ = world
    check = exercises.CHECKERS[ex_id]
    assert check(solution(ex_id), model, tok) is True
    with pytest.raises(exercises.ExerciseError):
        check(wrong(ex_id), model, tok)
