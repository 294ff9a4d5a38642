"""Shared pieces of every editor: what to edit (:class:`EditRequest`) and how to undo it (:class:`WeightEdit`).

    req = EditRequest("{} lives in", "Anna Berg", target_new="Kelmor", target_true="Varnholm")
    edit = apply_rome(model, tok, req)        # any editor returns a WeightEdit
    edit.undo()                               # bit-for-bit the original weights
    edit.apply()                              # and back again
    with apply_rome(model, tok, req):         # or: undone when the block ends
        ...

Edits that change the same weights stack: undo them in reverse order (the last one first).
``undo``/``apply`` check that the weights are exactly what they expect and raise
:class:`EditStateError`, naming the edit in the way, instead of writing wrong weights.

An editor records the parameters it is about to change with :func:`recording`::

    with recording(model, [name], method="ROME") as edit:
        param += delta                        # change the weights in place
    return edit                               # original + edited copies saved, state "applied"

If the body raises, the original weights are put back before the exception propagates.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from ..text import encode, token_ids


# ---------------------------------------------------------------------------------------------
# What to edit


@dataclass
class EditRequest:
    """One fact to rewrite: ``prompt.format(subject)`` should be followed by ``target_new``.

    ``prompt`` contains "{}" exactly once where the subject goes (CounterFact's
    ``requested_rewrite.prompt``), e.g. ``"{} lives in"``. ``target_true`` is the old object
    (optional, used by metrics and by the knowledge-neuron edit).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None

    def __post_init__(self):
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError(f"EditRequest: empty subject {self.subject!r}")
        if not isinstance(self.prompt, str) or "{}" not in self.prompt:
            hint = (f"; the subject {self.subject!r} occurs in it, write the prompt as "
                    f"{self.prompt.replace(self.subject, '{}', 1)!r}"
                    if isinstance(self.prompt, str) and self.subject in self.prompt else "")
            raise ValueError(f"EditRequest: prompt {self.prompt!r} has no '{{}}' placeholder for the subject{hint}")
        if self.prompt.count("{}") != 1:
            raise ValueError(f"EditRequest: prompt {self.prompt!r} must contain '{{}}' exactly once")
        if "{" in self.prompt.replace("{}", "") or "}" in self.prompt.replace("{}", ""):
            raise ValueError(f"EditRequest: prompt {self.prompt!r} has braces besides the one '{{}}' for the "
                             f"subject (a template field such as '{{sport}}' is not filled in)")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise ValueError(f"EditRequest: empty target_new {self.target_new!r}")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise ValueError(f"EditRequest: target_new {self.target_new!r} equals target_true: nothing to edit")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in, e.g. ``"Anna Berg lives in"``."""
        return self.prompt.replace("{}", self.subject)

    @classmethod
    def from_text(cls, text: str, subject: str, target_new: str, **kw) -> "EditRequest":
        """Build from a filled-in prompt: ``from_text("Anna Berg lives in", "Anna Berg", "Kelmor")``."""
        if not subject or subject not in text:
            raise ValueError(f"EditRequest: subject {subject!r} not found in prompt {text!r}")
        return cls(text.replace(subject, "{}", 1), subject, target_new, **kw)

    @classmethod
    def from_counterfact(cls, record) -> "EditRequest":
        """From a CounterFact record: a dict in ROME's schema (``record["requested_rewrite"]``), the
        rewrite dict itself, or a :class:`kvlab.data.EditCase`."""
        if isinstance(record, EditRequest):
            return record
        record = as_record(record)
        rw = record.get("requested_rewrite", record)
        try:
            new, true = rw["target_new"], rw.get("target_true")
            return cls(rw["prompt"], rw["subject"], new["str"] if isinstance(new, dict) else new,
                       (true["str"] if isinstance(true, dict) else true) if true is not None else None,
                       rw.get("relation_id"))
        except KeyError as e:
            raise ValueError(f"not a CounterFact record: missing key {e}") from None

    def check(self, model, tok) -> None:
        """Raise ValueError if the subject is not a span of the tokenised prompt, or if the model
        already answers ``target_new`` (greedy decoding of as many tokens as the target has)."""
        from ..text import subject_token_range
        subject_token_range(tok, self.text, self.subject)  # raises if the subject covers no token
        current = current_answer_ids(model, tok, self.text, len(token_ids(tok, self.target_new)))
        if current == token_ids(tok, self.target_new):
            raise ValueError(f"EditRequest: the model already answers {self.target_new!r} to {self.text!r}; "
                             f"pick a different target_new")


def configure(config, overrides: dict, where: str):
    """Set ``overrides`` on the dataclass ``config`` (in place); an unknown field raises, naming ``where``."""
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise ValueError(f"{where}: unknown option {k!r}")
        setattr(config, k, v)
    return config


def as_record(record) -> dict:
    """A record as a plain dict: dataclasses (``kvlab.data.EditCase``/``KnownFact``) are converted."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.asdict(record)
    if not isinstance(record, dict):
        raise ValueError(f"expected a CounterFact/known-fact record (dict or dataclass), got {type(record).__name__}")
    return record


