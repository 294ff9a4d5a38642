import pytest
import torch

from kvlab import lora, lora_train
from kvlab.lora_train import Example, TrainConfig
from kvlab.testing import FAMILIES, tiny

R = 3


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    return tiny(request.param)


def expected_names(model, arch, role):
    """Names of the modules a role should adapt, found from the adapter's modules (not from kvlab.lora)."""
    names = []
    for l in range(arch.n_layers):
        if role == "keys":
            names += [arch.module_name(m) for m in arch.key_modules(l)]
        elif role == "values":
            names.append(arch.module_name(arch.value_module(l)))
        else:
            names += [f"{arch.module_name(arch.layer(l))}.{p}" for p in arch.family.attn_modules]
    return names


@pytest.mark.parametrize("role", ["keys", "values", "attention"])
def test_role_targets_exactly_the_right_modules(loaded, role):
    model, tok, arch = loaded
    pm = lora.wrap(model, role, r=R, dropout=0.0)
    wrapped = lora.lora_modules(pm)
    assert sorted(wrapped) == sorted(expected_names(model, arch, role))
    leaves = {"keys": arch.key_names(), "values": arch.value_names(), "attention": arch.attention_names()}[role]
    assert {n.split(".")[-1] for n in wrapped} == set(leaves)
    # the count follows r·(d_in + d_out) per matrix, from the sizes of the model
    d, f = arch.d_model, arch.d_ff
    if role == "keys":
        formula = arch.n_layers * len(arch.key_names()) * R * (d + f)
    elif role == "values":
        formula = arch.n_layers * R * (f + d)
    else:
        formula = lora.lora_param_count(model, role, R)
    trainable, total, frac = lora.trainable_parameters(pm)
    assert trainable == formula == lora.lora_param_count(model, role, R)
    assert total == sum(p.numel() for p in model.parameters()) + trainable
    assert frac == pytest.approx(trainable / total)
    # only LoRA matrices train
    assert all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)


def test_attention_parameter_count_by_hand(loaded):
    """Attention matrices' (d_in, d_out) read from the weights, summed by hand."""
    model, tok, arch = loaded
    n = 0
    for l in range(arch.n_layers):
        for p in arch.family.attn_modules:
            w = arch.layer(l).get_submodule(p).weight
            n += R * (w.shape[0] + w.shape[1])
    assert lora.lora_param_count(model, "attention", R) == n


