"""The rotation trick (Fifty et al. 2024, arXiv 2410.06424, section 4.2): gradients through
vector quantization by rotating and rescaling the input onto its code.

Forward: the code q itself (exactly, see straight_through). Backward: the gradient g reaching q
goes to the input x as lambda R^T g, where R rotates x's direction u onto q's direction q^ and
lambda = ||q|| / ||x||, both treated as constants. R = I - 2 w w^T + 2 q^ u^T with
w = (u + q^) / ||u + q^||, applied in O(d) per vector (never a d x d matrix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .straight_through import straight_through

EPS = 1e-6


def rotation_trick(x: Tensor, q: Tensor) -> Tensor:
    """x, q (..., d) -> q in value; gradient to x by the rotation trick (none to q)."""
    with torch.no_grad():
        x_norm = x.norm(dim=-1, keepdim=True).clamp(min=EPS)
        q_norm = q.norm(dim=-1, keepdim=True).clamp(min=EPS)
        u, q_dir = x / x_norm, q / q_norm
        w = F.normalize(u + q_dir, dim=-1, eps=EPS)
        scale = q_norm / x_norm
    # lambda R x, differentiable in x only: its vector-Jacobian product is lambda R^T g
    rotated = scale * (x - 2 * (x * w).sum(-1, keepdim=True) * w + 2 * (x * u).sum(-1, keepdim=True) * q_dir)
    return straight_through(q, rotated)
