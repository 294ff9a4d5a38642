"""Tokenising prompts: padded batches, last positions, subject token ranges.

Batches are padded on the *right*, so every real token keeps its position id and the
prediction of row b is read at ``last[b]`` (the last non-pad position).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import check_tokenizer, model_device


@dataclass
class Batch:
    input_ids: torch.Tensor       # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq)
    last: torch.Tensor            # (batch,) index of each row's last real token

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def ensure_pad(tok) -> None:
    """Give tokenizers without a pad token (GPT-2, Llama) their eos as pad, right-padded."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {getattr(tok, 'name_or_path', '?')} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"


def pad_batch(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists: ``input_ids`` (B, T) and ``attention_mask`` (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_rows(model, tok, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pad_batch` with the tokenizer's pad token, on the model's device."""
    ensure_pad(tok)
    return pad_batch(rows, tok.pad_token_id, model_device(model))


def encode(model, tok, prompts: str | list[str], device=None) -> Batch:
    """Tokenise prompts into a right-padded batch on the model's device."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    if any(not isinstance(p, str) or not p for p in prompts):
        raise ValueError("every prompt must be a non-empty string")
    check_tokenizer(model, tok)
    ensure_pad(tok)
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    device = device or model_device(model)
    ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    if (mask.sum(1) == 0).any():
        raise ValueError("a prompt tokenised to zero tokens")
    last = mask.sum(1) - 1
    return Batch(ids, mask, last)


def token_ids(tok, target: str) -> list[int]:
    """Token ids of a target string as it follows a prompt (with GPT-2's leading space)."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"empty target: {target!r}")
    text = target if target.startswith(" ") else " " + target
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenised to no tokens")
    return ids


def subject_token_range(tok, prompt: str, subject: str, occurrence: int = 0) -> tuple[int, int]:
    """Token range [start, end) of ``subject`` inside the tokenised ``prompt``.

    Found from character offsets, so subjects whose first or last word is split into
    several tokens, or that share a token with neighbouring text, are covered by every
    token that overlaps them. ``occurrence`` picks among repeated mentions (0 = first,
    -1 = last). Raises ValueError if the subject does not occur in the prompt.
    """
    if not subject:
        raise ValueError("empty subject")
    starts, i = [], prompt.find(subject)
    while i != -1:
        starts.append(i)
        i = prompt.find(subject, i + 1)
    if not starts:
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
    try:
        c0 = starts[occurrence]
    except IndexError:
        raise ValueError(f"subject {subject!r} occurs {len(starts)} time(s) in {prompt!r}; "
                         f"occurrence={occurrence} does not exist") from None
    c1 = c0 + len(subject)
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=True)
    toks = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < c1 and b > c0]
    if not toks:
        raise ValueError(f"subject {subject!r} covers no token of {prompt!r}")
    return toks[0], toks[-1] + 1
