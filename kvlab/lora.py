"""LoRA on FFN keys vs values (Qiu et al. 2024), with peft, for every kvlab family.

A feed-forward layer is a key-value memory, FF(x) = f(x·Kᵀ)·V (Geva et al. 2021). Qiu et
al. ask which half to update when fine-tuning: the **keys** (first FFN matrix: c_fc /
fc_in / dense_h_to_4h / gate_proj + up_proj) or the **values** (second: c_proj / fc_out /
dense_4h_to_h / down_proj). LoRA replaces a weight W (d_out, d_in) by

    W + (alpha / r) · B A          A: (r, d_in), B: (d_out, r), B = 0 at the start

so each adapted matrix adds r · (d_in + d_out) trainable parameters.

Roles are mapped to *full* module names (``transformer.h.3.mlp.c_proj``), never to bare
leaf names: on GPT-2 ``c_proj`` is both the MLP value and the attention output projection,
and a bare ``"c_proj"`` in peft's ``target_modules`` would adapt both.

    from kvlab import lora
    cfg = lora.lora_config(model, roles=("keys",), r=8)
    peft_model = lora.wrap(model, ("keys",), r=8)          # wraps a deep copy: `model` is untouched
    lora.trainable_parameters(peft_model)                  # (count, total, fraction)
    lora.equal_param_rank(model, ("values",), lora.lora_param_count(model, ("keys",), 8))
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from . import checks
from .arch import Adapter, adapter, model_device

ROLE_GROUPS = ("keys", "values", "attention")

# Qiu et al. (2024), LoRA on Llama-2-7B: r=8, alpha=16, dropout 0.1, lr 2e-4, 5 epochs,
# target modules q_proj, v_proj + (up_proj or gate_proj: "keys") vs (down_proj: "values").
QIU = dict(r=8, alpha=16, dropout=0.1, lr=2e-4, epochs=5)


@dataclass(frozen=True)
class Target:
    """One matrix LoRA adapts: its full module name, role and shape (as nn.Linear sees it)."""

    name: str       # e.g. "transformer.h.3.mlp.c_fc"
    role: str       # "keys", "values" or "attention"
    layer: int
    d_in: int
    d_out: int

    def lora_params(self, r: int) -> int:
        """Trainable parameters of a rank-r adapter: A (r, d_in) + B (d_out, r)."""
        return r * (self.d_in + self.d_out)


# --- roles -> modules -------------------------------------------------------------------


def _block_paths(arch: Adapter) -> dict[str, tuple[str, ...]]:
    """Within-block dotted paths of every role, e.g. gpt2 values -> ("mlp.c_proj",)."""
    f = arch.family
    return {"keys": tuple(f"{f.mlp}.{k}" for k in f.keys),
            "values": (f"{f.mlp}.{f.value}",),
            "attention": tuple(f.attn_modules)}


def _resolve_role(arch: Adapter, role: str) -> list[tuple[str, str]]:
    """(role group, within-block path) pairs that one role name selects.

    A role is a group ("keys", "values", "attention"), a within-block path of this family
    ("mlp.c_proj", "attn.c_proj", "self_attn.q_proj") or a leaf name that is unambiguous in
    this family ("up_proj", "q_proj", "c_fc"). GPT-2's bare "c_proj" is ambiguous and raises.
    """
    paths = _block_paths(arch)
    if not isinstance(role, str) or not role:
        raise ValueError(f"a LoRA role must be a non-empty string, got {role!r}")
    if role in paths:
        return [(role, p) for p in paths[role]]
    by_path = [(g, p) for g, ps in paths.items() for p in ps if p == role]
    if by_path:
        return by_path
    by_leaf = [(g, p) for g, ps in paths.items() for p in ps if p.split(".")[-1] == role]
    if len(by_leaf) > 1:
        raise ValueError(f"role {role!r} is ambiguous in {arch.name}: it names "
                         f"{', '.join(p for _, p in by_leaf)}; use a group ('values', 'attention') "
                         f"or a within-block path instead")
    if by_leaf:
        return by_leaf
    known = sorted({p for ps in paths.values() for p in ps} | {p.split('.')[-1] for ps in paths.values() for p in ps})
    raise ValueError(f"unknown LoRA role {role!r} for {arch.name}: use one of {ROLE_GROUPS} "
                     f"or a module of this family: {', '.join(known)}")


def _linear_shape(module: nn.Module, conv1d: bool) -> tuple[int, int]:
    """(d_in, d_out) of a Linear (weight (out, in)) or GPT-2 Conv1D (weight (in, out))."""
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        raise ValueError(f"{type(module).__name__} has no 2-d weight; LoRA needs a linear layer")
    d_out, d_in = w.shape
    return (d_out, d_in) if conv1d and type(module).__name__ == "Conv1D" else (d_in, d_out)


def targets(model: nn.Module, roles: str | Sequence[str], layers: Iterable[int] | None = None) -> list[Target]:
    """The matrices a LoRA on ``roles`` adapts, in layer order (duplicates removed).

    ``roles``: e.g. "keys", ("values",), ("attention", "keys"), ("q_proj", "v_proj", "up_proj").
    ``layers``: indices to adapt (default: all layers).
    """
    arch = adapter(getattr(model, "get_base_model", lambda: model)())
    if isinstance(roles, str):
        roles = (roles,)
    if not roles:
        raise ValueError("no LoRA roles given: use e.g. ('keys',), ('values',) or ('attention', 'keys')")
    pairs = list(dict.fromkeys(pair for role in roles for pair in _resolve_role(arch, role)))
    out = []
    for l in arch.check_layers(layers):
        block = arch.layer(l)
        prefix = f"{arch.family.layers}.{l}"
        for group, path in pairs:
            d_in, d_out = _linear_shape(block.get_submodule(path), arch.family.conv1d)
            out.append(Target(f"{prefix}.{path}", group, l, d_in, d_out))
    return out


def target_modules(model: nn.Module, roles: str | Sequence[str], layers: Iterable[int] | None = None) -> list[str]:
    """Full module names for peft's ``target_modules`` (exact names: no suffix ambiguity)."""
    return [t.name for t in targets(model, roles, layers)]


