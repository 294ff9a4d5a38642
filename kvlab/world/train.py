"""Train the world model: a small GPT-2 on the world's sentences (nanoGPT-style loop).

Speed on a CPU comes from: a small model (6 layers, d=128), short packed rows (block 64,
sentences packed whole, no attention mask needed), big batches, a high learning rate with
warmup + cosine decay, and ``torch.set_num_threads``. The whole token stream is built and
tokenised up front, so the loop only does forward/backward/step.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from .generator import World
from .tokenizer import EOT


@dataclass
class TrainConfig:
    """Model shape and optimisation settings (defaults: the shipped model)."""

    n_layer: int = 6
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 512          # d_ff = 4 * d
    n_positions: int = 64
    dropout: float = 0.0
    steps: int = 3000
    batch: int = 24             # rows per step
    block: int = 64             # tokens per row
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 40
    weight_decay: float = 0.0
    filler: float = 0.1         # fraction of filler sentences
    profiles: int = 1           # profile lines per person per pass over the facts
    place_repeat: int = 10      # each city/country fact this many times per pass (they are few)
    mlp0_off: bool = True       # layer 0's MLP output fixed at zero (see make_model)
    world_version: int = 2      # build_world(seed, version=...) and world_tokenizer(version)
    object_weight: float = 5.0  # loss weight of the answer token in fact sentences
    seed: int = 0
    threads: int = 1            # 1 is faster than 2 on a busy 2-core machine (2 threads: 10 s/step there)


QUICK = dict(n_layer=2, n_embd=32, n_head=2, n_inner=128, steps=30, batch=16, block=32, warmup=5)
# The first shipped model (world 1, a working layer-0 FFN, 2,200 steps): ``train --world 1``.
V1 = dict(world_version=1, place_repeat=1, mlp0_off=False, steps=2200)


def make_model(cfg: TrainConfig, vocab_size: int, eot_id: int = 0):
    """A fresh ``GPT2LMHeadModel`` with tied embeddings.

    With ``cfg.mlp0_off`` layer 0's MLP output projection (weight and bias) is zero and frozen, so
    that MLP adds nothing: a standard GPT-2 whose first FFN is empty. Trained with it, a 6-layer
    model on this world looks a person up with the FFNs of layers 0-1 of *the attention-mixed*
    name (as GPT-2 XL does in its early-middle layers) instead of turning the noised name token
    back into the person in layer 0's FFN, an "extended embedding" that carried most of the
    subject-side effect in world v1 (see data/world/README.md).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner,
                        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
                        tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    if cfg.mlp0_off:
        mlp = model.transformer.h[0].mlp
        with torch.no_grad():
            mlp.c_proj.weight.zero_()
            mlp.c_proj.bias.zero_()
        for p in mlp.parameters():
            p.requires_grad_(False)
    return model


