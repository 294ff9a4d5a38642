"""Tokenising prompts: padded batches, last positions, subject token ranges, and the checks on them.

Batches are padded on the *right*, explicitly (:func:`pad_batch`), so every real token keeps its
position id and the prediction of row b is read at ``last[b]`` (the last non-pad position). The
tokenizer's own ``padding_side`` is not used (:func:`right_padded` sets and restores it for code
that pads through the tokenizer).

Every method tokenises through this module, so bad input raises ``ValueError`` here instead of
giving a silent wrong answer:

* **unknown words**: a word-level tokenizer (the built-in one) reads a word it does not know as
  ``<unk>``, so "Paris" and "Berlin" would be the same answer. A target, answer, subject or prompt
  that tokenises to the tokenizer's ``unk_token_id`` raises, naming the word and the tokenizer
  (``encode(..., allow_unk=True)`` lets prompts through). Byte-level tokenizers (GPT-2, Llama) never
  produce an unknown token for text;
* **whitespace in targets**: GPT-2's single leading space is allowed, any other leading or trailing
  whitespace raises (``"hockey "`` would be two tokens, the second a lone space);
* **subjects** must start and end on token boundaries and not inside a word ("Lars" in "Larsen");
* **length**: a sequence longer than the model's positions raises, naming its length and the limit.
"""
from __future__ import annotations

import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

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


# ---------------------------------------------------------------------------------------------
# Padding (the tokenizer's padding_side is left alone)


def ensure_pad(tok) -> None:
    """Give a tokenizer without a pad token (GPT-2, Llama) its eos as pad.

    This sets ``tok.pad_token``, the only change kvlab makes to a caller's tokenizer, and only when
    it has none; ``padding_side`` is not touched (kvlab pads explicitly, see :func:`pad_batch`).
    """
    if tok.pad_token is None:
        pad_id(tok)  # raises if there is no eos either
        tok.pad_token = tok.eos_token


@contextmanager
def right_padded(tok) -> Iterator:
    """``tok`` with ``padding_side="right"`` inside the block, for code that pads through the tokenizer
    itself (``tok(texts, padding=True)``); the caller's setting is restored afterwards, also on error."""
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        yield tok
    finally:
        tok.padding_side = side


def pad_id(tok) -> int:
    """The id to pad with: the pad token, else eos (padded positions are masked). Does not change ``tok``."""
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ValueError(f"tokenizer {tokenizer_name(tok)} has neither a pad nor an eos token")
    return pid


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
    """:func:`pad_batch` on the model's device; raises if a row is longer than the model's positions."""
    if not rows or any(not r for r in rows):
        raise ValueError("pad_rows: every row needs at least one token")
    check_length(model, max(len(r) for r in rows), "a prompt with its context and target")
    return pad_batch(rows, pad_id(tok), model_device(model))


# ---------------------------------------------------------------------------------------------
# Checks: unknown words, length


def tokenizer_name(tok) -> str:
    """How error messages name a tokenizer: its path or hub name, else its class."""
    return getattr(tok, "name_or_path", "") or type(tok).__name__


def _unk_id(tok) -> int | None:
    """The id unknown text becomes, or None where that id is also eos/bos/pad (GPT-2's <|endoftext|>):
    such byte-level tokenizers never map text to it, and a literal special token is not unknown."""
    unk = getattr(tok, "unk_token_id", None)
    if unk is None or unk in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id):
        return None
    return unk


def check_known(tok, ids: list[int], text: str, what: str = "text") -> list[int]:
    """``ids`` (the tokens of ``text``) unchanged, or ValueError naming the words the tokenizer does not know."""
    unk = _unk_id(tok)
    if unk is None or unk not in ids:
        return ids
    words = [w for w in text.split() if unk in tok(w, add_special_tokens=False)["input_ids"]]
    named = ", ".join(repr(w) for w in dict.fromkeys(words)) if words else "whitespace it has no token for"
    raise ValueError(f"{what} {text!r}: {named} not in the vocabulary of tokenizer {tokenizer_name(tok)} "
                     f"(it would be read as {tok.unk_token!r}); use words the tokenizer knows")


