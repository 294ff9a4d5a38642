"""Causal tracing: the fast tracer against a slow, one-cell-per-forward reference, on every family.

Numerics. The equivalence tests (fast = reference) run the tiny models in float64, so that the two paths'
different matrix shapes (and the kernels the CPU picks for them: AVX-512, AVX2, default) change the network's
output only at the 1e-15 level. What is compared, p(answer), kvlab takes from a float32 softmax (as the
reference does), so the bound is 64 float32 ulps of p's size: :func:`tol` (tests/test_devices.py runs the
same comparisons in float16, bfloat16 and float32, on any device, with bounds from those dtypes).
"""
import pytest
import torch

from kvlab import checks, tracing
from kvlab.arch import adapter
from kvlab.hooks import capture, patch
from kvlab.testing import FAMILIES, bpe_tokenizer, cache_ignored, tiny
from kvlab.text import encode, subject_token_range

PROMPT, SUBJECT = "of anna berg is in", "anna berg"


def tiny64(family, **sizes):
    """A tiny model of ``family`` in float64 (see the module docstring)."""
    model, tok, arch = loaded = tiny(family, **sizes)
    model.double()
    return loaded


def tol(scale: float = 1.0) -> float:
    """Bound for p(answer) computed two ways on a float64 model: 64 float32 ulps of max(1, scale)."""
    return checks.tolerance(torch.float32, scale)


