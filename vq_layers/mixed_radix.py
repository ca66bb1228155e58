"""Mixed-radix indices: one int64 index for a digit per dimension.

FSQ, FSP and LatentQuantize pick, in each of d dimensions, one of L_i levels; the code's index
is sum_i digit_i * prod(L_0 .. L_{i-1}) (dimension 0 fastest, as vector-quantize-pytorch). The
levels and the basis are int64 buffers, not persistent (they follow from the constructor
arguments), so dtype casts never touch them and the arithmetic stays exact for any codebook
that fits int64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .checks import check_indices
from .non_finite import NO_CODE, fill_tokens


def register_mixed_radix(module: nn.Module, levels: Sequence[int]) -> int:
    """Registers the int64 buffers `_levels` and `_basis` (non-persistent) on `module` and
    returns the codebook size prod(levels); ValueError when it does not fit int64."""
    codebook_size = math.prod(levels)
    if codebook_size >= 2**63:
        raise ValueError(f"levels: codebook size prod(levels) must fit int64, got {list(levels)}")
    basis = [math.prod(levels[:i]) for i in range(len(levels))]
    module.register_buffer("_levels", torch.tensor(list(levels), dtype=torch.long), persistent=False)
    module.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)
    return codebook_size


def digits_to_indices(digits: Tensor, basis: Tensor) -> Tensor:
    """Digit per dimension (..., d) -> indices (...), int64."""
    return (digits.long() * basis).sum(dim=-1)


def indices_to_digits(indices: Tensor, basis: Tensor, levels: Tensor, codebook_size: int,
                      checked: bool = False) -> Tensor:
    """Indices (...) in [0, codebook_size), or -1 (no code: masked, dropped or non-finite input)
    -> digit per dimension (..., d), int64, every digit -1 for index -1; TypeError or ValueError
    (naming `indices`) for a non-integer tensor or a value out of range (unless `checked`)."""
    check_indices(indices, codebook_size, allow_dropped=True, values=not checked)
    indices = indices.long().unsqueeze(-1)
    return fill_tokens(indices.clamp(min=0) // basis % levels, indices[..., 0] == NO_CODE, NO_CODE)
