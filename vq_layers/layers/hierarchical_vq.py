"""Multi-scale residual VQ in the style of VAR (arXiv 2404.02905, Algorithm 1), a drop-in for
vector-quantize-pytorch's HierarchicalVQ.

Level k average-pools the residual feature map to its scale, quantizes the pooled vectors with a
VectorQuantize (one codebook shared by every level, or one per level), interpolates the codes
back to full resolution, refines them with a 3-wide convolution blended in ("phi",
x + quant_resi * (conv(x) - x)), and subtracts them from the residual. The reconstruction is the
sum of the refined levels; in training, nested dropout may keep only a prefix of them.

Pooling and interpolation run in float32 with autocast off; phi is a projection (it follows
autocast, and without it its input is cast to its weight's dtype); the residual chain is kept in
float32 and the output is cast back to the input's dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_index_ranges, check_indices, check_non_negative, check_positive_int
from ..counter_random import CounterDraws, mix32
from ..distributed import NON_FINITE_INPUT, broadcast_once_, check_finite, is_distributed
from ..layout import check_mask, from_tokens, indices_from_tokens, lens_to_mask
from ..non_finite import non_finite_tokens, without_codes
from ..precision import fp32_island, project, stack
from .codebook_quantizer import Step
from .vq import VectorQuantize

_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_LAYOUTS = {1: "n", 2: "h, w", 3: "t, h, w"}


def to_level_shape(name: str, scale, spatial_dims: int) -> tuple[int, ...]:
    """An int (the same size on every spatial axis) or one size per axis -> a shape, checked."""
    sizes = (scale,) * spatial_dims if isinstance(scale, numbers.Integral) else scale
    if not isinstance(sizes, Sequence) or len(sizes) != spatial_dims:
        raise ValueError(f"{name}: expected an int or {spatial_dims} ints (one per spatial axis), got {scale!r}")
    return tuple(check_positive_int(name, s) for s in sizes)


def to_level_shapes(scales, spatial_dims: int) -> tuple[tuple[int, ...], ...]:
    """`scales` -> one shape per level, checked: non-empty, non-decreasing on every axis."""
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"scales: expected a non-empty sequence of level sizes, got {scales!r}")
    shapes = tuple(to_level_shape(f"scales[{k}]", s, spatial_dims) for k, s in enumerate(scales))
    for before, after in zip(shapes, shapes[1:]):
        if any(a > b for a, b in zip(before, after)):
            raise ValueError(f"scales: expected non-decreasing level sizes, got {before} before {after}")
    return shapes


def fmap_and_keep(x, mask, lens, dim: int, spatial_dims: int, channel_first: bool) -> tuple[Tensor, Tensor | None]:
    """HierarchicalVQ's input in the user's layout -> channel-first fmap (b, d, ...s), keep (b, ...s)
    bool or None, checked."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input: expected a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"input: expected a floating point tensor, got dtype {x.dtype}")
    layout = f"(b, dim, {_LAYOUTS[spatial_dims]})" if channel_first else f"(b, {_LAYOUTS[spatial_dims]}, dim)"
    if x.ndim != 2 + spatial_dims:
        raise ValueError(f"input: expected {2 + spatial_dims} dims {layout}, got shape {tuple(x.shape)}")
    fmap = x if channel_first else rearrange(x, "b ... d -> b d ...")
    if fmap.shape[1] != dim:
        raise ValueError(f"HierarchicalVQ: expected input feature dim {dim} ({layout}), got shape {tuple(x.shape)}")
    spatial = tuple(fmap.shape[2:])
    if 0 in spatial:
        raise ValueError(f"input: expected non-empty spatial axes to pool from, got shape {tuple(x.shape)}")
    if mask is not None and lens is not None:
        raise ValueError("mask, lens: give at most one of them, got both")
    tokens = rearrange(fmap, "b d ... -> b (...) d")  # a view, for the shape checks
    keep = lens_to_mask(lens, tokens, spatial) if lens is not None else check_mask(mask, tokens, spatial)
    return fmap, None if keep is None else keep.reshape(fmap.shape[0], *spatial)


