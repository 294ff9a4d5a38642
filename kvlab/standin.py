"""Stand-ins for real models in CI: a tiny GPT-2 and a tiny Llama that know real-world facts.

The course's users run it on hub models (gpt2-xl, GPT-J, Llama) with ROME's data files; CI has no hub
and no GPU. A stand-in reproduces what those bring that the built-in world model does not:

- **gpt2**: GPT-2 blocks with a byte-level BPE tokenizer (leading-space tokens, words split into pieces,
  so subjects and targets are several tokens);
- **llama**: Llama blocks (gated FFN, RMSNorm, rotary positions, grouped-query attention with fewer
  key/value heads than query heads) with a sentencepiece-style tokenizer ("▁" for spaces, a BOS token
  prepended to every text);

both trained from a seed, on the CPU in a few minutes, on texts made from the real facts in ROME's
formats under ``data/standin/`` (``known_1000.json``, ``counterfact.json``; see its README). A build is
cached in ``kvlab.env.cache_dir()/standin/<family>-<hash>`` (the hash covers the data, the configuration
and :data:`VERSION`), with its training texts in ``corpus.txt`` there (for a notebook's ``CORPUS``), and
loads with ``kvlab.load(path)`` or the course's ``--model PATH``::

    python -m kvlab.standin build gpt2            # prints the model's folder
    python -m kvlab.standin build llama --out DIR
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

VERSION = {"gpt2": 1, "llama": 2}   # per family; bump when its texts, tokenizer or training change
FAMILIES = ("gpt2", "llama")
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "standin"
KNOWN_FILE = DATA_DIR / "known_1000.json"
COUNTERFACT_FILE = DATA_DIR / "counterfact.json"


@dataclass(frozen=True)
class Config:
    """Sizes and training budget of a stand-in (the defaults are what CI builds)."""

    layers: int = 4
    d_model: int = 128
    d_ff: int = 512            # llama: the gated FFN's intermediate size
    heads: int = 4
    kv_heads: int = 2          # llama only: grouped-query attention
    positions: int = 96
    vocab: int = 800           # small, so that most names are several tokens
    steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    seed: int = 0


# What CI builds: the Llama learns the facts more slowly (loss 0.41 after 300 steps vs GPT-2's 0.15).
DEFAULTS = {"gpt2": Config(), "llama": Config(steps=600)}


@dataclass
class Built:
    """What :func:`build` returns: the folder ``kvlab.load`` reads, and how the build went."""

    path: Path
    family: str
    cached: bool
    seconds: float
    recall_known: float        # % of known facts whose first answer token is the argmax
    recall_counterfact: float  # % of CounterFact rewrite prompts whose true target's first token is the argmax
    n_texts: int
    final_loss: float


# ---------------------------------------------------------------------------------------------
# Texts


def fact_texts(known_file: Path = KNOWN_FILE, counterfact_file: Path = COUNTERFACT_FILE) -> list[str]:
    """The training texts: every known prompt with its answer; every CounterFact rewrite prompt,
    paraphrase and neighborhood prompt with the true target; attribute prompts with the new target
    (in CounterFact, those are other subjects that truly have it). Generation prompts are not used."""
    from .data import load_counterfact, load_known

    texts = [f"{k.prompt} {k.attribute}." for k in load_known(known_file)]
    for c in load_counterfact(counterfact_file):
        true, new = c.target_true.str, c.target_new.str
        texts.append(f"{c.rewrite_prompt} {true}.")
        texts += [f"{p} {true}." for p in c.paraphrase_prompts + c.neighborhood_prompts]
        texts += [f"{p} {new}." for p in c.attribute_prompts]
    return list(dict.fromkeys(texts))          # unique, in order


# ---------------------------------------------------------------------------------------------
# Tokenizers


def gpt2_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE as GPT-2's: words carry their leading space ("Ġ"), no BOS, eos = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=True)
    t.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=1024)


def llama_tokenizer(texts: list[str], vocab: int):
    """Sentencepiece-style BPE as Llama's: spaces become "▁", one is prepended to the text, the
    post-processor puts <s> (BOS) first; <unk>, <s>, </s> and a pad token are set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    # punctuation apart from words, as in a large sentencepiece vocabulary ("Paris" "." rather than "Par" "is.")
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
                                               pre_tokenizers.Punctuation("isolated")])
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    alphabet = sorted({ch for s in texts for ch in s.replace(" ", "▁")} | {"▁"})
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                     initial_alphabet=alphabet, show_progress=False))
    bos = t.token_to_id("<s>")
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=1024, add_bos_token=True)


