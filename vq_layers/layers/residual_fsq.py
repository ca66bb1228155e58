"""Residual FSQ: quantizer k sees the residual of quantizers < k, at a scale (levels-1)^-k.

With symmetric levels the grid step is 2/(L-1), so a residual lies in [-1/(L-1), 1/(L-1)];
scaling stage k by (L-1)^-k maps the whole [-1, 1] grid of the next stage exactly onto that
interval (vector-quantize-pytorch scales by L^-k, which leaves part of the cell uncovered).
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from ..layout import from_tokens, indices_from_tokens, to_tokens
from ..non_finite import mark_non_finite, non_finite_tokens
from ..precision import fp32_island, project
from .fsq import FSQ, check_levels
from .residual import GroupedResidual, ResidualQuantizer, last_kept_stage, run_stages


class ResidualFSQ(ResidualQuantizer):
    """Residual finite scalar quantization (SoundStream's Algorithm 1 with FSQ stages).

    Shapes:
        forward(x): x (b, n, dim) | (b, dim), or (b, dim, ...) with is_channel_first
            -> (quantized like x in x's dtype, indices (b, n, q) int64 | (b, q, ...) channel-first
               [, all_codes (q, b, n, d) scaled codes in x's dtype with return_all_codes]).
        Dropped quantizers (quantize_dropout in training) get index -1; so does every stage of
        a token whose input is not finite, with a NaN output (docs/precision.md).
    """

    def __init__(
        self,
        dim: int | None = None,
        levels=None,
        num_quantizers: int | None = None,
        *,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value=None,
        bound_hard_clamp: bool = True,
        process_group=None,
        **fsq_kwargs,
    ):
        levels = check_levels(levels)
        super().__init__(len(levels) if dim is None else dim, len(levels), num_quantizers, quantize_dropout,
                         quantize_dropout_cutoff_index, quantize_dropout_multiple_of, process_group)
        if not fsq_kwargs.pop("preserve_symmetry", True):
            raise ValueError("preserve_symmetry: ResidualFSQ needs the symmetric grid, got False")
        if fsq_kwargs.get("num_codebooks", 1) != 1:
            raise ValueError(f"num_codebooks: ResidualFSQ supports 1, got {fsq_kwargs['num_codebooks']}")
        if bound_hard_clamp and soft_clamp_input_value is not None:
            raise ValueError("soft_clamp_input_value: must be None with bound_hard_clamp=True")

        self.levels = levels
        self.is_channel_first = is_channel_first
        self.layers = nn.ModuleList(
            FSQ(levels=levels, dim=self.codebook_dim, preserve_symmetry=True,
                bound_hard_clamp=bound_hard_clamp, **fsq_kwargs)
            for _ in range(num_quantizers)
        )
        self.codebook_size = self.layers[0].codebook_size

        steps = torch.tensor(levels, dtype=torch.float32) - 1
        self.register_fp32_buffer(
            "scales", torch.stack([steps ** -k for k in range(num_quantizers)]), persistent=False
        )
        if bound_hard_clamp:
            # inputs up to one half-cell past +-1 still round to the outermost code
            soft_clamp_input_value = 1 + 1 / steps
        if soft_clamp_input_value is not None:
            soft_clamp_input_value = torch.as_tensor(soft_clamp_input_value, dtype=torch.float32)
            self.register_fp32_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)
        else:
            self.soft_clamp_input_value = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, levels={self.levels}, num_quantizers={self.num_quantizers}, "
            f"quantize_dropout={self.quantize_dropout}"
        )

    @property
    def codebooks(self) -> Tensor:
        """(q, codebook_size, len(levels)) unscaled implicit codebooks, built on demand."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    @fp32_island
    def _residual_quantize(self, x: Tensor, last_kept: int) -> tuple[Tensor, Tensor, Tensor]:
        """x (b, n, d) fp32 -> quantized (b, n, d) fp32, indices (b, n, q), stage codes (q, b, n, d)."""
        if self.soft_clamp_input_value is not None:
            x = (x / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        stages = [partial(self._quantize_stage, k) for k in range(self.num_quantizers)]
        quantized, indices, codes, _ = run_stages(x, stages, last_kept)
        return quantized, indices, codes

    def _quantize_stage(self, k: int, residual: Tensor) -> tuple[Tensor, Tensor]:
        codes, indices = self.layers[k](residual / self.scales[k])
        return codes * self.scales[k], indices

    def _lookup_stage(self, k: int, indices: Tensor) -> Tensor:
        return self.layers[k]._indices_to_raw_codes(indices) * self.scales[k]

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        dtype = x.dtype
        tokens, packed_shape = to_tokens(x, self.is_channel_first, self.dim, "ResidualFSQ")
        bad = non_finite_tokens(tokens)  # judged before the soft clamp, which makes +-inf finite
        last_kept = last_kept_stage(self, x, rand_quantize_dropout_fixed_seed)
        quantized, indices, codes = self._residual_quantize(project(self.project_in, tokens), last_kept)
        out = mark_non_finite(project(self.project_out, quantized).to(dtype), bad)
        out = from_tokens(out, packed_shape, self.is_channel_first)
        indices = indices_from_tokens(mark_non_finite(indices, bad), packed_shape)
        if not return_all_codes:
            return self._indices_layout_out(out, indices)
        codes = mark_non_finite(codes, bad.unsqueeze(0))
        all_codes = codes.reshape(codes.shape[0], *indices.shape[:-1], codes.shape[-1]).to(dtype)
        return (*self._indices_layout_out(out, indices), all_codes)

    def _indices_layout_out(self, out, indices):
        if self.is_channel_first:
            indices = rearrange(indices, "b ... q -> b q ...")
        return out, indices

    def _q_last(self, indices: Tensor) -> Tensor:
        return rearrange(indices, "b q ... -> b ... q") if self.is_channel_first else indices

    def _channel_first_output(self, indices: Tensor) -> bool:
        return self.is_channel_first


class GroupedResidualFSQ(GroupedResidual):
    """`groups` independent ResidualFSQs over equal slices of the feature dim.

    Shapes: x (b, n, dim) (or (b, dim, ...) with accept_image_fmap) -> (quantized like x,
    indices (g, b, n, q) [, all_codes (g, q, b, n, d)]).
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        kwargs.setdefault("is_channel_first", accept_image_fmap)
        super().__init__(ResidualFSQ, dim, groups, accept_image_fmap, **kwargs)

    def forward(self, x: Tensor, return_all_codes: bool = False):
        return super().forward(x, return_all_codes=return_all_codes)
