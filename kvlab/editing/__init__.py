"""Editing facts in FFN memories: ROME, fine-tuning keys vs values, knowledge neurons (MEMIT in memit.py).

    from kvlab.editing import EditRequest, apply_rome
    req = EditRequest("{} lives in", "Anna Berg", target_new="Kelmor")
    with apply_rome(model, tok, req) as edit:     # undone when the block ends
        ...

Every editor returns a :class:`WeightEdit` (``.undo()`` restores the weights bit-for-bit).
"""
from __future__ import annotations

from .base import (EditRequest, WeightEdit, current_answer, current_answer_ids, param_name,  # noqa: F401
                   recording, same_weights, snapshot, undo_all)
from .covariance import key_covariance, solve  # noqa: F401
from .rome import (ROMEConfig, apply_rome, compute_key, compute_value, context_templates,  # noqa: F401
                   default_layer, rome_update, value_at)
from .finetune import FTConfig, ffn_params, finetune_edit, ft_keys, ft_values  # noqa: F401
from .metrics import (evaluate, evaluate_edits, generate, harmonic_mean, known_correct,  # noqa: F401
                      known_recall, n_gram_entropy, record_scores, summarize, target_nll, target_prob)
