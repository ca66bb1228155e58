"""Small helpers the layer tests share for their independent references."""

from __future__ import annotations

import math
from collections import Counter

import torch

F64 = torch.float64


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def linear64(linear, x):
    """An nn.Linear applied in fp64 with its own weights."""
    out = x.to(F64) @ linear.weight.detach().to(F64).t()
    return out + linear.bias.detach().to(F64) if linear.bias is not None else out


def brute_force_usage(stage_indices, codebook_size):
    """(perplexity, fraction used, codes used) by counting, ignoring negative (dropped) indices."""
    values = [v for v in stage_indices.flatten().tolist() if v >= 0]
    counts = Counter(values)
    n = len(values)
    entropy = -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0
    return math.exp(entropy), len(counts) / codebook_size, len(counts)


def call_structure(result):
    """Tuple length, shapes and float/integer kind (indices are int64 here by design, int32 in the peer)."""
    assert isinstance(result, tuple)
    return [(tuple(t.shape), t.dtype if t.is_floating_point() else "integer") for t in result]
