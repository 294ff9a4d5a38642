"""Reading vectors in the vocabulary space (Geva et al. 2021 §4, Geva et al. 2022).

Any d_model vector u of the residual stream can be read as a distribution over the
vocabulary by the model's own output head: ``logits = unembed(final_norm(u))``. Applied
to a value vector v_i this shows the tokens the memory *promotes*; applied to the
sub-updates m_i·v_i of one prediction it shows which memories pushed the output where::

    value_tokens(model, tok, layer=5, keys=[17]).tokens     # [[' Kelmor', ' Dunvale', ...]]
    top_sub_updates(model, tok, "Anna Berg lives in", layer=5, n=5)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import adapter
from .memory import decompose
from .triggers import TriggerIndex


@dataclass
class TopTokens:
    """The top tokens of n projected vectors."""

    ids: torch.Tensor          # (n, top) token ids, best first
    scores: torch.Tensor       # (n, top) logits
    tokens: list[list[str]]    # decoded tokens, same layout

    def __len__(self) -> int:
        return self.ids.shape[0]


def decode_ids(tok, ids) -> list[str]:
    """Decode token ids one by one (keeps GPT-2's leading space, shows special tokens)."""
    return [tok.decode([int(i)]) for i in ids]


@torch.no_grad()
def to_logits(model, vectors: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """``unembed(final_norm(u))`` for each row u: (n, d_model) -> (n, vocab). Chunked over rows."""
    arch = adapter(model)
    v = _as_rows(arch, vectors)
    out = []
    for i in range(0, v.shape[0], chunk):
        out.append(arch.unembed(arch.final_norm(v[i: i + chunk])).float())
    return torch.cat(out)


def _as_rows(arch, vectors) -> torch.Tensor:
    v = torch.as_tensor(vectors)
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2 or v.shape[1] != arch.d_model:
        raise ValueError(f"vectors must be (n, d_model={arch.d_model}) or (d_model,), got {tuple(v.shape)}")
    w = arch.unembed.weight
    return v.to(device=w.device, dtype=w.dtype)


@torch.no_grad()
def top_ids(model, vectors: torch.Tensor, top: int = 1, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top`` (scores, ids) of each projected row, without keeping all logits. Each (n, top)."""
    arch = adapter(model)
    v = _as_rows(arch, vectors)
    scores, ids = [], []
    for i in range(0, v.shape[0], chunk):
        s, t = to_logits(model, v[i: i + chunk], chunk).topk(top, dim=-1)
        scores.append(s.cpu())
        ids.append(t.cpu())
    return torch.cat(scores), torch.cat(ids)


def project(model, tok, vectors: torch.Tensor, top: int = 10) -> TopTokens:
    """Top tokens of vectors read through final norm + unembedding. (n, d_model) or (d_model,)."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    scores, ids = top_ids(model, vectors, top)
    return TopTokens(ids, scores, [decode_ids(tok, row) for row in ids])


def value_tokens(model, tok, layer: int, keys: list[int] | None = None, top: int = 10) -> TopTokens:
    """Tokens promoted by the value vectors v_i of ``layer`` (all keys, or the given ones)."""
    arch = adapter(model)
    V = arch.value_matrix(layer).detach()                                  # (d_ff, d_model)
    if keys is not None:
        keys = [int(i) for i in ([keys] if isinstance(keys, int) else keys)]
        if not keys or any(not 0 <= i < arch.d_ff for i in keys):
            raise ValueError(f"keys must be indices in [0, {arch.d_ff})")
        V = V[keys]
    return project(model, tok, V, top)


def agreement(model, tok, index: TriggerIndex, layer: int, keys: list[int] | None = None,
              n_examples: int = 1) -> tuple[float, float]:
    """Key–value agreement (Geva et al. 2021 §4): does v_i predict what follows k_i's triggers?

    For each key with a trigger, the value's top token (argmax of the projected v_i) is
    compared with the next corpus token after each of its top ``n_examples`` trigger
    prefixes; a hit on any of them counts. Keys whose triggers all end their sentence are
    skipped. Returns ``(rate, random_baseline)`` where the baseline is the hit rate of a
    uniformly random top token: mean over keys of (#distinct next tokens) / vocab size.
    Paper (n_examples=1): ~0% in layers 1–10, up to ~3.5% in the top layers; random 0.0004%.
    """
    layer = index.check_layer(layer)
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    d_ff = index.values[layer].shape[0]
    keys = list(range(d_ff)) if keys is None else [int(i) for i in keys]
    V = adapter(model).value_matrix(layer).detach()
    _, top1 = top_ids(model, V[keys], 1)                                   # (n_keys, 1)
    vocab = to_logits(model, V[:1]).shape[-1]
    hits, base, n = 0, 0.0, 0
    for row, key in enumerate(keys):
        nxt = set()
        for j in range(min(n_examples, index.k)):
            if int(index.sentence[layer][key, j]) < 0:
                break
            t = index.next_token(layer, key, j)
            if t is not None:
                nxt.add(t)
        if not nxt:
            continue
        n += 1
        hits += int(top1[row, 0]) in nxt
        base += len(nxt) / vocab
    if n == 0:
        raise ValueError(f"no key of layer {layer} has a trigger followed by a token")
    return hits / n, base / n


@dataclass
class SubUpdates:
    """The strongest sub-updates m_i·v_i of one FFN layer for one prediction (Geva et al. 2022)."""

    layer: int
    prompt: str
    keys: torch.Tensor         # (n,) memory indices, strongest first
    m: torch.Tensor            # (n,) coefficients m_i
    norm: torch.Tensor         # (n,) ‖v_i‖
    score: torch.Tensor        # (n,) |m_i|·‖v_i‖
    tokens: list[list[str]]    # top tokens promoted by sign(m_i)·v_i
    prediction: str            # the model's next-token prediction for the prompt

    def rows(self) -> list[dict]:
        return [{"key": int(k), "m": float(m), "|m|·‖v‖": float(s), "promotes": " ".join(t)}
                for k, m, s, t in zip(self.keys, self.m, self.score, self.tokens)]


@torch.no_grad()
def top_sub_updates(model, tok, prompt: str, layer: int, n: int = 10, top: int = 5,
                    position: int | None = None) -> SubUpdates:
    """The ``n`` sub-updates m_i·v_i with the largest |m_i|·‖v_i‖ at ``position`` (default: last)."""
    if not isinstance(prompt, str):
        raise ValueError("top_sub_updates takes a single prompt string")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    d = decompose(model, tok, prompt, layer)
    pos = int(d.batch.last[0]) if position is None else position
    if not -d.m.shape[1] <= pos < d.m.shape[1]:
        raise ValueError(f"position {pos} out of range for a prompt of {d.m.shape[1]} tokens")
    m = d.m[0, pos].float()                                                 # (d_ff,)
    norm = d.values.float().norm(dim=-1)                                    # (d_ff,)
    score, keys = (m.abs() * norm).topk(min(n, m.numel()))
    signed = torch.sign(m[keys])[:, None] * d.values[keys].float()         # (n, d_model)
    proj = project(model, tok, signed, top)
    logits = model(**d.batch.inputs()).logits[0, d.batch.last[0]]
    pred = tok.decode([int(logits.argmax())])
    return SubUpdates(layer, prompt, keys.cpu(), m[keys].cpu(), norm[keys].cpu(), score.cpu(), proj.tokens, pred)
