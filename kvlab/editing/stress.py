"""Many edits: does the model keep its other memories? Sequential ROME vs MEMIT batches.

For growing numbers of edits n (e.g. 10, 25, 50, 100, 200) we measure, on the model that
holds all n edits:

* S / ES / PS / NS of the n edited CounterFact records (:func:`kvlab.editing.metrics.record_scores`),
* recall of unrelated known facts (subjects never edited; :func:`kvlab.editing.metrics.known_recall`),
* weight-norm drift ‖W_n − W_0‖_F / ‖W_0‖_F of the edited value matrices.

*Sequential ROME* applies the edits one after another to the same model (edit i sees the
model changed by edits 1…i−1), as the MEMIT paper's baseline does. *MEMIT* inserts the first
n records in one batch into the unedited model; its targets z_i only depend on the unedited
model, so they are computed once for the largest n and reused for every batch size.

    recs, known = pick_records(model, tok, load_counterfact(), load_known(), n=100)
    points = stress_sequential_rome(model, tok, recs, [10, 50, 100], known) + \\
             stress_memit(model, tok, recs, [10, 50, 100], known)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..arch import adapter
from .base import EditRequest, WeightEdit, as_record, current_answer_ids, param_name, undo_all
from .covariance import key_covariance
from .memit import (MEMITConfig, apply_memit, as_requests, check_layers, compute_targets, default_config,
                    default_lambda, default_layers)
from .metrics import known_recall, record_scores, summarize
from .rome import apply_rome, context_templates, default_layer
from ..text import token_ids


@dataclass
class StressPoint:
    """Metrics of a model holding ``n_edits`` edits made by ``method`` (all ×100 except drift/seconds)."""

    method: str
    n_edits: int
    S: float
    ES: float
    PS: float
    NS: float
    recall: float       # unrelated known facts still answered correctly
    drift: float        # ‖W − W₀‖_F / ‖W₀‖_F over all edited value matrices together
    seconds: float      # wall time spent editing to reach this state (targets included)


def pick_records(model, tok, counterfact, known, n: int | None = None) -> tuple[list[dict], list[dict]]:
    """Editable CounterFact records with distinct subjects, and the known facts about other subjects.

    Drops records whose new target the unedited model already predicts, keeps the first record
    of each subject (two rewrites of one subject share its key, so they would compete for the
    same memory), and returns at most ``n`` of them plus every known fact whose subject is not
    among them (the "unrelated facts").
    """
    records, subjects = [], set()
    for rec in map(as_record, counterfact):
        req = EditRequest.from_counterfact(rec)
        if req.subject in subjects:
            continue
        tgt = token_ids(tok, req.target_new)
        if current_answer_ids(model, tok, req.text, len(tgt)) == tgt:
            continue
        records.append(rec)
        subjects.add(req.subject)
        if n is not None and len(records) >= n:
            break
    if not records:
        raise ValueError("pick_records: no editable CounterFact records")
    unrelated = [k for k in map(as_record, known) if k["subject"] not in subjects]
    if not unrelated:
        raise ValueError("pick_records: every known fact is about an edited subject")
    return records, unrelated


def _check_counts(counts, n_records: int) -> list[int]:
    counts = sorted({int(c) for c in counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"counts must be positive integers, got {counts}")
    if counts[-1] > n_records:
        raise ValueError(f"counts go up to {counts[-1]} edits but only {n_records} records were given")
    return counts


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 on its device, float32 on Apple's MPS (which has no float64)."""
    return t.detach().to(torch.float32 if t.device.type == "mps" else torch.float64)


def _drift(originals: dict[str, torch.Tensor], model) -> float:
    params = dict(model.named_parameters())
    num = sum(float((_wide(params[n]) - _wide(w)).pow(2).sum()) for n, w in originals.items())
    den = sum(float(_wide(w).pow(2).sum()) for w in originals.values())
    return (num / max(den, 1e-30)) ** 0.5


