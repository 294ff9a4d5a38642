"""Stand-ins for real models (kvlab.standin) and the real-format data they are trained on."""
import json

import pytest
import torch

import kvlab
from kvlab import checks, standin
from kvlab.data import load_counterfact, load_known
from kvlab.editing.metrics import target_nll
from kvlab.text import subject_token_range, token_ids

TINY = standin.Config(layers=2, d_model=32, d_ff=64, heads=4, kv_heads=2, positions=96, vocab=600, steps=3, batch=8)


@pytest.fixture(scope="module")
def texts():
    return standin.fact_texts()


@pytest.fixture(scope="module", params=standin.FAMILIES)
def tok(request, texts):
    make = standin.gpt2_tokenizer if request.param == "gpt2" else standin.llama_tokenizer
    t = make(texts, 600)
    t.family = request.param
    return t


def test_real_format_files_load_unchanged():
    raw_known = json.loads(standin.KNOWN_FILE.read_text())
    known = load_known(standin.KNOWN_FILE)
    assert len(known) == len(raw_known) >= 100
    for rec, k in zip(raw_known, known):
        assert {f: getattr(k, f) for f in rec} == rec          # every field, unchanged
    head = json.loads((standin.DATA_DIR.parent.parent / "tests" / "data" / "known_1000_head.json").read_text())
    by_id = {r["known_id"]: r for r in raw_known}
    assert all(by_id[h["known_id"]] == h for h in head)          # the same records as in ROME's file

    raw_cf = json.loads(standin.COUNTERFACT_FILE.read_text())
    cases = load_counterfact(standin.COUNTERFACT_FILE)
    assert len(cases) == len(raw_cf) >= 100
    for rec, c in zip(raw_cf, cases):
        rw = rec["requested_rewrite"]
        assert (c.case_id, c.prompt, c.subject, c.relation_id) == (rec["case_id"], rw["prompt"], rw["subject"],
                                                                   rw["relation_id"])
        for side in ("target_new", "target_true"):
            assert {"str": getattr(c, side).str, "id": getattr(c, side).id} == rw[side]
            assert isinstance(rw[side]["id"], str)
        for f in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
            assert getattr(c, f) == rec[f]
    assert cases[0].target_new.id == "Q1860" and cases[0].target_true.id == "Q150"   # ROME's case 0, verbatim
    assert len(cases[0].neighborhood_prompts) == 10 and len(cases[0].generation_prompts) == 10


def _subject_checks(tok, prompt, subject):
    ids = tok(prompt)["input_ids"]
    t0, t1 = subject_token_range(tok, prompt, subject)
    pieces = tok.convert_ids_to_tokens(ids[t0:t1])
    assert subject in tok.decode(ids[t0:t1])                    # ROME: punctuation in a subject token stays
    if tok.family == "llama":                                   # BOS first, then "▁" marks the subject's words
        assert ids[0] == tok.bos_token_id and t0 >= 1
        assert pieces[0].startswith("▁") or tok.convert_ids_to_tokens(ids[t0 - 1]) == "▁"   # a lone "▁" stays out
    else:                                                       # GPT-2: no BOS; a subject's first token carries its
        assert ids[0] != tok.bos_token_id                       # space ("Ġ") unless it starts the prompt or BPE split
        assert not pieces[0].startswith("Ġ") or not prompt.startswith(subject)  # the space off ("Ġ", "Y", ...)
    # ROME's find_token_range: the tokens whose text overlaps the subject's characters (for sentencepiece,
    # each piece with "▁" read as a space: decoding one token alone drops its leading space)
    start = prompt.index(subject)
    spans, pos = [], 0
    for i in ids:
        if tok.family == "llama":
            piece = "" if i in tok.all_special_ids else tok.convert_ids_to_tokens(i).replace("▁", " ")
            piece = piece[1:] if pos == 0 and piece.startswith(" ") else piece    # the space sentencepiece prepends
        else:
            piece = tok.decode([i])
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    rome = [j for j, (a, b) in enumerate(spans) if b > a and a < start + len(subject) and b > start]
    assert (rome[0], rome[-1] + 1) == (t0, t1)
    return t1 - t0


