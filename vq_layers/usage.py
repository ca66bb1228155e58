"""Codebook usage of a batch of indices: perplexity, fraction used, distinct codes used.

Counts come from `torch.unique`, so the cost is O(N log N) whatever the codebook size (no
bincount over 2^32 codes). Negative indices (masked or dropped tokens) count nowhere. Under
torch.distributed the indices of every rank are gathered first, so every rank reports the
statistics of the global batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .distributed import all_gather


class CodeUsage(NamedTuple):
    perplexity: Tensor  # exp(entropy of the empirical code distribution), fp32, 1..K
    usage: Tensor  # fraction of the codebook used by the batch, fp32 in [0, 1]
    codes_used: Tensor  # number of distinct codes used, int64


@torch.no_grad()
def code_usage(indices: Tensor, codebook_size: int, process_group=None) -> CodeUsage:
    """Usage statistics of all indices in `indices` (any shape) against one codebook."""
    flat = indices.reshape(-1).long()
    flat = all_gather(flat[flat >= 0], process_group)
    _, counts = torch.unique(flat, return_counts=True)
    total = counts.sum().clamp(min=1).float()
    probs = counts.float() / total
    entropy = -(probs * probs.log()).sum()
    used = torch.tensor(counts.numel(), device=indices.device, dtype=torch.long)
    return CodeUsage(entropy.exp(), used.float() / codebook_size, used)


def stack_usage(usages: list[CodeUsage]) -> CodeUsage:
    """Per-stage usages (residual layers) -> one CodeUsage whose fields have a leading axis."""
    return CodeUsage(*(torch.stack(field) for field in zip(*usages)))
