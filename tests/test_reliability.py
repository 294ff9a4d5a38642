"""The error contract (CONTRIBUTING.md) on the reading methods: unusable numbers, non-finite weights, empty or
repeated inputs and a model left in training mode raise or are handled, never a silently wrong answer.

Tracing noise (finite, > 0) and its draws; a NaN weight named by trace / attribute / coefficients / knowledge
neurons; empty or repeated neurons and kinds, NaN factors, thresholds and LoRA alphas; a subject followed or
preceded by a combining mark inside a word; the train/eval mode given back by LoRA training (also on
KeyboardInterrupt) and kept out of tracing and the memory coefficients.
"""
import copy
import math

import numpy as np
import pytest
import torch

from kvlab import lora, lora_train, memory, tracing
from kvlab import neurons as N
from kvlab.arch import adapter
from kvlab.lora_train import Example, TrainConfig
from kvlab.testing import bpe_tokenizer, tiny
from kvlab.text import subject_token_range
from kvlab.editing.base import current_answer

PROMPT, SUBJECT, ANSWER = "of anna berg is in", "anna berg", "paris"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def gpt2():
    return tiny("gpt2")


def no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def with_dropout(p: float = 0.3):
    """A tiny GPT-2 whose dropout modules drop with probability ``p`` (tiny() builds them with p = 0)."""
    model, tok, arch = tiny("gpt2")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    return model, tok, arch


# ----------------------------------------------------------------------------- 2. tracing noise
@pytest.mark.parametrize("noise", [NAN, INF, 0.0, -0.5, 0, torch.tensor(NAN), "0.3", True])
def test_trace_rejects_noise_it_cannot_use(gpt2, noise):
    model, tok, arch = gpt2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"trace: noise must be a finite number > 0 .*got "):
        tracing.trace(model, tok, PROMPT, SUBJECT, noise=noise, samples=2)
    with pytest.raises(ValueError, match=r"trace: noise must be a finite number > 0"):
        tracing.trace_all_kinds(model, tok, PROMPT, SUBJECT, noise=noise, samples=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and no_hooks(model)


def test_trace_noise_message_names_the_value(gpt2):
    model, tok, _ = gpt2
    with pytest.raises(ValueError, match=r"noise must be a finite number > 0 \(ν.*None = 3σ.*\), got nan"):
        tracing.trace(model, tok, PROMPT, SUBJECT, noise=NAN, samples=2)
    with pytest.raises(ValueError, match=r"got -0.5"):
        tracing.trace(model, tok, PROMPT, SUBJECT, noise=-0.5, samples=2)


def test_trace_accepts_noise_in_any_numeric_form(gpt2):
    """Python, numpy and torch numbers all work, and give the same trace."""
    model, tok, _ = gpt2
    ref = tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.5, samples=2)
    for noise in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5]), np.array(0.5)):
        r = tracing.trace(model, tok, PROMPT, SUBJECT, noise=noise, samples=2)
        assert torch.allclose(r.scores, ref.scores) and r.noise == pytest.approx(0.5)
    assert tracing.trace(model, tok, PROMPT, SUBJECT, noise=1, samples=2).noise == 1.0


