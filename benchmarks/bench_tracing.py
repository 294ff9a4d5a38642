"""Causal tracing: fast batched tracer vs the one-forward-per-cell reference, measured in one run.

    python benchmarks/bench_tracing.py            # built-in model + random GPT-2 of gpt2-medium shape
    python benchmarks/bench_tracing.py --quick    # fewer samples, built-in model + medium shape (hidden only)
    python benchmarks/bench_tracing.py --device cuda --shape xl   # gpt2-xl shape (48 layers, d=1600) on a GPU

Each row times the full (token × layer) grid of one kind for both methods, with the same noise,
and checks they agree (max |Δ| ≤ 1e-5). Times are process CPU seconds (robust when other jobs share
the machine; use --threads 1 for a fair single-core comparison); on CUDA, wall-clock seconds.
With --repeat r both methods run r times, interleaved, and the fastest run of each counts (the
least disturbed by other jobs; it also leaves out first-call warm-up). Default: 5 on the built-in
model (runs of a few hundredths of a second), 1 on the big random model (minutes).
The reference is ``reference_trace`` in ``tests/test_tracing.py``: one full forward pass (of
`samples` rows) per cell, with plain hooks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvlab import tracing  # noqa: E402
from kvlab.testing import tiny  # noqa: E402
from kvlab.text import subject_token_range  # noqa: E402
from test_tracing import reference_trace  # noqa: E402

SHAPES = {"medium": dict(d=1024, n_layers=24, d_ff=4096, heads=16),   # gpt2-medium
          "xl": dict(d=1600, n_layers=48, d_ff=6400, heads=25)}       # gpt2-xl


def clock(device) -> float:
    """CPU seconds of this process on CPU; synchronised wall-clock seconds on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def bench(name, model, tok, prompt, subject, kinds, samples, noise, window=10, repeat=1):
    device = next(model.parameters()).device
    b, e = subject_token_range(tok, prompt, subject)
    eps = tracing.sample_noise(samples, e - b, model.get_input_embeddings().weight.shape[1], seed=0).to(device)
    n = len(tok(prompt)["input_ids"])
    print(f"\n{name}: prompt {prompt!r} ({n} tokens), subject {subject!r}, samples={samples}, "
          f"window={window}, device={device}, fastest of {repeat} run(s)")
    print(f"{'kind':8s} {'cells':>6s} {'reference s':>12s} {'fast s':>8s} {'speed-up':>9s} {'max |Δ|':>9s}")
    tot_ref = tot_fast = 0.0
    for kind in kinds:
        t_fast = t_ref = float("inf")
        for _ in range(repeat):
            t0 = clock(device)
            fast = tracing.trace(model, tok, prompt, subject, kind=kind, noise=noise, samples=samples,
                                 window=window, eps=eps)
            t1 = clock(device)
            ref, *_ = reference_trace(model, tok, prompt, subject, kind, noise, eps, window)
            t2 = clock(device)
            t_fast, t_ref = min(t_fast, t1 - t0), min(t_ref, t2 - t1)
        diff = float((fast.scores - ref).abs().max())
        tot_fast += t_fast
        tot_ref += t_ref
        print(f"{kind:8s} {ref.numel():6d} {t_ref:12.3f} {t_fast:8.3f} {t_ref / t_fast:8.1f}x {diff:9.1e}")
        assert diff <= 1e-5 or device.type == "cuda", f"fast and reference disagree ({diff:.2e})"
    print(f"{'all':8s} {'':6s} {tot_ref:12.3f} {tot_fast:8.3f} {tot_ref / tot_fast:8.1f}x")
    return tot_ref / tot_fast


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples and kinds (CI smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium", help="random GPT-2 shape")
    ap.add_argument("--samples", type=int, default=None, help="noise samples (default 10, --quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per method, the fastest counts (default 5 built-in model, 1 big model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    samples = args.samples or (3 if args.quick else 10)
    ratios = {}

    # 1. the built-in model, on a known fact
    try:
        import kvlab
        from kvlab.data import load_known
        model, tok, _ = kvlab.load(device=device)
        fact = load_known()[0]
        ratios["built-in"] = bench("built-in model", model, tok, fact.prompt, fact.subject,
                                   tracing.KINDS, samples, noise=tracing.noise_level(model, tok, [fact]),
                                   repeat=args.repeat or 5)
    except (OSError, ImportError, FileNotFoundError) as e:
        print(f"\nbuilt-in model not available ({type(e).__name__}: {e}); skipped")

    # 2. a random-init GPT-2 of gpt2-medium (or gpt2-xl) shape, word-level tokenizer
    shape = SHAPES[args.shape]
    model, tok, _ = tiny("gpt2", positions=128, **shape)
    with torch.no_grad():   # GPT-2's own init scale keeps activations sane
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    model.to(device)
    big_samples = args.samples or (1 if args.quick else 3)
    kinds = ("hidden",) if args.quick else tracing.KINDS
    ratios[f"gpt2-{args.shape} shape"] = bench(
        f"random GPT-2, gpt2-{args.shape} shape {shape} (samples reduced to {big_samples} to keep the "
        f"reference short)", model, tok, "anna berg lives in", "anna berg", kinds, big_samples, noise=0.1,
        repeat=args.repeat or 1)
    print("\nspeed-up (reference time / fast time, all kinds): " +
          ", ".join(f"{k}: {v:.1f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
