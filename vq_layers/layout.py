"""Moving between user layouts and the (b, n, d) token layout every layer computes in.

Reshapes only: einops' `pack` concatenates, and `torch.cat` of a bf16 tensor under fp16
autocast (or the reverse) raises inside autocast's type promotion.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def to_tokens(x: Tensor, channel_first: bool, dim: int, layer: str) -> tuple[Tensor, tuple[int, ...]]:
    """(b, ..., d) or channel-first (b, d, ...) -> tokens (b, n, d) and the spatial shape (...).

    Checks the input on the way: floating point, batch and feature axes, d == `dim`.
    """
    if not x.is_floating_point():
        raise TypeError(f"input: expected a floating point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"input: expected at least 2 dims (batch and features), got shape {tuple(x.shape)}")
    if x.shape[1 if channel_first else -1] != dim:
        raise ValueError(f"{layer}: expected input feature dim {dim} on axis {1 if channel_first else -1}, "
                         f"got {x.shape[1 if channel_first else -1]} (input shape {tuple(x.shape)})")
    if channel_first:
        x = rearrange(x, "b d ... -> b ... d")
    return rearrange(x, "b ... d -> b (...) d"), tuple(x.shape[1:-1])


def from_tokens(tokens: Tensor, spatial: tuple[int, ...], channel_first: bool) -> Tensor:
    """Inverse of `to_tokens` for features: (b, n, d) -> (b, ..., d) or (b, d, ...)."""
    x = indices_from_tokens(tokens, spatial)
    return rearrange(x, "b ... d -> b d ...") if channel_first else x


def indices_from_tokens(indices: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """Token-layout (b, n, c) -> (b, <spatial...>, c): the trailing axis stays last."""
    return indices.reshape(indices.shape[0], *spatial, indices.shape[-1])


def check_mask(mask, tokens: Tensor, spatial: tuple[int, ...], per_sample: bool = False) -> Tensor | None:
    """mask (b, n) or (b, *spatial) bool, True = keep -> (b, n), or a clear error.

    With `per_sample`, also (b,): keep or drop whole samples, expanded to every token of the
    sample. For single-token inputs (b, d) that shape is (b, *spatial) as well, and both readings
    give the same (b, 1).
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a bool tensor, got {type(mask).__name__}")
    b, n = tokens.shape[:2]
    shapes = [(b,)] if per_sample else []
    shapes += [s for s in ((b, *spatial), (b, n)) if s not in shapes]
    if mask.dtype != torch.bool or tuple(mask.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        kinds = " (per sample, or per token)" if per_sample else ""
        raise ValueError(f"mask: expected a bool tensor of shape {expected}{kinds}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if mask.ndim == 1:
        return mask.reshape(b, 1).expand(b, n)
    return mask.reshape(b, n)


def lens_to_mask(lens, tokens: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """lens (b,) integer lengths of sequences (b, n, d) -> mask (b, n), True for the first lens[i]."""
    if not isinstance(lens, Tensor) or lens.is_floating_point() or lens.dtype == torch.bool:
        raise TypeError(f"lens: expected an integer tensor, got {getattr(lens, 'dtype', type(lens).__name__)}")
    if len(spatial) != 1 or tuple(lens.shape) != (tokens.shape[0],):
        raise ValueError(f"lens: expected shape ({tokens.shape[0]},) for a batch of sequences, got lens of shape "
                         f"{tuple(lens.shape)} for an input with spatial shape {spatial}")
    return torch.arange(tokens.shape[1], device=tokens.device) < lens.to(tokens.device)[:, None]


def without_padding(tokens: Tensor, keep: Tensor | None) -> Tensor:
    """tokens (b, n, d) with masked rows zeroed, before any projection: a NaN in padding would
    otherwise reach the projection's weight gradient (0 * NaN)."""
    return tokens if keep is None else torch.where(keep.unsqueeze(-1), tokens, 0.0)
