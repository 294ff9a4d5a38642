"""Knowledge-neuron editing (Dai et al. 2022, §5 "Updating facts").

1. Find the fact's knowledge neurons: FFN units (layer, i) whose integrated-gradient
   attribution to the *old* answer is high on the rewrite prompt and its paraphrases
   (:func:`kvlab.neurons.knowledge_neurons`).
2. Move each one's value vector in embedding space from the old answer to the new one:

       v_i ← v_i − λ · E[o_true] + λ · E[o_new]

   where E[o] is the input embedding of the answer (the mean over its tokens when it has
   several). Nothing else changes, so the edit touches n_neurons · d_model weights.

The edit is a reversible :class:`~kvlab.editing.base.WeightEdit`; ``info["neurons"]`` lists
the neurons that were moved.
"""
from __future__ import annotations

import torch

from ..arch import adapter
from ..neurons import check_neuron_set
from ..text import token_ids
from .base import EditRequest, WeightEdit, current_answer, param_name, recording
from .rome import check_finite, check_number, context_templates


def answer_embedding(model, tok, answer: str) -> torch.Tensor:
    """E[answer] (d_model,): mean input embedding of the answer's tokens."""
    E = adapter(model).embed.weight                     # (vocab, d_model)
    return E[token_ids(tok, answer)].mean(0)


def kn_edit(model, tok, request: EditRequest | dict, prompts: list[str] | None = None, lam: float = 1.0,
            n_prompts: int = 3, neurons: list[tuple[int, int]] | None = None, check: bool = True,
            **kn_kw) -> WeightEdit:
    """Edit the value vectors of the fact's knowledge neurons (Dai et al. §5).

    ``prompts``: prompts for the attribution, refined across them as Dai et al. do (default:
    the rewrite prompt and ``n_prompts - 1`` copies behind ROME's model-generated context
    prefixes, so no evaluation paraphrase is seen by the edit). The old answer is
    ``request.target_true`` (the model's current answer if None).
    ``neurons``: skip the search and edit these (layer, index) pairs (at least one, each once:
    a repeated neuron would be moved twice). ``kn_kw`` go to :func:`kvlab.neurons.knowledge_neurons`
    (e.g. thresholds, steps). A search that finds no neuron raises ValueError.
    """
    if not isinstance(request, EditRequest):
        request = EditRequest.from_counterfact(request)
    check_number("kn_edit", "lam", lam, 0, strict=True)
    check_number("kn_edit", "n_prompts", n_prompts, 1, integer=True)
    if check:
        request.check(model, tok)
    arch = adapter(model)
    old = request.target_true or current_answer(model, tok, request.text, len(token_ids(tok, request.target_new)))
    if neurons is None:
        from ..neurons import knowledge_neurons
        if prompts is None:
            prefixes = context_templates(model, tok)[:n_prompts]
            prompts = [t.replace("{}", request.text) for t in prefixes]
        neurons = knowledge_neurons(model, tok, prompts, old, **kn_kw)
        if not neurons:
            raise ValueError(f"kn_edit: no knowledge neurons found for {old!r} after {request.text!r}; "
                             f"nothing to edit (try a lower threshold t or other prompts)")
    neurons = check_neuron_set(arch, neurons, "kn_edit")   # none, or one twice (it would move twice), raise
    layers = sorted({l for l, _ in neurons})
    names = [param_name(model, arch.value_module(l), "weight") for l in layers]
    shift = lam * (answer_embedding(model, tok, request.target_new) - answer_embedding(model, tok, old))
    check_finite(shift, "kn_edit: the value shift")
    with recording(model, names, method="KN") as edit:
        with torch.no_grad():
            for l, i in neurons:
                V = arch.value_matrix(l)                    # (d_ff, d_model) view of the weight
                V[i] += shift.to(V.dtype)
    edit.n_params = len(neurons) * arch.d_model
    edit.info = dict(neurons=neurons, old=old, lam=lam, request=request)
    return edit
