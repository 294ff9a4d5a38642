"""Exercises in the ARENA style: the learner writes the core of a method, a checker tests it against kvlab.

Every notebook from 01 on has one or two exercises, each three cells:

1. markdown: the task, its difficulty and time, hints;
2. a code cell tagged ``exercise`` (cell metadata ``"exercise": "01.1"``): a stub,
   ``def ffn_by_hand(...): raise NotImplementedError("exercise 1.2: ...")``;
3. the check: ``exercises.check_ffn_by_hand(ffn_by_hand, model, tok)``.

A checker calls the learner's function on a few inputs of the notebook's model (any supported family,
through :mod:`kvlab.arch`) and compares it with kvlab's own implementation, with a tolerance taken from
the dtype (:func:`kvlab.checks.tolerance`):

* right: it prints one line and returns True;
* wrong: it raises :class:`ExerciseError` naming what is wrong where it can tell (a shape, a transposed
  result, a factor, a forgotten layer norm, bias or activation), else the largest error and where;
* not done (the stub still raises ``NotImplementedError``): it prints "not done yet" and returns False,
  so that *Run all* goes on past an exercise the learner skips.

The solutions live in ``notebooks/solutions/NN.py``, one ``# %% exercise NN.k`` section per stub.
``python -m kvlab.course run`` (so ``make course`` and CI) executes a copy of each notebook with the stubs
replaced by the solutions (:func:`kvlab.course.with_solutions`); ``--no-solutions`` runs the notebooks as a
learner gets them.
"""
from __future__ import annotations

import functools
import math
import random
from typing import Callable

import torch

from . import checks
from .arch import adapter
from .loading import is_builtin

# Prompts (prompt, subject, answer) tried on a model that is not the built-in one, in order; the first
# whose words the tokenizer knows is used. The tiny test tokenizer knows only kvlab.testing.WORDS.
GENERIC_FACTS = [
    ("anna berg lives in", "anna berg", "paris"),
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"),
]
GENERIC_TEXTS = [
    "the city of paris is in france", "anna berg lives in paris", "tom lee plays the guitar",
    "the capital of italy is rome", "the king of england was born in london", "the queen speaks french",
    "berlin is the capital of germany", "the teacher plays football on one red river",
]


class ExerciseError(AssertionError):
    """The learner's answer to an exercise is wrong; the message says how."""


class _NotDone(Exception):
    pass


def _exercise(ex_id: str, title: str):
    """Wrap a checker: a stub that raises NotImplementedError reports "not done yet" (returns False)."""
    def wrap(check):
        @functools.wraps(check)
        def run(fn, *args, **kwargs):
            if not callable(fn):
                raise ExerciseError(f"exercise {ex_id}: pass your function itself, got {type(fn).__name__}")
            try:
                detail = check(fn, *args, **kwargs)
            except _NotDone as e:
                print(f"exercise {ex_id} ({title}) not done yet: {e}. Fill in the stub above and run both cells "
                      f"again (solution: notebooks/solutions/{ex_id[:2]}.py).")
                return False
            print(f"exercise {ex_id} ({title}) passed" + (f": {detail}" if detail else "."))
            return True
        run.exercise = ex_id
        return run
    return wrap