def measure(model, tok, method: str, records: list[dict], known: list[dict], originals: dict, seconds: float
            ) -> StressPoint:
    """Score the model as it is now on ``records`` (the edits made so far) and on ``known``."""
    s = summarize(record_scores(model, tok, records))
    return StressPoint(method, len(records), s["S"], s["ES"], s.get("PS", float("nan")), s["NS"],
                       known_recall(model, tok, known), _drift(originals, model), seconds)


def unedited_points(model, tok, records, counts, known) -> list[StressPoint]:
    """The unedited model's scores on the first n records, for each n (the baseline curve)."""
    records = [as_record(r) for r in records]
    known = [as_record(k) for k in known]
    counts = _check_counts(counts, len(records))
    return [measure(model, tok, "unedited", records[:n], known, {}, 0.0) for n in counts]


def stress_sequential_rome(model, tok, records, counts, known, layer: int | None = None,
                           cov: torch.Tensor | None = None, templates: list[str] | None = None,
                           progress: bool = True, **rome_kw) -> list[StressPoint]:
    """Apply ROME to ``records`` one after another; measure after ``counts`` edits; undo everything.

    C (``cov``) and the templates are computed once on the unedited model and reused, as in a
    real sequential-editing run. The model is restored bit-for-bit before returning, also on error.
    """
    records = [as_record(r) for r in records]
    known = [as_record(k) for k in known]
    counts = _check_counts(counts, len(records))
    layer = default_layer(model) if layer is None else adapter(model)._check_layer(layer)
    cov = key_covariance(model, tok, layer, progress=False) if cov is None else cov
    templates = templates if templates is not None else context_templates(model, tok, 10)
    name = param_name(model, adapter(model).value_module(layer), "weight")
    originals = {name: model.get_parameter(name).detach().clone()}
    edits: list[WeightEdit] = []
    points, seconds = [], 0.0
    try:
        for i, rec in enumerate(tqdm(records[:counts[-1]], desc="sequential ROME", disable=not progress,
                                     leave=False)):
            t0 = time.perf_counter()
            edits.append(apply_rome(model, tok, rec, layer=layer, cov=cov, templates=templates, check=False,
                                    **rome_kw))
            seconds += time.perf_counter() - t0
            if i + 1 in counts:
                points.append(measure(model, tok, "ROME (sequential)", records[:i + 1], known, originals, seconds))
    finally:
        undo_all(edits)
    return points


def stress_memit(model, tok, records, counts, known, layers=None, lam: float | None = None,
                 covs: dict[int, torch.Tensor] | None = None, templates: list[str] | None = None,
                 config: MEMITConfig | None = None, progress: bool = True) -> list[StressPoint]:
    """One MEMIT batch of the first n records for each n in ``counts``, each undone after measuring.

    The targets z_i are computed once (on the unedited model) for the largest n; the time
    reported for n edits is the targets' share (n/N of their time) plus that batch's update.
    """
    records = [as_record(r) for r in records]
    known = [as_record(k) for k in known]
    counts = _check_counts(counts, len(records))
    cfg = config or default_config(model)
    layers = check_layers(model, layers if layers is not None else
                          cfg.layers if cfg.layers is not None else default_layers(model))
    lam = lam if lam is not None else cfg.lam if cfg.lam is not None else default_lambda(model)
    templates = templates if templates is not None else context_templates(model, tok, cfg.n_templates,
                                                                          cfg.template_length)
    covs = dict(covs or {})
    for l in layers:
        if l not in covs:
            covs[l] = key_covariance(model, tok, l, n=cfg.cov_samples, progress=False)
    requests = as_requests(records[:counts[-1]])
    t0 = time.perf_counter()
    z, _ = compute_targets(model, tok, requests, layers[-1], templates, cfg, progress)  # (N, d_model)
    per_target = (time.perf_counter() - t0) / len(requests)
    points = []
    for n in tqdm(counts, desc="MEMIT batches", disable=not progress, leave=False):
        t0 = time.perf_counter()
        edit = apply_memit(model, tok, requests[:n], layers, lam, covs, templates, targets=z[:n], config=cfg,
                           check=False, progress=False)
        secs = time.perf_counter() - t0 + n * per_target
        try:
            points.append(measure(model, tok, "MEMIT (batch)", records[:n], known, edit.originals, secs))
        finally:
            edit.undo()
    return points
