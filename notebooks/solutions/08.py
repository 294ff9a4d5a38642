"""Solutions to the exercises of notebook 08 (see notebooks/solutions/01.py)."""

# %% exercise 08.1
def lora_targets(arch, role):
    """Full module names of the FFN keys or values in every layer, e.g. "transformer.h.3.mlp.c_fc"."""
    f = arch.family
    leaves = f.keys if role == "keys" else (f.value,)                    # gated FFNs: two key matrices
    return [f"{f.layers}.{l}.{f.mlp}.{leaf}" for l in range(arch.n_layers) for leaf in leaves]
