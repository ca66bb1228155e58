"""VectorQuantize's code search: the nearest code (or a sampled one), the k nearest (`topk`, e.g.
for beam search), per-token codebooks made by `codebook_transform_fn` (implicit neural
codebooks, QINCo), or given codes (`chosen`), all as one result type, `Found`.

topk returns a k axis before the features: quantized (b, n, k, dim) (channel-first layouts put
it last), indices (b, n, k), and per-token losses (b, n, k): mean over features of
(code - input)^2 in the codebook space, zero where masked. topk calls never update the codebook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import as_integer
from ..kernels.nearest_code import nearest_codes, nearest_codes_per_token
from ..layout import from_tokens, indices_from_tokens
from .vq_fused import select_rows
from .vq_gradients import GradientRoute
from .vq_losses import LossBreakdown, VQLosses, topk_commitment, trainable_loss


class Found(NamedTuple):
    indices: Tensor  # (g, m[, k]) int64
    codes: Tensor  # (g, m[, k], d), differentiable in the codebook
    per_token: Tensor | None  # (g, m, c, d): the per-token codebooks searched, with codebook_transform_fn


def find_codes(search: Tensor, codebook: Tensor, metric: str, temperature: float = 0.0, kept: Tensor | None = None,
               topk: int | None = None, per_token: Tensor | None = None, chosen: Tensor | None = None) -> Found:
    """search (g, m, d) against codebook (g, c, d), or against per-token codebooks (g, m, c, d)
    (`per_token_codebooks`) -> Found. `temperature` > 0 samples codes; `chosen` (g, m): these
    codes, no search."""
    k = 1 if topk is None else topk
    if chosen is not None:
        indices = chosen.unsqueeze(-1)
    elif per_token is None:
        indices, _ = nearest_codes(search.detach(), codebook.detach(), metric, k, temperature, valid=kept, scores=False)
    else:
        indices, _ = nearest_codes_per_token(search.detach(), per_token.detach(), metric, k, temperature)
    d = search.shape[-1]
    if per_token is None and not codebook.requires_grad:
        codes = select_rows(codebook, indices)
    elif per_token is None:  # (gather's backward, as before, for a learnable codebook)
        flat = indices.flatten(1).unsqueeze(-1).expand(-1, -1, d)
        codes = codebook.gather(1, flat).reshape(*indices.shape, d)
    else:
        codes = per_token.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, d))
    if topk is None:
        indices, codes = indices[..., 0], codes[:, :, 0]
    return Found(indices, codes, per_token)


def per_token_codebooks(fn: Callable, codebook: Tensor, b: int, n: int, cosine: bool) -> Tensor:
    """fn(codebook (1, c, d)) -> (1, b, n, c, d) (or (b, n, c, d)) -> fp32 (1, b*n, c, d)."""
    out = fn(codebook)
    if not isinstance(out, Tensor):
        raise TypeError(f"codebook_transform_fn: expected it to return a tensor, got {type(out).__name__}")
    if out.ndim == 4:
        out = out.unsqueeze(0)
    expected = (1, b, n, *codebook.shape[1:])
    if tuple(out.shape) != expected:
        raise ValueError(f"codebook_transform_fn: expected it to return per-token codebooks of shape (h, b, n, c, d) = "
                         f"{expected}, got {tuple(out.shape)}")
    out = out.float().reshape(1, b * n, *codebook.shape[1:])
    return F.normalize(out, dim=-1) if cosine else out


def check_search_extras(topk, transform, *, heads: int, codebook_size: int, given_indices: bool, training: bool,
                        in_place: bool, cross_entropy: bool, diversity_weight: float) -> int | None:
    """The forward's topk (clamped to the codebook size, as the peer) or None; errors for the
    combinations that are not supported. `in_place`: an in-place codebook optimizer exists."""
    in_place = training and in_place
    if transform is not None:
        if not callable(transform):
            raise TypeError(f"codebook_transform_fn: expected a callable, got {type(transform).__name__}")
        unsupported = [name for name, given in (
            (f"heads={heads} (expected 1)", heads != 1), ("indices", given_indices),
            ("commitment_use_cross_entropy_loss=True", cross_entropy),
            # those losses need the distances to every per-token code
            (f"codebook_diversity_loss_weight={diversity_weight}", diversity_weight > 0),
            # the in-place step fits the base codebook, not the per-token codebooks searched
            ("in_place_codebook_optimizer in training", in_place)) if given]
        if unsupported:
            raise ValueError(f"codebook_transform_fn: not supported with {', '.join(unsupported)}")
    if topk is None:
        return None
    topk = as_integer("topk", topk)
    if topk < 1:
        raise ValueError(f"topk: expected a positive integer, got {topk!r}")
    if heads != 1:
        raise ValueError(f"topk: supported with heads=1 (as vector-quantize-pytorch), got heads={heads}")
    if given_indices:
        raise ValueError("topk, indices: give at most one of them")
    if training and cross_entropy:
        raise ValueError("topk: not supported in training with commitment_use_cross_entropy_loss=True")
    if in_place:  # topk never updates the codebook: the optimizer would never step (the peer asserts)
        raise ValueError("topk, in_place_codebook_optimizer: topk calls do not update the codebook; not supported "
                         "in training with in_place_codebook_optimizer (call in eval)")
    return min(topk, codebook_size)


def topk_layout(result, spatial: tuple, channel_first: bool, single: bool):
    """A topk result in token layout (out (b, n, k, dim) in the input's dtype, indices (b, n, k),
    per-position loss and breakdown) -> the peer's layout: the k axis after the positions (last
    for channel-first outputs)."""
    out, indices, loss, breakdown = result
    b, n, k, dim = out.shape
    out = from_tokens(out.movedim(2, 0).reshape(k * b, n, dim), spatial, channel_first)
    out = out.reshape(k, b, *out.shape[1:]).movedim(0, -1 if channel_first else -2)

    def positions(t):
        t = indices_from_tokens(t, spatial) if t.ndim > 0 else t
        return t[:, 0] if single and t.ndim > 0 else t

    out = out[:, 0] if single else out
    return out, positions(indices), positions(loss), breakdown._replace(commitment=positions(breakdown.commitment))


def per_position(t: Tensor, b: int, n: int) -> Tensor:
    """(1, b*n, ...) -> (b, n, ...); scalars as they are."""
    return t.reshape(b, n, *t.shape[2:]) if t.ndim > 0 else t


def masked_topk(quantized: Tensor, indices: Tensor, kept: Tensor | None) -> tuple[Tensor, Tensor]:
    """Masked positions: zeros and index -1 for every one of the k codes."""
    if kept is None:
        return quantized, indices
    return torch.where(kept[..., None, None], quantized, 0.0), indices.masked_fill(~kept.unsqueeze(-1), -1)


def topk_quantized(losses: VQLosses, route: GradientRoute | None, search: Tensor, codebook: Tensor, found: Found,
                   kept: Tensor | None, temperature: float, freeze: bool, codes_learn: bool, sync: bool, group,
                   b: int, n: int):
    """The k nearest codes' result: found (g, m, k) -> quantized (b, n, k, d), indices (b, n, k) (-1
    where masked), loss per position and code (b, n, k), LossBreakdown. `route`: a training
    forward's gradient route; None in eval, where the loss is the commitment alone (weighted
    when the layer weighs it)."""
    zero = search.new_zeros(())
    if route is not None:
        commitment, diversity, orthogonal = losses.terms(search, codebook, found.codes, found.indices, kept,
                                                         codes_learn, sync, group)
        commitment = commitment if losses.weighs_commitment else zero
        loss = losses.total(commitment, diversity, orthogonal)
        quantized = route(search, found.codes, codebook, temperature, freeze, found.per_token)
    else:
        commitment = topk_commitment(search, found.codes if codes_learn else found.codes.detach(), kept)
        diversity = orthogonal = zero
        loss = commitment * losses.commitment_weight if losses.weighs_commitment else commitment
        quantized = found.codes.detach()
    quantized, shown = masked_topk(quantized, found.indices, kept)
    loss = trainable_loss(loss, route is not None)
    breakdown = LossBreakdown(per_position(commitment, b, n), diversity, orthogonal, zero)
    return per_position(quantized, b, n), per_position(shown, b, n), per_position(loss, b, n), breakdown