# ----------------------------------------------------------------------------- reference
@torch.no_grad()
def reference_trace(model, tok, prompt, subject, kind, noise, eps, window=10, answer_id=None):
    """The obvious method: one full forward pass per (token, layer) cell, with plain hooks.

    Returns (scores (n, L), low, high, answer_id). Any device and dtype: the noise is added in the model's
    dtype and p(answer) read from a float32 softmax, as kvlab.tracing does.
    """
    arch = adapter(model)
    batch = encode(model, tok, prompt)
    ids, mask = batch.input_ids, batch.attention_mask
    b, e = subject_token_range(tok, prompt, subject)
    n, L, S = ids.shape[1], arch.n_layers, eps.shape[0]
    module = {"hidden": arch.layer, "mlp": arch.mlp, "attn": arch.attn}[kind]

    with capture(model, {l: module(l) for l in range(L)}) as clean:
        logits = model(input_ids=ids, attention_mask=mask).logits[0, -1]
    if answer_id is None:
        answer_id = int(logits.argmax())
    high = float(logits.float().softmax(-1)[answer_id])

    def corrupt(x):
        x = x.clone()
        x[:, b:e] += noise * eps.to(x.device, x.dtype)
        return x

    def run(restore):
        with patch(arch.embed, corrupt), patch(restore):
            out = model(input_ids=ids.repeat(S, 1), attention_mask=mask.repeat(S, 1)).logits[:, -1]
        return float(out.float().softmax(-1)[:, answer_id].mean())

    def put_back(t, c):
        def fn(x):
            x = x.clone()
            x[:, t] = c[0, t]
            return x
        return fn

    low = run({})
    scores = torch.zeros(n, L)
    for t in range(n):
        for l in range(L):
            if kind == "hidden":
                layers = [l]
            else:
                layers = [j for j in range(L) if l - window // 2 <= j < l + (window + 1) // 2]
            scores[t, l] = run({module(j): put_back(t, clean[j]) for j in layers})
    return scores, low, high, answer_id


# ----------------------------------------------------------------------------- equality with the reference
@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny64(request.param, n_layers=4)


@pytest.mark.parametrize("kind", tracing.KINDS)
def test_fast_equals_reference(family_model, kind):
    family, (model, tok, arch) = family_model
    b, e = subject_token_range(tok, PROMPT, SUBJECT)
    eps = tracing.sample_noise(4, e - b, arch.d_model, seed=1)
    window = 3
    fast = tracing.trace(model, tok, PROMPT, SUBJECT, kind=kind, noise=0.5, samples=4, window=window, eps=eps)
    ref, low, high, ans = reference_trace(model, tok, PROMPT, SUBJECT, kind, 0.5, eps, window)
    assert fast.answer_id == ans
    assert fast.high_score == pytest.approx(high, abs=tol())
    assert fast.low_score == pytest.approx(low, abs=tol())
    assert fast.scores.shape == ref.shape == (len(fast.tokens), arch.n_layers)
    assert (fast.scores - ref).abs().max() <= tol(), family
    # the restorations must matter somewhere, or the comparison proves nothing
    assert (ref - low).abs().max() > 100 * tol()
    # the same through the tracer's other paths: one group per token (every token's rows compute
    # only the positions from it on, earlier keys/values from the cache), and no cache at all
    # (every position computed: the fallback for models whose blocks cannot be cut)
    tr = tracing.Tracer(model, tok, PROMPT, SUBJECT, noise=0.5, samples=4, eps=eps)
    assert tr.split, f"{family}: blocks should run on the last positions only"
    tr.call_tokens = 0
    assert (tr.trace(kind, window).scores - ref).abs().max() <= tol(), family
    tr.split = False
    assert (tr.trace(kind, window).scores - ref).abs().max() <= tol(), family


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_sdpa_equals_reference(family):
    """sdpa passes blocks no mask (causal by default): the tracer must build one for the last positions."""
    model, tok, arch = tiny64(family, n_layers=4)
    model.set_attn_implementation("sdpa")
    b, e = subject_token_range(tok, PROMPT, SUBJECT)
    eps = tracing.sample_noise(3, e - b, arch.d_model, seed=4)
    tr = tracing.Tracer(model, tok, PROMPT, SUBJECT, noise=0.5, samples=3, eps=eps)
    assert tr.split
    tr.call_tokens = 0
    for kind in tracing.KINDS:
        ref, *_ = reference_trace(model, tok, PROMPT, SUBJECT, kind, 0.5, eps, 3)
        assert (tr.trace(kind, 3).scores - ref).abs().max() <= tol(), (family, kind)


def test_long_prompt_small_batches_and_any_cells_equal_reference():
    """Subject mid-prompt, several tokens after it; cells split over many batches; arbitrary cell lists."""
    model, tok, arch = tiny64("gpt2", n_layers=5)
    prompt, subject = "the queen of anna berg was born in the city of", "anna berg"
    b, e = subject_token_range(tok, prompt, subject)
    eps = tracing.sample_noise(3, e - b, arch.d_model, seed=5)
    tr = tracing.Tracer(model, tok, prompt, subject, noise=0.5, samples=3, eps=eps, max_batch=3 * 7)
    for kind in tracing.KINDS:
        ref, low, *_ = reference_trace(model, tok, prompt, subject, kind, 0.5, eps, 4)
        assert (tr.trace(kind, 4).scores - ref).abs().max() <= tol(), kind
        cells = [(e, 1), (0, 2), (e, 1), (tr.n - 1, 4), (b, 0)]
        assert (tr.restored(kind, cells, 4) - torch.stack([ref[c] for c in cells])).abs().max() <= tol()
        assert (ref[:b] - low).abs().max() <= tol()    # before the subject nothing changes


def test_default_window_and_given_answer_equal_reference():
    model, tok, arch = tiny64("gpt2", n_layers=12)
    b, e = subject_token_range(tok, PROMPT, SUBJECT)
    eps = tracing.sample_noise(3, e - b, arch.d_model, seed=2)
    res = tracing.trace_all_kinds(model, tok, PROMPT, SUBJECT, answer="paris", noise=0.4, samples=3, eps=eps)
    ans = tok(" paris", add_special_tokens=False)["input_ids"][0]
    for kind in ("mlp", "attn"):
        ref, low, high, _ = reference_trace(model, tok, PROMPT, SUBJECT, kind, 0.4, eps, 10, ans)
        assert res[kind].answer_id == ans and res[kind].window == 10
        assert (res[kind].scores - ref).abs().max() <= tol()
        assert res[kind].low_score == pytest.approx(low, abs=tol())


def test_window_layers_matches_rome():
    assert list(tracing.window_layers(10, 10, 48)) == list(range(5, 15))   # [l-5, l+4]
    assert list(tracing.window_layers(2, 10, 48)) == list(range(0, 7))     # clipped below
    assert list(tracing.window_layers(46, 10, 48)) == list(range(41, 48))  # clipped above
    assert list(tracing.window_layers(3, 1, 8)) == [3]
    with pytest.raises(ValueError, match="window"):
        tracing.window_layers(3, 0, 8)


# ----------------------------------------------------------------------------- properties
def test_trace_properties():
    model, tok, arch = tiny64("llama", n_layers=4)
    r = tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.5, samples=5)
    b, e = r.subject_range
    n, L = r.scores.shape
    assert r.tokens[b:e] == ["anna", "berg"] or [t.strip() for t in r.tokens[b:e]] == ["anna", "berg"]
    # tokens before the subject are not corrupted: restoring them changes nothing
    assert (r.scores[:b] - r.low_score).abs().max() <= tol()
    # restoring the whole last-layer state at the last token gives back the clean prediction
    assert r.scores[n - 1, L - 1] == pytest.approx(r.high_score, abs=tol())
    assert r.effects.shape == (n, L) and r.total_effect == pytest.approx(r.high_score - r.low_score)
    value, t, l = r.peak()
    assert value == pytest.approx(float(r.effects.max())) and r.effects[t, l] == value
    assert r.labels()[b].endswith("*") and not r.labels()[e].endswith("*")


