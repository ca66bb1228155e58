"""Directional reparameterization (DiVeQ, arXiv 2509.26469, figure 1): gradients through vector
quantization that train the codebook by the task loss alone.

The output is x + v ||q - x||, where v is the direction of the quantization error q - x with a
little Gaussian noise added (variance `variance` per component), normalized, and held constant.
In value it is the code q up to that direction noise (exactly q when the variance is 0); the
gradient g reaching it goes to the input as g - e (v . g) and to the code as e (v . g), with
e = (q - x) / ||q - x||: the code moves with the loss along the error direction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_non_negative


def check_directional_reparam(enabled: bool, variance, straight_through: bool, rotation_trick: bool,
                              threshold_ema_dead_code: float) -> None:
    """The peer's constraints, as errors: one gradient estimator, dead-code replacement on."""
    if not enabled:
        return
    check_non_negative("directional_reparam_variance", variance)
    if straight_through or rotation_trick:
        raise ValueError("directional_reparam, straight_through, rotation_trick: choose one gradient estimator, got "
                         f"directional_reparam=True with straight_through={straight_through}, "
                         f"rotation_trick={rotation_trick}")
    if not threshold_ema_dead_code > 0:
        raise ValueError("threshold_ema_dead_code: directional_reparam=True needs dead-code replacement "
                         f"(a threshold > 0, e.g. 2), got {threshold_ema_dead_code!r}")


def directional_reparam(x: Tensor, q: Tensor, variance: float = 5e-3, noise: Tensor | None = None) -> Tensor:
    """x, q (..., d) -> x + v ||q - x|| (see the module docstring); gradients to x and q.

    `noise` (..., d) standard normal; drawn from torch's default generator when None.
    """
    error = q - x
    with torch.no_grad():
        noise = torch.randn_like(error) if noise is None else noise
        direction = F.normalize(error + math.sqrt(variance) * noise, dim=-1)
    length = error.square().sum(-1, keepdim=True).clamp(min=1e-30).sqrt()  # finite gradient at q == x
    return x + direction * length
