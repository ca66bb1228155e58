"""Vector quantization (VQ-VAE, arXiv 1711.00937) with EMA codebooks, k-means init and dead-code
replacement, a drop-in for vector-quantize-pytorch's VectorQuantize.

The code search never forms the N x K distance matrix (kernels/nearest_code.py), codes are
gathered (no one-hot matmul), statistics are index_add'ed in fp32 (ema.py), and the losses that
need a softmax over all codes run in recomputed tiles (kernels/code_softmax.py).
"""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_indices, check_non_negative, check_positive_int
from ..codebook import Codebook
from ..compiling import snapshot
from ..codebook_losses import diversity_loss, orthogonal_loss
from ..directional_reparam import check_directional_reparam, directional_reparam
from ..distributed import NON_FINITE_INPUT, check_finite, is_distributed
from ..kernels.code_softmax import code_cross_entropy, soft_codes
from ..in_place_step import check_in_place_optimizer
from ..layout import (
    check_mask,
    from_tokens,
    indices_from_tokens,
    lens_to_mask,
    to_tokens,
    without_padding,
)
from ..non_finite import non_finite_tokens, without_codes
from ..precision import fp32_island, project
from ..rotation_trick import rotation_trick
from ..straight_through import straight_through
from ..usage import CodeUsage, code_usage
from .vq_search import (
    SearchExtras,
    find_codes,
    per_token_codebooks,
    per_token_soft_codes,
    trainable_loss,
)
from .vq_updates import CodebookUpdates, masked_mse

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])


class CodebookHealth(NamedTuple):
    perplexity: Tensor  # exp(entropy) of the batch's code distribution, fp32
    usage: Tensor  # fraction of the codes the batch used, fp32
    codes_used: Tensor  # distinct codes used, int64
    dead_codes_replaced: Tensor  # codes revived by the last training step, int64


class Quantized(NamedTuple):
    """What the fp32 core returns; the last three feed a deferred codebook update."""
    quantized: Tensor  # (b, n, h*d) fp32, gradients routed to the input; zeros where masked
    indices: Tensor  # (b, n, h) int64, -1 where masked
    loss: Tensor
    breakdown: LossBreakdown
    search: Tensor  # (g, m, d) the vectors searched, per codebook (detached)
    codebook_indices: Tensor  # (g, m)
    keep: Tensor | None  # (g, m)



