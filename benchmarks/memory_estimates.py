"""Estimated peak GPU memory of the course's heavy steps on real models, from their shapes alone.

    python benchmarks/memory_estimates.py

No weights are downloaded: each model is described by its published shape (layers, widths,
vocabulary). These are estimates (weights + the largest buffers a step keeps), not measurements;
activations of a forward pass on short prompts are small next to them and are covered by a flat
margin. Printed as a Markdown table for the README.
"""
from __future__ import annotations

GIB = 2 ** 30
MARGIN = 0.5 * GIB     # CUDA context, allocator slack, activations of short prompts

# name: (parameters, layers, d_model, d_ff, vocab, dtype bytes, MEMIT layers used)
MODELS = {
    "gpt2-xl (T4, float16)": (1.558e9, 48, 1600, 6400, 50257, 2, 5),
    "GPT-J 6B (A100, float16)": (6.053e9, 28, 4096, 16384, 50400, 2, 6),
    "Llama-2-7B (A100, float16)": (6.738e9, 32, 4096, 11008, 32000, 2, 5),
}


def estimates(params, layers, d_model, d_ff, vocab, nbytes, memit_layers) -> dict[str, float]:
    weights = params * nbytes
    cov = d_ff * d_ff * 8                      # one float64 key covariance (on the device while it is built)
    logits = 11 * 64 * vocab * 4               # tracing: 1 clean + 10 noised rows, 64 tokens, float32 logits
    # integrated gradients: 20 scaled rows of 64 tokens; backward keeps per token and layer about the
    # residual, norms, q/k/v, attention output (8·d_model) and the FFN's hidden pre/post activation (2·d_ff)
    ig = 20 * 64 * layers * (8 * d_model + 2 * d_ff) * nbytes
    ft = 2 * d_model * d_ff * 4 * 4            # fine-tuning one FFN layer: fp32 weights, grads, Adam's 2 moments
    return {
        "load + 01–04 (forward passes)": weights + MARGIN,
        "05 causal tracing": weights + logits + MARGIN,
        "06 knowledge neurons (IG)": weights + ig + MARGIN,
        "07 ROME / fine-tuning at one layer": weights + cov + ft + MARGIN,
        "09 MEMIT (covariances of its layers)": weights + memit_layers * cov + MARGIN,
    }


def main() -> None:
    rows = {name: estimates(*shape) for name, shape in MODELS.items()}
    steps = list(next(iter(rows.values())))
    print("| step | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for step in steps:
        print(f"| {step} | " + " | ".join(f"{r[step] / GIB:.1f} GiB" for r in rows.values()) + " |")


if __name__ == "__main__":
    main()
