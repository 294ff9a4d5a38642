"""Training in float16 / bfloat16 (kvlab.precision): float32 masters, dynamic loss scaling, used by
fine-tuning edits, ROME's v*, MEMIT's targets and LoRA training. float32 is unchanged (no copies)."""
import math

import pytest
import torch

from kvlab import lora, lora_train
from kvlab.editing import EditRequest, apply_rome, current_answer, key_covariance, same_weights, snapshot, \
    target_prob
from kvlab.editing.finetune import finetune_edit
from kvlab.editing.memit import apply_memit
from kvlab.lora_train import Example, TrainConfig
from kvlab.precision import MixedPrecision, _step_ulp, compute_dtype, round_into
from kvlab.testing import tiny

LOW = [torch.float16, torch.bfloat16]
TEXTS = ["anna berg lives in paris .", "tom lee works in rome", "the king of france is", "one two three four",
         "the queen plays the piano", "berlin is a city in germany", "london is in england"] * 3
TEMPLATES = ["{}", "the king of france. {}", "one two three. {}"]
EXAMPLES = [Example("anna berg lives in", "paris"), Example("tom lee plays the", "piano"),
            Example("the capital of france is", "paris"), Example("anna berg speaks", "french")]


def _tiny(family, dtype):
    model, tok, arch = tiny(family)
    return model.to(dtype), tok, arch


def _request(model, tok, prompt="{} lives in", subject="anna berg") -> EditRequest:
    now = current_answer(model, tok, prompt.format(subject))
    return EditRequest(prompt, subject, next(w for w in ("rome", "paris", "berlin") if w != now))


# --- the machinery itself ---------------------------------------------------------------------------


def test_float32_params_are_their_own_masters_with_scale_one():
    p = torch.nn.Parameter(torch.ones(3))
    prec = MixedPrecision([p], torch.float32)
    assert prec.masters[0] is p and prec.scale == 1.0 and not prec.scaling
    # a float32 tensor trained through a float16 model (ROME's δ, peft's adapters): no copy, but scaled
    prec16 = MixedPrecision([p], torch.float16)
    assert prec16.masters[0] is p and prec16.scaling and prec16.scale == 2.0 ** 16
    h = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    prec_bf = MixedPrecision([h])
    assert prec_bf.masters[0] is not h and prec_bf.masters[0].dtype == torch.float32 and not prec_bf.scaling


def test_overflow_halves_the_scale_and_redoes_the_step():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float16), requires_grad=False)
    calls = []

    def loss_fn():                       # d loss / d w = 1000, computed in float16
        calls.append(1)
        return (w * 1000.0).float().sum()

    prec = MixedPrecision([w], where="unit")
    opt = torch.optim.SGD(prec.masters, lr=1e-3)
    with prec:
        prec.backward(loss_fn(), again=loss_fn)
        # 2¹⁶ · 1000 overflows float16 (max 65504) until the scale is 64: 10 halvings, 10 redone passes
        assert prec.scale == 64.0 and prec.redone == 10 and len(calls) == 11
        g = prec.masters[0].grad
        assert g.dtype == torch.float32 and torch.equal(g, torch.full((2,), 1000.0))   # unscaled, finite
        prec.step(opt)
    m = prec.masters[0]
    assert torch.isfinite(m).all() and torch.allclose(m, torch.tensor([0.0, 1.0]), atol=1e-6)
    assert w.dtype == torch.float16 and torch.equal(w.detach(), m.half())
    assert not w.requires_grad and w.grad is None            # flags and grad restored


def test_loss_scaling_keeps_small_float16_gradients():
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))

    def loss_fn():                       # d loss / d w = 1e-8: below float16's smallest subnormal (6e-8)
        return ((w * 1e-3).float() * 1e-5).sum()

    loss_fn().backward()
    assert (w.grad == 0).all()          # unscaled: the gradient flushes to zero
    w.grad = None
    with MixedPrecision([w]) as prec:
        prec.backward(loss_fn(), again=loss_fn)
        torch.testing.assert_close(prec.masters[0].grad, torch.full((2,), 1e-8), rtol=2e-3, atol=0)


def test_retained_graph_redo_and_growth():
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float16))
    prec = MixedPrecision([w], init_scale=2.0 ** 20, growth_interval=2)
    opt = torch.optim.SGD(prec.masters, lr=0.0)
    with prec:
        prec.backward((w * 100.0).float().sum())   # no `again`: redone on the retained graph
        assert prec.scale == 512.0 and prec.masters[0].grad.item() == 100.0
        prec.step(opt)
        prec.backward((w * 1.0).float().sum())
        prec.step(opt)                             # two good steps in a row: the scale doubles
        assert prec.scale == 1024.0 and prec.good_steps == 0


