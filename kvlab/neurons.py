"""Knowledge neurons (Dai et al. 2022): integrated-gradient attribution of FFN memory coefficients.

A "neuron" is one FFN intermediate unit ``(layer, i)``: its activation is the memory
coefficient m_i, the *input* of the value projection (``arch.value_module(layer)``), so
the same code covers GPT-2, GPT-J, GPT-Neo, GPT-NeoX and gated (Llama-style) FFNs, where
m_i = silu(gate_i·x)·(up_i·x).

Attribution of neuron i in layer l for a prompt and an answer, with m̄ the neuron
activations of layer l at the last prompt position:

    Attr_i = m̄_i · ∫₀¹ ∂p(α·m̄) / ∂m_i dα  ≈  m̄_i · (1/S) Σ_k ∂p(α_k·m̄) / ∂m_i,   α_k = (k − ½)/S

(the midpoint Riemann sum with S = ``steps`` points, Dai et al. use S = 20). The whole
vector of layer l is scaled at once, other layers run normally. By the fundamental
theorem of calculus the attributions of a layer sum to p(m̄) − p(0) (*completeness*);
the midpoint rule's error shrinks like 1/S².

p(answer) is the *joint* probability of the answer's tokens under teacher forcing
(product of the per-token probabilities; one token for the built-in world). The
attribution scales m at the last prompt position only, the position that predicts the
first answer token; the answer's later tokens see its effect through attention.
``suppress``/``amplify`` act at the last position of each row by default, as
:func:`intervention_effect` does (the last prompt position, as Dai et al. intervene at
BERT's [MASK] position); ``positions="all"`` acts at every position.

Refinement (:func:`refine`) keeps the neurons shared by more than p·n of n prompts, as Dai et
al. and the EleutherAI ``knowledge-neurons`` package do; ``target=None`` holds p fixed.

Batching and caching: the S scaled copies are rows of one batch, so one forward + backward
pass attributes a whole group of layers (``batch_size`` rows per pass). α changes nothing
below the attributed layer and no position before the last prompt token, so each row starts
from the clean run's input of its layer and computes only the positions from the last prompt
token on, attending to the clean run's keys and values of the earlier positions (the split
machinery of :class:`kvlab.tracing.BlockRunner`); ``method="plain"`` recomputes everything, the
readable reference. ``benchmarks/bench_neurons.py`` times both against the EleutherAI package's
procedure.

    attr = attribute(model, tok, "Anna Berg lives in", "Kelmor")      # Attribution
    kns = knowledge_neurons(model, tok, prompts, "Kelmor")            # [(layer, i), ...]
    with suppress(model, kns):                                         # m_i ← 0 at the last position
        answer_prob(model, tok, "Anna Berg lives in", "Kelmor")
    intervention_effect(model, tok, kns, prompts, "Kelmor", factor=2.0)  # amplify at the last prompt position
"""
from __future__ import annotations

import operator
import random
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import torch

from . import checks
from .arch import adapter
from .hooks import capture, hooks, patch
from .text import encode, pad_rows, token_ids
from .tracing import BlockRunner, eval_mode

Neuron = tuple[int, int]  # (layer, index in d_ff)


# ---------------------------------------------------------------------------------------------
# p(answer) with teacher forcing


@dataclass
class AnswerBatch:
    """Prompts followed by their answers (all but the last answer token), right-padded.

    Row b reads the probability of answer token j at position ``prompt_last[b] + j``.
    """

    input_ids: torch.Tensor       # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq)
    prompt_last: torch.Tensor     # (batch,) index of the last prompt token
    answer_ids: list[list[int]]   # per row, the answer's token ids

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def _as_lists(prompts, answers) -> tuple[list[str], list[str], bool]:
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    answers = [answers] * len(prompts) if isinstance(answers, str) else list(answers)
    if len(answers) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    return prompts, answers, single


def answer_batch(model, tok, prompts: str | Sequence[str], answers: str | Sequence[str]) -> AnswerBatch:
    """Tokenise ``prompt + answer[:-1]`` per row for teacher-forced answer probabilities."""
    prompts, answers, _ = _as_lists(prompts, answers)
    enc = encode(model, tok, prompts)
    ans = [token_ids(tok, a) for a in answers]
    rows = [enc.input_ids[b, : int(enc.last[b]) + 1].tolist() + a[:-1] for b, a in enumerate(ans)]
    ids, mask = pad_rows(model, tok, rows)                        # (batch, seq) x2, right-padded
    return AnswerBatch(ids, mask, enc.last.clone(), ans)