def test_noise_changes_low_score_and_seed_is_reproducible():
    model, tok, arch = tiny64("gpt2")
    a = tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.5, samples=3, seed=3)
    b = tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.5, samples=3, seed=3)
    n_subject = a.subject_range[1] - a.subject_range[0]
    c = tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.5, samples=3, eps=torch.zeros(3, n_subject, arch.d_model))
    assert torch.equal(a.scores, b.scores)
    assert c.low_score == pytest.approx(c.high_score, abs=tol())   # zero draws: corrupted = clean (noise=0 raises)
    assert abs(a.low_score - a.high_score) > 100 * tol()


def test_noise_level_is_three_sigma_of_subject_embeddings():
    model, tok, arch = tiny("gpt2")
    subjects = ["anna berg", "tom lee"]
    ids = [i for s in subjects for i in tok(s, add_special_tokens=False)["input_ids"]]
    expected = 3 * float(arch.embed.weight[ids].std())
    assert tracing.noise_level(model, tok, subjects) == pytest.approx(expected, rel=1e-6)
    assert tracing.noise_level(model, tok, [{"subject": "tom lee", "prompt": "tom lee is"}], factor=1) > 0
    with pytest.raises(ValueError, match="no subject tokens"):
        tracing.noise_level(model, tok, [])


def test_bad_inputs():
    model, tok, arch = tiny("gpt2")
    with pytest.raises(ValueError, match="not found"):
        tracing.trace(model, tok, PROMPT, "tom lee", noise=0.1, samples=2)
    with pytest.raises(ValueError, match="kind"):
        tracing.trace(model, tok, PROMPT, SUBJECT, kind="resid", noise=0.1, samples=2)
    with pytest.raises(ValueError, match="eps has shape"):
        tracing.trace(model, tok, PROMPT, SUBJECT, noise=0.1, samples=2, eps=torch.zeros(3, 2, arch.d_model))
    with pytest.raises(ValueError, match="samples"):
        tracing.trace(model, tok, PROMPT, SUBJECT, samples=0)


# ----------------------------------------------------------------------------- averages
def test_token_rows():
    # "the city of anna berg is in": subject tokens 3..4, first subsequent 5, last token 6
    assert tracing.token_rows((3, 5), 7) == [[3], [], [4], [5], [], [6]]
    assert tracing.token_rows((0, 4), 9) == [[0], [1, 2], [3], [4], [5, 6, 7], [8]]
    assert tracing.token_rows((1, 2), 3) == [[1], [], [1], [], [], [2]]    # one-token subject before last


def test_average_effects():
    model, tok, arch = tiny("gpt2", n_layers=4)
    facts = [{"prompt": "anna berg lives in", "subject": "anna berg", "attribute": "paris"},
             {"prompt": "the king tom lee plays", "subject": "tom lee", "attribute": "piano"},
             ("the queen of france speaks", "queen of france", None)]
    avg = tracing.average_effects(model, tok, facts, noise=0.5, samples=3, window=3, only_known=False,
                                  progress=False, keep=True)
    assert avg.rows == tracing.ROWS and avg.n_facts == 3 and avg.n_skipped == 0
    assert avg.counts.tolist() == [3, 1, 3, 1, 0, 3]     # no fact has "further tokens"
    assert torch.isnan(avg.effects["hidden"][4]).all() and not torch.isnan(avg.effects["hidden"][3]).any()
    for kind in tracing.KINDS:
        assert avg.effects[kind].shape == (6, 4)
        # the "last token" row is the mean of the per-fact last-token effects
        manual = torch.stack([r[kind].effects[-1] for r in avg.per_fact]).mean(0)
        assert (avg.effects[kind][5] - manual).abs().max() <= tol()     # float32 sums of 3 terms
    lows = [r["hidden"].low_score for r in avg.per_fact]
    assert avg.low_score == pytest.approx(sum(lows) / 3)
    value, row, layer = avg.peak("hidden")
    assert value == pytest.approx(float(torch.nan_to_num(avg.effects["hidden"], nan=-1).max()))
    assert avg.peak("mlp", row="last subject token")[1] == "last subject token"
    # only_known skips facts whose top prediction is not the attribute
    pred = tracing.trace(model, tok, "anna berg lives in", "anna berg", noise=0.1, samples=1).answer.strip()
    wrong = "tennis" if pred != "tennis" else "piano"
    with pytest.raises(ValueError, match="predicted none"):
        tracing.average_effects(model, tok, [("anna berg lives in", "anna berg", wrong)], samples=1,
                                progress=False)


