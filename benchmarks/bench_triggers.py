"""Trigger-mining throughput vs a plain forward pass over the same corpus.

    python benchmarks/bench_triggers.py            # built-in model, 4,000 sentences, all layers, k=50
    python benchmarks/bench_triggers.py --quick    # 800 sentences
    python benchmarks/bench_triggers.py --model gpt2 --device cuda --n 20000

All runs start from text (tokenisation included) and see the same batches (length-sorted,
right-padded, ``--batch-size`` sentences). Compared:

* forward, LM head: ``model(...)``, a normal forward pass (the baseline of the target);
* forward, no LM head: ``model.base_model(...)``;
* ``mine_triggers``: runs ``model.base_model`` (it needs no logits, so it skips the LM
  head, as a caller would) with the coefficient hooks and the running top-k merges.

Target: mining ≤ 1.3× the normal forward pass (LM head included); the ratio to the no-head
forward, printed too, is the cost of the hooks and merges alone. Each timing is the best
of ``--repeat`` rounds, interleaved (forward, no-head forward, mining, forward, ...) so that
a machine shared with other jobs slows all three alike. On CPU the process CPU time is
reported as well: it depends much less than wall-clock time on other jobs' load.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvlab  # noqa: E402
from kvlab import triggers  # noqa: E402
from kvlab.arch import model_device  # noqa: E402


def corpus(n: int) -> list[str]:
    """The world's training sentences (for any model: they are plain English-like text)."""
    from kvlab.world import corpus_texts
    return corpus_texts(n=n, seed=1)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def forward_pass(model, tok, texts: list[str], batch_size: int, lm_head: bool = True) -> None:
    """Plain forward over the corpus (tokenised here, like the miner does) with the miner's batches."""
    device = model_device(model)
    ids = triggers.tokenize_corpus(tok, texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    body = model if lm_head else getattr(model, "base_model", model)
    for i in range(0, len(order), batch_size):
        input_ids, mask = kvlab.text.pad_batch([ids[j] for j in order[i: i + batch_size]], tok.pad_token_id, device)
        body(input_ids=input_ids, attention_mask=mask)


def timed(fn, device) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of one call of ``fn``."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def best_of(fns: dict, repeat: int, device) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) seconds of each function over ``repeat`` rounds.

    The rounds are interleaved (a, b, c, a, b, c, ...), so that a machine shared with
    other jobs slows all the compared runs alike; on CPU the process CPU time is also
    reported, as it barely depends on the load of the other cores.
    """
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: (min(w for w, _ in ts), min(c for _, c in ts)) for name, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="kvlab/world")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=4000, help="corpus sentences")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="800 sentences, 2 repeats")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.repeat = 800, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    model, tok, arch = kvlab.load(a.model, device=a.device)
    device = model_device(model)
    texts = corpus(a.n)
    ids = triggers.tokenize_corpus(tok, texts)
    n_tokens = sum(len(x) for x in ids)
    layers = list(range(arch.n_layers))

    forward_pass(model, tok, texts[:256], a.batch_size)                    # warm-up
    triggers.mine_triggers(model, tok, texts[:256], layers, k=a.k, batch_size=a.batch_size)
    t = best_of({
        "fwd": lambda: forward_pass(model, tok, texts, a.batch_size),
        "body": lambda: forward_pass(model, tok, texts, a.batch_size, lm_head=False),
        "mine": lambda: triggers.mine_triggers(model, tok, texts, layers, k=a.k, batch_size=a.batch_size),
    }, a.repeat, device)

    print(f"model {a.model} ({arch}), device {device}, threads {a.threads}, best of {a.repeat} interleaved rounds")
    print(f"corpus: {len(texts)} sentences, {n_tokens} tokens; mining {len(layers)} layers x {arch.d_ff} keys, "
          f"k={a.k}, batch {a.batch_size}")
    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    for c, clock in enumerate(clocks):
        print(f"[{clock} time]")
        for name, label in (("fwd", "forward (tokenise + LM head)"), ("body", "forward (tokenise, no LM head)"),
                            ("mine", "mine_triggers (tokenise + all layers)")):
            print(f"  {label:38s} {t[name][c]:7.3f} s  {n_tokens / t[name][c]:10.0f} tokens/s")
        print(f"  ratio mining / LM forward       = {t['mine'][c] / t['fwd'][c]:.2f}x   (target <= 1.3x)")
        print(f"  ratio mining / no-head forward  = {t['mine'][c] / t['body'][c]:.2f}x")

if __name__ == "__main__":
    main()