def answer_logprob(logits: torch.Tensor, batch: AnswerBatch, reduce: str = "sum") -> torch.Tensor:
    """Log-probability of each row's answer from the logits (batch, seq, vocab) -> (batch,).

    ``reduce="sum"``: log of the joint probability (product over tokens);
    ``"mean"``: mean per-token log-probability (ROME's convention for CounterFact).
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    logp = torch.log_softmax(logits.float(), dim=-1)  # (batch, seq, vocab)
    out = []
    for b, ans in enumerate(batch.answer_ids):
        pos = int(batch.prompt_last[b]) + torch.arange(len(ans), device=logits.device)
        lp = logp[b, pos, torch.tensor(ans, device=logits.device)]  # (n_answer_tokens,)
        out.append(lp.sum() if reduce == "sum" else lp.mean())
    return torch.stack(out)


def answer_prob(model, tok, prompts: str | Sequence[str], answers: str | Sequence[str],
                reduce: str = "prod") -> float | torch.Tensor:
    """p(answer | prompt) by teacher forcing: a float for one prompt, else a (n_prompts,) tensor.

    ``answers`` is one answer for every prompt or one per prompt. ``reduce="prod"`` gives
    the joint probability of the answer's tokens (the quantity :func:`attribute` explains),
    ``"mean"`` the geometric mean exp(mean log p) of the per-token probabilities.
    """
    if reduce not in ("prod", "mean"):
        raise ValueError(f"reduce must be 'prod' or 'mean', got {reduce!r}")
    prompts, answers, single = _as_lists(prompts, answers)
    batch = answer_batch(model, tok, prompts, answers)
    with torch.no_grad(), eval_mode(model):
        logits = checks.finite_output(model, model(**batch.inputs()).logits, "answer_prob", "the logits")
    p = answer_logprob(logits, batch, "sum" if reduce == "prod" else "mean").exp().cpu()
    return float(p[0]) if single else p


# ---------------------------------------------------------------------------------------------
# Integrated gradients


@dataclass
class Attribution:
    """Integrated-gradient attribution of every FFN neuron for one prompt and answer.

    ``scores[l, i]`` is neuron i of layer l's attribution (zeros for layers not in
    ``layers``). Completeness: ``scores[l].sum() ≈ p_full - p_baseline[l]``.
    """

    prompt: str
    answer: str
    layers: list[int]
    scores: torch.Tensor        # (n_layers, d_ff) attributions
    activations: torch.Tensor   # (n_layers, d_ff) m at the last prompt position
    p_full: float               # p(answer) with the real activations
    p_baseline: torch.Tensor    # (n_layers,) p(answer) with layer l's m zeroed at that position (nan: not run)
    steps: int
    position: int               # index of the last prompt token (where m is scaled)

    def completeness_error(self) -> torch.Tensor:
        """(len(layers),) Σ_i Attr_{l,i} − (p_full − p_baseline[l]) per attributed layer."""
        ls = torch.tensor(self.layers)
        return self.scores[ls].sum(-1) - (self.p_full - self.p_baseline[ls])

    def top(self, k: int = 10) -> list[tuple[Neuron, float]]:
        """The k neurons with the largest attribution, best first."""
        flat = self.scores.flatten()
        vals, idx = flat.topk(min(k, flat.numel()))
        d_ff = self.scores.shape[1]
        return [((int(i) // d_ff, int(i) % d_ff), float(v)) for v, i in zip(vals, idx)]


def _clean_run(model, batch: AnswerBatch, arch) -> tuple[torch.Tensor, float]:
    """Activations m at the last prompt position of every layer, (n_layers, d_ff), and p(answer)."""
    mods = {l: arch.value_module(l) for l in range(arch.n_layers)}
    with torch.no_grad(), capture(model, mods, what="input") as store:
        logits = model(**batch.inputs()).logits
    pos = int(batch.prompt_last[0])
    checks.finite_output(model, logits, "attribute", "the clean run's logits")
    m = torch.stack([store[l][0, pos] for l in range(arch.n_layers)])  # (n_layers, d_ff)
    return m, float(answer_logprob(logits, batch).exp()[0])


def _zero_layer_probs(model, batch: AnswerBatch, arch, layers: list[int]) -> torch.Tensor:
    """p(answer) with m of one layer zeroed at the last prompt position, for each layer: (n_layers,)."""
    R, pos = len(layers), int(batch.prompt_last[0])
    rep = AnswerBatch(batch.input_ids.expand(R, -1), batch.attention_mask.expand(R, -1),
                      batch.prompt_last.expand(R), batch.answer_ids * R)

    def zero_row(r):
        def fn(m):  # (R, seq, d_ff)
            m = m.clone()
            m[r, pos] = 0
            return m
        return fn

    with torch.no_grad(), patch({arch.value_module(l): zero_row(r) for r, l in enumerate(layers)}, what="input"):
        p = answer_logprob(model(**rep.inputs()).logits, rep).exp().cpu()
    out = torch.full((arch.n_layers,), float("nan"))
    out[torch.tensor(layers)] = p
    return out


def attribute(model, tok, prompt: str, answer: str, layers: int | Sequence[int] | None = None, steps: int = 20,
              batch_size: int = 128, method: str = "cached") -> Attribution:
    """Integrated gradients of p(answer | prompt) w.r.t. the FFN coefficients at the last prompt position.

    ``layers``: which layers to attribute (default all). ``steps``: Riemann points S per
    layer (Dai et al.: 20). ``batch_size``: rows per forward/backward pass; the
    (layer, α) pairs are packed into passes of that many rows (``steps`` rows = one layer
    per pass, ``1`` = one step at a time). Returns an :class:`Attribution`.

    ``method``: ``"cached"`` (default) starts the rows of layer l from the clean run's input of
    block l and computes only the positions from the last prompt token on, the earlier positions'
    keys and values taken from the clean run (α changes nothing before layer l, nor any earlier
    position); ``"plain"`` runs the whole model on the whole sequence for every row, the
    readable reference. Both give the same attribution up to float rounding.

    The model runs in eval mode (dropout off) for the duration, its mode given back afterwards
    (:func:`kvlab.tracing.eval_mode`); NaN/inf activations or scores raise ValueError naming the weight.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"attribute: prompt must be a non-empty string, got {prompt!r}")
    steps = checks.integer("attribute", "steps", steps)
    batch_size = checks.integer("attribute", "batch_size", batch_size)
    if method not in ("cached", "plain"):
        raise ValueError(f"attribute: method must be 'cached' or 'plain', got {method!r}")
    arch = adapter(model)
    ls = arch.check_layers(layers)
    batch = answer_batch(model, tok, prompt, answer)          # one row
    with eval_mode(model):
        if method == "cached":
            out = _attribute_cached(model, batch, arch, prompt, answer, ls, steps, batch_size)
        else:
            out = _attribute_plain(model, batch, arch, prompt, answer, ls, steps, batch_size)
    checks.finite_output(model, out.scores, "attribute", f"the attribution scores of prompt {prompt!r}")
    return out