# ----------------------------------------------------------------------------- subject token ranges


def test_subject_range_word_split_into_pieces():
    tok = bpe_tokenizer()
    prompt = "Danielle Mitterrand lives in"      # words unseen in training: split into many pieces
    ids = tok(prompt)["input_ids"]
    b, e = subject_token_range(tok, prompt, "Danielle Mitterrand")
    assert b == 0 and e - b > 2
    assert tok.decode(ids[b:e]).strip() == "Danielle Mitterrand"
    assert tok.decode(ids[e:]).strip() == "lives in"


def test_subject_range_only_on_token_and_word_boundaries():
    """A subject that starts or ends inside a token or a word is not a mention of it (more in test_inputs)."""
    tok = bpe_tokenizer()
    prompt = "the city of parisian rome"
    with pytest.raises(ValueError, match="part of the word 'parisian'"):
        subject_token_range(tok, prompt, "paris")        # "paris" is a prefix of "parisian"
    with pytest.raises(ValueError, match="inside the token"):
        subject_token_range(tok, prompt, "isian")        # starts inside the token "Ġparis"
    ids = tok("the city of paris, rome")["input_ids"]
    b, e = subject_token_range(tok, "the city of paris, rome", "paris")
    assert tok.decode(ids[b:e]).strip() == "paris"


def test_subject_range_repeated_and_absent():
    _, tok, _ = tiny("gpt2")
    prompt = "tom lee and tom lee plays"   # every word known to the tiny tokenizer
    assert subject_token_range(tok, prompt, "tom lee") == (0, 2)
    assert subject_token_range(tok, prompt, "tom lee", occurrence=1) == (3, 5)
    assert subject_token_range(tok, prompt, "tom lee", occurrence=-1) == (3, 5)
    with pytest.raises(ValueError, match="occurs 2 time"):
        subject_token_range(tok, prompt, "tom lee", occurrence=2)
    with pytest.raises(ValueError, match="not found"):
        subject_token_range(tok, prompt, "anna berg")
    r = tracing.trace(*tiny("gpt2")[:2], prompt, "tom lee", noise=0.3, samples=2, occurrence=1)
    assert r.subject_range == (3, 5)


def test_subject_range_with_bos_token():
    """Llama-style tokenizers prepend a BOS token: the range must index the encoded prompt."""
    from kvlab.testing import tiny_tokenizer
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    ids = tok("anna berg lives in")["input_ids"]
    assert ids[0] == 0 and len(ids) == 5
    assert subject_token_range(tok, "anna berg lives in", "anna berg") == (1, 3)


def test_cache_params_found_from_signature():
    """The cache argument is found by annotation or name, whatever transformers calls it this version."""
    import inspect

    from transformers.cache_utils import Cache

    def f(hidden_states, cache=None, use_cache=False, cache_position=None, **kw): ...
    def g(hidden_states, layer_past=None, attention_mask=None): ...
    def h(hidden_states, kv: Cache | None = None, use_cache=False): ...
    def k(hidden_states, attention_mask=None, **kwargs): ...
    assert tracing.cache_params(inspect.signature(f)) == ("cache",)
    assert tracing.cache_params(inspect.signature(g)) == ("layer_past",)
    assert tracing.cache_params(inspect.signature(h)) == ("kv",)
    assert tracing.cache_params(inspect.signature(k)) == ()


@pytest.mark.parametrize("family", FAMILIES)
def test_split_path_on_for_every_family(family, recwarn):
    """On every family and the installed transformers, blocks run on the last positions only, and no
    fallback warning is given. (If this fails after a transformers upgrade, read Tracer.split_off.)"""
    model, tok, arch = tiny(family)
    tr = tracing.Tracer(model, tok, PROMPT, SUBJECT, noise=0.5, samples=2)
    assert tr.split, f"{family}: {tr.split_off}"
    assert tr.split_off is None
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_split_off_is_loud():
    """A block whose attention never uses the cache it is given: exact scores, and a warning that says why."""
    model, tok, arch = tiny("gpt2")
    with cache_ignored(arch.attn(0)):   # attention that never fills the cache
        with pytest.warns(RuntimeWarning, match="never called update"):
            tr = tracing.Tracer(model, tok, PROMPT, SUBJECT, noise=0.5, samples=2)
        assert not tr.split and "update" in tr.split_off
        assert tr.trace("hidden", 1).scores.shape[0] == len(tr.tokens)