def test_tracing_siblings_reject_unusable_noise(gpt2):
    model, tok, arch = gpt2
    facts = [(PROMPT, SUBJECT, None)]
    for bad in (NAN, INF, 0.0, -0.5):
        with pytest.raises(ValueError, match=r"average_effects: noise must be a finite number > 0"):
            tracing.average_effects(model, tok, facts, noise=bad, samples=2, progress=False)
    with pytest.raises(ValueError, match=r"noise_sweep: each of multiples must be a finite number > 0 .*got nan"):
        tracing.noise_sweep(model, tok, PROMPT, SUBJECT, multiples=[1, NAN], samples=2)
    with pytest.raises(ValueError, match=r"noise_sweep: each of multiples .*got 0"):
        tracing.noise_sweep(model, tok, PROMPT, SUBJECT, multiples=[0], samples=2)
    with pytest.raises(ValueError, match=r"noise_sweep: multiples is empty"):
        tracing.noise_sweep(model, tok, PROMPT, SUBJECT, multiples=[], samples=2)
    with pytest.raises(ValueError, match=r"noise_sweep: sigma must be a finite number > 0 .*got inf"):
        tracing.noise_sweep(model, tok, PROMPT, SUBJECT, sigma=INF, samples=2)
    for bad in (NAN, INF, 0, -1.0):
        with pytest.raises(ValueError, match=r"noise_level: factor must be a finite number > 0"):
            tracing.noise_level(model, tok, [SUBJECT], factor=bad)
    eps = torch.full((2, 2, arch.d_model), NAN)
    with pytest.raises(ValueError, match=r"trace: eps has 128 NaN/inf entries"):
        tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.5, samples=2, eps=eps)
    eps = torch.zeros(2, 2, arch.d_model)
    eps[1, 0, 3] = INF
    with pytest.raises(ValueError, match=r"trace: eps has 1 NaN/inf entries"):
        tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.5, samples=2, eps=eps)
    with pytest.raises(ValueError, match=r"trace: samples must be an integer ≥ 1, got 2.5"):
        tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.5, samples=2.5)
    with pytest.raises(ValueError, match=r"trace: window must be an integer ≥ 1, got nan"):
        tracing.trace(model, tok, PROMPT, SUBJECT, kind="mlp", noise=0.5, samples=2, window=NAN)


# ----------------------------------------------------------------------------- 3. a NaN weight
@pytest.fixture(scope="module")
def nan_model():
    """A tiny GPT-2 with one NaN in the value matrix of layer 1 (a copy: the shared model stays clean)."""
    model, tok, arch = tiny("gpt2")
    model = copy.deepcopy(model)
    arch = adapter(model)
    with torch.no_grad():
        arch.value_matrix(1)[5, 3] = NAN
    return model, tok, arch


NAMED = r"'transformer\.h\.1\.mlp\.c_proj\.weight' has 1 NaN/inf entry \(first at index \[5, 3\]\)"


def test_nan_weight_is_named_not_returned(nan_model):
    model, tok, arch = nan_model
    calls = {
        "trace": lambda: tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.5, samples=2),
        "trace_all_kinds": lambda: tracing.trace_all_kinds(model, tok, PROMPT, SUBJECT, noise=0.5, samples=2),
        "attribute": lambda: N.attribute(model, tok, PROMPT, ANSWER, steps=2),
        "attribute (plain)": lambda: N.attribute(model, tok, PROMPT, ANSWER, steps=2, method="plain"),
        "knowledge_neurons": lambda: N.knowledge_neurons(model, tok, [PROMPT, PROMPT], ANSWER, steps=2),
        "coefficients": lambda: memory.coefficients(model, tok, PROMPT),
        "coefficients of layer 2": lambda: memory.coefficients(model, tok, PROMPT, 2),
        "decompose": lambda: memory.decompose(model, tok, PROMPT, 1),
        "answer_prob": lambda: N.answer_prob(model, tok, PROMPT, ANSWER),
        "intervention_effect": lambda: N.intervention_effect(model, tok, [(0, 1)], PROMPT, ANSWER, 0.0),
        "activation_neurons": lambda: N.activation_neurons(model, tok, PROMPT, [(2, 1)]),
        "current_answer": lambda: current_answer(model, tok, PROMPT),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=NAMED):
            out = call()
            pytest.fail(f"{what} returned {out!r} from a model with a NaN weight")
    assert no_hooks(model)


