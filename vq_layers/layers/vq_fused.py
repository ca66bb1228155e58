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

import torch
from torch import Tensor

from ..precision import fp32_island
from ..rotation_trick import EPS


def _gather_codes(codebook: Tensor, indices: Tensor) -> Tensor:
    """codebook (g, c, d), indices (g, m) -> codes (g, m, d)."""
    return codebook.gather(1, indices.unsqueeze(-1).expand(-1, -1, codebook.shape[-1]))


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
def _input_gradient(search, codebook, indices, kept, rotate, grad_codes, grad_error):
    codes = _gather_codes(codebook, indices)
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


def routed_codes(search: Tensor, codes: Tensor, codebook: Tensor, indices: Tensor, kept: Tensor | None,
                 rotate: bool) -> tuple[Tensor, Tensor]:
    """search (g, m, d) fp32, codes (g, m, d) gathered from codebook (g, c, d) at indices (g, m),
    kept (g, m) or None -> (the codes in value, gradient to `search` by the rotation trick (or
    straight-through); the sum of the kept rows' squared errors, gradient to `search` only)."""
    return _RoutedCodes.apply(search, codes.detach(), codebook.detach(), indices, kept, rotate)
