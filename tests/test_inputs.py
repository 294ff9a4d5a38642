"""Bad input raises ValueError naming the problem, never a silent wrong answer.

Unknown words, whitespace around targets, subjects inside words, prompts longer than the model,
editor config numbers, NaN covariances and updates, empty or repeated neurons and layers, mistyped
evaluation options; and the caller's tokenizer (padding_side, pad token) is left as it was.
"""
import math

import pytest
import torch

import kvlab
from kvlab.editing import (EditRequest, ROMEConfig, apply_rome, compute_value, evaluate_edits, finetune_edit,
                           same_weights, snapshot, target_prob)
from kvlab.editing import rome as rome_module
from kvlab.editing.kn import kn_edit
from kvlab.editing.memit import apply_memit
from kvlab.editing.metrics import generate
from kvlab.neurons import answer_prob
from kvlab.testing import bpe_tokenizer, tiny
from kvlab.text import encode, subject_token_range, token_ids

TEMPLATES = ["{}", "the king of france {}", "one two three {}"]   # tiny vocabulary has no "."
REQ = EditRequest("{} lives in", "anna berg", "rome", target_true="paris")




@pytest.fixture(scope="module")
def world():
    return kvlab.load()


@pytest.fixture(scope="module")
def gpt2():
    return tiny("gpt2")


def _eye(arch):
    return torch.eye(arch.d_ff)


# ----------------------------------------------------------------------------- 1. unknown words
def test_unknown_answer_raises_instead_of_scoring_unk(world):
    model, tok, _ = world
    from kvlab.world import build_world
    w = build_world(0)
    fact = next(f for f in w.facts if f.relation_id == "P551")
    other = next(c for c in w.cities if c != fact.object)
    prompt = f"{fact.subject} lives in"
    assert answer_prob(model, tok, prompt, fact.object) > answer_prob(model, tok, prompt, other)
    # "Paris" and "Berlin" are both <unk> to the world tokenizer: before, they got the same probability
    with pytest.raises(ValueError, match=r"'Paris' not in the vocabulary of tokenizer"):
        answer_prob(model, tok, prompt, "Paris")
    with pytest.raises(ValueError, match=r"'Berlin' not in the vocabulary"):
        target_prob(model, tok, [prompt], ["Berlin"])
    with pytest.raises(ValueError, match=r"'Berlin' not in the vocabulary"):
        token_ids(tok, "Berlin Kelmor")


def test_unknown_subject_is_not_edited(world):
    model, tok, arch = world
    req = EditRequest("{} lives in", "Zorblax Quux", "Kelmor")
    before = snapshot(model)
    for check in (True, False):
        with pytest.raises(ValueError, match=r"subject 'Zorblax Quux'.*'Zorblax', 'Quux' not in the vocabulary"):
            apply_rome(model, tok, req, cov=_eye(arch), templates=["{}"], v_steps=1, check=check)
    assert same_weights(model, before)


def test_unknown_word_in_prompt(world):
    model, tok, _ = world
    with pytest.raises(ValueError, match=r"prompt 'Zorblax lives in': 'Zorblax' not in the vocabulary"):
        encode(model, tok, "Zorblax lives in")
    with pytest.raises(ValueError, match="'Zorblax'"):
        target_prob(model, tok, ["Zorblax lives in"], ["Kelmor"])
    batch = encode(model, tok, "Zorblax lives in", allow_unk=True)       # read as <unk> on request
    assert int(batch.input_ids[0, 0]) == tok.unk_token_id


def test_byte_level_tokenizer_has_no_unknown_words():
    tok = bpe_tokenizer()
    assert tok.decode(token_ids(tok, "Zorblax")).strip() == "Zorblax"
    assert subject_token_range(tok, "Zorblax Quux lives in", "Zorblax Quux")[0] == 0


# ----------------------------------------------------------------------------- 2. whitespace in targets
@pytest.mark.parametrize("target", ["hockey ", "  hockey", "\thockey", "hockey\n", " hockey  "])
def test_target_with_whitespace_raises(world, target):
    with pytest.raises(ValueError, match="leading or trailing whitespace"):
        token_ids(world[1], target)


