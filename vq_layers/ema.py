"""EMA codebook statistics (VQ-VAE's exponential moving averages), in fp32 and O(N·d).

Per code: how many vectors chose it (counts) and their sum (sums), by index_add — never a
one-hot N x K matrix. Under sync the two are summed over the ranks in one all-reduce, so every
rank applies the same update and the result is that of one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiling import sums_by_index
from .distributed import all_reduce_sum_, check_finite
from .precision import fp32_island


@fp32_island
@torch.no_grad()
def code_statistics(x: Tensor, indices: Tensor, codebook_size: int, keep: Tensor | None = None,
                    sync: bool = False, group=None) -> tuple[Tensor, Tensor]:
    """x (h, n, d), indices (h, n) int64, keep (h, n) bool or None -> counts (h, k), sums (h, k, d).

    Rows with keep False count nowhere (their values, NaN included, never enter a sum).
    """
    h, n, d = x.shape
    weight = x.new_ones((h, n)) if keep is None else keep.to(torch.float32)
    if keep is not None:
        x = torch.where(keep.unsqueeze(-1), x, 0.0)
    flat = (indices + torch.arange(h, device=x.device).unsqueeze(-1) * codebook_size).reshape(-1)
    # (sums | counts) in one tensor: one all-reduce
    stats = sums_by_index(flat, x.reshape(-1, d), weight.reshape(-1), h * codebook_size)
    if sync:
        all_reduce_sum_(stats, group)
    stats = stats.reshape(h, codebook_size, d + 1)
    return stats[..., d], stats[..., :d]


@torch.no_grad()
def ema_update_(cluster_size: Tensor, embed_avg: Tensor, counts: Tensor, sums: Tensor, decay: float,
                weight: Tensor | None = None) -> None:
    """cluster_size (h, k) and embed_avg (h, k, d) move towards this batch's statistics.

    Per code, the step is lerp(old, new, (1 - decay) * weight) with weight (h, k) or (k,)
    (vector-quantize-pytorch's `ema_update_weight`; 1 when None): a code of weight 0 keeps its
    statistics, weight 1 everywhere is the plain step. A codebook whose batch had no vector at
    all (all masked, empty) keeps its statistics rather than decaying towards zero.
    """
    seen = (counts.sum(-1, keepdim=True) > 0).to(torch.float32)  # (h, 1): no host sync
    step = (1 - decay) * seen
    if weight is not None:
        step = step * weight
    cluster_size.lerp_(counts, step)
    embed_avg.lerp_(sums, step.unsqueeze(-1))


def ema_weight(weight, sums: Tensor, counts: Tensor) -> Tensor | None:
    """`ema_update_weight` as given (None, a number, a (k,) or (h, k) tensor, or a callable
    (sums (h, k, d), counts (h, k)) -> one of those) -> fp32 (h, k) weights, or None.

    Raises ValueError naming `ema_update_weight` for a wrong shape or a negative or non-finite
    weight, before any statistic changes. Under sync, a tensor weight must be the same on every
    rank (a callable sees the all-reduced statistics, so it is)."""
    if weight is None:
        return None
    if callable(weight):
        weight = weight(sums, counts)
    h, k = counts.shape
    weight = torch.as_tensor(weight, dtype=torch.float32, device=counts.device)
    if weight.ndim > 2 or (weight.ndim >= 1 and weight.shape[-1] != k) or (weight.ndim == 2 and weight.shape[0] != h):
        raise ValueError(f"ema_update_weight: expected a number or a tensor of shape ({k},) or ({h}, {k}) "
                         f"(codebook_size, per codebook), got shape {tuple(weight.shape)}")
    # a negative weight counts as non-finite: one check (an in-graph assert under torch.compile on CPU)
    check_finite(weight.where(weight >= 0, torch.nan), "ema_update_weight: expected finite weights >= 0, got a "
                 "negative, NaN or Inf value; the statistics were left untouched", sync=False)
    return weight.expand(h, k)


def smoothed_cluster_size(cluster_size: Tensor, eps: float) -> Tensor:
    """Laplace smoothing of the counts (h, k), keeping their total: no code divides by zero."""
    k = cluster_size.shape[-1]
    total = cluster_size.sum(-1, keepdim=True)
    return (cluster_size + eps) / (total + k * eps) * total


def normalized_codebook(cluster_size: Tensor, embed_avg: Tensor, eps: float, cosine: bool) -> Tensor:
    """The codebook the statistics describe: embed_avg / smoothed cluster_size, (h, k, d)."""
    codebook = embed_avg / smoothed_cluster_size(cluster_size, eps).unsqueeze(-1)
    return F.normalize(codebook, dim=-1) if cosine else codebook
