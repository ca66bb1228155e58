"""Argument checks shared by the layers: clear errors naming the argument, at the boundary."""

from __future__ import annotations

import numbers

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


def check_indices(indices: Tensor, codebook_size: int, name: str = "indices") -> None:
    """Integer dtype and every value in [0, codebook_size) (one host sync; skipped when compiling)."""
    if indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"{name}: expected an integer tensor, got dtype {indices.dtype}")
    if indices.numel() and not torch.compiler.is_compiling():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= codebook_size:
            raise ValueError(f"{name}: expected values in [0, {codebook_size}), got values in [{low}, {high}]")
