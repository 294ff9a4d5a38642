"""LoRA on keys vs values vs attention: accuracy, trainable parameters and time, measured in one run.

    python benchmarks/bench_lora.py            # built-in model, 320 examples, 8 epochs, r=8
    python benchmarks/bench_lora.py --quick    # fewer examples and epochs
    python benchmarks/bench_lora.py --model /path/to/model --seeds 3

Prints per role the held-out exact-match accuracy (mean over seeds), trainable parameters and
training seconds, and the ratios keys/values and attention/values.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import kvlab
from kvlab import lora, lora_train
from kvlab.world import build_world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the built-in world model")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, arch = kvlab.load(a.model, device="cpu")
    n_train, n_test, epochs = (128, 64, 3) if a.quick else (320, 160, 8)
    train, test = lora_train.world_tasks(build_world(0), n_train, n_test, tasks=("question", "classify"))
    _, base_acc, _ = lora_train.evaluate(model, tok, test)
    print(f"{arch}\nuntuned held-out accuracy {base_acc:.1%}; {n_train} train / {n_test} test, {epochs} epochs, "
          f"r={a.rank}, {a.seeds} seed(s)")
    res = {}
    for role in ("keys", "values", "attention"):
        accs, secs = [], []
        for seed in range(a.seeds):
            pm = lora.wrap(model, role, r=a.rank, seed=seed)
            h = lora_train.train(pm, tok, train, test, lora_train.TrainConfig(
                epochs=epochs, lr=a.lr, seed=seed, progress=False))
            accs.append(h.eval_acc[-1])
            secs.append(h.seconds)
        res[role] = (statistics.mean(accs), statistics.mean(secs), h.trainable)
        print(f"{role:9s} acc {res[role][0]:6.1%}  params {h.trainable:8,d}  train {res[role][1]:6.2f} s  "
              f"per-task {h.task_acc[-1]}")
    v = res["values"]
    for role in ("keys", "attention"):
        r = res[role]
        print(f"{role}/values: accuracy x{r[0] / max(v[0], 1e-9):.2f}, time x{r[1] / v[1]:.2f}, "
              f"parameters x{r[2] / v[2]:.2f}")


if __name__ == "__main__":
    main()