def _attribute_plain(model, batch: AnswerBatch, arch, prompt: str, answer: str, ls: list[int], steps: int,
                     batch_size: int) -> Attribution:
    """:func:`attribute` running the whole model on the whole sequence for every row (the reference)."""
    pos = int(batch.prompt_last[0])
    m_clean, p_full = _clean_run(model, batch, arch)           # (n_layers, d_ff)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps  # midpoint rule
    jobs = [(l, a) for l in ls for a in alphas.tolist()]
    grad_sum = torch.zeros_like(m_clean, dtype=torch.float32)  # (n_layers, d_ff) Σ_k ∂p/∂m at α_k m̄

    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        R = len(chunk)
        rep = AnswerBatch(batch.input_ids.expand(R, -1), batch.attention_mask.expand(R, -1),
                          batch.prompt_last.expand(R), batch.answer_ids * R)
        rows: dict[int, list[int]] = {}
        for r, (l, _) in enumerate(chunk):
            rows.setdefault(l, []).append(r)
        leaves = {}                                            # layer -> (rows_l, d_ff) scaled copies α·m̄
        for l, rs in rows.items():
            a = torch.tensor([chunk[r][1] for r in rs], dtype=m_clean.dtype, device=m_clean.device)
            leaves[l] = (a[:, None] * m_clean[l][None, :]).requires_grad_(True)

        def put(l):
            idx = torch.tensor(rows[l], device=m_clean.device)

            def fn(m):  # (R, seq, d_ff): rows of this layer get their scaled copy at the last prompt position
                m = m.clone()
                m[idx, pos] = leaves[l].to(m.dtype)
                return m
            return fn

        with torch.enable_grad(), patch({arch.value_module(l): put(l) for l in rows}, what="input"):
            logp = answer_logprob(model(**rep.inputs()).logits, rep)      # (R,) float32
            grads = torch.autograd.grad(logp.sum(), [leaves[l] for l in rows])
        p = logp.detach().exp()                                           # (R,)
        for l, g in zip(rows, grads):   # ∂p/∂m = p · ∂log p/∂m (see _grad_p)
            grad_sum[l] += _grad_p(g, p[rows[l]]).sum(0)

    scores = m_clean.float() * grad_sum / steps                # (n_layers, d_ff)
    return Attribution(prompt, answer, ls, scores.cpu(), m_clean.float().cpu(), p_full,
                       _zero_layer_probs(model, batch, arch, ls), steps, pos)


