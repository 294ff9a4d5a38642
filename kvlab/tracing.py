"""Causal tracing (Meng et al. 2022, ROME): which hidden states carry a fact?

Three runs of the same prompt, e.g. "Anna Berg lives in" -> "Paris":

1. **clean**: the ordinary forward pass; ``high_score`` = p(answer).
2. **corrupted**: Gaussian noise ε ~ N(0, ν²) is added to the token embeddings of the
   *subject* tokens only, ``samples`` times; ``low_score`` = p(answer) averaged over the
   noised samples. ν = 3σ, σ the standard deviation of subject token embeddings
   (:func:`noise_level`), or a fixed value (ROME: 0.1 for GPT-2 XL).
3. **corrupted-with-restoration**: as 2, but one state at (token t, layer l) is set back to
   its clean value. ``scores[t, l]`` = p(answer) averaged over the samples.

Kinds of state: ``"hidden"`` = the block output (the residual stream) at layer l;
``"mlp"`` / ``"attn"`` = the MLP / attention output, restored in a *window* of
``window`` layers around l (ROME: 10 layers, [l-5, l+4], clipped to the model).

Indirect effect IE = scores − low_score; total effect TE = high_score − low_score.
The answer is a single token: given a string, its **first token** is scored (as ROME,
which scores the model's own top prediction, the default here).

Speed. The obvious method runs one forward pass per (token, layer) cell. Here:

* one clean pass caches every block output, MLP output and attention output;
* one corrupted pass caches every block's input (and the arguments transformers passes
  to the block: attention mask, position ids, rotary embeddings);
* all cells form one batch (cells × samples rows) that grows layer by layer: a cell's rows
  join at the block where its first restoration happens, starting from the cached
  corrupted input, so the layers below are computed once for all cells instead of once
  per cell, and every block runs once per grid instead of once per cell;
* only the last position is sent through the final norm and the unembedding.

The result equals the one-cell-at-a-time method up to float rounding (tests check
≤ 1e-5 on every family with the same noise).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from .arch import adapter
from .hooks import capture, first, hooks, patch
from .text import encode, subject_token_range, token_ids

Tensor = torch.Tensor
KINDS = ("hidden", "mlp", "attn")
ROWS = ("first subject token", "middle subject tokens", "last subject token",
        "first subsequent token", "further tokens", "last token")


# ----------------------------------------------------------------------------- results
@dataclass
class TraceResult:
    """Causal trace of one prompt for one kind of state."""

    scores: Tensor               # (n_tokens, n_layers) p(answer) with (token, layer) restored
    low_score: float             # p(answer), corrupted, nothing restored
    high_score: float            # p(answer), clean
    subject_range: tuple[int, int]  # [start, end) token positions of the subject
    tokens: list[str]            # the prompt's tokens, decoded
    answer: str                  # the scored token, decoded
    answer_id: int
    kind: str                    # "hidden", "mlp" or "attn"
    noise: float                 # ν, the noise standard deviation
    samples: int
    window: int                  # layers restored together (1 for "hidden")

    @property
    def effects(self) -> Tensor:
        """Indirect effects scores − low_score, (n_tokens, n_layers)."""
        return self.scores - self.low_score

    @property
    def total_effect(self) -> float:
        return self.high_score - self.low_score

    def peak(self) -> tuple[float, int, int]:
        """(largest indirect effect, token, layer)."""
        e = self.effects
        i = int(e.argmax())
        return float(e.flatten()[i]), i // e.shape[1], i % e.shape[1]

    def labels(self, mark: str = "*") -> list[str]:
        """Token labels with the subject tokens marked, for heatmap rows."""
        b, e = self.subject_range
        return [f"{t}{mark}" if b <= i < e else t for i, t in enumerate(self.tokens)]


@dataclass
class AverageTrace:
    """Indirect effects averaged over a fact set, grouped into the paper's six token rows."""

    rows: tuple[str, ...]             # ROWS
    effects: dict[str, Tensor]        # kind -> (6, n_layers) average indirect effect (nan: row never present)
    scores: dict[str, Tensor]         # kind -> (6, n_layers) average restored p(answer)
    counts: Tensor                    # (6,) number of facts that have each row
    high_score: float                 # mean clean p(answer)
    low_score: float                  # mean corrupted p(answer)
    n_facts: int                      # facts traced
    n_skipped: int                    # facts skipped (model's prediction ≠ the known answer)
    noise: float
    samples: int
    window: int
    per_fact: list[dict] = field(default_factory=list, repr=False)  # kind -> TraceResult, per fact

    @property
    def total_effect(self) -> float:
        """ATE = mean clean − mean corrupted p(answer)."""
        return self.high_score - self.low_score

    def peak(self, kind: str, row: str | int | None = None) -> tuple[float, str, int]:
        """(largest AIE, row name, layer) for a kind, optionally within one row."""
        e = self.effects[kind].clone()
        if row is not None:
            r = ROWS.index(row) if isinstance(row, str) else row
            keep = torch.zeros_like(e, dtype=torch.bool)
            keep[r] = True
            e[~keep] = float("nan")
        e = torch.nan_to_num(e, nan=-float("inf"))
        i = int(e.argmax())
        return float(e.flatten()[i]), self.rows[i // e.shape[1]], i % e.shape[1]


# ----------------------------------------------------------------------------- helpers
def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for a window centred on ``layer``: [l − w//2, l + ⌈w/2⌉), clipped.

    ROME's window 10 gives [l−5, l+4]; window 1 gives just [l].
    """
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def sample_noise(samples: int, n_tokens: int, d_model: int, seed: int = 0) -> Tensor:
    """Standard-normal draws ε, (samples, n_tokens, d_model); the corruption adds ν·ε."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, d_model, generator=g)


def _subject_and_prompt(fact) -> tuple[str, str | None]:
    if isinstance(fact, str):
        return fact, None
    if isinstance(fact, dict):
        return fact["subject"], fact.get("prompt")
    if hasattr(fact, "subject"):                 # kvlab.data.KnownFact
        return fact.subject, getattr(fact, "prompt", None)
    return fact[1], fact[0]  # (prompt, subject, ...)


@torch.no_grad()
def noise_level(model, tok, subjects: Iterable, factor: float = 3.0) -> float:
    """ν = factor · σ, σ = std of all entries of the subjects' token embeddings (ROME's "3σ").

    ``subjects``: strings (tokenised alone, as ROME does) or fact records with ``subject``.
    """
    arch = adapter(model)
    ids = []
    for fact in subjects:
        subject, _ = _subject_and_prompt(fact)
        ids += tok(subject, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("noise_level: no subject tokens (empty subject list?)")
    W = arch.embed.weight
    emb = arch.embed(torch.tensor(ids, device=W.device))   # (n_subject_tokens, d_model)
    return factor * float(emb.float().std())


def _expand(x, batch: int):
    """Broadcast batch-1 tensors (and tuples of them) in block arguments to ``batch`` rows."""
    if torch.is_tensor(x):
        return x.expand(batch, *x.shape[1:]) if x.dim() >= 2 and x.shape[0] == 1 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_expand(v, batch) for v in x)
    return x


@contextmanager
def _record_block_inputs(blocks) -> Iterator[list]:
    """Record (hidden, args, kwargs) entering each block: hidden (batch, seq, d_model)."""
    calls: list = [None] * len(blocks)
    handles = []
    for l, block in enumerate(blocks):
        def pre(module, args, kwargs, l=l):
            calls[l] = (args[0] if args else kwargs["hidden_states"], args, kwargs)
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    with hooks(handles):
        yield calls


def _restore_fn(clean: Tensor, positions: Tensor):
    """Patch function: row r gets the clean state at token positions[r]. clean: (seq, d)."""
    def fn(x: Tensor) -> Tensor:   # (rows, seq, d)
        x = x.clone()
        rows = torch.arange(x.shape[0], device=x.device)
        x[rows, positions] = clean[positions].to(x.dtype)
        return x
    return fn


# ----------------------------------------------------------------------------- tracer
class Tracer:
    """Clean and corrupted runs of one prompt, cached; restored runs computed in batches.

    ``eps`` (samples, n_subject_tokens, d_model) are the standard-normal draws; pass the
    same ``eps`` to another implementation to get the same corruption.
    """

    @torch.no_grad()
    def __init__(self, model, tok, prompt: str, subject: str, answer: str | None = None,
                 noise: float | None = None, samples: int = 10, seed: int = 0, eps: Tensor | None = None,
                 occurrence: int = 0, max_batch: int = 4096):
        if samples < 1:
            raise ValueError(f"samples must be ≥ 1, got {samples}")
        self.model, self.tok, self.arch = model, tok, adapter(model)
        self.prompt, self.subject = prompt, subject
        self.max_batch = max_batch
        batch = encode(model, tok, prompt)
        self.ids = batch.input_ids                          # (1, n)
        self.n = self.ids.shape[1]
        self.subject_range = subject_token_range(tok, prompt, subject, occurrence)
        b, e = self.subject_range
        if e > self.n:
            raise ValueError(f"subject range {self.subject_range} beyond the {self.n} prompt tokens")
        self.tokens = [tok.decode([i]) for i in self.ids[0].tolist()]
        self.noise = noise_level(model, tok, [subject]) if noise is None else float(noise)
        d = self.arch.d_model
        self.eps = sample_noise(samples, e - b, d, seed) if eps is None else eps
        if tuple(self.eps.shape) != (samples, e - b, d):
            raise ValueError(f"eps has shape {tuple(self.eps.shape)}, expected {(samples, e - b, d)}")
        self.samples = samples
        L = self.arch.n_layers
        blocks = [self.arch.layer(l) for l in range(L)]

        # 1. clean run: cache block / mlp / attn outputs at every layer.
        mods = {("hidden", l): blocks[l] for l in range(L)}
        mods.update({("mlp", l): self.arch.mlp(l) for l in range(L)})
        mods.update({("attn", l): self.arch.attn(l) for l in range(L)})
        with capture(model, mods) as store, _record_block_inputs(blocks) as calls:
            logits = model(**batch.inputs(), use_cache=False).logits[0, -1]   # (vocab,)
        self.clean = {k: v[0] for k, v in store.items()}   # (kind, l) -> (n, d)
        self.block_args = [(args, kwargs) for _, args, kwargs in calls]     # batch-1 arguments
        if answer is None:
            self.answer_id = int(logits.argmax())
        else:
            self.answer_id = token_ids(tok, answer)[0]
        self.answer = tok.decode([self.answer_id])
        self.high_score = float(logits.float().softmax(-1)[self.answer_id])

        # 2. corrupted run: cache every block's input and the last block's output.
        ids = self.ids.expand(samples, -1)
        mask = batch.attention_mask.expand(samples, -1)
        with patch(self.arch.embed, self.corrupt), _record_block_inputs(blocks) as calls, \
                capture(model, {"out": blocks[-1]}) as last:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        self.corrupted = [c[0] for c in calls] + [last["out"]]   # L+1 x (samples, n, d)
        self.low_score = float(logits.float().softmax(-1)[:, self.answer_id].mean())

    def corrupt(self, emb: Tensor) -> Tensor:
        """Add ν·ε to the subject token embeddings. emb: (samples, n, d)."""
        b, e = self.subject_range
        emb = emb.clone()
        emb[:, b:e] += self.noise * self.eps.to(emb.device, emb.dtype)
        return emb

    def run_block(self, l: int, h: Tensor) -> Tensor:
        """Block l on hidden states h (rows, n, d), with the block arguments of the clean run."""
        args, kwargs = _expand(self.block_args[l], h.shape[0])
        if args:
            return first(self.arch.layer(l)(h, *args[1:], **kwargs))
        return first(self.arch.layer(l)(**{**kwargs, "hidden_states": h}))

    @torch.no_grad()
    def restored(self, kind: str, cells: Sequence[tuple[int, int]], window: int = 10) -> Tensor:
        """p(answer) with cell (token t, layer l) restored, averaged over the samples, per cell -> (cells,).

        Each cell's rows (one per noise sample) join the batch at the first block its restoration
        changes (``hidden``: l+1, from block l's corrupted output; ``mlp``/``attn``: the window's
        first layer, from that block's corrupted input), so everything below is shared.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        L, S, dev = self.arch.n_layers, self.samples, self.ids.device
        spans = [range(l + 1, l + 1) if kind == "hidden" else window_layers(l, window, L) for _, l in cells]
        join = [l + 1 if kind == "hidden" else sp.start for (_, l), sp in zip(cells, spans)]
        order = sorted(range(len(cells)), key=lambda c: join[c])
        tok = torch.tensor([cells[c][0] for c in order], device=dev).repeat_interleave(S)   # (rows,)
        lo = torch.tensor([spans[c].start for c in order], device=dev).repeat_interleave(S)
        hi = torch.tensor([spans[c].stop for c in order], device=dev).repeat_interleave(S)
        joined = torch.tensor([join[c] for c in order], device=dev).repeat_interleave(S)
        mod = self.arch.mlp if kind == "mlp" else self.arch.attn

        def entering(k: int) -> Tensor:
            """Rows of the cells that join at block k: corrupted input of block k, restored if hidden."""
            rows = (joined == k).nonzero().squeeze(1)
            h = self.corrupted[k].repeat(len(rows) // S, 1, 1)                  # (new rows, n, d)
            if kind == "hidden" and len(rows):
                h = _restore_fn(self.clean[("hidden", k - 1)], tok[rows])(h)
            return h

        h = entering(0)                                                         # (rows so far, n, d)
        for k in range(L):
            h = torch.cat([h, entering(k)]) if k else h
            if not len(h):          # no cell has joined yet
                continue
            if kind == "hidden":
                h = self.run_block(k, h)
                continue
            r = ((lo[:len(h)] <= k) & (k < hi[:len(h)])).nonzero().squeeze(1)  # rows restoring at layer k
            clean = self.clean[(kind, k)]

            def fn(x: Tensor) -> Tensor:
                x = x.clone()
                x[r, tok[r]] = clean[tok[r]].to(x.dtype)
                return x
            with patch(mod(k), fn):
                h = self.run_block(k, h)
        h = torch.cat([h, entering(L)])                                         # hidden restored at the top
        logits = self.arch.unembed(self.arch.final_norm(h[:, -1]))             # (rows, vocab)
        p = logits.float().softmax(-1)[:, self.answer_id].view(len(cells), S).mean(1)
        out = torch.empty_like(p)
        out[torch.tensor(order, device=p.device)] = p
        return out

    def trace(self, kind: str = "hidden", window: int = 10) -> TraceResult:
        """The full (n_tokens, n_layers) grid for one kind, in batches of at most ``max_batch`` rows."""
        L, n = self.arch.n_layers, self.n
        cells = [(t, l) for l in range(L) for t in range(n)]
        per = max(1, self.max_batch // self.samples)     # cells per batch
        scores = torch.cat([self.restored(kind, cells[i:i + per], window).cpu() for i in range(0, len(cells), per)])
        return TraceResult(scores.view(L, n).T.contiguous(), self.low_score, self.high_score, self.subject_range,
                           self.tokens, self.answer, self.answer_id, kind, self.noise, self.samples,
                           1 if kind == "hidden" else window)


def trace(model, tok, prompt: str, subject: str, answer: str | None = None, kind: str = "hidden",
          noise: float | None = None, samples: int = 10, window: int = 10, seed: int = 0,
          eps: Tensor | None = None, occurrence: int = 0) -> TraceResult:
    """Causal trace of one prompt: scores[token, layer] for restoring one kind of state.

    ``answer``: None scores the model's top prediction (ROME's default); a string scores its
    first token. ``noise``: ν (None = 3σ of this subject's token embeddings; pass
    :func:`noise_level` over a fact set, or ROME's fixed 0.1 for GPT-2 XL). ``window``: layers
    restored together for "mlp"/"attn" (ignored for "hidden"). ``eps``: the standard-normal
    draws (samples, n_subject_tokens, d_model); default from ``seed``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tr = Tracer(model, tok, prompt, subject, answer, noise, samples, seed, eps, occurrence)
    return tr.trace(kind, window)


def trace_all_kinds(model, tok, prompt: str, subject: str, answer: str | None = None,
                    kinds: Sequence[str] = KINDS, noise: float | None = None, samples: int = 10,
                    window: int = 10, seed: int = 0, eps: Tensor | None = None,
                    occurrence: int = 0) -> dict[str, TraceResult]:
    """:func:`trace` for several kinds, sharing the clean and corrupted runs (and the noise)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kind(s) {bad}; choose from {KINDS}")
    tr = Tracer(model, tok, prompt, subject, answer, noise, samples, seed, eps, occurrence)
    return {k: tr.trace(k, window) for k in kinds}


# ----------------------------------------------------------------------------- averages
def token_rows(subject_range: tuple[int, int], n_tokens: int) -> list[list[int]]:
    """Token positions in each of the paper's six rows (:data:`ROWS`); a row may be empty.

    A one-token subject is both the first and the last subject token. The last prompt
    token is always the "last token" row (and never "first subsequent"/"further").
    """
    b, e = subject_range
    last = n_tokens - 1
    return [[b], list(range(b + 1, e - 1)), [e - 1],
            [e] if e < last else [], list(range(e + 1, last)), [last]]


def _records(facts, n: int | None):
    if facts is None:
        from .data import load_known
        facts = load_known()
    facts = list(facts)
    if n is not None:
        facts = facts[:n]
    if not facts:
        raise ValueError("average_effects: empty fact set")
    out = []
    for f in facts:
        if isinstance(f, dict):
            if "prompt" not in f or "subject" not in f:
                raise ValueError(f"fact record needs 'prompt' and 'subject' keys, got {sorted(f)}")
            out.append((f["prompt"], f["subject"], f.get("attribute")))
        elif hasattr(f, "prompt") and hasattr(f, "subject"):    # kvlab.data.KnownFact
            out.append((f.prompt, f.subject, getattr(f, "attribute", None)))
        else:
            prompt, subject, *rest = f
            out.append((prompt, subject, rest[0] if rest else None))
    return out


def average_effects(model, tok, facts=None, kinds: Sequence[str] = KINDS, n: int | None = None,
                    noise: float | None = None, samples: int = 10, window: int = 10, seed: int = 0,
                    only_known: bool = True, progress: bool = True, keep: bool = False) -> AverageTrace:
    """Average indirect effects over a fact set, per token row (:data:`ROWS`) and layer.

    ``facts``: known facts (:class:`kvlab.data.KnownFact`, or dicts with ``prompt``, ``subject``,
    ``attribute``) or
    (prompt, subject, attribute) tuples; default ``kvlab.data.load_known()``. ``n``: use the
    first n. ``noise``: ν; None = 3σ over the facts' subjects (:func:`noise_level`).
    Each fact scores the model's top prediction; with ``only_known`` facts whose prediction
    is not the first token of ``attribute`` are skipped (as ROME does).
    """
    recs = _records(facts, n)
    if noise is None:
        noise = noise_level(model, tok, [s for _, s, _ in recs])
    L = adapter(model).n_layers
    sums = {k: torch.zeros(len(ROWS), L) for k in kinds}
    ssum = {k: torch.zeros(len(ROWS), L) for k in kinds}
    counts = torch.zeros(len(ROWS))
    high, low, skipped, kept = [], [], 0, []
    it = recs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(recs, desc="causal tracing", leave=False)
    for prompt, subject, attribute in it:
        tr = Tracer(model, tok, prompt, subject, None, noise, samples, seed)
        if only_known and attribute is not None and tr.answer_id != token_ids(tok, attribute)[0]:
            skipped += 1
            continue
        res = {k: tr.trace(k, window) for k in kinds}
        high.append(tr.high_score)
        low.append(tr.low_score)
        rows = token_rows(tr.subject_range, tr.n)
        for r, toks in enumerate(rows):
            if not toks:
                continue
            counts[r] += 1
            for k in kinds:
                s = res[k].scores[toks].mean(0)            # (n_layers,)
                ssum[k][r] += s
                sums[k][r] += s - tr.low_score
        if keep:
            kept.append(res)
    if not high:
        raise ValueError(f"average_effects: the model predicted none of the {len(recs)} facts' answers; "
                         "nothing to average (pass only_known=False to trace them anyway)")
    c = counts[:, None].clamp(min=1)
    nan_rows = counts == 0
    effects, scores = {}, {}
    for k in kinds:
        effects[k] = sums[k] / c
        scores[k] = ssum[k] / c
        effects[k][nan_rows] = float("nan")
        scores[k][nan_rows] = float("nan")
    return AverageTrace(ROWS, effects, scores, counts, sum(high) / len(high), sum(low) / len(low), len(high),
                        skipped, noise, samples, window, kept)


def noise_sweep(model, tok, prompt: str, subject: str, multiples: Sequence[float] = (0.5, 1, 2, 3, 5),
                sigma: float | None = None, **kw) -> dict[float, TraceResult]:
    """Hidden-state traces of one prompt at several noise levels ν = m·σ (σ default: this subject's)."""
    sigma = noise_level(model, tok, [subject], factor=1.0) if sigma is None else sigma
    return {m: trace(model, tok, prompt, subject, noise=m * sigma, **kw) for m in multiples}
