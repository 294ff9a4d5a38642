"""CounterFact metrics as ROME defines them, token accuracy, fluency, and unrelated-fact recall.

For a rewrite (s, r, o_true → o_new), with p(o | prompt) = exp(−mean per-token NLL of o):

* ES  (efficacy)     = P[p(o_new) > p(o_true)] on the rewrite prompt
* PS  (paraphrase)   = P[p(o_new) > p(o_true)] on paraphrases of it
* NS  (specificity)  = P[p(o_true) > p(o_new)] on neighbourhood prompts (other subjects, same r, whose
                       true answer is o_true)
* S   (score)        = harmonic mean of ES, PS and NS

All ×100, averaged per record first, then over records (as ROME does). ``token_accuracy=True``
adds EasyEdit's variant (fraction of target tokens that are the argmax under teacher forcing,
of o_new on rewrite/paraphrase prompts and of o_true on neighbourhood prompts).
``fluency=True`` adds GE, ROME's generation entropy: the weighted mean of the 2-gram and
3-gram entropies (weights 2/3, 4/3, bits) of text generated from the generation prompts.

    evaluate(model, tok, records)                     # metrics of the model as it is
    evaluate_edits(model, tok, records, apply_rome)   # edit, evaluate, undo — one record at a time
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import time
from collections import Counter
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..arch import model_device
from ..text import check_length, encode, max_positions, pad_rows, prompt_ids, token_ids
from .base import EditRequest, WeightEdit, as_record


# ---------------------------------------------------------------------------------------------
# Target probabilities


@torch.no_grad()
def target_nll(model, tok, prompts: list[str], targets: list[str], batch_size: int = 64
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token NLL of each target after its prompt, and the fraction of its tokens that are argmax.

    Returns (nll, acc), both (n,). The target is appended as tokens (with a leading space),
    so tokenisation does not merge it with the prompt.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    nll, acc = torch.zeros(len(prompts)), torch.zeros(len(prompts))
    for i in range(0, len(prompts), batch_size):
        rows, pos, tgts = [], [], []
        for p, t in zip(prompts[i:i + batch_size], targets[i:i + batch_size]):
            pid, tid = prompt_ids(tok, p), token_ids(tok, t)
            rows.append(pid + tid[:-1])
            pos.append([len(pid) - 1 + j for j in range(len(tid))])
            tgts.append(tid)
        ids, mask = pad_rows(model, tok, rows)                              # (b, seq) x2
        logits = model(input_ids=ids, attention_mask=mask).logits           # (b, seq, vocab)
        for b in range(len(rows)):
            lp = logits[b, pos[b]].float().log_softmax(-1).cpu()   # (n_tgt, vocab)
            t = torch.tensor(tgts[b])
            nll[i + b] = -lp[torch.arange(len(t)), t].mean()
            acc[i + b] = (lp.argmax(-1) == t).float().mean()
    return nll, acc


def target_prob(model, tok, prompts: list[str], targets: list[str], batch_size: int = 64) -> torch.Tensor:
    """p(target | prompt) = exp(−mean per-token NLL), (n,)."""
    return torch.exp(-target_nll(model, tok, prompts, targets, batch_size)[0])


# ---------------------------------------------------------------------------------------------
# CounterFact


def harmonic_mean(*xs: float) -> float:
    """Harmonic mean (0 if any value is 0)."""
    return 0.0 if any(x <= 0 for x in xs) else len(xs) / sum(1.0 / x for x in xs)


def _record_prompts(record: dict) -> tuple[EditRequest, dict[str, list[str]]]:
    record = as_record(record)
    req = EditRequest.from_counterfact(record)
    if req.target_true is None:
        raise ValueError(f"CounterFact record {record.get('case_id')} has no target_true")
    groups = {"rewrite": [req.text], "paraphrase": list(record.get("paraphrase_prompts", [])),
              "neighborhood": list(record.get("neighborhood_prompts", []))}
    return req, groups


@torch.no_grad()
def record_scores(model, tok, records: list[dict], token_accuracy: bool = False, batch_size: int = 64
                  ) -> list[dict]:
    """Per-record ES/PS/NS (0–100, averaged over that record's prompts) plus magnitudes.

    ``*_mag`` are ROME's magnitude metrics: mean p(new) − p(true) (ES, PS) or p(true) − p(new) (NS).
    """
    prompts, targets, where = [], [], []  # where: (record, group, prompt_idx, which)
    parsed = [_record_prompts(r) for r in records]
    for ri, (req, groups) in enumerate(parsed):
        for g, ps in groups.items():
            for pi, p in enumerate(ps):
                for which, t in (("new", req.target_new), ("true", req.target_true)):
                    prompts.append(p)
                    targets.append(t)
                    where.append((ri, g, pi, which))
    nll, acc = target_nll(model, tok, prompts, targets, batch_size)
    table: dict = {}
    for (ri, g, pi, which), n, a in zip(where, nll.tolist(), acc.tolist()):
        table[(ri, g, pi, which)] = (n, a)
    out = []
    names = {"rewrite": "ES", "paraphrase": "PS", "neighborhood": "NS"}
    for ri, (req, groups) in enumerate(parsed):
        row = {"case_id": as_record(records[ri]).get("case_id", ri)}
        for g, ps in groups.items():
            if not ps:
                continue
            wins, mags, accs = [], [], []
            for pi in range(len(ps)):
                n_new, a_new = table[(ri, g, pi, "new")]
                n_true, a_true = table[(ri, g, pi, "true")]
                p_new, p_true = math.exp(-n_new), math.exp(-n_true)
                if g == "neighborhood":
                    wins.append(n_true < n_new)
                    mags.append(p_true - p_new)
                    accs.append(a_true)
                else:
                    wins.append(n_new < n_true)
                    mags.append(p_new - p_true)
                    accs.append(a_new)
            key = names[g]
            row[key] = 100.0 * sum(wins) / len(wins)
            row[key + "_mag"] = 100.0 * sum(mags) / len(mags)
            if token_accuracy:
                row[key + "_acc"] = 100.0 * sum(accs) / len(accs)
        out.append(row)
    return out


def summarize(rows: list[dict]) -> dict:
    """Average per-record scores over records; add S = harmonic mean of ES, PS, NS."""
    keys = dict.fromkeys(k for r in rows for k in r if k != "case_id")
    res = {k: sum(r[k] for r in rows if k in r) / max(1, sum(k in r for r in rows)) for k in keys}
    if all(k in res for k in ("ES", "PS", "NS")):
        res["S"] = harmonic_mean(res["ES"], res["PS"], res["NS"])
    res["n"] = len(rows)
    return res


def evaluate(model, tok, records: list[dict], token_accuracy: bool = False, fluency: bool = False,
             gen_length: int = 30, batch_size: int = 64) -> dict:
    """CounterFact metrics of the model as it is, averaged over ``records``: S, ES, PS, NS (×100) ..."""
    if not records:
        raise ValueError("evaluate: no records")
    res = summarize(record_scores(model, tok, records, token_accuracy, batch_size))
    if fluency:
        prompts = [p for r in records for p in as_record(r).get("generation_prompts", [])]
        if prompts:
            res["GE"] = n_gram_entropy(generate(model, tok, prompts, gen_length))
    return res


def editor_options(editor: Callable[..., WeightEdit]) -> set[str] | None:
    """The keyword options ``editor`` accepts after (model, tok, request).

    Its named parameters and, for kvlab's editors, what their ``**overrides`` / ``**kn_kw`` take
    (the config's fields, :func:`kvlab.neurons.knowledge_neurons`'s parameters). None when it takes
    other ``**kwargs``, which cannot be listed.
    """
    from ..neurons import knowledge_neurons
    from .finetune import FTConfig, finetune_edit, ft_keys, ft_values
    from .kn import kn_edit
    from .memit import MEMITConfig, apply_memit
    from .rome import ROMEConfig, apply_rome

    forwarded = {apply_rome: [ROMEConfig], apply_memit: [MEMITConfig], finetune_edit: [FTConfig],
                 ft_keys: [finetune_edit, FTConfig], ft_values: [finetune_edit, FTConfig],
                 kn_edit: [knowledge_neurons]}
    base = editor.func if isinstance(editor, functools.partial) else editor
    names: set[str] = set()
    for source in [editor] + forwarded.get(base, []):
        if dataclasses.is_dataclass(source):
            names |= {f.name for f in dataclasses.fields(source)}
            continue
        try:
            params = list(inspect.signature(source).parameters.values())
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD for p in params) and base not in forwarded:
            return None
        names |= {p.name for p in params[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names


def evaluate_edits(model, tok, records: list[dict], editor: Callable[..., WeightEdit], progress: bool = True,
                   token_accuracy: bool = False, **editor_kw) -> dict:
    """Apply ``editor(model, tok, request, **editor_kw)`` for each record, score that record, undo.

    Returns the averaged metrics plus ``records`` (the per-record scores they average), ``params`` (mean parameters the editor may change),
    ``seconds`` (mean wall time per edit) and ``skipped`` (requests the editor rejected with a
    ValueError, e.g. because the model already predicts the new target). An option the editor
    does not take raises before any edit; if every request is rejected, the error gives the reasons.
    """
    name = getattr(editor, "__name__", "edit")
    valid = editor_options(editor)
    unknown = sorted(set(editor_kw) - valid) if valid is not None else []
    if unknown:
        raise ValueError(f"evaluate_edits: unknown option(s) {', '.join(map(repr, unknown))} for {name}; "
                         f"valid options: {', '.join(sorted(valid))}")
    rows, secs, params, reasons = [], [], [], Counter()
    for rec in tqdm(records, desc=name, disable=not progress, leave=False):
        req = EditRequest.from_counterfact(rec)
        t0 = time.perf_counter()
        try:
            edit = editor(model, tok, req, **editor_kw)
        except ValueError as e:
            reasons[str(e)] += 1
            continue
        secs.append(time.perf_counter() - t0)
        try:
            rows.append(record_scores(model, tok, [rec], token_accuracy)[0])
        finally:
            edit.undo()
        params.append(edit.n_params)
    if not rows:
        why = "; ".join(f"{r} ({n}x)" for r, n in reasons.most_common(3))
        raise ValueError(f"evaluate_edits: every request was rejected by the editor: {why or 'no records'}")
    skipped = sum(reasons.values())
    res = summarize(rows)
    res.update(params=sum(params) / len(params), seconds=sum(secs) / len(secs), skipped=skipped)
    res["records"] = rows                 # per-record scores (ES/PS/NS ×100), for intervals over records
    return res


# ---------------------------------------------------------------------------------------------
# Fluency


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def n_gram_entropy_one(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """Weighted mean of the n-gram entropies (bits) of one text (ROME's fluency measure)."""
    words = _words(text)
    ents = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        ent = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        ents.append(w * ent)
    return sum(ents) / len(ents)


def n_gram_entropy(texts: list[str]) -> float:
    """Mean over texts of :func:`n_gram_entropy_one` (GE; ROME reports ~626 ×100 for GPT-2 XL's 100-token texts)."""
    if not texts:
        raise ValueError("n_gram_entropy: no texts")
    return sum(n_gram_entropy_one(t) for t in texts) / len(texts)


@torch.no_grad()
def generate(model, tok, prompts: list[str], length: int = 30, top_k: int = 5, seed: int = 0) -> list[str]:
    """Top-k sampled continuations (prompt included), ``length`` new tokens each."""
    dev = model_device(model)
    g = torch.Generator().manual_seed(seed)
    limit = max_positions(model)
    max_pos = limit[0] if limit else 10**9
    out = []
    for p in prompts:
        row = prompt_ids(tok, p)
        check_length(model, len(row), f"generation prompt {p!r}")
        ids = torch.tensor([row], device=dev)
        for _ in range(min(length, max_pos - ids.shape[1])):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float().cpu()
            top = logits.topk(top_k)
            nxt = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=g)]
            ids = torch.cat([ids, nxt.view(1, 1).to(dev)], dim=1)
        out.append(tok.decode(ids[0], skip_special_tokens=True))
    return out


# ---------------------------------------------------------------------------------------------
# Unrelated facts (known_1000 schema)


@torch.no_grad()
def known_correct(model, tok, known: list[dict], batch_size: int = 128) -> torch.Tensor:
    """(n,) bool: is the model's argmax next token the first token of each fact's attribute?"""
    if not known:
        raise ValueError("known_correct: no records")
    out = []
    for i in range(0, len(known), batch_size):
        chunk = known[i:i + batch_size]
        chunk = [as_record(r) for r in chunk]
        batch = encode(model, tok, [r["prompt"] for r in chunk])
        logits = model(**batch.inputs()).logits                     # (b, seq, vocab)
        pred = logits[torch.arange(len(chunk)), batch.last].argmax(-1).cpu()  # (b,)
        first = torch.tensor([token_ids(tok, r["attribute"])[0] for r in chunk])
        out.append(pred == first)
    return torch.cat(out)


def known_recall(model, tok, known: list[dict], batch_size: int = 128) -> float:
    """Recall (×100) of unrelated known facts: % whose first answer token is the model's argmax."""
    return 100.0 * float(known_correct(model, tok, known, batch_size).float().mean())
