"""Integrated gradients per fact: kvlab vs the EleutherAI `knowledge-neurons` package's procedure, one run.

    python benchmarks/bench_neurons.py                 # built-in model, then a gpt2-medium-shaped random model
    python benchmarks/bench_neurons.py --quick         # fewer facts and repeats (CI smoke run)
    python benchmarks/bench_neurons.py --only built-in # built-in model only (or: --only medium)

The baseline re-implements, from its source, what ``KnowledgeNeurons.get_scores`` of the package
(EleutherAI/knowledge-neurons, ``knowledge_neurons/knowledge_neurons.py``) does for a GPT model:

* for every layer, a clean forward pass of the prompt records that layer's activations at the last
  position (``get_baseline_with_activations``);
* the scaled copies α·m̄ with α = ``linspace(0, 1, steps)`` (both ends included), cut into
  ``steps / batch_size`` chunks (``batch_size`` must divide ``steps``); per chunk one forward pass of
  ``batch_size`` copies of the whole prompt through the whole model, the layer's activation at the last
  position replaced by the chunk's copies, softmax of the last position's logits, and ``autograd.grad``
  of the target's probabilities w.r.t. the copies;
* attribution = Σ gradients · m̄ / steps. Defaults: steps 20, batch_size 10, baseline 0.

The package hooks GPT-2's ``mlp.c_fc`` output (before the GELU); here the value projection's input m
is replaced (after it: Dai et al.'s neuron, and kvlab's). It is one hook either way, the same cost.
With kvlab's midpoint α the baseline's scores equal kvlab's (checked below), so both compute the same
thing. kvlab runs at its defaults (all layers' rows in passes of 128, each row from its layer's cached
input, last positions only; it also returns p with each layer zeroed, which the package does not) and at
the package's batch sizes (equal batch). Times are process CPU seconds with one torch thread; methods
alternate within each repeat and the fastest repeat of each (method, fact) counts.
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

from kvlab.hooks import capture, patch  # noqa: E402
from kvlab.neurons import attribute  # noqa: E402
from kvlab.text import token_ids  # noqa: E402

MEDIUM = dict(d=1024, n_layers=24, d_ff=4096, heads=16)       # gpt2-medium
TINY_FACTS = [("anna berg lives in", "paris"), ("tom lee plays the", "piano"),
              ("the capital of france is", "paris"), ("anna lee speaks", "french")]


def package_scores(model, tok, arch, prompt: str, answer: str, steps: int = 20, batch_size: int = 10,
                   alphas: torch.Tensor | None = None) -> torch.Tensor:
    """The package's procedure (see the module docstring): (n_layers, d_ff) attributions.

    ``alphas``: the scaling points, default the package's ``linspace(0, 1, steps)``.
    """
    if steps % batch_size:
        raise ValueError(f"the package needs batch_size to divide steps, got {batch_size} and {steps}")
    enc = tok(prompt, return_tensors="pt")
    target = token_ids(tok, answer)[0]                    # one-token answers here: the package's single step
    alphas = torch.linspace(0, 1, steps) if alphas is None else alphas
    out = []
    for l in range(arch.n_layers):
        vm = arch.value_module(l)
        with torch.no_grad(), capture(model, {"m": vm}, what="input") as store:   # per-layer clean pass
            model(**enc)
        m_bar = store["m"][:, -1]                                                 # (1, d_ff)
        scaled = (m_bar.repeat(steps, 1) * alphas[:, None]).requires_grad_(True)  # (steps, d_ff)
        total = torch.zeros(arch.d_ff)
        for chunk in scaled.chunk(steps // batch_size):
            inputs = {k: v.repeat(batch_size, 1) for k, v in enc.items()}

            def put(m, chunk=chunk):                                              # (batch, seq, d_ff)
                m = m.clone()
                m[:, -1] = chunk
                return m
            with patch(vm, put, what="input"):
                logits = model(**inputs).logits
            probs = torch.softmax(logits[:, -1], dim=-1)
            (g,) = torch.autograd.grad(torch.unbind(probs[:, target]), chunk)
            total += g.sum(0)
        out.append(total * m_bar[0] / steps)
    return torch.stack(out)


def clock() -> float:
    return time.process_time()


def run(name, model, tok, arch, facts, repeat: int, steps: int, package_batches, kvlab_batches):
    """Time every method on every fact, interleaved; print ms/fact and the ratios."""
    methods = {f"package, batch {b}": (lambda p, a, b=b: package_scores(model, tok, arch, p, a, steps, b))
               for b in package_batches}
    methods["kvlab, defaults (batch 128)"] = lambda p, a: attribute(model, tok, p, a, steps=steps)
    for b in kvlab_batches:
        methods[f"kvlab, batch {b}"] = lambda p, a, b=b: attribute(model, tok, p, a, steps=steps, batch_size=b)
    # the same thing? the package's procedure with kvlab's midpoint α against kvlab
    mid = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    ref = package_scores(model, tok, arch, *facts[0], steps, package_batches[0], alphas=mid)
    ours = attribute(model, tok, *facts[0], steps=steps).scores
    diff = float((ref - ours).abs().max()) / float(ours.abs().max())
    print(f"\n{name}: {arch}\n{len(facts)} fact(s), steps={steps}, fastest of {repeat} interleaved run(s); "
          f"package procedure with midpoint α vs kvlab: max |Δ| / max |score| = {diff:.1e}")
    assert diff < 1e-4, diff
    best = {k: [float("inf")] * len(facts) for k in methods}
    names = list(methods)
    for r in range(repeat):
        for i, (p, a) in enumerate(facts):
            order = names if (r + i) % 2 == 0 else names[::-1]      # alternate the order: A B … B A
            for k in order:
                t0 = clock()
                methods[k](p, a)
                best[k][i] = min(best[k][i], clock() - t0)
    ms = {k: 1e3 * sum(v) / len(v) for k, v in best.items()}
    for k in names:
        print(f"  {k:32s} {ms[k]:10.1f} ms/fact")
    pkg_default, pkg_best = f"package, batch {package_batches[0]}", min((ms[f'package, batch {b}'], b)
                                                                        for b in package_batches)
    kv = ms["kvlab, defaults (batch 128)"]
    ratios = {"kvlab defaults vs package defaults": ms[pkg_default] / kv,
              f"kvlab defaults vs package's fastest (batch {pkg_best[1]})": pkg_best[0] / kv}
    for b in kvlab_batches:
        if b in package_batches:
            ratios[f"equal batch {b}: kvlab vs package"] = ms[f"package, batch {b}"] / ms[f"kvlab, batch {b}"]
    for k, v in ratios.items():
        print(f"  {k:55s} {v:6.1f}x")
    return ratios


def builtin_facts(n: int):
    import kvlab
    from kvlab.data import load_known
    model, tok, arch = kvlab.load(device="cpu")
    return model, tok, arch, [(k.prompt, k.attribute) for k in load_known()[::37][:n]]


def medium_model():
    """A randomly initialised GPT-2 of gpt2-medium shape, its 50,257-token vocabulary included (the
    word-level test tokenizer uses the first ids), GPT-2's init scale."""
    from transformers import AutoModelForCausalLM
    from kvlab.arch import adapter
    from kvlab.testing import tiny_config, tiny_tokenizer
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_config("gpt2", 50257, positions=128, **MEDIUM)
    model = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    return model, tok, adapter(model)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 facts, 1 repeat on the built-in model")
    ap.add_argument("--only", choices=("built-in", "medium"), help="one model only")
    ap.add_argument("--facts", type=int, default=6, help="facts on the built-in model")
    ap.add_argument("--medium-facts", type=int, default=1, help="facts on the gpt2-medium shape")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats on the built-in model")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    try:
        if args.only == "medium":
            raise FileNotFoundError("--only medium")
        model, tok, arch, facts = builtin_facts(2 if args.quick else args.facts)
        results["built-in"] = run("built-in model", model, tok, arch, facts, 1 if args.quick else args.repeat,
                                  args.steps, (10, 20), (10, 20))
    except (OSError, FileNotFoundError) as e:
        print(f"built-in model not available ({e}); skipped")
    if args.only != "built-in":
        model, tok, arch = medium_model()
        results["gpt2-medium shape"] = run("random GPT-2, gpt2-medium shape", model, tok, arch,
                                           TINY_FACTS[:args.medium_facts], 1, args.steps, (10, 20), (10, 20))
    print("\nspeed-ups (package procedure time / kvlab time): " + "; ".join(
        f"{m}: " + ", ".join(f"{k} {v:.1f}x" for k, v in r.items()) for m, r in results.items()))


if __name__ == "__main__":
    main()
