"""Argument checks shared by the layers: clear errors naming the argument, at the boundary."""

from __future__ import annotations

import numbers
import operator

import torch
from torch import Tensor

# the largest implicit codebook a layer builds on request (codes x dims fp32): 256 MiB
MAX_MATERIALIZED_ELEMENTS = 2**26


def check_codebook_axis(indices: Tensor, keep_num_codebooks_dim: bool, num_codebooks: int) -> None:
    if keep_num_codebooks_dim and (indices.ndim == 0 or indices.shape[-1] != num_codebooks):
        raise ValueError(f"indices: expected a last axis of num_codebooks={num_codebooks}, "
                         f"got shape {tuple(indices.shape)}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def check_non_negative(name: str, value) -> float:
    """A real number >= 0 (weights, temperatures, fractions); NaN, bools and non-numbers fail."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
    return float(value)

def as_integer(name: str, value) -> int:
    """An integral value (int, numpy integer, 0-dim integer tensor: what the peer's int() takes
    without rounding) as an int, else ValueError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def check_indices(indices, codebook_size: int, name: str = "indices", allow_dropped: bool = False,
                  values: bool = True) -> None:
    """An integer tensor with every value in [0, codebook_size), or -1 (masked or dropped) when
    `allow_dropped`. The values are read back (one host sync), unless compiling or not `values`
    (a caller that checked them already)."""
    if (not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex()
            or indices.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    if values:
        check_index_ranges([(indices, codebook_size, name)], allow_dropped)


def check_stage_indices(indices, sizes: list[int], allow_dropped: bool = True) -> None:
    """Indices (..., q') of a residual layer's first q' <= len(sizes) stages: an integer tensor,
    column k in [0, sizes[k]) (or -1 when `allow_dropped`), named `indices[..., k]`; one read."""
    check_indices(indices, max(sizes), allow_dropped=allow_dropped, values=False)
    if indices.ndim:
        check_index_ranges([(indices[..., k], size, f"indices[..., {k}]")
                            for k, size in enumerate(sizes[: indices.shape[-1]])], allow_dropped)


def check_index_ranges(parts: list, allow_dropped: bool = True) -> None:
    """(indices, codebook_size, name) triples of integer tensors (typed already: check_indices)
    -> ValueError naming the first whose values leave [0, codebook_size) (or -1 when
    `allow_dropped`). One read back for all of them (a decoder's stages, levels or groups: one
    host sync per call); none when compiling."""
    parts = [part for part in parts if part[0].numel()]
    if not parts or torch.compiler.is_compiling():
        return
    ranges = torch.stack([torch.stack(torch.aminmax(indices)).to(parts[0][0].device) for indices, _, _ in parts])
    lowest = -1 if allow_dropped else 0
    for (low, high), (_, codebook_size, name) in zip(ranges.tolist(), parts):
        if low < lowest or high >= codebook_size:
            dropped = " (or -1 for masked or dropped)" if allow_dropped else ""
            raise ValueError(f"{name}: expected values in [0, {codebook_size}){dropped}, got values in [{low}, {high}]")
