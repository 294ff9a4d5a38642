"""Trigger examples of FFN keys (Geva et al. 2021, §3): which prefixes make a memory fire?

For every prefix of every corpus sentence and every key k_i, the memory coefficient
m_i = f(x · k_i) is read at the prefix's last position; the top-k prefixes per key are
its *trigger examples*. In a causal model the coefficient at position t of a sentence
*is* the coefficient of the prefix ending at t, so one forward pass over a batch of
sentences scores all of their prefixes at once::

    index = mine_triggers(model, tok, texts, layers=[0, 3], k=50)
    index.triggers(3, key=17, n=5)          # [(prefix text, coefficient), ...]
    index.next_token(3, 17, 0)              # token id that followed the top trigger

Mining keeps a running top-k per key: after every batch the (k + batch_tokens)
candidates of all keys are merged with one ``torch.topk`` along the candidate axis, so
memory is O(k · d_ff) per layer whatever the corpus size.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .arch import adapter, check_tokenizer, model_device
from .hooks import capture, patch
from .text import ensure_pad


@dataclass
class TriggerIndex:
    """Top-k trigger prefixes per key for some layers, plus the tokenised corpus.

    Entry ``j`` (0 = strongest) of key ``i`` in layer ``l`` is the prefix
    ``token_ids[sentence[l][i, j]][: position[l][i, j] + 1]`` with coefficient
    ``values[l][i, j]``. If the corpus had fewer than ``k`` prefixes, missing entries have
    value ``-inf`` and sentence ``-1``.
    """

    layers: tuple[int, ...]
    k: int
    values: dict[int, torch.Tensor]      # layer -> (d_ff, k) coefficients, descending
    sentence: dict[int, torch.Tensor]    # layer -> (d_ff, k) sentence index (long)
    position: dict[int, torch.Tensor]    # layer -> (d_ff, k) position of the prefix's last token
    token_ids: list[list[int]]           # the tokenised corpus, one list per sentence
    texts: list[str]
    n_prefixes: int                      # prefixes scored (content tokens of the corpus)
    tok: object = field(repr=False, default=None)

    def _loc(self, layer: int, key: int, j: int) -> tuple[int, int]:
        if layer not in self.values:
            raise ValueError(f"layer {layer} was not mined; mined layers: {list(self.layers)}")
        d_ff = self.values[layer].shape[0]
        if not 0 <= key < d_ff:
            raise ValueError(f"key {key} out of range: layer {layer} has {d_ff} keys")
        if not 0 <= j < self.k:
            raise ValueError(f"trigger rank {j} out of range: k={self.k}")
        s = int(self.sentence[layer][key, j])
        if s < 0:
            raise ValueError(f"key {key} of layer {layer} has no trigger of rank {j} (corpus too small)")
        return s, int(self.position[layer][key, j])

    def prefix_ids(self, layer: int, key: int, j: int = 0) -> list[int]:
        """Token ids of the j-th trigger prefix of ``key`` (it ends at the triggering token)."""
        s, p = self._loc(layer, key, j)
        return self.token_ids[s][: p + 1]

    def prefix(self, layer: int, key: int, j: int = 0) -> str:
        """The j-th trigger prefix of ``key`` as text."""
        return self.tok.decode(self.prefix_ids(layer, key, j), skip_special_tokens=True)

    def last_token(self, layer: int, key: int, j: int = 0) -> int:
        """Id of the last token of the j-th trigger prefix."""
        s, p = self._loc(layer, key, j)
        return self.token_ids[s][p]

    def next_token(self, layer: int, key: int, j: int = 0) -> int | None:
        """Id of the token that followed the j-th trigger prefix in the corpus (None at sentence end)."""
        s, p = self._loc(layer, key, j)
        ids = self.token_ids[s]
        return ids[p + 1] if p + 1 < len(ids) else None

    def coefficient(self, layer: int, key: int, j: int = 0) -> float:
        self._loc(layer, key, j)
        return float(self.values[layer][key, j])

    def triggers(self, layer: int, key: int, n: int | None = None) -> list[tuple[str, float]]:
        """The top ``n`` (default k) trigger prefixes of ``key`` with their coefficients."""
        n = self.k if n is None else min(n, self.k)
        return [(self.prefix(layer, key, j), self.coefficient(layer, key, j))
                for j in range(n) if int(self.sentence[layer][key, j]) >= 0]


def tokenize_corpus(tok, texts: list[str], max_len: int | None = None) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's special tokens), cut to ``max_len``."""
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError("every text must be a non-empty string")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    ids = tok(list(texts))["input_ids"]
    if max_len is not None:
        ids = [x[:max_len] for x in ids]
    if any(len(x) == 0 for x in ids):
        raise ValueError("a text tokenised to zero tokens")
    return [list(x) for x in ids]