def test_wrapping_leaves_the_model_untouched_and_starts_at_identity(loaded):
    model, tok, arch = loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tok(["anna berg lives in paris"], return_tensors="pt")["input_ids"]
    pm = lora.wrap(model, ("attention", "keys", "values"), r=R)
    pm.eval()
    with torch.no_grad():  # B = 0 at init: the wrapped model computes the same function
        torch.testing.assert_close(pm(input_ids=ids).logits, model(input_ids=ids).logits)
    assert lora.lora_modules(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gpt2_c_proj_ambiguity():
    model, tok, arch = tiny("gpt2")
    values = lora.target_modules(model, "values")
    attention = lora.target_modules(model, "attention")
    assert all(n.endswith("mlp.c_proj") for n in values) and len(values) == arch.n_layers
    assert not any(".mlp." in n for n in attention)
    assert sum(n.endswith("attn.c_proj") for n in attention) == arch.n_layers
    with pytest.raises(ValueError, match="ambiguous"):
        lora.target_modules(model, "c_proj")
    assert lora.target_modules(model, "attn.c_proj") == [n for n in attention if n.endswith("attn.c_proj")]
    assert lora.target_modules(model, "c_fc") == lora.target_modules(model, "keys")


def test_layer_selection_and_bad_input():
    model, tok, arch = tiny("llama")
    names = lora.target_modules(model, "keys", layers=[1])
    assert names == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert lora.target_modules(model, "values", layers=-1) == ["model.layers.2.mlp.down_proj"]
    pm = lora.wrap(model, "keys", r=2, layers=[0, 2])
    assert sorted(lora.lora_modules(pm)) == sorted(lora.target_modules(model, "keys", layers=[0, 2]))
    for bad in (dict(roles="ffn"), dict(roles=()), dict(roles="keys", layers=[7]), dict(roles="keys", layers=[])):
        with pytest.raises(ValueError):
            lora.target_modules(model, **bad)
    with pytest.raises(ValueError, match="rank"):
        lora.lora_config(model, "keys", r=0)
    with pytest.raises(ValueError, match="n_params"):
        lora.equal_param_rank(model, "keys", 0)


def test_equal_param_rank():
    llama, _, a = tiny("llama")
    n_keys = lora.lora_param_count(llama, "keys", 4)            # gate + up: two matrices per layer
    assert lora.equal_param_rank(llama, "values", n_keys) == 8  # one matrix: twice the rank
    assert lora.equal_param_rank(llama, "keys", n_keys) == 4
    gpt2, _, _ = tiny("gpt2")
    n = lora.lora_param_count(gpt2, "keys", 8)
    assert lora.equal_param_rank(gpt2, "values", n) == 8        # c_fc and c_proj have the same size
    r_att = lora.equal_param_rank(gpt2, "attention", n)
    per_rank = lora.lora_param_count(gpt2, "attention", 1)
    assert all(abs(r_att * per_rank - n) <= abs(r * per_rank - n) for r in range(1, 20))


def test_qiu_preset():
    llama, _, _ = tiny("llama")
    assert lora.qiu_roles(llama, "keys") == ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")
    assert lora.qiu_roles(llama, "keys", key_proj="gate_proj")[-1] == "mlp.gate_proj"
    assert lora.qiu_roles(llama, "values") == ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    cfg = lora.lora_config(llama, lora.qiu_roles(llama, "keys"))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    assert sorted(cfg.target_modules)[0] == "model.layers.0.mlp.up_proj" and len(cfg.target_modules) == 9
    gpt2, _, _ = tiny("gpt2")
    assert lora.qiu_roles(gpt2, "values") == ("attn.c_attn", "mlp.c_proj")
    with pytest.raises(ValueError):
        lora.qiu_roles(llama, "both")
    with pytest.raises(ValueError):
        lora.qiu_roles(gpt2, "keys", key_proj="up_proj")


EXAMPLES = [Example("anna berg lives in", "paris", "a"), Example("tom lee plays the", "piano", "b"),
            Example("the capital of france is", "paris", "a"), Example("anna berg speaks", "french", "b"),
            Example("the king of italy speaks", "italian", "a"), Example("tom lee works as a", "doctor", "b")]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_lowers_loss_and_unload_restores_base(family):
    model, tok, arch = tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = lora.wrap(model, "values", r=4, dropout=0.0, copy_model=False)   # wraps the model itself
    h = lora_train.train(pm, tok, EXAMPLES * 2, EXAMPLES, TrainConfig(epochs=6, lr=1e-2, batch_size=4,
                                                                       progress=False))
    assert len(h.train_loss) == len(h.eval_acc) == 7 and len(h.step_loss) == 18
    assert h.eval_loss[-1] < 0.5 * h.eval_loss[0]
    assert h.eval_acc[-1] > h.eval_acc[0]
    assert set(h.task_acc[-1]) == {"a", "b"} and h.seconds > 0
    assert h.trainable == lora.lora_param_count(model, "values", 4)
    base = lora.unload(pm)
    assert base is model and lora.lora_modules(base) == []
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_merge_keeps_the_update():
    model, tok, arch = tiny("gptj")
    pm = lora.wrap(model, "keys", r=4, dropout=0.0)
    lora_train.train(pm, tok, EXAMPLES, None, TrainConfig(epochs=2, lr=1e-2, progress=False))
    ids = tok(["anna berg lives in"], return_tensors="pt")["input_ids"]
    pm.eval()
    with torch.no_grad():
        tuned = pm(input_ids=ids).logits
        merged = lora.merge(pm)(input_ids=ids).logits
        base = model(input_ids=ids).logits
    torch.testing.assert_close(merged, tuned, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(tuned, base)


def test_answer_loss_scores_only_answer_tokens():
    model, tok, arch = tiny("gpt2")
    items = lora_train._tokenize(tok, [Example("anna berg lives in", "paris"), Example("tom lee", "plays the piano")])
    ids, mask, ans = lora_train.collate(tok, items, "cpu")
    assert ans.sum().item() == 1 + 3 and mask.sum().item() == 5 + 5
    assert ans[0].nonzero().flatten().tolist() == [4] and ans[1].nonzero().flatten().tolist() == [2, 3, 4]
    with torch.no_grad():
        loss, hit = lora_train.answer_loss(model, ids, mask, ans)
        lp0 = model(input_ids=ids[:1, :5]).logits[0].log_softmax(-1)   # each row alone, unpadded
        lp1 = model(input_ids=ids[1:, :5]).logits[0].log_softmax(-1)
    nll = [-lp0[3, ids[0, 4]], -lp1[1, ids[1, 2]], -lp1[2, ids[1, 3]], -lp1[3, ids[1, 4]]]
    assert loss.item() == pytest.approx(sum(nll).item() / 4, rel=1e-5)
    assert hit[0].item() == (lp0[3].argmax() == ids[0, 4]).item()
    with pytest.raises(ValueError):
        lora_train.train(model, tok, EXAMPLES)                # nothing trainable
    with pytest.raises(ValueError):
        lora_train._tokenize(tok, [Example("anna", " ")])


def test_world_tasks_split_people_and_stay_in_vocabulary():
    from kvlab.world import build_world, world_tokenizer

    world, tok = build_world(0), world_tokenizer()
    train, test = lora_train.world_tasks(world, n_train=300, n_test=150, seed=1)
    assert len(train) == 300 and len(test) == 150
    assert {e.task for e in train} == {e.task for e in test} == set(lora_train.TASKS)
    who = lambda exs: {p for e in exs for p in world.people if p in e.prompt}  # noqa: E731
    assert who(train) and who(test) and not who(train) & who(test)
    unk = tok.convert_tokens_to_ids("<unk>")
    for e in train + test:
        assert unk not in tok(e.prompt + " " + e.answer)["input_ids"], e
    verify = [e.answer for e in train if e.task == "verify"]
    assert 0.3 < verify.count("yes") / len(verify) < 0.7
    for e in train:
        if e.task == "question":
            subject = e.prompt.split(" : ")[0]
            rel = next(r for r, w in lora_train.RELATION_WORDS.items() if e.prompt.endswith(f": {w} ?"))
            assert world.object_of(subject, rel) == e.answer
    with pytest.raises(ValueError):
        lora_train.world_tasks(world, tasks=("translate",))


def _lora_A(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_A" in n}


def test_wrap_is_seeded_without_touching_the_callers_rng():
    model, tok, arch = tiny("gpt2")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(3)                      # what the caller's next draw would be
    torch.set_rng_state(state)
    a = _lora_A(lora.wrap(model, "keys", r=R, seed=5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(3), expected)
    b = _lora_A(lora.wrap(model, "keys", r=R, seed=5))
    c = _lora_A(lora.wrap(model, "keys", r=R, seed=6))
    assert a.keys() == b.keys() == c.keys() and a
    assert all(torch.equal(a[n], b[n]) for n in a)          # same seed: same A
    assert not all(torch.equal(a[n], c[n]) for n in a)      # another seed: another A


@pytest.mark.parametrize("copy_model", [False, True])
def test_wrapping_twice_is_refused(copy_model):
    model, tok, arch = tiny("gpt2")
    pm = lora.wrap(model, "values", r=R, copy_model=False)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()                           # as if trained
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    for again in (model, pm):
        with pytest.raises(ValueError, match="already wrapped by peft"):
            lora.wrap(again, "keys", r=R, copy_model=copy_model)
    after = pm.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert sorted(lora.lora_modules(pm)) == sorted(lora.target_modules(model, "values"))
    base = lora.unload(pm)
    assert lora.lora_modules(lora.wrap(base, "keys", r=R, copy_model=copy_model))   # unwrapped: fine again


def test_layers_follow_the_one_rule():
    model, tok, arch = tiny("llama")
    for bad in ("12", "1", True, 2.5, [1, "2"], [], 3, [-4]):
        with pytest.raises(ValueError):
            lora.target_modules(model, "keys", layers=bad)
    import numpy as np
    assert lora.target_modules(model, "values", layers=np.int64(1)) == ["model.layers.1.mlp.down_proj"]
    assert lora.target_modules(model, "values", layers=torch.tensor([2, 0])) == \
        ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
