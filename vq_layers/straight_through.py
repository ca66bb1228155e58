"""Straight-through estimator whose forward value is exact.

The usual `z + (q - z).detach()` returns `z + (q - z)`, which in floating point is not always
`q` (outputs would then differ in the last bit from codes looked up by index), and is NaN where
z is infinite. Here the value is `q` itself and the gradient is that of `z`.
"""

import torch
from torch import Tensor

from .compiling import snapshot


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, surrogate):
        ctx.surrogate_dtype = surrogate.dtype
        # a fresh copy; compiled, an opaque one: inductor elided the clone, returned the codes it
        # also saved for the backward, and the backward reused that buffer in place, overwriting
        # the output the user holds (torch 2.13, with a graph break in the step)
        return snapshot(value)

    @staticmethod
    def backward(ctx, grad):
        return None, grad.to(ctx.surrogate_dtype)


def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """Forward: `value` exactly. Backward: the gradient flows into `surrogate` as if identity."""
    return _StraightThrough.apply(value.detach(), surrogate)