def pad_batch(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ``input_ids`` (B, T) and ``attention_mask`` (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids.to(device), mask.to(device)


def first_occurrences(ids: list[list[int]]) -> list[list[int]]:
    """1 where the prefix ``ids[s][:p+1]`` occurs for the first time in the corpus, else 0."""
    seen: set[int] = set()
    out = []
    for s in ids:
        h, row = 0, []
        for t in s:
            h = hash((h, t))
            row.append(int(h not in seen))
            seen.add(h)
        out.append(row)
    return out


def _layers(arch, layers) -> list[int]:
    if layers is None:
        return list(range(arch.n_layers))
    ls = [layers] if isinstance(layers, int) else list(layers)
    if not ls:
        raise ValueError("no layers given")
    return sorted({arch._check_layer(l) for l in ls})


def _special_ids(tok) -> torch.Tensor:
    return torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)


@torch.no_grad()
def mine_triggers(model, tok, texts: list[str], layers: int | list[int] | None = None, k: int = 50,
                  batch_size: int = 64, max_len: int | None = None, unique: bool = False,
                  progress: bool = False) -> TriggerIndex:
    """Stream ``texts`` through the model once; keep the top-``k`` trigger prefixes of every key.

    ``layers``: an int, a list, or None for all layers. Prefixes ending at a special token
    (e.g. Llama's BOS) are not scored. Sentences are batched by length to limit padding.
    ``unique=True`` scores each distinct prefix once (its first occurrence), so a key's
    triggers are not k copies of one frequent prefix; it keeps one hash per distinct
    prefix, so memory then grows with the corpus. Geva et al.: WikiText-103 training
    sentences, k = 50 (25 shown to annotators).
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    arch = adapter(model)
    check_tokenizer(model, tok)
    ensure_pad(tok)
    ls = _layers(arch, layers)
    ids = tokenize_corpus(tok, texts, max_len)
    device = model_device(model)
    T = max(len(x) for x in ids)
    special = _special_ids(tok).to(device)
    d_ff = arch.d_ff
    best_v = {l: torch.full((d_ff, k), float("-inf"), device=device) for l in ls}   # (d_ff, k)
    best_c = {l: torch.full((d_ff, k), -1, dtype=torch.long, device=device) for l in ls}  # (d_ff, k) codes
    first = first_occurrences(ids) if unique else None
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    body = getattr(model, "base_model", model)  # the LM head's logits are not needed
    n_prefixes = 0
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    with capture(model, {f"m{l}": arch.value_module(l) for l in ls}, what="input") as store:
        for chunk in tqdm(chunks, desc="mining triggers", disable=not progress):
            input_ids, mask = pad_batch([ids[i] for i in chunk], tok.pad_token_id, device)  # (B, Tb)
            body(input_ids=input_ids, attention_mask=mask)
            valid = mask.bool() & ~torch.isin(input_ids, special)                          # (B, Tb)
            if first is not None:
                valid &= pad_batch([first[i] for i in chunk], 0, device)[0].bool()
            sent = torch.tensor(chunk, device=device)[:, None]                             # (B, 1)
            codes = (sent * T + torch.arange(input_ids.shape[1], device=device))[valid]    # (N,)
            n = codes.numel()
            n_prefixes += n
            if n == 0:
                continue
            for l in ls:
                m = store[f"m{l}"][valid].T.float()                                      # (d_ff, N)
                cand_v = torch.cat([best_v[l], m], dim=1)                                 # (d_ff, k + N)
                best_v[l], top = cand_v.topk(k, dim=1)                                    # (d_ff, k)
                # Candidates < k are the kept ones, the others index this batch's codes.
                kept = best_c[l].gather(1, top.clamp(max=k - 1))                          # (d_ff, k)
                best_c[l] = torch.where(top < k, kept, codes[(top - k).clamp(min=0)])
    sentence = {l: torch.where(best_c[l] >= 0, best_c[l] // T, -1).cpu() for l in ls}
    position = {l: torch.where(best_c[l] >= 0, best_c[l] % T, -1).cpu() for l in ls}
    values = {l: best_v[l].cpu() for l in ls}
    return TriggerIndex(tuple(ls), k, values, sentence, position, ids, list(texts), n_prefixes, tok)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the last needed layer has run."""


@torch.no_grad()
def last_coefficients(model, tok, seqs: list[list[int]], layer: int, batch_size: int = 256) -> torch.Tensor:
    """Coefficients m at the last token of each token list, (len(seqs), d_ff).

    The forward pass stops at ``layer``'s value projection: later layers are never run.
    """
    arch = adapter(model)
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("need non-empty token lists")
    ensure_pad(tok)
    device = model_device(model)
    body = getattr(model, "base_model", model)
    store = {}

    def grab(m):  # m: (B, T, d_ff)
        store["m"] = m.detach()
        raise _StopForward

    out = []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))   # similar lengths: little padding
    with patch(arch.value_module(layer), grab, what="input"):
        for i in range(0, len(order), batch_size):
            chunk = [seqs[j] for j in order[i: i + batch_size]]
            input_ids, mask = pad_batch(chunk, tok.pad_token_id, device)
            try:
                body(input_ids=input_ids, attention_mask=mask)
            except _StopForward:
                pass
            last = mask.sum(1) - 1                                                       # (B,)
            out.append(store["m"][torch.arange(len(chunk), device=device), last].float().cpu())  # (B, d_ff)
    m = torch.empty(len(seqs), out[0].shape[1])
    m[torch.tensor(order)] = torch.cat(out)
    return m


