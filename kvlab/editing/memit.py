"""MEMIT (Meng et al. 2023): many facts at once, spread over a range of layers.

ROME writes one (key, value) pair into one value matrix. MEMIT writes n of them, and
spreads the work over the value matrices of layers l₁ < … < L ("the critical MLPs"):

1. **Targets.** For each request i, find the residual stream vector z_i at the last
   layer L (block output at the subject's last token) that makes the model say the new
   object: z_i = h_i^L + δ_i, with δ_i optimised exactly as ROME optimises its v*
   (:func:`kvlab.editing.rome.compute_value`: NLL over context templates + KL + weight decay).
   Adding δ to the MLP output of layer L at that token *is* adding δ to the residual h^L,
   so ROME's machinery gives MEMIT's target; only the norms ROME's decay and clamp are
   measured against change (‖h^L‖ instead of ‖W k* + b‖, as MEMIT does), see :func:`compute_targets`.
2. **Spread.** For l = l₁ … L: recompute (on the model edited so far) the keys K (n, d_ff)
   at layer l, averaged over context templates, and the residual still missing at L,
   R = z − h^L (n, d_model). Give layer l its share R / (layers left) and solve

       min_Δ  ‖K Δ − R_share‖²  +  λ · tr(Δᵀ C Δ)     ⇒   Δ = (λ C + Kᵀ K)⁻¹ Kᵀ R_share

   (kvlab's memory convention: Δ is (d_ff, d_model), added to ``arch.value_matrix(l)``;
   the paper writes the transpose, Δ = R Kᵀ (λ C + K Kᵀ)⁻¹ with keys as columns).
   C = E[k kᵀ] of layer l's keys (:func:`kvlab.editing.covariance.key_covariance`); λ
   ("mom2 update weight") says how many corpus keys' worth of old memories to preserve.

We evaluate Δ as C⁻¹Kᵀ (λ I + K C⁻¹ Kᵀ)⁻¹ R (the same matrix, push-through identity): it
needs only C⁻¹Kᵀ and an n×n solve, and at λ = 0 with one key it is ROME's rank-one update.

    edit = apply_memit(model, tok, requests)            # a reversible WeightEdit
    edit.undo()                                        # the original weights, bit for bit
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..arch import adapter
from ..hooks import capture
from ..loading import hub_name, is_builtin
from ..text import pad_rows, right_padded
from .base import EditRequest, WeightEdit, configure, param_name, recording
from .covariance import key_covariance, solve
from .rome import (check_covariance, check_finite, check_number, check_v_config, compute_key, compute_value,
                   context_templates, prompt_rows, value_at)

# Layer ranges and λ from the paper (Meng et al. 2023, MEMIT), keyed by the model's hub name.
PAPER_LAYERS = {"gpt2-xl": (13, 14, 15, 16, 17), "gpt-j-6b": (3, 4, 5, 6, 7, 8)}
PAPER_LAMBDA = {"gpt2-xl": 20_000.0, "gpt-j-6b": 15_000.0}
# Built-in world model (6 layers, d_ff 512, layer 0's FFN empty): notebook 05 puts the MLP effect at the
# last subject token in layer 1, so MEMIT's critical range is layers 1-3 (three layers, as the issue's
# MEMIT target asks). λ from a sweep of 40 simultaneous CounterFact edits at the paper's v* budget
# (λ 16 / 64 / 256: S 64.6 / 61.6 / 42.4, unrelated recall 57.1 / 68.2 / 81.8; sequential ROME at
# layer 1: S 60.9, recall 35.4): 64 keeps S at ROME's level and more of the unrelated facts. The targets
# get ROME's built-in budget (``rome.WORLD_CONFIG``: 40 steps at lr 1.0).
WORLD_LAYERS = (1, 2, 3)
WORLD_LAMBDA = 64.0
WORLD_CONFIG = dict(v_steps=40, v_lr=1.0)
# λ scales with d_ff: the paper's λ / d_ff is 20000/6400 ≈ 3.1 (GPT-2 XL), 15000/16384 ≈ 0.9 (GPT-J).
LAMBDA_PER_DFF = 2.0


@dataclass
class MEMITConfig:
    """Hyper-parameters of a MEMIT batch edit (target optimisation as ROME's, Meng et al. 2022)."""

    layers: tuple[int, ...] | None = None  # None: default_layers(model)
    lam: float | None = None        # covariance weight λ; None: default_lambda(model)
    v_steps: int = 20               # Adam steps for each δ_i
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5       # on ‖δ‖² / ‖h^L‖²
    clamp: float = 4.0              # ‖δ‖ ≤ clamp · ‖h^L‖
    kl_prompt: str = "{} is a"
    early_stop: float = 5e-2
    n_templates: int = 10           # context prefixes besides "{}"
    template_length: int = 10
    cov_samples: int = 2000         # corpus texts for each layer's C
    ridge: float = 0.0              # C + ridge·mean(diag C)·I in the update (0: as the paper)
    batch_rows: int = 256           # prompt rows per forward pass when reading keys

    def validate(self, where: str = "MEMITConfig") -> "MEMITConfig":
        """Raise ValueError, naming the field, for a value the edit cannot run with."""
        if self.lam is not None:
            check_number(where, "lam", self.lam, 0)
        check_v_config(where, self)
        check_number(where, "early_stop", self.early_stop, 0)
        check_number(where, "template_length", self.template_length, 1, integer=True)
        check_number(where, "cov_samples", self.cov_samples, 1, integer=True)
        check_number(where, "ridge", self.ridge, 0)
        check_number(where, "batch_rows", self.batch_rows, 1, integer=True)
        return self


def default_config(model) -> MEMITConfig:
    """MEMIT's settings, with the built-in model's v* budget (``WORLD_CONFIG``)."""
    return MEMITConfig(**WORLD_CONFIG) if is_builtin(model) else MEMITConfig()


def default_layers(model) -> tuple[int, ...]:
    """The layer range MEMIT edits: the paper's for GPT-2 XL / GPT-J, the built-in model's, else
    five layers (or fewer) ending at ~30 % depth, where causal tracing puts the MLP peak in GPT-2 XL."""
    arch = adapter(model)
    name = hub_name(model)
    if name in PAPER_LAYERS:
        return PAPER_LAYERS[name]
    if is_builtin(model):
        return tuple(l for l in WORLD_LAYERS if l < arch.n_layers)
    last = max(0, int(round(0.36 * arch.n_layers)) - 1)
    return tuple(range(max(0, last - 4), last + 1))


def default_lambda(model) -> float:
    """λ: the paper's for GPT-2 XL / GPT-J, else ``LAMBDA_PER_DFF · d_ff`` (it scales like kᵀC⁻¹k ≈ d_ff)."""
    name = hub_name(model)
    if name in PAPER_LAMBDA:
        return PAPER_LAMBDA[name]
    if is_builtin(model):
        return WORLD_LAMBDA
    return LAMBDA_PER_DFF * adapter(model).d_ff


# ---------------------------------------------------------------------------------------------
# Requests, keys and residuals


def as_requests(requests) -> list[EditRequest]:
    """A list of :class:`EditRequest` from requests or CounterFact records (dicts or ``EditCase``);
    rejects empty or conflicting lists."""
    if isinstance(requests, (EditRequest, dict)) or dataclasses.is_dataclass(requests):
        requests = [requests]
    requests = [r if isinstance(r, EditRequest) else EditRequest.from_counterfact(r)
                if isinstance(r, dict) or dataclasses.is_dataclass(r) else r for r in requests]
    if not requests:
        raise ValueError("MEMIT: no edit requests given")
    for r in requests:
        if not isinstance(r, EditRequest):
            raise ValueError(f"MEMIT: expected EditRequest or CounterFact record, got {type(r).__name__}")
    seen: dict[str, str] = {}
    for r in requests:
        if r.text in seen:
            raise ValueError(f"MEMIT: two requests rewrite {r.text!r} (to {seen[r.text]!r} and "
                             f"{r.target_new!r}); give each prompt once")
        seen[r.text] = r.target_new
    return requests


def check_layers(model, layers) -> tuple[int, ...]:
    """Sorted, distinct, in-range layer indices (negative ones count from the end), via the adapter."""
    if layers is not None and not isinstance(layers, (int, str)):
        layers = list(layers)
        if not layers:
            raise ValueError("MEMIT: empty layer range")
    try:
        return tuple(adapter(model).check_layers(layers))
    except IndexError as e:
        raise ValueError(f"MEMIT: {e}") from None


@torch.no_grad()
def keys_and_residuals(model, tok, requests: list[EditRequest], layer: int, last_layer: int,
                       templates: list[str], batch_rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at ``layer`` and residuals at ``last_layer`` for every request, in batched passes.

    Returns K (n, d_ff): the value-module input at the subject's last token, averaged over
    ``templates`` (as :func:`~kvlab.editing.rome.compute_key`), and h (n, d_model): the
    output of block ``last_layer`` at the subject's last token of the bare prompt.
    """
    arch = adapter(model)
    rows, idx, owner = [], [], []   # owner: (request index, is_bare_prompt)
    for i, req in enumerate(requests):
        for ts, bare in ((templates, False), (["{}"], True)):
            r, s = prompt_rows(tok, req, ts)
            rows += r
            idx += s
            owner += [(i, bare)] * len(r)
    n = len(requests)
    K = torch.zeros(n, arch.d_ff, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    h = torch.zeros(n, arch.d_model, dtype=torch.float64)
    for a in range(0, len(rows), batch_rows):
        ids, mask = pad_rows(model, tok, rows[a:a + batch_rows])
        pos = torch.tensor(idx[a:a + batch_rows], device=ids.device)
        with capture(model, {"k": arch.value_module(layer)}, what="input") as ins, \
                capture(model, {"h": arch.layer(last_layer)}) as outs:
            model(input_ids=ids, attention_mask=mask)
        b = torch.arange(len(pos), device=ids.device)
        k = ins["k"][b, pos].double().cpu()          # (rows, d_ff)
        hh = outs["h"][b, pos].double().cpu()        # (rows, d_model)
        for j, (i, bare) in enumerate(owner[a:a + batch_rows]):
            if bare:
                h[i] = hh[j]
            else:
                K[i] += k[j]
                counts[i] += 1
    return K / counts.clamp_min(1)[:, None], h


def residual_at(model, tok, requests: list[EditRequest], layer: int) -> torch.Tensor:
    """h^layer (n, d_model): block output at the subject's last token of each bare prompt."""
    return keys_and_residuals(model, tok, requests, layer, layer, [])[1]


def compute_targets(model, tok, requests: list[EditRequest], layer: int, templates: list[str],
                    config: MEMITConfig | None = None, progress: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """z (n, d_model): the residual at ``layer`` (subject's last token) each request wants.

    z_i = h_i + δ_i, δ_i from ROME's optimisation (:func:`~kvlab.editing.rome.compute_value`)
    at the MLP output of ``layer`` (the same as at the block output: the MLP adds into the
    residual). ROME measures its weight decay and clamp against ‖v_init‖ (the MLP output);
    MEMIT against ‖h‖ (the residual). We convert: decay · (‖v_init‖/‖h‖)², clamp · ‖h‖/‖v_init‖.
    Also returns one optimisation log per request (NLL, p_new, ‖δ‖ ...).
    """
    cfg = config or default_config(model)
    h = residual_at(model, tok, requests, layer)                       # (n, d_model)
    z, logs = torch.zeros_like(h), []
    for i, req in enumerate(tqdm(requests, desc=f"MEMIT targets L{layer}", disable=not progress, leave=False)):
        k0 = compute_key(model, tok, req, layer, ["{}"])               # (d_ff,) bare-prompt key
        v0 = value_at(model, layer, k0).double().cpu()                 # (d_model,) MLP output there
        ratio = float(v0.norm() / h[i].norm().clamp_min(1e-12))        # ‖v_init‖ / ‖h‖
        log: dict = {}
        v = compute_value(model, tok, req, layer, templates, k0, cfg.v_steps, cfg.v_lr, cfg.kl_factor,
                          cfg.weight_decay * ratio ** 2, cfg.clamp / max(ratio, 1e-12), cfg.kl_prompt,
                          cfg.early_stop, log)
        z[i] = h[i] + (v.double().cpu() - v0)                          # h + δ
        logs.append(log)
    return z, logs


# ---------------------------------------------------------------------------------------------
# The update


def memit_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor | None, lam: float, ridge: float = 0.0
                 ) -> torch.Tensor:
    """Δ (d_ff, d_model) = argmin ‖K Δ − R‖² + λ tr(Δᵀ C Δ) = (λ C + KᵀK)⁻¹ Kᵀ R, in float64.

    K: keys (n, d_ff); R: residuals to add (n, d_model); C: (d_ff, d_ff) key second moment
    (None: identity). Computed as C⁻¹Kᵀ (λI + K C⁻¹Kᵀ)⁻¹ R. With λ = 0 the edited layer maps
    every key exactly to its residual (K Δ = R) when the keys are linearly independent.
    ``ridge`` > 0 uses C + ridge · mean(diag C) · I: a small model has (nearly) dead key units,
    and without it C⁻¹ pours the whole update into them.
    """
    if K.dim() != 2 or R.dim() != 2 or K.shape[0] != R.shape[0]:
        raise ValueError(f"memit_update: K (n, d_ff) and R (n, d_model) needed, got {tuple(K.shape)} and "
                         f"{tuple(R.shape)}")
    if lam < 0:
        raise ValueError(f"memit_update: λ must be ≥ 0, got {lam}")
    K, R = K.double(), R.double()
    if C is not None and ridge > 0:
        C = C.double() + ridge * C.double().diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
    U = solve(C, K.T) if C is not None else K.T.clone()                # (d_ff, n) = C⁻¹Kᵀ
    A = lam * torch.eye(K.shape[0], dtype=K.dtype) + K @ U             # (n, n)
    try:
        return U @ torch.linalg.solve(A, R)                            # (d_ff, d_model)
    except RuntimeError as e:  # singular A: only possible with λ = 0
        raise ValueError("memit_update: the keys are linearly dependent (e.g. the same subject twice); "
                         "use λ > 0") from e


def apply_memit(model, tok, requests, layers=None, lam: float | None = None,
                covs: dict[int, torch.Tensor] | None = None, templates: list[str] | None = None,
                targets: torch.Tensor | None = None, config: MEMITConfig | None = None, check: bool = True,
                progress: bool = True, **overrides) -> WeightEdit:
    """Insert all ``requests`` at once with MEMIT; returns one reversible :class:`WeightEdit`.

    ``requests``: EditRequests or CounterFact records. ``layers``: the range (default
    :func:`default_layers`); ``lam``: λ (default :func:`default_lambda`). ``covs``: {layer: C}
    (missing layers: the world corpus, cached). ``targets``: precomputed z (n, d_model) at
    max(layers) from :func:`compute_targets` on the *unedited* model (lets a caller reuse them
    across batch sizes). ``overrides`` set :class:`MEMITConfig` fields of a copy of ``config``,
    checked up front (:meth:`MEMITConfig.validate`). ``check`` rejects requests the model already
    satisfies. A covariance, target or update with NaN/inf entries raises before it is written.
    ``edit.info`` holds the layers, λ, z and, per layer, the residual norm before its update.
    """
    # a copy: the caller's config is not changed by the overrides
    cfg = configure(dataclasses.replace(config or default_config(model)), overrides, "apply_memit")
    cfg.validate("apply_memit")
    requests = as_requests(requests)
    arch = adapter(model)
    layers = check_layers(model, layers if layers is not None else cfg.layers if cfg.layers is not None
                          else default_layers(model))
    lam = lam if lam is not None else cfg.lam if cfg.lam is not None else default_lambda(model)
    lam = float(check_number("apply_memit", "λ", lam, 0))
    last = layers[-1]
    if check:
        for r in requests:
            r.check(model, tok)
    if templates is None:
        templates = context_templates(model, tok, cfg.n_templates, cfg.template_length)
    covs = dict(covs or {})
    for l in layers:
        if l not in covs:
            with right_padded(tok):               # key_covariance pads through the tokenizer
                covs[l] = key_covariance(model, tok, l, n=cfg.cov_samples, progress=False)
        check_covariance(covs[l], arch.d_ff, f"apply_memit: layer {l}")
    logs: list[dict] = []
    if targets is None:
        targets, logs = compute_targets(model, tok, requests, last, templates, cfg, progress)
    if targets.shape != (len(requests), arch.d_model):
        raise ValueError(f"apply_memit: targets are {tuple(targets.shape)}, expected "
                         f"({len(requests)}, {arch.d_model})")
    z = check_finite(targets.double().cpu(), "apply_memit: the targets z")
    names = [param_name(model, arch.value_module(l), "weight") for l in layers]
    resid_norms = []
    with recording(model, names, method="MEMIT") as edit:
        for i, l in enumerate(tqdm(layers, desc="MEMIT layers", disable=not progress, leave=False)):
            K, h = keys_and_residuals(model, tok, requests, l, last, templates, cfg.batch_rows)
            R = z - h                                                  # (n, d_model) still missing at L
            resid_norms.append(float(R.norm(dim=1).mean()))
            dV = memit_update(K, R / (len(layers) - i), covs[l], lam, cfg.ridge)  # (d_ff, d_model)
            V = arch.value_matrix(l)
            dV = check_finite(dV.to(V.device, V.dtype), f"apply_memit: the update of layer {l}")
            with torch.no_grad():
                V.add_(dV)
        final = residual_at(model, tok, requests, last)
        resid_norms.append(float((z - final).norm(dim=1).mean()))
    edit.info = dict(layers=layers, lam=lam, targets=z, residual_norms=resid_norms, requests=requests,
                     target_logs=logs)
    edit.n_params = sum(arch.value_module(l).weight.numel() for l in layers)
    return edit


@dataclass
class LayerStats:
    """Relative Frobenius change ‖ΔW‖/‖W‖ of each edited matrix (weight-norm drift)."""

    names: list[str] = field(default_factory=list)
    drift: list[float] = field(default_factory=list)


def weight_drift(edit_or_originals, model=None) -> LayerStats:
    """‖W_now − W_orig‖_F / ‖W_orig‖_F for each parameter of a :class:`WeightEdit`, or of a dict
    {name: original tensor} compared against ``model``'s current weights."""
    if isinstance(edit_or_originals, WeightEdit):
        originals, model = edit_or_originals.originals, edit_or_originals.model
    else:
        originals = edit_or_originals
        if model is None:
            raise ValueError("weight_drift: pass the model when giving a dict of original weights")
    params = dict(model.named_parameters())
    out = LayerStats()
    for n, w0 in originals.items():
        w = params[n].detach()
        out.names.append(n)
        out.drift.append(float((w.double() - w0.double()).norm() / w0.double().norm().clamp_min(1e-12)))
    return out
