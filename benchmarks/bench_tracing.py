"""Causal tracing: kvlab's tracer vs ROME's procedure, and vs a floor, measured in one run.

    python benchmarks/bench_tracing.py              # built-in model + random GPT-2 of gpt2-medium shape
    python benchmarks/bench_tracing.py --quick      # fewer samples and repeats (CI smoke run)
    python benchmarks/bench_tracing.py --only built-in

The baseline re-implements ROME's ``calculate_hidden_flow`` (kmeng01/rome, experiments/causal_trace.py)
from its source: a batch of 1 + samples copies of the prompt (row 0 clean, the others with noise added
to the subject's token embeddings), a forward pass to read the prediction and one for the corrupted
score, then for every (token, layer) cell one forward pass of the whole batch through the whole model
in which the cell's states (the block output; for "mlp"/"attn" the module outputs of the window of
layers [l − w//2, l + ⌈w/2⌉)) of rows 1.. at the token are set to row 0's, and the score is the mean
over rows 1.. of p(answer) at the last position. Same noise for both methods, so the scores agree
(checked: max |Δ| ≤ 1e-5).

The floor: for every cell that can differ from the corrupted run (token ≥ the subject's first), one
batched forward pass of the cell's suffix alone: the samples rows, positions [token, n), through the
blocks from the first one the restoration changes to the last (through kvlab's BlockRunner, earlier
positions' keys/values cached), then the last position's logits. It is the work of each cell done once
and separately: the tracer can go below it where cells share rows (overlapping windows) or block calls.

Times are process CPU seconds with one torch thread; the methods alternate within each repeat and the
fastest repeat of each counts. Windows 2 (notebook 05's setting on the built-in model) and 10 (ROME's).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvlab import tracing  # noqa: E402
from kvlab.arch import adapter  # noqa: E402
from kvlab.hooks import patch  # noqa: E402
from kvlab.text import encode, subject_token_range  # noqa: E402

SHAPES = {"medium": dict(d=1024, n_layers=24, d_ff=4096, heads=16),   # gpt2-medium
          "xl": dict(d=1600, n_layers=48, d_ff=6400, heads=25)}       # gpt2-xl


def clock() -> float:
    return time.process_time()


@torch.no_grad()
def rome_trace(model, tok, prompt, subject, kind, noise, eps, window):
    """ROME's calculate_hidden_flow (see the module docstring): (scores (n, L), low, high)."""
    arch = adapter(model)
    enc = encode(model, tok, prompt)
    S, L = eps.shape[0], arch.n_layers
    inp = {"input_ids": enc.input_ids.repeat(S + 1, 1), "attention_mask": enc.attention_mask.repeat(S + 1, 1)}
    b, e = subject_token_range(tok, prompt, subject)
    n = enc.input_ids.shape[1]
    module = {"hidden": arch.layer, "mlp": arch.mlp, "attn": arch.attn}[kind]

    def corrupt(x):                                       # rows 1..: noise on the subject's embeddings
        x = x.clone()
        x[1:, b:e] += noise * eps.to(x.dtype)
        return x

    def restore(t):
        def fn(h):                                        # rows 1.. get row 0's state at token t
            h = h.clone()
            h[1:, t] = h[0, t]
            return h
        return fn

    def trace_with_patch(states):
        with patch(arch.embed, corrupt), patch({module(l): restore(t) for t, l in states}):
            probs = torch.softmax(model(**inp).logits[1:, -1], dim=-1).mean(0)
        return float(probs[answer])

    logits = model(**inp).logits[0, -1]                   # predict_from_input
    answer = int(logits.argmax())
    high = float(logits.softmax(-1)[answer])
    low = trace_with_patch([])
    scores = torch.zeros(n, L)
    for t in range(n):
        for l in range(L):
            layers = [l] if kind == "hidden" else tracing.window_layers(l, window, L)
            scores[t, l] = trace_with_patch([(t, j) for j in layers])
    return scores, low, high


@torch.no_grad()
def floor(tr: tracing.Tracer, kind: str, window: int) -> None:
    """One batched forward pass per cell's suffix (see the module docstring); returns nothing, to be timed."""
    L, n, b = tr.arch.n_layers, tr.n, tr.subject_range[0]
    runner = tr.runner
    for t in range(b, n):
        for l in range(L):
            first = l + 1 if kind == "hidden" else tracing.window_layers(l, window, L)[0]
            h = tr.corrupted[first][:, t:]                # (samples, n - t, d)
            for k in range(first, L):
                h = runner.run(k, h, t)
            tr.arch.unembed(tr.arch.final_norm(h[:, -1])).softmax(-1)


def token_blocks(model, tok, prompt, subject, kind, noise, eps, window):
    """Arithmetic of both methods, in tokens through one block: (ROME's procedure, kvlab's tracer).

    ROME's runs 1 + samples rows of all n positions through all L blocks, once for the prediction,
    once for the corrupted score and once per cell. The tracer's is counted from its block calls
    (rows x positions per call; a last-block call that stops after the keys/values counts whole)."""
    S, L = eps.shape[0], adapter(model).n_layers
    n = encode(model, tok, prompt).input_ids.shape[1]
    rome = (n * L + 2) * (S + 1) * n * L
    count = [0]
    run, run_at = tracing.BlockRunner.run, tracing.BlockRunner.run_at

    def counted(fn):
        def wrapper(self, l, h, *args, **kwargs):
            count[0] += h.shape[0] * h.shape[1]
            return fn(self, l, h, *args, **kwargs)
        return wrapper
    tracing.BlockRunner.run, tracing.BlockRunner.run_at = counted(run), counted(run_at)
    try:
        tracing.trace(model, tok, prompt, subject, kind=kind, noise=noise, samples=S, window=window, eps=eps)
    finally:
        tracing.BlockRunner.run, tracing.BlockRunner.run_at = run, run_at
    return rome, count[0] + (S + 1) * n * L          # + the tracer's clean/corrupted pass