def test_nan_weight_not_read_is_no_error(gpt2):
    """Only a non-finite result raises: coefficients of a layer below the NaN, and a NaN in the position
    embedding of a position past the prompt, leave the answer finite and exact."""
    model, tok, arch = gpt2
    m = copy.deepcopy(model)
    a = adapter(m)
    with torch.no_grad():
        a.value_matrix(1)[5, 3] = NAN
    assert torch.equal(memory.coefficients(m, tok, PROMPT, 1), memory.coefficients(model, tok, PROMPT, 1))
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.transformer.wpe.weight[40] = NAN                      # position 40: the prompt has 5 tokens
    r = tracing.trace(m, tok, PROMPT, SUBJECT, noise=0.5, samples=2)
    assert torch.equal(r.scores, tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.5, samples=2).scores)


def test_nan_embedding_is_named_by_noise_level(gpt2):
    model, tok, arch = gpt2
    m = copy.deepcopy(model)
    with torch.no_grad():
        adapter(m).embed.weight[tok(SUBJECT, add_special_tokens=False)["input_ids"][0]] = NAN
    with pytest.raises(ValueError, match=r"noise_level: .*'transformer\.wte\.weight' has \d+ NaN/inf entr"):
        tracing.noise_level(m, tok, [SUBJECT])
    with pytest.raises(ValueError, match=r"'transformer\.wte\.weight'"):
        tracing.trace(m, tok, PROMPT, SUBJECT, samples=2)


def test_coarse_neurons_rejects_nan_scores():
    with pytest.raises(ValueError, match="coarse_neurons: the attribution scores have 1 NaN/inf"):
        N.coarse_neurons(torch.tensor([[NAN, 1.0], [0.5, 0.2]]))


# ----------------------------------------------------------------------------- 6. error-contract gaps
def test_interventions_reject_empty_repeated_neurons_and_bad_factors(gpt2):
    model, tok, arch = gpt2
    with pytest.raises(ValueError, match=r"intervention_effect: neurons is empty"):
        N.intervention_effect(model, tok, [], PROMPT, ANSWER, 0.0)
    for bad in (NAN, INF, -INF, "2"):
        with pytest.raises(ValueError, match=r"intervention_effect: factor must be a finite number .*got "):
            N.intervention_effect(model, tok, [(1, 2)], PROMPT, ANSWER, bad)
    with pytest.raises(ValueError, match=r"intervention_effect: neuron\(s\) \[\(1, 2\)\] given more than once"):
        N.intervention_effect(model, tok, [(1, 2), (1, 2)], PROMPT, ANSWER, 0.0)
    with pytest.raises(ValueError, match=r"scale_neurons: neuron\(s\) \[\(1, 2\)\] given more than once"):
        with N.suppress(model, [(1, 2), (0, 3), (1, 2)]):
            pass
    with pytest.raises(ValueError, match=r"scale_neurons: neurons is empty"):
        with N.suppress(model, []):
            pass
    with pytest.raises(ValueError, match=r"scale_neurons: factor must be a finite number .*got nan"):
        with N.amplify(model, [(1, 2)], factor=NAN):
            pass
    with pytest.raises(ValueError, match=r"random_neurons: like is empty"):
        N.random_neurons(model, [])
    with pytest.raises(ValueError, match=r"activation_neurons: neuron\(s\) \[\(0, 1\)\] given more than once"):
        N.activation_neurons(model, tok, PROMPT, [(0, 1), (0, 1)])
    assert no_hooks(model)
    # the factors the notebooks use, in any numeric form, still work
    for factor in (0.0, 1, 2.0, np.float32(2.0), torch.tensor(0.0)):
        e = N.intervention_effect(model, tok, [(1, 2)], PROMPT, ANSWER, factor)
        assert e.shape == (1,) and torch.isfinite(e).all()


