"""The papers' numbers the course compares with, each with its citation.

``PAPER[key] = (value, source)``; values as fractions (0.186 for 18.6%) unless the paper's metric is
on a 0–100 scale (CounterFact's S/ES/PS/NS). Notebooks pass ``ref=key`` to :func:`kvlab.checks.claim`,
which copies the number and citation into the scorecard.

Papers:
- Geva et al. 2021, "Transformer Feed-Forward Layers Are Key-Value Memories", EMNLP (16-layer LM on WikiText-103).
- Geva et al. 2022, "Transformer Feed-Forward Layers Build Predictions by Promoting Concepts in the
  Vocabulary Space", EMNLP.
- Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (ROME), NeurIPS (GPT-2 XL unless noted).
- Meng et al. 2023, "Mass-Editing Memory in a Transformer" (MEMIT), ICLR.
- Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers", ACL (BERT-base).
- Qiu et al. 2024, "Empirical Study on Updating Key-Value Memories in Transformer Feed-forward Layers".
"""
from __future__ import annotations

GEVA21 = "Geva et al. 2021"
GEVA22 = "Geva et al. 2022"
ROME = "Meng et al. 2022 (ROME), GPT-2 XL"
MEMIT = "Meng et al. 2023 (MEMIT)"
DAI = "Dai et al. 2022 (Knowledge Neurons)"
QIU = "Qiu et al. 2024"

PAPER: dict[str, tuple[float | str, str]] = {
    # Geva et al. 2021
    "geva.pattern_share": (0.65, f"{GEVA21}: 65–80% of trigger prefixes match a pattern"),
    "geva.removal_last_low": (0.675, f"{GEVA21}: removing the last token, layer 1 (65–70%)"),
    "geva.removal_last_high": (0.20, f"{GEVA21}: removing the last token, layer 16 (~20%)"),
    "geva.removal_first": (0.125, f"{GEVA21}: removing the first token (10–15%)"),
    "geva.removal_random": (0.175, f"{GEVA21}: removing a random token (15–20%)"),
    "geva.agreement_low": (0.0, f"{GEVA21}: value agreement in layers 1–10 (~0%)"),
    "geva.agreement_high": (0.035, f"{GEVA21}: value agreement in the upper layers (~3.5%)"),
    "geva.agreement_random": (0.000004, f"{GEVA21}: random baseline (0.0004%)"),
    "geva.active_min": (0.10, f"{GEVA21}: 10–50% of memories active per layer"),
    "geva.active_max": (0.50, f"{GEVA21}: 10–50% of memories active per layer"),
    "geva.shallow_low": ("shallow patterns dominate", f"{GEVA21}: shallow patterns dominate the keys of layers 1–9"),
    "geva.semantic_high": ("semantic patterns dominate", f"{GEVA21}: semantic patterns dominate the keys of layers 10–16"),
    "geva.composition": (0.68, f"{GEVA21}: layer prediction differs from every memory's in ≥68%"),
    "geva.residual_low": (0.33, f"{GEVA21}: residual = final prediction, low layers (~1/3)"),
    "geva.residual_high": (0.95, f"{GEVA21}: residual = final prediction, top layer (~95%)"),
    "geva.compose_most": ("most", f"{GEVA21}: when the FFN changes the residual's prediction, the new top token is "
                                  "mostly a composition (neither the residual's nor the FFN's own top token)"),
    # Geva et al. 2022
    "geva22.sub_updates": ("qualitative", f"{GEVA22}: the top sub-updates of upper layers promote the predicted "
                                          "token or related concepts"),
    # ROME, causal tracing on 1,000 known facts
    "rome.clean_p": (0.270, f"{ROME}: mean clean p(answer) on known facts"),
    "rome.corrupted_p": (0.0847, f"{ROME}: mean corrupted p(answer)"),
    "rome.ate": (0.186, f"{ROME}: average total effect"),
    "rome.hidden_aie_subject": (0.087, f"{ROME}: hidden AIE peak at the last subject token, layer 15/48"),
    "rome.hidden_peak_depth": (0.31, f"{ROME}: relative depth of the hidden AIE peak at the last subject token "
                                     "(layer 15 of 48)"),
    "rome.mlp_aie_subject": (0.066, f"{ROME}: MLP AIE peak at the last subject token (~layer 17/48)"),
    "rome.attn_aie_subject": (0.016, f"{ROME}: attention AIE at the last subject token"),
    "rome.attn_peak_row": ("last token", f"{ROME}: attention's effect peaks at the last prompt token"),
    # ROME, CounterFact (×100)
    "rome.cf.unedited": (30.5, f"{ROME}: unedited S (ES 22.2, PS 24.7, NS 78.1)"),
    "rome.cf.unedited_ns": (78.1, f"{ROME}: unedited NS"),
    "rome.cf.es": (100.0, f"{ROME}: ROME efficacy ES"),
    "rome.cf.ps": (96.4, f"{ROME}: ROME paraphrase PS"),
    "rome.cf.ns": (75.4, f"{ROME}: ROME neighborhood NS"),
    "rome.cf.s": (89.2, f"{ROME}: ROME score S"),
    "rome.cf.ft_ns": (40.4, f"{ROME}: fine-tuning (FT) NS"),
    "rome.cf.ft_es": (100.0, f"{ROME}: fine-tuning (FT) ES"),
    "rome.cf.ft_s": (65.1, f"{ROME}: fine-tuning (FT) S"),
    "rome.cf.kn_s": (35.6, f"{ROME}: knowledge-neuron editor S"),
    # MEMIT
    "memit.s_10k": (85.8, f"{MEMIT}: 10,000 CounterFact edits on GPT-J, S"),
    "memit.ns_10k": (73.7, f"{MEMIT}: 10,000 CounterFact edits on GPT-J, NS"),
    "memit.rome_s_10k": (50.3, f"{MEMIT}: sequential ROME, 10,000 edits on GPT-J, S"),
    # Knowledge neurons
    "kn.suppress": (-0.29, f"{DAI}: suppressing knowledge neurons, mean relative change in p"),
    "kn.amplify": (0.31, f"{DAI}: amplifying knowledge neurons, mean relative change in p"),
    "kn.baseline": (0.015, f"{DAI}: baseline neurons, mean relative change (~1.5%)"),
    "kn.per_fact": (4.0, f"{DAI}: about 4 knowledge neurons per fact"),
    "kn.where": ("mostly top layers", f"{DAI}: knowledge neurons sit mostly in the top layers (BERT-base)"),
    # Qiu et al.
    "qiu.keys_beat_values": ("keys > values", f"{QIU}: updating keys beats updating values (LoRA, Llama-2-7B)"),
}