def test_subject_token_ranges_follow_rome(tok):
    known = load_known(standin.KNOWN_FILE)
    widths = [_subject_checks(tok, k.prompt, k.subject) for k in known]
    assert max(widths) >= 3                                     # multi-token subjects are there
    for c in load_counterfact(standin.COUNTERFACT_FILE)[:20]:
        _subject_checks(tok, c.rewrite_prompt, c.subject)


def test_target_scoring_is_mean_token_nll(tok):
    torch.manual_seed(0)
    cfg = standin.model_config(tok.family, TINY, tok)
    cfg._attn_implementation = "eager"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(cfg).eval()
    case = load_counterfact(standin.COUNTERFACT_FILE)[0]
    prompt = case.rewrite_prompt
    for target in (case.target_new.str, case.target_true.str, "Buenos Aires"):
        tid = token_ids(tok, target)
        full = tok(prompt + " " + target)["input_ids"]         # the target as it follows the prompt in text
        n_prompt = len(full) - len(tid)
        assert full[n_prompt:] == tid
        if target == "Buenos Aires":
            assert len(tid) >= 2
        with torch.no_grad():
            lp = model(torch.tensor([full])).logits[0].log_softmax(-1)      # (seq, vocab)
        by_hand = -torch.stack([lp[n_prompt - 1 + j, t] for j, t in enumerate(tid)]).mean()
        nll, _ = target_nll(model, tok, [prompt], [target])
        # a padded batch against one row: 64 float32 ulps of the NLL (log-softmax in float32)
        assert abs(float(nll[0] - by_hand)) <= checks.tolerance(torch.float32, scale=by_hand)


@pytest.mark.parametrize("family", standin.FAMILIES)
def test_quick_build_loads_and_caches(family, tmp_path):
    out = tmp_path / family
    r = standin.build(family, TINY, out=out)
    assert not r.cached and (out / "standin.json").exists()
    assert (out / "corpus.txt").read_text(encoding="utf-8").splitlines() == standin.fact_texts()   # for CORPUS
    model, tok, arch = kvlab.load(str(out), device="cpu")
    assert model.config.model_type == family and arch.n_layers == TINY.layers
    if family == "llama":
        assert model.config.num_key_value_heads < model.config.num_attention_heads
        assert tok("Paris")["input_ids"][0] == tok.bos_token_id
        assert tok.unk_token and tok.pad_token and tok.eos_token
    else:
        plain = tok("Paris", add_special_tokens=False)["input_ids"]
        assert tok(" Paris", add_special_tokens=False)["input_ids"] != plain      # leading-space tokens
    again = standin.build(family, TINY, out=out)
    assert again.cached and again.recall_known == r.recall_known
    assert standin.standin_dir(family, TINY) != standin.standin_dir(family)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown stand-in family 'gptx'"):
        standin.build("gptx", TINY)


def test_subject_token_holding_punctuation_belongs_to_it():
    """Sentencepiece without a punctuation split can merge "s," into one token; as in ROME, the subject's range
    then covers that token (kvlab used to raise "starts or ends inside the token(s)")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    t.train_from_iterator(["In Marshall Islands, the language is English"] * 20,
                          trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")
    prompt = "In Marshall Islands, the language is"
    ids = tok(prompt)["input_ids"]
    assert "▁Islands," in tok.convert_ids_to_tokens(ids)
    t0, t1 = subject_token_range(tok, prompt, "Marshall Islands")
    assert tok.convert_ids_to_tokens(ids[t0:t1]) == ["▁Marshall", "▁Islands,"]
    with pytest.raises(ValueError, match="inside the token"):
        subject_token_range(tok, prompt, "Marshall Island")          # letters left over: still refused
