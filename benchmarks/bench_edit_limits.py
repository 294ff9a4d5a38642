"""Why ROME, FT and MEMIT miss issue 14's editing targets on a world model: the measurements.

    PYTHONPATH=. python benchmarks/bench_edit_limits.py                       # the shipped model, every part
    PYTHONPATH=. python benchmarks/bench_edit_limits.py --only budget --edits 50
    PYTHONPATH=. python benchmarks/bench_edit_limits.py --dir /tmp/run --only interference

Parts (one JSON line each; all at ``--layer``, ROME's GPT-2 XL settings unless a part varies them):

* ``interference``: ``--seq`` sequential ROME edits (paper's v* budget). After each, the edit's
  overlap with other subjects' keys, r_j = k_jᵀC⁻¹k̄ / k*ᵀC⁻¹k̄ (the fraction of the edit's
  change that subject j's key also receives), ‖δ‖ / ‖v_init‖, and every 10 edits the recall of
  unrelated known facts. Repeated with C from ``--cov-big`` texts and with C + ε·mean(diag C)·I
  (``--ridges``), to tell key overlap from a poorly estimated or ill-conditioned C.
* ``budget``: single ROME edits with v* optimised for (steps, lr, weight decay) in ``--budgets``:
  S / ES / PS / NS, mean ‖δ‖, ‖δ‖ / ‖v_init‖, Adam steps used (early stop at NLL 0.05), edits whose
  p(new) stays < 0.5.
* ``ftgap``: per-record NS of ROME (paper's budget) and of unconstrained fine-tuning (25 steps, lr
  5e-4) of the values and of the keys, with a paired bootstrap 95% interval of the NS gap.
* ``memit``: MEMIT over ``--memit-layers`` sets × λ (``--lams``) × ridge (``--memit-ridges``) at
  ``--counts`` edits (targets computed once per layer set, paper's budget), beside the numbers
  ``bench_world.py --only stress`` gives sequential ROME.

Results for the shipped model are in data/world/README.md (issue 14's "why" list).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

PARTS = ("interference", "budget", "ftgap", "memit")


def r1(x: float) -> float:
    return round(float(x), 1)


def scores(summary: dict) -> dict:
    return {k: r1(summary[k]) for k in ("S", "ES", "PS", "NS")}


def with_ridge(C: torch.Tensor, eps: float) -> torch.Tensor:
    return C + eps * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype) if eps else C


def part_interference(model, tok, cf, known, layer: int, n_seq: int, cov_big: int, ridges: list[float]) -> dict:
    from kvlab.editing import apply_rome, context_templates, key_covariance
    from kvlab.editing.base import EditRequest, undo_all
    from kvlab.editing.metrics import known_recall, record_scores, summarize
    from kvlab.editing.rome import compute_key
    from kvlab.editing.stress import pick_records
    records, unrelated = pick_records(model, tok, cf, known, n=n_seq)
    random.Random(0).shuffle(unrelated)
    unrelated = unrelated[:300]
    subjects = sorted({k["subject"] for k in unrelated})[:150]
    keys = torch.stack([compute_key(model, tok, EditRequest(prompt="{} is", subject=s, target_new="x"), layer, ["{}"])
                        for s in subjects]).double()                                  # (n_subjects, d_ff)
    templates = context_templates(model, tok, 10)
    C0 = key_covariance(model, tok, layer, n=2000, progress=False)
    variants = [("C from 2,000 texts", C0)]
    if cov_big:
        variants.append((f"C from {cov_big:,} texts", key_covariance(model, tok, layer, n=cov_big, progress=False)))
    variants += [(f"C + {eps:g}·mean(diag C)·I", with_ridge(C0, eps)) for eps in ridges]
    out = {"layer": layer, "edits": len(records), "unrelated facts": len(unrelated), "subjects probed": len(subjects)}
    for name, C in variants:
        ev = torch.linalg.eigvalsh(C)
        row = {"C condition number": f"{float(ev[-1] / ev[0]):.3g}", "recall": {0: r1(known_recall(model, tok, unrelated))}}
        r_mean, r_max, ratio, edits = [], [], [], []
        try:
            for i, rec in enumerate(records):
                e = apply_rome(model, tok, rec, layer=layer, cov=C, templates=templates, check=False, v_steps=20, v_lr=0.5)
                edits.append(e)
                u = torch.linalg.solve(C, e.info["k_mean"].double())                   # (d_ff,)
                r = (keys @ u) / (u @ e.info["k_star"].double())                       # (n_subjects,)
                r_mean.append(float(r.abs().mean()))
                r_max.append(float(r.abs().max()))
                ratio.append(e.info["delta_norm"] / e.info["v_init_norm"])
                if (i + 1) % 10 == 0 or i + 1 == len(records):
                    row["recall"][i + 1] = r1(known_recall(model, tok, unrelated))
            row["edited"] = scores(summarize(record_scores(model, tok, records)))
        finally:
            undo_all(edits)
        row |= {"mean |r|": round(sum(r_mean) / len(r_mean), 3), "mean max |r|": round(sum(r_max) / len(r_max), 3),
                "‖δ‖/‖v_init‖": round(sum(ratio) / len(ratio), 2)}
        out[name] = row
        print(json.dumps({"interference": {name: row}}, ensure_ascii=False), flush=True)
    return out


def part_budget(model, tok, cf, layer: int, n: int, budgets: list[tuple[int, float, float]]) -> dict:
    from kvlab.editing import apply_rome, context_templates, key_covariance
    from kvlab.editing.metrics import record_scores, summarize
    recs = cf[:n]
    C = key_covariance(model, tok, layer, n=2000, progress=False)
    templates = context_templates(model, tok, n=10)
    out = {"layer": layer, "edits": len(recs), "d_model": model.config.hidden_size}
    for steps, lr, wd in budgets:
        rows, logs = [], []
        for rec in recs:
            e = apply_rome(model, tok, rec, layer=layer, cov=C, templates=templates, check=False, v_steps=steps, v_lr=lr,
                           weight_decay=wd)
            try:
                rows += record_scores(model, tok, [rec])
            finally:
                e.undo()
            logs.append(e.info)
        m = len(logs)
        out[f"{steps} steps, lr {lr:g}, weight decay {wd:g}"] = scores(summarize(rows)) | {
            "‖δ‖": r1(sum(g["delta_norm"] for g in logs) / m),
            "‖δ‖/‖v_init‖": round(sum(g["delta_norm"] / g["v_init_norm"] for g in logs) / m, 2),
            "steps used": r1(sum(g["steps"] for g in logs) / m),
            "p(new) < 0.5": sum(g["p_new"] < 0.5 for g in logs),
            "Adam reach lr·√d per step": r1(lr * model.config.hidden_size ** 0.5)}
    return out


def part_ftgap(model, tok, cf, layer: int, n: int, seed: int = 0) -> dict:
    from kvlab.editing import apply_rome, context_templates, ft_keys, ft_values, key_covariance
    from kvlab.editing.metrics import record_scores, summarize
    recs = cf[:n]
    C = key_covariance(model, tok, layer, n=2000, progress=False)
    templates = context_templates(model, tok, n=10)

    def per_record(fn, **kw):
        rows = []
        for rec in recs:
            e = fn(model, tok, rec, **kw)
            try:
                rows += record_scores(model, tok, [rec])
            finally:
                e.undo()
        return rows

    rows = {"ROME": per_record(apply_rome, layer=layer, cov=C, templates=templates, check=False, v_steps=20, v_lr=0.5),
            "FT values": per_record(ft_values, layers=[layer], steps=25, lr=5e-4),
            "FT keys": per_record(ft_keys, layers=[layer], steps=25, lr=5e-4)}
    out = {"layer": layer, "edits": len(recs)} | {k: scores(summarize(v)) for k, v in rows.items()}
    rng = random.Random(seed)
    for ft in ("FT values", "FT keys"):
        gaps = [a["NS"] - b["NS"] for a, b in zip(rows["ROME"], rows[ft])]
        boots = sorted(sum(gaps[rng.randrange(len(gaps))] for _ in gaps) / len(gaps) for _ in range(10_000))
        out[f"NS gap ROME − {ft}"] = {"gap": r1(sum(gaps) / len(gaps)), "95% interval": [r1(boots[249]), r1(boots[9749])],
                                      "bootstrap share ≥ 15": round(sum(b >= 15 for b in boots) / len(boots), 3)}
    return out


def part_memit(model, tok, cf, known, layer_sets: list[tuple[int, ...]], lams: list[float], ridges: list[float],
               counts: list[int]) -> dict:
    from kvlab.editing import context_templates, key_covariance
    from kvlab.editing.memit import MEMITConfig, apply_memit, as_requests, compute_targets
    from kvlab.editing.stress import measure, pick_records
    records, unrelated = pick_records(model, tok, cf, known, n=max(counts))
    templates = context_templates(model, tok, 5)
    covs = {l: key_covariance(model, tok, l, n=2000, progress=False) for ls in layer_sets for l in ls}
    requests = as_requests(records)
    out = {"unrelated facts": len(unrelated)}
    for layers in layer_sets:
        cfg = MEMITConfig(v_steps=20, v_lr=0.5, n_templates=5)
        z, _ = compute_targets(model, tok, requests, layers[-1], templates, cfg, progress=False)   # (N, d_model)
        for ridge in ridges:
            cfg.ridge = ridge
            for lam in lams:
                for n in counts:
                    e = apply_memit(model, tok, requests[:n], layers, lam, covs, templates, targets=z[:n], config=cfg,
                                    check=False, progress=False)
                    try:
                        p = measure(model, tok, "MEMIT", records[:n], unrelated, e.originals, 0.0)
                    finally:
                        e.undo()
                    key = f"layers {','.join(map(str, layers))} λ {lam:g} ridge {ridge:g} n {n}"
                    out[key] = {"S": r1(p.S), "ES": r1(p.ES), "PS": r1(p.PS), "NS": r1(p.NS), "recall": r1(p.recall),
                                "drift": round(p.drift, 2)}
                    print(json.dumps({"memit": {key: out[key]}}, ensure_ascii=False), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="folder with model/, known_facts.json, counterfact.json")
    ap.add_argument("--only", default=",".join(PARTS))
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--seq", type=int, default=40, help="sequential edits (interference)")
    ap.add_argument("--cov-big", type=int, default=20_000, help="texts for the larger C (0: skip)")
    ap.add_argument("--ridges", default="0.001,0.01,0.1", help="ridges for C (interference)")
    ap.add_argument("--edits", type=int, default=100, help="edits (budget, ftgap)")
    ap.add_argument("--budgets", default="20,0.5,0.5;20,0.5,0;80,0.5,0.5;40,1.0,0.5;20,1.77,0.5;20,2.0,0.5",
                    help="steps,lr,weight decay;... (budget)")
    ap.add_argument("--memit-layers", default="1,2,3;1,2,3,4;1,2,3,4,5")
    ap.add_argument("--lams", default="2,8,16,64")
    ap.add_argument("--memit-ridges", default="0", help="e.g. 0,0.01,0.1")
    ap.add_argument("--counts", default="40,200")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import kvlab
    from kvlab.data import load_counterfact, load_known
    unknown = set(a.only.split(",")) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    model, tok, _ = kvlab.load(str(a.dir / "model") if a.dir else None, device="cpu")
    cf = load_counterfact(str(a.dir / "counterfact.json") if a.dir else None)
    known = load_known(str(a.dir / "known_facts.json") if a.dir else None)
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    results = {}

    def emit(name, fn):
        t = time.time()
        results[name] = fn() | {"bench_seconds": round(time.time() - t)}
        print(json.dumps({name: results[name]}, ensure_ascii=False), flush=True)
        if a.json:
            a.json.write_text(json.dumps(results, indent=1, ensure_ascii=False))

    parts = a.only.split(",")
    if "interference" in parts:
        emit("interference", lambda: part_interference(model, tok, cf, known, a.layer, a.seq, a.cov_big, floats(a.ridges)))
    if "budget" in parts:
        budgets = [(int(s), float(lr), float(wd)) for s, lr, wd in (b.split(",") for b in a.budgets.split(";"))]
        emit("budget", lambda: part_budget(model, tok, cf, a.layer, a.edits, budgets))
    if "ftgap" in parts:
        emit("ftgap", lambda: part_ftgap(model, tok, cf, a.layer, a.edits))
    if "memit" in parts:
        sets = [tuple(int(x) for x in s.split(",")) for s in a.memit_layers.split(";")]
        emit("memit", lambda: part_memit(model, tok, cf, known, sets, floats(a.lams), floats(a.memit_ridges),
                                         [int(x) for x in a.counts.split(",")]))


if __name__ == "__main__":
    main()