@torch.no_grad()
def current_answer_ids(model, tok, text: str, n_tokens: int = 1) -> list[int]:
    """Greedy continuation of ``text``: ``n_tokens`` token ids (in eval mode; non-finite logits raise,
    naming the non-finite parameter, rather than answer the argmax of NaNs)."""
    from ..checks import finite_output
    from ..tracing import eval_mode

    ids = encode(model, tok, text).input_ids  # (1, seq)
    out = []
    with torch.no_grad(), eval_mode(model):
        for _ in range(n_tokens):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]   # (vocab,)
            nxt = finite_output(model, logits, "current_answer", f"the logits after {text!r}").argmax()
            out.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


def current_answer(model, tok, text: str, n_tokens: int = 1) -> str:
    """The model's greedy answer to ``text`` as a string (``n_tokens`` tokens)."""
    return tok.decode(current_answer_ids(model, tok, text, n_tokens)).strip()


# ---------------------------------------------------------------------------------------------
# Reversible weight edits


class EditStateError(RuntimeError):
    """The weights are not in the state an edit's ``undo``/``apply`` starts from (e.g. a later
    edit of the same weights is still applied: undo edits in reverse order)."""


_EDITS: "weakref.WeakSet[WeightEdit]" = weakref.WeakSet()   # committed edits still referenced somewhere
_NUMBERS = itertools.count(1)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (unlike ``torch.equal``, a NaN equals itself and 0.0 differs from -0.0)."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.detach().flatten().view(torch.uint8), b.detach().flatten().view(torch.uint8)))