def test_target_whitespace_rules(world):
    tok = world[1]
    assert token_ids(tok, " hockey") == token_ids(tok, "hockey") and len(token_ids(tok, "hockey")) == 1
    for empty in ("", " ", "\n"):
        with pytest.raises(ValueError, match="empty target"):
            token_ids(tok, empty)


def test_whitespace_target_is_not_edited(world):
    model, tok, arch = world
    req = EditRequest("{} plays", "Uwe Keller", "hockey ")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"target 'hockey '.*whitespace"):
        apply_rome(model, tok, req, cov=_eye(arch), templates=["{}"], v_steps=1, check=False)
    with pytest.raises(ValueError, match="whitespace"):
        finetune_edit(model, tok, req, steps=1, check=False)
    assert same_weights(model, before)


# ----------------------------------------------------------------------------- 3. subject inside a word
def test_subject_inside_a_word_word_level(world, gpt2):
    model, tok, arch = world
    with pytest.raises(ValueError, match=r"subject 'Lars' occurs in prompt 'Larsen lives in' only .*'Larsen'"):
        subject_token_range(tok, "Larsen lives in", "Lars")
    before = snapshot(model)
    with pytest.raises(ValueError, match="'Lars'.*token boundaries"):
        apply_rome(model, tok, EditRequest.from_text("Larsen lives in", "Lars", "Kelmor"), cov=_eye(arch),
                   templates=["{}"], v_steps=1, check=False)
    assert same_weights(model, before)
    # a whole-word mention is found, even after a partial one; occurrences count whole mentions only
    assert subject_token_range(tok, "Larsen and Lars live in", "Lars") == (2, 3)
    with pytest.raises(ValueError, match="occurs 1 time"):
        subject_token_range(tok, "Larsen and Lars live in", "Lars", occurrence=1)
    # the tiny word-level tokenizer: "in" inside "king"
    tiny_tok = gpt2[1]
    with pytest.raises(ValueError, match="'in'.*'the king lives'"):
        subject_token_range(tiny_tok, "the king lives", "in")
    assert subject_token_range(tiny_tok, "the king lives in", "in") == (3, 4)


def test_subject_inside_a_word_bpe():
    tok = bpe_tokenizer()
    prompt = "the city of parisian rome"
    with pytest.raises(ValueError, match=r"'isian'.*inside the token\(s\) 'parisian'"):
        subject_token_range(tok, prompt, "isian")        # starts inside the token "Ġparis"
    with pytest.raises(ValueError, match="part of the word 'parisian'"):
        subject_token_range(tok, prompt, "paris")        # on a token boundary, but inside a word
    with pytest.raises(ValueError, match="part of the word 'Larsen'"):
        subject_token_range(tok, "Larsen lives in", "Lars")   # "L" "ar" "s" "en": boundaries, not a word
    ids = tok("Larsen and Lars live in")["input_ids"]
    b, e = subject_token_range(tok, "Larsen and Lars live in", "Lars")
    assert tok.decode(ids[b:e]).strip() == "Lars" and tok.decode(ids[:b]).strip() == "Larsen and"
    assert subject_token_range(tok, "the city of paris, rome", "paris") == subject_token_range(
        tok, "the city of paris rome", "paris")


# ----------------------------------------------------------------------------- 4. prompts longer than the model
def test_long_prompt_raises_naming_length_and_limit(gpt2):
    model, tok, arch = gpt2
    assert model.config.n_positions == 64
    long = " ".join(["the"] * 70)
    with pytest.raises(ValueError, match=r"70 tokens long but the model takes at most 64 \(config.n_positions\)"):
        encode(model, tok, long)
    with pytest.raises(ValueError, match="at most 64"):
        answer_prob(model, tok, long, "paris")
    with pytest.raises(ValueError, match="at most 64"):
        target_prob(model, tok, [long], ["paris"])
    with pytest.raises(ValueError, match="at most 64"):
        generate(model, tok, [long], length=3)
    # 62 tokens fit alone, but not behind a context template
    req = EditRequest(" ".join(["the"] * 58) + " {} lives in", "anna berg", "rome")
    before = snapshot(model)
    with pytest.raises(ValueError, match="65 tokens long but the model takes at most 64"):
        apply_rome(model, tok, req, layer=1, cov=_eye(arch), templates=["{}", "one two three {}"], v_steps=1,
                   check=False)
    assert same_weights(model, before)