def _answer_logprobs(logits: torch.Tensor, answer_ids: list[int], first: int) -> torch.Tensor:
    """log p(answer) per row, teacher-forced, from logits (rows, m, vocab) whose position ``first`` predicts the
    first answer token -> (rows,), float32."""
    k = len(answer_ids)
    logp = torch.log_softmax(logits[:, first:first + k].float(), dim=-1)    # (rows, k, vocab)
    ans = torch.tensor(answer_ids, device=logits.device)
    return logp[:, torch.arange(k, device=logits.device), ans].sum(-1)


def _answer_probs(logits: torch.Tensor, answer_ids: list[int], first: int) -> torch.Tensor:
    """p(answer) per row (see :func:`_answer_logprobs`) -> (rows,)."""
    return _answer_logprobs(logits, answer_ids, first).exp()


def _grad_p(grad_logp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """∂p/∂m = p · ∂log p/∂m, in float32: grad_logp (rows, d_ff) in the model's dtype, p (rows,).

    The backward pass runs on log p, whose gradients are of order one, and the factor p is applied in
    float32 afterwards: gradients of p itself are of order p, and a small p (a multi-token answer,
    a random model) makes them underflow to zero in float16 (smallest normal 6e-5).
    """
    return grad_logp.float() * p.float()[:, None]


def _attribute_cached(model, batch: AnswerBatch, arch, prompt: str, answer: str, ls: list[int], steps: int,
                      batch_size: int) -> Attribution:
    """:func:`attribute` with rows starting at their layer, on the positions from the last prompt token on.

    One clean forward pass records every block's input and its attention's keys/values
    (:class:`kvlab.tracing.BlockRunner`). A row attributing layer l with step α starts from block
    l's recorded input at positions [pos, seq) (pos: the last prompt token), has m at pos set to
    α·m̄ inside block l, and runs blocks l..L-1 on those positions only, attending to the clean
    keys/values of the positions before pos: nothing before layer l and no position before pos
    depends on α. Rows of several layers share a pass: each joins at its own block.
    """
    L, pos, ans = arch.n_layers, int(batch.prompt_last[0]), batch.answer_ids[0]
    runner = BlockRunner(model)
    with torch.no_grad(), capture(model, {l: arch.value_module(l) for l in range(L)}, what="input") as store, \
            runner.record():
        logits = model(**batch.inputs(), use_cache=False).logits            # (1, seq, vocab)
    checks.finite_output(model, logits, "attribute", "the clean run's logits")
    m_clean = torch.stack([store[l][0, pos] for l in range(L)])             # (n_layers, d_ff)
    p_full = float(_answer_probs(logits, ans, pos)[0])
    if not runner.split:
        warnings.warn(f"integrated gradients compute every position of every row on this model "
                      f"({type(model).__name__}): {runner.split_off}. Scores are exact, only slower.",
                      RuntimeWarning, stacklevel=3)
    start = pos if runner.split else 0                                       # first position computed

    def put(leaf: torch.Tensor, r0: int):
        def fn(m):  # (rows, seq - start, d_ff): rows r0.. get their scaled copy at the last prompt position
            m = m.clone()
            m[r0:r0 + leaf.shape[0], pos - start] = leaf.to(m.dtype)
            return m
        return fn

    def run(jobs: list[tuple[int, float]]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """p(answer) per job (layer l, α) with m̄ of layer l scaled by α, (jobs,), and per layer the
        gradients ∂p/∂m at the last prompt position of its rows, (rows_l, d_ff). Jobs come sorted by layer."""
        alphas: dict[int, list[float]] = {}
        for l, a in jobs:
            alphas.setdefault(l, []).append(a)
        leaves = {l: (torch.tensor(a, dtype=m_clean.dtype, device=m_clean.device)[:, None] * m_clean[l])
                  .requires_grad_(True) for l, a in alphas.items()}           # layer -> (rows_l, d_ff)
        h = None                                                             # (rows so far, seq - start, d)
        first = {}                                                           # layer -> its first row
        with torch.enable_grad():
            for k in range(min(alphas), L):
                if k in leaves:                                              # rows of layer k join here
                    x = runner.inputs[k][:, start:].expand(len(alphas[k]), -1, -1)
                    r0 = first[k] = 0 if h is None else h.shape[0]
                    h = x.contiguous() if h is None else torch.cat([h, x])
                    with patch(arch.value_module(k), put(leaves[k], r0), what="input"):
                        h = runner.run(k, h, start)
                else:
                    h = runner.run(k, h, start)
            q = pos - start
            logp = _answer_logprobs(arch.unembed(arch.final_norm(h[:, q:q + len(ans)])), ans, 0)   # (rows,)
            grads = torch.autograd.grad(logp.sum(), list(leaves.values()))
        p = logp.detach().exp()
        return p, {l: _grad_p(g, p[first[l]:first[l] + g.shape[0]]) for l, g in zip(leaves, grads)}

    # per layer the S midpoints α_k = (k - ½)/S, then α = 0 (p with the layer's m zeroed: the
    # baseline of completeness), whose gradient is not used
    alphas = ((torch.arange(steps, dtype=torch.float32) + 0.5) / steps).tolist()
    jobs = [(l, a) for l in ls for a in alphas + [0.0]]
    p_all, grad_all = [], {l: [] for l in ls}
    for i in range(0, len(jobs), batch_size):
        p, grads = run(jobs[i:i + batch_size])
        p_all.append(p)
        for l, g in grads.items():
            grad_all[l].append(g)
    grads = torch.stack([torch.cat(grad_all[l])[:steps].float().sum(0) for l in ls])   # (len(ls), d_ff)
    p_baseline = torch.full((L,), float("nan"))
    p_baseline[torch.tensor(ls)] = torch.cat(p_all).view(len(ls), steps + 1)[:, steps].cpu()
    scores = torch.zeros(m_clean.shape, dtype=torch.float32, device=m_clean.device)   # (n_layers, d_ff)
    scores[torch.tensor(ls, device=m_clean.device)] = m_clean[ls].float() * grads / steps
    return Attribution(prompt, answer, ls, scores.cpu(), m_clean.float().cpu(), p_full, p_baseline, steps, pos)


# ---------------------------------------------------------------------------------------------
# Selecting knowledge neurons


def coarse_neurons(attr: Attribution | torch.Tensor, t: float = 0.2) -> list[Neuron]:
    """Neurons whose attribution exceeds ``t`` × the largest attribution (Dai et al.: t = 0.2), best first."""
    if not 0 < t <= 1:
        raise ValueError(f"coarse_neurons: t must be in (0, 1], got {t}")
    scores = attr.scores if isinstance(attr, Attribution) else attr    # (n_layers, d_ff)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"coarse_neurons: the attribution scores have {int((~torch.isfinite(scores)).sum())} "
                         f"NaN/inf entries; nothing can be selected from them")
    mx = float(scores.max())
    if mx <= 0:
        return []
    keep = (scores > t * mx).nonzero().tolist()
    return sorted(((int(l), int(i)) for l, i in keep), key=lambda n: -float(scores[n]))


@dataclass
class KnowledgeNeurons:
    """Result of :func:`find_knowledge_neurons`: the neurons and how they were chosen."""

    neurons: list[Neuron]               # best first (by mean attribution over the prompts)
    p: float                            # final sharing threshold: kept neurons are shared by > p·n prompts
    coarse: list[list[Neuron]]          # per prompt, the coarse set
    attributions: list[Attribution] = field(repr=False)
    counts: Counter = field(repr=False)  # neuron -> number of prompts whose coarse set has it
    n_shared: int = 0                   # neurons shared by > p·n prompts at the final p, before any cut

    @property
    def cut(self) -> bool:
        """True when more neurons were shared than kept: the result is the ``target[1]`` best of them."""
        return self.n_shared > len(self.neurons)


class Refined(NamedTuple):
    """Result of :func:`refine`."""

    neurons: list[Neuron]   # best first
    p: float                # final sharing threshold
    n_shared: int           # neurons shared by > p·n prompts at that p, before any cut

    @property
    def cut(self) -> bool:
        """True when the shared neurons were cut to the best ``target[1]``."""
        return self.n_shared > len(self.neurons)


def refine(coarse_sets: list[list[Neuron]], mean_scores: dict[Neuron, float] | None = None, p: float = 0.7,
           target: tuple[int, int] | None = (2, 5), step: float = 0.05) -> Refined:
    """Keep the neurons shared by **more than** p·n of the n prompts' coarse sets (Dai et al.; the
    EleutherAI package counts ``count > n * p`` too).

    ``target=(lo, hi)``: p starts at ``p`` and moves by ``step`` until lo–hi neurons remain (Dai et
    al.: 0.7, 0.05, 2–5). When no p gives a count in range (counts jump over it), the smallest set
    above the range is cut to its ``hi`` best neurons by ``mean_scores``: the result's ``cut`` is
    True and ``n_shared`` says how many were shared. ``target=None`` holds p fixed and cuts
    nothing (the package's ``get_refined_neurons``, p = 0.5 there). p is in [0, 1): p = 0 keeps
    every neuron of any coarse set. Returns a :class:`Refined` (neurons best first, final p, n_shared).
    """
    if target is not None:
        lo, hi = target
        if not 1 <= lo <= hi:
            raise ValueError(f"refine: target must be (lo, hi) with 1 <= lo <= hi, or None, got {target}")
    if not 0 <= p < 1:
        raise ValueError(f"refine: p must be in [0, 1) (neurons shared by more than p·n prompts), got {p}")
    checks.number("refine", "step", step, 0, strict=True, high=1, high_strict=True,
                  accepted="how far p moves per try; Dai et al.: 0.05")
    n = len(coarse_sets)
    if n == 0:
        raise ValueError("refine: no coarse sets")
    counts = Counter(x for s in coarse_sets for x in set(s))
    score = mean_scores or {x: float(c) for x, c in counts.items()}
    order = lambda xs: sorted(xs, key=lambda x: (-score.get(x, 0.0), x))  # noqa: E731
    shared = lambda q: order([x for x, c in counts.items() if c > q * n + 1e-9])  # noqa: E731
    cur = shared(p)
    if target is None:
        return Refined(cur, p, len(cur))
    direction, above = 0, None
    while not lo <= len(cur) <= hi:
        d = 1 if len(cur) > hi else -1
        if len(cur) > hi:
            above = (cur, p)
        if direction and d != direction:        # crossed the range: no p lands inside it
            break
        direction = d
        q = round(p + d * step, 10)
        if q >= 1 - 1e-9 or q < -1e-9:          # p cannot move further
            break
        p, cur = q, shared(q)
    if len(cur) < lo and above is not None:     # fell below the range: take the smallest set above it
        cur, p = above
    return Refined(cur[:hi], p, len(cur))


def find_knowledge_neurons(model, tok, prompts: str | Sequence[str], answer: str, t: float = 0.2,
                           p: float = 0.7, target: tuple[int, int] | None = (2, 5), steps: int = 20,
                           layers: int | Sequence[int] | None = None, batch_size: int = 128) -> KnowledgeNeurons:
    """Attribute each prompt, keep coarse sets (t·max), refine across prompts (see :func:`refine`).

    Refinement needs several prompts of the fact (Dai et al. use paraphrases): with one prompt
    every coarse neuron is "shared", and a ``UserWarning`` says so.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("find_knowledge_neurons: no prompts given")
    if len(prompts) == 1:
        warnings.warn("find_knowledge_neurons: one prompt given; refinement keeps the neurons shared across "
                      "several prompts of a fact (Dai et al. use paraphrases), so with one prompt the result "
                      "is that prompt's coarse set" + (f" cut to its {target[1]} best" if target else ""),
                      UserWarning, stacklevel=2)
    attrs = [attribute(model, tok, q, answer, layers=layers, steps=steps, batch_size=batch_size) for q in prompts]
    coarse = [coarse_neurons(a, t) for a in attrs]
    mean = torch.stack([a.scores for a in attrs]).mean(0)          # (n_layers, d_ff)
    cand = {x for s in coarse for x in s}
    r = refine(coarse, {x: float(mean[x]) for x in cand}, p=p, target=target)
    return KnowledgeNeurons(r.neurons, r.p, coarse, attrs, Counter(x for s in coarse for x in set(s)), r.n_shared)


def knowledge_neurons(model, tok, prompts: str | Sequence[str], answer: str, t: float = 0.2, p: float = 0.7,
                      target: tuple[int, int] | None = (2, 5), steps: int = 20,
                      layers: int | Sequence[int] | None = None, batch_size: int = 128) -> list[Neuron]:
    """The fact's knowledge neurons ``[(layer, i), ...]``, best first (Dai et al. 2022).

    ``prompts``: the fact's prompts (e.g. the rewrite prompt and its paraphrases) that all
    end right before ``answer``. ``t``: coarse threshold (fraction of the max attribution);
    ``p``: kept neurons are shared by more than p·n of the n prompts, p starting there;
    ``target``: wanted number of neurons (None: p held fixed, nothing cut). Stable API (used by
    :mod:`kvlab.editing.kn`).
    """
    return find_knowledge_neurons(model, tok, prompts, answer, t=t, p=p, target=target, steps=steps,
                                  layers=layers, batch_size=batch_size).neurons


def shared_neurons(neuron_sets: Sequence[Sequence[Neuron]], min_count: int = 2) -> list[tuple[Neuron, int]]:
    """Neurons that occur in at least ``min_count`` of the sets (e.g. the facts of one relation), most shared first."""
    c = Counter(x for s in neuron_sets for x in set(map(tuple, s)))
    return sorted(((x, k) for x, k in c.items() if k >= min_count), key=lambda xk: (-xk[1], xk[0]))


# ---------------------------------------------------------------------------------------------
# Baselines


def check_neurons(arch, neurons) -> list[Neuron]:
    """The neurons as (layer, index) pairs in the given order, validated: layers through the adapter
    (negative ones count from the end), indices integers in [0, d_ff)."""
    out = []
    for x in neurons:
        try:
            l, i = x
        except (TypeError, ValueError):
            raise ValueError(f"a neuron must be a (layer, index) pair, got {x!r}") from None
        l = arch._check_layer(l)
        try:
            index = None if isinstance(i, bool) else operator.index(i)
        except TypeError:
            index = None
        if index is None:
            raise ValueError(f"neuron index must be an integer, got {i!r} (in {x!r})")
        i = index
        if not 0 <= i < arch.d_ff:
            raise ValueError(f"neuron index {i} out of range for layer {l} (d_ff={arch.d_ff})")
        out.append((l, i))
    return out


def check_neuron_set(arch, neurons, where: str, name: str = "neurons") -> list[Neuron]:
    """:func:`check_neurons`, and ValueError when there are none or one is given twice (an intervention on
    no neuron, or on one neuron "twice", changes nothing the caller meant)."""
    if isinstance(neurons, (str, bytes)):
        raise ValueError(f"{where}: {name} must be a list of (layer, index) pairs, got {neurons!r}")
    out = check_neurons(arch, neurons)
    if not out:
        raise ValueError(f"{where}: {name} is empty; give one or more (layer, index) pairs")
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise ValueError(f"{where}: neuron(s) {dup} given more than once in {name}; give each once")
    return out


def _check_neurons(arch, neurons, where: str = "neurons", name: str = "neurons") -> dict[int, list[int]]:
    """Group neurons by layer, validating them (:func:`check_neuron_set`: none, or a repeated one,
    raise): {layer: [i, ...]}."""
    by_layer: dict[int, list[int]] = {}
    for l, i in check_neuron_set(arch, neurons, where, name):
        by_layer.setdefault(l, []).append(i)
    return by_layer


def random_neurons(model, like: Sequence[Neuron], seed: int = 0) -> list[Neuron]:
    """As many random neurons per layer as ``like`` has, none of them in ``like`` (a baseline)."""
    arch = adapter(model)
    by_layer = _check_neurons(arch, like, "random_neurons", "like")
    rng = random.Random(seed)
    out = []
    for l, idx in sorted(by_layer.items()):
        pool = sorted(set(range(arch.d_ff)) - set(idx))
        out += [(l, i) for i in rng.sample(pool, min(len(idx), len(pool)))]
    return out


def activation_neurons(model, tok, prompt: str, like: Sequence[Neuron]) -> list[Neuron]:
    """Per layer of ``like``, as many neurons with the largest |m| at the last prompt position (a baseline).

    Selection by activation alone, the attribution-free alternative: IG weights
    m_i by its effect on the answer, this baseline only by its size.
    """
    arch = adapter(model)
    by_layer = _check_neurons(arch, like, "activation_neurons", "like")
    batch = encode(model, tok, prompt)
    mods = {l: arch.value_module(l) for l in by_layer}
    with torch.no_grad(), eval_mode(model), capture(model, mods, what="input") as store:
        model(**batch.inputs())
    out = []
    for l, idx in sorted(by_layer.items()):
        m = store[l][0, int(batch.last[0])].abs()              # (d_ff,)
        checks.finite_output(model, m, "activation_neurons", f"the activations m of layer {l}")
        out += [(l, int(i)) for i in m.topk(len(idx)).indices]
    return out


# ---------------------------------------------------------------------------------------------
# Interventions


def _last_positions(mask: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
    """(batch,) the last position each row's attention mask covers; the final position when the pass had
    no mask of m's (batch, seq) shape (no mask, or a cached generation step)."""
    rows, n = m.shape[:2]
    if mask is None or tuple(mask.shape) != (rows, n):
        return torch.full((rows,), n - 1, device=m.device)
    return n - 1 - mask.to(m.device).flip(-1).ne(0).to(torch.long).argmax(-1)


@contextmanager
def scale_neurons(model, neurons: Sequence[Neuron], factor: float,
                  positions: str | int | torch.Tensor | None = "last") -> Iterator[None]:
    """Multiply the activations m_i of the given neurons by ``factor`` during the block.

    ``positions``: ``"last"`` (default) scales them at the last position of each row, the last
    token its attention mask covers (Dai et al. intervene at the [MASK] position; for one prompt
    and a one-token answer this is the position :func:`intervention_effect` uses; under teacher
    forcing of a longer answer pass ``AnswerBatch.prompt_last``); ``"all"`` (or ``None``) at every
    position; an int at that position of every row; a (batch,) tensor at one position per row.
    Works by patching the value modules' input, so no weight changes. ``neurons``: one or more distinct
    (layer, index) pairs; ``factor``: a finite number.
    """
    if isinstance(positions, str) and positions not in ("last", "all"):
        raise ValueError(f"scale_neurons: positions must be 'last', 'all', an int or a (batch,) tensor, "
                         f"got {positions!r}")
    checks.number("scale_neurons", "factor", factor, accepted="the multiplier of the activations; 0 suppresses")
    arch = adapter(model)
    by_layer = _check_neurons(arch, neurons, "scale_neurons")
    seen: dict[str, torch.Tensor | None] = {}

    def grab_mask(module, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask")

    def scaler(idx: list[int]):
        def fn(m):  # (batch, seq, d_ff)
            m = m.clone()
            cols = torch.tensor(idx, device=m.device)
            if positions is None or positions == "all":
                m[..., cols] = m[..., cols] * factor
            elif isinstance(positions, int):
                m[:, positions, cols] = m[:, positions, cols] * factor
            else:
                pos = _last_positions(seen.get("mask"), m) if positions == "last" else positions.to(m.device)
                if pos.shape != (m.shape[0],):
                    raise ValueError(f"scale_neurons: positions has shape {tuple(pos.shape)}, "
                                     f"expected ({m.shape[0]},) for this batch")
                rows = torch.arange(m.shape[0], device=m.device)
                sub = m[rows[:, None], pos[:, None], cols[None, :]]          # (batch, n_cols)
                m[rows[:, None], pos[:, None], cols[None, :]] = sub * factor
            return m
        return fn

    handles = []
    with hooks(handles):
        if positions == "last":
            handles.append(model.register_forward_pre_hook(grab_mask, with_kwargs=True))
        with patch({arch.value_module(l): scaler(idx) for l, idx in by_layer.items()}, what="input"):
            yield


def suppress(model, neurons: Sequence[Neuron], positions: str | int | torch.Tensor | None = "last"):
    """Context manager: set the neurons' activations to 0 (Dai et al.'s suppression), by default at the
    last position of each row, as :func:`intervention_effect` (see :func:`scale_neurons`)."""
    return scale_neurons(model, neurons, 0.0, positions)


def amplify(model, neurons: Sequence[Neuron], factor: float = 2.0,
            positions: str | int | torch.Tensor | None = "last"):
    """Context manager: multiply the neurons' activations by ``factor`` (Dai et al.: double them), by
    default at the last position of each row, as :func:`intervention_effect` (see :func:`scale_neurons`)."""
    return scale_neurons(model, neurons, factor, positions)


def intervention_effect(model, tok, neurons: Sequence[Neuron], prompts: str | Sequence[str],
                        answers: str | Sequence[str], factor: float, at: str = "last") -> torch.Tensor:
    """Relative change (p_after − p_before) / p_before of p(answer) per prompt when scaling the neurons.

    ``at="last"``: scale only at the last prompt position (where attribution was done, as
    Dai et al. intervene at the [MASK] position); ``"all"``: at every position.
    """
    if at not in ("last", "all"):
        raise ValueError(f"intervention_effect: at must be 'last' or 'all', got {at!r}")
    checks.number("intervention_effect", "factor", factor, accepted="the multiplier of the activations; 0 suppresses")
    check_neuron_set(adapter(model), neurons, "intervention_effect")
    prompts, answers, _ = _as_lists(prompts, answers)
    batch = answer_batch(model, tok, prompts, answers)
    with torch.no_grad(), eval_mode(model):
        logits = checks.finite_output(model, model(**batch.inputs()).logits, "intervention_effect", "the logits")
        before = answer_logprob(logits, batch).exp()
        with scale_neurons(model, neurons, factor, batch.prompt_last if at == "last" else "all"):
            logits = checks.finite_output(model, model(**batch.inputs()).logits, "intervention_effect",
                                          "the logits with the neurons scaled")
            after = answer_logprob(logits, batch).exp()
    if not bool((before > 0).all()):
        b = int((before <= 0).nonzero()[0, 0])
        raise ValueError(f"intervention_effect: p(answer {answers[b]!r} | prompt {prompts[b]!r}) is 0 in "
                         f"{str(before.dtype).removeprefix('torch.')} before the intervention, so its relative "
                         f"change is undefined; drop that prompt or use a shorter answer")
    return ((after - before) / before).cpu()
