"""Peak GPU memory and wall time of each heavy course step, measured on a random model of a real shape.

    python benchmarks/bench_gpu_memory.py --shape xl --device cuda --dtype float16   # GPT-2 XL, 1.56 B parameters
    python benchmarks/bench_gpu_memory.py --shape xl --dtype bfloat16 --json out.json
    python benchmarks/bench_gpu_memory.py --shape tiny --device cpu --dtype float32  # smoke run, no GPU

Measurements to replace the estimates of ``benchmarks/memory_estimates.py`` in the README. Nothing is
downloaded: the model is built from its published shape (``transformers.GPT2Config``) with random weights
(GPT-2's own initialisation), created directly on the device in the chosen dtype; the tokenizer is a
byte-level BPE (GPT-2's kind) trained here, in a few seconds, on made-up words to exactly the model's
50,257 tokens (see :func:`build_tokenizer`). Memory and time depend on the shapes, the sequence lengths
and the code path, not on what the weights know, so a random model costs what the trained one does —
except where a trained model stops early (ROME's v* and fine-tuning stop once the new object is said;
the notes give the steps run).

Steps, each one kvlab call as a notebook makes it (``--only`` picks some; the load always runs):

1. load: the weights on the device;
2. causal tracing: ``tracing.trace_all_kinds`` (hidden, mlp, attn), window 10, 10 noise samples, one fact
   (a 10-token prompt, 2-token subject);
3. knowledge neurons: ``neurons.attribute``, integrated gradients over all layers, 20 steps (Dai et al.);
4. key covariance: ``editing.key_covariance`` at ROME's layer over ``--cov-texts`` (1,000) random-word
   sentences of 10-30 words (about as many tokens), the disk and memory cache off;
5. one ROME edit (``editing.apply_rome``) at the paper's layer for the shape (GPT-2 XL: 17, medium: 8),
   ROME's GPT-2 XL hyper-parameters (kvlab's defaults), C from step 4; the time includes generating the
   20 context templates, as a session's first edit does;
6. MEMIT (``editing.memit.apply_memit``): 5 edits on 5 layers (GPT-2 XL: the paper's 13-17 and λ 20,000;
   else kvlab's defaults), the 5 covariances computed beforehand as in step 4 (not timed);
7. fine-tuning the FFN values of ROME's layer (``editing.ft_values``), kvlab's defaults (25 Adam steps).

Peak memory is ``torch.cuda.max_memory_allocated`` between a ``reset_peak_memory_stats`` before the step
and its end, so it includes the weights (what must fit on the card); the JSON also has the allocator's
peak reservation (``max_memory_reserved``), which is what ``nvidia-smi`` shows. Time is wall time with
``torch.cuda.synchronize`` before and after. Where a first call pays one-off costs (CUDA kernels loaded on
first use, cuBLAS workspaces, the optimiser's first step), one untimed warm-up call runs first; the table
marks those steps. The CUDA context is created before the load. Every edit (warm-ups too) is undone, and
the edited weights are checked to be back bit for bit at the end. A failing step shows its error in the
table and the others still run; the exit code is then 1. ``KVLAB_CACHE`` points to a temporary folder
for the run, so no stale covariance is read and nothing is left behind.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CACHE = tempfile.mkdtemp(prefix="kvlab-bench-gpu-")
os.environ["KVLAB_CACHE"] = CACHE      # set before kvlab is imported: no stale covariance, nothing left behind

import torch  # noqa: E402

GIB = 2 ** 30
VOCAB = 50257                          # GPT-2's vocabulary
SHAPES = {                             # GPT2Config fields; the name picks the papers' layers where kvlab has them
    "xl": dict(n_layer=48, n_embd=1600, n_head=25, n_inner=6400),       # gpt2-xl, 1.56 B parameters
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, n_inner=4096),   # gpt2-medium, 355 M
    "tiny": dict(n_layer=6, n_embd=64, n_head=4, n_inner=256),          # for a CPU smoke run
}
HUB_NAME = {"xl": "gpt2-xl", "medium": "gpt2-medium", "tiny": None}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# The fact traced and attributed (step 2, 3) and edited by ROME and fine-tuning (5, 7); MEMIT edits all five.
FACTS = [  # (prompt with "{}" for the subject, subject, true answer, new answer)
    ("The native language of the French actress {} is", "Danielle Darrieux", "French", "English"),
    ("{} was originally built in the city of", "Eiffel Tower", "Paris", "London"),
    ("The football player {} plays in the position of", "Thomas Ohlsson", "midfielder", "goalkeeper"),
    ("The company {} has its headquarters in the country of", "Toyota Motor", "Japan", "Germany"),
    ("The famous musician {} is known for playing the", "Miles Davis", "trumpet", "piano"),
]


# ---------------------------------------------------------------------------------------------
# Tokenizer and texts


def _lexicon(rng: random.Random, n: int) -> list[str]:
    """``n`` made-up lower-case words of 1-3 syllables (distinct, in a fixed order)."""
    onsets = "b c d f g h j k l m n p r s t v w z br cr dr fr gr pr tr bl cl fl gl pl sl st sp sk ch sh th".split()
    vowels = "a e i o u ai ea ee ie oo ou".split()
    codas = ["", "", "n", "r", "l", "s", "t", "m", "nd", "rt", "st", "ck"]
    words = (("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                      for _ in range(rng.randint(1, 3)))) for _ in range(n))
    return list(dict.fromkeys(words))


def build_tokenizer(vocab_size: int = VOCAB, seed: int = 0):
    """A GPT-2-like byte-level BPE tokenizer with exactly ``vocab_size`` tokens, trained offline.

    Why exactly the model's size: kvlab's ``check_tokenizer`` refuses only a tokenizer with *more*
    tokens than the embedding has rows; a smaller one (``kvlab.testing.bpe_tokenizer()`` has 300) is
    accepted, but a random model of GPT-2's shape predicts ids up to 50,256 and such a tokenizer decodes
    the ids it lacks to "" without a word. The context templates ROME and MEMIT generate would then
    lose most of their tokens (shorter sequences, less memory than with GPT-2's tokenizer), and the
    tracer's answer would be an empty string. Trained on enough made-up words, the BPE trainer stops at
    exactly ``vocab_size``, so every id the model emits is a real piece of text, and the fact words
    (repeated in the training texts) are one token each, as common words are in GPT-2's vocabulary.
    """
    from kvlab.standin import gpt2_tokenizer

    rng = random.Random(seed)
    lex = _lexicon(rng, 120_000)
    texts = [" ".join(lex[i:i + 10]) for i in range(0, len(lex), 10)] * 2
    texts += [p.replace("{}", s) + f" {a} {b}." for p, s, a, b in FACTS] * 100
    tok = gpt2_tokenizer(texts, vocab_size)      # byte-level BPE as GPT-2's (the stand-in's)
    if len(tok) != vocab_size:   # another `tokenizers` version might stop short: say so rather than go on
        raise RuntimeError(f"the BPE trainer made {len(tok)} tokens, not the model's {vocab_size}")
    return tok


def corpus(tok, n: int, seed: int = 1) -> list[str]:
    """``n`` sentences of 10-30 random words, each word one token of ``tok`` (like common English words)."""
    rng = random.Random(seed)
    words = sorted(w[1:] for w in tok.get_vocab() if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 3)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(10, 30))).capitalize() + "." for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    key: str
    step: str
    peak_gib: float | None = None           # max_memory_allocated during the step (None on a CPU or on error)
    reserved_gib: float | None = None       # max_memory_reserved during the step
    seconds: float | None = None
    warm_up: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.rows: list[Row] = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def tidy(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def run(self, key: str, step: str, fn, warm_up=None, after=None) -> Row:
        """Time ``fn()`` (a callable returning (result, notes)) and read its peak memory; ``warm_up()``
        runs untimed first, ``after(result)`` (undoing an edit) runs after the measurement."""
        row = Row(key, step, warm_up=warm_up is not None)
        self.rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {step} ...", file=sys.stderr, flush=True)
        result, stage = None, ""
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if warm_up is not None:
                    stage = "in the warm-up: "
                    warm_up()
                    self.tidy()
                    stage = ""
                self.sync()
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats(self.device)
                t0 = time.perf_counter()
                result, notes = fn()
                self.sync()
                row.seconds = time.perf_counter() - t0
                if self.cuda:
                    row.peak_gib = torch.cuda.max_memory_allocated(self.device) / GIB
                    row.reserved_gib = torch.cuda.max_memory_reserved(self.device) / GIB
                row.notes += notes
            for w in caught:
                text = f"{w.category.__name__}: {w.message}"
                if issubclass(w.category, (RuntimeWarning, UserWarning)) and text not in row.notes:
                    row.notes.append(text)
        except Exception as e:  # noqa: BLE001 -- a failing step is reported in the table, the others still run
            row.error = f"{stage}{type(e).__name__}: {e}"
            row.seconds = row.peak_gib = row.reserved_gib = None
            traceback.print_exc(file=sys.stderr)
        finally:
            try:
                if after is not None and result is not None:
                    after(result)
            except Exception as e:  # noqa: BLE001
                row.error = (row.error + "; " if row.error else "") + f"after the step: {type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
            del result
            self.tidy()
        return row


def undo(edit) -> None:
    edit.undo()


# ---------------------------------------------------------------------------------------------
# The steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="xl", help="model shape (default xl: GPT-2 XL)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16")
    ap.add_argument("--cov-texts", type=int, default=1000, help="texts for the key covariances (default 1000)")
    ap.add_argument("--only", default=None,
                    help="comma-separated steps to run besides the load: tracing,ig,covariance,rome,memit,ft")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: kvlab.env.cpu_threads())")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        return run(args)
    finally:
        shutil.rmtree(CACHE, ignore_errors=True)


def run(args) -> int:
    import transformers
    from transformers import AutoModelForCausalLM, GPT2Config

    from kvlab import neurons, tracing
    from kvlab.arch import adapter, check_tokenizer
    from kvlab.editing import EditRequest, apply_rome, ft_values, key_covariance, param_name, rome
    from kvlab.editing import memit
    from kvlab.env import cpu_threads
    from kvlab.loading import dtype_kwarg
    from kvlab.text import encode, ensure_pad, subject_token_range

    steps = ["tracing", "ig", "covariance", "rome", "memit", "ft"]
    if args.only:
        chosen = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in chosen if s not in steps]
        if bad:
            raise SystemExit(f"--only: unknown step(s) {bad}; choose from {steps}")
        steps = [s for s in steps if s in chosen]
    if args.cov_texts < 1:
        raise SystemExit(f"--cov-texts must be ≥ 1, got {args.cov_texts}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --shape tiny for a smoke run)")
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads or cpu_threads())
    t_start = time.perf_counter()

    tok = build_tokenizer()
    ensure_pad(tok)
    texts = corpus(tok, args.cov_texts)
    cfg = GPT2Config(**SHAPES[args.shape], vocab_size=VOCAB, n_positions=1024)
    name = HUB_NAME[args.shape]
    bench = Bench(device)
    if bench.cuda:                       # the CUDA context is not part of the load
        torch.cuda.init()
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
    model = None

    def load():
        nonlocal model
        torch.manual_seed(args.seed)
        with torch.device(device):       # parameters created (and initialised) on the device, in `dtype`
            m = AutoModelForCausalLM.from_config(cfg, **dtype_kwarg(dtype))
        m.to(device)                     # a no-op unless transformers built something elsewhere
        m.eval().requires_grad_(False)
        adapter(m)
        check_tokenizer(m, tok)
        model = m
        return None, [f"{sum(p.numel() for p in m.parameters()):,} parameters built on the device"
                      + (" (CUDA context created before)" if bench.cuda else "")]

    bench.run("load", "1. load (weights on the device)", load)
    if model is None:
        return report(args, bench, None, tok, t_start, transformers, header_extra={})
    arch = adapter(model)
    n_params = sum(p.numel() for p in model.parameters())

    prompt_t, subject, answer, new = FACTS[0]
    prompt = prompt_t.replace("{}", subject)
    n_tokens = encode(model, tok, prompt).input_ids.shape[1]
    b, e = subject_token_range(tok, prompt, subject)
    requests = [EditRequest(p, s, target_new=n, target_true=a) for p, s, a, n in FACTS]
    rome_layer = rome.PAPER_LAYERS.get(name) if name else None
    rome_layer = rome.default_layer(model) if rome_layer is None else rome_layer
    memit_layers = memit.PAPER_LAYERS.get(name) if name else None
    if memit_layers is None:            # kvlab's default range, or 5 layers ending near ROME's on a small model
        memit_layers = tuple(memit.default_layers(model))
        if len(memit_layers) < 5:
            start = max(0, min(rome_layer - 4, arch.n_layers - 5))
            memit_layers = tuple(range(start, min(start + 5, arch.n_layers)))
    lam = memit.PAPER_LAMBDA.get(name) if name else None
    lam = memit.default_lambda(model) if lam is None else lam
    header_extra = dict(prompt=prompt, prompt_tokens=n_tokens, subject=subject, subject_tokens=e - b,
                        rome_layer=rome_layer, memit_layers=list(memit_layers), memit_lambda=lam,
                        cov_texts=len(texts),
                        cov_tokens=int(sum(len(x) for x in tok(texts)["input_ids"])))
    edited = {param_name(model, arch.value_module(l)) for l in {rome_layer, *memit_layers}}
    saved = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in edited}
    covs: dict[int, torch.Tensor] = {}

    if "tracing" in steps:
        def tracing_step():
            res = tracing.trace_all_kinds(model, tok, prompt, subject, samples=10, window=10)
            return res, [f"{len(res)} kinds, scores {tuple(res['hidden'].scores.shape)} (tokens x layers)"]
        bench.run("tracing", "2. causal tracing: hidden, mlp, attn; window 10, 10 samples, 1 fact",
                  tracing_step, warm_up=lambda: tracing.trace_all_kinds(model, tok, prompt, subject, samples=10,
                                                                         window=10))

    if "ig" in steps:
        def ig_step():
            attr = neurons.attribute(model, tok, prompt, answer, steps=20)
            return attr, [f"{len(attr.layers)} layers x 20 steps = {len(attr.layers) * 20} scaled rows"]
        bench.run("ig", f"3. integrated gradients: all {arch.n_layers} layers, 20 steps, 1 fact", ig_step,
                  warm_up=lambda: neurons.attribute(model, tok, prompt, answer, steps=20))

    def covariance(layer: int, n: int | None = None) -> torch.Tensor:
        return key_covariance(model, tok, layer, texts=texts[:n] if n else texts, n=len(texts), cache=False,
                              progress=False)

    if "covariance" in steps or "rome" in steps:
        def cov_step():
            covs[rome_layer] = covariance(rome_layer)
            return None, [f"layer {rome_layer}, {len(texts)} texts, {header_extra['cov_tokens']:,} tokens, "
                          f"C ({arch.d_ff}, {arch.d_ff}) float64, cache off"]
        row = bench.run("covariance", f"4. key covariance: {len(texts):,} texts, 1 layer", cov_step,
                        warm_up=lambda: covariance(rome_layer, 64))
        if "covariance" not in steps:   # computed for ROME only: not a row of the table
            bench.rows.remove(row)

    if "rome" in steps:
        def rome_step():
            if rome_layer not in covs:
                raise RuntimeError("no key covariance (step 4 failed)")
            edit = apply_rome(model, tok, requests[0], layer=rome_layer, cov=covs[rome_layer])
            return edit, [f"layer {rome_layer}, {edit.info['steps']} of {rome.ROMEConfig().v_steps} v* steps "
                          f"(p_new {edit.info['p_new']:.3f}), C from step 4, incl. generating the context "
                          f"templates; warm-up: 2 v* steps, no templates"]

        def rome_warm_up():
            if rome_layer in covs:
                apply_rome(model, tok, requests[0], layer=rome_layer, cov=covs[rome_layer], templates=["{}"],
                           v_steps=2).undo()
        bench.run("rome", f"5. ROME, 1 edit at layer {rome_layer}", rome_step, warm_up=rome_warm_up, after=undo)

    if "memit" in steps:
        def memit_step():
            missing = [l for l in memit_layers if l not in covs]
            if missing:
                raise RuntimeError(f"no key covariance for layer(s) {missing}")
            edit = memit.apply_memit(model, tok, requests, layers=memit_layers, lam=lam,
                                     covs={l: covs[l] for l in memit_layers}, progress=False)
            steps_run = [log.get("steps") for log in edit.info["target_logs"]]
            return edit, [f"layers {list(memit_layers)}, λ {lam:g}, v* steps per edit {steps_run}, the "
                          f"{len(memit_layers)} covariances computed before (untimed, {len(texts)} texts each), "
                          f"incl. generating the context templates; no warm-up (kernels warm from the steps before)"]
        t0 = time.perf_counter()
        try:
            for l in memit_layers:
                if l not in covs:
                    covs[l] = covariance(l)
        except Exception as e:  # noqa: BLE001 -- reported in MEMIT's row
            print(f"MEMIT covariances failed: {type(e).__name__}: {e}", file=sys.stderr)
        gc.collect()
        t_cov = time.perf_counter() - t0
        row = bench.run("memit", f"6. MEMIT, {len(requests)} edits on {len(memit_layers)} layers", memit_step,
                        after=undo)
        row.notes.append(f"covariances beforehand: {t_cov:.1f} s")

    if "ft" in steps:
        covs.clear()
        gc.collect()

        def ft_step():
            edit = ft_values(model, tok, requests[0], layers=[rome_layer])
            return edit, [f"FFN values of layer {rome_layer}, {edit.info['steps']} Adam steps "
                          f"(p_new {edit.info['p_new']:.3f}); warm-up: 1 step"]
        bench.run("ft", f"7. fine-tuning one FFN layer (values, layer {rome_layer})", ft_step,
                  warm_up=lambda: ft_values(model, tok, requests[0], layers=[rome_layer], steps=1).undo(),
                  after=undo)

    params = dict(model.named_parameters())
    changed = [n for n, t in saved.items() if not torch.equal(params[n].detach().cpu(), t)]
    header_extra["weights_restored"] = not changed
    if changed:
        bench.rows.append(Row("undo", "edits undone", error=f"weights not restored bit for bit: {changed}"))
    return report(args, bench, n_params, tok, t_start, transformers, header_extra)


# ---------------------------------------------------------------------------------------------
# Output


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def report(args, bench: Bench, n_params, tok, t_start: float, transformers, header_extra: dict) -> int:
    import platform

    if bench.cuda:
        gpu = torch.cuda.get_device_name(bench.device)
        total = torch.cuda.get_device_properties(bench.device).total_memory / GIB
        where = f"{gpu} ({total:.0f} GiB)"
    else:
        gpu, where = None, f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"
    shape = SHAPES[args.shape]
    header = dict(
        device=where, gpu=gpu, torch=torch.__version__, transformers=transformers.__version__,
        dtype=args.dtype, shape=args.shape, config=dict(shape, vocab_size=VOCAB, n_positions=1024),
        parameters=n_params, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        tokenizer=f"byte-level BPE, {len(tok)} tokens (trained offline)", **header_extra)
    params = f"{n_params / 1e9:.2f} B parameters" if n_params and n_params >= 1e8 else f"{n_params or 0:,} parameters"
    print(f"\n**{where}** · torch {torch.__version__} · transformers {transformers.__version__} · {args.dtype} · "
          f"shape {args.shape} ({shape['n_layer']} layers, d {shape['n_embd']}, d_ff {shape['n_inner']}, "
          f"vocab {VOCAB}) · {params} · {header['date'][:10]}")
    if "prompt" in header_extra:
        print(f"\nfact: {header_extra['prompt']!r} ({header_extra['prompt_tokens']} tokens, subject "
              f"{header_extra['subject_tokens']} tokens); covariance texts: {header_extra['cov_texts']:,} "
              f"({header_extra['cov_tokens']:,} tokens)\n")
    print("| step | peak memory | time |")
    print("|---|---|---|")
    for r in bench.rows:
        mark = " †" if r.warm_up else ""
        if r.error:
            print(f"| {_cell(r.step)}{mark} | failed: {_cell(r.error)} | — |")
        else:
            mem = f"{r.peak_gib:.2f} GiB" if r.peak_gib is not None else "—"
            print(f"| {_cell(r.step)}{mark} | {mem} | {r.seconds:.2f} s |")
    print("\n† after one untimed warm-up call (one-off costs: CUDA kernels loaded on first use, cuBLAS "
          "workspaces, the optimiser's first step). Peak memory includes the weights.")
    for r in bench.rows:
        for note in r.notes:
            print(f"- {r.step.split(' ')[0]} {_cell(note, 400)}")
    failed = [r for r in bench.rows if r.error]
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s" + (f"; {len(failed)} step(s) failed" if failed else "; all steps ran"))
    if args.json:
        out = dict(header=header, rows=[r.__dict__ for r in bench.rows], total_seconds=total,
                   failed=[r.key for r in failed])
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