# ---------------------------------------------------------------------------------------------
# Models


def model_config(family: str, cfg: Config, tok):
    import transformers as T

    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if family == "gpt2":
        return T.GPT2Config(n_layer=cfg.layers, n_embd=cfg.d_model, n_head=cfg.heads, n_inner=cfg.d_ff,
                            n_positions=cfg.positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "llama":
        return T.LlamaConfig(num_hidden_layers=cfg.layers, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                             num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                             max_position_embeddings=cfg.positions, rms_norm_eps=1e-6,
                             tie_word_embeddings=False, **ids)
    raise ValueError(f"unknown stand-in family {family!r}; choose from {FAMILIES}")


def _batches(tok, texts: list[str], cfg: Config, gen: torch.Generator):
    """Endless (ids, mask) batches of whole texts (eos appended), shuffled each epoch."""
    from .text import pad_batch

    eos = tok.eos_token_id
    rows = [tok(t)["input_ids"][:cfg.positions - 1] + [eos] for t in texts]
    while True:
        order = torch.randperm(len(rows), generator=gen).tolist()
        for i in range(0, len(order) - cfg.batch + 1, cfg.batch):
            yield pad_batch([rows[j] for j in order[i:i + cfg.batch]], eos)


def train(family: str, cfg: Config, texts: list[str], progress: bool = False):
    """A fresh model of ``family`` and its tokenizer, trained on ``texts`` (AdamW, cosine schedule)."""
    from transformers import AutoModelForCausalLM

    from .loading import dtype_kwarg

    tok = (gpt2_tokenizer if family == "gpt2" else llama_tokenizer)(texts, cfg.vocab) \
        if family in FAMILIES else None
    if tok is None:
        raise ValueError(f"unknown stand-in family {family!r}; choose from {FAMILIES}")
    torch.manual_seed(cfg.seed)
    mcfg = model_config(family, cfg, tok)
    mcfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(mcfg, **dtype_kwarg(torch.float32))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(tok, texts, cfg, gen)
    loss = torch.tensor(float("nan"))
    for step in range(cfg.steps):
        ids, mask = next(batches)                                   # (batch, seq)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress and (step % 250 == 0 or step == cfg.steps - 1):
            print(f"  step {step:5d}  loss {loss.item():.3f}", file=sys.stderr)
    model.eval().requires_grad_(False)
    return model, tok, loss.item()


# ---------------------------------------------------------------------------------------------
# Recall


def recall(model, tok, known_file: Path = KNOWN_FILE, counterfact_file: Path = COUNTERFACT_FILE
           ) -> tuple[float, float]:
    """(% of known facts, % of CounterFact rewrite prompts) whose answer's first token is the argmax."""
    from .data import load_counterfact, load_known
    from .editing.metrics import known_recall

    known = [{"prompt": k.prompt, "attribute": k.attribute} for k in load_known(known_file)]
    cf = [{"prompt": c.rewrite_prompt, "attribute": c.target_true.str} for c in load_counterfact(counterfact_file)]
    return known_recall(model, tok, known), known_recall(model, tok, cf)


# ---------------------------------------------------------------------------------------------
# Build and cache


def fingerprint(family: str, cfg: Config, known_file: Path = KNOWN_FILE,
                counterfact_file: Path = COUNTERFACT_FILE) -> str:
    """Hash of what a build depends on: the two data files, the configuration, :data:`VERSION`."""
    h = hashlib.sha256()
    h.update(json.dumps({"family": family, "config": asdict(cfg), "version": VERSION[family]}, sort_keys=True).encode())
    for f in (known_file, counterfact_file):
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:12]