def bench(name, model, tok, prompt, subject, samples, noise, windows=(2, 10), repeat=1):
    device = next(model.parameters()).device
    d = model.get_input_embeddings().weight.shape[1]
    b, e = subject_token_range(tok, prompt, subject)
    eps = tracing.sample_noise(samples, e - b, d, seed=0).to(device)
    n = encode(model, tok, prompt).input_ids.shape[1]
    print(f"\n{name}: prompt {prompt!r} ({n} tokens), subject {subject!r}, samples={samples}, "
          f"fastest of {repeat} interleaved run(s)")
    print(f"{'kind':8s} {'window':>6s} {'ROME s':>9s} {'kvlab s':>9s} {'floor s':>9s} {'ROME/kvlab':>10s} "
          f"{'kvlab/floor':>11s} {'max |Δ|':>8s} {'arithmetic ROME/kvlab':>22s}")
    cases = [("hidden", 1)] + [(k, w) for w in windows for k in ("mlp", "attn")]
    arith = {c: token_blocks(model, tok, prompt, subject, c[0], noise, eps, c[1]) for c in cases}
    best = {c: [float("inf")] * 3 for c in cases}
    diffs = {}
    for r in range(repeat):
        for i, (kind, w) in enumerate(cases):
            order = (0, 1, 2) if (r + i) % 2 == 0 else (2, 1, 0)     # alternate the order
            for m in order:
                t0 = clock()
                if m == 0:
                    ref, low, high = rome_trace(model, tok, prompt, subject, kind, noise, eps, w)
                elif m == 1:
                    fast = tracing.trace(model, tok, prompt, subject, kind=kind, noise=noise, samples=samples,
                                         window=w, eps=eps)
                else:
                    t_init = clock()
                    tr = tracing.Tracer(model, tok, prompt, subject, None, noise, samples, eps=eps)
                    t0 += clock() - t_init                # the floor leaves out the clean/corrupted pass
                    floor(tr, kind, w)
                best[(kind, w)][m] = min(best[(kind, w)][m], clock() - t0)
            diffs[(kind, w)] = float((fast.scores - ref).abs().max())
            assert diffs[(kind, w)] <= 1e-5, f"kvlab and ROME's procedure disagree ({diffs[(kind, w)]:.2e})"
    for (kind, w), (t_rome, t_fast, t_floor) in best.items():
        print(f"{kind:8s} {w if kind != 'hidden' else '-':>6} {t_rome:9.3f} {t_fast:9.3f} {t_floor:9.3f} "
              f"{t_rome / t_fast:9.1f}x {t_fast / t_floor:10.2f}x {diffs[(kind, w)]:8.1e} "
              f"{arith[(kind, w)][0] / arith[(kind, w)][1]:21.1f}x")
    out = {}
    for w in windows:
        tot = [sum(best[c][m] for c in (("hidden", 1), ("mlp", w), ("attn", w))) for m in range(3)]
        out[w] = (tot[0] / tot[1], tot[1] / tot[2])
        ops = [sum(arith[c][m] for c in (("hidden", 1), ("mlp", w), ("attn", w))) for m in range(2)]
        print(f"{'all':8s} {w:>6} {tot[0]:9.3f} {tot[1]:9.3f} {tot[2]:9.3f} {out[w][0]:9.1f}x {out[w][1]:10.2f}x "
              f"{'':8s} {ops[0] / ops[1]:21.1f}x")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples and repeats (CI smoke run)")
    ap.add_argument("--only", choices=("built-in", "big"), help="one model only")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium", help="random GPT-2 shape")
    ap.add_argument("--samples", type=int, default=None, help="noise samples (default 10, --quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved repeats (default 3 built-in, 1 big)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    samples = args.samples or (3 if args.quick else 10)
    ratios = {}

    if args.only != "big":
        try:
            import kvlab
            from kvlab.data import load_known
            model, tok, _ = kvlab.load(device=device)
            fact = load_known()[0]
            ratios["built-in"] = bench("built-in model", model, tok, fact.prompt, fact.subject, samples,
                                       noise=tracing.noise_level(model, tok, [fact]),
                                       repeat=args.repeat or (1 if args.quick else 3))
        except (OSError, ImportError, FileNotFoundError) as e:
            print(f"\nbuilt-in model not available ({type(e).__name__}: {e}); skipped")

    if args.only != "built-in":
        from transformers import AutoModelForCausalLM
        from kvlab.testing import tiny_config, tiny_tokenizer
        shape = SHAPES[args.shape]
        tok = tiny_tokenizer()        # word-level; the model keeps GPT-2's 50,257-token vocabulary
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("gpt2", 50257, positions=128, **shape))
        model.eval().requires_grad_(False)
        with torch.no_grad():   # GPT-2's own init scale keeps activations sane
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.02)
        model.to(device)
        big_samples = args.samples or (1 if args.quick else 3)
        ratios[f"gpt2-{args.shape} shape"] = bench(
            f"random GPT-2, gpt2-{args.shape} shape {shape} (samples {big_samples} to keep ROME's procedure short)",
            model, tok, "anna berg lives in", "anna berg", big_samples, noise=0.1, repeat=args.repeat or 1)
    print("\nspeed-up vs ROME's procedure (all kinds), and kvlab time / floor: " + "; ".join(
        f"{m}: " + ", ".join(f"window {w}: {a:.1f}x ({f:.2f}x floor)" for w, (a, f) in r.items())
        for m, r in ratios.items()))


if __name__ == "__main__":
    main()
