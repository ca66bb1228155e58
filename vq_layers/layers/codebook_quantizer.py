"""One VQ training step on tokens in the codebook space, read top to bottom: CodebookQuantizer
owns the codebook state (codebook.py) and the step's parts, the search (code_search.py), the
losses (vq_losses.py), the gradient route (vq_gradients.py, or vq_fused.py's one Function for
the usual estimators) and the in-place optimizer (vq_updates.py); `Step` carries one call's
options and `Quantized` its result. VectorQuantize (vq.py) is the layer around it; ResidualVQ
and HierarchicalVQ drive it through the stage protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_indices, check_non_negative
from ..codebook import Codebook
from ..compiling import snapshot
from ..distributed import NON_FINITE_INPUT, check_finite, is_distributed
from ..in_place_step import check_in_place_optimizer
from ..kernels.code_softmax import code_cross_entropy
from ..precision import fp32_island
from .code_search import find_codes, per_token_codebooks, topk_quantized
from .vq_fused import routed_codes
from .vq_gradients import GradientRoute, resolve_rotation_trick
from .vq_losses import LossBreakdown, VQLosses, trainable_loss
from .vq_updates import in_place_step, make_in_place_optimizer, update_by_hand, update_in_place


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