# Whole tables, as the papers print them: name -> (rows, citation).
TABLES: dict[str, tuple[dict, str]] = {
    # method -> (S, ES, PS, NS), ×100, 2,000+ CounterFact rewrites on GPT-2 XL
    "rome.counterfact": ({"unedited": (30.5, 22.2, 24.7, 78.1), "FT": (65.1, 100.0, 87.9, 40.4),
                          "FT+L": (66.9, 99.1, 48.7, 70.3), "KN": (35.6, 28.7, 28.0, 72.9),
                          "ROME": (89.2, 100.0, 96.4, 75.4)},
                         "Meng et al. 2022 (ROME), Table 4: CounterFact, GPT-2 XL"),
}


# A paper's numbers at the depth where it measured them, for drawing beside our per-layer curves: (relative depth,
# value) with relative depth = (layer − 1) / (n_layers − 1) for the paper's 1-based layers (0: first layer,
# 1: last). Only numbers the papers state; :func:`at_layers` maps them onto a model's layers.
CURVES: dict[str, tuple[list[tuple[float, float]], str]] = {
    "geva.removal_last": ([(0.0, 0.675), (1.0, 0.20)],
                          f"{GEVA21}: removing the last token, layer 1 (65–70%) and layer 16 (~20%) of 16"),
    "geva.agreement": ([(0.0, 0.0), (9 / 15, 0.0), (1.0, 0.035)],
                       f"{GEVA21}: value agreement ~0% in layers 1–10, ~3.5% in the upper layers (drawn at 16) of 16"),
    "geva.residual": ([(0.0, 0.33), (1.0, 0.95)],
                      f"{GEVA21}: residual = final prediction, ~1/3 in the low layers (drawn at 1), ~95% at the top"),
    "rome.hidden_aie_subject": ([(15 / 47, 0.087)], f"{ROME}: hidden AIE peak at the last subject token, layer 15 of 48"),
    "rome.mlp_aie_subject": ([(17 / 47, 0.066)], f"{ROME}: MLP AIE peak at the last subject token, ~layer 17 of 48"),
}


def at_layers(key: str, n_layers: int, scale: float = 1.0) -> list[tuple[float, float]]:
    """The points of :data:`CURVES` ``[key]`` at a model's layers (0-based, fractional where the depth falls
    between two), values × ``scale``."""
    try:
        pts, _ = CURVES[key]
    except KeyError:
        raise ValueError(f"no paper curve {key!r}; known: {', '.join(sorted(CURVES))}") from None
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return [(d * (n_layers - 1), scale * v) for d, v in pts]


def curve_label(key: str) -> str:
    """The legend label of a paper curve: "paper (<authors, year>)" (the full citation is in :data:`CURVES`)."""
    return f"paper ({CURVES[key][1].split(':')[0]})"


def paper(key: str) -> tuple[float | str, str]:
    """(the paper's number, its citation) for ``key``; a clear error for an unknown key."""
    try:
        return PAPER[key]
    except KeyError:
        raise ValueError(f"no paper reference {key!r}; known: {', '.join(sorted(PAPER))}") from None