def test_average_effects_and_trace_all_kinds_reject_empty_or_repeated_kinds(gpt2):
    model, tok, arch = gpt2
    facts = [(PROMPT, SUBJECT, None)]
    with pytest.raises(ValueError, match=r"average_effects: kinds is empty"):
        tracing.average_effects(model, tok, facts, kinds=(), noise=0.5, samples=2, progress=False)
    with pytest.raises(ValueError, match=r"average_effects: kind\(s\) \['mlp'\] given more than once"):
        tracing.average_effects(model, tok, facts, kinds=("mlp", "mlp"), noise=0.5, samples=2, progress=False)
    with pytest.raises(ValueError, match=r"trace_all_kinds: kinds is empty"):
        tracing.trace_all_kinds(model, tok, PROMPT, SUBJECT, kinds=[], noise=0.5, samples=2)
    one = tracing.average_effects(model, tok, facts, kinds="mlp", noise=0.5, samples=2, window=3, progress=False)
    assert list(one.effects) == ["mlp"]


def test_sparsity_rejects_nan_threshold_and_empty_input():
    m = torch.tensor([[[0.5, -1.0, 2.0, 0.0]]])                    # (1, 1, 4)
    for bad in (NAN, INF, None):
        with pytest.raises(ValueError, match=r"sparsity: threshold must be a finite number .*got "):
            memory.sparsity(m, threshold=bad)
    with pytest.raises(ValueError, match=r"sparsity: mask selects no position"):
        memory.sparsity(m, mask=torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"sparsity: m has 1 NaN/inf"):
        memory.sparsity(torch.tensor([[[NAN, 1.0]]]))
    assert memory.sparsity(m) == 0.5 and memory.sparsity(m, threshold=np.float64(1.0)) == 0.25
    assert memory.sparsity(m, mask=torch.ones(1, 1, dtype=torch.long)) == 0.5


@pytest.mark.parametrize("alpha", [NAN, INF, 0, -16])
def test_lora_wrap_rejects_unusable_alpha(gpt2, alpha):
    model, tok, arch = gpt2
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0 .*got "):
        lora.wrap(model, "keys", r=2, alpha=alpha)
    assert not lora.lora_modules(model) and not hasattr(model, "peft_config")


@pytest.mark.parametrize("field,value", [("lr", NAN), ("lr", INF), ("weight_decay", NAN), ("max_grad_norm", NAN),
                                         ("warmup", NAN), ("warmup", 2.0), ("epochs", 0), ("batch_size", 1.5)])
def test_train_config_rejects_unusable_numbers(gpt2, field, value):
    model, tok, arch = gpt2
    pm = lora.wrap(model, "keys", r=2, dropout=0.0)
    with pytest.raises(ValueError, match=rf"lora_train.train: {field} must be .*got {value!r}"):
        lora_train.train(pm, tok, [Example("anna berg lives in", "paris")], None,
                         TrainConfig(progress=False, **{field: value}))


def test_refine_rejects_nan_step():
    with pytest.raises(ValueError, match=r"refine: step must be a finite number > 0 and < 1 .*got nan"):
        N.refine([[(0, 1), (0, 2)], [(0, 1), (0, 2)]], step=NAN)


# ----------------------------------------------------------------------------- 7. combining marks
def test_subject_followed_or_preceded_by_a_combining_mark_is_inside_a_word():
    tok = bpe_tokenizer()
    for prompt in ("the cafe\u0301 is in paris",            # "café" with a combining acute: "cafe" is inside it
                   "the cafe\u20dd is in paris",            # an enclosing mark (Me)
                   "the e\u0301cafe is in paris"):          # a mark on the letter before: one word "écafe"
        with pytest.raises(ValueError, match=r"subject 'cafe' occurs in prompt .* part of the word"):
            subject_token_range(tok, prompt, "cafe")
    ids = tok("the cafe is in paris")["input_ids"]
    b, e = subject_token_range(tok, "the cafe is in paris", "cafe")
    assert tok.decode(ids[b:e]).strip() == "cafe"
    assert subject_token_range(tok, "the e\u0301 cafe is in", "cafe")[1] > 0    # a space between: a new word
    b, e = subject_token_range(tok, "the cafe\u0301 is in paris", "cafe\u0301")  # the whole decomposed word
    assert tok.decode(tok("the cafe\u0301 is in paris")["input_ids"][b:e]).strip() == "cafe\u0301"