def lora_param_count(model: nn.Module, roles: str | Sequence[str], r: int,
                     layers: Iterable[int] | None = None) -> int:
    """Trainable parameters of a rank-r LoRA on ``roles``: Σ r · (d_in + d_out) over matrices."""
    _check_rank(r)
    return sum(t.lora_params(r) for t in targets(model, roles, layers))


def equal_param_rank(model: nn.Module, roles: str | Sequence[str], n_params: int,
                     layers: Iterable[int] | None = None) -> int:
    """The rank (≥ 1) whose LoRA on ``roles`` has the parameter count closest to ``n_params``.

    E.g. on Llama the keys are two matrices (gate, up) and the values one (down), so values
    at rank 2r match keys at rank r; on GPT-2 c_fc and c_proj have the same size.
    """
    if not isinstance(n_params, int) or n_params <= 0:
        raise ValueError(f"n_params must be a positive int, got {n_params!r}")
    per_rank = lora_param_count(model, roles, 1, layers)
    lo = max(1, n_params // per_rank)
    return min((lo, lo + 1), key=lambda r: (abs(r * per_rank - n_params), r))


def check_alpha(alpha) -> float:
    """``alpha`` if it is a finite number > 0 (LoRA scales B·A by alpha / r: 0 switches the adapter off, NaN/inf
    make every output NaN), else ValueError."""
    checks.number("lora", "alpha", alpha, 0, strict=True,
                  accepted="the update B·A is scaled by alpha / r; Qiu et al.: 16")
    return alpha


def _check_rank(r: int) -> None:
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")


# --- peft ----------------------------------------------------------------------------


def lora_config(model: nn.Module, roles: str | Sequence[str], r: int = QIU["r"], alpha: float = QIU["alpha"],
                dropout: float = QIU["dropout"], layers: Iterable[int] | None = None):
    """A ``peft.LoraConfig`` adapting exactly the modules of ``roles`` (defaults: Qiu et al.).

    ``alpha``: a finite number > 0 (the update is scaled by alpha / r); ``dropout``: in [0, 1)."""
    from peft import LoraConfig

    _check_rank(r)
    alpha = check_alpha(alpha)
    dropout = checks.number("lora_config", "dropout", dropout, 0, high=1, high_strict=True,
                            accepted="the LoRA dropout probability; Qiu et al.: 0.1")
    arch = adapter(model)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=target_modules(model, roles, layers), fan_in_fan_out=arch.family.conv1d)