def _call(ex_id: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        raise _NotDone(str(e) or f"{getattr(fn, '__name__', 'the function')} raises NotImplementedError") from None


def _as_tensor(ex_id: str, what: str, got, like: torch.Tensor) -> torch.Tensor:
    if isinstance(got, (tuple, list)) and got and torch.is_tensor(got[0]):
        raise ExerciseError(f"exercise {ex_id}: {what} should be one tensor of shape {tuple(like.shape)}, "
                            f"got a {type(got).__name__} of {len(got)} tensors")
    try:
        t = torch.as_tensor(got)
    except Exception:
        raise ExerciseError(f"exercise {ex_id}: {what} should be a tensor of shape {tuple(like.shape)}, "
                            f"got {type(got).__name__}") from None
    if tuple(t.shape) != tuple(like.shape):
        hint = ""
        if t.dim() == 2 and tuple(t.shape[::-1]) == tuple(like.shape):
            hint = " (the transpose: check which side the matrix is multiplied from)"
        elif t.numel() == like.numel():
            hint = " (same number of entries: a reshape or a transpose too many?)"
        raise ExerciseError(f"exercise {ex_id}: {what} has shape {tuple(t.shape)}, expected {tuple(like.shape)}"
                            f"{hint}")
    if not t.is_floating_point():
        raise ExerciseError(f"exercise {ex_id}: {what} should hold floating-point numbers, got {t.dtype}")
    return t.detach().to(device=like.device)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _compare(ex_id: str, what: str, got, want: torch.Tensor, tol: float,
             mistakes: dict[str, Callable[[], torch.Tensor]] | None = None) -> float:
    """Raise ExerciseError unless ``got`` equals ``want`` within ``tol``; name a known mistake when ``got``
    matches one of ``mistakes`` (message -> the value that mistake gives, computed only on failure)."""
    got = _as_tensor(ex_id, what, got, want)
    if not torch.isfinite(got).all():
        raise ExerciseError(f"exercise {ex_id}: {what} has {int((~torch.isfinite(got)).sum())} NaN/inf entries")
    err = _max_err(got, want)
    if err <= tol:
        return err
    for message, wrong in (mistakes or {}).items():
        w = wrong()
        if w is not None and tuple(w.shape) == tuple(want.shape) and _max_err(got, w.to(want.device)) <= tol:
            raise ExerciseError(f"exercise {ex_id}: {what} is off: {message}")
    g, w = got.double().flatten(), want.double().flatten()
    if float(w @ w) > 0:
        c = float(g @ w / (w @ w))
        if abs(c - 1) > 1e-3 and _max_err(g, c * w) <= tol * max(1.0, abs(c)):
            raise ExerciseError(f"exercise {ex_id}: {what} is kvlab's times {c:.4g}: off by a constant factor")
    i = int((g - w).abs().argmax())
    where = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), tuple(want.shape))) if want.dim() else ()
    raise ExerciseError(f"exercise {ex_id}: {what} differs from kvlab's by up to {err:.3g} (tolerance {tol:.3g}); "
                        f"at index {where}: yours {float(g[i]):.6g}, kvlab's {float(w[i]):.6g}")


def _relative_tol(model, scale: float | torch.Tensor, factor: float = 64.0) -> float:
    """``factor`` units in the last place of the model's dtype, relative to ``scale`` (also below 1)."""
    scale = float(scale.abs().max()) if torch.is_tensor(scale) else abs(float(scale))
    return checks.tolerance(model, 1.0, factor) * max(scale, 1e-30)


# ---------------------------------------------------------------------------------------------
# Inputs that every supported model and tokenizer can read


def _usable(model, tok, prompt: str, subject: str | None = None, answer: str | None = None) -> bool:
    from .text import encode, subject_token_range, token_ids

    try:
        encode(model, tok, prompt)
        if subject is not None:
            subject_token_range(tok, prompt, subject)
        if answer is not None:
            token_ids(tok, answer)
    except ValueError:
        return False
    return True


def facts(model, tok, n: int = 3) -> list[tuple[str, str, str]]:
    """Up to ``n`` (prompt, subject, answer) the tokenizer can read: known facts on the built-in model,
    else :data:`GENERIC_FACTS`."""
    if is_builtin(model):
        from .data import load_known
        cands = [(k.prompt, k.subject, k.attribute) for k in load_known()[:4 * n]]
    else:
        cands = GENERIC_FACTS
    out = [f for f in cands if _usable(model, tok, *f)][:n]
    if not out:
        raise ValueError(f"no prompt of kvlab.exercises.GENERIC_FACTS can be read by this tokenizer "
                         f"({type(tok).__name__}); pass prompt=..., subject=..., answer=... to the checker")
    return out


def texts(model, tok, n: int = 48) -> list[str]:
    """``n`` corpus sentences on the built-in model, else those of :data:`GENERIC_TEXTS` the tokenizer reads."""
    if is_builtin(model):
        from .world import corpus_texts
        return list(corpus_texts(n=n, seed=3))
    out = [t for t in GENERIC_TEXTS if _usable(model, tok, t)][:n]
    if not out:
        raise ValueError("no sentence of kvlab.exercises.GENERIC_TEXTS can be read by this tokenizer; pass texts=...")
    return out