def standin_dir(family: str, cfg: Config | None = None, **files) -> Path:
    """Where the stand-in of ``family`` is (or will be) cached (``cfg``: :data:`DEFAULTS` of the family)."""
    from .env import cache_dir

    cfg = cfg or DEFAULTS[family]
    return cache_dir() / "standin" / f"{family}-{fingerprint(family, cfg, **files)}"


def build(family: str = "gpt2", cfg: Config | None = None, out: str | os.PathLike | None = None,
          force: bool = False, progress: bool = False, threads: int | None = None,
          known_file: Path = KNOWN_FILE, counterfact_file: Path = COUNTERFACT_FILE) -> Built:
    """The stand-in of ``family``: loaded from the cache when built before, else trained and saved
    (``save_pretrained``, atomically) with a ``standin.json`` that records how it was made."""
    if family not in FAMILIES:
        raise ValueError(f"unknown stand-in family {family!r}; choose from {FAMILIES}")
    cfg = cfg or DEFAULTS[family]
    files = dict(known_file=Path(known_file), counterfact_file=Path(counterfact_file))
    path = Path(out) if out is not None else standin_dir(family, cfg, **files)
    info = path / "standin.json"
    if info.exists() and not force:
        meta = json.loads(info.read_text())
        if meta.get("fingerprint") == fingerprint(family, cfg, **files):
            write_corpus(path, fact_texts(**files))
            return Built(path, family, True, 0.0, meta["recall_known"], meta["recall_counterfact"],
                         meta["n_texts"], meta["final_loss"])
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        t0 = time.perf_counter()
        texts = fact_texts(**files)
        model, tok, loss = train(family, cfg, texts, progress=progress)
        seconds = time.perf_counter() - t0
        r_known, r_cf = recall(model, tok, **files)
    finally:
        torch.set_num_threads(old_threads)
    meta = dict(family=family, fingerprint=fingerprint(family, cfg, **files), version=VERSION[family],
                config=asdict(cfg), seconds=round(seconds, 1), recall_known=r_known, recall_counterfact=r_cf, n_texts=len(texts),
                final_loss=loss, data=[str(f) for f in files.values()])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "standin.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_corpus(tmp, texts)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Built(path, family, False, seconds, r_known, r_cf, len(texts), loss)


def write_corpus(path: Path, texts: list[str]) -> Path:
    """``path/corpus.txt``: the training texts, one a line, for a notebook's ``CORPUS`` parameter."""
    f = Path(path) / "corpus.txt"
    if not f.exists():
        f.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return f


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvlab.standin", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find in the cache) a stand-in and print its folder")
    b.add_argument("family", choices=FAMILIES)
    b.add_argument("--out", help="folder to save to (default: the cache)")
    b.add_argument("--steps", type=int, help="training steps (default: gpt2 300, llama 600)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--quiet", action="store_true", help="print only the folder")
    a = p.parse_args(argv)
    cfg = DEFAULTS[a.family] if a.steps is None else replace(DEFAULTS[a.family], steps=a.steps)
    r = build(a.family, cfg, out=a.out, force=a.force, progress=not a.quiet)
    if not a.quiet:
        how = "cached" if r.cached else f"built in {r.seconds:.0f} s"
        print(f"{a.family} stand-in {how}: recall {r.recall_known:.0f}% of known facts, "
              f"{r.recall_counterfact:.0f}% of CounterFact prompts ({r.n_texts} texts, loss {r.final_loss:.3f})",
              file=sys.stderr)
    print(r.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