def qiu_roles(model: nn.Module, memory: str, key_proj: str | None = None) -> tuple[str, ...]:
    """Qiu et al.'s target modules: q_proj, v_proj + one key matrix ("keys") or the value ("values").

    On Llama: ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj") / (..., "mlp.down_proj");
    ``key_proj`` picks "up_proj" (default) or "gate_proj". Families with a fused q/k/v matrix
    (GPT-2 c_attn, NeoX query_key_value) use it in place of q_proj + v_proj.
    """
    if memory not in ("keys", "values"):
        raise ValueError(f"memory must be 'keys' or 'values', got {memory!r}")
    arch = adapter(model)
    attn = [p for p in arch.family.attn_modules if p.split(".")[-1] in ("q_proj", "v_proj")] or \
           [arch.family.attn_modules[0]]   # fused qkv: c_attn / query_key_value
    keys = _block_paths(arch)["keys"]
    if memory == "values":
        return (*attn, *_block_paths(arch)["values"])
    if key_proj is None:
        key = keys[-1]                     # up_proj on gated FFNs, the only key matrix otherwise
    else:
        key = next((k for k in keys if k.split(".")[-1] == key_proj), None)
        if key is None:
            raise ValueError(f"key_proj {key_proj!r} is not a key matrix of {arch.name}: "
                             f"{', '.join(k.split('.')[-1] for k in keys)}")
    return (*attn, key)


def wrap(model: nn.Module, roles: str | Sequence[str], r: int = QIU["r"], alpha: float = QIU["alpha"],
         dropout: float = QIU["dropout"], layers: Iterable[int] | None = None, copy_model: bool = True,
         seed: int = 0):
    """A ``PeftModel`` with LoRA on ``roles``; only the LoRA matrices require grad.

    peft edits the model it wraps in place (it swaps Linear layers for LoRA layers), so by
    default a deep copy is wrapped and ``model`` (e.g. the one ``kvlab.load()`` returned)
    stays exactly as it was. With ``copy_model=False`` (big models on a small GPU) the
    model itself is wrapped: call :func:`unload` afterwards to get it back bit-for-bit.
    The LoRA matrices are float32 whatever the model's dtype (peft's ``autocast_adapter_dtype``).
    The peft model comes back in the mode ``model`` is in (eval mode, LoRA dropout off, for ``kvlab.load``'s);
    :func:`kvlab.lora_train.train` switches dropout on while it trains. ``alpha``: a finite number > 0.
    """
    from peft import get_peft_model

    already = lora_modules(model)
    if hasattr(model, "peft_config") or already:
        found = f" ({len(already)} LoRA modules, e.g. {already[0]})" if already else ""
        raise ValueError(f"lora.wrap: this {type(model).__name__} is already wrapped by peft{found}; wrapping it "
                         f"again would replace its adapters. Wrap the original model, or call "
                         f"lora.unload(peft_model) first to get it back.")
    cfg = lora_config(model, roles, r, alpha, dropout, layers)
    wanted = set(target_modules(model, roles, layers))  # peft may shorten a long list to suffixes
    base = copy.deepcopy(model) if copy_model else model
    with _seeded(seed, model_device(model)):  # LoRA's A is randomly initialised
        # float32 adapters on a float16/bfloat16 model (peft's default from 0.12 on, said here on purpose): they
        # are the optimiser's master weights in lora_train.train (kvlab.precision)
        peft_model = get_peft_model(base, cfg, autocast_adapter_dtype=True)
    wrapped = set(lora_modules(peft_model))
    if wrapped != wanted:
        raise RuntimeError(f"peft adapted {sorted(wrapped ^ wanted)} unexpectedly (wanted {len(wanted)} modules)")
    # peft's new modules (its wrappers, the LoRA dropout) start in training mode: a model handed over in eval
    # mode (kvlab.load's) would otherwise come back with dropout on, every forward pass random
    return peft_model.train(model.training)


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's RNG for the block and give the caller's RNG state back afterwards (CPU, and
    the CUDA devices when CUDA is in use), so that wrapping a model never reseeds user code."""
    cuda = torch.cuda.is_available() and (device.type == "cuda" or torch.cuda.is_initialized())
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        yield


def lora_modules(peft_model: nn.Module) -> list[str]:
    """Names (relative to the base model) of the modules carrying a LoRA adapter."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    return [n for n, m in base.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, trainable / total) parameter counts of a (peft) model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total, trainable / total


def unload(peft_model: nn.Module) -> nn.Module:
    """Remove the LoRA layers and return the base model with its original weights (bit-identical)."""
    base = peft_model.unload()
    if "peft_config" in vars(base):     # older peft (0.13) leaves its config on the base model
        del base.peft_config
    base.requires_grad_(False)
    return base.eval()


def merge(peft_model: nn.Module) -> nn.Module:
    """Fold B·A·alpha/r into the weights and return a plain model (the LoRA update kept)."""
    base = peft_model.merge_and_unload()
    base.requires_grad_(False)
    return base.eval()
