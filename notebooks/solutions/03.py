"""Solutions to the exercises of notebook 03 (see notebooks/solutions/01.py)."""

# %% exercise 03.1
import torch


def project_value(arch, layer, key):
    """Logits (vocab,) of value v_key read through the final layer norm and the unembedding."""
    v = arch.value_matrix(layer)[key]                                    # (d_model,)
    with torch.no_grad():
        return arch.unembed(arch.final_norm(v[None]))[0]                 # (vocab,)