def test_gradient_that_always_overflows_raises_and_restores():
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float16), requires_grad=False)
    prec = MixedPrecision([w], max_retries=3, where="unit")
    with pytest.raises(ValueError, match=r"unit: the gradient has NaN/inf entries at every loss scale down to 8192 \(4 tries"):
        with prec:
            prec.backward((w * 6e4).float().sum())   # 6e4 · scale overflows down to scale 2¹³
    assert not w.requires_grad and w.grad is None and prec.masters[0].grad is None
    with pytest.raises(ValueError, match="the loss is .*NaN/inf"):
        with prec:
            prec.backward((w * float("nan")).float().sum())
    assert not w.requires_grad


def test_adam_eps_zero_gradient_stays_finite_in_float16():
    def run(masters: bool):
        a = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))   # gets a zero gradient
        b = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
        if not masters:                      # the code before the fix: Adam on the float16 weights
            opt = torch.optim.Adam([a, b], lr=1e-3)
            for _ in range(3):
                opt.zero_grad()
                ((a * 0).sum() + (b * 2).sum()).float().backward()
                opt.step()
            return a, b
        prec = MixedPrecision([a, b])
        opt = torch.optim.Adam(prec.masters, lr=1e-3)
        with prec:
            for _ in range(3):
                prec.backward(((a * 0).sum() + (b * 2).sum()).float())
                prec.step(opt)
        assert all(torch.isfinite(m).all() for m in prec.masters)
        return a, b

    a, _ = run(masters=False)
    assert torch.isnan(a).all()          # eps = 1e-8 is 0 in float16: 0 / 0
    a, b = run(masters=True)
    assert torch.equal(a.detach(), torch.ones(4, dtype=torch.float16))
    assert torch.isfinite(b).all() and (b < 1).all() and b.dtype == torch.float16


@pytest.mark.parametrize("dtype", LOW)
def test_round_into_steps_exactly_one_value_and_stays_in_the_box(dtype):
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    vals = torch.unique(bits[torch.isfinite(bits)].float())                  # every finite value, sorted
    w = vals[1:-1].to(dtype)
    torch.testing.assert_close(_step_ulp(w, torch.ones_like(w, dtype=torch.bool)).float(), vals[2:], rtol=0, atol=0)
    torch.testing.assert_close(_step_ulp(w, torch.zeros_like(w, dtype=torch.bool)).float(), vals[:-2], rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(4000, generator=g) * 0.3).to(dtype).float()
    eps = 5e-4
    m = w0 + (torch.rand(4000, generator=g) * 2 - 1) * eps                   # inside the box
    r = round_into(m, dtype, w0 - eps, w0 + eps)
    assert r.dtype == dtype and ((r.float() - w0).abs() <= eps).all()
    assert ((r.float() - m).abs() <= (m.to(dtype).float() - m).abs() * 2 + 1e-12).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unit: no parameters to train"):
        MixedPrecision([], where="unit")
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="floating-point leaf tensors, got Tensor"):
        MixedPrecision([w * 2])
    with pytest.raises(ValueError, match="init_scale > 0"):
        MixedPrecision([w], init_scale=0.0)


def test_compute_dtype():
    model, _, _ = tiny("gpt2")
    assert compute_dtype(model) == torch.float32
    pm = lora.wrap(model.half(), "keys", r=2, dropout=0.0)      # float32 adapters on a float16 model
    assert compute_dtype(pm) == torch.float16


# --- the methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("target", ["keys", "values"])
def test_finetune_low_precision(family, dtype, target):
    model, tok, _ = _tiny(family, dtype)
    req = _request(model, tok)
    before = snapshot(model)
    edit = finetune_edit(model, tok, req, target=target, layers=[1], steps=5, lr=1e-2)
    loss = edit.info["loss"]
    assert all(math.isfinite(x) for x in loss) and loss[-1] < loss[0] - 0.5, loss
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(t.dtype == dtype for t in edit.edited.values()) and edit.changed_params() > 0
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    edit.undo()
    assert same_weights(model, before)


