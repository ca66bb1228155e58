"""A training step's output and commitment error in one autograd Function, for the usual
estimators (the rotation trick, straight-through) with a commitment loss that does not train
the codes: it saves the searched vectors, the chosen indices and the codebook as searched
(a K x d snapshot), and recomputes the codes by gather and the rotation's factors in the
backward. The unfused route (vq_gradients.py, vq_losses.py) keeps four N x d tensors per step
for its backward (the rotation trick's u, q^ and w, the commitment loss's difference); this
keeps none beyond its input.

Value: the codes exactly (the same tensor the search gathered) and the same sum of squared
errors as vq_losses' masked_mse. Gradient to the searched vectors x, per row, with g the
output's gradient and e the squared error sum's:

    straight-through:  g + 2 e (x - q)
    rotation trick:    lambda R^T g + 2 e (x - q),  R = I - 2 w w^T + 2 q^ u^T

with u = x / ||x||, q^ = q / ||q||, w = (u + q^) / ||u + q^||, lambda = ||q|| / ||x|| (the norms
clamped at rotation_trick.EPS), as rotation_trick.py. lambda R^T g is expanded into per-row
scalars: lambda g + a x + b q, with s = u + q^,
    a = lambda (2 (q^ . g) - 2 (s . g) / ||s||^2) / ||x||,  b = -2 lambda (s . g) / (||s||^2 ||q||),
so the backward reads x, q and g a few times and writes one N x d gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..precision import fp32_island
from ..rotation_trick import EPS


def select_rows(codebook: Tensor, indices: Tensor) -> Tensor:
    """codebook (g, c, d), indices (g, ...) -> its rows (g, ..., d): the values gather gives, by
    index_select over whole rows (several times faster than gather's per-element index)."""
    g, c, d = codebook.shape
    offsets = torch.arange(g, device=indices.device).reshape(g, *([1] * (indices.ndim - 1))) * c
    flat = (indices + offsets).reshape(-1) if g > 1 else indices.reshape(-1)
    return codebook.reshape(g * c, d).index_select(0, flat).reshape(*indices.shape, d)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """(g, m, d) . (g, m, d) -> (g, m, 1), one pass (no elementwise product tensor)."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)


def squared_error_sum(search: Tensor, codes: Tensor, kept: Tensor | None) -> Tensor:
    """The numerator of vq_losses' masked_mse, computed as it does (bit for bit)."""
    error = (search - codes).square_()  # (square_ rounds as square does: x * x)
    if kept is not None:
        error = error.masked_fill_(~kept.unsqueeze(-1), 0.0)
    return error.sum()


def rotation_vjp(x: Tensor, q: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The rotation trick's input gradient lambda R^T g as (lambda, a, b) (g, m, 1) with
    lambda R^T g = lambda g + a x + b q."""
    xx, qq, xq = _row_dot(x, x), _row_dot(q, q), _row_dot(x, q)
    xg, qg = _row_dot(x, g), _row_dot(q, g)
    x_norm, q_norm = xx.sqrt().clamp(min=EPS), qq.sqrt().clamp(min=EPS)
    # s = u + q^: ||s||^2 and s . g from the row products
    s_sq = xx / x_norm.square() + 2 * xq / (x_norm * q_norm) + qq / q_norm.square()
    s_norm_sq = s_sq.clamp(min=0).sqrt().clamp(min=EPS).square()
    s_g = xg / x_norm + qg / q_norm
    scale = q_norm / x_norm
    s_term = 2 * s_g / s_norm_sq
    a = scale * (2 * qg / q_norm - s_term) / x_norm
    b = -scale * s_term / q_norm
    return scale, a, b


class _RoutedCodes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, search, codes, codebook, indices, kept, rotate):
        ctx.rotate = rotate
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(search, codebook, indices, *(() if kept is None else (kept,)))
        return codes, squared_error_sum(search, codes, kept)

    @staticmethod
    def backward(ctx, grad_codes, grad_error):
        search, codebook, indices, *kept = ctx.saved_tensors
        grad = _input_gradient(search, codebook, indices, kept[0] if kept else None, ctx.rotate, grad_codes,
                               grad_error)
        return grad, None, None, None, None, None


@fp32_island  # a compiled backward is traced under the forward's autocast: its matmuls stay fp32
def _input_gradient(search, codebook, indices, kept, rotate, grad_codes, grad_error, codes=None):
    codes = select_rows(codebook, indices) if codes is None else codes
    grad = grad_codes
    if grad_codes is not None and rotate:
        scale, a, b = rotation_vjp(search, codes, grad_codes)
        grad = (grad_codes * scale).addcmul_(search, a).addcmul_(codes, b)
    if grad_error is not None:  # 2 e (x - q), as autograd forms it for masked_mse; masked rows left out
        commitment = (search - codes).mul_(2 * grad_error)
        if kept is not None:
            commitment = commitment.masked_fill_(~kept.unsqueeze(-1), 0.0)
        grad = commitment if grad is None else commitment.add_(grad)  # (a + b rounds as b + a)
    return grad


class _RoutedChain(torch.autograd.Function):
    """A residual chain's output and its stages' squared errors, differentiable in its input z:
    forward takes the values the stages computed (on z detached) and saves only the stages'
    codebooks, indices and masks; backward recomputes each stage's residual from z (the same
    subtractions, bit for bit) and adds up what each stage's _RoutedCodes would give."""

    @staticmethod
    def forward(ctx, z, value, errors, rotate, *stages):
        ctx.rotate, ctx.count = rotate, len(rotate)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, *stages)
        return value.view_as(value), errors.view_as(errors)

    @staticmethod
    def backward(ctx, grad_value, grad_errors):
        z, *stages = ctx.saved_tensors
        return (_chain_gradient(z, stages, ctx.rotate, grad_value, grad_errors), None, None, None,
                *([None] * len(stages)))