# ----------------------------------------------------------------------------- 5. the caller's tokenizer
def test_tokenizer_padding_side_and_pad_token_are_left_alone():
    model, tok, arch = tiny("gpt2")
    prompts = ["anna berg lives in", "tom lives in"]

    def run():
        batch = encode(model, tok, prompts)
        out = [batch.input_ids, batch.attention_mask, batch.last, answer_prob(model, tok, prompts, "paris"),
               target_prob(model, tok, prompts, ["paris", "rome"])]
        with apply_rome(model, tok, REQ, layer=1, cov=_eye(arch), templates=TEMPLATES, v_steps=2, check=False) as e:
            out.append(e.delta())
        with finetune_edit(model, tok, REQ, layers=[1], steps=2, lr=1e-2, extra_prompts=["the city of {} is"],
                           check=False) as e:
            out.append(e.delta())
        with kn_edit(model, tok, REQ, neurons=[(1, 3)], check=False) as e:
            out.append(e.delta())
        return out

    tok.padding_side = "right"
    ref = run()
    tok.padding_side = "left"
    out = run()
    assert tok.padding_side == "left"
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    # no pad token: padded with eos, and none is added to the tokenizer
    tok.pad_token = None
    out = run()
    assert tok.pad_token is None and tok.padding_side == "left"
    for a, b in zip(ref, out):
        assert torch.equal(a, b)


def test_covariance_is_computed_right_padded_and_the_side_restored(monkeypatch):
    """key_covariance pads through the tokenizer: the editors hand it a right-padded one, then restore."""
    from kvlab.editing import memit as memit_module
    model, tok, arch = tiny("gpt2")
    seen = []

    def spy(model, tok, layer, **kw):
        seen.append(tok.padding_side)
        return torch.eye(arch.d_ff)

    monkeypatch.setattr(rome_module, "key_covariance", spy)
    monkeypatch.setattr(memit_module, "key_covariance", spy)
    tok.padding_side = "left"
    apply_rome(model, tok, REQ, layer=1, templates=TEMPLATES, v_steps=1, check=False).undo()
    apply_memit(model, tok, [REQ], layers=[1], templates=TEMPLATES, v_steps=1, check=False, progress=False).undo()
    assert seen == ["right", "right"] and tok.padding_side == "left"


# ----------------------------------------------------------------------------- 6. editors
@pytest.mark.parametrize("option", [dict(v_steps=-5), dict(v_steps=0), dict(v_steps=2.5), dict(v_lr=0.0),
                                    dict(v_lr=float("nan")), dict(clamp=-1.0), dict(weight_decay=-0.1),
                                    dict(kl_factor=float("inf")), dict(n_templates=-1), dict(template_length=0),
                                    dict(early_stop=-1.0), dict(cov_samples=0), dict(kl_prompt="is a"),
                                    dict(anchor="last")])
def test_rome_config_numbers_are_checked_up_front(gpt2, option):
    model, tok, arch = gpt2
    (name, _), = option.items()
    with pytest.raises(ValueError, match=f"apply_rome: {name} must be"):
        apply_rome(model, tok, REQ, layer=1, cov=_eye(arch), templates=TEMPLATES, check=False, **option)


def test_rome_config_is_not_changed_by_overrides(gpt2):
    model, tok, arch = gpt2
    cfg = ROMEConfig()
    with apply_rome(model, tok, REQ, layer=1, cov=_eye(arch), templates=TEMPLATES, config=cfg, v_steps=2,
                    check=False) as edit:
        assert edit.info["steps"] <= 2
    assert cfg.v_steps == ROMEConfig().v_steps


