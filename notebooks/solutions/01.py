"""Solutions to the exercises of notebook 01. `python -m kvlab.course run` puts each section in place of
the notebook cell tagged `exercise` with the same id; a learner opens this file only to compare."""

# %% exercise 01.1
def coefficients_by_hand(arch, layer, x):
    """m = f(x·Kᵀ + b_K): (batch, seq, d_model) -> (batch, seq, d_ff). Gated FFNs: act(x·Gᵀ) * (x·Uᵀ)."""
    pre = [x @ K.T + (b if b is not None else 0)                       # (batch, seq, d_ff) each
           for K, b in zip(arch.key_matrices(layer), arch.key_biases(layer))]
    act = arch.act(layer)
    if arch.family.gated:
        gate, up = pre
        return act(gate) * up
    return act(pre[0])


# %% exercise 01.2
def ffn_by_hand(arch, layer, m):
    """Σ_i m_i v_i + b: (batch, seq, d_ff) -> (batch, seq, d_model)."""
    V = arch.value_matrix(layer)                                        # (d_ff, d_model): row i is v_i
    b = arch.value_bias(layer)
    return m @ V + (b if b is not None else 0)
