"""Command line: ``python -m kvlab.world train|eval|export``.

    python -m kvlab.world train [--seed 0] [--out DIR] [--steps N] [--quick] [--world 1]
    python -m kvlab.world eval  [--model DIR]
    python -m kvlab.world export [--model DIR] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from . import WORLD_DIR, build_world, world_tokenizer
from .tokenizer import save_tokenizer
from .export import counterfact, known_facts, write_json
from .train import QUICK, V1, TrainConfig, recall, train


def evaluate(model, tok, world) -> dict:
    out = {}
    for split in ("train", "heldout"):
        r = recall(model, tok, world.fact_prompts(split))
        out[split] = {"recall": r["recall"], "n": r["n"], "by_relation": r["by_relation"]}
    return out


def export(model, tok, world, out_dir: Path) -> tuple[int, int]:
    known = known_facts(world, model, tok)
    cases = counterfact(world, tok)
    write_json(known, out_dir / "known_facts.json")
    write_json(cases, out_dir / "counterfact.json")
    write_json(world.summary(), out_dir / "world.json")
    return len(known), len(cases)


def mlp0_line(cfg: dict) -> str:
    """The card's line on what sets this model apart from a plain GPT-2 ("" for world 1's settings)."""
    parts = []
    if cfg.get("mlp0_off"):
        parts.append("layer 0's FFN output projection held at zero and frozen (`mlp0_off`), so that FFN is "
                     "empty and the subject is looked up from layer 1 on (see the designs below)")
    if cfg.get("place_repeat", 1) > 1:
        parts.append(f"city and country facts repeated {cfg['place_repeat']}x per pass (`place_repeat`)")
    return "".join(f"- {p}\n" for p in parts)


def heldout_note(world) -> str:
    """What the held-out phrasings are, per world version."""
    if world.version == 1:
        return """Held-out phrasings are new compositions of familiar parts (an adverb or a sentence frame seen
with other relations); see `world.json` for every template. Recall is not uniform: phrasings
built only from parts trained with the same object type transfer well, while a held-out word
frame never seen with that subject type (e.g. "the profession of {} is", the city -> country
held-outs) can fail completely; check the per-relation table above.
"""
    return ("Held-out phrasings are trained phrasings of the same relation with one familiar word added or\n"
            "swapped (world 2 rebuilt them: world 1's needed words that subject kind never occurs with);\n"
            "see `world.json` for every template and the per-relation table above.\n")


def model_card(out_dir: Path, cfg: dict, stats: dict, ev: dict, n_params: int, n_known: int, n_cases: int,
               world) -> str:
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()) / 2**20
    rel_rows = "\n".join(f"| {rid} | {r.name} | {r.subject_kind} | {len(r.objects)} | "
                         f"{ev['train']['by_relation'].get(rid, 0):.1%} | {ev['heldout']['by_relation'].get(rid, 0):.1%} |"
                         for rid, r in world.relations.items())
    return f"""# kvlab world model

