"""Knowledge neurons: IG completeness on every family, refinement, interventions, baselines."""
import random

import pytest
import torch

from kvlab import memory, neurons as N
from kvlab.testing import FAMILIES, tiny
from kvlab.text import encode, token_ids

PROMPT, ANSWER = "anna berg lives in", "paris"


@pytest.fixture(autouse=True)
def one_thread():
    """Backward passes of these small models are ~30x slower with 2 threads on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("family", FAMILIES)
def test_ig_completeness_error_shrinks_with_steps(family):
    """Σ_i Attr_{l,i} ≈ p(m̄) − p(0) per layer, and the Riemann error falls as steps grow (midpoint: ~1/S²)."""
    model, tok, arch = tiny(family)
    a10 = N.attribute(model, tok, PROMPT, ANSWER, steps=10)
    a80 = N.attribute(model, tok, PROMPT, ANSWER, steps=80)
    assert a10.scores.shape == (arch.n_layers, arch.d_ff)
    dp = (a80.p_full - a80.p_baseline).abs().max().item()
    assert dp > 0                                              # the layers matter at all
    e10, e80 = a10.completeness_error().abs().max().item(), a80.completeness_error().abs().max().item()
    assert e80 <= 0.01 * dp + 1e-9, (e80, dp)                  # complete within the Riemann error
    assert e80 < e10 / 8, (e10, e80)                           # 8x more steps: >8x smaller error
    torch.testing.assert_close(torch.tensor(a80.p_full), torch.tensor(N.answer_prob(model, tok, PROMPT, ANSWER)))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_ig_multi_token_answer_and_batching(family):
    """Multi-token answers (joint probability) are complete too; batch_size never changes the result."""
    model, tok, arch = tiny(family)
    ans = "the city of rome"
    a = N.attribute(model, tok, PROMPT, ans, layers=[0, 2], steps=40)
    assert a.layers == [0, 2] and torch.all(a.scores[1] == 0) and torch.isnan(a.p_baseline[1])
    dp = (a.p_full - a.p_baseline[[0, 2]]).abs().max().item()
    assert a.completeness_error().abs().max().item() <= 0.01 * dp + 1e-12
    one = N.attribute(model, tok, PROMPT, ANSWER, steps=6, batch_size=1)
    many = N.attribute(model, tok, PROMPT, ANSWER, steps=6, batch_size=7)   # chunks straddle layers
    torch.testing.assert_close(one.scores, many.scores, atol=1e-9, rtol=1e-5)


def test_answer_prob_is_teacher_forced_product():
    model, tok, _ = tiny("gpt2")
    ids = encode(model, tok, PROMPT).input_ids[0].tolist()
    ans = token_ids(tok, "the city")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + ans[:1]])).logits[0], -1)
    expected = (logp[len(ids) - 1, ans[0]] + logp[len(ids), ans[1]]).exp()
    torch.testing.assert_close(torch.tensor(N.answer_prob(model, tok, PROMPT, "the city")), expected)
    both = N.answer_prob(model, tok, [PROMPT, "tom lee plays"], ["the city", "piano"])
    assert both.shape == (2,) and abs(float(both[0]) - float(expected)) < 1e-6
    geo = N.answer_prob(model, tok, PROMPT, "the city", reduce="mean")
    assert abs(geo - float(expected) ** 0.5) < 1e-6


def test_coarse_and_refine():
    scores = torch.zeros(3, 10)
    scores[0, 1], scores[2, 4], scores[1, 7], scores[1, 8] = 1.0, 0.5, 0.1, -2.0
    assert N.coarse_neurons(scores, t=0.2) == [(0, 1), (2, 4)]
    assert N.coarse_neurons(torch.zeros(2, 3)) == []
    a, b, c, d, e, f = [(0, i) for i in range(6)]
    sets = [[a, b, c], [a, b, d], [a, b, e], [a, c, f]]
    assert N.refine(sets, target=(2, 5)) == ([a, b], 0.7)                 # a: 4/4, b: 3/4 >= 0.7
    # too few at 0.7 -> p falls until 2-5 neurons are shared
    kns, p = N.refine([[a, b], [a, c], [a, d], [b, e]], target=(2, 5))
    assert set(kns) == {a, b} and p == pytest.approx(0.5)
    # too many even at p=1 -> cut to the best 5 by score
    many = [[(1, i) for i in range(8)]] * 3
    kns, p = N.refine(many, {(1, i): float(i) for i in range(8)}, target=(2, 5))
    assert kns == [(1, 7), (1, 6), (1, 5), (1, 4), (1, 3)] and p == 1.0
    # counts jump over the range (7 shared by all, 1 more by half): the larger set, cut to 5
    sets = [[(2, i) for i in range(7)] + [(2, 9)], [(2, i) for i in range(7)]]
    kns, _ = N.refine(sets, target=(8, 8))
    assert len(kns) == 8
    with pytest.raises(ValueError, match="target"):
        N.refine(sets, target=(3, 2))
    with pytest.raises(ValueError, match="t must"):
        N.coarse_neurons(scores, t=0)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "qwen2"])
def test_suppress_equals_zeroing_value_rows_and_is_undone(family):
    model, tok, arch = tiny(family)
    batch = encode(model, tok, [PROMPT, "tom lee plays the"])
    neurons = [(0, 3), (2, 5), (2, 7)]
    with torch.no_grad():
        clean = model(**batch.inputs()).logits
        with N.suppress(model, neurons):
            sup = model(**batch.inputs()).logits
        with N.amplify(model, neurons, factor=1.0):
            same = model(**batch.inputs()).logits
        saved = {l: arch.value_matrix(l).clone() for l in (0, 2)}
        for l, i in neurons:
            arch.value_matrix(l)[i] = 0                    # m_i·v_i gone <=> v_i = 0
        zeroed = model(**batch.inputs()).logits
        for l in (0, 2):
            arch.value_matrix(l).copy_(saved[l])
        after = model(**batch.inputs()).logits
    torch.testing.assert_close(sup, zeroed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same, clean)
    assert torch.equal(after, clean) and not torch.allclose(sup, clean)


def test_scale_at_one_position_only():
    model, tok, _ = tiny("llama")
    batch = N.answer_batch(model, tok, [PROMPT, "tom lee plays the"], ["rome", "piano"])
    with torch.no_grad():
        clean = model(**batch.inputs()).logits
        with N.scale_neurons(model, [(1, 2), (1, 9)], 3.0, positions=batch.prompt_last):
            out = model(**batch.inputs()).logits
    for b in range(2):
        last = int(batch.prompt_last[b])
        torch.testing.assert_close(out[b, :last], clean[b, :last])       # earlier positions untouched
        assert not torch.allclose(out[b, last], clean[b, last])
    eff = N.intervention_effect(model, tok, [(1, 2)], [PROMPT], ["rome"], 1.0)
    assert torch.allclose(eff, torch.zeros(1))
    with pytest.raises(ValueError, match="positions"):
        with N.scale_neurons(model, [(1, 2)], 0.0, positions=torch.tensor([0, 1, 2])):
            model(**batch.inputs())


def test_baselines_match_layers():
    model, tok, arch = tiny("gpt_neo")
    like = [(0, 1), (2, 3), (2, 4)]
    rnd = N.random_neurons(model, like, seed=1)
    assert sorted(l for l, _ in rnd) == [0, 2, 2] and not set(rnd) & set(like)
    act = N.activation_neurons(model, tok, PROMPT, like)
    assert sorted(l for l, _ in act) == [0, 2, 2]
    m = memory.coefficients(model, tok, PROMPT, layers=2)[0, -1].abs()   # (d_ff,)
    assert {i for l, i in act if l == 2} == set(m.topk(2).indices.tolist())


def test_bad_input():
    model, tok, _ = tiny("gpt2")
    with pytest.raises(ValueError, match="out of range"):
        with N.suppress(model, [(0, 10_000)]):
            pass
    with pytest.raises(ValueError, match="layer, index"):
        N.random_neurons(model, [3])
    with pytest.raises(ValueError, match="steps"):
        N.attribute(model, tok, PROMPT, ANSWER, steps=0)
    with pytest.raises(ValueError, match="prompt"):
        N.attribute(model, tok, "", ANSWER)
    with pytest.raises(ValueError, match="empty target"):
        N.attribute(model, tok, PROMPT, " ")
    with pytest.raises(ValueError, match="2 prompts but 3 answers"):
        N.answer_prob(model, tok, [PROMPT, PROMPT], ["a", "b", "c"])
    with pytest.raises(ValueError, match="no prompts"):
        N.knowledge_neurons(model, tok, [], ANSWER)


def _builtin():
    from kvlab.loading import world_model_dir
    if not (world_model_dir() / "config.json").exists():
        pytest.skip(f"built-in model not found at {world_model_dir()} (train it: python -m kvlab.world train)")
    import kvlab
    from kvlab.world import build_world
    return kvlab.load(device="cpu"), build_world(0)


def test_suppressing_knowledge_neurons_beats_baselines_on_builtin_model():
    (model, tok, arch), world = _builtin()
    torch.manual_seed(0)
    rng = random.Random(0)
    cands = rng.sample(world.facts, 300)
    prompts0 = [world.relations[f.relation_id].train[0].format(f.subject) for f in cands]
    b = encode(model, tok, prompts0)
    with torch.no_grad():
        top = model(**b.inputs()).logits[torch.arange(len(cands)), b.last].argmax(-1)   # (300,)
    facts, drops = [], {"kn": [], "random": [], "activation": []}
    for f, t in zip(cands, top.tolist()):                    # facts the model gets right (top-1)
        if t == token_ids(tok, f.object)[0] and len(facts) < 6:
            rel = world.relations[f.relation_id]
            facts.append((f, [q.format(f.subject) for q in rel.train[:2] + rel.heldout]))
    assert len(facts) >= 4, "the built-in model knows too few facts"
    for f, prompts in facts:
        kns = N.knowledge_neurons(model, tok, prompts, f.object)
        assert 1 <= len(kns) <= 5
        for name, ns in [("kn", kns), ("random", N.random_neurons(model, kns, seed=0)),
                         ("activation", N.activation_neurons(model, tok, prompts[0], kns))]:
            drops[name].append(-N.intervention_effect(model, tok, ns, prompts, f.object, 0.0).mean())
    kn, rnd, act = (float(torch.stack(drops[k]).mean()) for k in ("kn", "random", "activation"))
    assert kn > 0.1, drops                                   # p(answer) falls by >10% on average
    assert kn > 3 * abs(rnd) and kn > act, (kn, rnd, act)    # far more than baseline neurons