def max_positions(model) -> tuple[int, str] | None:
    """The most tokens the model takes and the config field that says so, or None if it has none."""
    for name in ("n_positions", "max_position_embeddings"):
        n = getattr(model.config, name, None)
        if isinstance(n, int) and n > 0:
            return n, name
    return None


def check_length(model, n_tokens: int, what: str = "prompt") -> None:
    """Raise if ``n_tokens`` exceed the model's positions (the embedding lookup would fail deep inside)."""
    limit = max_positions(model)
    if limit is not None and n_tokens > limit[0]:
        raise ValueError(f"{what} is {n_tokens} tokens long but the model takes at most {limit[0]} "
                         f"(config.{limit[1]}); shorten it")


def prompt_ids(tok, prompt: str, allow_unk: bool = False) -> list[int]:
    """Token ids of one prompt (with the tokenizer's special tokens, e.g. Llama's BOS); unknown words raise."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"a prompt must be a non-empty string, got {prompt!r}")
    ids = tok(prompt)["input_ids"]
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenised to zero tokens")
    return ids if allow_unk else check_known(tok, ids, prompt, "prompt")


# ---------------------------------------------------------------------------------------------
# Prompts, targets, subjects


def encode(model, tok, prompts: str | list[str], device=None, allow_unk: bool = False) -> Batch:
    """Tokenise prompts into a right-padded batch on the model's device.

    Raises ValueError for an empty prompt, a word the tokenizer does not know (``allow_unk=True``:
    let it be read as the unknown token) and a prompt longer than the model's positions.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    if any(not isinstance(p, str) or not p for p in prompts):
        raise ValueError("every prompt must be a non-empty string")
    check_tokenizer(model, tok)
    rows = [prompt_ids(tok, p, allow_unk) for p in prompts]
    for p, r in zip(prompts, rows):
        check_length(model, len(r), f"prompt {p[:40] + '...' if len(p) > 40 else p!r}")
    ids, mask = pad_batch(rows, pad_id(tok), device or model_device(model))
    last = mask.sum(1) - 1
    return Batch(ids, mask, last)


