"""ROME (Meng et al. 2022): a rank-one edit of one value matrix that inserts a new fact.

The value projection W of layer l maps a key k (the coefficient vector m, d_ff wide)
to a value W k (d_model). ROME picks

* the key  k* = input of W at the subject's last token (its direction averaged over context templates);
* the value v* = W k* + δ, with δ found by gradient descent so that the model says the
  new object (NLL over the templates) while keeping what it says about the subject in
  general (KL on "{subject} is a") and keeping δ small (weight decay, norm clamp);

and inserts the pair (k*, v*) with the least change to W under the key statistics C = E[k kᵀ]:

    W ← W + Λ (C⁻¹k*)ᵀ,     Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)      ⇒   W k* = v* exactly.

In kvlab's memory convention (V = value matrix, (d_ff, d_model), output = m·V + b) the
update is ΔV = outer(C⁻¹k*, Λ). Each step is a function MEMIT reuses:
:func:`context_templates`, :func:`compute_key`, :func:`compute_value`, :func:`rome_update`,
and :func:`apply_rome` puts them together and returns a reversible :class:`WeightEdit`.

As in ROME's code, the update direction uses the template-averaged key (u = C⁻¹k̄) while the
key that must map exactly to v* is the bare prompt's (``anchor="prompt"``; ``anchor="mean"``
uses k̄ for both, the formula as written in the paper). C⁻¹ is applied with a tiny ridge
(1e-6 · mean diagonal) because a small model has dead units.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..arch import adapter, model_device
from ..hooks import capture, patch
from ..loading import hub_name, is_builtin
from ..precision import MixedPrecision, compute_dtype
from ..text import pad_rows, prompt_ids, right_padded, subject_token_range, token_ids
from .base import EditRequest, WeightEdit, configure, param_name, recording
from .covariance import key_covariance, solve

# Editing layers from the papers (Meng et al. 2022, ROME).
PAPER_LAYERS = {"gpt2-xl": 17, "gpt2-large": 12, "gpt2-medium": 8, "gpt-j-6b": 5, "gpt-j": 5}
# The built-in model (6 layers, layer 0's FFN empty): causal tracing puts the MLP effect at the last
# subject token in layer 1 (notebook 05), and ROME edits there. ROME's GPT-2 XL budget for v* (20 Adam
# steps at lr 0.5) stops short on it (ES 85, PS 63.5 on 100 CounterFact rewrites). The shortfall is in
# steps, not in how far δ must go: 80 steps at lr 0.5 end with the same ‖δ‖ and ES 97. Adam moves δ by
# about lr·√d per step, and d is 128, not 1600 (benchmarks/bench_edit_limits.py). So it gets 40 steps at
# lr 1.0 (ES 97, PS 77, NS 98.9), as ROME's own code sets v* hyperparameters per model.
# data/world/README.md has all of these.
WORLD_CONFIG = dict(layer=1, v_steps=40, v_lr=1.0)
START_WORDS = ("The", "Therefore", "Because", "I", "You")  # ROME's prompts for generating prefixes


@dataclass
class ROMEConfig:
    """Hyper-parameters of one ROME edit (defaults: ROME's GPT-2 XL settings, Meng et al. 2022)."""

    layer: int | None = None      # None: default_layer(model)
    v_steps: int = 20             # Adam steps for δ
    v_lr: float = 0.5
    kl_factor: float = 0.0625     # weight of the KL term on "{subject} is a"
    weight_decay: float = 0.5     # weight of ‖δ‖² / ‖v_init‖²
    clamp: float = 4.0            # ‖δ‖ ≤ clamp · ‖v_init‖
    kl_prompt: str = "{} is a"
    n_templates: int = 20         # context prefixes besides "{}"
    template_length: int = 10     # tokens per generated prefix
    early_stop: float = 5e-2      # stop when the NLL of the new object falls below this
    cov_samples: int = 2000       # texts for C when it is not passed in
    anchor: str = "prompt"        # key that must map to v*: "prompt" (bare prompt, ROME's code) or "mean"

    def validate(self, where: str = "ROMEConfig") -> "ROMEConfig":
        """Raise ValueError, naming the field, for a value the edit cannot run with."""
        check_v_config(where, self)
        check_number(where, "template_length", self.template_length, 1, integer=True)
        check_number(where, "early_stop", self.early_stop, 0)
        check_number(where, "cov_samples", self.cov_samples, 1, integer=True)
        if self.anchor not in ("prompt", "mean"):
            raise ValueError(f"{where}: anchor must be 'prompt' or 'mean', got {self.anchor!r}")
        return self


def check_v_config(where: str, cfg) -> None:
    """The v* optimisation settings ROME and MEMIT share: steps, lr, KL factor, weight decay, clamp,
    KL prompt and number of context templates."""
    check_number(where, "v_steps", cfg.v_steps, 1, integer=True)
    check_number(where, "v_lr", cfg.v_lr, 0, strict=True)
    check_number(where, "kl_factor", cfg.kl_factor, 0)
    check_number(where, "weight_decay", cfg.weight_decay, 0)
    check_number(where, "clamp", cfg.clamp, 0, strict=True)
    check_template(where, "kl_prompt", cfg.kl_prompt)
    check_number(where, "n_templates", cfg.n_templates, 0, integer=True)


def check_number(where: str, name: str, value, low: float, integer: bool = False, strict: bool = False):
    """``value`` if it is a finite number (an integer if ``integer``) ≥ ``low`` (> if ``strict``), else ValueError."""
    kind = numbers.Integral if integer else numbers.Real
    if (isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < low
            or (strict and value == low)):
        need = f"{'an integer' if integer else 'a finite number'} {'>' if strict else '≥'} {low}"
        raise ValueError(f"{where}: {name} must be {need}, got {value!r}")
    return value


def check_templates(where: str, templates) -> list[str]:
    """``templates`` if it is a non-empty list (k* and v* average over it), else ValueError."""
    if isinstance(templates, str) or not templates:
        raise ValueError(f"{where}: no context templates given (a list like ['{{}}'] is needed), got {templates!r}")
    return templates


def check_template(where: str, name: str, template) -> str:
    """``template`` if it is a string with "{}" exactly once (where the subject goes), else ValueError."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"{where}: {name} must be a string with '{{}}' exactly once for the subject, got {template!r}")
    return template


def default_config(model) -> ROMEConfig:
    """ROME's GPT-2 XL settings, with the built-in model's layer and v* budget (``WORLD_CONFIG``)."""
    return ROMEConfig(**WORLD_CONFIG) if is_builtin(model) else ROMEConfig()


def default_layer(model) -> int:
    """The editing layer: the papers' choice for known models, else the built-in model's (sweep in nb 07)."""
    arch = adapter(model)
    name = hub_name(model)
    if name in PAPER_LAYERS:
        return PAPER_LAYERS[name]
    if is_builtin(model):
        return min(WORLD_CONFIG["layer"], arch.n_layers - 1)
    return max(0, int(round(0.3 * arch.n_layers)) - 1) if arch.n_layers > 3 else arch.n_layers // 2


# ---------------------------------------------------------------------------------------------
# Context templates

_TEMPLATE_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.no_grad()
def context_templates(model, tok, n: int = 20, length: int = 10, seed: int = 0) -> list[str]:
    """``["{}"]`` plus ``n`` short prefixes *generated by the model* (ROME's way), each ending in ". {}".

    Prefixes are ``length`` tokens sampled with top-5 sampling, starting from ROME's start
    words ("The", "Therefore", ...) or, when the tokenizer does not know them (the built-in
    word-level tokenizer is lowercase), from the end-of-text token. Cached per model.
    """
    key = (n, length, seed)
    per_model = _TEMPLATE_CACHE.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    dev = model_device(model)
    g = torch.Generator().manual_seed(seed)
    starts = [tok(w, add_special_tokens=False)["input_ids"] for w in START_WORDS]
    unk = tok.unk_token_id
    if any(not s or (unk is not None and unk in s) for s in starts):
        starts = [[tok.eos_token_id]]
    out = []
    for i in range(n):
        ids = torch.tensor([starts[i % len(starts)]], device=dev)  # (1, seq)
        for _ in range(length):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float().cpu()
            top = logits.topk(5)
            nxt = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=g)]
            ids = torch.cat([ids, nxt.view(1, 1).to(dev)], dim=1)
        text = tok.decode(ids[0], skip_special_tokens=True).strip()
        text = text.replace("{", " ").replace("}", " ").strip()
        out.append((text + ". {}") if text else "{}")
    templates = ["{}"] + out
    per_model[key] = templates
    return templates


# ---------------------------------------------------------------------------------------------
# Tokenising prompts with a subject position


def _subject_last(tok, text: str, subject: str, char_start: int) -> int:
    """Index of the last token of the subject mention that starts at ``char_start`` in ``text``."""
    return subject_token_range(tok, text, subject, char_start=char_start)[1] - 1


def _fill(template: str, request: EditRequest) -> tuple[str, int]:
    """``template`` with the request's prompt in its "{}", and the char offset of the subject."""
    pre = template.index("{}")
    text = template[:pre] + request.text + template[pre + 2:]
    return text, pre + request.prompt.index("{}")


def prompt_rows(tok, request: EditRequest, templates: list[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids of each template filled with the request's prompt, and the subject's last index.

    The request's prompt must be made of words the tokenizer knows (else ValueError); the context
    prefixes may contain unknown ones (e.g. "." for a vocabulary without punctuation): they are context.
    """
    if isinstance(templates, str):
        raise ValueError(f"templates must be a list of strings, got the string {templates!r}")
    rows, idx = [], []
    for t in templates:
        text, c0 = _fill(check_template("prompt_rows", "a context template", t), request)
        idx.append(_subject_last(tok, text, request.subject, c0))   # first: its errors name the subject
        rows.append(prompt_ids(tok, text, allow_unk=True))
    prompt_ids(tok, request.text)                                   # raises for unknown words in the prompt
    return rows, idx


# ---------------------------------------------------------------------------------------------
# k*, v*, and the update


@torch.no_grad()
def compute_key(model, tok, request: EditRequest, layer: int, templates: list[str]) -> torch.Tensor:
    """k* (d_ff,): input of the value projection at the subject's last token, averaged over templates."""
    arch = adapter(model)
    rows, idx = prompt_rows(tok, request, check_templates("compute_key", templates))
    ids, mask = pad_rows(model, tok, rows)
    with capture(model, {"k": arch.value_module(layer)}, what="input") as st:
        model(input_ids=ids, attention_mask=mask)
    k = st["k"][torch.arange(len(rows)), torch.tensor(idx)]  # (n_templates, d_ff)
    return k.mean(0)


def value_at(model, layer: int, k: torch.Tensor) -> torch.Tensor:
    """W k + b: what the value projection outputs for key k. (d_ff,) -> (d_model,)."""
    mod = adapter(model).value_module(layer)
    with torch.no_grad():
        return mod(k.to(mod.weight.dtype)[None])[0]


def compute_value(model, tok, request: EditRequest, layer: int, templates: list[str],
                  k_star: torch.Tensor | None = None, steps: int = 20, lr: float = 0.5,
                  kl_factor: float = 0.0625, weight_decay: float = 0.5, clamp: float = 4.0,
                  kl_prompt: str = "{} is a", early_stop: float = 5e-2, log: dict | None = None
                  ) -> torch.Tensor:
    """v* (d_model,) = W k* + b + δ, with δ optimised by Adam.

    δ is added to the value projection's output at the subject's last token of every
    template (and of the KL prompt). Loss = mean NLL of ``target_new`` over the templates
    + ``kl_factor`` · KL(p_δ ‖ p) of the next-token distribution at the subject on
    ``kl_prompt`` + ``weight_decay`` · ‖δ‖²/‖v_init‖²; after each step ‖δ‖ ≤ clamp·‖v_init‖.
    ``log`` (a dict) receives the loss curve and the final NLL / probability. δ is float32 in any
    dtype; in a float16 model the loss is scaled (:class:`kvlab.precision.MixedPrecision`).
    """
    for name, value, low, strict in (("steps", steps, 1, False), ("lr", lr, 0, True), ("clamp", clamp, 0, True),
                                     ("kl_factor", kl_factor, 0, False), ("weight_decay", weight_decay, 0, False),
                                     ("early_stop", early_stop, 0, False)):
        check_number("compute_value", name, value, low, integer=name == "steps", strict=strict)
    check_template("compute_value", "kl_prompt", kl_prompt)
    check_templates("compute_value", templates)
    arch = adapter(model)
    module = arch.value_module(layer)
    tgt = token_ids(tok, request.target_new)
    rows, idx = prompt_rows(tok, request, templates)
    n_rw = len(rows)
    kl_text = kl_prompt.replace("{}", request.subject)
    rows.append(prompt_ids(tok, kl_text, allow_unk=True))          # context, like the templates
    idx.append(_subject_last(tok, kl_text, request.subject, kl_prompt.index("{}")))
    # rewrite rows: prompt + target[:-1]; the target token j is predicted at len(prompt)-1+j
    tgt_pos = [[len(r) - 1 + j for j in range(len(tgt))] for r in rows[:n_rw]]
    rows = [r + tgt[:-1] for r in rows[:n_rw]] + rows[n_rw:]
    ids, mask = pad_rows(model, tok, rows)
    dev = ids.device
    b_idx = torch.arange(len(rows), device=dev)
    s_idx = torch.tensor(idx, device=dev)
    pos = torch.tensor(tgt_pos, device=dev)                     # (n_rw, n_tgt)
    tgt_t = torch.tensor(tgt, device=dev).expand(n_rw, -1)      # (n_rw, n_tgt)

    if k_star is None:
        k_star = compute_key(model, tok, request, layer, templates)
    v_init = value_at(model, layer, k_star).float()             # (d_model,)
    with torch.no_grad():
        logits0 = model(input_ids=ids, attention_mask=mask).logits
        kl_ref = logits0[n_rw:][torch.arange(len(rows) - n_rw), s_idx[n_rw:]].float().log_softmax(-1)

    delta = torch.zeros(arch.d_model, device=dev, dtype=torch.float32, requires_grad=True)
    # δ is float32, but its gradient flows back through the model: loss scaling in float16 (kvlab.precision)
    prec = MixedPrecision([delta], compute_dtype(model), where="compute_value")
    opt = torch.optim.Adam(prec.masters, lr=lr)
    max_norm = clamp * v_init.norm()

    def add_delta(out):  # out: (n_rows, seq, d_model)
        out = out.clone()
        out[b_idx, s_idx] = out[b_idx, s_idx] + delta.to(out.dtype)
        return out

    def objective():
        with patch(module, add_delta):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = logits[:n_rw].log_softmax(-1)                            # (n_rw, seq, vocab)
        tok_lp = logp[torch.arange(n_rw, device=dev)[:, None], pos, tgt_t]  # (n_rw, n_tgt)
        nll = -tok_lp.mean(1).mean()
        kl_lp = logits[n_rw:][torch.arange(len(rows) - n_rw, device=dev), s_idx[n_rw:]].log_softmax(-1)
        kl = F.kl_div(kl_ref, kl_lp, log_target=True, reduction="batchmean")  # KL(p_δ ‖ p)
        wd = weight_decay * delta.pow(2).sum() / v_init.pow(2).sum()
        return nll + kl_factor * kl + wd, nll, kl

    curve = []
    with prec, torch.enable_grad():
        for step in range(steps + 1):
            loss, nll, kl = objective()
            curve.append(float(loss.detach()))
            if step == steps or float(nll.detach()) < early_stop:
                break
            prec.backward(loss, again=lambda: objective()[0])
            prec.step(opt)
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    if log is not None:
        nll, kl = nll.detach(), kl.detach()
        log.update(loss=curve, nll=float(nll), p_new=float(torch.exp(-nll)), kl=float(kl),
                   delta_norm=float(delta.detach().norm()), v_init_norm=float(v_init.norm()), steps=step)
    return (v_init + delta.detach()).to(module.weight.dtype)


def rome_update(V: torch.Tensor, bias: torch.Tensor | None, k_star: torch.Tensor, v_star: torch.Tensor,
                C: torch.Tensor | None, k_dir: torch.Tensor | None = None) -> torch.Tensor:
    """The rank-one ΔV (d_ff, d_model) such that (V + ΔV)ᵀ k* + b = v*.

    V: value matrix (d_ff, d_model); k*: (d_ff,); v*: (d_model,); C: (d_ff, d_ff) key
    second moment (None: identity, i.e. the minimum-Frobenius-norm update).
    ΔV = outer(u, Λ) with u = C⁻¹k_dir, Λ = (v* − Vᵀk* − b) / (uᵀk*); ``k_dir`` defaults to k*
    (ROME's code uses the template-averaged key for k_dir and the bare prompt's key for k*).
    Computed in float64.
    """
    k = k_star.double().to(V.device)
    d = k if k_dir is None else k_dir.double().to(V.device)
    u = solve(C.to(V.device), d) if C is not None else d.clone()       # (d_ff,)
    current = V.double().T @ k + (bias.double() if bias is not None else 0.0)  # (d_model,)
    lam = (v_star.double().to(V.device) - current) / (u @ k)            # (d_model,)
    return torch.outer(u, lam)                                          # (d_ff, d_model)


def check_covariance(C: torch.Tensor, d_ff: int, where: str) -> torch.Tensor:
    """``C`` if it is a finite (d_ff, d_ff) matrix, else ValueError."""
    if not isinstance(C, torch.Tensor) or C.shape != (d_ff, d_ff):
        raise ValueError(f"{where}: the covariance must be a ({d_ff}, {d_ff}) tensor, got "
                         f"{tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__}")
    check_finite(C, f"{where}: the covariance")
    return C


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` if every entry is finite, else ValueError (raised before any weight is written)."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} has {int((~torch.isfinite(x)).sum())} NaN/inf entries; nothing was written "
                         f"(check the covariance and the config)")
    return x


def apply_rome(model, tok, request: EditRequest | dict, layer: int | None = None, cov: torch.Tensor | None = None,
               templates: list[str] | None = None, config: ROMEConfig | None = None, check: bool = True,
               **overrides) -> WeightEdit:
    """Edit ``model`` in place with ROME; returns the reversible :class:`WeightEdit`.

    ``request``: an :class:`EditRequest` or a CounterFact record. ``cov``: C for the layer
    (computed from the world corpus and cached when None). ``overrides`` set fields of
    :class:`ROMEConfig` (e.g. ``v_steps=40``) of :func:`default_config`; ``config`` itself is not
    changed. The edit's ``info`` holds k*, v*, u, the layer and the optimisation log.

    Bad input raises ValueError before any weight is written: config numbers out of range
    (:meth:`ROMEConfig.validate`), a covariance that is not a finite (d_ff, d_ff) matrix, an
    update with NaN/inf entries, and what :mod:`kvlab.text` rejects (unknown words, whitespace
    around the target, a subject inside a word, a prompt longer than the model).
    """
    if not isinstance(request, EditRequest):
        request = EditRequest.from_counterfact(request)
    # a copy: the caller's config is not changed by the overrides
    cfg = configure(dataclasses.replace(config or default_config(model)), overrides, "apply_rome")
    cfg.validate("apply_rome")
    arch = adapter(model)
    layer = arch._check_layer(layer if layer is not None else cfg.layer if cfg.layer is not None
                              else default_layer(model))
    if check:
        request.check(model, tok)
    if templates is None:
        templates = context_templates(model, tok, cfg.n_templates, cfg.template_length)
    if cov is None:
        with right_padded(tok):                   # key_covariance pads through the tokenizer
            cov = key_covariance(model, tok, layer, n=cfg.cov_samples, progress=False)
    check_covariance(cov, arch.d_ff, "apply_rome")
    module = arch.value_module(layer)
    names = [param_name(model, module, "weight")]
    log: dict = {}
    with recording(model, names, method="ROME") as edit:
        k_mean = compute_key(model, tok, request, layer, templates)
        k_star = compute_key(model, tok, request, layer, ["{}"]) if cfg.anchor == "prompt" else k_mean
        v_star = compute_value(model, tok, request, layer, templates, k_star, cfg.v_steps, cfg.v_lr,
                               cfg.kl_factor, cfg.weight_decay, cfg.clamp, cfg.kl_prompt, cfg.early_stop, log)
        V = arch.value_matrix(layer)
        dV = rome_update(V.detach(), arch.value_bias(layer), k_star, v_star, cov, k_dir=k_mean).to(V.dtype)
        check_finite(dV, f"apply_rome: the update of layer {layer}")
        with torch.no_grad():
            V.add_(dV)
    edit.info = dict(layer=layer, k_star=k_star, k_mean=k_mean, v_star=v_star, request=request, **log)
    edit.n_params = module.weight.numel()
    return edit
