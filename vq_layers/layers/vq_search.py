"""VectorQuantize's search extras, after vector-quantize-pytorch: the k nearest codes (`topk`,
e.g. for beam search) and per-token codebooks made by `codebook_transform_fn` (implicit neural
codebooks, QINCo).

topk returns a k axis before the features: quantized (b, n, k, dim) (channel-first layouts put
it last), indices (b, n, k), and per-token losses (b, n, k): mean over features of
(code - input)^2 in the codebook space, zero where masked. topk calls never update the codebook.

`SearchExtras` is a mixin of VectorQuantize: its methods read the layer's configuration and
reuse its loss and gradient helpers (_route_gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import as_integer
from ..codebook_losses import diversity_loss, orthogonal_loss
from ..kernels.code_softmax import code_logits
from ..kernels.nearest_code import nearest_codes, nearest_codes_per_token
from ..layout import from_tokens, indices_from_tokens
from ..precision import project


class SearchExtras:
    """topk and codebook_transform_fn for VectorQuantize (see the module docstring)."""

    def _check_search_extras(self, topk, codebook_transform_fn, has_targets: bool) -> int | None:
        """The forward's topk (clamped to the codebook size, as the peer) or None; errors for the
        combinations that are not supported."""
        in_place = self.training and self.in_place_codebook_optimizer is not None
        if codebook_transform_fn is not None:
            if not callable(codebook_transform_fn):
                raise TypeError(f"codebook_transform_fn: expected a callable, got {type(codebook_transform_fn).__name__}")
            unsupported = [name for name, given in (
                (f"heads={self.heads} (expected 1)", self.heads != 1), ("indices", has_targets),
                ("commitment_use_cross_entropy_loss=True", self.commitment_use_cross_entropy_loss),
                (f"codebook_diversity_loss_weight={self.codebook_diversity_loss_weight}",
                 self.codebook_diversity_loss_weight > 0),  # those losses need the distances to every per-token code
                # the in-place step fits the base codebook, not the per-token codebooks searched
                ("in_place_codebook_optimizer in training", in_place)) if given]
            if unsupported:
                raise ValueError(f"codebook_transform_fn: not supported with {', '.join(unsupported)}")
        if topk is None:
            return None
        topk = as_integer("topk", topk)
        if topk < 1:
            raise ValueError(f"topk: expected a positive integer, got {topk!r}")
        if self.heads != 1:
            raise ValueError(f"topk: supported with heads=1 (as vector-quantize-pytorch), got heads={self.heads}")
        if has_targets:
            raise ValueError("topk, indices: give at most one of them")
        if self.training and self.commitment_use_cross_entropy_loss:
            raise ValueError("topk: not supported in training with commitment_use_cross_entropy_loss=True")
        if in_place:  # topk never updates the codebook: the optimizer would never step (the peer asserts)
            raise ValueError("topk, in_place_codebook_optimizer: topk calls do not update the codebook; not supported "
                             "in training with in_place_codebook_optimizer (call in eval)")
        return min(topk, self.codebook_size)

    def _topk_quantized(self, search: Tensor, codebook: Tensor, codes: Tensor, indices: Tensor, kept: Tensor | None,
                        freeze: bool, sync: bool, temperature: float, b: int, n: int, per_token: Tensor | None):
        """search (1, m, d), codes (1, m, k, d), indices (1, m, k) -> quantized (b, n, k, d) fp32,
        indices (b, n, k) (-1 where masked), loss, (commitment, diversity, orthogonal)."""
        k = indices.shape[-1]
        zero = search.new_zeros(())
        diversity = orthogonal = zero
        target = codes if self.learnable_codebook and not freeze else codes.detach()
        commitment = (target - search.unsqueeze(2)).square().mean(-1)  # (1, m, k)
        if kept is not None:
            commitment = torch.where(kept.unsqueeze(-1), commitment, 0.0)
        weighted = self.commitment_weight > 0 and not self.directional_reparam
        if self.training:
            if self.codebook_diversity_loss_weight > 0:
                diversity = diversity_loss(search, codebook, self.metric, self.codebook_diversity_temperature, kept,
                                           sync, self.process_group)
            if self.orthogonal_reg_weight > 0:  # all k codes are active
                kept_k = None if kept is None else kept.repeat_interleave(k, dim=1)
                orthogonal = orthogonal_loss(codebook, indices.flatten(1), kept_k, self.orthogonal_reg_active_codes_only,
                                             self.orthogonal_reg_max_codes)
            commitment = commitment if weighted else zero
            loss = (commitment * self.commitment_weight + diversity * self.codebook_diversity_loss_weight
                    + orthogonal * self.orthogonal_reg_weight)
            quantized = self._route_gradients(search, codes, codebook, temperature, freeze, per_token)
        else:
            loss = commitment * self.commitment_weight if weighted else commitment
            quantized = codes.detach()
        loss = trainable_loss(loss, self.training)
        shown = indices
        if kept is not None:
            quantized = torch.where(kept[..., None, None], quantized, 0.0)
            shown = indices.masked_fill(~kept.unsqueeze(-1), -1)

        def per_position(t):
            return t.reshape(b, n, *t.shape[2:]) if t.ndim > 0 else t

        return (per_position(quantized), per_position(shown), per_position(loss),
                (per_position(commitment), diversity, orthogonal))

    def _topk_output(self, result, tokens: Tensor, keep: Tensor | None, spatial, channel_first: bool, only_one: bool,
                     dtype: torch.dtype, return_loss_breakdown: bool):
        """The layer's return tuple for topk, in the peer's layout (the k axis after the positions)."""
        out = project(self.project_out, result.quantized)  # (b, n, k, dim)
        if keep is not None:
            masked = torch.zeros_like(out) if self.return_zeros_for_masked_padding else \
                tokens.to(out.dtype).unsqueeze(2).expand_as(out)
            out = torch.where(keep[..., None, None], out, masked)
        b, n, k, dim = out.shape
        out = from_tokens(out.to(dtype).movedim(2, 0).reshape(k * b, n, dim), spatial, channel_first)
        out = out.reshape(k, b, *out.shape[1:]).movedim(0, -1 if channel_first else -2)

        def layout(t):
            t = indices_from_tokens(t, spatial) if t.ndim > 0 else t
            return t[:, 0] if only_one and t.ndim > 0 else t

        if only_one:
            out = out[:, 0]
        loss = layout(result.loss)
        breakdown = result.breakdown._replace(commitment=layout(result.breakdown.commitment))
        indices = layout(result.indices)
        return (out, indices, loss, breakdown) if return_loss_breakdown else (out, indices, loss)


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


def per_token_soft_codes(search: Tensor, per_token: Tensor, metric: str, scale: float) -> Tensor:
    """softmax(logits) @ each token's own codebook, the logits as code_logits': search (g, m, d),
    per_token (g, m, c, d) -> (g, m, d). The per-token codebooks are already m x c x d: the
    logits (g, m, c) add less than they hold."""
    rows = search.reshape(-1, 1, search.shape[-1])  # each token against its own codebook
    logits = code_logits(rows, per_token.reshape(-1, *per_token.shape[2:]), metric, scale)  # (g*m, 1, c)
    soft = torch.einsum("rc,rcd->rd", logits[:, 0].softmax(-1), per_token.reshape(-1, *per_token.shape[2:]))
    return soft.reshape(search.shape)


def find_codes(search: Tensor, codebook: Tensor, per_token: Tensor | None, metric: str, temperature: float,
               kept: Tensor | None, topk: int | None, chosen: Tensor | None) -> tuple[Tensor, Tensor]:
    """search (g, m, d) against codebook (g, c, d) or per-token codebooks (g, m, c, d) ->
    indices (g, m[, k]) int64 and their codes (g, m[, k], d), differentiable in the codebooks.
    `chosen` (g, m): these codes, no search."""
    k = 1 if topk is None else topk
    if chosen is not None:
        indices = chosen.unsqueeze(-1)
    elif per_token is None:
        indices, _ = nearest_codes(search.detach(), codebook.detach(), metric, k, temperature, valid=kept)
    else:
        indices, _ = nearest_codes_per_token(search.detach(), per_token.detach(), metric, k, temperature)
    d = search.shape[-1]
    if per_token is None:
        flat = indices.flatten(1).unsqueeze(-1).expand(-1, -1, d)
        codes = codebook.gather(1, flat).reshape(*indices.shape, d)
    else:
        codes = per_token.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, d))
    return (indices[..., 0], codes[:, :, 0]) if topk is None else (indices, codes)


def trainable_loss(loss: Tensor, training: bool) -> Tensor:
    """A training loss that backward() accepts even when no term depends on a parameter (DiVeQ
    has no commitment loss; commitment_weight=0), as the peer's."""
    if training and torch.is_grad_enabled() and not loss.requires_grad and not torch.compiler.is_compiling():
        return loss.detach().requires_grad_()  # (torch.compile refuses a requires_grad_() output)
    return loss