@fp32_island
def _chain_gradient(z, stages, rotate, grad_value, grad_errors):
    """z (b, n, d); stages: (codebook (1, c, d), indices (1, m), kept (1, m) bool or None) per stage run."""
    d = z.shape[-1]
    residual, grad = z.reshape(1, -1, d), None
    g = None if grad_value is None else grad_value.reshape(1, -1, d)
    for j in range(len(rotate)):
        codebook, indices, kept = stages[3 * j : 3 * j + 3]

        def masked(t, kept=kept):  # the stage's masked rows (padding, or a dropped stage when compiled): zeros
            return t if kept is None else torch.where(kept.unsqueeze(-1), t, 0.0)

        search = masked(residual)  # as _per_codebook_vectors zeroes padding
        codes = select_rows(codebook, indices)
        part = _input_gradient(search, codebook, indices, kept, rotate[j], None if g is None else masked(g),
                               None if grad_errors is None else grad_errors[j], codes)
        if part is not None:
            part = masked(part)
            if grad is None:  # accumulated in place below: never in the incoming gradient itself
                grad = part.clone() if part is g else part
            else:
                grad = grad.add_(part)
        if j + 1 < len(rotate):  # the next residual, as run_stages forms it
            residual = residual - masked(codes)
    return None if grad is None else grad.reshape(z.shape)


class ChainStage(NamedTuple):
    """What `routed_chain` needs of one stage run (its Quantized, on the residual)."""
    codebook: Tensor  # (1, c, d) as searched
    indices: Tensor  # (1, m)
    kept: Tensor | None  # (1, m) bool
    rotate: bool  # the rotation trick (else straight-through)
    squared_error: Tensor  # the commitment's numerator
    count: Tensor  # its element count (masked_mse's)


def routed_chain(z: Tensor, value: Tensor, stages: list[ChainStage]) -> tuple[Tensor, Tensor]:
    """A residual chain whose stages quantized z detached (their `quantize` on the residuals)
    -> (value, errors (j,)) differentiable in z, as if each stage had routed its own gradients
    (`routed_codes`): z (b, n, d) fp32, value (b, n, d) the stages' sum, the j stages run in
    order; errors are their squared error sums. No stage's residual is kept for the backward."""
    errors = torch.stack([stage.squared_error for stage in stages])
    rotate = tuple(stage.rotate for stage in stages)
    flat = [t for stage in stages for t in (stage.codebook.detach(), stage.indices, stage.kept)]  # kept may be None
    return _RoutedChain.apply(z, value.detach(), errors.detach(), rotate, *flat)


def routed_codes(search: Tensor, codes: Tensor, codebook: Tensor, indices: Tensor, kept: Tensor | None,
                 rotate: bool) -> tuple[Tensor, Tensor]:
    """search (g, m, d) fp32, codes (g, m, d) gathered from codebook (g, c, d) at indices (g, m),
    kept (g, m) or None -> (the codes in value, gradient to `search` by the rotation trick (or
    straight-through); the sum of the kept rows' squared errors, gradient to `search` only)."""
    return _RoutedCodes.apply(search, codes.detach(), codebook.detach(), indices, kept, rotate)
