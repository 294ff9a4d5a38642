"""Solutions to the exercises of notebook 07 (see notebooks/solutions/01.py)."""

# %% exercise 07.1
import torch


def rome_update_by_hand(V, bias, C, k_star, v_star):
    """ΔV (d_ff, d_model) = outer(C⁻¹k*, Λ), Λ = (v* − Vᵀk* − b) / ((C⁻¹k*)ᵀk*), so (V + ΔV)ᵀk* + b = v*."""
    u = torch.linalg.solve(C, k_star)                                    # (d_ff,) C⁻¹k*: solve, never invert
    current = V.T @ k_star + (bias if bias is not None else 0)           # (d_model,) what the layer says now
    lam = (v_star - current) / (u @ k_star)                              # (d_model,)
    return torch.outer(u, lam)
