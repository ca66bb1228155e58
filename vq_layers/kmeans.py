"""k-means codebook init and data sampling that end the same on every rank.

Samples are drawn from the union of the ranks' (unmasked) vectors: each rank offers a random
subset of its own, the offers are gathered in rank order, and the draw among them uses a
generator seeded alike on every rank. Lloyd iterations then reduce per-code counts and sums
over the ranks (code_statistics), so the means are those of the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import all_gather
from .ema import code_statistics
from .kernels.nearest_code import nearest_code
from .precision import fp32_island


@torch.no_grad()
def offered_rows(x: Tensor, num: int, sync: bool, group=None) -> Tensor:
    """x (n, d) -> the rows every rank can draw from: a random subset of at most `num` of this
    rank's rows, concatenated over the ranks when `sync` (identical on every rank)."""
    if x.shape[0] > num:
        x = x[torch.randperm(x.shape[0], device=x.device)[:num]]
    return all_gather(x.contiguous(), group) if sync else x


@torch.no_grad()
def draw_rows(pool: Tensor, num: int, generator: torch.Generator) -> Tensor:
    """`num` rows of pool (p, d), p >= 1: without replacement when p >= num."""
    p = pool.shape[0]
    if p >= num:
        picks = torch.randperm(p, generator=generator, device=pool.device)[:num]
    else:
        picks = torch.randint(0, p, (num,), generator=generator, device=pool.device)
    return pool[picks]


@fp32_island
@torch.no_grad()
def kmeans(samples: list[Tensor], num_clusters: int, iters: int, metric: str, generator: torch.Generator,
           sync: bool = False, group=None) -> tuple[Tensor, Tensor] | None:
    """samples: per codebook, (n_h, d) vectors -> means (h, k, d), counts (h, k) of the last assignment.

    None when no rank has a single vector for some codebook (nothing to initialize from).
    metric "dot" is spherical k-means (cosine codebooks): means are renormalized.
    """
    pools = [offered_rows(s, num_clusters, sync, group) for s in samples]
    if any(pool.shape[0] == 0 for pool in pools):
        return None
    means = torch.stack([draw_rows(pool, num_clusters, generator) for pool in pools])
    counts = means.new_zeros(means.shape[:2])
    for _ in range(iters):
        new_means, counts = [], []
        for h, s in enumerate(samples):
            indices, _ = nearest_code(s, means[h], metric)
            count, total = code_statistics(s[None], indices[None], num_clusters, sync=sync, group=group)
            new_means.append(total[0] / count[0].clamp(min=1).unsqueeze(-1))
            counts.append(count[0])
        new_means, counts = torch.stack(new_means), torch.stack(counts)
        if metric == "dot":
            new_means = F.normalize(new_means, dim=-1)
        means = torch.where((counts > 0).unsqueeze(-1), new_means, means)  # an empty cluster stays put
    return means, counts