class WeightEdit:
    """A reversible change of some parameters of a model.

    Holds a copy of each parameter before (``originals``) and after (``edited``) the edit.
    :meth:`undo` copies the originals back (bit-for-bit, ``torch.equal``), :meth:`apply`
    copies the edited weights back; both are no-ops when already in that state, and both
    raise :class:`EditStateError` if the weights are not exactly the edited (for undo) or
    original (for apply) ones, e.g. because a later edit of the same weights is applied.
    Used as a context manager, the edit is (re)applied on entry and undone on exit.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], method: str = "edit"):
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("WeightEdit: no parameters named")
        self.model = model
        self.method = method
        self.params: dict[str, nn.Parameter] = {n: model.get_parameter(n) for n in names}
        self.originals: dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in self.params.items()}
        self.edited: dict[str, torch.Tensor] | None = None
        self.applied = False
        self.seconds = 0.0                      # wall time of the edit computation
        self.info: dict = {}                    # method-specific results (k*, v*, layer, loss...)
        self.n_params = sum(p.numel() for p in self.params.values())  # parameters allowed to change
        self.number = next(_NUMBERS)            # names the edit in error messages

    # -- bookkeeping ---------------------------------------------------------------------------
    def commit(self) -> "WeightEdit":
        """Record the current weights as the edited state (called once the editor is done)."""
        self.edited = {n: p.detach().clone() for n, p in self.params.items()}
        self.applied = True
        _EDITS.add(self)
        return self

    @torch.no_grad()
    def _load(self, source: dict[str, torch.Tensor], previous: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``source`` into every parameter, all or nothing: if a write fails or is interrupted (an
        exception, KeyboardInterrupt), every parameter written so far, the interrupted one included, gets
        ``previous`` back (in a ``finally``) before the exception propagates. ``previous``: the state the
        weights were verified to be in (None: no rollback)."""
        started: list[str] = []
        done = False
        try:
            for n, p in self.params.items():
                started.append(n)                     # before the copy: an interrupted copy may have written part
                p.copy_(source[n])
            done = True
        finally:
            if not done and previous is not None:
                for n in started:
                    self.params[n].copy_(previous[n])

    def undo(self) -> "WeightEdit":
        """Restore the original weights exactly. Safe to call twice. All or nothing: the weights are checked
        before anything is written, and a write that fails or is interrupted (KeyboardInterrupt) puts back
        the ones already written, so the edit stays applied with its weights intact."""
        if self.applied:
            if self.edited is not None:
                self._expect(self.edited, "undo")
            self._load(self.originals, previous=self.edited)
            self.applied = False
        return self

    def apply(self) -> "WeightEdit":
        """Re-apply the edited weights. Safe to call twice. All or nothing, as :meth:`undo`."""
        if self.edited is None:
            raise ValueError("WeightEdit.apply: the edit was never committed")
        if not self.applied:
            self._expect(self.originals, "apply")
            self._load(self.edited, previous=self.originals)
            self.applied = True
        return self

    def _expect(self, state: dict[str, torch.Tensor], action: str) -> None:
        """Raise EditStateError unless every parameter equals ``state`` bit-for-bit."""
        what = "has changed since this edit" if action == "undo" else "is not the weight this edit was made from"
        for n, p in self.params.items():       # a conversion (model.half(), .to(dtype)) changes every weight
            if p.dtype != state[n].dtype or p.shape != state[n].shape:
                change = (f"changed dtype from {str(state[n].dtype).replace('torch.', '')} to "
                          f"{str(p.dtype).replace('torch.', '')}" if p.dtype != state[n].dtype else
                          f"changed shape from {tuple(state[n].shape)} to {tuple(p.shape)}")
                raise EditStateError(
                    f"cannot {action} {self.name}: {n} {change} since this edit (e.g. model.half() or "
                    f"model.to(dtype)); the edit's copies are {str(state[n].dtype).replace('torch.', '')} and "
                    f"the conversion does not round-trip bit-for-bit: undo edits before converting the model, or "
                    f"reload it. Nothing was changed.")
        changed = [n for n, p in self.params.items() if not _same_bits(p, state[n].to(p.device))]
        if not changed:
            return
        others = sorted((e for e in _EDITS if e is not self and e.model is self.model
                         and not set(e.params).isdisjoint(changed)), key=lambda e: e.number)
        in_way = [e for e in others if e.applied and (action == "apply" or e.number > self.number)]
        if in_way:
            fix = (f"undo {', '.join(e.name for e in reversed(in_way))} first "
                   f"(edits of the same weights are undone in reverse order)")
        elif action == "apply" and any(e.number < self.number for e in others):
            fix = (f"apply {', '.join(e.name for e in others if e.number < self.number)} first "
                   f"(edits of the same weights are re-applied in the order they were made)")
        else:
            fix = "they were changed by something else (training, a direct write, or an edit no longer referenced)"
        raise EditStateError(f"cannot {action} {self.name}: {changed[0]} {what}; {fix}. Nothing was changed.")

    @property
    def name(self) -> str:
        """E.g. ``ROME edit #2 ('anna berg lives in' -> 'rome')``, for messages."""
        req = self.info.get("request")
        what = f" ({req.text!r} -> {req.target_new!r})" if isinstance(req, EditRequest) else ""
        return f"{self.method} edit #{self.number}{what}"

    def delta(self, name: str | None = None) -> torch.Tensor:
        """Edited minus original weights of one parameter (the only one if ``name`` is None)."""
        if self.edited is None:
            raise ValueError("WeightEdit.delta: the edit was never committed")
        name = name or next(iter(self.params))
        return self.edited[name] - self.originals[name]

    def changed_params(self) -> int:
        """Number of scalar weights that differ between original and edited state."""
        if self.edited is None:
            return 0
        return int(sum((self.edited[n] != self.originals[n]).sum() for n in self.params))

    def __enter__(self) -> "WeightEdit":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "applied" if self.applied else "undone"
        return (f"WeightEdit({self.method}, {len(self.params)} tensor(s), {self.n_params:,} params, {state}, "
                f"{self.seconds:.2f}s)")


@contextmanager
def recording(model: nn.Module, names: Iterable[str], method: str = "edit") -> Iterator[WeightEdit]:
    """Snapshot the named parameters, let the body change them, then commit.

    On an exception inside the body the originals are restored before it propagates,
    so a failed edit never leaves the model half-modified.
    """
    edit = WeightEdit(model, names, method)
    t0 = time.perf_counter()
    edit.applied = True  # from here on the live weights may differ from the originals
    try:
        yield edit
    except BaseException:
        edit._load(edit.originals)
        edit.applied = False
        raise
    edit.commit()
    edit.seconds = time.perf_counter() - t0


def snapshot(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Copies of the named parameters (all if None), for checking that weights came back exactly."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else list(names)
    return {n: params[n].detach().clone() for n in names}


def same_weights(model: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    """True if every saved parameter equals the model's current one bit-for-bit."""
    params = dict(model.named_parameters())
    return all(torch.equal(params[n], t) for n, t in saved.items())


def undo_all(edits: Iterable[WeightEdit]) -> None:
    """Undo a sequence of edits in reverse order (the last edit first)."""
    for e in reversed(list(edits)):
        e.undo()


def param_name(model: nn.Module, module: nn.Module, what: str = "weight") -> str:
    """Full parameter name of ``module.<what>`` inside ``model`` (e.g. ``transformer.h.3.mlp.c_proj.weight``)."""
    for name, m in model.named_modules():
        if m is module:
            return f"{name}.{what}" if name else what
    raise ValueError("module is not part of this model")