def pack(token_lists: list[list[int]], weight_lists: list[list[float]], block: int,
         pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack whole sentences into rows of ``block`` tokens; pad the tail (weight 0).

    Returns ``ids`` (rows, block) and per-token loss ``weights`` (rows, block).
    """
    rows, wrows, row, wrow = [], [], [], []
    for ids, ws in zip(token_lists, weight_lists):
        ids, ws = ids[:block], ws[:block]
        if len(row) + len(ids) > block:
            rows.append(row + [pad_id] * (block - len(row)))
            wrows.append(wrow + [0.0] * (block - len(wrow)))
            row, wrow = [], []
        row, wrow = row + ids, wrow + ws
    if row:
        rows.append(row + [pad_id] * (block - len(row)))
        wrows.append(wrow + [0.0] * (block - len(wrow)))
    return torch.tensor(rows), torch.tensor(wrows)                       # (rows, block) x2


def build_stream(world: World, tok, cfg: TrainConfig, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_rows`` packed training rows (ids, loss weights) from the world's corpus (facts + filler).

    Object tokens of fact sentences and profile lines get loss weight ``cfg.object_weight``
    (faster memorisation).
    """
    per_row = max(1, cfg.block // 10)                 # ~10 tokens per sentence
    n_sent = int(n_rows * per_row * 1.15) + 64
    while True:
        sents = list(world.corpus(n=n_sent, seed=cfg.seed, filler=cfg.filler, profiles=cfg.profiles,
                                  place_repeat=cfg.place_repeat))
        enc = tok([s.text for s in sents], add_special_tokens=False)["input_ids"]
        weights = []
        for s, ids in zip(sents, enc):
            w = [1.0] * len(ids)
            if s.kind == "fact":          # the object is the token before the final "."
                w[-2] = cfg.object_weight
            elif s.kind == "profile":     # the objects are the tokens after the name
                n_obj = len(s.objects)
                w[-1 - n_obj:-1] = [cfg.object_weight] * n_obj
            weights.append(w)
        ids, labels = pack(enc, weights, cfg.block, tok.convert_tokens_to_ids(EOT))
        if len(ids) >= n_rows:
            return ids[:n_rows], labels[:n_rows]
        n_sent = int(n_sent * 1.3)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def train(world: World, tok, cfg: TrainConfig, progress: bool = True, log_every: int = 50,
          eval_fn=None, eval_every: int = 0) -> tuple:
    """Train a fresh model. Returns ``(model, stats)``; stats has losses, seconds, tokens/s."""
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    model = make_model(cfg, len(tok), tok.convert_tokens_to_ids(EOT))
    g = torch.Generator().manual_seed(cfg.seed)
    ids, labels = build_stream(world, tok, cfg, cfg.steps * cfg.batch)   # (steps*batch, block)
    perm = torch.randperm(len(ids), generator=g)
    ids, labels = ids[perm], labels[perm]
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    losses, n_tok = [], 0
    t0 = time.time()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="train")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x = ids[step * cfg.batch:(step + 1) * cfg.batch]                   # (batch, block)
        y = labels[step * cfg.batch:(step + 1) * cfg.batch]                # (batch, block) loss weights
        logits = model(input_ids=x).logits                                 # (batch, block, vocab)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:],
                                                reduction="none")           # (batch, block-1)
        wt = y[:, 1:]                                                       # (batch, block-1)
        loss = (nll * wt).sum() / wt.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        n_tok += int((y > 0).sum())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{n_tok / (time.time() - t0):.0f}")
        if not progress and log_every and step % log_every == 0:
            print(f"step {step} loss {loss.item():.3f} tok/s {n_tok / (time.time() - t0):.0f}", flush=True)
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
            model.eval()
            print(f"step {step + 1}: {eval_fn(model)}", flush=True)
            model.train()
    seconds = time.time() - t0
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)                 # the returned model is a plain GPT-2 (editors set their own)
    stats = {"losses": losses, "seconds": seconds, "tokens": n_tok, "tokens_per_s": n_tok / seconds,
             "config": asdict(cfg)}
    return model, stats


@torch.no_grad()
def predict_next(model, tok, prompts: list[str], batch: int = 512) -> list[int]:
    """Greedy next-token id after each prompt (prompts grouped by length, no padding)."""
    enc = tok(prompts, add_special_tokens=False)["input_ids"]
    out = [0] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(enc):
        by_len.setdefault(len(ids), []).append(i)
    for _, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch):
            chunk = idx[s:s + batch]
            x = torch.tensor([enc[i] for i in chunk])                      # (b, seq)
            logits = model(input_ids=x).logits[:, -1]                       # (b, vocab)
            for i, t in zip(chunk, logits.argmax(-1).tolist()):
                out[i] = t
    return out


def recall(model, tok, prompts: list[tuple[str, str, str, str]]) -> dict:
    """Fraction of (prompt, subject, relation_id, object) whose greedy next token is the object.

    Returns {"recall": float, "n": int, "by_relation": {rid: float}, "predictions": [token str]}.
    """
    pred = predict_next(model, tok, [p[0] for p in prompts])
    gold = [tok.convert_tokens_to_ids("▁" + p[3]) for p in prompts]
    hits = [a == b for a, b in zip(pred, gold)]
    by_rel: dict[str, list[bool]] = {}
    for p, h in zip(prompts, hits):
        by_rel.setdefault(p[2], []).append(h)
    return {"recall": sum(hits) / max(1, len(hits)), "n": len(hits),
            "by_relation": {r: sum(v) / len(v) for r, v in by_rel.items()},
            "predictions": tok.convert_ids_to_tokens(pred)}
