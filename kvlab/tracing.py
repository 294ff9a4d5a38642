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

Speed. The obvious method runs one forward pass per (token, layer) cell: n_tokens × n_layers
passes of every position through every block. Here:

* one forward pass of 1 + samples rows (row 0 clean, the others corrupted) caches every clean
  block / MLP / attention output, every block's corrupted input, the keys and values every
  corrupted attention computes (after rotary embeddings; through a stand-in for the transformers
  cache), and the arguments transformers passes to the blocks (mask, position ids, rotary tables);
* a cell's rows (one per noise sample) join at the block where its first restoration acts, from
  that block's cached corrupted input, so the blocks below are never recomputed;
* noise only touches the subject, and a restoration at token t changes no position before t
  (attention is causal). So cells before the subject score ``low_score`` without any computation,
  and a cell at token t computes positions [t, n) only: their attention reads the positions
  before t from the cached corrupted keys/values (mask rows, position ids and rotary tables cut
  to match). A cell costs about (n − t) positions × (blocks from its first restoration on)
  instead of n × n_layers;
* rows are keyed by their state, (token, layers restored so far): cells that share a history
  share rows. The "mlp"/"attn" windows of one token hold the same state until the shorter one
  ends, and clipped windows (every window reaching past both ends of a small model) are one;
* a module output ("mlp"/"attn") restored at token t in block l changes only position t there (the
  other positions' attention reads keys/values of the block's input): in its first block a cell's
  rows compute that one position, the rows of all tokens in one call (each row its own position,
  mask row and rotary angle; :meth:`BlockRunner.run_at`), the others taken from the corrupted run;
* only the last position is read from the last block: the other positions only pass their keys
  and values to it, so a first pass over them stops inside the attention (no MLP), then the last
  position runs alone;
* each block runs once per group of tokens per batch, on all the group's rows. One group per
  token computes the fewest positions; merging neighbouring tokens (the later ones then also
  recompute a few corrupted positions) saves block calls, which have a fixed cost (Python,
  dispatch, reading the weights). ``Tracer._groups`` weighs the two: small models get few groups,
  big ones one per token;
* only the last position is sent through the final norm and the unembedding.