def test_compute_value_checks_numbers(gpt2):
    model, tok, _ = gpt2
    with pytest.raises(ValueError, match="compute_value: steps must be an integer ≥ 1, got -5"):
        compute_value(model, tok, REQ, 1, TEMPLATES, steps=-5)
    with pytest.raises(ValueError, match="compute_value: lr must be"):
        compute_value(model, tok, REQ, 1, TEMPLATES, lr=float("nan"))
    with pytest.raises(ValueError, match="no context templates"):
        compute_value(model, tok, REQ, 1, [])


def test_rome_nan_covariance_or_update_writes_nothing(gpt2, monkeypatch):
    model, tok, arch = gpt2
    before = snapshot(model)
    kw = dict(layer=1, templates=TEMPLATES, v_steps=2, check=False)
    nan, inf = _eye(arch), _eye(arch)
    nan[3, 4] = float("nan")
    inf[0, 0] = float("inf")
    for C in (nan, inf):
        with pytest.raises(ValueError, match="covariance has 1 NaN/inf entries"):
            apply_rome(model, tok, REQ, cov=C, **kw)
    with pytest.raises(ValueError, match=r"covariance must be a \(64, 64\) tensor, got \(3, 3\)"):
        apply_rome(model, tok, REQ, cov=torch.eye(3), **kw)
    monkeypatch.setattr(rome_module, "rome_update", lambda V, *a, **k: torch.full_like(V, float("nan")))
    with pytest.raises(ValueError, match="update of layer 1 has .* NaN/inf"):
        apply_rome(model, tok, REQ, cov=_eye(arch), **kw)
    assert same_weights(model, before)


def test_memit_checks_covariance_and_config(gpt2):
    model, tok, arch = gpt2
    before = snapshot(model)
    C = _eye(arch)
    C[1, 1] = float("nan")
    kw = dict(layers=[1], templates=TEMPLATES, check=False, progress=False)
    with pytest.raises(ValueError, match="layer 1: the covariance has 1 NaN/inf"):
        apply_memit(model, tok, [REQ], covs={1: C}, v_steps=1, **kw)
    with pytest.raises(ValueError, match="apply_memit: v_steps must be"):
        apply_memit(model, tok, [REQ], covs={1: _eye(arch)}, v_steps=-5, **kw)
    with pytest.raises(ValueError, match="apply_memit: λ must be"):
        apply_memit(model, tok, [REQ], covs={1: _eye(arch)}, lam=float("nan"), **kw)
    assert same_weights(model, before)


def test_kn_edit_rejects_empty_and_repeated_neurons(gpt2):
    model, tok, arch = gpt2
    before = snapshot(model)
    with pytest.raises(ValueError, match="kn_edit: neurons is empty"):
        kn_edit(model, tok, REQ, neurons=[], check=False)
    with pytest.raises(ValueError, match=r"neuron\(s\) \[\(1, 3\)\] given more than once"):
        kn_edit(model, tok, REQ, neurons=[(1, 3), (0, 5), (1, 3)], check=False)
    with pytest.raises(ValueError, match="more than once"):
        kn_edit(model, tok, REQ, neurons=[(1, 3), (1 - arch.n_layers, 3)], check=False)   # the same neuron
    with pytest.raises(ValueError, match="neuron index must be an integer, got 2.5"):
        kn_edit(model, tok, REQ, neurons=[(1, 2.5)], check=False)
    with pytest.raises(ValueError, match="lam must be"):
        kn_edit(model, tok, REQ, neurons=[(1, 3)], lam=float("nan"), check=False)
    assert same_weights(model, before)
    with kn_edit(model, tok, REQ, neurons=[(1, 3), (0, 5)], check=False) as edit:
        assert edit.info["neurons"] == [(1, 3), (0, 5)] and edit.n_params == 2 * arch.d_model


@pytest.mark.parametrize("option", [dict(steps=-1), dict(steps=0), dict(lr=0.0), dict(lr=-1e-3),
                                    dict(lr=float("nan")), dict(norm_constraint=-1.0), dict(early_stop=-1.0),
                                    dict(extra_prompts=["anna berg lives in"]), dict(extra_prompts="{} is in")])