@fp32_island
def pool_level(fmap: Tensor, shape: tuple[int, ...], keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """fmap (b, d, ...) -> its mean over each adaptive-pooling window (b, d, *shape), fp32.

    With keep (b, ...) bool: the mean over the window's kept positions (padding, NaN included,
    never enters), and the cells with at least one kept position (b, *shape).
    """
    pool = _POOLS[len(shape)]
    if keep is None:
        return pool(fmap, shape), None
    weight = pool(keep.unsqueeze(1).float(), shape)  # fraction of each window that is kept
    total = pool(torch.where(keep.unsqueeze(1), fmap, 0.0), shape)
    kept = weight > 0
    return total / torch.where(kept, weight, 1.0), kept[:, 0]


# compiled, interpolation and its backward are opaque ops that run F.interpolate itself: the
# values are eager's, and inductor's CPU code for the backward (a vectorized scatter)
# miscomputes and crashes (torch 2.13)
@torch.library.custom_op("vq_layers::interpolate", mutates_args=())
def _interpolate_op(q: Tensor, size: list[int]) -> Tensor:
    return F.interpolate(q, size=size, mode=_MODES[len(size)], align_corners=False).contiguous()


@_interpolate_op.register_fake
def _(q, size):
    return q.new_empty((*q.shape[:2], *size))


_BACKWARDS = {1: torch.ops.aten.upsample_linear1d_backward, 2: torch.ops.aten.upsample_bilinear2d_backward,
              3: torch.ops.aten.upsample_trilinear3d_backward}


@torch.library.custom_op("vq_layers::interpolate_backward", mutates_args=())
def _interpolate_backward_op(grad: Tensor, shape: list[int]) -> Tensor:
    return _BACKWARDS[grad.ndim - 2](grad.contiguous(), list(grad.shape[2:]), shape, False)


@_interpolate_backward_op.register_fake
def _(grad, shape):
    return grad.new_empty(shape)


def _interpolate_setup(ctx, inputs, output):
    ctx.shape = list(inputs[0].shape)


_interpolate_op.register_autograd(lambda ctx, grad: (_interpolate_backward_op(grad, ctx.shape), None),
                                  setup_context=_interpolate_setup)


@fp32_island
def upsample(q: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(b, d, ...) -> (b, d, *shape) by (bi/tri)linear interpolation (align_corners=False), fp32."""
    if tuple(q.shape[2:]) == shape:
        return q
    if torch.compiler.is_compiling():
        return _interpolate_op(q, list(shape))
    return F.interpolate(q, size=shape, mode=_MODES[len(shape)], align_corners=False)


class Phi(nn.Module):
    """VAR's refinement of an upsampled level: x + resi_ratio * (conv(x) - x), conv 3 wide.

    fp32 in and out; the convolution is a projection (see precision.project)."""

    def __init__(self, dim: int, spatial_dims: int, resi_ratio: float):
        super().__init__()
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1](dim, dim, 3, padding=1)
        self.resi_ratio = float(abs(resi_ratio))

    def extra_repr(self) -> str:
        return f"resi_ratio={self.resi_ratio}"

    def forward(self, q: Tensor) -> Tensor:
        if self.resi_ratio <= 1e-8:  # the peer's threshold: the conv is skipped
            return q
        return torch.lerp(q, project(self.conv, q).float(), self.resi_ratio)


class HierarchicalVQ(nn.Module):
    """Multi-scale residual vector quantization (VAR).

    Shapes (s = spatial axes: (n) by default, (h, w) with accept_image_fmap, (t, h, w) with
    accept_3d_fmap; channel_first=False puts dim last):
        forward(x): x (b, dim, ...s) in any float dtype; mask (b, ...s) bool (True = keep) or
            lens (b,) for sequences
            -> (reconstruction like x in x's dtype (zeros where masked),
                indices: a tuple with one (b, ...scale_k) int64 per level (-1 for cells with no
                kept position, and for cells whose pooled residual is not finite: their NaN
                codes reach every position that depends on them, docs/precision.md), commit
                loss fp32 scalar (mean over the kept levels; NaN with such a cell)
                [, cutoff: the last kept level (int) or None, with return_cutoff]).
        get_output_from_indices(indices, full_shape) -> (b, dim, ...full_shape) fp32 (or `dtype`).

    `scales` are non-decreasing level sizes (an int for every axis, or one per axis). Nested
    dropout (training with gradients only) keeps levels 0..cutoff, cutoff drawn alike on every
    rank; every level is still quantized and trains its codebook. With shared_codebook every
    level searches the codebook as it was before the step, and it is updated once from all
    levels' statistics at the end of the step (as ResidualVQ does).
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int | tuple[int, ...],
        scales: Sequence[int | Sequence[int]],
        shared_codebook: bool = True,
        channel_first: bool = True,
        sync_codebook: bool | None = None,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        rotation_trick: bool = False,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 0.1,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_max_codes: int | None = 128,
        orthogonal_reg_active_codes_only: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 1,
        nested_dropout: float = 0.0,
        nested_dropout_min_levels: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        process_group=None,
    ):
        super().__init__()
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap, accept_3d_fmap: at most one can be True, got both")
        self.dim = check_positive_int("dim", dim)
        self.spatial_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else 1
        self.scales, self.level_shapes = tuple(scales), to_level_shapes(scales, self.spatial_dims)
        self.num_levels = len(self.level_shapes)
        sizes = (codebook_size,) * self.num_levels if isinstance(codebook_size, numbers.Integral) else codebook_size
        if not isinstance(sizes, Sequence) or len(sizes) != self.num_levels:
            raise ValueError(f"codebook_size: expected an int or one size per level ({self.num_levels}), "
                             f"got {codebook_size!r}")
        self.codebook_sizes = tuple(check_positive_int("codebook_size", s) for s in sizes)
        if shared_codebook and len(set(self.codebook_sizes)) != 1:
            raise ValueError(f"codebook_size: a shared codebook needs one size for every level, got {codebook_size!r}")
        if not (isinstance(nested_dropout, numbers.Real) and 0 <= nested_dropout <= 1):
            raise ValueError(f"nested_dropout: expected a probability in [0, 1], got {nested_dropout!r}")
        self.nested_dropout = float(nested_dropout)
        self.nested_dropout_min_levels = check_positive_int("nested_dropout_min_levels", nested_dropout_min_levels)
        if isinstance(share_quant_resi, bool) or not isinstance(share_quant_resi, numbers.Integral):
            raise TypeError(f"share_quant_resi: expected an int (1: one phi for all levels, <= 0: one per level, "
                            f"p > 1: p phis spread over the levels), got {share_quant_resi!r}")
        if not isinstance(quant_resi, numbers.Real):
            raise TypeError(f"quant_resi: expected a number (the phi blend ratio), got {quant_resi!r}")
        self.channel_first, self.shared_codebook, self.process_group = channel_first, shared_codebook, process_group
        self.quant_resi, self.share_quant_resi = float(quant_resi), int(share_quant_resi)

        def make_vq(size: int) -> VectorQuantize:
            return VectorQuantize(
                dim=self.dim, codebook_size=size, decay=decay, commitment_weight=commitment_weight,
                rotation_trick=rotation_trick, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                threshold_ema_dead_code=threshold_ema_dead_code, stochastic_sample_codes=stochastic_sample_codes,
                sample_codebook_temp=sample_codebook_temp, orthogonal_reg_weight=orthogonal_reg_weight,
                orthogonal_reg_max_codes=orthogonal_reg_max_codes,
                orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only, sync_codebook=sync_codebook,
                process_group=process_group,
            )

        self.vq, self.vqs = None, None
        if shared_codebook:
            self.vq = make_vq(self.codebook_sizes[0])
        else:
            self.vqs = nn.ModuleList(make_vq(size) for size in self.codebook_sizes)

        self.dropout_draws = CounterDraws()  # nested dropout's cutoffs, alike on every rank
        self.phi_shared, self.phi_levels = None, None
        if self.share_quant_resi == 1:
            self.phi_shared = Phi(self.dim, self.spatial_dims, quant_resi)
        else:
            count = self.num_levels if self.share_quant_resi <= 0 else min(self.num_levels, self.share_quant_resi)
            self.phi_levels = nn.ModuleList(Phi(self.dim, self.spatial_dims, quant_resi) for _ in range(count))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_sizes={self.codebook_sizes}, level_shapes={self.level_shapes}, "
                f"shared_codebook={self.shared_codebook}, quant_resi={self.quant_resi}, "
                f"share_quant_resi={self.share_quant_resi}, nested_dropout={self.nested_dropout}")

    def get_vq(self, level_index: int) -> VectorQuantize:
        return self.vq if self.vq is not None else self.vqs[level_index]

    def choose_phi(self, level_index: int) -> Phi:
        """The shared phi, or the one nearest to the level's relative depth level / (levels - 1)."""
        if self.phi_shared is not None:
            return self.phi_shared
        position = level_index / max(self.num_levels - 1, 1)
        return self.phi_levels[round(position * (len(self.phi_levels) - 1))]

    def _refine(self, level_index: int, q: Tensor, full_shape: tuple[int, ...]) -> Tensor:
        """A level's codes (b, d, ...scale) fp32 -> its contribution at full resolution, fp32."""
        return self.choose_phi(level_index)(upsample(q, full_shape))

    def sample_nested_cutoff(self):
        """The last level kept by nested dropout, drawn alike on every rank (counter_random.CounterDraws):
        None (all levels) or an int when eager; under torch.compile a CPU int64 tensor
        (num_levels - 1 when no level is dropped)."""
        if not (self.training and torch.is_grad_enabled() and self.nested_dropout > 0):
            return None
        if self.nested_dropout_min_levels >= self.num_levels:
            return None
        draw = self.dropout_draws.next()  # 32 bits: whether to drop, then (rehashed) where
        drops = draw < round(self.nested_dropout * 2**32)
        choices = self.num_levels - self.nested_dropout_min_levels
        cutoff = self.nested_dropout_min_levels - 1 + mix32(draw ^ 0x5BD1E995) % choices
        if isinstance(draw, int):
            return cutoff if drops else None
        return torch.where(drops, cutoff, self.num_levels - 1)

    def _broadcast_initial_state(self, fmap: Tensor, keep: Tensor | None) -> None:
        """At the first synced training step: every level's codebook and the nested-dropout seed
        take the group's first rank's values, in one collective, after the non-finite check."""
        owners = [owner for vq in (self.vqs or [self.vq]) for owner in vq.synced_owners()]
        if self.nested_dropout > 0 and is_distributed(self.process_group):
            owners.append(self.dropout_draws)
        broadcast_once_(owners, self.process_group, fmap.device,
                        before=lambda: check_finite(self._kept(fmap, keep), NON_FINITE_INPUT, self.process_group,
                                                    True))

    @staticmethod
    def _kept(fmap: Tensor, keep: Tensor | None) -> Tensor:
        """fmap (b, d, ...s) with the masked positions zeroed: their padding counts nowhere."""
        return fmap if keep is None else torch.where(keep.unsqueeze(1), fmap, 0.0)

    # the layer

    def forward(self, x: Tensor, indices=None, mask: Tensor | None = None, lens: Tensor | None = None,
                sample_codebook_temp: float | None = None, return_cutoff: bool = False):
        if indices is not None:
            raise ValueError("indices: HierarchicalVQ.forward does not take indices; decode them with "
                             "get_output_from_indices")
        fmap, keep = fmap_and_keep(x, mask, lens, self.dim, self.spatial_dims, self.channel_first)
        dtype = x.dtype
        if sample_codebook_temp is not None:
            check_non_negative("sample_codebook_temp", sample_codebook_temp)
        full_shape = tuple(fmap.shape[2:])
        updating = self.training and torch.is_grad_enabled()
        if updating:  # once for the call: every level's tokens are pooled residuals, fmap less finite codes
            self._broadcast_initial_state(fmap, keep)
            check_finite(self._kept(fmap, keep), NON_FINITE_INPUT, self.process_group, self.get_vq(0)._sync())
        cutoff = self.sample_nested_cutoff()
        last_kept = self.num_levels - 1 if cutoff is None else cutoff
        masked = isinstance(last_kept, Tensor)  # a compiled draw: the kept prefix by masks
        kept_levels = torch.arange(self.num_levels) <= last_kept if masked else None

        residual = fmap.float()
        reconstruction, kept_reconstruction = torch.zeros_like(residual), None
        all_indices, losses, results = [], [], []
        for k, level_shape in enumerate(self.level_shapes):
            pooled, cells = pool_level(residual, level_shape, keep)
            tokens = rearrange(pooled, "b d ... -> b (...) d")
            cells = None if cells is None else cells.reshape(cells.shape[0], math.prod(level_shape))
            vq = self.get_vq(k)
            temperature = vq.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
            result = vq.quantize(tokens, cells, Step(temperature, updating, updating and not self.shared_codebook,
                                                     vq.ema_update, checked=True))
            results.append(result)
            # a cell whose pooled residual is not finite has no code; its NaN reaches, through
            # the refinement, every position and finer cell that depends on it
            if not updating:  # (an updating step raised for it)
                result = without_codes(result, non_finite_tokens(tokens, cells))
            q = self._refine(k, from_tokens(result.quantized, level_shape, True), full_shape)
            reconstruction = reconstruction + q
            residual = residual - q
            if masked:  # (+ 0 adds nothing: the same bits as the eager prefix sum)
                kept_reconstruction = reconstruction if k == 0 else kept_reconstruction + torch.where(
                    kept_levels[k].to(q.device), q, 0.0)
            elif k == last_kept:
                kept_reconstruction = reconstruction
            all_indices.append(indices_from_tokens(result.indices, level_shape)[..., 0])
            losses.append(result.loss)
        if updating and self.shared_codebook:
            self.vq.commit_statistics(results)

        if masked:
            weights = kept_levels.to(device=losses[0].device, dtype=torch.float32)
            loss = (stack(losses) * weights).sum() / weights.sum()
        else:
            loss = stack(losses[: last_kept + 1]).mean()
        out = kept_reconstruction
        if keep is not None:
            out = torch.where(keep.unsqueeze(1), out, 0.0)
        out = out.to(dtype)
        if not self.channel_first:
            out = rearrange(out, "b d ... -> b ... d")
        if return_cutoff:
            return out, tuple(all_indices), loss, cutoff
        return out, tuple(all_indices), loss

    # decoding

    def get_output_from_indices(self, indices, full_shape=None, dtype: torch.dtype | None = None) -> Tensor:
        """indices as forward returns them (one (b, ...scale_k) per level, -1 = no code) -> the
        reconstruction (b, dim, ...full_shape) (dim last with channel_first=False), float32 unless
        `dtype` is given. full_shape defaults to the last level's; with it (the usual: the last
        scale is the input's size) the eval forward's output is reproduced bitwise, masked
        positions (whose last-level index is -1) as zeros."""
        if not isinstance(indices, (tuple, list)) or len(indices) != self.num_levels:
            raise ValueError(f"indices: expected a tuple of {self.num_levels} tensors (one per level), got "
                             f"{len(indices) if isinstance(indices, (tuple, list)) else type(indices).__name__}")
        full_shape = self.level_shapes[-1] if full_shape is None else to_level_shape("full_shape", full_shape,
                                                                                       self.spatial_dims)
        batch = None
        for k, (level, level_shape) in enumerate(zip(indices, self.level_shapes)):
            check_indices(level, self.codebook_sizes[k], name=f"indices[{k}]", allow_dropped=True, values=False)
            batch = level.shape[0] if batch is None and level.ndim > 0 else batch
            if tuple(level.shape) != (batch, *level_shape):
                raise ValueError(f"indices[{k}]: expected shape (b, *{level_shape}) = {(batch, *level_shape)}, got "
                                 f"{tuple(level.shape)}")
        check_index_ranges([(level, size, f"indices[{k}]") for k, (level, size) in
                            enumerate(zip(indices, self.codebook_sizes))])  # (one read for all levels)
        reconstruction = None
        for k, (level, level_shape) in enumerate(zip(indices, self.level_shapes)):
            codes = self.get_vq(k).get_output_from_indices(level.reshape(batch, math.prod(level_shape)),
                                                           _checked=True)
            q = self._refine(k, from_tokens(codes.float(), level_shape, True), full_shape)
            reconstruction = q if reconstruction is None else reconstruction + q
        if self.level_shapes[-1] == full_shape:
            reconstruction = reconstruction.masked_fill((indices[-1] < 0).unsqueeze(1), 0.0)
        out = reconstruction if dtype is None else reconstruction.to(dtype)
        return out if self.channel_first else rearrange(out, "b d ... -> b ... d")
