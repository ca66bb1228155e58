"""The affine reparameterization of a codebook (vqtorch, arXiv 2305.08842; vector-quantize-pytorch's
`affine_param`), in fp32.

Running per-dimension moments of the batch (mean mu_b, variance var_b) and of the codebook
(mu_c, var_c) define an affine map that carries the codebook onto the batch's statistics:

    searched code = (c - mu_c) * sigma_b / sigma_c + mu_b,   sigma = sqrt(max(var, 1e-5))

and its inverse carries a batch vector back to the codebook's frame (where the EMA statistics
and revived dead codes live). Variances are the biased ones (divide by the count). Masked rows
count nowhere; under sync the batch moments are those of the global batch (two all-reduces:
the count and sum, then the squared deviations from the global mean, as a two-pass variance).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed import all_reduce_sum_

VARIANCE_FLOOR = 1e-5


@torch.no_grad()
def batch_moments(x: Tensor, keep: Tensor | None, sync: bool, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """x (h, n, d) fp32, keep (h, n) or None -> count (h, 1, 1), mean (h, 1, d), variance (h, 1, d).

    A codebook with no kept row anywhere gets count 0 and mean/variance 0 (callers skip it)."""
    weight = torch.ones_like(x[..., :1]) if keep is None else keep.unsqueeze(-1).to(torch.float32)
    x = x if keep is None else torch.where(keep.unsqueeze(-1), x, 0.0)
    first = torch.cat([weight.sum(1, keepdim=True), x.sum(1, keepdim=True)], dim=-1)  # (h, 1, 1 + d)
    if sync:
        all_reduce_sum_(first, group)
    count = first[..., :1]
    mean = first[..., 1:] / count.clamp(min=1)
    squares = ((x - mean).square() * weight).sum(1, keepdim=True)
    if sync:
        all_reduce_sum_(squares, group)
    return count, mean, squares / count.clamp(min=1)


def codebook_moments(codes: Tensor) -> tuple[Tensor, Tensor]:
    """codes (h, k, d) -> mean (h, 1, d), biased variance (h, 1, d) over the codes."""
    var, mean = torch.var_mean(codes, dim=1, keepdim=True, correction=0)
    return mean, var


def scale(from_var: Tensor, to_var: Tensor) -> Tensor:
    """sigma_to / sigma_from with both variances floored at VARIANCE_FLOOR."""
    return (to_var.clamp(min=VARIANCE_FLOOR) / from_var.clamp(min=VARIANCE_FLOOR)).sqrt()


def to_batch_frame(codes: Tensor, codebook_mean: Tensor, codebook_var: Tensor, batch_mean: Tensor,
                   batch_var: Tensor) -> Tensor:
    """codes (h, k, d) -> the codes as searched: (c - mu_c) * sigma_b / sigma_c + mu_b."""
    return (codes - codebook_mean) * scale(codebook_var, batch_var) + batch_mean


def to_codebook_frame(x: Tensor, codebook_mean: Tensor, codebook_var: Tensor, batch_mean: Tensor,
                      batch_var: Tensor) -> Tensor:
    """x (h, n, d) -> the codebook's frame, the inverse map: (x - mu_b) * sigma_c / sigma_b + mu_c."""
    return (x - batch_mean) * scale(batch_var, codebook_var) + codebook_mean