def token_ids(tok, target: str) -> list[int]:
    """Token ids of a target string as it follows a prompt (with GPT-2's leading space).

    ``target`` may start with that one space; other leading or trailing whitespace, an empty
    target and words the tokenizer does not know raise ValueError.
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"empty target: {target!r}")
    word = target[1:] if target.startswith(" ") else target
    if word != word.strip():
        raise ValueError(f"target {target!r} has leading or trailing whitespace (it would be tokenised as extra "
                         f"tokens); write it as {target.strip()!r}")
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenised to no tokens")
    return check_known(tok, ids, word, "target")


def _is_mark(c: str) -> bool:
    """A combining mark (Unicode categories Mn, Mc, Me: the accent of a decomposed "é" = "e" + U+0301): it is
    part of the character before it."""
    return unicodedata.category(c) in ("Mn", "Mc", "Me")


def _wordy(c: str) -> bool:
    """A letter of a cased script or a digit."""
    return c.isdigit() or (c.isalpha() and c.lower() != c.upper())


def _joins(text: str, i: int) -> bool:
    """True if characters i − 1 and i of ``text`` belong to one word: letters of a cased script or digits
    ("Lars|en"), or a combining mark and the character it modifies ("cafe|\u0301": a mark is always part of
    the character before it, so a boundary before one is inside a character).

    A combining mark at i − 1 joins character i as its base character (the first before it that is not a
    mark) would: "e\u0301|cafe" is one word. Scripts without case (Chinese, Japanese, Thai ...) are not
    written with spaces between words, so there only the token boundaries count (and the marks)."""
    if _is_mark(text[i]):
        return True
    j = i - 1                        # the character before i, or the base character of the marks before i
    while j > 0 and _is_mark(text[j]):
        j -= 1
    return not _is_mark(text[j]) and _wordy(text[j]) and _wordy(text[i])


def _word_around(text: str, s0: int, s1: int) -> tuple[int, int]:
    """The character span [s0, s1) of ``text`` widened to whole words (see :func:`_joins`)."""
    while s0 > 0 and _joins(text, s0):
        s0 -= 1
    while s1 < len(text) and _joins(text, s1):
        s1 += 1
    return s0, s1


def _mentions(tok, prompt: str, subject: str) -> tuple[list[tuple[int, int, int]], dict[int, str], list[int]]:
    """Mentions of ``subject`` in ``prompt``: those on token boundaries as (char start, token start, token end),
    why each other one is not ({char start: reason}), and the prompt's token ids."""
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=True)
    spans = []                                       # per token, its characters without surrounding spaces
    for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        piece = prompt[a:b]
        a2 = a + len(piece) - len(piece.lstrip())
        if not tok.decode([i]).strip():              # a lone space token: sentencepiece's "▁" before a word it
            piece, a2 = "", a                        # splits ("▁", "Z", "eno") is given the offsets of "Z"
        spans.append((a2, max(a2, a + len(piece.rstrip()))))
    # the subject's own characters, without spaces around it
    lead, core = len(subject) - len(subject.lstrip()), len(subject.strip())
    found, bad, c0 = [], {}, prompt.find(subject)
    while c0 != -1:
        s0, s1 = c0 + lead, c0 + lead + core
        toks = [t for t, (a, b) in enumerate(spans) if b > a and a < s1 and b > s0]
        if not toks:
            bad[c0] = "covers no token"
        elif any(c.isalnum() for c in prompt[spans[toks[0]][0]:s0] + prompt[s1:spans[toks[-1]][1]]):
            bad[c0] = f"starts or ends inside the token(s) {prompt[spans[toks[0]][0]:spans[toks[-1]][1]]!r}"
        elif _word_around(prompt, s0, s1) != (s0, s1):
            w0, w1 = _word_around(prompt, s0, s1)
            bad[c0] = f"is part of the word {prompt[w0:w1]!r}"
        else:
            found.append((c0, toks[0], toks[-1] + 1))
        c0 = prompt.find(subject, c0 + 1)
    return found, bad, enc["input_ids"]


def subject_token_range(tok, prompt: str, subject: str, occurrence: int = 0,
                        char_start: int | None = None) -> tuple[int, int]:
    """Token range [start, end) of ``subject`` inside the tokenised ``prompt``.

    Found from character offsets, so a subject whose words are split into several tokens is
    covered by all of them. A mention counts only where it starts and ends on token boundaries
    and not inside a word ("Lars" is not in "Larsen lives in"); as in ROME, a token that also holds
    punctuation next to the subject (sentencepiece's "ds," in "Marshall Islands, the") belongs to it.
    ``occurrence`` picks among those mentions (0 = first, -1 = last), ``char_start`` picks the one
    starting at that character.
    Raises ValueError, naming subject and prompt, if there is no such mention or the subject
    contains a word the tokenizer does not know.
    """
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"empty subject {subject!r}")
    found, bad, ids = _mentions(tok, prompt, subject)
    if not found and not bad:
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
    if char_start is not None:
        hit = [m for m in found if m[0] == char_start]
        if not hit:
            why = bad.get(char_start, "does not occur there")
            raise ValueError(f"subject {subject!r} at character {char_start} of prompt {prompt!r} {why}; "
                             f"the subject must start and end on token boundaries")
        m = hit[0]
    elif not found:
        why = "; ".join(dict.fromkeys(bad.values()))
        raise ValueError(f"subject {subject!r} occurs in prompt {prompt!r} only where it {why}; the subject "
                         f"must start and end on token boundaries, as whole words")
    else:
        try:
            m = found[occurrence]
        except IndexError:
            raise ValueError(f"subject {subject!r} occurs {len(found)} time(s) in {prompt!r}; "
                             f"occurrence={occurrence} does not exist") from None
    _, t0, t1 = m
    check_known(tok, ids[t0:t1], subject.strip(), "subject")
    return t0, t1
