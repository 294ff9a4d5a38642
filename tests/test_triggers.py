"""Trigger mining and token removal (Geva et al. 2021 §3) on hand-built and random tiny models."""
import random

import pytest
import torch

from kvlab import triggers
from kvlab.testing import FAMILIES, WORDS, tiny

KEY = 5


def corpus(n=40, seed=0, word="piano", follow="rome"):
    """Random sentences without repeats; ``word`` occurs mid-sentence, always followed by ``follow``."""
    rng = random.Random(seed)
    pool = [w for w in WORDS if w not in (word, follow)]
    out = set()
    while len(out) < n:
        words = [rng.choice(pool) for _ in range(rng.randint(3, 7))]
        if rng.random() < 0.4:
            i = rng.randint(1, len(words) - 1)
            words[i:i] = [word, follow]
        out.add(" ".join(words))
    return sorted(out)


def detector(word="piano", scale=3.0):
    """Tiny GPT-2 whose layer-0 key KEY fires exactly on the token ' word'.

    Layer 0's attention output and the position embeddings are zeroed, so the FFN input of
    layer 0 is LN(e_token): it depends on the last token only. Every LN output has norm √d,
    so k = scale·LN(e_word) gives x·k its maximum exactly when the token is ' word'.
    """
    model, tok, arch = tiny("gpt2")
    tid = tok(" " + word)["input_ids"][-1]
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        attn = arch.attn(0)
        attn.c_proj.weight.zero_()
        attn.c_proj.bias.zero_()
        x = arch.mlp_norm(0)(arch.embed.weight[tid])
        arch.key_matrix(0)[KEY] = scale * x / x.norm()
        arch.key_biases(0)[0][KEY] = 0.0
    return model, tok, arch, tid


def test_miner_finds_the_planted_trigger():
    model, tok, arch, tid = detector()
    texts = corpus()
    assert sum(" piano " in f" {t} " for t in texts) >= 8
    index = triggers.mine_triggers(model, tok, texts, layers=[0, 2], k=8, batch_size=7)
    assert index.values[0].shape == (arch.d_ff, 8) and index.sentence[2].shape == (arch.d_ff, 8)
    for j in range(8):
        assert index.last_token(0, KEY, j) == tid
        assert index.prefix(0, KEY, j).endswith("piano")
        assert index.next_token(0, KEY, j) == tok(" rome")["input_ids"][-1]
    # All 8 prefixes end on the same token, so they share one coefficient.
    v = index.values[0][KEY]
    torch.testing.assert_close(v, v[0].expand(8))
    assert (index.values[0][:, :-1] >= index.values[0][:, 1:]).all()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_miner_equals_brute_force_over_prefixes(family):
    """The streaming top-k equals running every prefix alone and sorting (the definition)."""
    model, tok, arch = tiny(family)
    texts = corpus(n=15, seed=1)
    index = triggers.mine_triggers(model, tok, texts, layers=[1], k=6, batch_size=4)
    ids = triggers.tokenize_corpus(tok, texts)
    special = set(tok.all_special_ids)
    prefixes = [s[: p + 1] for s in ids for p in range(len(s)) if s[p] not in special]
    assert index.n_prefixes == len(prefixes)
    m = triggers.last_coefficients(model, tok, prefixes, 1, batch_size=16)   # (n_prefixes, d_ff)
    expected = m.T.topk(6, dim=1).values
    torch.testing.assert_close(index.values[1], expected, atol=1e-4, rtol=1e-4)
    # Each stored (sentence, position) really has the stored coefficient.
    for key in (0, 7, 33):
        for j in (0, 5):
            c = triggers.last_coefficients(model, tok, [index.prefix_ids(1, key, j)], 1)[0, key]
            assert abs(float(c) - index.coefficient(1, key, j)) < 1e-4


def test_token_removal_on_a_last_token_detector():
    """The planted key depends on the last token only: removing the first token changes nothing."""
    model, tok, arch, tid = detector()
    index = triggers.mine_triggers(model, tok, corpus(), layers=0, k=8)
    r = triggers.token_removal(model, tok, index, 0, keys=[KEY], n_triggers=8)
    assert r["n"] == 8
    assert abs(r["first"]) < 1e-3
    assert r["last"] > 50
    assert -1e-3 < r["random"] <= r["last"] + 1e-3
    assert set(r["drops"]) == {"first", "last", "random"} and r["drops"]["last"].shape == (8,)


