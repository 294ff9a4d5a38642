"""Solutions to the exercises of notebook 06 (see notebooks/solutions/01.py)."""

# %% exercise 06.1
import torch
import kvlab


def integrated_gradients(model, tok, prompt, answer, layer, neuron, steps=20):
    """Attr_i = m̄_i · (1/S) Σ_k ∂p(α_k m̄)/∂m_i, α_k = (k − ½)/S: the whole layer scaled at the last prompt position."""
    arch = kvlab.adapter(model)
    batch = kvlab.neurons.answer_batch(model, tok, prompt, answer)
    pos = int(batch.prompt_last[0])
    with torch.no_grad(), kvlab.hooks.capture(model, {"m": arch.value_module(layer)}, what="input") as st:
        model(**batch.inputs())
    m_bar = st["m"][0, pos]                                              # (d_ff,) clean coefficients
    grad_sum = 0.0
    for k in range(1, steps + 1):
        alpha = (k - 0.5) / steps
        scaled = (alpha * m_bar).detach().requires_grad_(True)           # (d_ff,)

        def put(m):                                                      # (1, seq, d_ff): value projection's input
            m = m.clone()
            m[0, pos] = scaled.to(m.dtype)
            return m

        with torch.enable_grad(), kvlab.hooks.patch(arch.value_module(layer), put, what="input"):
            p = kvlab.neurons.answer_logprob(model(**batch.inputs()).logits, batch).exp()[0]
            grad_sum += float(torch.autograd.grad(p, scaled)[0][neuron])
    return float(m_bar[neuron]) * grad_sum / steps
