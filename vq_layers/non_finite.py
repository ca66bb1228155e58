"""Non-finite input never becomes a code.

A token whose input vector holds a NaN or an infinity (judged on the layer's own input, before
any projection: after project_in a NaN spreads over the whole vector anyway) gets the index -1,
the marker masked and dropped positions already carry and that decoding turns into zeros; its
quantized output is NaN; every loss the layer computes over the batch is NaN. The other tokens
are quantized exactly as they would be without it. A layer whose training step would write the
batch into codebook statistics raises instead (`distributed.check_finite`), before any buffer
changes; these helpers serve every other path.

Everything here is elementwise on static shapes (no host sync, no boolean-mask indexing), so
`torch.compile(fullgraph=True)` traces it.
"""

from __future__ import annotations

import torch
from torch import Tensor

NO_CODE = -1  # the index of a token without a code: masked, dropped, or non-finite input


def non_finite_tokens(x: Tensor, keep: Tensor | None = None, dim: int = -1) -> Tensor:
    """x with features on axis `dim` -> bool over the other axes, True where any feature is NaN
    or +-inf. Masked tokens (`keep` False, same shape as the result) are never counted: their
    padding does not enter the computation."""
    bad = not_all_finite(x, dim)
    return bad if keep is None else bad & keep


def not_all_finite(x: Tensor, dim: int = -1) -> Tensor:
    """True where x holds a NaN or +-inf along `dim`: its largest value is not below +inf or its
    smallest not above -inf (amax and amin propagate NaN). Two reductions that only read x,
    where ~isfinite(x).all(dim) writes and reads boolean tensors of x's size."""
    if x.numel() == 0:  # (nothing to reduce over)
        return ~torch.isfinite(x).all(dim)
    return ~((x.amax(dim) < float("inf")) & (x.amin(dim) > float("-inf")))


def fill_tokens(t: Tensor, where: Tensor, value) -> Tensor:
    """`value` at the tokens where `where` is True; t's leading axes are where's (broadcast
    allowed), its further axes (features, codebooks, k) follow. (torch.where writes the result
    in one pass; masked_fill copies t, then fills.)"""
    return torch.where(where.reshape(where.shape + (1,) * (t.ndim - where.ndim)), value, t)


def mark_non_finite(t: Tensor, bad: Tensor | None) -> Tensor:
    """A per-token result -> NaN (floating: outputs, per-token losses) or -1 (indices) at the
    tokens `bad` marks (`fill_tokens`'s layout). None: a step that checked its input (it raises
    on a non-finite one) has nothing to mark."""
    if bad is None:
        return t
    return fill_tokens(t, bad, float("nan") if t.is_floating_point() else NO_CODE)


def mark_losses(loss: Tensor, bad: Tensor | None) -> Tensor:
    """A loss over the batch (a scalar, or one per quantizer) -> NaN when any token is bad.

    Multiplied, not filled: the NaN reaches the gradients too, so an optimizer step on it (or a
    GradScaler deciding whether to take one) sees it."""
    if bad is None:
        return loss
    return loss * nan_if_any(bad).to(loss.dtype)


def nan_if_any(bad: Tensor) -> Tensor:
    """An fp32 scalar: 1, or NaN when any token is bad (`mark_losses`' factor, computed once for
    several losses)."""
    return torch.ones((), device=bad.device).masked_fill(bad.any(), float("nan"))


def without_codes(result, bad: Tensor):
    """A VectorQuantize core result (its `Quantized`, in token layout) with the rule applied at
    bad (b, n): NaN codes and index -1 there; losses NaN (per position with topk: there)."""
    def losses(t):
        return mark_non_finite(t, bad) if t.ndim else mark_losses(t, bad)

    return result._replace(quantized=mark_non_finite(result.quantized, bad),
                           indices=mark_non_finite(result.indices, bad), loss=losses(result.loss),
                           breakdown=type(result.breakdown)(*(losses(t) for t in result.breakdown)))
