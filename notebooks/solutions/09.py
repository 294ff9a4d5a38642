"""Solutions to the exercises of notebook 09 (see notebooks/solutions/01.py)."""

# %% exercise 09.1
import torch


def memit_by_hand(K, R, C, lam):
    """Δ (d_ff, d_model) = argmin ‖KΔ − R‖² + λ tr(ΔᵀCΔ) = (λC + KᵀK)⁻¹KᵀR."""
    A = lam * C + K.T @ K                                                # (d_ff, d_ff), positive definite for λ > 0
    return torch.linalg.solve(A, K.T @ R)                                # (d_ff, d_model)