# ----------------------------------------------------------------------------- 8. train/eval mode
def _step_interrupt(monkeypatch):
    """Make the first *training* step (the model in training mode) raise KeyboardInterrupt."""
    real = lora_train.answer_loss

    def loss(model, *batch):
        if model.training:
            raise KeyboardInterrupt
        return real(model, *batch)
    monkeypatch.setattr(lora_train, "answer_loss", loss)


def test_train_interrupted_gives_the_model_back_in_eval_mode(gpt2, monkeypatch):
    model, tok, arch = gpt2
    pm = lora.wrap(model, "keys", r=2, dropout=0.5).eval()     # LoRA dropout: random in training mode
    _step_interrupt(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        lora_train.train(pm, tok, [Example("anna berg lives in", "paris")] * 4, None,
                         TrainConfig(epochs=1, batch_size=2, progress=False))
    assert not any(m.training for m in pm.modules())
    ids = torch.tensor([tok("anna berg lives in")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, pm(input_ids=ids).logits)


def test_lora_wrap_gives_back_the_mode_of_the_model(gpt2):
    """peft's new modules (the LoRA dropout too) start in training mode: wrap gives the model's own mode back,
    so forward passes of a freshly wrapped kvlab.load() model are deterministic."""
    model, tok, arch = gpt2
    pm = lora.wrap(model, "keys", r=2, dropout=0.5)
    assert not model.training and not any(m.training for m in pm.modules())
    ids = torch.tensor([tok("anna berg lives in")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, pm(input_ids=ids).logits)


def test_train_gives_back_the_mode_it_was_handed(gpt2, monkeypatch):
    model, tok, arch = gpt2
    pm = lora.wrap(model, "keys", r=2, dropout=0.5)
    pm.train()
    modes = [m.training for m in pm.modules()]
    lora_train.train(pm, tok, [Example("anna berg lives in", "paris")] * 2, None,
                     TrainConfig(epochs=1, batch_size=2, progress=False))
    assert [m.training for m in pm.modules()] == modes
    _step_interrupt(monkeypatch)                                # and on an interrupt too
    with pytest.raises(KeyboardInterrupt):
        lora_train.train(pm, tok, [Example("anna berg lives in", "paris")] * 2, None,
                         TrainConfig(epochs=1, batch_size=2, progress=False))
    assert [m.training for m in pm.modules()] == modes


def test_trace_and_coefficients_run_in_eval_mode_and_give_the_mode_back():
    """A model left in training mode (dropout on) traces and reads coefficients as in eval mode: deterministic,
    equal to the eval-mode result; its mode (every submodule's) is given back."""
    model, tok, arch = with_dropout(0.3)
    ref = tracing.trace(model, tok, PROMPT, SUBJECT, kind="mlp", noise=0.5, samples=2, window=3)
    ref_m = memory.coefficients(model, tok, PROMPT, 1)
    ref_attr = N.attribute(model, tok, PROMPT, ANSWER, steps=2).scores
    model.train()
    model.transformer.h[0].eval()                               # a mixed state, given back as it was
    modes = [m.training for m in model.modules()]
    for _ in range(2):
        r = tracing.trace(model, tok, PROMPT, SUBJECT, kind="mlp", noise=0.5, samples=2, window=3)
        assert torch.equal(r.scores, ref.scores) and r.low_score == ref.low_score and r.high_score == ref.high_score
        assert torch.equal(memory.coefficients(model, tok, PROMPT, 1), ref_m)
        assert torch.equal(N.attribute(model, tok, PROMPT, ANSWER, steps=2).scores, ref_attr)
        assert [m.training for m in model.modules()] == modes
    tr = tracing.Tracer(model, tok, PROMPT, SUBJECT, noise=0.5, samples=2)   # the Tracer object too
    assert torch.equal(tr.trace("mlp", 3).scores, ref.scores) and [m.training for m in model.modules()] == modes
    assert math.isfinite(tr.low_score)
