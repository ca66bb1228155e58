"""Regularizers on a VQ codebook, fp32: the diversity of the batch's code distribution and the
orthogonality of the codes. Both take the codebooks per codebook axis, (g, k, d)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import all_reduce_sum, all_reduce_sum_
from .kernels.code_softmax import code_probs_sum, entropy


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
    `max_codes` codes, drawn at random, per codebook.
    """
    losses = []
    for g, codebook in enumerate(codebooks):
        if active_codes_only:
            used = indices[g] if kept is None else indices[g][kept[g]]
            codebook = codebook[torch.unique(used)]
        if max_codes is not None and codebook.shape[0] > max_codes:
            codebook = codebook[torch.randperm(codebook.shape[0], device=codebook.device)[:max_codes]]
        k = codebook.shape[0]
        if k == 0:
            losses.append(codebook.sum() * 0)
            continue
        normed = F.normalize(codebook, dim=-1)
        gram = normed.t() @ normed
        losses.append(gram.square().sum() / k**2 - 1 / k)
    return torch.stack(losses).mean()