def _layers(arch) -> list[int]:
    return sorted({0, arch.n_layers // 2, arch.n_layers - 1})


# ---------------------------------------------------------------------------------------------
# 01: the FFN as a key-value memory


@_exercise("01.1", "coefficients by hand")
def check_coefficients(fn, model, tok, prompts: list[str] | None = None) -> str:
    """``fn(arch, layer, x) -> m``: x (batch, seq, d_model) the FFN's input (after its layer norm),
    m (batch, seq, d_ff) = f(x·Kᵀ + b_K) (gated FFNs: act(x·Gᵀ) * (x·Uᵀ)). Compared with the input of the
    value projection in a real forward pass, in the first, middle and last layer."""
    from .memory import decompose

    arch = adapter(model)
    prompts = prompts or [f[0] for f in facts(model, tok)]
    fam = arch.family
    for layer in _layers(arch):
        d = decompose(model, tok, prompts, layer)
        x = d.ffn_input
        with torch.no_grad():
            got = _call("01.1", fn, arch, layer, x)
            Ks, bs, act = arch.key_matrices(layer), arch.key_biases(layer), arch.act(layer)
            pre = [x @ K.T + (b if b is not None else 0) for K, b in zip(Ks, bs)]
            nobias = [x @ K.T for K in Ks]
            mistakes = {}
            if fam.gated:
                mistakes["you used the gate only: gated FFNs multiply act(x·Gᵀ) by the up projection x·Uᵀ "
                         "(arch.key_matrices(layer) gives [G, U])"] = lambda: act(pre[0])
                mistakes["the activation goes on the gate only: m = act(x·Gᵀ) * (x·Uᵀ)"] = lambda: act(pre[0] * pre[1])
                mistakes["you forgot the activation: m = act(x·Gᵀ) * (x·Uᵀ)"] = lambda: pre[0] * pre[1]
                mistakes["the gate and up keys are swapped: m = act(x·Gᵀ) * (x·Uᵀ), G first"] = \
                    lambda: act(pre[1]) * pre[0]
            else:
                mistakes["you forgot the activation f (arch.act(layer))"] = lambda: pre[0]
                if bs[0] is not None:
                    mistakes["you forgot the key bias b_K (arch.key_biases(layer))"] = lambda: act(nobias[0])
                mistakes["you used ReLU, but this model's f is " + type(act).__name__] = lambda: torch.relu(pre[0])
            _compare("01.1", f"m at layer {layer}", got, d.m, checks.tolerance(model, scale=d.m), mistakes)
    return f"m = f(x·Kᵀ) matches the model's coefficients in layers {_layers(arch)} ({arch.name})"


@_exercise("01.2", "the FFN output by hand")
def check_ffn_by_hand(fn, model, tok, prompts: list[str] | None = None) -> str:
    """``fn(arch, layer, m) -> out``: m (batch, seq, d_ff) the coefficients, out (batch, seq, d_model) =
    Σ_i m_i v_i + b. Compared with the FFN module's real output in the first, middle and last layer."""
    from .memory import decompose

    arch = adapter(model)
    prompts = prompts or [f[0] for f in facts(model, tok)]
    for layer in _layers(arch):
        d = decompose(model, tok, prompts, layer)
        with torch.no_grad():
            got = _call("01.2", fn, arch, layer, d.m)
            V, b = d.values, arch.value_bias(layer)
            mistakes = {}
            if b is not None:
                mistakes["you forgot the value bias b (arch.value_bias(layer))"] = lambda: d.m @ V
            if arch.d_ff == arch.d_model:     # only then would the key matrix fit
                mistakes["you used the keys: the values are arch.value_matrix(layer)"] = \
                    lambda: d.m @ arch.key_matrix(layer) + (b if b is not None else 0)
            _compare("01.2", f"the FFN output at layer {layer}", got, d.output,
                     checks.tolerance(model, scale=d.output), mistakes)
    return f"Σ m_i v_i + b equals the FFN's output in layers {_layers(arch)} ({arch.name})"


# ---------------------------------------------------------------------------------------------
# 02: trigger mining


@_exercise("02.1", "top-k triggers of one key")
def check_top_triggers(fn, model, tok, corpus: list[str] | None = None, k: int = 5) -> str:
    """``fn(model, tok, texts, layer, key, k) -> [(sentence, position, coefficient), ...]``, best first:
    the k prefixes ``tok(texts[sentence])["input_ids"][:position + 1]`` with the largest coefficient m_key
    (no prefix ending at a special token). Compared with :func:`kvlab.triggers.mine_triggers`."""
    from .triggers import last_coefficients, mine_triggers, tokenize_corpus

    arch = adapter(model)
    corpus = corpus or texts(model, tok)
    ids = tokenize_corpus(tok, corpus)
    special = set(tok.all_special_ids)
    rng = random.Random(0)
    probes = [(l, rng.randrange(arch.d_ff)) for l in (0, arch.n_layers - 1)]
    index = mine_triggers(model, tok, corpus, layers=sorted({l for l, _ in probes}), k=k)
    for layer, key in probes:
        want = index.values[layer][key]                                    # (k,) descending
        want = want[torch.isfinite(want)]
        got = _call("02.1", fn, model, tok, corpus, layer, key, k)
        where = f"layer {layer}, key {key}"
        try:
            got = [(int(s), int(p), float(c)) for s, p, c in got]
        except (TypeError, ValueError):
            raise ExerciseError(f"exercise 02.1: return a list of (sentence, position, coefficient) triples, "
                                f"got {str(got)[:80]}") from None
        if len(got) != len(want):
            raise ExerciseError(f"exercise 02.1 ({where}): {len(got)} triggers returned, expected k={len(want)}")
        for s, p, c in got:
            if not 0 <= s < len(ids):
                raise ExerciseError(f"exercise 02.1 ({where}): sentence {s} does not exist ({len(ids)} texts)")
            if not 0 <= p < len(ids[s]):
                raise ExerciseError(f"exercise 02.1 ({where}): position {p} is padding: sentence {s} has "
                                    f"{len(ids[s])} tokens (mask out the padded positions)")
            if ids[s][p] in special:
                raise ExerciseError(f"exercise 02.1 ({where}): sentence {s} position {p} is the special token "
                                    f"{tok.decode([ids[s][p]])!r}: leave out prefixes ending at special tokens")
        coef = torch.tensor([c for _, _, c in got])
        tol = checks.tolerance(model, scale=want)
        if len(coef) > 1 and bool((coef[1:] > coef[:-1] + tol).any()):
            raise ExerciseError(f"exercise 02.1 ({where}): the triggers must come best first (descending "
                                f"coefficients), got {[round(float(c), 4) for c in coef]}")
        alone = last_coefficients(model, tok, [ids[s][:p + 1] for s, p, _ in got], layer)[:, key]   # (k,)
        for (s, p, c), a in zip(got, alone):
            if abs(c - float(a)) > tol:
                raise ExerciseError(f"exercise 02.1 ({where}): sentence {s} position {p} reports m = {c:.5g}, but "
                                    f"that prefix alone gives m = {float(a):.5g} (read m at the prefix's last position)")
        if _max_err(coef, want) > tol:
            i = int((coef - want).abs().argmax())
            raise ExerciseError(f"exercise 02.1 ({where}): trigger {i} has m = {float(coef[i]):.5g}, but the corpus "
                                f"has a prefix with m = {float(want[i]):.5g} at that rank: "
                                f"{index.prefix(layer, key, i)!r} (are all sentences and positions searched?)")
    return f"the top-{k} triggers of {len(probes)} keys match kvlab.triggers.mine_triggers"


# ---------------------------------------------------------------------------------------------
# 03: values in the vocabulary space


@_exercise("03.1", "a value through the unembedding")
def check_project_value(fn, model, tok, keys: list[int] | None = None) -> str:
    """``fn(arch, layer, key) -> logits`` (vocab,): value v_key of ``layer`` read through the final layer norm
    and the unembedding. Compared with :func:`kvlab.vocab.to_logits`."""
    from .vocab import to_logits

    arch = adapter(model)
    rng = random.Random(0)
    keys = keys or [rng.randrange(arch.d_ff) for _ in range(2)]
    for layer in (0, arch.n_layers - 1):
        for key in keys:
            v = arch.value_matrix(layer)[key].detach()                         # (d_model,)
            want = to_logits(model, v)[0]                                      # (vocab,) float32
            with torch.no_grad():
                got = _call("03.1", fn, arch, layer, key)
                got = got.float() if torch.is_tensor(got) else got
                mistakes = {
                    "you skipped the final layer norm: logits = unembed(final_norm(v)) (arch.final_norm)":
                        lambda: arch.unembed(v[None])[0].float(),
                    "you projected the key k_i, not the value v_i (arch.value_matrix)":
                        lambda: to_logits(model, arch.key_matrix(layer)[key].detach())[0],
                    "these are probabilities: return the logits, before any softmax":
                        lambda: want.softmax(-1),
                }
            _compare("03.1", f"the logits of value {key} in layer {layer}", got, want,
                     checks.tolerance(model, scale=want), mistakes)
    return "unembed(final_norm(v_i)) matches kvlab.vocab.to_logits"


# ---------------------------------------------------------------------------------------------
# 04: composition and the residual stream

LABELS = ("keep", "override", "compose")


@_exercise("04.1", "keep, override or compose")
def check_classify_update(fn, model, tok, prompts: list[str] | None = None) -> str:
    """``fn(model, tok, prompt, layer) -> "keep" | "override" | "compose"`` for the last position: does the
    FFN of ``layer`` keep the residual's top token, override it with its own, or compose a third one?
    Compared with :func:`kvlab.lens.composition_stats` on each prompt alone."""
    from .lens import composition_stats, residual_stream
    from .vocab import decode_ids, top_ids

    arch = adapter(model)
    prompts = prompts or [f[0] for f in facts(model, tok, 4)]
    ls = _layers(arch)
    seen = set()
    for prompt in prompts:
        stats = composition_stats(model, tok, [prompt], ls)
        for i, layer in enumerate(ls):
            want = LABELS[int(torch.stack([stats.keep[i], stats.override[i], stats.compose[i]]).argmax())]
            got = _call("04.1", fn, model, tok, prompt, layer)
            if got not in LABELS:
                raise ExerciseError(f"exercise 04.1: return one of {LABELS}, got {got!r}")
            if got != want:
                rs = residual_stream(model, tok, [prompt], [layer])
                after, ffn = rs["block"][layer], rs["ffn"][layer]
                t = {n: decode_ids(tok, top_ids(model, v)[1][:, 0])[0]
                     for n, v in (("before", after - ffn), ("FFN output", ffn), ("after", after))}
                raise ExerciseError(f"exercise 04.1: {prompt!r}, layer {layer}: expected {want!r}, got {got!r}. Top "
                                    f"tokens: residual before the FFN {t['before']!r}, FFN output {t['FFN output']!r}, "
                                    f"after {t['after']!r} (before = block output − FFN output)")
            seen.add(want)
    return f"{len(prompts) * len(ls)} predictions classified as kvlab.lens does ({', '.join(sorted(seen))} seen)"


# ---------------------------------------------------------------------------------------------
# 05: causal tracing


@_exercise("05.1", "one causal-tracing cell")
def check_restored_prob(fn, model, tok, prompt: str | None = None, subject: str | None = None,
                        samples: int = 3) -> str:
    """``fn(model, tok, prompt, subject, answer_id, noise, eps, token, layer) -> float``: p(answer) averaged
    over the noise samples when the subject's embeddings get ``noise * eps`` (eps: (samples, n_subject_tokens,
    d_model)) and the output of block ``layer`` at ``token`` is restored to its clean value. Compared with
    :func:`kvlab.tracing.trace` (kind "hidden") with the same eps."""
    from .text import subject_token_range
    from .tracing import noise_level, sample_noise, trace

    arch = adapter(model)
    if prompt is None:
        prompt, subject, _ = facts(model, tok, 1)[0]
    b, e = subject_token_range(tok, prompt, subject)
    noise = noise_level(model, tok, [subject])
    eps = sample_noise(samples, e - b, arch.d_model, seed=0)
    ref = trace(model, tok, prompt, subject, kind="hidden", noise=noise, samples=samples, eps=eps)
    n = ref.scores.shape[0]
    cells = list(dict.fromkeys([(e - 1, 0), (e - 1, arch.n_layers // 2), (n - 1, arch.n_layers - 1), (b, 0)]))

    def tol(p: float) -> float:
        """64 ulps of the model's dtype relative to p (a probability's rounding scales with it), and at least
        64 float32 ulps of 1. A bound of 64 ulps of 1 would be 0.5 in bfloat16: any probability would pass."""
        return max(checks.tolerance(torch.float32), checks.tolerance(model, 1.0) * abs(p))
    for t, l in cells:
        got = _call("05.1", fn, model, tok, prompt, subject, ref.answer_id, noise, eps.clone(), t, l)
        try:
            got = float(got)
        except (TypeError, ValueError, RuntimeError):
            raise ExerciseError(f"exercise 05.1: return p(answer) as one number (mean over the samples), "
                                f"got {type(got).__name__} {str(got)[:60]}") from None
        want = float(ref.scores[t, l])
        if abs(got - want) <= tol(want):
            continue
        where = f"token {t} ({ref.tokens[t]!r}), layer {l}"
        if abs(got - ref.low_score) <= tol(ref.low_score):
            why = "it equals the corrupted p: the clean state was not restored (patch the output of arch.layer(layer))"
        elif abs(got - ref.high_score) <= tol(ref.high_score):
            why = "it equals the clean p: was the noise added to the subject's embeddings (arch.embed's output)?"
        elif not 0 <= got <= 1:
            why = "not a probability: take softmax(logits)[answer_id] at the last position"
        else:
            why = "check the noise (noise * eps on the subject tokens only) and the restored position"
        raise ExerciseError(f"exercise 05.1: {where}: yours {got:.6f}, kvlab's {want:.6f} (clean {ref.high_score:.4f}, "
                            f"corrupted {ref.low_score:.4f}): {why}")
    return f"{len(cells)} cells match kvlab.tracing.trace (clean p {ref.high_score:.3f}, corrupted {ref.low_score:.3f})"


# ---------------------------------------------------------------------------------------------
# 06: knowledge neurons


def _ig_variant(model, tok, prompt: str, answer: str, layer: int, neuron: int, alphas) -> float:
    """m̄_i · mean_k ∂p(α_k m̄)/∂m_i for given α_k (one pass each): what a Riemann sum with those points gives."""
    from .hooks import capture, patch
    from .neurons import answer_batch, answer_logprob

    arch = adapter(model)
    batch = answer_batch(model, tok, prompt, answer)
    pos = int(batch.prompt_last[0])
    with torch.no_grad(), capture(model, {"m": arch.value_module(layer)}, what="input") as st:
        model(**batch.inputs())
    m_bar = st["m"][0, pos]                                                 # (d_ff,)
    total = 0.0
    for a in alphas:
        leaf = (a * m_bar).detach().requires_grad_(True)

        def put(m, leaf=leaf):
            m = m.clone()
            m[0, pos] = leaf.to(m.dtype)
            return m
        with torch.enable_grad(), patch(arch.value_module(layer), put, what="input"):
            p = answer_logprob(model(**batch.inputs()).logits, batch).exp()[0]
            total += float(torch.autograd.grad(p, leaf)[0][neuron])
    return float(m_bar[neuron]) * total / len(alphas)


@_exercise("06.1", "integrated gradients for one neuron")
def check_integrated_gradients(fn, model, tok, prompt: str | None = None, answer: str | None = None,
                               steps: int = 8) -> str:
    """``fn(model, tok, prompt, answer, layer, neuron, steps) -> float``: Dai et al.'s attribution
    m̄_i · (1/S) Σ_k ∂p(α_k m̄)/∂m_i with α_k = (k − ½)/S, the whole layer's m̄ scaled at the last prompt
    position. Compared with :func:`kvlab.neurons.attribute` for the two top neurons of a layer."""
    from .neurons import attribute

    arch = adapter(model)
    if prompt is None:
        prompt, _, answer = facts(model, tok, 1)[0]
    layer = arch.n_layers - 1       # the top layer, where Dai et al. find knowledge neurons (the built-in
    ref = attribute(model, tok, prompt, answer, layers=[layer], steps=steps)  # model's layer-0 FFN is empty)
    scores = ref.scores[layer]                                              # (d_ff,)
    neurons = [int(i) for i in scores.abs().topk(2).indices]
    # 1024 float32 ulps of the scores' scale (a loop of single steps against kvlab's batched rows); in float16
    # and bfloat16 32 of their ulps (1024 would be 1 and 8 times the scale there: any answer would pass)
    tol = max(_relative_tol(torch.float32, scores, factor=1024), _relative_tol(model, scores, factor=32))
    for i in neurons:
        got = _call("06.1", fn, model, tok, prompt, answer, layer, i, steps)
        try:
            got = float(got)
        except (TypeError, ValueError, RuntimeError):
            raise ExerciseError(f"exercise 06.1: return the attribution as one number, got {type(got).__name__}") from None
        want = float(scores[i])
        if abs(got - want) <= tol:
            continue
        m_i = float(ref.activations[layer, i])
        S = steps
        mistakes = {
            "you forgot to multiply by m̄_i (the neuron's clean activation)": lambda: want / m_i if m_i else math.nan,
            "you summed the gradients: divide by the number of steps S": lambda: want * S,
            "left Riemann points α_k = k/S, k = 0..S−1; kvlab uses the midpoints (k − ½)/S":
                lambda: _ig_variant(model, tok, prompt, answer, layer, i, [k / S for k in range(S)]),
            "right Riemann points α_k = k/S, k = 1..S; kvlab uses the midpoints (k − ½)/S":
                lambda: _ig_variant(model, tok, prompt, answer, layer, i, [k / S for k in range(1, S + 1)]),
        }
        for message, wrong in mistakes.items():
            w = wrong()
            if math.isfinite(w) and abs(got - w) <= max(tol, 1e-3 * abs(w)):
                raise ExerciseError(f"exercise 06.1: neuron ({layer}, {i}): {message} (yours {got:.6g}, "
                                    f"kvlab's {want:.6g})")
        raise ExerciseError(f"exercise 06.1: neuron ({layer}, {i}): yours {got:.6g}, kvlab's {want:.6g} (tolerance "
                            f"{tol:.2g}); scale the whole layer's m̄ (not only neuron i) at the last prompt position")
    return f"the attributions of neurons {[(layer, i) for i in neurons]} match kvlab.neurons.attribute"


# ---------------------------------------------------------------------------------------------
# 07 and 09: ROME's and MEMIT's updates


def _covariance(d: int, seed: int) -> torch.Tensor:
    """A well-conditioned random key second moment, (d, d) float64 (eigenvalues in about [1, 3])."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.eye(d, dtype=torch.float64) + A @ A.T / (2 * d)


@_exercise("07.1", "the rank-one ROME update")
def check_rome_update(fn, model, tok=None, layer: int | None = None) -> str:
    """``fn(V, bias, C, k_star, v_star) -> ΔV`` (d_ff, d_model) with (V + ΔV)ᵀk* + b = v* and the least change
    under C: ΔV = outer(C⁻¹k*, Λ), Λ = (v* − Vᵀk* − b) / ((C⁻¹k*)ᵀk*). V: the model's value matrix (float64),
    C: a random key covariance. Compared with :func:`kvlab.editing.rome.rome_update`."""
    from .editing.rome import rome_update

    arch = adapter(model)
    layer = arch.n_layers // 2 if layer is None else arch.check_layer(layer)
    V = arch.value_matrix(layer).detach().double().cpu()                    # (d_ff, d_model)
    b = arch.value_bias(layer)
    b = None if b is None else b.detach().double().cpu()
    bias = b if b is not None else torch.zeros(arch.d_model, dtype=torch.float64)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        C = _covariance(arch.d_ff, seed)
        k = torch.randn(arch.d_ff, generator=g, dtype=torch.float64).abs()  # (d_ff,) like post-activation keys
        v = torch.randn(arch.d_model, generator=g, dtype=torch.float64) * V.norm(dim=0).mean()
        want = rome_update(V, b, k, v, C)
        got = _call("07.1", fn, V.clone(), None if b is None else b.clone(), C.clone(), k.clone(), v.clone())

        def outer(u, with_bias=True):
            return torch.outer(u, (v - V.T @ k - (bias if with_bias else 0)) / (u @ k))
        Cinv_k = torch.linalg.solve(C, k)
        mistakes = {"you used C·k* instead of C⁻¹k* (solve, do not multiply)": lambda: outer(C @ k),
                    "you left out C: u = C⁻¹k*, not k*": lambda: outer(k),
                    "the bias is missing from the residual: Λ ∝ v* − Vᵀk* − b": lambda: outer(Cinv_k, False)
                    if b is not None else None}
        _compare("07.1", "ΔV", got, want, 1e-4 * float(want.abs().max()) + 1e-12, mistakes)
    got = torch.as_tensor(got).double()
    err = _max_err((V + got).T @ k + bias, v)
    return f"ΔV matches kvlab's rome_update; (V + ΔV)ᵀk* + b = v* to {err:.1e}"


@_exercise("09.1", "MEMIT's least-squares update")
def check_memit_update(fn, model, tok=None, n: int = 6) -> str:
    """``fn(K, R, C, lam) -> Δ`` (d_ff, d_model) = argmin ‖KΔ − R‖² + λ tr(ΔᵀCΔ) = (λC + KᵀK)⁻¹KᵀR, for
    K (n, d_ff) keys, R (n, d_model) residuals, C (d_ff, d_ff) and λ > 0, in float64. Compared with
    :func:`kvlab.editing.memit.memit_update` on the model's sizes."""
    from .editing.memit import default_lambda, memit_update

    arch = adapter(model)
    for seed, lam in ((0, float(default_lambda(model))), (1, 1.0)):
        g = torch.Generator().manual_seed(seed)
        C = _covariance(arch.d_ff, seed)
        K = torch.randn(n, arch.d_ff, generator=g, dtype=torch.float64).abs()
        R = torch.randn(n, arch.d_model, generator=g, dtype=torch.float64)
        want = memit_update(K, R, C, lam)
        got = _call("09.1", fn, K.clone(), R.clone(), C.clone(), lam)
        eye = torch.eye(arch.d_ff, dtype=torch.float64)
        mistakes = {"you left out C: the penalty is λ tr(ΔᵀCΔ), so the matrix is λC + KᵀK":
                        lambda: torch.linalg.solve(lam * eye + K.T @ K, K.T @ R),
                    "λ is missing: the matrix is λC + KᵀK": lambda: torch.linalg.solve(C + K.T @ K, K.T @ R),
                    "the update of one key at a time (ROME) is not the joint least-squares solution":
                        lambda: sum(torch.outer(torch.linalg.solve(C, k), r) / (k @ torch.linalg.solve(C, k))
                                    for k, r in zip(K, R))}
        _compare("09.1", f"Δ (λ = {lam:g})", got, want, 1e-4 * float(want.abs().max()) + 1e-12, mistakes)
    return f"Δ = (λC + KᵀK)⁻¹KᵀR matches kvlab's memit_update for {n} keys"


# ---------------------------------------------------------------------------------------------
# 08: LoRA targets


@_exercise("08.1", "LoRA target modules from the adapter")
def check_lora_targets(fn, model, tok=None, families: tuple[str, ...] = ("llama", "gpt_neox")) -> str:
    """``fn(arch, role) -> [full module names]`` for role "keys" or "values", every layer: what peft's
    ``target_modules`` needs. Checked on ``model`` and on tiny random models of ``families`` (a gated and
    another family): compared with :func:`kvlab.lora.target_modules`."""
    from .lora import target_modules
    from .testing import tiny

    models = [("this model", model)] + [(f"a tiny {f}", tiny(f).model) for f in families]
    names = []
    for label, m in models:
        arch = adapter(m)
        names.append(arch.name)
        for role in ("keys", "values"):
            want = target_modules(m, role)
            got = _call("08.1", fn, arch, role)
            if isinstance(got, str) or not all(isinstance(x, str) for x in got):
                raise ExerciseError(f"exercise 08.1: return a list of module names (strings), got {str(got)[:80]}")
            got = list(got)
            if len(set(got)) != len(got):
                raise ExerciseError(f"exercise 08.1 ({label}, {role}): names repeat: {got[:4]}...")
            if set(got) == set(want):
                continue
            other = set(target_modules(m, "values" if role == "keys" else "keys"))
            leaves = {w.split(".")[-1] for w in want}
            if set(got) == other:
                why = f"these are the {'values' if role == 'keys' else 'keys'}"
            elif set(got) <= leaves:
                why = (f"bare leaf names {sorted(set(got))} are ambiguous for peft (GPT-2's 'c_proj' is also the "
                       f"attention output): give full names like {want[0]!r}")
            elif set(got) < set(want):
                missing = sorted(set(want) - set(got))
                why = f"{len(missing)} missing, e.g. {missing[0]!r}"
                if arch.family.gated and role == "keys":
                    why += " (a gated FFN has two key matrices: arch.family.keys)"
            else:
                extra = sorted(set(got) - set(want))
                why = f"{len(extra)} not a {role[:-1]} matrix, e.g. {extra[0]!r}"
            raise ExerciseError(f"exercise 08.1 ({label}, {arch.name}, {role}): {why}; expected e.g. {want[:2]}")
    return f"keys and values of {', '.join(dict.fromkeys(names))} match kvlab.lora.target_modules"


CHECKERS = {f.exercise: f for f in (check_coefficients, check_ffn_by_hand, check_top_triggers, check_project_value,
                                    check_classify_update, check_restored_prob, check_integrated_gradients,
                                    check_rome_update, check_lora_targets, check_memit_update)}
