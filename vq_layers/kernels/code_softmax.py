"""Softmax over codes without the N x K matrix: the losses and the Gumbel straight-through
estimator that need a distribution over all codes for every vector.

The logit of code c for vector x is -||x - c|| (Euclidean, as vector-quantize-pytorch) or
x . c ("dot", cosine codebooks), times `scale`. Rows go in tiles of at most TILE_ELEMENTS
logits; each tile runs under activation checkpointing, so its (rows, K) block is recomputed
in the backward pass instead of being kept: memory O(N·d + K·d) plus one tile, as flash
attention does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..precision import fp32_island
from . import nearest_code as search


def code_logits(x: Tensor, codebook: Tensor, metric: str, scale: float) -> Tensor:
    """x (h, n, d), codebook (h, k, d) -> (h, n, k) fp32 logits."""
    with search._ieee_fp32_matmul(x.device):  # inside: the backward's recomputation needs it too
        dots = torch.einsum("hnd,hkd->hnk", x, codebook)
    if metric == "dot":
        return dots * scale
    squared = x.square().sum(-1, keepdim=True) + codebook.square().sum(-1).unsqueeze(1) - 2 * dots
    return squared.clamp(min=1e-8).sqrt() * -scale


def _tiles(x: Tensor, k: int):
    h, n, _ = x.shape
    rows = max(1, search.TILE_ELEMENTS // max(1, h * k))
    return [slice(r, r + rows) for r in range(0, n, rows)]


def _run_tile(fn, *args):
    # checkpointing only pays (and only works) when something needs a gradient
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


@fp32_island
def code_probs_sum(x: Tensor, codebook: Tensor, metric: str, scale: float, weight: Tensor | None = None) -> Tensor:
    """x (h, n, d), codebook (h, k, d), weight (h, n) or None -> sum over rows of weight * softmax, (h, k)."""
    def tile_sum(xt, cb, wt):
        probs = code_logits(xt, cb, metric, scale).softmax(dim=-1)
        return (probs * wt.unsqueeze(-1)).sum(1)

    weight = x.new_ones(x.shape[:2]) if weight is None else weight.to(torch.float32)
    total = x.new_zeros((x.shape[0], codebook.shape[1]))
    for rows in _tiles(x, codebook.shape[1]):
        total = total + _run_tile(tile_sum, x[:, rows], codebook, weight[:, rows])
    return total


@fp32_island
def code_cross_entropy(x: Tensor, codebook: Tensor, targets: Tensor, metric: str, scale: float = 1.0) -> Tensor:
    """Mean over targets >= 0 of -log softmax(logits)[target]; x (h, n, d), targets (h, n) int64.

    0 when no target is valid.
    """
    def tile_sum(xt, cb, tt):
        log_probs = code_logits(xt, cb, metric, scale).log_softmax(dim=-1)
        valid = tt >= 0
        picked = log_probs.gather(-1, tt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return -(picked * valid).sum()

    total = x.new_zeros(())
    for rows in _tiles(x, codebook.shape[1]):
        total = total + _run_tile(tile_sum, x[:, rows], codebook, targets[:, rows])
    return total / (targets >= 0).sum().clamp(min=1)


@fp32_island
def soft_codes(x: Tensor, codebook: Tensor, metric: str, scale: float) -> Tensor:
    """softmax(logits) @ codebook: the expected code of each row, (h, n, d)."""
    def tile_codes(xt, cb):
        probs = code_logits(xt, cb, metric, scale).softmax(dim=-1)
        with search._ieee_fp32_matmul(xt.device):
            return torch.einsum("hnk,hkd->hnd", probs, cb)

    parts = [_run_tile(tile_codes, x[:, rows], codebook) for rows in _tiles(x, codebook.shape[1])]
    return torch.cat(parts, dim=1) if parts else torch.zeros_like(x)


def entropy(probs: Tensor) -> Tensor:
    """-sum p log p over the last axis; 0 log 0 = 0, with a finite gradient where p underflowed to 0
    (log of the smallest normal there, not log 0 = -inf times 0)."""
    return -torch.special.xlogy(probs, probs.clamp(min=torch.finfo(probs.dtype).tiny)).sum(-1)

