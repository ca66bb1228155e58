"""Moving between user layouts and the (b, n, d) token layout every layer computes in.

Reshapes only: einops' `pack` concatenates, and `torch.cat` of a bf16 tensor under fp16
autocast (or the reverse) raises inside autocast's type promotion.
"""

from __future__ import annotations

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
