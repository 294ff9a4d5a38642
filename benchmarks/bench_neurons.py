"""Integrated-gradient attribution time per fact: batched Riemann steps vs one step at a time.

    python benchmarks/bench_neurons.py [--quick] [--model kvlab/world] [--steps 20]

Both modes compute the same attribution (kvlab.neurons.attribute) of every FFN neuron of
every layer for each fact's prompt; "batched" packs the (layer, α) copies into passes of
``--batch`` rows (default: all of them, one forward + backward for the whole model),
"one step" runs one forward + backward per (layer, α). Prints the speed-up measured in
this run. Falls back to a tiny random GPT-2 when the built-in model is missing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def load(name: str):
    import kvlab
    from kvlab.loading import world_model_dir
    if name == "kvlab/world" and not (world_model_dir() / "config.json").exists():
        from kvlab.testing import tiny
        print(f"built-in model missing at {world_model_dir()}: using a tiny random gpt2 (6 layers, d_ff 512)")
        model, tok, arch = tiny("gpt2", n_layers=6, d=128, d_ff=512)
        return model, tok, arch, [("anna berg lives in", "paris"), ("tom lee plays the", "piano"),
                                  ("the capital of france is", "paris"), ("anna lee speaks", "french")]
    from kvlab.world import build_world
    model, tok, arch = kvlab.load(name, device="cpu")
    w = build_world(0)
    facts = [(w.relations[f.relation_id].train[0].format(f.subject), f.object) for f in w.facts[::97]]
    return model, tok, arch, facts


def time_per_fact(model, tok, facts, steps: int, batch_size: int) -> tuple[float, torch.Tensor]:
    from kvlab.neurons import attribute
    attribute(model, tok, *facts[0], steps=steps, batch_size=batch_size)          # warm-up
    t0 = time.perf_counter()
    scores = [attribute(model, tok, p, a, steps=steps, batch_size=batch_size).scores for p, a in facts]
    return (time.perf_counter() - t0) / len(facts), torch.stack(scores)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 facts instead of 8")
    ap.add_argument("--model", default="kvlab/world")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=0, help="rows per pass in batched mode (0: all layers at once)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok, arch, facts = load(args.model)
    facts = facts[: 2 if args.quick else 8]
    rows = args.batch or args.steps * arch.n_layers
    print(f"{arch}\n{len(facts)} facts, steps={args.steps}, {arch.n_layers} layers x {arch.d_ff} neurons, "
          f"torch threads=1")
    t_batched, s_batched = time_per_fact(model, tok, facts, args.steps, rows)
    t_single, s_single = time_per_fact(model, tok, facts, args.steps, 1)
    diff = (s_batched - s_single).abs().max().item()
    print(f"batched ({rows} rows/pass, {-(-args.steps * arch.n_layers // rows)} pass(es)/fact): "
          f"{t_batched * 1e3:8.1f} ms/fact")
    print(f"one step at a time ({args.steps * arch.n_layers} passes/fact):  {t_single * 1e3:8.1f} ms/fact")
    print(f"speed-up batched / one-step: {t_single / t_batched:.1f}x   (max |score difference| {diff:.1e})")


if __name__ == "__main__":
    main()