A small GPT-2 (`GPT2LMHeadModel`) trained from scratch on the sentences of a seeded fictional
world (`kvlab.world.build_world(seed={cfg['seed']}, version={world.version})`): {len(world.people)} people with
two-word names{' (unique last names)' if world.version == 2 else ''}, {len(world.cities)} cities, {len(world.countries)} countries and {len(world.facts)} facts over
{len(world.relations)} relations, as one-fact sentences and profile lines (a name followed by all the
person's attributes, {cfg.get('profiles', 0)} per person per pass), mixed with filler sentences
(counting, weather, repetition...).
Word-level tokenizer (`tokenizer.json`, {world_vocab(out_dir)} tokens, `<|endoftext|>` = bos/eos/pad).

## Measured (greedy next token == object)

| split | prompts | recall |
|---|---|---|
| training phrasings | {ev['train']['n']} | {ev['train']['recall']:.1%} |
| held-out paraphrases (never trained on) | {ev['heldout']['n']} | {ev['heldout']['recall']:.1%} |

| relation | name | subject | objects | train recall | held-out recall |
|---|---|---|---|---|---|
{rel_rows}

- training time: {stats['seconds']:.0f} s for {cfg['steps']} steps on {cfg['threads']} CPU threads
  ({platform.processor() or platform.machine()}; the machine was shared with other jobs),
  {stats['tokens_per_s']:.0f} tokens/s, {stats['tokens']:,} tokens, final loss {stats['final_loss']:.3f}
- config: {cfg['n_layer']} layers, d_model {cfg['n_embd']}, {cfg['n_head']} heads, d_ff {cfg['n_inner']},
  {cfg['n_positions']} positions, tied embeddings, dropout {cfg['dropout']}; {n_params:,} parameters (fp32)
{mlp0_line(cfg)}- optimiser: AdamW lr {cfg['lr']} (warmup {cfg['warmup']}, cosine to {cfg['min_lr']}), weight decay
  {cfg['weight_decay']}, batch {cfg['batch']} x {cfg['block']} packed tokens, filler fraction {cfg['filler']}
- files: {size:.1f} MB in `data/world` (model in `model/`, safetensors)
- exports: `known_facts.json` ({n_known} facts the model gets right, known_1000 schema),
  `counterfact.json` ({n_cases} editing cases, CounterFact schema), `world.json` (summary)

{heldout_note(world)}
## Reproduce

    python -m kvlab.world train --seed {cfg['seed']}     # trains, evaluates, exports, rewrites this card
    python -m kvlab.world eval

Training is seeded; on CPU results are deterministic up to thread scheduling.
Full config: `{json.dumps(cfg)}`
"""


def write_card(model, tok, world, out: Path, model_dir: Path, ev: dict) -> None:
    """Write the exports, then the model card (training numbers from model/train_stats.json)."""
    n_known, n_cases = export(model, tok, world, out)
    print(f"known facts: {n_known}, counterfact cases: {n_cases}")
    stats = json.loads((model_dir / "train_stats.json").read_text())
    n_params = sum(p.numel() for p in model.parameters())
    card = out / "README.md"
    keep = ""                                           # the hand-written design record survives a retrain
    if card.exists() and DESIGNS in card.read_text():
        keep = DESIGNS + card.read_text().split(DESIGNS, 1)[1]
    for _ in range(2):                                  # twice: the card's own size is counted
        card.write_text(model_card(out, stats["config"], stats, ev, n_params, n_known, n_cases, world)
                        + ("\n" + keep if keep else ""))


DESIGNS = "## World and model designs tried"


def world_vocab(out_dir: Path) -> int:
    try:
        return len(json.loads((out_dir / "model" / "tokenizer.json").read_text())["model"]["vocab"])
    except Exception:
        return -1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kvlab.world")
    ap.add_argument("cmd", choices=["train", "eval", "export"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: data/world)")
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: OUT/model)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    ap.add_argument("--world", type=int, default=None, choices=(1, 2),
                    help="world version (train: 2 = the shipped model's, the default; 1 = the first shipped "
                         "model's, see kvlab.world.generator; eval/export: default read from the model's "
                         "train_stats.json)")
    ap.add_argument("--eval-every", type=int, default=0, help="print sampled recall every N steps")
    a = ap.parse_args(argv)
    out = a.out or WORLD_DIR
    model_dir = a.model or out / "model"
    if a.cmd == "train":
        cfg = TrainConfig(seed=a.seed, **(V1 if a.world == 1 else {}), **(QUICK if a.quick else {}))
        if a.steps:
            cfg.steps = a.steps
        world = build_world(a.seed, version=cfg.world_version)
        tok = world_tokenizer(cfg.world_version)
        sample = lambda split: world.fact_prompts(split)[::7]  # noqa: E731
        eval_fn = lambda m: {s: round(recall(m, tok, sample(s))["recall"], 3)  # noqa: E731
                             for s in ("train", "heldout")}
        model, stats = train(world, tok, cfg, eval_fn=eval_fn, eval_every=a.eval_every)
        print(f"trained {cfg.steps} steps in {stats['seconds']:.0f} s, {stats['tokens_per_s']:.0f} tokens/s")
        model_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(model_dir, safe_serialization=True)
        save_tokenizer(tok, model_dir)
        ev = evaluate(model, tok, world)
        small = {k: v for k, v in stats.items() if k != "losses"} | {"final_loss": stats["losses"][-1]}
        (model_dir / "train_stats.json").write_text(json.dumps(small, indent=1))
        write_card(model, tok, world, out, model_dir, ev)
        print(json.dumps(ev, indent=1))
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer
    version = a.world
    if version is None:
        stats_path = model_dir / "train_stats.json"
        cfg = json.loads(stats_path.read_text())["config"] if stats_path.exists() else {}
        version = cfg.get("world_version", 1)
    world = build_world(a.seed, version=version)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if a.cmd == "eval":
        t = time.time()
        print(json.dumps(evaluate(model, tok, world), indent=1))
        print(f"({time.time() - t:.1f} s)")
    else:
        write_card(model, tok, world, out, model_dir, evaluate(model, tok, world))


if __name__ == "__main__":
    main()