def test_classify_keys():
    model, tok, arch, tid = detector()
    texts = corpus()
    index = triggers.mine_triggers(model, tok, texts, layers=0, k=8)
    # Label every sentence by whether it contains 'rome': the planted key is shallow anyway.
    labels = [{"rome"} if "rome" in t else {"other"} for t in texts]
    kinds = triggers.classify_keys(index, 0, labels, n=8)
    assert kinds[KEY] == "shallow"
    assert set(kinds) <= {"shallow", "semantic", "none"} and len(kinds) == arch.d_ff
    # With n=1 every key is trivially shallow.
    assert set(triggers.classify_keys(index, 0, labels, n=1)) == {"shallow"}
    # A key whose top prefixes end on different tokens but all come from labelled sentences: semantic.
    same = [{"x"}] * len(texts)
    kinds = triggers.classify_keys(index, 0, same, n=8, share=1.0)
    assert all(k in ("shallow", "semantic") for k in kinds)
    assert "semantic" in kinds
    with pytest.raises(ValueError, match="sentence_labels"):
        triggers.classify_keys(index, 0, labels[:-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_smoke_every_family(family):
    model, tok, arch = tiny(family)
    texts = corpus(n=12, seed=2)
    index = triggers.mine_triggers(model, tok, texts, k=4, batch_size=5, max_len=6)
    assert index.layers == tuple(range(arch.n_layers))
    assert all(len(x) <= 6 for x in index.token_ids)
    for l in index.layers:
        assert torch.isfinite(index.values[l]).all()
        assert index.sentence[l].min() >= 0
    assert len(index.triggers(2, 3, n=2)) == 2
    r = triggers.token_removal(model, tok, index, 2, keys=[0, 1], n_triggers=4)
    assert r["n"] > 0 and all(torch.isfinite(torch.tensor(r[k])) for k in ("first", "last", "random"))


def test_bad_input():
    model, tok, arch = tiny("gpt2")
    with pytest.raises(ValueError, match="non-empty list"):
        triggers.mine_triggers(model, tok, [])
    with pytest.raises(ValueError, match="non-empty string"):
        triggers.mine_triggers(model, tok, ["the king", ""])
    with pytest.raises(ValueError, match="k and batch_size"):
        triggers.mine_triggers(model, tok, ["the king"], k=0)
    index = triggers.mine_triggers(model, tok, ["the king of france"], layers=1, k=10)
    assert index.n_prefixes == 4 and int(index.sentence[1][0, 4]) == -1   # fewer prefixes than k
    with pytest.raises(ValueError, match="not mined"):
        index.prefix(0, 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        index.prefix(1, arch.d_ff, 0)
    with pytest.raises(ValueError, match="no trigger of rank"):
        index.prefix(1, 0, 5)
    with pytest.raises(ValueError, match="keys"):
        triggers.token_removal(model, tok, index, 1, keys=[-1])
    # True would be layer 1 as a dict key; a string or float is no layer
    for bad in (True, "1", 1.0):
        with pytest.raises(ValueError, match="a layer must be an int"):
            index.prefix(bad, 0, 0)
        with pytest.raises(ValueError, match="a layer must be an int"):
            triggers.token_removal(model, tok, index, bad)
    assert index.prefix(torch.tensor(1), 0, 0) == index.prefix(1, 0, 0)


def test_unique_scores_each_distinct_prefix_once():
    model, tok, arch, tid = detector()
    texts = corpus(n=10, seed=4)
    dup = texts + texts[:5] + ["tom lee plays piano rome", "tom lee plays piano rome one"]
    plain = triggers.mine_triggers(model, tok, dup, layers=0, k=5)
    uniq = triggers.mine_triggers(model, tok, dup, layers=0, k=5, unique=True)
    ids = triggers.tokenize_corpus(tok, dup)
    distinct = {tuple(s[: p + 1]) for s in ids for p in range(len(s))}
    assert uniq.n_prefixes == len(distinct) < plain.n_prefixes
    for key in range(arch.d_ff):
        got = [tuple(uniq.prefix_ids(0, key, j)) for j in range(5)]
        assert len(set(got)) == 5
    # The planted key's top trigger is the same prefix either way.
    assert uniq.prefix(0, KEY, 0).endswith("piano") and plain.prefix(0, KEY, 0).endswith("piano")


@pytest.fixture
def spy(monkeypatch):
    """Counts of the sparse path (entrant extraction) and of buffer merges in RunningTopK."""
    calls = {"sparse": 0, "flush": 0}
    nonzero, flush = triggers._flat_nonzero, triggers.RunningTopK.flush

    def counted_nonzero(mask):
        calls["sparse"] += 1
        return nonzero(mask)

    def counted_flush(self):
        calls["flush"] += bool(self.buf)
        flush(self)

    monkeypatch.setattr(triggers, "_flat_nonzero", counted_nonzero)
    monkeypatch.setattr(triggers.RunningTopK, "flush", counted_flush)
    return calls


@pytest.mark.parametrize("d_ff", [37, 40])      # 37: the plain nonzero fallback (size not a multiple of 8)
@pytest.mark.parametrize("ties", [False, True])
def test_running_topk_equals_topk_over_all_candidates(spy, d_ff, ties):
    """The buffered, threshold-filtered merge equals one topk over every candidate at once."""
    g = torch.Generator().manual_seed(d_ff)
    k = 5
    top = triggers.RunningTopK(d_ff, k, "cpu", buffer=3)
    seen_v, seen_c, n = [], [], 0
    for b in range(60):
        B, T = (int(x) for x in torch.randint(1, 7, (2,), generator=g))
        m = torch.randn(B, T, d_ff, generator=g) + 0.03 * b            # drift: entrants until the end
        if ties:
            m = (2 * m).round() / 2                                        # many equal coefficients
        valid = torch.rand(B, T, generator=g) > 0.2
        codes = n + torch.arange(B * T).view(B, T)
        n += B * T
        top.add(m, valid, codes)
        seen_v.append(m[valid])                                            # (N, d_ff)
        seen_c.append(codes[valid])
    values, codes = top.result()                                           # (d_ff, k)
    cand = torch.cat(seen_v)                                               # (n_valid, d_ff)
    row = {c: i for i, c in enumerate(torch.cat(seen_c).tolist())}
    assert torch.equal(values, cand.T.topk(k, dim=1).values)
    for key in range(d_ff):        # k distinct valid candidates, each with its stored value
        assert len(set(codes[key].tolist())) == k
        assert all(cand[row[int(c)], key] == v for c, v in zip(codes[key], values[key]))
    assert spy["sparse"] > 10 and spy["flush"] > 3                        # both paths were taken


def test_running_topk_with_fewer_candidates_than_k():
    top = triggers.RunningTopK(8, 4, "cpu")
    top.add(torch.randn(1, 3, 8), torch.tensor([[True, False, True]]), torch.tensor([[7, 8, 9]]))
    values, codes = top.result()
    assert torch.isinf(values[:, 2:]).all() and (codes[:, 2:] == -1).all()
    assert set(codes[:, :2].flatten().tolist()) == {7, 9}


@pytest.mark.parametrize("shape", [(1, 8), (5, 40), (3, 7), (64, 33)])
@pytest.mark.parametrize("p", [0.0, 0.01, 0.3, 1.0])
def test_flat_nonzero(shape, p):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < p
    assert torch.equal(triggers._flat_nonzero(mask), mask.view(-1).nonzero()[:, 0])


def test_miner_equals_brute_force_on_a_longer_stream(spy):
    """Enough batches that the miner buffers entrants (the sparse path), still exact."""
    model, tok, arch = tiny("gpt2")
    texts = corpus(n=120, seed=3)
    index = triggers.mine_triggers(model, tok, texts, layers=[0, 2], k=3, batch_size=3)
    assert spy["sparse"] > 0 and spy["flush"] > 0
    ids = triggers.tokenize_corpus(tok, texts)
    special = set(tok.all_special_ids)
    prefixes = [s[: p + 1] for s in ids for p in range(len(s)) if s[p] not in special]
    for layer in (0, 2):
        m = triggers.last_coefficients(model, tok, prefixes, layer, batch_size=64)   # (n_prefixes, d_ff)
        torch.testing.assert_close(index.values[layer], m.T.topk(3, dim=1).values, atol=1e-4, rtol=1e-4)
        for key in range(0, arch.d_ff, 7):
            for j in range(3):
                c = m[prefixes.index(index.prefix_ids(layer, key, j)), key]
                assert abs(float(c) - index.coefficient(layer, key, j)) < 1e-4
