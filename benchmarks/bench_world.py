"""Measure a world model against issue 14's targets (recall, tracing, ROME / FT / MEMIT at the paper's budget).

    PYTHONPATH=. python benchmarks/bench_world.py                     # the shipped model, data/world
    PYTHONPATH=. python benchmarks/bench_world.py --dir /tmp/run      # a model trained with --out /tmp/run
    PYTHONPATH=. python benchmarks/bench_world.py --only tracing,rome --edits 100

Prints one JSON line per part (and writes them all to ``--json``). Everything is measured with the
package's own functions, as the notebooks call them. KN amplification and Geva's value agreement,
composition share and token removal come from the course run (notebooks 02, 03, 04); "kn" measures
knowledge-neuron amplification (×2) on the prompts whose answer has p < 0.5 (issue 14's target).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

PARTS = ("recall", "tracing", "rome", "stress", "kn")


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, tok


def part_recall(model, tok, world) -> dict:
    from kvlab.world.train import recall
    out = {}
    for split in ("train", "heldout"):
        r = recall(model, tok, world.fact_prompts(split))
        out[split] = round(100 * r["recall"], 1)
        out[f"{split}_by_relation"] = {k: round(100 * v, 1) for k, v in r["by_relation"].items()}
    return out


def part_tracing(model, tok, known, n: int, window: int | None) -> dict:
    from kvlab import tracing
    L = model.config.n_layer
    window = window or max(1, math.ceil(L * 10 / 48))
    subset = known[:n]
    nu = 3 * tracing.noise_level(model, tok, subset, factor=1.0)
    avg = tracing.average_effects(model, tok, subset, noise=nu, samples=10, window=window, seed=0, progress=False)
    out = {"n": avg.n_facts, "window": window, "ate": round(avg.total_effect, 4), "clean_p": round(avg.high_score, 4)}
    for kind in tracing.KINDS:
        for row in ("first subject token", "last subject token", "last token"):
            v, _, layer = avg.peak(kind, row=row)
            out[f"{kind}|{row}"] = (round(v, 4), layer)
        v, row, layer = avg.peak(kind)
        out[f"{kind}|peak"] = (round(v, 4), row, layer)
    first, last = out["mlp|first subject token"][0], out["mlp|last subject token"][0]
    out["mlp_last_over_first"] = round(last / max(first, 1e-9), 2)
    return out


def part_rome(model, tok, records, layer: int, n: int, v_steps: int, v_lr: float) -> dict:
    from kvlab.editing import apply_rome, context_templates, evaluate, evaluate_edits, ft_values, key_covariance
    templates = context_templates(model, tok, n=10)
    C = key_covariance(model, tok, layer, n=2000, progress=False)
    recs = records[:n]
    out = {"layer": layer, "n": len(recs), "v_steps": v_steps, "v_lr": v_lr}
    out["unedited"] = {k: round(v, 1) for k, v in evaluate(model, tok, recs).items() if k in ("S", "ES", "PS", "NS")}
    t = time.time()
    r = evaluate_edits(model, tok, recs, apply_rome, progress=False, layer=layer, cov=C, templates=templates,
                       v_steps=v_steps, v_lr=v_lr)
    out["rome"] = {k: round(r[k], 1) for k in ("S", "ES", "PS", "NS")} | {"seconds": round(time.time() - t)}
    r = evaluate_edits(model, tok, recs, ft_values, progress=False, layers=[layer], steps=25, lr=5e-4)
    out["ft_values_25x5e-4"] = {k: round(r[k], 1) for k in ("S", "ES", "PS", "NS")}
    return out


def part_stress(model, tok, counterfact, known, layer: int, layers: tuple, counts: list[int], v_steps: int,
                v_lr: float) -> dict:
    from kvlab.editing import context_templates, key_covariance
    from kvlab.editing.memit import MEMITConfig, default_lambda
    from kvlab.editing.stress import pick_records, stress_memit, stress_sequential_rome, unedited_points
    records, unrelated = pick_records(model, tok, counterfact, known, n=max(counts))
    templates = context_templates(model, tok, 5)
    covs = {l: key_covariance(model, tok, l, n=2000, progress=False) for l in set(layers) | {layer}}
    lam = default_lambda(model)
    cfg = MEMITConfig(v_steps=v_steps, v_lr=v_lr, n_templates=5)
    pts = unedited_points(model, tok, records, counts, unrelated)
    pts += stress_sequential_rome(model, tok, records, counts, unrelated, layer=layer, cov=covs[layer],
                                  templates=templates, progress=False, v_steps=v_steps, v_lr=v_lr)
    pts += stress_memit(model, tok, records, counts, unrelated, layers, lam, covs, templates, config=cfg,
                        progress=False)
    return {"layer": layer, "memit_layers": list(layers), "lambda": lam, "n_unrelated": len(unrelated),
            "points": [{"method": p.method, "n": p.n_edits, "S": round(p.S, 1), "ES": round(p.ES, 1),
                        "PS": round(p.PS, 1), "NS": round(p.NS, 1), "recall": round(p.recall, 1),
                        "drift": round(p.drift, 4)} for p in pts]}


def part_kn(model, tok, world, n: int, seed: int = 0) -> dict:
    """Knowledge neurons of ``n`` known facts (round-robin over relations; prompts: two training phrasings
    and every held-out paraphrase, as notebook 06), amplified ×2: the mean relative change of p(answer)
    on the prompts whose p(answer) is below 0.5, and on all prompts."""
    import random
    from kvlab import neurons as N
    from kvlab.data import load_known
    by_rel = {}
    for k in load_known():
        by_rel.setdefault(k.relation_id, []).append(k)
    rng = random.Random(seed)
    for v in by_rel.values():
        rng.shuffle(v)
    facts, i = [], 0
    while len(facts) < n and any(i < len(v) for v in by_rel.values()):
        facts += [by_rel[r][i] for r in sorted(by_rel) if i < len(by_rel[r])][: n - len(facts)]
        i += 1
    low, every = [], []
    for k in facts:
        rel = world.relations[k.relation_id]
        prompts = [t.format(k.subject) for t in rel.train[:2] + rel.heldout]
        found = N.find_knowledge_neurons(model, tok, prompts, k.attribute)
        if not found.neurons:
            continue
        p = N.answer_prob(model, tok, prompts, k.attribute)                       # (n_prompts,)
        e = N.intervention_effect(model, tok, found.neurons, prompts, k.attribute, 2.0)
        every += e.tolist()
        low += e[p < 0.5].tolist()
    mean = lambda xs: round(100 * sum(xs) / len(xs), 1) if xs else None          # noqa: E731
    return {"facts": len(facts), "prompts": len(every), "prompts_p_below_half": len(low),
            "amplify_p_below_half_pct": mean(low), "amplify_all_pct": mean(every)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None, help="folder with model/, known_facts.json, counterfact.json")
    ap.add_argument("--only", default=",".join(PARTS))
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--facts", type=int, default=100, help="facts traced")
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--layer", type=int, default=None, help="ROME layer (default: MLP peak at the last subject token)")
    ap.add_argument("--memit-layers", default=None, help="e.g. 1,2,3 (default: layer-1..layer+1, clipped)")
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--kn-facts", type=int, default=200, help="facts for the knowledge-neuron part")
    ap.add_argument("--counts", default="40,200")
    ap.add_argument("--v-steps", type=int, default=20)
    ap.add_argument("--v-lr", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from kvlab.data import load_counterfact, load_known
    from kvlab.world import WORLD_DIR, build_world
    torch.set_num_threads(a.threads)
    d = a.dir or WORLD_DIR
    model, tok = load(d / "model")
    stats = d / "model" / "train_stats.json"           # the world version the model was trained on
    version = json.loads(stats.read_text())["config"].get("world_version", 1) if stats.exists() else 1
    world = build_world(a.seed, version=version)
    known = load_known(str(d / "known_facts.json"))
    cf = load_counterfact(str(d / "counterfact.json"))
    parts = a.only.split(",")
    results = {}

    def emit(name, fn):
        t = time.time()
        results[name] = fn() | {"bench_seconds": round(time.time() - t)}
        print(json.dumps({name: results[name]}), flush=True)
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))

    if "recall" in parts:
        emit("recall", lambda: part_recall(model, tok, world))
    if "tracing" in parts:
        emit("tracing", lambda: part_tracing(model, tok, known, a.facts, a.window))
    layer = a.layer
    if layer is None:
        layer = results["tracing"]["mlp|last subject token"][1] if "tracing" in results else 1
    L = model.config.n_layer
    layers = tuple(int(x) for x in a.memit_layers.split(",")) if a.memit_layers else \
        tuple(range(max(0, layer - 1), min(L, layer + 2)))
    if "rome" in parts:
        emit("rome", lambda: part_rome(model, tok, cf, layer, a.edits, a.v_steps, a.v_lr))
    if "kn" in parts:
        emit("kn", lambda: part_kn(model, tok, world, a.kn_facts, a.seed))
    if "stress" in parts:
        counts = [int(x) for x in a.counts.split(",")]
        emit("stress", lambda: part_stress(model, tok, cf, known, layer, layers, counts, a.v_steps, a.v_lr))


if __name__ == "__main__":
    main()
