"""Linear centred kernel alignment (Kornblith et al., 2019), the similarity SAFE scores with.

    CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F),   X, Y column-centred, rows = samples.

It is 1 when X = Y and invariant to isotropic scaling and orthogonal transforms of either
side, so 1 − CKA measures how much an adapter *reshapes* a layer's features, not how much
it scales them.
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two feature maps with the same rows (samples).

    Args:
        x: ``[n, d1]`` features, one row per sample (token).
        y: ``[n, d2]`` features of the same samples.

    Computed in float64 after centring each column. When there are fewer rows than
    features the equivalent sample-space form ⟨K_x, K_y⟩ / (‖K_x‖‖K_y‖) with
    K = XXᵀ is used, since ‖YᵀX‖²_F = tr(K_x K_y) and ‖XᵀX‖_F = ‖K_x‖_F; it costs n²d
    instead of nd².

    Raises:
        ValueError: if the shapes disagree, there are fewer than two rows, or either side
            has no variance (CKA is undefined there).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cka needs two [n, d] matrices with equal n, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least two rows (samples)")
    x = x.detach().to(torch.float64)
    y = y.detach().to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T
        cross, norm_x, norm_y = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        cross = (y.T @ x).square().sum()
        norm_x, norm_y = (x.T @ x).norm(), (y.T @ y).norm()
    if norm_x == 0 or norm_y == 0:
        raise ValueError("linear_cka is undefined for features with zero variance")
    return float(cross / (norm_x * norm_y))
