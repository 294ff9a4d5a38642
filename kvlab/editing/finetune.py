"""Editing by back-propagation: fine-tune the FFN *keys* or the FFN *values* (Qiu et al. 2024).

A feed-forward layer FF(x) = f(x·Kᵀ)·V has two weight matrices. Fine-tuning

* the keys   K (first layer: c_fc / fc_in / dense_h_to_4h / gate_proj + up_proj) changes *which*
  memories fire for an input;
* the values V (second layer: c_proj / fc_out / dense_4h_to_h / down_proj) changes *what* a
  memory writes into the residual stream.

Both get the same budget: Adam for ``steps`` steps at ``lr`` on the NLL of the new object
after the rewrite prompt, optionally with FT+L's L∞ norm constraint ‖W − W₀‖∞ ≤ ε (ROME's
"constrained fine-tuning" baseline). Only the weights of the chosen layers change; the edit
is a reversible :class:`WeightEdit` that records the trainable parameter count and time.

    edit = finetune_edit(model, tok, request, target="keys", layers=[1])
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..arch import adapter
from ..precision import MixedPrecision, compute_dtype
from ..text import pad_rows, prompt_ids, token_ids
from .base import EditRequest, WeightEdit, configure, param_name, recording
from .rome import check_finite, check_number, check_template, default_layer

TARGETS = ("keys", "values")


@dataclass
class FTConfig:
    """Budget of one fine-tuning edit (identical for keys and values)."""

    layers: list[int] | None = None     # None: [default_layer(model)] (ROME's editing layer)
    steps: int = 25                     # ROME's FT baseline: 25 steps
    lr: float = 5e-4                    # ROME's FT baseline: 5e-4 (see notebook 07 for the built-in model)
    norm_constraint: float | None = None  # FT+L: ε of the L∞ constraint (ROME: 5e-4 for GPT-2 XL)
    early_stop: float = 1e-2            # stop when the NLL of the new object falls below this
    extra_prompts: list[str] = field(default_factory=list)  # more prompts (with "{}") to train on

    def validate(self, where: str = "FTConfig") -> "FTConfig":
        """Raise ValueError, naming the field, for a value the edit cannot run with."""
        check_number(where, "steps", self.steps, 1, integer=True)
        check_number(where, "lr", self.lr, 0, strict=True)
        if self.norm_constraint is not None:
            check_number(where, "norm_constraint", self.norm_constraint, 0, strict=True)
        check_number(where, "early_stop", self.early_stop, 0)
        if isinstance(self.extra_prompts, str):
            raise ValueError(f"{where}: extra_prompts must be a list of prompts, got the string {self.extra_prompts!r}")
        for p in self.extra_prompts:
            check_template(where, "every extra prompt", p)
        return self


def ffn_params(model, target: str, layers: list[int]) -> list[str]:
    """Parameter names of the FFN keys or values of ``layers`` (weights only)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    arch = adapter(model)
    names = []
    for l in layers:
        mods = arch.key_modules(l) if target == "keys" else [arch.value_module(l)]
        names += [param_name(model, m, "weight") for m in mods]
    return names


def finetune_edit(model, tok, request: EditRequest | dict, target: str = "values", layers: list[int] | None = None,
                  config: FTConfig | None = None, check: bool = True, **overrides) -> WeightEdit:
    """Fine-tune the FFN ``target`` ("keys" or "values") of ``layers`` so the prompt says ``target_new``.

    ``overrides`` set :class:`FTConfig` fields (``steps=50, lr=1e-3, norm_constraint=5e-4``) of a copy
    of ``config``; they are checked up front (:meth:`FTConfig.validate`). ``layers``: None for the
    default, else a non-empty list (repeats count once). A NaN/inf loss raises and restores the weights.
    float16/bfloat16 weights are trained through float32 master copies, with loss scaling in float16
    (:class:`kvlab.precision.MixedPrecision`); the edited weights keep the model's dtype.
    Returns a :class:`WeightEdit` whose ``info`` has the loss curve and final p(new).
    """
    if not isinstance(request, EditRequest):
        request = EditRequest.from_counterfact(request)
    # a copy: the caller's config is not changed by the overrides
    cfg = configure(dataclasses.replace(config or FTConfig()), overrides, "finetune_edit")
    cfg.validate("finetune_edit")
    arch = adapter(model)
    layers = layers if layers is not None else cfg.layers if cfg.layers is not None else [default_layer(model)]
    layers = arch.check_layers(layers)   # sorted, distinct; [] and bad indices raise
    if check:
        request.check(model, tok)
    names = ffn_params(model, target, layers)

    tgt = token_ids(tok, request.target_new)
    prompts = [request.text] + [p.replace("{}", request.subject) for p in cfg.extra_prompts]
    rows, pos = [], []
    for p in prompts:
        pid = prompt_ids(tok, p)
        rows.append(pid + tgt[:-1])
        pos.append([len(pid) - 1 + j for j in range(len(tgt))])
    ids, mask = pad_rows(model, tok, rows)
    pos_t = torch.tensor(pos, device=ids.device)                      # (n, n_tgt)
    tgt_t = torch.tensor(tgt, device=ids.device).expand(len(rows), -1)  # (n, n_tgt)
    b_idx = torch.arange(len(rows), device=ids.device)[:, None]

    params = [model.get_parameter(n) for n in names]
    # float16/bfloat16 weights: Adam steps float32 masters, float16 scales the loss (kvlab.precision)
    prec = MixedPrecision(params, compute_dtype(model), where="finetune_edit")
    curve = []

    def loss_fn():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lp = logits[b_idx, pos_t].log_softmax(-1)                   # (n, n_tgt, vocab)
        return -lp.gather(-1, tgt_t[..., None])[..., 0].mean()

    with recording(model, names, method=f"FT-{target}") as edit:
        bounds = None
        if cfg.norm_constraint is not None:    # FT+L: the box ‖W − W₀‖∞ ≤ ε, in float32
            eps = cfg.norm_constraint
            bounds = [(w0 - eps, w0 + eps) for w0 in (p.detach().float() for p in params)]
        opt = torch.optim.Adam(prec.masters, lr=cfg.lr)
        with prec, torch.enable_grad():        # requires_grad and .grad restored on exit, also on error
            for step in range(cfg.steps + 1):
                nll = loss_fn()
                curve.append(float(check_finite(nll.detach(), f"finetune_edit: the loss at step {step}")))
                if step == cfg.steps or curve[-1] < cfg.early_stop:
                    break
                prec.backward(nll, again=loss_fn)
                prec.step(opt, bounds)
    edit.info = dict(target=target, layers=layers, loss=curve, nll=curve[-1], p_new=math.exp(-curve[-1]),
                     steps=len(curve) - 1, request=request)
    return edit


def ft_keys(model, tok, request, **kw) -> WeightEdit:
    """:func:`finetune_edit` on the FFN keys."""
    return finetune_edit(model, tok, request, target="keys", **kw)


def ft_values(model, tok, request, **kw) -> WeightEdit:
    """:func:`finetune_edit` on the FFN values."""
    return finetune_edit(model, tok, request, target="values", **kw)
