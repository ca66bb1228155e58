"""Vector quantization (VQ-VAE, arXiv 1711.00937) with EMA codebooks, k-means init and dead-code
replacement, a drop-in for vector-quantize-pytorch's VectorQuantize.

One training step reads top to bottom in `CodebookQuantizer.quantize` (codebook_quantizer.py):
the codebook state (codebook.py), the search (code_search.py), the losses (vq_losses.py), the
gradient route (vq_gradients.py, vq_fused.py) and the in-place optimizer (vq_updates.py). This
file is the layer around it: projections, layouts, forward's options and decoding.
The search never forms the N x K distance matrix (kernels/nearest_code.py), codes are gathered
(no one-hot matmul), statistics are index_add'ed in fp32 (ema.py), and the losses that need a
softmax over all codes run in recomputed tiles (kernels/code_softmax.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_non_negative, check_positive_int
from ..ema import ema_weight
from ..layout import to_tokens, without_padding
from ..non_finite import non_finite_tokens, without_codes
from ..precision import project
from ..usage import CodeUsage, code_usage
from .code_search import check_search_extras, topk_layout
from .codebook_quantizer import CodebookHealth, CodebookQuantizer, Step
from .token_quantizer import Core, Layout, TokenQuantizer
from .vq_updates import undone_on_error


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