class VectorQuantize(CodebookUpdates, SearchExtras, nn.Module):
    """Vector quantizer with an EMA (or learnable) codebook.

    Shapes:
        forward(x): x (b, n, dim) | (b, dim) one token | (b, dim, n) with channel_last=False |
            (b, dim, h, w) with accept_image_fmap | (b, dim, t, h, w) with accept_3d_fmap;
            mask (b, n) (or (b, h, w)) bool, True = keep, or lens (b,) for sequences
            -> (quantized like x in x's dtype, indices (b, n[, heads]) int64 (-1 where masked or the
                input is not finite, with a NaN output there: docs/precision.md),
                loss fp32 scalar) [, LossBreakdown with return_loss_breakdown];
            with `indices` given -> (quantized, cross-entropy of x's code distribution to them).

    heads > 1 splits codebook_dim * heads features into heads, each searched against one shared
    codebook (or its own with separate_codebook_per_head). Statistics update only in training
    with gradients enabled and the codebook not frozen; eval and no_grad forwards change no
    buffer and issue no collective.

    Statistics extras (vector-quantize-pytorch's): forward's `ema_update_weight` (per-code weight
    (codebook_size,) or (num_codebooks, codebook_size) on the EMA step, num_codebooks = heads with
    separate_codebook_per_head else 1, or a callable (sums, counts) -> weight) and
    `accum_ema_update` (only accumulate this step's statistics), manual_ema_update with update_ema(),
    update_indices(x, indices), expire_codes_(x), affine_param, sync_update_v,
    in_place_codebook_optimizer (vq_updates.py, codebook.py, affine.py).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        commitment_use_cross_entropy_loss: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        rotation_trick: bool | None = None,
        sync_codebook: bool | None = None,
        ema_update: bool | None = None,
        learnable_codebook: bool | None = None,
        return_zeros_for_masked_padding: bool = True,
        reset_cluster_size: float | None = None,
        process_group=None,
        manual_ema_update: bool = False,
        affine_param: bool = False,
        sync_affine_param: bool | None = None,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        sync_update_v: float = 0.0,
        in_place_codebook_optimizer=None,
        manual_in_place_optimizer_update: bool = False,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        route_gradients_to_input: bool = True,
    ):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.codebook_size = check_positive_int("codebook_size", codebook_size)
        self.heads = check_positive_int("heads", heads)
        self.codebook_dim = self.dim if codebook_dim is None else check_positive_int("codebook_dim", codebook_dim)
        if not 0 <= decay <= 1:
            raise ValueError(f"decay: expected a value in [0, 1], got {decay!r}")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap, accept_3d_fmap: at most one can be True, got both")
        if orthogonal_reg_max_codes is not None:
            check_positive_int("orthogonal_reg_max_codes", orthogonal_reg_max_codes)
        # DiVeQ learns the codebook through the output: a learnable codebook, no EMA, no rotation trick
        learnable_codebook = bool(directional_reparam if learnable_codebook is None else learnable_codebook)
        ema_update = not learnable_codebook if ema_update is None else ema_update
        if ema_update and learnable_codebook:
            raise ValueError("ema_update, learnable_codebook: a learnable codebook is trained by its loss, "
                             "not by EMA; pass ema_update=False with learnable_codebook=True")
        if rotation_trick is None:
            rotation_trick = not straight_through and not directional_reparam and self.codebook_dim > 1
        if rotation_trick and straight_through:
            raise ValueError("straight_through, rotation_trick: choose one gradient estimator, got both True")
        if affine_param and use_cosine_sim:
            raise ValueError("affine_param: maps codes onto the batch's mean and variance, for the euclidean "
                             "codebook only; got use_cosine_sim=True")
        for name, value in (("affine_param_batch_decay", affine_param_batch_decay),
                            ("affine_param_codebook_decay", affine_param_codebook_decay)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}")
        check_directional_reparam(directional_reparam, directional_reparam_variance, straight_through,
                                  rotation_trick, threshold_ema_dead_code)
        self.directional_reparam = bool(directional_reparam)
        self.directional_reparam_variance = float(directional_reparam_variance)
        self.route_gradients_to_input = bool(route_gradients_to_input)

        self.separate_codebook_per_head = separate_codebook_per_head
        self.channel_last, self.accept_image_fmap, self.accept_3d_fmap = channel_last, accept_image_fmap, accept_3d_fmap
        self.freeze_codebook, self.ema_update = freeze_codebook, ema_update
        self.learnable_codebook = learnable_codebook
        self.use_cosine_sim, self.metric = use_cosine_sim, "dot" if use_cosine_sim else "l2"
        self.commitment_weight = check_non_negative("commitment_weight", commitment_weight)
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.orthogonal_reg_weight = check_non_negative("orthogonal_reg_weight", orthogonal_reg_weight)
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.codebook_diversity_loss_weight = check_non_negative("codebook_diversity_loss_weight",
                                                            codebook_diversity_loss_weight)
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = check_non_negative("sample_codebook_temp", sample_codebook_temp)
        self.straight_through, self.rotation_trick = straight_through, rotation_trick
        self.sync_codebook, self.sync_kmeans, self.process_group = sync_codebook, sync_kmeans, process_group
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding

        inner = self.codebook_dim * self.heads
        self.has_projections = inner != self.dim
        if self.has_projections:
            project_in = nn.Linear(self.dim, inner)
            self.project_in = nn.Sequential(project_in, nn.LayerNorm(inner)) if layernorm_after_project_in else project_in
            self.project_out = nn.Linear(inner, self.dim)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

        self._codebook = Codebook(
            self.codebook_dim, self.codebook_size, self.heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code, reset_cluster_size=reset_cluster_size,
            learnable=learnable_codebook or self.orthogonal_reg_weight > 0, use_cosine_sim=use_cosine_sim,
            manual_ema_update=manual_ema_update, affine_param=affine_param,
            affine_param_batch_decay=affine_param_batch_decay, affine_param_codebook_decay=affine_param_codebook_decay,
            process_group=process_group,
        )
        self._init_updates(sync_affine_param, sync_update_v, in_place_codebook_optimizer, manual_in_place_optimizer_update)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"heads={self.heads}, use_cosine_sim={self.use_cosine_sim}, ema_update={self.ema_update}")

    # the codebook

    @property
    def codebook(self) -> Tensor:
        """(codebook_size, codebook_dim), or (heads, codebook_size, codebook_dim) with separate codebooks."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        expected = tuple(self.codebook.shape)
        if tuple(codes.shape) != expected:
            raise ValueError(f"codebook: expected shape {expected}, got {tuple(codes.shape)}")
        self._codebook.set_codes_(codes if self.separate_codebook_per_head else codes[None])

    def _sync(self) -> bool:
        """Whether this forward talks to the other ranks: only training forwards with gradients
        do (eval, no_grad and inference forwards issue no collective), unless sync_codebook=False."""
        if self.sync_codebook is False or not (self.training and torch.is_grad_enabled()):
            return False
        return is_distributed(self.process_group)

    # the fp32 core, on tokens

    def _searched_codebook(self, updating: bool = False) -> Tensor:
        """The codes as searched (g, k, d) fp32, normalized for a learnable cosine codebook;
        `updating`: a snapshot (compiling.py), for a step whose update rewrites the live codes in
        place before its backward runs (recomputed softmax tiles, a compiled backward)."""
        codebook = self._codebook.codes()
        codebook = snapshot(codebook) if updating else codebook
        return F.normalize(codebook, dim=-1) if self.use_cosine_sim and self.learnable_codebook else codebook

    def _per_codebook(self, t: Tensor) -> Tensor:
        """(h, n, ...) per head -> (g, m, ...) per codebook: heads sharing one codebook are pooled."""
        return t if self.separate_codebook_per_head or self.heads == 1 else t.reshape(1, -1, *t.shape[2:])

    def _searched(self, z: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """z (b, n, heads*d), keep (b, n) or None -> the vectors searched per codebook (g, m, d), kept (g, m)."""
        b, n, _ = z.shape
        z = z.reshape(b * n, self.heads, self.codebook_dim).transpose(0, 1)  # (h, b*n, d)
        keep_heads = None if keep is None else keep.reshape(1, b * n).expand(self.heads, -1)
        if keep is not None:
            z = torch.where(keep_heads.unsqueeze(-1), z, 0.0)  # padding (projected: the bias) never enters
        if self.use_cosine_sim:
            z = F.normalize(z, dim=-1)
        return self._per_codebook(z), None if keep is None else self._per_codebook(keep_heads)

    @fp32_island
    def _quantize(self, z: Tensor, keep: Tensor | None, temperature: float, may_init: bool, update: bool,
                  ema_update: bool, freeze: bool, targets: Tensor | None = None, ema_update_weight=None,
                  accum_ema_update: bool = False, topk: int | None = None,
                  codebook_transform_fn: Callable | None = None, chosen: Tensor | None = None) -> Quantized:
        """z (b, n, heads*d), keep (b, n) bool or None -> Quantized (fp32).

        `topk`: the k nearest codes (a k axis after the tokens); `codebook_transform_fn`: search
        per-token codebooks made from the codebook; `chosen` (g, m): take these codes, no search.
        """
        b, n, _ = z.shape
        search, kept = self._searched(z, keep)
        sync = self._sync()
        init_token = search.new_zeros(())
        if may_init or update:  # refusals first: nothing has changed yet
            check_in_place_optimizer(self.in_place_codebook_optimizer)
            check_finite(search, NON_FINITE_INPUT, self.process_group, sync)
            if sync:
                self._codebook.broadcast_state_(self.process_group, once=True)
            if may_init and self._codebook.needs_init():
                init_token = self._codebook.init_if_needed(search.detach(), kept, sync, local=not self.sync_kmeans)
            if update:
                self._codebook.update_affine_(search, kept, self._sync_affine(), self.process_group)
        zero = search.new_zeros(())
        inplace = self._in_place_step([(search, kept)], sync, zero) if update else zero
        # a snapshot: this step's update (here, or a shared codebook's after all stages) rewrites the codes
        codebook = self._searched_codebook(updating=may_init or update)
        sample = self.training and self.stochastic_sample_codes and temperature > 0
        # sampling uses the peer's distribution: softmax(-||x - c|| / t) (or x . c / t when cosine)
        metric = "euclidean" if sample and self.metric == "l2" else self.metric
        per_token = None if codebook_transform_fn is None else per_token_codebooks(
            codebook_transform_fn, codebook, b, n, self.use_cosine_sim)
        indices, codes = find_codes(search, codebook, per_token, metric, temperature if sample else 0.0, kept, topk,
                                    chosen)
        if topk is not None:
            quantized, shown, loss, losses = self._topk_quantized(search, codebook, codes, indices, kept, freeze, sync,
                                                                  temperature, b, n, per_token)
            loss = loss + init_token
            return Quantized(quantized, shown, loss, LossBreakdown(*losses, z.new_zeros(())), search.detach(), indices, kept)

        commitment = diversity = orthogonal = zero
        if targets is not None:  # cross-entropy of x's code distribution to the given codes
            commitment = code_cross_entropy(search, codebook, targets, self.metric)
        elif self.training:
            commitment, diversity, orthogonal = self._losses(search, codebook, codes, indices, kept, freeze, sync)
        if update:
            self._codebook.update_(search.detach(), indices, kept, ema_update, sync, self.process_group,
                                   ema_update_weight, accum_ema_update)

        quantized = self._route_gradients(search, codes, codebook, temperature, freeze, per_token) if self.training \
            else codes.detach()
        shown = indices
        if keep is not None:
            quantized = torch.where(kept.unsqueeze(-1), quantized, 0.0)
            shown = indices.masked_fill(~kept, -1)
        # explicit shapes (not einops' b=...): they also hold for b * n == 0
        quantized = quantized.reshape(self.heads, b, n, self.codebook_dim).permute(1, 2, 0, 3)
        quantized = quantized.reshape(b, n, self.heads * self.codebook_dim)
        out_indices = shown.reshape(self.heads, b, n).permute(1, 2, 0)
        loss = (commitment * self.commitment_weight + diversity * self.codebook_diversity_loss_weight
                + orthogonal * self.orthogonal_reg_weight)
        if targets is not None:
            loss = commitment
        loss = trainable_loss(loss + init_token, self.training)
        breakdown = LossBreakdown(commitment, diversity, orthogonal, inplace)
        return Quantized(quantized, out_indices, loss, breakdown, search.detach(), indices, kept)

    def _route_gradients(self, search: Tensor, codes: Tensor, codebook: Tensor, temperature: float,
                         freeze: bool = False, per_token: Tensor | None = None) -> Tensor:
        """A training forward's output: the codes in value; the gradient reaches the input by the
        chosen estimator, and the codes by the synchronized update rule (sync_update_v), on every path
        (plain and topk). `per_token` (g, m, c, d): the codebooks searched (codebook_transform_fn)."""
        routed = self._estimator(search, codes, codebook, temperature, freeze, per_token)
        return self._synchronized_update(routed, codes, freeze)

    def _estimator(self, search, codes, codebook, temperature, freeze, per_token) -> Tensor:
        """Straight-through (Gumbel-softmax with a temperature), rotation trick or DiVeQ; none with
        route_gradients_to_input=False (the codes, differentiable in a learnable codebook unless frozen)."""
        if not self.route_gradients_to_input:
            return codes.detach() if freeze else codes
        if self.straight_through and temperature > 0:  # Gumbel-softmax straight-through
            soft = soft_codes(search, codebook, self.metric, 1.0 / temperature) if per_token is None else \
                per_token_soft_codes(search, per_token, self.metric, 1.0 / temperature)
            return straight_through(codes, soft if codes.ndim == soft.ndim else soft.unsqueeze(2).expand_as(codes))
        if search.ndim < codes.ndim:  # topk: each of the k codes routes to its input
            search = search.unsqueeze(2).expand_as(codes)
        if self.directional_reparam:  # DiVeQ: the gradient reaches the input and the code
            return directional_reparam(search, codes, self.directional_reparam_variance) if search.requires_grad else codes
        if self.rotation_trick and search.requires_grad:
            return rotation_trick(search, codes.detach())
        return straight_through(codes, search)

    def _losses(self, search, codebook, codes, indices, kept, freeze, sync):
        zero = search.new_zeros(())
        commitment = diversity = orthogonal = zero
        if self.commitment_weight > 0 and not self.directional_reparam:  # DiVeQ has none (as the peer)
            if self.commitment_use_cross_entropy_loss:
                targets = indices if kept is None else indices.masked_fill(~kept, -1)
                commitment = code_cross_entropy(search, codebook, targets, self.metric)
            else:
                target = codes if self.learnable_codebook and not freeze else codes.detach()
                commitment, _ = masked_mse(search, target, kept)
        if self.codebook_diversity_loss_weight > 0:
            diversity = diversity_loss(search, codebook, self.metric, self.codebook_diversity_temperature, kept,
                                       sync, self.process_group)
        if self.orthogonal_reg_weight > 0:
            orthogonal = orthogonal_loss(codebook, indices, kept, self.orthogonal_reg_active_codes_only,
                                         self.orthogonal_reg_max_codes)
        return commitment, diversity, orthogonal

    # the layer

    def _to_tokens(self, x: Tensor):
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a tensor, got {type(x).__name__}")
        expected_ndim = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else None
        if expected_ndim is not None and x.ndim != expected_ndim:
            raise ValueError(f"input: expected {expected_ndim} dims (b, dim, ...) with "
                             f"{'accept_image_fmap' if self.accept_image_fmap else 'accept_3d_fmap'}, got shape "
                             f"{tuple(x.shape)}")
        only_one = x.ndim == 2
        channel_first = not only_one and (self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last)
        tokens, spatial = to_tokens(x.unsqueeze(1) if only_one else x, channel_first, self.dim, "VectorQuantize")
        return tokens, spatial, channel_first, only_one

    def forward(self, x: Tensor, indices: Tensor | None = None, mask: Tensor | None = None, lens: Tensor | None = None,
                sample_codebook_temp: float | None = None, freeze_codebook: bool | None = None,
                return_loss_breakdown: bool = False, ema_update: bool | None = None, ema_update_weight=None,
                accum_ema_update: bool = False, topk: int | None = None, codebook_transform_fn: Callable | None = None):
        dtype = x.dtype
        tokens, spatial, channel_first, only_one = self._to_tokens(x)
        if mask is not None and lens is not None:
            raise ValueError("mask, lens: give at most one of them, got both")
        keep = lens_to_mask(lens, tokens, spatial) if lens is not None else check_mask(
            mask.reshape(-1, 1) if only_one and mask is not None and mask.ndim == 1 else mask, tokens, spatial)
        targets = None if indices is None else self._targets(indices, tokens, keep)
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else check_non_negative(
            "sample_codebook_temp", sample_codebook_temp)
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        ema_update = self.ema_update if ema_update is None else ema_update
        updating = self.training and torch.is_grad_enabled() and not freeze and targets is None
        ema_update_weight = self._checked_ema_weight(ema_update_weight) if updating else None
        topk = self._check_search_extras(topk, codebook_transform_fn, targets is not None)

        quantize = self._undone_on_error(self._quantize) if callable(ema_update_weight) else self._quantize
        result = quantize(project(self.project_in, without_padding(tokens, keep)), keep, temperature,
                          may_init=updating, update=updating and topk is None, ema_update=ema_update,
                          freeze=freeze, targets=targets, ema_update_weight=ema_update_weight,
                          accum_ema_update=accum_ema_update, topk=topk, codebook_transform_fn=codebook_transform_fn)
        if not updating:  # (an updating step raised above for non-finite input)
            result = without_codes(result, non_finite_tokens(tokens, keep))
        if topk is not None:  # a k axis before the features; no codebook update (as the peer)
            return self._topk_output(result, tokens, keep, spatial, channel_first, only_one, dtype, return_loss_breakdown)
        out = project(self.project_out, result.quantized)
        if keep is not None:
            masked_value = torch.zeros_like(out) if self.return_zeros_for_masked_padding else tokens.to(out.dtype)
            out = torch.where(keep.unsqueeze(-1), out, masked_value)
        out = from_tokens(out.to(dtype), spatial, channel_first)
        if only_one:
            out = out[:, 0]
        if targets is not None:
            return out, result.loss
        codes = indices_from_tokens(result.indices, spatial)
        if self.heads == 1:
            codes = codes[..., 0]
        if only_one:
            codes = codes[:, 0]
        return (out, codes, result.loss, result.breakdown) if return_loss_breakdown else (out, codes, result.loss)

    def _targets(self, indices: Tensor, tokens: Tensor, keep: Tensor | None) -> Tensor:
        """Given indices (b, ...[, heads]) -> per-codebook targets (g, m), -1 ignored."""
        idx = self._check_code_indices(indices)
        idx = idx.reshape(idx.shape[0], math.prod(idx.shape[1:-1]), self.heads)  # explicit: also for b = 0
        if idx.shape[1] != tokens.shape[1]:
            raise ValueError(f"indices: expected {tokens.shape[1]} positions per batch item, got shape {tuple(indices.shape)}")
        if keep is not None:
            idx = idx.masked_fill(~keep.unsqueeze(-1), -1)
        return self._per_codebook(rearrange(idx, "b n h -> h (b n)"))

    def _check_code_indices(self, indices: Tensor) -> Tensor:
        """indices (b, ...[, heads]) integer in [-1, codebook_size) -> (b, ..., heads)."""
        check_indices(indices, self.codebook_size, allow_dropped=True)
        if self.heads > 1 and (indices.ndim < 2 or indices.shape[-1] != self.heads):
            raise ValueError(f"indices: expected a last axis of heads={self.heads}, got shape {tuple(indices.shape)}")
        return indices.long() if self.heads > 1 else indices.long().unsqueeze(-1)

    def _lookup(self, indices: Tensor) -> Tensor:
        """indices (..., heads) checked -> codes (..., heads * codebook_dim) fp32; -1 -> zeros."""
        codebook = self._searched_codebook()
        safe = indices.clamp(min=0)
        if self.separate_codebook_per_head:
            codes = codebook[torch.arange(self.heads, device=indices.device), safe]
        else:
            codes = codebook[0][safe]
        codes = codes.masked_fill((indices < 0).unsqueeze(-1), 0.0)
        return rearrange(codes, "... h d -> ... (h d)")

    def _channel_first_output(self, codes: Tensor) -> bool:
        return (self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last) and codes.ndim > 2

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices as forward returns them -> codes before project_out, fp32 (-1 -> zeros)."""
        codes = self._lookup(self._check_code_indices(indices))
        return rearrange(codes, "b ... d -> b d ...") if self._channel_first_output(codes) else codes

    def get_output_from_indices(self, indices: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """indices as forward returns them -> the output forward gave (bitwise, in eval).

        float32 (the projection's dtype with projections) unless `dtype` is given; positions with
        index -1 (masked) are zeros.
        """
        idx = self._check_code_indices(indices)
        out = project(self.project_out, self._lookup(idx))
        out = out.masked_fill((idx[..., :1] < 0), 0.0)
        out = out if dtype is None else out.to(dtype)
        return rearrange(out, "b ... d -> b d ...") if self._channel_first_output(out) else out

    # health

    def code_usage(self, indices: Tensor, process_group=None) -> CodeUsage:
        """Perplexity and fraction of the codebook used by `indices` (heads pooled; -1 ignored)."""
        group = process_group if process_group is not None else self.process_group
        return code_usage(indices, self.codebook_size, group)

    def codebook_health(self, indices: Tensor, process_group=None) -> CodebookHealth:
        """Usage of `indices` (the global batch's under torch.distributed: every rank must call)
        and the number of dead codes the last training step replaced."""
        usage = self.code_usage(indices, process_group)
        return CodebookHealth(*usage, self._codebook.dead_codes_replaced.to(indices.device))
