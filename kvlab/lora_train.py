"""A small fine-tuning loop for (prompt, answer) tasks, and instruction tasks built from the world.

The loss is the cross-entropy of the *answer* tokens only (the prompt is context), and
accuracy is teacher-forced exact match: every answer token is the model's argmax. Works on
any causal LM, typically a ``PeftModel`` from :func:`kvlab.lora.wrap`.

    from kvlab import lora, lora_train
    train, test = lora_train.world_tasks(build_world(0), n_train=400, n_test=200)
    pm = lora.wrap(model, "keys", r=8)
    hist = lora_train.train(pm, tok, train, test, lora_train.TrainConfig(epochs=5, lr=1e-2))
    hist.eval_acc[-1], hist.seconds
"""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .arch import model_device
from .precision import MixedPrecision, compute_dtype
from .text import ensure_pad, token_ids


@dataclass(frozen=True)
class Example:
    """One supervised example: the model reads ``prompt`` and must continue with ``answer``."""

    prompt: str
    answer: str
    task: str = "task"


@dataclass
class TrainConfig:
    """Optimisation settings. Qiu et al. (Llama-2-7B): lr 2e-4, 5 epochs (see ``kvlab.lora.QIU``)."""

    epochs: int = 5
    lr: float = 2e-4
    batch_size: int = 16
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup: float = 0.1         # fraction of steps with linear warmup; then linear decay to 0 (as HF Trainer)
    seed: int = 0
    progress: bool = True
    eval_train: bool = False    # also measure accuracy on the whole training set after every epoch

    def validate(self, where: str = "TrainConfig") -> "TrainConfig":
        """``self`` if every setting is usable, else ValueError naming the field, its value and what is accepted."""
        checks.integer(where, "epochs", self.epochs)
        checks.integer(where, "batch_size", self.batch_size)
        checks.number(where, "lr", self.lr, 0, strict=True, accepted="the AdamW learning rate")
        checks.number(where, "weight_decay", self.weight_decay, 0)
        checks.number(where, "max_grad_norm", self.max_grad_norm, 0, strict=True,
                      accepted="gradients are clipped to this norm")
        checks.number(where, "warmup", self.warmup, 0, high=1, accepted="the fraction of steps with linear warmup")
        return self


@dataclass
class History:
    """What happened during training. Index 0 of the per-epoch lists is *before* training."""

    step_loss: list[float] = field(default_factory=list)     # training loss of every step
    train_loss: list[float] = field(default_factory=list)    # per epoch (mean over steps; [0]: eval of train set)
    eval_loss: list[float] = field(default_factory=list)     # per epoch, held-out examples
    eval_acc: list[float] = field(default_factory=list)      # per epoch, held-out exact-match accuracy
    task_acc: list[dict[str, float]] = field(default_factory=list)  # per epoch, accuracy per task
    train_acc: list[float] = field(default_factory=list)     # per epoch, training-set accuracy (eval_train)
    epoch_seconds: list[float] = field(default_factory=list)  # training time of each epoch (no eval)
    trainable: int = 0

    @property
    def seconds(self) -> float:
        """Wall time spent in training steps (evaluation excluded)."""
        return sum(self.epoch_seconds)


# --- tokenising ------------------------------------------------------------------------