Families whose blocks take no cache argument, or that pass blocks per-position arguments not
understood here, or run another attention than eager/sdpa, compute all positions
(``Tracer.split`` is False) and keep the other savings. The result equals the
one-cell-at-a-time method up to float rounding (tests check ≤ 1e-5 on every family with the
same noise, through each path). ``benchmarks/bench_tracing.py`` measures the speed-up.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from . import checks
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
@contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model`` in eval mode (dropout off) inside the block; every submodule's own mode is given back
    afterwards, also on error (a model handed over in training mode comes back in training mode).

    The methods that read a model (tracing, attribution, memory coefficients) run in it: dropout in a
    model left in training mode would make their results random, and a trace's cached clean and corrupted
    runs disagree with the runs that restore them."""
    modes = [(m, m.training) for m in model.modules()]
    if any(t for _, t in modes):
        model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


NOISE_ACCEPTED = "ν, the standard deviation of the noise added to the subject's embeddings"


def check_noise(where: str, noise, name: str = "noise", none_ok: bool = True) -> float | None:
    """``noise`` as a float if it is a finite number > 0 (None when ``none_ok``), else ValueError naming it."""
    if noise is None and none_ok:
        return None
    return checks.number(where, name, noise, 0, strict=True,
                         accepted=NOISE_ACCEPTED + ("; None = 3σ of the subject's embeddings" if none_ok else ""))


def check_kinds(where: str, kinds) -> tuple[str, ...]:
    """``kinds`` as a tuple of distinct kinds of :data:`KINDS` (one kind may be given as a string), else
    ValueError naming the problem."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds:
        raise ValueError(f"{where}: kinds is empty; give one or more of {KINDS}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"{where}: unknown kind(s) {bad}; choose from {KINDS}")
    dup = sorted({k for k in kinds if kinds.count(k) > 1})
    if dup:
        raise ValueError(f"{where}: kind(s) {dup} given more than once in kinds={kinds!r}; give each once")
    return kinds


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for a window centred on ``layer``: [l − w//2, l + ⌈w/2⌉), clipped.

    ROME's window 10 gives [l−5, l+4]; window 1 gives just [l].
    """
    window = checks.integer("window_layers", "window", window)
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
    ``factor``: a finite number > 0.
    """
    factor = checks.number("noise_level", "factor", factor, 0, strict=True, accepted="ν = factor · σ; ROME: 3")
    arch = adapter(model)
    ids = []
    for fact in subjects:
        subject, _ = _subject_and_prompt(fact)
        ids += tok(subject, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("noise_level: no subject tokens (empty subject list?)")
    W = arch.embed.weight
    emb = arch.embed(torch.tensor(ids, device=W.device))   # (n_subject_tokens, d_model)
    checks.finite_output(model, emb, "noise_level", "the subjects' token embeddings")
    return factor * float(emb.float().std())


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def _expand(x, batch: int):
    """Broadcast batch-1 tensors (also inside tuples, lists, dicts) in block arguments to ``batch`` rows."""
    if torch.is_tensor(x):
        return x.expand(batch, *x.shape[1:]) if x.dim() >= 2 and x.shape[0] == 1 else x
    if isinstance(x, dict):
        return {k: _expand(v, batch) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_expand(v, batch) for v in x)
    return x


def _first_row(x, batch: int):
    """Cut tensors (also inside tuples and lists) of ``batch`` rows in block arguments to their first row."""
    if torch.is_tensor(x):
        return x[:1] if x.dim() >= 2 and x.shape[0] == batch else x
    if isinstance(x, (tuple, list)):
        return type(x)(_first_row(v, batch) for v in x)
    return x


# Block arguments that index positions, sliced when a block runs on the last positions only.
# (The cache argument, what a block's attention calls ``update`` on, is found per block by
# :func:`cache_params` and confirmed by the recording pass: transformers renames it between versions.)
POSITION_ARGS = ("attention_mask", "position_ids", "cache_position", "position_embeddings")
# What one block call costs beyond its arithmetic, in tokens through the block (see Tracer._groups):
# a fixed time for Python, dispatch and kernel launches, worth CALL_FLOPS of arithmetic (~0.4 ms at
# ~50 GFLOP/s on a CPU core; more on a GPU), plus reading the weights, which bounds the time of
# matrix products of fewer than about CALL_ROWS rows.
CALL_FLOPS = {"cpu": 2e7, "cuda": 1e10}
CALL_ROWS = 32


def cache_params(sig: inspect.Signature) -> tuple[str, ...]:
    """Parameters of a block's ``forward`` that may take a key/value cache: annotated with a transformers
    ``Cache`` class, or named like one (``cache``, ``past_key_values``, ``layer_past``…; not ``use_cache``
    or ``cache_position``). Which of them the attention really uses is seen when it calls ``update``."""
    out = []
    for name, p in sig.parameters.items():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        annotated = "Cache" in (p.annotation if isinstance(p.annotation, str) else repr(p.annotation))
        named = "past" in name or (name.endswith("cache") and name != "use_cache")
        if annotated or named:
            out.append(name)
    return tuple(out)


def _bind(sig: inspect.Signature, args, kwargs) -> dict:
    """A call's arguments as one keyword dict, positional ones named after the signature ``sig``."""
    out = {}
    for name, value in sig.bind(*args, **kwargs).arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("a block got unnamed extra arguments; cannot record them")
        else:
            out[name] = value
    return out


@contextmanager
def _record_block_inputs(blocks, sigs, caches: Sequence | None = None) -> Iterator[list[dict]]:
    """Record the arguments entering each block as a keyword dict (the hidden states included).

    ``sigs``: the blocks' forward signatures. ``caches``: one (argument names, cache object) per
    block, passed to the block as its cache under each of those names.
    """
    calls: list = [None] * len(blocks)
    handles = []
    for l, block in enumerate(blocks):
        def pre(module, args, kwargs, l=l):
            calls[l] = kw = _bind(sigs[l], args, kwargs)
            if caches is not None:
                names, cache = caches[l]
                return (), {**kw, **dict.fromkeys(names, cache)}
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    with hooks(handles):
        yield calls


class _Recorder:
    """Stands in for a transformers cache in one block: keeps the keys and values its attention computes."""

    keys = values = None

    def update(self, keys: Tensor, values: Tensor, *args, **kwargs):
        self.keys, self.values = keys, values       # (samples, kv_heads, n, d_head), rotary applied
        return keys, values


class _Prefix:
    """Stands in for a transformers cache in one block, for rows that hold only the positions from
    ``start`` on: their attention also sees the keys and values of the positions before, given here.

    keys, values: (samples, kv_heads, start, d_head), the same for every restored run (the corrupted
    run's: restorations change no position before their token), row r of a batch being noise sample
    r % samples; or (rows, kv_heads, start, d_head), one per row.
    """

    def __init__(self, keys: Tensor, values: Tensor):
        self.keys, self.values = keys, values

    def update(self, keys: Tensor, values: Tensor, *args, **kwargs):
        g = keys.shape[0] // self.keys.shape[0]      # keys: (rows, kv_heads, positions, d_head)
        if self.keys.shape[0] == 1:                  # one recorded row: a view, copied once by cat
            return (torch.cat([self.keys.expand(g, -1, -1, -1), keys], dim=-2),
                    torch.cat([self.values.expand(g, -1, -1, -1), values], dim=-2))
        return (torch.cat([self.keys.repeat(g, 1, 1, 1), keys], dim=-2),
                torch.cat([self.values.repeat(g, 1, 1, 1), values], dim=-2))


class _AtRows:
    """Stands in for a transformers cache for rows that each hold one position, positions[r]: their
    attention sees the recorded keys/values of all n positions (later ones hidden by the mask), with
    the row's own at its position. keys, values: (samples, kv_heads, n, d_head); row r is sample r % samples."""

    def __init__(self, keys: Tensor, values: Tensor, positions: Tensor):
        self.keys, self.values, self.positions = keys, values, positions

    def update(self, keys: Tensor, values: Tensor, *args, **kwargs):
        rows = keys.shape[0]                         # keys: (rows, kv_heads, 1, d_head)
        g = rows // self.keys.shape[0]
        k, v = self.keys.repeat(g, 1, 1, 1), self.values.repeat(g, 1, 1, 1)   # (rows, kv_heads, n, d_head)
        r = torch.arange(rows, device=keys.device)
        k[r, :, self.positions] = keys[:, :, 0]
        v[r, :, self.positions] = values[:, :, 0]
        return k, v


class _Stop(Exception):
    """Ends a block's forward pass early (raised by :class:`_Collect`)."""


class _Collect(_Prefix):
    """A :class:`_Prefix` that keeps the keys and values of all positions so far, per row, then stops
    the block: used where only a block's keys and values are wanted, not its output."""

    def update(self, keys: Tensor, values: Tensor, *args, **kwargs):
        self.keys, self.values = super().update(keys, values)   # (rows, kv_heads, positions, d_head)
        raise _Stop


def _unsplittable(kwargs: dict, n: int, sdpa: bool, cache_names: Sequence[str]) -> str | None:
    """Why a block's recorded arguments cannot be cut to a suffix of the positions (see :func:`_suffix`);
    None when they can."""
    for name, v in kwargs.items():
        if name in cache_names or not (torch.is_tensor(v) or isinstance(v, (tuple, list))):
            continue
        if name not in POSITION_ARGS:                # a tensor argument we do not know how to cut
            return f"blocks get an argument {name!r} that kvlab cannot cut to the last positions"
        if name == "attention_mask":
            ok = v.dim() == 4 and tuple(v.shape[-2:]) == (n, n)
        elif name == "position_embeddings":
            ok = all(torch.is_tensor(x) and x.dim() >= 2 and x.shape[-2] == n for x in v)
        else:                                        # position_ids (1, n), cache_position (n,)
            ok = v.shape[-1] == n
        if not ok:
            return f"blocks get {name!r} of a shape kvlab does not expect"
    # no mask: sdpa's implicit causal mask, which _suffix makes explicit; eager always gets one
    if kwargs.get("attention_mask") is None and not sdpa:
        return "blocks get no attention mask"
    return None


def _suffix(kwargs: dict, start: int, stop: int, n: int, dtype, device) -> dict:
    """Block arguments for positions [start, stop) attending to [0, stop): mask rows, position ids and
    rotary tables cut (n: all positions, as recorded)."""
    kw = dict(kwargs)
    mask = kw.get("attention_mask")
    if mask is None:    # sdpa builds no mask, and its is_causal is wrong when queries < keys: make one
        mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]
    kw["attention_mask"] = mask[..., start:stop, :stop]         # (1, 1, stop - start, stop)
    if kw.get("position_ids") is not None:
        kw["position_ids"] = kw["position_ids"][..., start:stop]
    if kw.get("cache_position") is not None:
        kw["cache_position"] = kw["cache_position"][start:stop]
    if kw.get("position_embeddings") is not None:               # rotary (cos, sin), each (1, n, d_rot)
        kw["position_embeddings"] = type(kw["position_embeddings"])(x[..., start:stop, :]
                                                                    for x in kw["position_embeddings"])
    return kw



# ----------------------------------------------------------------------------- re-running blocks
class BlockRunner:
    """Runs a model's blocks again on new rows, from one recorded forward pass.

    :meth:`record` wraps one forward pass and keeps, per block, the hidden states entering it
    (``inputs``), its other arguments (mask, position ids, rotary tables; first row:
    ``block_kwargs``) and the keys and values its attention computed (``kv``, after rotary
    embeddings, through a stand-in for the transformers cache). :meth:`run` then runs block l on
    hidden states of positions [start, stop) only: their attention reads the positions before
    ``start`` from the recorded keys/values (mask rows, position ids and rotary tables cut to
    match). ``split`` says whether that is possible on this model, ``split_off`` why not (None
    when it is); without it only whole sequences (start 0, all positions) can be run.
    Used by :class:`Tracer` and by the integrated gradients of :mod:`kvlab.neurons`.
    """

    def __init__(self, model):
        self.model, self.arch = model, adapter(model)
        self.blocks = [self.arch.layer(l) for l in range(self.arch.n_layers)]
        self.sigs = [inspect.signature(block.forward) for block in self.blocks]
        self.hidden_arg = [next(iter(sig.parameters)) for sig in self.sigs]  # "hidden_states"
        self.cache_arg = [cache_params(sig) for sig in self.sigs]
        # Can blocks run on the last positions only, given the earlier positions' keys and values?
        # Needs a cache argument that the attention updates, and position arguments we can cut.
        self.impl = getattr(model.config, "_attn_implementation", None)
        if self.impl not in ("eager", "sdpa"):
            self.split_off = f"attention implementation {self.impl!r} (kvlab cuts eager and sdpa)"
        elif not all(self.cache_arg):
            self.split_off = f"{type(self.blocks[0]).__name__}.forward takes no cache argument"
        else:
            self.split_off = None
        self.split = self.split_off is None
        self.kv = self.inputs = self.block_kwargs = None
        self.n = 0

    @contextmanager
    def record(self) -> Iterator[None]:
        """Record the blocks' inputs, arguments and keys/values of the forward pass run inside the block."""
        kv = [_Recorder() for _ in self.blocks] if self.split else None
        caches = list(zip(self.cache_arg, kv)) if self.split else None
        with _record_block_inputs(self.blocks, self.sigs, caches) as calls:
            yield
        h0 = calls[0][self.hidden_arg[0]]
        rows, self.n = h0.shape[0], h0.shape[1]
        self.inputs = [kw[h] for kw, h in zip(calls, self.hidden_arg)]        # L x (rows, n, d)
        # every block's keyword arguments (mask, position ids, rotary tables) for one row, hidden states left out
        self.block_kwargs = [{k: _first_row(v, rows) for k, v in kw.items() if k != h}
                             for kw, h in zip(calls, self.hidden_arg)]
        if self.split:     # every attention handed its keys/values to the cache, and the arguments can be cut
            if not all(r.keys is not None and r.keys.shape[-2] == self.n for r in kv):
                self.split_off = (f"the attention never called update() on a cache passed as "
                                  f"{' / '.join(self.cache_arg[0])}")
            else:
                self.split_off = next((why for kw, names in zip(self.block_kwargs, self.cache_arg)
                                       if (why := _unsplittable(kw, self.n, self.impl == "sdpa", names))), None)
            self.split = self.split_off is None
        self.kv = kv if self.split else None

    def run(self, l: int, h: Tensor, start: int = 0, cache: _Prefix | None = None) -> Tensor:
        """Block l on hidden states h (rows, m, d) of positions [start, start + m), with the recorded
        block arguments. The attention sees the positions before ``start`` through ``cache`` (default:
        the recorded keys/values, row r of h reading recorded row r % recorded rows)."""
        kw, stop = self.block_kwargs[l], start + h.shape[1]
        if (start, stop) != (0, self.n):
            if not self.split:
                raise RuntimeError(f"cannot run block {l} on positions [{start}, {stop}): {self.split_off}")
            kw = _suffix(kw, start, stop, self.n, h.dtype, h.device)
            rec = self.kv[l]
            cache = cache if cache is not None else _Prefix(rec.keys[:, :, :start], rec.values[:, :, :start])
            kw.update(dict.fromkeys(self.cache_arg[l], cache))
        kw = _expand(kw, h.shape[0])
        return first(self.blocks[l](**kw, **{self.hidden_arg[l]: h}))

    def run_at(self, l: int, h: Tensor, positions: Tensor) -> Tensor:
        """Block l on one position per row: h (rows, 1, d) at positions (rows,), attending to the recorded
        keys/values of every earlier position (row r reading recorded row r % recorded rows): per-row mask
        rows, position ids and rotary tables. Only where :attr:`at_ok` (blocks get no ``cache_position``)."""
        kw = _rows_at(self.block_kwargs[l], positions, self.n, h.dtype, h.device)
        rec = self.kv[l]
        kw.update(dict.fromkeys(self.cache_arg[l], _AtRows(rec.keys, rec.values, positions)))
        return first(self.blocks[l](**kw, **{self.hidden_arg[l]: h}))

    @property
    def at_ok(self) -> bool:
        return self.split and all(kw.get("cache_position") is None for kw in self.block_kwargs)

def _rows_at(kwargs: dict, positions: Tensor, n: int, dtype, device) -> dict:
    """Block arguments for one query position per row, positions (rows,), attending to [0, n): per-row
    mask rows (rows, heads, 1, n), position ids (rows, 1) and rotary tables (rows, 1, d_rot)."""
    kw = dict(kwargs)
    mask = kw.get("attention_mask")
    if mask is None:    # sdpa builds no mask: make the causal one
        mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]
    kw["attention_mask"] = mask[0][:, positions].transpose(0, 1)[:, :, None]   # (rows, heads, 1, n)
    if kw.get("position_ids") is not None:
        kw["position_ids"] = kw["position_ids"][0, positions][:, None]           # (rows, 1)
    if kw.get("position_embeddings") is not None:                                # rotary (cos, sin)
        kw["position_embeddings"] = type(kw["position_embeddings"])(x[0, positions][:, None]
                                                                    for x in kw["position_embeddings"])
    return kw


# ----------------------------------------------------------------------------- tracer
class Tracer:
    """Clean and corrupted runs of one prompt, cached; restored runs computed in batches.

    ``eps`` (samples, n_subject_tokens, d_model) are the standard-normal draws; pass the
    same ``eps`` to another implementation to get the same corruption. ``split``: whether
    blocks run on the last positions only (see the module docstring), and ``split_off`` why not
    (also given as a ``RuntimeWarning``; None when they do); ``call_tokens``: the
    fixed cost of a block call, in tokens through a block, that decides how tokens are grouped.
    """

    @torch.no_grad()
    def __init__(self, model, tok, prompt: str, subject: str, answer: str | None = None,
                 noise: float | None = None, samples: int = 10, seed: int = 0, eps: Tensor | None = None,
                 occurrence: int = 0, max_batch: int = 4096):
        samples = checks.integer("trace", "samples", samples)
        check_noise("trace", noise)
        if eps is not None:
            if not torch.is_tensor(eps):
                raise ValueError(f"trace: eps must be a tensor (samples, n_subject_tokens, d_model) of "
                                 f"standard-normal draws, got {type(eps).__name__}")
            if not bool(torch.isfinite(eps).all()):
                raise ValueError(f"trace: eps has {int((~torch.isfinite(eps)).sum())} NaN/inf entries; it must "
                                 f"be finite (standard-normal draws, e.g. tracing.sample_noise)")
        with eval_mode(model):
            self._setup(model, tok, prompt, subject, answer, noise, samples, seed, eps, occurrence, max_batch)

    def _setup(self, model, tok, prompt, subject, answer, noise, samples, seed, eps, occurrence, max_batch):
        self.model, self.tok, self.arch = model, tok, adapter(model)
        self.prompt, self.subject = prompt, subject
        self.max_batch = max_batch
        batch = encode(model, tok, prompt)
        self.ids = batch.input_ids                          # (1, n)
        self.n = n = self.ids.shape[1]
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
        self.runner = runner = BlockRunner(model)
        self.blocks, self.hidden_arg, self.cache_arg = runner.blocks, runner.hidden_arg, runner.cache_arg

        # One forward pass of 1 + samples rows: row 0 clean, the others corrupted. Cache the clean
        # block / mlp / attn outputs, every block's corrupted input (and keys/values) and the last
        # block's corrupted output, and the arguments transformers passes to the blocks.
        mods = {("hidden", l): self.blocks[l] for l in range(L)}
        mods.update({("mlp", l): self.arch.mlp(l) for l in range(L)})
        mods.update({("attn", l): self.arch.attn(l) for l in range(L)})
        ids = self.ids.expand(1 + samples, -1)
        mask = batch.attention_mask.expand(1 + samples, -1)

        def corrupt_rows(emb: Tensor) -> Tensor:                            # (1 + samples, n, d)
            return torch.cat([emb[:1], self.corrupt(emb[1:])])
        with patch(self.arch.embed, corrupt_rows), capture(model, mods) as store, runner.record():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]  # (1 + samples, vocab)
        checks.finite_output(model, logits[:1], "trace", f"the clean run's logits on prompt {prompt!r}")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"trace: noise={self.noise:g} makes the corrupted runs' logits NaN/inf (the clean run's "
                             f"are finite); use a smaller noise")
        self.clean = {k: v[0] for k, v in store.items()}                    # (kind, l) -> (n, d)
        # L+1 x (samples, n, d): every block's corrupted input, then the last block's corrupted output
        self.corrupted = [x[1:] for x in runner.inputs] + [store[("hidden", L - 1)][1:]]
        self.block_kwargs = runner.block_kwargs
        self.split, self.split_off = runner.split, runner.split_off
        if self.split_off is not None:
            warnings.warn(f"causal tracing computes every position of every restored run on this model "
                          f"({type(model).__name__}, transformers {_transformers_version()}): "
                          f"{self.split_off}. Scores are exact, only slower.", RuntimeWarning, stacklevel=4)
        self.kv = runner.kv
        if self.split:
            for r in self.kv:
                r.keys, r.values = r.keys[1:], r.values[1:]                 # (samples, kv_heads, n, d_head)
        if answer is None:
            self.answer_id = int(logits[0].argmax())
        else:
            self.answer_id = token_ids(tok, answer)[0]
        self.answer = tok.decode([self.answer_id])
        p = logits.float().softmax(-1)[:, self.answer_id]
        self.high_score = float(p[0])
        self.low_score = float(p[1:].mean())
        # what a block call costs beyond its arithmetic, in tokens through one block (see _groups)
        flops = 2 * sum(w.numel() for w in self.blocks[0].parameters())           # per token through one block
        self.call_tokens = CALL_FLOPS.get(self.ids.device.type, CALL_FLOPS["cuda"]) / flops + CALL_ROWS

    def corrupt(self, emb: Tensor) -> Tensor:
        """Add ν·ε to the subject token embeddings. emb: (samples, n, d)."""
        b, e = self.subject_range
        emb = emb.clone()
        emb[:, b:e] += self.noise * self.eps.to(emb.device, emb.dtype)
        return emb

    def run_block(self, l: int, h: Tensor, start: int = 0, cache: _Prefix | None = None,
                  restore: tuple | None = None) -> Tensor:
        """Block l on hidden states h (rows, m, d) of positions [start, start + m), with the clean run's
        block arguments. The attention sees the positions before ``start`` through ``cache`` (default:
        the corrupted run's keys/values). ``restore`` = (module, rows, tokens, states): the module's
        output at (row, token) is set to the state, for the tokens in [start, start + m).
        """
        if restore is None:
            return self.runner.run(l, h, start, cache)
        mod, rows, toks, states = restore
        inside = (toks >= start) & (toks < start + h.shape[1])
        rows, toks, states = rows[inside], toks[inside] - start, states[inside]

        def fn(y: Tensor) -> Tensor:                                  # (rows, m, d)
            y = y.clone()
            y[rows, toks] = states.to(y.dtype)
            return y
        with patch(mod, fn):
            return self.runner.run(l, h, start, cache)

    def run_last_block(self, h: Tensor, start: int = 0, restore: tuple | None = None) -> Tensor:
        """The last block's output at the last position only, (rows, 1, d), for h (rows, n - start, d).

        Of the other positions only the keys and values are needed there: a first pass on positions
        [start, n - 1) stops once the attention has them (norm and key/value projections, no MLP),
        then the last position runs alone. (Restoring a module output at the last layer changes only
        that position's output: ``restore`` matters at the last position only.)
        """
        l = self.arch.n_layers - 1
        if not self.split or h.shape[1] == 1:
            return self.run_block(l, h, start, restore=restore)[:, -1:]
        rec = self.kv[l]
        kv = _Collect(rec.keys[:, :, :start], rec.values[:, :, :start])
        try:
            self.run_block(l, h[:, :-1], start, kv)
        except _Stop:
            pass
        else:
            raise RuntimeError("the last block never handed its keys/values to the cache")
        return self.run_block(l, h[:, -1:], self.n - 1, _Prefix(kv.keys, kv.values), restore)

    @torch.no_grad()
    def restored(self, kind: str, cells: Sequence[tuple[int, int]], window: int = 10) -> Tensor:
        """p(answer) with cell (token t, layer l) restored, averaged over the samples, per cell -> (cells,).

        Cells whose token precedes the subject score ``low_score``: clean and corrupted states are
        equal there. The others' rows are keyed by their state, (token, layers restored so far), so
        that cells with the same history share rows (the "mlp"/"attn" windows [lo, hi) of a token
        all hold the same state until the shorter one ends); tokens are run in groups (``_groups``).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        window = checks.integer("trace", "window", window)
        with eval_mode(self.model):
            out = self._restored(kind, cells, window)
        return checks.finite_output(self.model, out, "trace", f"the restored runs' p(answer) ({kind})")

    def _restored(self, kind: str, cells: Sequence[tuple[int, int]], window: int) -> Tensor:
        L, b = self.arch.n_layers, self.subject_range[0]
        out = torch.full((len(cells),), self.low_score)
        live = [i for i, (t, _) in enumerate(cells) if t >= b]
        if not live:
            return out
        # layers at which a cell restores its token: block output ("hidden") or module output ("mlp", "attn")
        layers = {i: (l,) if kind == "hidden" else tuple(window_layers(l, window, L))
                  for i, (_, l) in enumerate(cells)}

        def state(i: int, k: int):
            """The state of cell i's rows after block k; None while they equal the corrupted run's."""
            done = tuple(j for j in layers[i] if j <= k)
            return (cells[i][0], done) if done else None

        plan = [list(dict.fromkeys(s for i in live if (s := state(i, k)) is not None)) for k in range(L)]
        for start, tokens in self._groups(plan):
            p = self._run(kind, start, [[s for s in states if s[0] in tokens] for states in plan])
            for i in live:
                if cells[i][0] in tokens:
                    out[i] = p[state(i, L - 1)]
        return out

    def _groups(self, plan: list[list]) -> list[tuple[int, set]]:
        """Group tokens into runs: (start, tokens) computes positions [start, n) for tokens ≥ start.

        A group per token computes the fewest positions; fewer groups make fewer block calls, each
        with a fixed cost (``call_tokens``, in tokens through a block). Token t joins the group before
        when its extra positions, (t − start) per row, cost less than its own block calls would.
        """
        tokens = sorted({t for states in plan for t, _ in states})
        if not self.split:          # every row computes every position
            return [(0, set(tokens))]
        groups: list[tuple[int, set]] = []
        for t in tokens:
            rows = [self.samples * sum(s[0] == t for s in states) for states in plan]   # per block
            calls = sum(r > 0 for r in rows)
            if groups and sum(rows) * (t - groups[-1][0]) < self.call_tokens * calls:
                groups[-1][1].add(t)
            else:
                groups.append((t, {t}))
        return groups

    def _run(self, kind: str, start: int, plan: list[list]) -> dict:
        """Run the states of ``plan`` (per block, the distinct states after it) on positions [start, n).

        A state's rows (one per noise sample) join at the first block its restoration changes,
        from the cached corrupted input of that block (positions ≥ start; the earlier ones are the
        corrupted run's, their keys/values cached). Returns state -> p(answer) after the last block.
        """
        L, S = self.arch.n_layers, self.samples
        mod = self.arch.mlp if kind == "mlp" else self.arch.attn
        held, h = [], None               # states after the previous block, their rows: (len(held) * S, n - start, d)
        h0 = self.corrupted[0]
        for k, new in enumerate(plan):
            if not new:
                continue
            made = [s for s in new if kind == "hidden" and s[1] == (k,)]       # block k's corrupted output, restored
            # a module output first restored in block k changes only its token's position there (the others
            # read keys/values of the block's input): those rows run block k on that one position
            at_ok = self.split and self.runner.at_ok
            fresh = [s for s in new if kind != "hidden" and s[1] == (k,) and at_ok]
            run = [s for s in new if s[1] != (k,) or (kind != "hidden" and not at_ok)]  # through block k
            parts = []
            if run:
                at = {s: i for i, s in enumerate(held)}
                x = []
                for t, done in run:
                    parent = (t, tuple(j for j in done if j < k))
                    x.append(h[at[parent] * S:(at[parent] + 1) * S] if parent[1] else self.corrupted[k][:, start:])
                x = torch.cat(x)                                            # (len(run) * S, n - start, d)
                hit = [(i, t) for i, (t, done) in enumerate(run) if kind != "hidden" and k in done]
                restore = None
                if hit:    # the module output at token t, in the rows of these states
                    rows = torch.tensor([i * S + r for i, _ in hit for r in range(S)], device=x.device)
                    toks = torch.tensor([t for _, t in hit], device=x.device).repeat_interleave(S)
                    restore = (mod(k), rows, toks, self.clean[(kind, k)][toks])
                if k < L - 1:
                    parts.append(self.run_block(k, x, start, restore=restore))
                else:      # only the last position is read from the last block
                    parts.append(self.run_last_block(x, start, restore))
            for t, _ in made:
                y = self.corrupted[k + 1][:, start:].clone()                # (S, n - start, d)
                y[:, t - start] = self.clean[("hidden", k)][t].to(y.dtype)
                parts.append(y if k < L - 1 else y[:, -1:])
            if fresh:
                toks = torch.tensor([t for t, _ in fresh], device=h0.device).repeat_interleave(S)
                x = torch.cat([self.corrupted[k][:, t:t + 1] for t, _ in fresh])   # (len(fresh) * S, 1, d)
                states = self.clean[(kind, k)][toks]

                def put(y: Tensor) -> Tensor:                               # (rows, 1, d)
                    return states[:, None].to(y.dtype)
                with patch(mod(k), put):
                    out = self.runner.run_at(k, x, toks)                    # (len(fresh) * S, 1, d)
                for i, (t, _) in enumerate(fresh):
                    y = self.corrupted[k + 1][:, start:].clone()            # (S, n - start, d)
                    y[:, t - start] = out[i * S:(i + 1) * S, 0]
                    parts.append(y if k < L - 1 else y[:, -1:])
            held, h = run + made + fresh, torch.cat(parts)
        logits = self.arch.unembed(self.arch.final_norm(h[:, -1]))         # (len(held) * S, vocab)
        p = logits.float().softmax(-1)[:, self.answer_id].view(len(held), S).mean(1).tolist()
        return dict(zip(held, p))

    def trace(self, kind: str = "hidden", window: int = 10) -> TraceResult:
        """The full (n_tokens, n_layers) grid for one kind, in batches of at most ``max_batch`` rows."""
        L, n = self.arch.n_layers, self.n
        cells = [(t, l) for t in range(n) for l in range(L)]
        per = max(1, self.max_batch // self.samples)     # cells per batch
        scores = torch.cat([self.restored(kind, cells[i:i + per], window) for i in range(0, len(cells), per)])
        return TraceResult(scores.view(n, L), self.low_score, self.high_score, self.subject_range,
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

    The model runs in eval mode (dropout off) for the duration, whatever mode it is in; its mode is
    given back afterwards (:func:`eval_mode`). ``noise`` must be a finite number > 0 (or None),
    ``eps`` finite; a NaN/inf result raises ValueError naming the weight that caused it.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    checks.integer("trace", "window", window)
    tr = Tracer(model, tok, prompt, subject, answer, noise, samples, seed, eps, occurrence)
    return tr.trace(kind, window)


def trace_all_kinds(model, tok, prompt: str, subject: str, answer: str | None = None,
                    kinds: Sequence[str] = KINDS, noise: float | None = None, samples: int = 10,
                    window: int = 10, seed: int = 0, eps: Tensor | None = None,
                    occurrence: int = 0) -> dict[str, TraceResult]:
    """:func:`trace` for several kinds, sharing the clean and corrupted runs (and the noise)."""
    kinds = check_kinds("trace_all_kinds", kinds)
    checks.integer("trace_all_kinds", "window", window)
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
    is not the first token of ``attribute`` are skipped (as ROME does). ``kinds``: distinct kinds of
    :data:`KINDS`, at least one.
    """
    kinds = check_kinds("average_effects", kinds)
    check_noise("average_effects", noise)
    checks.integer("average_effects", "samples", samples)
    checks.integer("average_effects", "window", window)
    if n is not None:
        checks.integer("average_effects", "n", n)
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
    """Hidden-state traces of one prompt at several noise levels ν = m·σ (σ default: this subject's).

    ``multiples``: one or more finite numbers > 0; ``sigma``: a finite number > 0 or None."""
    multiples = list(multiples)
    if not multiples:
        raise ValueError("noise_sweep: multiples is empty; give one or more noise multiples m > 0 (ν = m·σ)")
    for m in multiples:
        checks.number("noise_sweep", "each of multiples", m, 0, strict=True, accepted="ν = m·σ")
    if sigma is not None:
        checks.number("noise_sweep", "sigma", sigma, 0, strict=True,
                      accepted="σ, the standard deviation of the subject's embeddings; None = this subject's")
    sigma = noise_level(model, tok, [subject], factor=1.0) if sigma is None else sigma
    return {m: trace(model, tok, prompt, subject, noise=m * sigma, **kw) for m in multiples}