def test_finetune_config_numbers(gpt2, option):
    model, tok, _ = gpt2
    (name, _), = option.items()
    with pytest.raises(ValueError, match=f"finetune_edit: {name}|every extra prompt"):
        finetune_edit(model, tok, REQ, layers=[1], check=False, **option)


def test_finetune_rejects_empty_layers(gpt2):
    from kvlab.editing import FTConfig
    model, tok, _ = gpt2
    before = snapshot(model)
    with pytest.raises(ValueError, match="no layers"):
        finetune_edit(model, tok, REQ, layers=[], steps=1, check=False)
    with pytest.raises(ValueError, match="no layers"):
        finetune_edit(model, tok, REQ, config=FTConfig(layers=[]), steps=1, check=False)
    assert same_weights(model, before)
    with finetune_edit(model, tok, REQ, layers=[1, 1, -2], steps=1, check=False) as edit:   # one layer, once
        assert edit.info["layers"] == [1] and len(edit.params) == 1


@pytest.mark.parametrize("bad", [2.5, "1", True])
def test_non_integer_layers_are_rejected_through_arch(gpt2, bad):
    model, tok, arch = gpt2
    before = snapshot(model)
    with pytest.raises(ValueError):
        finetune_edit(model, tok, REQ, layers=[bad], steps=1, check=False)
    with pytest.raises(ValueError):
        kn_edit(model, tok, REQ, neurons=[(bad, 3)], check=False)
    with pytest.raises(ValueError):
        apply_rome(model, tok, REQ, layer=bad, cov=_eye(arch), templates=TEMPLATES, v_steps=1, check=False)
    with pytest.raises(ValueError):
        apply_memit(model, tok, [REQ], layers=[bad], covs={1: _eye(arch)}, templates=TEMPLATES, v_steps=1,
                    check=False, progress=False)
    assert same_weights(model, before)


def _record():
    return {"case_id": 0,
            "requested_rewrite": {"prompt": "{} lives in", "subject": "anna berg", "relation_id": "P551",
                                  "target_new": {"str": "rome"}, "target_true": {"str": "paris"}},
            "paraphrase_prompts": ["the city of anna berg is"], "neighborhood_prompts": ["tom lee lives in"]}


def test_evaluate_edits_rejects_unknown_options(gpt2):
    model, tok, arch = gpt2
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'v_stepz' for apply_rome; valid options: .*v_steps"):
        evaluate_edits(model, tok, [_record()], apply_rome, progress=False, v_stepz=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'stepz' for finetune_edit; valid options: .*steps"):
        evaluate_edits(model, tok, [_record()], finetune_edit, progress=False, stepz=3)
    with pytest.raises(ValueError, match=r"'lamda' for kn_edit; valid options: .*lam, .*steps"):
        evaluate_edits(model, tok, [_record()], kn_edit, progress=False, lamda=3)
    # a bad value gets to the editor, which rejects every request: the error says why
    with pytest.raises(ValueError, match="every request was rejected by the editor: apply_rome: v_steps must be"):
        evaluate_edits(model, tok, [_record()], apply_rome, progress=False, layer=1, cov=_eye(arch),
                       templates=TEMPLATES, check=False, v_steps=-5)
    res = evaluate_edits(model, tok, [_record()], finetune_edit, progress=False, layers=[1], steps=2, check=False)
    assert res["n"] == 1 and res["skipped"] == 0


def test_prompt_with_other_braces_is_rejected_up_front():
    with pytest.raises(ValueError, match=r"'\{\} plays \{sport\}' has braces besides"):
        EditRequest("{} plays {sport}", "anna berg", "tennis")
    assert EditRequest("{} plays", "a {b}", "tennis").text == "a {b} plays"     # braces in a subject are text


def test_check_number_messages():
    from kvlab.editing.rome import check_number
    assert check_number("f", "x", 3, 1, integer=True) == 3
    assert math.isclose(check_number("f", "x", 0.5, 0, strict=True), 0.5)
    with pytest.raises(ValueError, match=r"f: x must be a finite number > 0, got 0"):
        check_number("f", "x", 0, 0, strict=True)
    with pytest.raises(ValueError, match="an integer"):
        check_number("f", "x", True, 0, integer=True)
