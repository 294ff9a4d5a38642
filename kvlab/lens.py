"""The logit lens and how FFN layers compose predictions (Geva et al. 2021 §5).

At every layer the residual stream r can be read as a prediction with the model's own
head, ``argmax unembed(final_norm(r))`` (the *logit lens*). Each block adds an FFN
output o = Σ_i m_i v_i (+ bias) to the residual; comparing the top tokens of r (before
the FFN), o, r + o (after the FFN), the single memories m_i·v_i and the final output
tells whether the FFN *keeps* the residual's guess, *overrides* it with its own top
token, or *composes* a token that neither proposed::

    lens = logit_lens(model, tok, prompts)          # lens.agreement() per layer
    stats = composition_stats(model, tok, prompts)  # stats.rows() -> table per layer
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import adapter
from .hooks import capture
from .text import encode
from .vocab import decode_ids, to_logits, top_ids


def _prompts(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


@torch.no_grad()
def residual_stream(model, tok, prompts: list[str], layers=None, batch_size: int = 64) -> dict:
    """Per layer, at each prompt's last position: block output, FFN output, coefficients m.

    Returns ``{"block": {l: (n, d_model)}, "ffn": {l: (n, d_model)}, "m": {l: (n, d_ff)},
    "final": (n,) the model's top next token}``. The residual *before* the FFN is
    ``block − ffn`` (the FFN output is the last thing a block adds, in sequential and
    parallel blocks alike).
    """
    arch = adapter(model)
    ls = arch.check_layers(layers)
    prompts = _prompts(prompts)
    mods_out = {**{f"b{l}": arch.layer(l) for l in ls}, **{f"f{l}": arch.mlp(l) for l in ls}}
    mods_in = {f"m{l}": arch.value_module(l) for l in ls}
    acc = {"block": {l: [] for l in ls}, "ffn": {l: [] for l in ls}, "m": {l: [] for l in ls}, "final": []}
    with capture(model, mods_out, "output") as out, capture(model, mods_in, "input") as ins:
        for i in range(0, len(prompts), batch_size):
            batch = encode(model, tok, prompts[i: i + batch_size])
            logits = model(**batch.inputs()).logits                             # (B, T, vocab)
            rows = torch.arange(len(batch), device=logits.device)
            acc["final"].append(logits[rows, batch.last].argmax(-1).cpu())
            for l in ls:
                acc["block"][l].append(out[f"b{l}"][rows, batch.last].float().cpu())
                acc["ffn"][l].append(out[f"f{l}"][rows, batch.last].float().cpu())
                acc["m"][l].append(ins[f"m{l}"][rows, batch.last].float().cpu())
    res = {k: {l: torch.cat(v[l]) for l in ls} for k, v in acc.items() if k != "final"}
    res["final"] = torch.cat(acc["final"])
    return res


@dataclass
class LogitLens:
    """Top tokens of the residual stream after each layer, at each prompt's last position."""

    prompts: list[str]
    layers: list[int]
    top_ids: torch.Tensor       # (n, L) top token of the block output of each layer
    final_ids: torch.Tensor     # (n,) the model's prediction
    final_prob: torch.Tensor    # (n, L) probability the lens gives the final prediction at each layer
    tokens: list[list[str]]     # (n, L) decoded top tokens

    def agreement(self) -> torch.Tensor:
        """(L,) fraction of prompts whose layer-l top token is already the final prediction."""
        return (self.top_ids == self.final_ids[:, None]).float().mean(0)


def logit_lens(model, tok, prompts: str | list[str], layers=None, batch_size: int = 64) -> LogitLens:
    """Read the residual after each layer through final norm + unembedding (the logit lens)."""
    arch = adapter(model)
    ls = arch.check_layers(layers)
    prompts = _prompts(prompts)
    rs = residual_stream(model, tok, prompts, ls, batch_size)
    ids, probs = [], []
    for l in ls:
        logits = to_logits(model, rs["block"][l]).cpu()                      # (n, vocab)
        ids.append(logits.argmax(-1))
        probs.append(logits.softmax(-1).gather(1, rs["final"][:, None])[:, 0])
    top = torch.stack(ids, 1)                                                 # (n, L)
    tokens = [decode_ids(tok, row) for row in top]
    return LogitLens(prompts, ls, top, rs["final"], torch.stack(probs, 1), tokens)


@dataclass
class CompositionStats:
    """Per-layer statistics of how the FFN output relates to its memories and the residual.

    Every field is an (L,) tensor of fractions over prompts, for ``layers``.
    ``keep + override + compose == 1`` (the residual-after top token is the residual-before
    one / the FFN output's own one / neither).
    """

    layers: list[int]
    n: int
    active: torch.Tensor                # mean fraction of memories with m_i > 0
    ffn_no_memory: torch.Tensor         # FFN output's top token ≠ every active memory's top token
    after_no_memory: torch.Tensor       # same for the residual after the FFN
    before_agrees_final: torch.Tensor   # residual before the FFN already predicts the final token
    after_agrees_final: torch.Tensor    # residual after the FFN predicts the final token
    keep: torch.Tensor
    override: torch.Tensor
    compose: torch.Tensor

    def rows(self) -> list[dict]:
        names = ["active", "ffn_no_memory", "after_no_memory", "before_agrees_final", "after_agrees_final",
                 "keep", "override", "compose"]
        return [{"layer": l, **{k: 100 * float(getattr(self, k)[i]) for k in names}}
                for i, l in enumerate(self.layers)]


@torch.no_grad()
def memory_top_tokens(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top token of +v_i and of −v_i for every memory of ``layer``: two (d_ff,) tensors.

    The final norm is (almost exactly) scale invariant, so the top token of a sub-update
    m_i·v_i is that of +v_i when m_i > 0 and of −v_i when m_i < 0.
    """
    V = adapter(model).value_matrix(layer).detach()                          # (d_ff, d_model)
    _, pos = top_ids(model, V, 1)
    _, neg = top_ids(model, -V, 1)
    return pos[:, 0], neg[:, 0]


def composition_stats(model, tok, prompts: list[str], layers=None, batch_size: int = 64) -> CompositionStats:
    """Geva et al. 2021 §5 at each prompt's last position, for every layer in ``layers``.

    A memory is *active* when m_i > 0 (the non-zero set of a ReLU; for GELU/SiLU the
    positive part). Paper (4,000 prefixes, 16-layer model): 10–50% active; the layer's top
    prediction differs from every memory's in ≥ 68% of examples; residual = final output
    ~1/3 of the time in low layers, ~95% at the top; changes are mostly compositions.
    """
    arch = adapter(model)
    ls = arch.check_layers(layers)
    prompts = _prompts(prompts)
    rs = residual_stream(model, tok, prompts, ls, batch_size)
    final = rs["final"]
    fields = {k: [] for k in ("active", "ffn_no_memory", "after_no_memory", "before_agrees_final",
                              "after_agrees_final", "keep", "override", "compose")}
    for l in ls:
        block, ffn, m = rs["block"][l], rs["ffn"][l], rs["m"][l]               # (n, d), (n, d), (n, d_ff)
        before = block - ffn
        t_before = top_ids(model, before)[1][:, 0]                             # (n,)
        t_after = top_ids(model, block)[1][:, 0]
        t_ffn = top_ids(model, ffn)[1][:, 0]
        pos, neg = memory_top_tokens(model, l)                                 # (d_ff,)
        active = m > 0                                                          # (n, d_ff)
        mem_top = torch.where(m > 0, pos[None], neg[None])                      # (n, d_ff)
        ffn_hit = ((mem_top == t_ffn[:, None]) & active).any(1)
        after_hit = ((mem_top == t_after[:, None]) & active).any(1)
        keep = t_after == t_before
        override = ~keep & (t_after == t_ffn)
        vals = {"active": active.float().mean(1), "ffn_no_memory": ~ffn_hit, "after_no_memory": ~after_hit,
                "before_agrees_final": t_before == final, "after_agrees_final": t_after == final,
                "keep": keep, "override": override, "compose": ~keep & ~override}
        for k, v in vals.items():
            fields[k].append(v.float().mean())
    return CompositionStats(ls, len(prompts), **{k: torch.stack(v) for k, v in fields.items()})

