"""Time per edit: ROME (key covariance C cached) vs fine-tuning the FFN keys / values.

    python benchmarks/bench_editing.py            # built-in model, 20 edits per method
    python benchmarks/bench_editing.py --quick    # 5 edits per method
    python benchmarks/bench_editing.py --model gpt2-medium --layer 8

Prints the mean wall time per edit of each method and the ratios ROME / FT, measured in one
run. C is computed (and cached on disk) before timing, as in ROME where it is precomputed once
per model and layer. Every edit is undone before the next one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import kvlab  # noqa: E402
from kvlab.editing import EditRequest, apply_rome, context_templates, default_layer, finetune_edit  # noqa: E402
from kvlab.editing import key_covariance  # noqa: E402


def requests(n: int) -> list[EditRequest]:
    """The first ``n`` rewrites of the built-in CounterFact set."""
    from kvlab.data import load_counterfact
    return [EditRequest.from_counterfact(r) for r in load_counterfact()[:n]]


def time_edits(fn, model, tok, reqs, **kw) -> list[float]:
    out = []
    for r in reqs:
        t0 = time.perf_counter()
        try:
            edit = fn(model, tok, r, **kw)
        except ValueError:  # the model already answers the new target
            continue
        out.append(time.perf_counter() - t0)
        edit.undo()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="kvlab/world")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="5 edits per method")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = 5 if args.quick else args.edits

    model, tok, arch = kvlab.load(args.model)
    layer = default_layer(model) if args.layer is None else args.layer
    reqs = requests(n + 1)
    t0 = time.perf_counter()
    C = key_covariance(model, tok, layer)
    t_cov = time.perf_counter() - t0
    templates = context_templates(model, tok)
    # warm-up (first-call overheads: allocator, kernels)
    time_edits(apply_rome, model, tok, reqs[:1], layer=layer, cov=C, templates=templates)
    reqs = reqs[1:]

    times = {
        "ROME": time_edits(apply_rome, model, tok, reqs, layer=layer, cov=C, templates=templates),
        "FT-keys": time_edits(finetune_edit, model, tok, reqs, target="keys", layers=[layer]),
        "FT-values": time_edits(finetune_edit, model, tok, reqs, target="values", layers=[layer]),
    }
    print(f"model {args.model}, layer {layer}, {len(reqs)} edits per method, {args.threads} thread(s)")
    print(f"key covariance C (computed once, or loaded from the cache): {t_cov:.2f} s")
    for name, ts in times.items():
        print(f"{name:10s} {statistics.mean(ts) * 1000:8.1f} ms/edit  (median {statistics.median(ts) * 1000:.1f}, "
              f"n={len(ts)})")
    rome = statistics.mean(times["ROME"])
    for name in ("FT-keys", "FT-values"):
        print(f"ratio ROME / {name}: {rome / statistics.mean(times[name]):.2f}")
    print(f"ratio FT-keys / FT-values: {statistics.mean(times['FT-keys']) / statistics.mean(times['FT-values']):.2f}")


if __name__ == "__main__":
    main()