def test_finetune_error_mid_edit_restores_weights_flags_and_grads(monkeypatch):
    model, tok, _ = _tiny("llama", torch.float16)
    before = snapshot(model)
    calls = []

    def failing_step(self, optimizer, bounds=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step(self, optimizer, bounds)

    real_step = MixedPrecision.step
    monkeypatch.setattr(MixedPrecision, "step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        finetune_edit(model, tok, _request(model, tok), target="keys", layers=[1], steps=5, lr=1e-2)
    assert same_weights(model, before)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("dtype", LOW)
def test_finetune_norm_constraint_holds_in_the_model_dtype(dtype):
    model, tok, _ = _tiny("gpt2", dtype)
    edit = finetune_edit(model, tok, _request(model, tok), target="values", layers=[0, 1], steps=5, lr=1e-2,
                         norm_constraint=2e-3)
    assert all(math.isfinite(x) for x in edit.info["loss"]) and edit.info["loss"][-1] < edit.info["loss"][0]
    for n in edit.params:
        assert (edit.edited[n].double() - edit.originals[n].double()).abs().max() <= 2e-3
    assert edit.changed_params() > 0
    edit.undo()


def _builtin(dtype):
    from kvlab.loading import world_model_dir
    if not world_model_dir().exists():
        pytest.skip("built-in model not available (data/world/model)")
    import kvlab
    from kvlab.data import load_counterfact
    return kvlab.load(device="cpu", dtype=dtype), load_counterfact()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_finetune_on_builtin_model(dtype):
    """The reported bug: ft_keys in float16 on the built-in model raised a NaN loss at step 1."""
    from kvlab.editing.finetune import ft_keys, ft_values
    (model, tok, _), records = _builtin(dtype)
    before = snapshot(model)
    for fn in (ft_keys, ft_values):
        edit = fn(model, tok, records[0], steps=10)
        loss = edit.info["loss"]
        assert all(math.isfinite(x) for x in loss) and loss[-1] < 0.2 * loss[0], loss
        assert all(t.dtype == getattr(torch, dtype) for t in edit.edited.values())
        edit.undo()
        assert same_weights(model, before)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rome_low_precision(family, dtype):
    model, tok, _ = _tiny(family, dtype)
    req = _request(model, tok, "the city of {}")
    p0 = float(target_prob(model, tok, [req.text], [req.target_new]))
    C = key_covariance(model, tok, 1, texts=TEXTS, cache=False, progress=False)
    before = snapshot(model)
    with apply_rome(model, tok, req, layer=1, cov=C, templates=TEMPLATES) as edit:
        p1 = float(target_prob(model, tok, [req.text], [req.target_new]))
        assert edit.info["v_star"].dtype == dtype and edit.delta().dtype == dtype
    assert all(math.isfinite(x) for x in edit.info["loss"]) and edit.info["loss"][-1] < edit.info["loss"][0]
    assert p1 > p0, (p0, p1)
    assert same_weights(model, before)


def test_rome_on_builtin_model_float16():
    (model, tok, arch), records = _builtin("float16")
    req = EditRequest.from_counterfact(records[0])
    p0 = float(target_prob(model, tok, [req.text], [req.target_new]))
    before = snapshot(model)
    with apply_rome(model, tok, req, cov=torch.eye(arch.d_ff, dtype=torch.float64), templates=["{}"]) as edit:
        p1 = float(target_prob(model, tok, [req.text], [req.target_new]))
    loss = edit.info["loss"]
    assert all(math.isfinite(x) for x in loss) and loss[-1] < 0.2 * loss[0], loss
    assert p1 > 0.5 > p0, (p0, p1)
    assert same_weights(model, before)


@pytest.mark.parametrize("dtype", LOW)
def test_memit_low_precision(dtype):
    model, tok, _ = _tiny("gpt2", dtype)
    reqs = [_request(model, tok, p, s) for p, s in (("the city of {}", "anna berg"), ("the river of {}", "tom lee"))]
    texts, targets = [r.text for r in reqs], [r.target_new for r in reqs]
    p0 = target_prob(model, tok, texts, targets)
    covs = {l: key_covariance(model, tok, l, texts=TEXTS, cache=False, progress=False) for l in (0, 1, 2)}
    before = snapshot(model)
    with apply_memit(model, tok, reqs, layers=[0, 1, 2], lam=1.0, covs=covs, templates=TEMPLATES,
                     progress=False) as edit:
        p1 = target_prob(model, tok, texts, targets)
        assert all(edit.delta(n).dtype == dtype for n in edit.params)
    assert torch.isfinite(edit.info["targets"]).all()
    assert all(math.isfinite(x) for log in edit.info["target_logs"] for x in log["loss"])
    assert (p1 > p0).all(), (p0, p1)
    assert same_weights(model, before)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("autocast", [True, False])
def test_lora_train_low_precision(dtype, autocast):
    """peft's float32 adapters (autocast, the default of lora.wrap) are their own masters; float16/bfloat16
    adapters (autocast_adapter_dtype=False) get float32 copies. Either way the loss is finite and falls."""
    from peft import get_peft_model
    model, tok, _ = _tiny("llama", dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if autocast:
        pm = lora.wrap(model, "values", r=4, dropout=0.0)
    else:
        import copy
        pm = get_peft_model(copy.deepcopy(model), lora.lora_config(model, "values", r=4, dropout=0.0),
                            autocast_adapter_dtype=False)
    adapters = [p for p in pm.parameters() if p.requires_grad]
    assert {p.dtype for p in adapters} == {torch.float32 if autocast else dtype}
    h = lora_train.train(pm, tok, EXAMPLES, None, TrainConfig(epochs=4, lr=1e-2, batch_size=2, progress=False))
    assert all(math.isfinite(x) for x in h.step_loss + h.train_loss)
    assert h.train_loss[-1] < 0.7 * h.train_loss[0], h.train_loss
    assert all(torch.isfinite(p).all() for p in adapters)
    assert all(p.requires_grad and p.grad is None for p in adapters)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the copy was trained