def token_removal(model, tok, index: TriggerIndex, layer: int, keys: list[int] | None = None,
                  n_triggers: int = 50, seed: int = 0, batch_size: int = 256) -> dict:
    """Relative drop of a key's coefficient when one token is removed from its trigger prefixes.

    For each key and each of its top ``n_triggers`` prefixes with ≥ 2 content tokens, the
    prefix is re-run with its first, last or a uniformly random content token removed, and
    the key's coefficient at the (new) last position is compared with the intact prefix.
    The reported drop is ``Σ (m_full − m_removed) / Σ m_full`` over prefixes with
    ``m_full > 0`` (a ratio of sums: prefixes with a near-zero m_full cannot dominate it).
    Geva et al. (100 keys/layer, top-50): last ≈ 65–70% (layer 1) → ~20% (layer 16),
    first ≈ 10–15%, random ≈ 15–20%.

    Returns ``{"first", "last", "random"}`` -> drop in percent, ``"n"`` prefixes used, and
    ``"drops"`` -> {variant: (n,) tensor of per-prefix relative drops (m_full − m_removed) / m_full}.
    """
    if layer not in index.values:
        raise ValueError(f"layer {layer} was not mined; mined layers: {list(index.layers)}")
    d_ff = index.values[layer].shape[0]
    keys = list(range(d_ff)) if keys is None else [int(i) for i in keys]
    if not keys or any(not 0 <= i < d_ff for i in keys):
        raise ValueError(f"keys must be a non-empty list of indices in [0, {d_ff})")
    if n_triggers < 1:
        raise ValueError(f"n_triggers must be >= 1, got {n_triggers}")
    special = set(tok.all_special_ids)
    rng = random.Random(seed)
    seqs, owner = [], []   # 4 sequences per prefix: full, -first, -last, -random
    for key in keys:
        for j in range(min(n_triggers, index.k)):
            if int(index.sentence[layer][key, j]) < 0:
                break
            p = index.prefix_ids(layer, key, j)
            content = [t for t, x in enumerate(p) if x not in special]
            if len(content) < 2:
                continue
            r = rng.choice(content)
            drop = lambda t: p[:t] + p[t + 1:]  # noqa: E731
            seqs += [p, drop(content[0]), drop(content[-1]), drop(r)]
            owner.append(key)
    if not seqs:
        raise ValueError("no trigger prefix with at least two content tokens")
    m = last_coefficients(model, tok, seqs, layer, batch_size)                    # (4n, d_ff)
    key_idx = torch.tensor(owner).repeat_interleave(4)
    coef = m[torch.arange(len(seqs)), key_idx].view(-1, 4)                          # (n, 4)
    full = coef[:, 0]
    ok = full > 0
    drops = {name: ((full - coef[:, c]) / full)[ok] for c, name in ((1, "first"), (2, "last"), (3, "random"))}
    res = {name: 100 * float((full - coef[:, c])[ok].sum() / full[ok].sum())
           for c, name in ((1, "first"), (2, "last"), (3, "random"))}
    res["n"] = int(ok.sum())
    res["drops"] = drops
    return res


def classify_keys(index: TriggerIndex, layer: int, sentence_labels: list[set | tuple | list],
                  n: int = 10, share: float = 0.5) -> list[str]:
    """Label each key of ``layer`` as "shallow", "semantic" or "none" from its top-``n`` triggers.

    *shallow*: at least ``share`` of the top prefixes end with the same token.
    *semantic*: not shallow, but at least ``share`` of them come from sentences that share a
    label in ``sentence_labels[s]`` (e.g. the world's relation id or object of sentence s).
    """
    if layer not in index.values:
        raise ValueError(f"layer {layer} was not mined; mined layers: {list(index.layers)}")
    if len(sentence_labels) != len(index.token_ids):
        raise ValueError(f"sentence_labels has {len(sentence_labels)} entries, the corpus {len(index.token_ids)}")
    if not 0 < share <= 1 or n < 1:
        raise ValueError(f"need n >= 1 and 0 < share <= 1, got n={n}, share={share}")
    out = []
    for key in range(index.values[layer].shape[0]):
        js = [j for j in range(min(n, index.k)) if int(index.sentence[layer][key, j]) >= 0]
        if not js:
            out.append("none")
            continue
        need = share * len(js)
        last = [index.last_token(layer, key, j) for j in js]
        if max(last.count(t) for t in set(last)) >= need:
            out.append("shallow")
            continue
        counts: dict = {}
        for j in js:
            for lab in set(sentence_labels[int(index.sentence[layer][key, j])]):
                counts[lab] = counts.get(lab, 0) + 1
        out.append("semantic" if counts and max(counts.values()) >= need else "none")
    return out
