"""CounterFact metrics (ES/PS/NS/S), token accuracy, n-gram entropy, known-fact recall, evaluate_edits."""
import math

import pytest
import torch

from kvlab.editing import (EditRequest, current_answer, evaluate, evaluate_edits, finetune_edit, harmonic_mean,
                           known_correct, n_gram_entropy, record_scores, same_weights, snapshot, target_nll)
from kvlab.editing.metrics import n_gram_entropy_one
from kvlab import checks
from kvlab.testing import tiny


@pytest.fixture(scope="module")
def gpt2():
    return tiny("gpt2")


def record(case_id=0, new="rome", true="paris"):
    return {"case_id": case_id,
            "requested_rewrite": {"prompt": "{} lives in", "subject": "anna berg", "relation_id": "P551",
                                  "target_new": {"str": new, "id": -1}, "target_true": {"str": true, "id": -1}},
            "paraphrase_prompts": ["the city of anna berg is", "anna berg works in"],
            "neighborhood_prompts": ["tom lee lives in", "the king lives in", "the queen lives in"],
            "generation_prompts": ["anna berg is"]}


def test_target_nll_matches_manual(gpt2):
    model, tok, _ = gpt2
    nll, acc = target_nll(model, tok, ["anna berg lives in", "tom lee"], ["paris", "plays the piano"])
    with torch.no_grad():
        ids = tok("tom lee plays the piano")["input_ids"]
        lp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        n_prompt = len(tok("tom lee")["input_ids"])
        tgt = ids[n_prompt:]
        manual = -torch.stack([lp[n_prompt - 1 + j, t] for j, t in enumerate(tgt)]).mean()
        hits = sum(int(lp[n_prompt - 1 + j].argmax() == t) for j, t in enumerate(tgt)) / len(tgt)
    # a padded batch against one row: 64 float32 ulps of the NLL (log-softmax in float32)
    torch.testing.assert_close(nll[1], manual, atol=checks.tolerance(torch.float32, scale=manual), rtol=0)
    assert acc[1] == pytest.approx(hits)


def test_record_scores_follow_definitions(gpt2):
    model, tok, _ = gpt2
    rec = record()
    row = record_scores(model, tok, [rec], token_accuracy=True)[0]
    nll_new, _ = target_nll(model, tok, rec["neighborhood_prompts"], ["rome"] * 3)
    nll_true, _ = target_nll(model, tok, rec["neighborhood_prompts"], ["paris"] * 3)
    assert row["NS"] == pytest.approx(100 * float((nll_true < nll_new).float().mean()))
    pn, pt = target_nll(model, tok, ["anna berg lives in"] * 2, ["rome", "paris"])[0]
    assert row["ES"] == (100.0 if pn < pt else 0.0)
    assert row["ES_mag"] == pytest.approx(100 * (math.exp(-pn) - math.exp(-pt)), abs=1e-4)
    # swapping old and new targets swaps the outcome of every comparison
    swapped = record_scores(model, tok, [record(new="paris", true="rome")])[0]
    assert swapped["ES"] == 100 - row["ES"] and swapped["PS"] == pytest.approx(100 - row["PS"])
    res = evaluate(model, tok, [rec, record(1, "berlin", "london")], fluency=True)
    assert res["S"] == pytest.approx(harmonic_mean(res["ES"], res["PS"], res["NS"]))
    assert res["n"] == 2 and res["GE"] > 0


def test_harmonic_mean_and_entropy():
    assert harmonic_mean(50, 100, 100) == pytest.approx(75.0)
    assert harmonic_mean(0, 100, 100) == 0.0
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))   # 2-grams of "a b a b": ab ×2, ba ×1
    h3 = 1.0                                                       # aba, bab
    assert n_gram_entropy_one("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert n_gram_entropy(["x x x x x", "a b c d e f"]) > n_gram_entropy(["x x x x x"])
    with pytest.raises(ValueError):
        n_gram_entropy([])


def test_evaluate_edits_undoes_and_skips(gpt2):
    model, tok, _ = gpt2
    before = snapshot(model)
    now = current_answer(model, tok, "anna berg lives in")
    other = next(w for w in ("rome", "berlin", "london") if w != now)
    recs = [record(0, other, "paris" if other != "paris" else "london"), record(1, now, "king")]
    res = evaluate_edits(model, tok, recs, finetune_edit, target="values", layers=[1], lr=1e-2, progress=False)
    assert same_weights(model, before)
    assert res["skipped"] == 1 and res["n"] == 1
    assert res["ES"] == 100.0 and res["params"] == model.transformer.h[1].mlp.c_proj.weight.numel()


def test_known_correct(gpt2):
    model, tok, _ = gpt2
    now = current_answer(model, tok, "anna berg lives in")
    other = "rome" if now != "rome" else "paris"
    known = [{"prompt": "anna berg lives in", "attribute": now}, {"prompt": "anna berg lives in", "attribute": other}]
    assert known_correct(model, tok, known).tolist() == [True, False]
    with pytest.raises(ValueError):
        known_correct(model, tok, [])
    with pytest.raises(ValueError, match="no records"):
        evaluate(model, tok, [])
    with pytest.raises(ValueError, match="no target_true"):
        bad = record()
        del bad["requested_rewrite"]["target_true"]
        record_scores(model, tok, [bad])
    assert EditRequest.from_counterfact(record()).target_true == "paris"


def test_accepts_kvlab_data_records(gpt2):
    from kvlab.data import parse_counterfact
    model, tok, _ = gpt2
    rec = record()
    rec["requested_rewrite"]["target_new"]["id"] = rec["requested_rewrite"]["target_true"]["id"] = 0
    rec.setdefault("attribute_prompts", ["tom lee lives in"])     # required by the CounterFact schema
    rec.setdefault("generation_prompts", ["anna berg lives in"])
    case = parse_counterfact([rec])[0]
    assert EditRequest.from_counterfact(case) == EditRequest.from_counterfact(rec)
    assert record_scores(model, tok, [case]) == record_scores(model, tok, [rec])