def _tokenize(tok, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    """Per example: (prompt + answer token ids, number of prompt tokens)."""
    if not examples:
        raise ValueError("no examples given")
    out = []
    for ex in examples:
        if not isinstance(ex, Example) or not ex.prompt or not ex.answer.strip():
            raise ValueError(f"every example needs a non-empty prompt and answer, got {ex!r}")
        p = tok(ex.prompt)["input_ids"]
        out.append((p + token_ids(tok, ex.answer), len(p)))
    return out


def collate(tok, items: list[tuple[list[int], int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, answer_mask), each (batch, seq).

    ``answer_mask[b, t]`` is True where token t of row b is an answer token, i.e. where the
    logits at position t - 1 are scored.
    """
    ensure_pad(tok)
    seq = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), seq), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), seq), dtype=torch.long)
    ans = torch.zeros((len(items), seq), dtype=torch.bool)
    for b, (row, n_prompt) in enumerate(items):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
        ans[b, n_prompt:len(row)] = True
    return ids.to(device), mask.to(device), ans.to(device)


def answer_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, ans: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL over answer tokens, and per-row exact match (every answer token is the argmax)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]   # (batch, seq-1, vocab)
    target, scored = ids[:, 1:], ans[:, 1:]                              # (batch, seq-1)
    nll = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")  # (batch, seq-1)
    loss = (nll * scored).sum() / scored.sum()
    hit = (logits.argmax(-1) == target) | ~scored                        # (batch, seq-1)
    return loss, hit.all(-1)


# --- evaluation and training ----------------------------------------------------------------


@contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Give every submodule of ``model`` its train/eval mode back when the block ends, however it ends
    (an error, a KeyboardInterrupt): dropout left on would make every later forward pass random."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


@torch.no_grad()
def evaluate(model: nn.Module, tok, examples: Sequence[Example], batch_size: int = 64
             ) -> tuple[float, float, dict[str, float]]:
    """(mean answer loss, exact-match accuracy, accuracy per task) on ``examples``.

    The model runs in eval mode, its mode given back afterwards (also on error or KeyboardInterrupt);
    a NaN/inf loss raises ValueError naming the weight that caused it."""
    batch_size = checks.integer("evaluate", "batch_size", batch_size)
    items, device = _tokenize(tok, examples), model_device(model)
    losses, hits = [], []
    with _modes_kept(model):
        model.eval()
        for i in range(0, len(items), batch_size):
            loss, hit = answer_loss(model, *collate(tok, items[i:i + batch_size], device))
            checks.finite_output(model, loss.detach(), "lora_train.evaluate", "the answer loss")
            losses.append(loss.item() * len(hit))
            hits.append(hit.cpu())
    hits = torch.cat(hits).float()
    tasks = sorted({ex.task for ex in examples})
    per_task = {t: hits[[i for i, ex in enumerate(examples) if ex.task == t]].mean().item() for t in tasks}
    return sum(losses) / len(items), hits.mean().item(), per_task


def train(model: nn.Module, tok, train_set: Sequence[Example], eval_set: Sequence[Example] | None = None,
          config: TrainConfig | None = None) -> History:
    """Fine-tune the parameters of ``model`` that require grad (the LoRA matrices) with AdamW.

    Evaluates before training and after every epoch; returns a :class:`History`. The model trains in
    training mode (dropout on) and is given back in the mode it was handed in (every submodule's own mode;
    eval mode for a model from ``kvlab.load`` / ``lora.wrap``), on any exit: also on an error or a
    KeyboardInterrupt. A NaN/inf training loss raises ValueError (naming the weight, if one is NaN/inf).
    """
    from tqdm.auto import tqdm

    cfg = (config or TrainConfig()).validate("lora_train.train")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: wrap it with kvlab.lora.wrap first")
    eval_set = eval_set or []
    items, device = _tokenize(tok, train_set), model_device(model)
    # float16/bfloat16 trainables: AdamW steps float32 masters; a float16 model scales the loss (kvlab.precision).
    # peft's adapters are float32 already (autocast_adapter_dtype): they are their own masters.
    prec = MixedPrecision(params, compute_dtype(model), where="lora_train.train")
    opt = torch.optim.AdamW(prec.masters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = torch.Generator().manual_seed(cfg.seed)
    h = History(trainable=sum(p.numel() for p in params))

    def log_eval(train_loss: float | None):
        if train_loss is None or cfg.eval_train:
            tl, ta, _ = evaluate(model, tok, train_set)
            h.train_acc.append(ta)
            train_loss = tl if train_loss is None else train_loss
        h.train_loss.append(train_loss)
        if eval_set:
            el, ea, per_task = evaluate(model, tok, eval_set)
            h.eval_loss.append(el)
            h.eval_acc.append(ea)
            h.task_acc.append(per_task)

    with _modes_kept(model):    # the mode it was handed in, on any exit (an error, a KeyboardInterrupt too)
        log_eval(None)
        n_steps = (len(items) + cfg.batch_size - 1) // cfg.batch_size
        total, warm = cfg.epochs * n_steps, max(1, int(cfg.warmup * cfg.epochs * n_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
        bar = tqdm(total=cfg.epochs * n_steps, desc="LoRA", disable=not cfg.progress, leave=False)
        with prec, bar:
            for epoch in range(cfg.epochs):
                model.train()
                t0, losses = time.perf_counter(), []
                order = torch.randperm(len(items), generator=rng).tolist()
                for i in range(0, len(order), cfg.batch_size):
                    batch = collate(tok, [items[j] for j in order[i:i + cfg.batch_size]], device)
                    loss, _ = answer_loss(model, *batch)
                    if not bool(torch.isfinite(loss.detach())):
                        checks.finite_output(model, loss.detach(), "lora_train.train",
                                             f"the training loss at step {len(h.step_loss) + len(losses)}")
                    prec.backward(loss, again=lambda b=batch: answer_loss(model, *b)[0])
                    torch.nn.utils.clip_grad_norm_(prec.masters, cfg.max_grad_norm)
                    prec.step(opt)
                    sched.step()
                    losses.append(loss.item())
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                h.epoch_seconds.append(time.perf_counter() - t0)
                h.step_loss += losses
                model.eval()
                log_eval(sum(losses) / len(losses))
    return h


# --- instruction tasks from the world ----------------------------------------------------------

# One word per person relation, used by the question and classification formats (all in the
# world's vocabulary: the world tokenizer maps unknown words to <unk>).
RELATION_WORDS = {"P19": "born", "P551": "home", "P106": "job", "P108": "employer", "P641": "sport",
                  "P1303": "instrument"}
TASKS = ("question", "verify", "classify")


def world_tasks(world, n_train: int = 400, n_test: int = 200, test_people: float = 0.25, seed: int = 0,
                tasks: Sequence[str] = TASKS) -> tuple[list[Example], list[Example]]:
    """Three instruction tasks in formats the world model never saw, with held-out people.

    * ``question`` — "Anna Berg : job ?" -> "teacher" (recall a known fact in a new format);
    * ``verify`` — "Anna Berg lives in Kelmor ?" -> "yes"/"no" (half the claims are false,
      with a wrong object of the same relation; like BoolQ);
    * ``classify`` — "Anna Berg plays the piano :" -> "instrument" (relation classification;
      training uses the training phrasings, the test the held-out phrasings).

    People are split: a fraction ``test_people`` of them appear only in the test set. All
    facts are in the world model's training corpus, so the test asks whether the new
    format transfers to facts the tuning never showed in it.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    if not 0 < test_people < 1:
        raise ValueError(f"test_people must be a fraction in (0, 1), got {test_people}")
    if n_train < 1 or n_test < 1:
        raise ValueError("n_train and n_test must be positive")
    rng = random.Random(f"lora-tasks-{seed}")
    people = list(world.people)
    rng.shuffle(people)
    n_test_people = max(1, int(len(people) * test_people))
    split_people = {"test": set(people[:n_test_people]), "train": set(people[n_test_people:])}
    facts = {s: [f for f in world.facts if f.subject in ps and f.relation_id in RELATION_WORDS]
             for s, ps in split_people.items()}

    def example(fact, task: str, split: str) -> Example:
        rel = world.relations[fact.relation_id]
        templates = rel.train if split == "train" else rel.heldout
        if task == "question":
            return Example(f"{fact.subject} : {RELATION_WORDS[fact.relation_id]} ?", fact.object, task)
        if task == "verify":
            true = rng.random() < 0.5
            obj = fact.object if true else rng.choice([o for o in rel.objects if o != fact.object])
            return Example(f"{rng.choice(rel.train).format(fact.subject)} {obj} ?", "yes" if true else "no", task)
        return Example(f"{rng.choice(templates).format(fact.subject)} {fact.object} :",
                       RELATION_WORDS[fact.relation_id], task)

    def make(split: str, n: int) -> list[Example]:
        return [example(rng.choice(facts[split]), tasks[i % len(tasks)], split) for i in range(n)]

    return make("train", n_train), make("test", n_test)
