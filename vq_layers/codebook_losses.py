"""Losses on a VQ codebook, fp32: the masked squared error to the codes (commitment), the
diversity of the batch's code distribution and the orthogonality of the codes. Vectors and
codebooks come per codebook axis: (g, m, d) and (g, k, d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiling import sums_by_index
from .distributed import all_reduce_sum, all_reduce_sum_
from .kernels.code_softmax import code_probs_sum, entropy


def masked_mse(x: Tensor, target: Tensor, kept: Tensor | None, sync: bool = False, group=None) -> tuple[Tensor, Tensor]:
    """x, target (g, m, d), kept (g, m) or None -> (sum of the kept rows' squared errors over
    their element count, that count); under `sync` the count is the global batch's (the caller
    sums the ranks' losses or gradients), so the ranks' terms add up to the global mean."""
    error = (x - target).square()
    if kept is not None:
        error = torch.where(kept.unsqueeze(-1), error, 0.0)
    count = mse_count(x, kept, sync, group)
    return error.sum() / count.clamp(min=1), count


def mse_count(x: Tensor, kept: Tensor | None, sync: bool = False, group=None) -> Tensor:
    """masked_mse's element count for x (g, m, d), kept (g, m) or None (the global batch's under `sync`)."""
    rows = x.new_tensor(float(x.shape[0] * x.shape[1])) if kept is None else kept.sum().float()
    count = rows * x.shape[-1]
    return all_reduce_sum_(count.clone(), group) if sync else count


def diversity_loss(search: Tensor, codebook: Tensor, metric: str, temperature: float, kept: Tensor | None,
                   sync: bool, group=None) -> Tensor:
    """Minus the entropy of the batch's mean code distribution softmax(-distance * temperature)
    (the global batch's when synced), mean over codebooks. search (g, m, d), kept (g, m) or None."""
    probs = code_probs_sum(search, codebook, metric, temperature, kept)
    if kept is None:
        count = search.new_full((search.shape[0], 1), float(search.shape[1]))
    else:
        count = kept.sum(-1, keepdim=True, dtype=torch.float32)
    if sync:  # the codebook's distribution over the global batch
        probs = all_reduce_sum(probs, group)
        count = all_reduce_sum_(count.clone(), group)
    return -entropy(probs / count.clamp(min=1)).mean()


def orthogonal_loss(codebooks: Tensor, indices: Tensor, kept: Tensor | None, active_codes_only: bool,
                    max_codes: int | None) -> Tensor:
    """Eq. 2 of arXiv 2112.00384, mean over codebooks of ||C^ C^T||_F^2 / K^2 - 1/K on
    normalized codes C^, computed as ||C^T C^||_F^2 (a d x d product, not K x K).

    `codebooks` (g, k, d): the step's snapshot (the EMA update rewrites the live codes before the
    backward runs); `indices` (g, m) the codes chosen, for `active_codes_only`; at most
    `max_codes` codes, drawn at random, per codebook. The codes taken are a 0/1 weight on every
    code (no data-dependent shape): K is their count, and a codebook without any has no loss.
    """
    g, k, _ = codebooks.shape
    taken = torch.ones(g, k, dtype=torch.bool, device=codebooks.device)
    if active_codes_only:
        weight = torch.ones_like(indices, dtype=torch.float32) if kept is None else kept.float()
        flat = (indices + torch.arange(g, device=indices.device).unsqueeze(-1) * k).reshape(-1)
        taken = sums_by_index(flat, weight.new_empty((flat.shape[0], 0)), weight.reshape(-1), g * k).reshape(g, k) > 0
    if max_codes is not None and k > max_codes:  # the first max_codes taken codes in a random order
        # code c's rank in a random permutation (the inverse permutation: perm[:max_codes] are the first)
        priority = torch.stack([torch.randperm(k, device=codebooks.device).argsort() for _ in range(g)])
        position = torch.where(taken, priority, priority + k).argsort(dim=1).argsort(dim=1)  # rank among all
        taken = taken & (position < max_codes)
    normed = F.normalize(codebooks, dim=-1) * taken.unsqueeze(-1)
    gram = normed.transpose(1, 2) @ normed  # (g, d, d)
    count = taken.sum(-1).float()
    loss = gram.square().sum((1, 2)) / count.clamp(min=1).square() - 1 / count.clamp(min=1)
    return torch.where(count > 0, loss, 0.0).mean()
