"""Vector quantization (VQ-VAE, arXiv 1711.00937) with EMA codebooks, k-means init and dead-code
replacement, a drop-in for vector-quantize-pytorch's VectorQuantize.

One training step reads top to bottom in `VectorQuantize.quantize`; its parts are objects the
layer owns or functions it calls: the codebook state (codebook.py), the search (code_search.py),
the losses (vq_losses.py), the gradient route (vq_gradients.py) and the in-place optimizer
(vq_updates.py).
The search never forms the N x K distance matrix (kernels/nearest_code.py), codes are gathered
(no one-hot matmul), statistics are index_add'ed in fp32 (ema.py), and the losses that need a
softmax over all codes run in recomputed tiles (kernels/code_softmax.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_indices, check_non_negative, check_positive_int
from ..codebook import Codebook
from ..compiling import snapshot
from ..distributed import NON_FINITE_INPUT, check_finite, is_distributed
from ..ema import ema_weight
from ..in_place_step import check_in_place_optimizer
from ..kernels.code_softmax import code_cross_entropy
from ..layout import to_tokens, without_padding
from ..non_finite import non_finite_tokens, without_codes
from ..precision import fp32_island, project
from ..usage import CodeUsage, code_usage
from .code_search import check_search_extras, find_codes, per_token_codebooks, topk_layout, topk_quantized
from .token_quantizer import Core, Layout, TokenQuantizer
from .vq_fused import routed_codes
from .vq_gradients import GradientRoute, resolve_rotation_trick
from .vq_losses import LossBreakdown, VQLosses, trainable_loss
from .vq_updates import in_place_step, make_in_place_optimizer, undone_on_error, update_by_hand, update_in_place


class CodebookHealth(NamedTuple):
    perplexity: Tensor  # exp(entropy) of the batch's code distribution, fp32
    usage: Tensor  # fraction of the codes the batch used, fp32
    codes_used: Tensor  # distinct codes used, int64
    dead_codes_replaced: Tensor  # codes revived by the last training step, int64


class Step(NamedTuple):
    """How one `quantize` call runs (the forward's options, or a composite layer's)."""
    temperature: float = 0.0  # sample codes at it (stochastic_sample_codes); the Gumbel straight-through's
    updating: bool = False  # the codebook changes in this step (now, or by a later commit_statistics)
    commit: bool = False  # write this call's statistics now (an updating step of an unshared codebook)
    ema_update: bool = True
    freeze: bool = False
    ema_update_weight: Tensor | Callable | None = None
    accum_ema_update: bool = False
    topk: int | None = None
    transform: Callable | None = None  # codebook_transform_fn
    chosen: Tensor | None = None  # (g, m) take these codes, no search (a beam search's path)
    targets: Tensor | None = None  # (g, m) given codes: the loss is the cross-entropy to them
    # the caller has refused non-finite input for the whole call (checked once, one host sync):
    # this step's vectors derive from it by finite codes, so it need not read them back again
    checked: bool = False


class Quantized(NamedTuple):
    """One `quantize` call's result, fp32; search, codebook_indices and kept feed a deferred
    statistics commit; codebook and squared_error, a chain that routes its stages' gradients
    itself (vq_fused.routed_chain)."""
    quantized: Tensor  # (b, n, h*d) (b, n, k, d with topk), gradients routed; zeros where masked
    indices: Tensor  # (b, n, h) (b, n, k with topk) int64, -1 where masked
    loss: Tensor  # scalar (per position (b, n, k) with topk)
    breakdown: LossBreakdown
    search: Tensor  # (g, m, d) the vectors searched, per codebook (detached)
    codebook_indices: Tensor  # (g, m) the codes chosen, per codebook
    kept: Tensor | None  # (g, m) the vectors that count, per codebook
    codebook: Tensor | None = None  # (g, c, d) the codes as searched (detached), with a fused route
    squared_error: Tensor | None = None  # the commitment's numerator (detached), with a fused route


class CodebookQuantizer(nn.Module):
    """Vector quantization in the codebook space: tokens (b, n, heads * codebook_dim) against one
    learned codebook (or one per head), with every update rule of VectorQuantize. It owns the
    codebook state (codebook.py) and the step's parts (the search, the losses, the gradient
    route, the in-place optimizer) and runs one training step, `quantize`, top to bottom.

    The stage protocol composite layers (ResidualVQ, HierarchicalVQ) use: `quantize` these tokens
    with a `Step`, `commit_statistics` of several searches of a shared codebook, `synced_owners`
    (what a first synced step broadcasts), `needs_init`, `lookup`, `searched_codes`,
    `share_codebook_of`, `broadcast_codebook_`. The options are VectorQuantize's.
    """

    def __init__(self, codebook_size: int, codebook_dim: int, heads: int, *, separate_codebook_per_head, decay, eps,
                 freeze_codebook, kmeans_init, kmeans_iters, sync_kmeans, use_cosine_sim, threshold_ema_dead_code,
                 commitment_weight, commitment_use_cross_entropy_loss, orthogonal_reg_weight,
                 orthogonal_reg_active_codes_only, orthogonal_reg_max_codes, codebook_diversity_loss_weight,
                 codebook_diversity_temperature, stochastic_sample_codes, sample_codebook_temp, straight_through,
                 rotation_trick, sync_codebook, ema_update, learnable_codebook, reset_cluster_size, process_group,
                 manual_ema_update, affine_param, sync_affine_param, affine_param_batch_decay,
                 affine_param_codebook_decay, sync_update_v, in_place_codebook_optimizer,
                 manual_in_place_optimizer_update, directional_reparam, directional_reparam_variance,
                 route_gradients_to_input):
        super().__init__()
        self.codebook_size, self.codebook_dim, self.heads = codebook_size, codebook_dim, heads
        if not 0 <= decay <= 1:
            raise ValueError(f"decay: expected a value in [0, 1], got {decay!r}")
        # DiVeQ learns the codebook through the output: a learnable codebook, no EMA, no rotation trick
        learnable_codebook = bool(directional_reparam if learnable_codebook is None else learnable_codebook)
        ema_update = not learnable_codebook if ema_update is None else ema_update
        if ema_update and learnable_codebook:
            raise ValueError("ema_update, learnable_codebook: a learnable codebook is trained by its loss, "
                             "not by EMA; pass ema_update=False with learnable_codebook=True")
        if affine_param and use_cosine_sim:
            raise ValueError("affine_param: maps codes onto the batch's mean and variance, for the euclidean "
                             "codebook only; got use_cosine_sim=True")
        for name, value in (("affine_param_batch_decay", affine_param_batch_decay),
                            ("affine_param_codebook_decay", affine_param_codebook_decay)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}")
        self.use_cosine_sim, self.metric = use_cosine_sim, "dot" if use_cosine_sim else "l2"
        self.route = GradientRoute.from_options(
            straight_through=straight_through, rotation_trick=rotation_trick, directional_reparam=directional_reparam,
            directional_reparam_variance=directional_reparam_variance,
            route_gradients_to_input=route_gradients_to_input, sync_update_v=sync_update_v,
            learnable_codebook=learnable_codebook, codebook_dim=codebook_dim,
            threshold_ema_dead_code=threshold_ema_dead_code, metric=self.metric)
        self.losses = VQLosses(self.metric, commitment_weight, commitment_use_cross_entropy_loss,
                               not directional_reparam, codebook_diversity_loss_weight, codebook_diversity_temperature,
                               orthogonal_reg_weight, orthogonal_reg_active_codes_only, orthogonal_reg_max_codes)
        # the options as given (the peer's attribute names); `route` and `losses` act on them
        self.straight_through = straight_through
        self.rotation_trick = resolve_rotation_trick(rotation_trick, straight_through, directional_reparam,
                                                     codebook_dim)
        self.directional_reparam, self.directional_reparam_variance = bool(directional_reparam), float(
            directional_reparam_variance)
        self.route_gradients_to_input, self.sync_update_v = bool(route_gradients_to_input), float(sync_update_v)
        self.commitment_weight, self.orthogonal_reg_weight = commitment_weight, orthogonal_reg_weight
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.separate_codebook_per_head = separate_codebook_per_head
        self.freeze_codebook, self.ema_update, self.learnable_codebook = freeze_codebook, ema_update, learnable_codebook
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = check_non_negative("sample_codebook_temp", sample_codebook_temp)
        self.sync_codebook, self.sync_kmeans, self.process_group = sync_codebook, sync_kmeans, process_group
        self._codebook = Codebook(
            codebook_dim, codebook_size, heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code, reset_cluster_size=reset_cluster_size,
            learnable=learnable_codebook or orthogonal_reg_weight > 0, use_cosine_sim=use_cosine_sim,
            manual_ema_update=manual_ema_update, affine_param=affine_param,
            affine_param_batch_decay=affine_param_batch_decay, affine_param_codebook_decay=affine_param_codebook_decay,
            process_group=process_group,
        )
        if sync_affine_param is True and not affine_param:
            raise ValueError("sync_affine_param: syncs the affine batch statistics, which need affine_param=True; "
                             "got affine_param=False")
        self.sync_affine_param, self.affine_param = sync_affine_param, affine_param
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update
        self.in_place_codebook_optimizer = make_in_place_optimizer(in_place_codebook_optimizer, self._codebook)

    # one step, on tokens: the stage protocol

    @fp32_island
    def quantize(self, z: Tensor, keep: Tensor | None = None, step: Step = Step()) -> Quantized:
        """z (b, n, heads*d) in the codebook space, keep (b, n) bool or None -> Quantized (fp32)."""
        b, n, _ = z.shape
        search, kept = self._per_codebook_vectors(z, keep)
        sync = self._sync()
        zero = search.new_zeros(())
        # 1. before anything changes: refusals, the first synced step's broadcast, k-means init
        init_token = self._prepare(search, kept, sync, step.checked) if step.updating else zero
        if step.commit:
            self._codebook.update_affine_(search, kept, self._sync_affine(), self.process_group)
        # 2. the in-place optimizer moves the codebook; the search sees the moved codes
        inplace = self._in_place_step([(search, kept)], sync) if step.commit else zero
        # 3. the search, on a snapshot when this step (or a later commit) rewrites the codes in place
        codebook = self.searched_codes(snapshot_codes=step.updating)
        per_token = None if step.transform is None else per_token_codebooks(
            step.transform, codebook, b, n, self.use_cosine_sim)
        sample = self.training and self.stochastic_sample_codes and step.temperature > 0
        # sampling uses the peer's distribution: softmax(-||x - c|| / t) (or x . c / t when cosine)
        metric = "euclidean" if sample and self.metric == "l2" else self.metric
        found = find_codes(search, codebook, metric, step.temperature if sample else 0.0, kept, step.topk, per_token,
                           step.chosen)
        codes_learn = self.learnable_codebook and not step.freeze  # the commitment loss also pulls the codes
        if step.topk is not None:  # code_search.py: per-position losses, no statistics
            quantized, shown, loss, breakdown = topk_quantized(
                self.losses, self.route if self.training else None, search, codebook, found, kept, step.temperature,
                step.freeze, codes_learn, sync, self.process_group, b, n)
            return Quantized(quantized, shown, loss + init_token, breakdown, search.detach(), found.indices, kept)
        # 4. the losses; with the usual estimators, the output and the commitment error in one
        # autograd Function that keeps only the vectors, indices and codebook (vq_fused.py)
        fused = self.fused_route(step)
        if fused is not None:
            searched = codebook.detach() if step.updating else snapshot(codebook.detach())
            quantized, squared_error = routed_codes(search, found.codes, searched, found.indices, kept,
                                                    fused == "rotation")
        if step.targets is not None:  # cross-entropy of x's code distribution to the given codes
            commitment = code_cross_entropy(search, codebook, step.targets, self.metric)
            terms, loss = (commitment, zero, zero), commitment
        else:
            terms = self.losses.terms(search, codebook, found.codes, found.indices, kept, codes_learn, sync,
                                      self.process_group, None if fused is None else squared_error) \
                if self.training else (zero, zero, zero)
            loss = self.losses.total(*terms)
        # 5. the statistics (EMA, dead codes) from this step's vectors and codes
        if step.commit:
            self._codebook.update_(search.detach(), found.indices, kept, step.ema_update, sync, self.process_group,
                                   step.ema_update_weight, step.accum_ema_update)
        # 6. the output: the codes in value, gradients routed to the input (and codes)
        if fused is None:
            quantized = self.route(search, found.codes, codebook, step.temperature, step.freeze, found.per_token) \
                if self.training else found.codes.detach()
        shown = found.indices
        if keep is not None:
            quantized = torch.where(kept.unsqueeze(-1), quantized, 0.0)
            shown = shown.masked_fill(~kept, -1)
        # (g, m) -> (b, n, h): explicit shapes (not einops' b=...), which also hold for b * n == 0
        quantized = quantized.reshape(self.heads, b, n, self.codebook_dim).permute(1, 2, 0, 3)
        quantized = quantized.reshape(b, n, self.heads * self.codebook_dim)
        shown = shown.reshape(self.heads, b, n).permute(1, 2, 0)
        loss = trainable_loss(loss + init_token, self.training)
        return Quantized(quantized, shown, loss, LossBreakdown(*terms, inplace), search.detach(), found.indices, kept,
                         *((None, None) if fused is None else (searched, squared_error.detach())))

    def fused_route(self, step: Step, chain: bool = False) -> str | None:
        """The estimator a training `quantize` with this step runs in vq_fused.py's one Function
        ("rotation" or "straight_through"), or None (another estimator, a loss that trains the
        codes, cross-entropy to given codes, topk, per-token codebooks). `chain`: whether a
        composite layer may route this stage's gradients itself (vq_fused.routed_chain, on the
        Quantized's codebook and squared_error): also no loss but the commitment depends on the
        searched vectors, and they are the residual itself (no cosine normalization)."""
        codes_learn = self.learnable_codebook and not step.freeze
        if (not self.training or step.targets is not None or step.topk is not None or step.transform is not None
                or codes_learn or not self.losses.fusable):
            return None
        if chain and (self.codebook_diversity_loss_weight > 0 or self.use_cosine_sim or self.heads > 1):
            return None
        return self.route.fused(step.temperature, step.freeze, None)

    def _prepare(self, search: Tensor, kept: Tensor | None, sync: bool, checked: bool = False) -> Tensor:
        """An updating step's first acts, all before any state changes: the refusals (an unsafe
        optimizer, non-finite input unless `checked`), at the first synced step the first rank's
        state, k-means init -> a zero that carries init's run-time op into a compiled graph."""
        check_in_place_optimizer(self.in_place_codebook_optimizer)
        if not checked:
            check_finite(search, NON_FINITE_INPUT, self.process_group, sync)
        if sync:
            self._codebook.broadcast_state_(self.process_group, once=True)
        if not self._codebook.needs_init():
            return search.new_zeros(())
        return self._codebook.init_if_needed(search.detach(), kept, sync, local=not self.sync_kmeans)

    def commit_statistics(self, results: list[Quantized]) -> None:
        """One codebook update from several searches of this step against the codebook as it was
        before it (ResidualVQ's stages, HierarchicalVQ's levels sharing one codebook): one in-place
        step on the sum of their losses, then one statistics update from all their vectors."""
        sync = self._sync()
        kept = None if results[0].kept is None else torch.cat([r.kept for r in results], dim=1)
        self._in_place_step([(r.search, r.kept) for r in results], sync)
        self._codebook.update_(torch.cat([r.search for r in results], dim=1),
                               torch.cat([r.codebook_indices for r in results], dim=1), kept, self.ema_update, sync,
                               self.process_group)

    def synced_owners(self) -> list:
        """What a composite layer's first synced training step broadcasts for this stage."""
        return [self._codebook] if self._sync() else []

    def broadcast_codebook_(self, group=None) -> None:
        """Every rank takes the group's first rank's codebook state."""
        self._codebook.broadcast_state_(group)

    def needs_init(self) -> bool:
        """Whether the codebook still waits for its k-means init (the next updating step runs it)."""
        return self._codebook.needs_init()

    def share_codebook_of(self, other: CodebookQuantizer) -> None:
        """This stage searches `other`'s codebook (ResidualVQ's shared_codebook): one state, and
        other's in-place optimizer steps for both."""
        self._codebook, self.in_place_codebook_optimizer = other._codebook, other.in_place_codebook_optimizer

    def searched_codes(self, snapshot_codes: bool = False) -> Tensor:
        """The codes as searched (g, k, d) fp32, normalized for a learnable cosine codebook;
        `snapshot_codes`: an opaque copy (compiling.py), for a step whose update rewrites the live
        codes in place before its backward runs (recomputed softmax tiles, a compiled backward)."""
        codebook = self._codebook.codes()
        codebook = snapshot(codebook) if snapshot_codes else codebook
        return F.normalize(codebook, dim=-1) if self.use_cosine_sim and self.learnable_codebook else codebook

    def lookup(self, indices: Tensor) -> Tensor:
        """indices (..., heads) checked -> codes (..., heads * codebook_dim) fp32; -1 -> zeros."""
        codebook = self.searched_codes()
        safe = indices.clamp(min=0)
        if self.separate_codebook_per_head:
            codes = codebook[torch.arange(self.heads, device=indices.device), safe]
        else:
            codes = codebook[0][safe]
        codes = codes.masked_fill((indices < 0).unsqueeze(-1), 0.0)
        return rearrange(codes, "... h d -> ... (h d)")

    # the step's pieces

    def _sync(self) -> bool:
        """Whether this forward talks to the other ranks: only training forwards with gradients
        do (eval, no_grad and inference forwards issue no collective), unless sync_codebook=False."""
        if self.sync_codebook is False or not (self.training and torch.is_grad_enabled()):
            return False
        return is_distributed(self.process_group)

    def _sync_affine(self) -> bool:
        """Whether the affine batch moments are the global batch's: by default (None) whenever the
        codebook syncs, as every other statistic (the peer's default, False, leaves each rank its own)."""
        if self.sync_affine_param is None:
            return self.sync_codebook is not False and is_distributed(self.process_group)
        return self.sync_affine_param and is_distributed(self.process_group)

    def _in_place_step(self, parts: list, sync: bool) -> Tensor:
        if self.in_place_codebook_optimizer is None:
            return parts[0][0].new_zeros(())
        return in_place_step(self.in_place_codebook_optimizer, self._codebook, self.searched_codes, parts, self.metric,
                             self.manual_in_place_optimizer_update, sync, self.process_group)

    def _per_codebook_vectors(self, z: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """z (b, n, heads*d), keep (b, n) or None -> the vectors searched per codebook (g, m, d), kept (g, m)."""
        b, n, _ = z.shape
        z = z.reshape(b * n, self.heads, self.codebook_dim).transpose(0, 1)  # (h, b*n, d)
        keep_heads = None if keep is None else keep.reshape(1, b * n).expand(self.heads, -1)
        if keep is not None:
            z = torch.where(keep_heads.unsqueeze(-1), z, 0.0)  # padding (projected: the bias) never enters
        if self.use_cosine_sim:
            z = F.normalize(z, dim=-1)
        return self._per_codebook(z), None if keep is None else self._per_codebook(keep_heads)

    def _per_codebook(self, t: Tensor) -> Tensor:
        """(h, n, ...) per head -> (g, m, ...) per codebook: heads sharing one codebook are pooled."""
        return t if self.separate_codebook_per_head or self.heads == 1 else t.reshape(1, -1, *t.shape[2:])

    def _targets(self, indices: Tensor, n: int, keep: Tensor | None) -> Tensor:
        """Given indices (b, ...[, heads]) for n positions -> per-codebook targets (g, m), -1 ignored."""
        idx = self._check_code_indices(indices)
        idx = idx.reshape(idx.shape[0], math.prod(idx.shape[1:-1]), self.heads)  # explicit: also for b = 0
        if idx.shape[1] != n:
            raise ValueError(f"indices: expected {n} positions per batch item, got shape {tuple(indices.shape)}")
        if keep is not None:
            idx = idx.masked_fill(~keep.unsqueeze(-1), -1)
        return self._per_codebook(rearrange(idx, "b n h -> h (b n)"))

    def _check_code_indices(self, indices: Tensor, checked: bool = False) -> Tensor:
        """indices (b, ...[, heads]) integer in [-1, codebook_size) -> (b, ..., heads); `checked`:
        the caller read their range already (HierarchicalVQ: all levels at once)."""
        check_indices(indices, self.codebook_size, allow_dropped=True, values=not checked)
        if self.heads > 1 and (indices.ndim < 2 or indices.shape[-1] != self.heads):
            raise ValueError(f"indices: expected a last axis of heads={self.heads}, got shape {tuple(indices.shape)}")
        return indices.long() if self.heads > 1 else indices.long().unsqueeze(-1)

    # updates by hand

    def update_ema(self) -> None:
        """Sets the codes from the EMA statistics (for manual_ema_update=True)."""
        self._codebook.update_ema()

    def update_in_place_optimizer(self) -> None:
        """With manual_in_place_optimizer_update=True: the optimizer step on the gradients
        gathered since the last call (already the global batch's under sync), then zero_grad."""
        update_in_place(self.in_place_codebook_optimizer)

    @fp32_island
    @torch.no_grad()
    def _by_hand(self, z: Tensor, keep: Tensor | None, targets: Tensor | None) -> None:
        """update_indices (`targets` (g, m) given) or expire_codes_ (None) on tokens z (b, n, h*d)."""
        search, _ = self._per_codebook_vectors(z, keep)
        sync = self.sync_codebook is not False and is_distributed(self.process_group)
        update_by_hand(self._codebook, search, targets, self.ema_update, sync, self.process_group)


class VectorQuantize(CodebookQuantizer, TokenQuantizer):
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

    The training step and the stage protocol composite layers use are CodebookQuantizer's (above);
    this class adds the layer: projections, layouts, masks, forward's options, decoding.
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
        dim = check_positive_int("dim", dim)
        codebook_dim = dim if codebook_dim is None else check_positive_int("codebook_dim", codebook_dim)
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap, accept_3d_fmap: at most one can be True, got both")
        super().__init__(
            check_positive_int("codebook_size", codebook_size), codebook_dim, check_positive_int("heads", heads),
            separate_codebook_per_head=separate_codebook_per_head, decay=decay, eps=eps,
            freeze_codebook=freeze_codebook, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
            sync_kmeans=sync_kmeans, use_cosine_sim=use_cosine_sim, threshold_ema_dead_code=threshold_ema_dead_code,
            commitment_weight=commitment_weight, commitment_use_cross_entropy_loss=commitment_use_cross_entropy_loss,
            orthogonal_reg_weight=orthogonal_reg_weight,
            orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
            orthogonal_reg_max_codes=orthogonal_reg_max_codes,
            codebook_diversity_loss_weight=codebook_diversity_loss_weight,
            codebook_diversity_temperature=codebook_diversity_temperature,
            stochastic_sample_codes=stochastic_sample_codes,
            sample_codebook_temp=sample_codebook_temp, straight_through=straight_through, rotation_trick=rotation_trick,
            sync_codebook=sync_codebook, ema_update=ema_update, learnable_codebook=learnable_codebook,
            reset_cluster_size=reset_cluster_size, process_group=process_group, manual_ema_update=manual_ema_update,
            affine_param=affine_param, sync_affine_param=sync_affine_param,
            affine_param_batch_decay=affine_param_batch_decay, affine_param_codebook_decay=affine_param_codebook_decay,
            sync_update_v=sync_update_v, in_place_codebook_optimizer=in_place_codebook_optimizer,
            manual_in_place_optimizer_update=manual_in_place_optimizer_update, directional_reparam=directional_reparam,
            directional_reparam_variance=directional_reparam_variance,
            route_gradients_to_input=route_gradients_to_input)
        self.dim = dim
        self.channel_last, self.accept_image_fmap, self.accept_3d_fmap = channel_last, accept_image_fmap, accept_3d_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        inner = codebook_dim * self.heads
        self.has_projections = inner != dim
        if self.has_projections:
            project_in = nn.Linear(dim, inner)
            if layernorm_after_project_in:
                project_in = nn.Sequential(project_in, nn.LayerNorm(inner))
            self.project_in = project_in
            self.project_out = nn.Linear(inner, dim)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"heads={self.heads}, use_cosine_sim={self.use_cosine_sim}, ema_update={self.ema_update}")

    @property
    def keep_num_codebooks_dim(self) -> bool:  # a heads axis on the indices
        return self.heads > 1

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

    # the layer

    def forward(self, x: Tensor, indices: Tensor | None = None, mask: Tensor | None = None, lens: Tensor | None = None,
                sample_codebook_temp: float | None = None, freeze_codebook: bool | None = None,
                return_loss_breakdown: bool = False, ema_update: bool | None = None, ema_update_weight=None,
                accum_ema_update: bool = False, topk: int | None = None, codebook_transform_fn: Callable | None = None):
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        updating = self.training and torch.is_grad_enabled() and not freeze and indices is None
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else check_non_negative(
            "sample_codebook_temp", sample_codebook_temp)
        topk = check_search_extras(
            topk, codebook_transform_fn, heads=self.heads, codebook_size=self.codebook_size,
            given_indices=indices is not None, training=self.training,
            in_place=self.in_place_codebook_optimizer is not None,
            cross_entropy=self.commitment_use_cross_entropy_loss, diversity_weight=self.codebook_diversity_loss_weight)
        if not updating:
            ema_update_weight = None
        elif ema_update_weight is not None and not callable(ema_update_weight):  # checked before anything changes
            ema_update_weight = ema_weight(ema_update_weight, None, self._codebook.cluster_size)
        step = Step(temperature, updating, updating and topk is None, self.ema_update if ema_update is None else
                    ema_update, freeze, ema_update_weight, accum_ema_update, topk,
                    codebook_transform_fn)
        if topk is not None:  # a k axis before the features; no codebook update (as the peer)
            out, codes, loss, breakdown = self._topk_forward(x, mask, lens, step)
        else:
            result = self.quantize_tokens(x, mask, lens, refuses_non_finite=updating, step=step, given=indices)
            if indices is not None:
                return result.out, result.losses[0]
            out, codes, (loss, breakdown) = result.out, result.indices, result.losses
        return (out, codes, loss, breakdown) if return_loss_breakdown else (out, codes, loss)

    def _core(self, z: Tensor, keep: Tensor | None, step: Step, given: Tensor | None) -> Core:
        """The tokens (b, n, heads*d) after project_in, as the skeleton gives them -> Core."""
        if given is not None:
            step = step._replace(targets=self._targets(given, z.shape[1], keep))
        quantize = self.quantize
        if callable(step.ema_update_weight):  # checked once the statistics exist: undo the step should it raise
            quantize = undone_on_error(self.quantize, self._codebook, self.in_place_codebook_optimizer,
                                       self.manual_in_place_optimizer_update)
        result = quantize(z, keep, step)
        return Core(result.quantized, result.indices, (result.loss, result.breakdown), result)

    def _layout(self, x: Tensor) -> tuple[Tensor, Layout]:
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a tensor, got {type(x).__name__}")
        expected_ndim = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else None
        if expected_ndim is not None and x.ndim != expected_ndim:
            raise ValueError(f"input: expected {expected_ndim} dims (b, dim, ...) with "
                             f"{'accept_image_fmap' if self.accept_image_fmap else 'accept_3d_fmap'}, got shape "
                             f"{tuple(x.shape)}")
        single = x.ndim == 2
        channel_first = not single and (self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last)
        tokens, spatial = to_tokens(x.unsqueeze(1) if single else x, channel_first, self.dim, "VectorQuantize")
        return tokens, Layout(x.dtype, spatial, channel_first, single)

    def _topk_forward(self, x: Tensor, mask, lens, step: Step):
        """The skeleton with a k axis (code_search.py): (out, indices, loss, breakdown) in the peer's layout."""
        tokens, layout = self._layout(x)
        keep = self._keep(mask, lens, tokens, layout)
        result = self.quantize(project(self.project_in, without_padding(tokens, keep)), keep, step)
        if not step.updating:  # (an updating step raised for it)
            result = without_codes(result, non_finite_tokens(tokens, keep))
        out = project(self.project_out, result.quantized)  # (b, n, k, dim)
        if keep is not None:
            masked = torch.zeros_like(out) if self.return_zeros_for_masked_padding else \
                tokens.to(out.dtype).unsqueeze(2).expand_as(out)
            out = torch.where(keep[..., None, None], out, masked)
        return topk_layout((out.to(layout.dtype), result.indices, result.loss, result.breakdown), layout.spatial,
                           layout.channel_first, layout.single)

    # decoding

    def _channel_first_output(self, codes: Tensor) -> bool:
        return (self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last) and codes.ndim > 2

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices as forward returns them -> codes before project_out, fp32 (-1 -> zeros)."""
        codes = self.lookup(self._check_code_indices(indices))
        return rearrange(codes, "b ... d -> b d ...") if self._channel_first_output(codes) else codes

    def get_output_from_indices(self, indices: Tensor, dtype: torch.dtype | None = None, *,
                                _checked: bool = False) -> Tensor:
        """indices as forward returns them -> the output forward gave (bitwise, in eval).

        float32 (the projection's dtype with projections) unless `dtype` is given; positions with
        index -1 (masked) are zeros.
        """
        idx = self._check_code_indices(indices, _checked)
        out = project(self.project_out, self.lookup(idx))
        out = out.masked_fill((idx[..., :1] < 0), 0.0)
        out = out if dtype is None else out.to(dtype)
        return rearrange(out, "b ... d -> b d ...") if self._channel_first_output(out) else out

    # updates by hand

    def expire_codes_(self, x: Tensor) -> None:
        """Replaces dead codes (EMA count below threshold_ema_dead_code) by rows of x
        (..., heads * codebook_dim), vectors as the codebook sees them (after project_in), as
        vector-quantize-pytorch does; a no-op in eval or without a threshold. Under sync every
        rank must call (the rows are drawn from the union of the ranks')."""
        if not isinstance(x, Tensor) or x.shape[-1:] != (self.heads * self.codebook_dim,):
            raise ValueError(f"x: expected a tensor (..., {self.heads * self.codebook_dim}) (heads * codebook_dim), "
                             f"got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if self.training and self._codebook.threshold_ema_dead_code > 0:
            self._by_hand(x.detach().reshape(1, -1, x.shape[-1]), None, None)

    def update_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
        """One codebook update from x (as forward takes it) with `indices` (as forward returns
        them) in place of the nearest codes: the EMA step (if ema_update) and dead-code expiry.
        Masked positions and index -1 count nowhere. In any mode; under sync every rank must call."""
        tokens, layout = self._layout(x)
        keep = self._keep(mask, None, tokens, layout)
        targets = self._targets(indices.unsqueeze(1) if layout.single else indices, tokens.shape[1], keep)
        self._by_hand(project(self.project_in, without_padding(tokens, keep)), keep, targets)

    update_ema_indices = update_indices  # the peer's older name

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
