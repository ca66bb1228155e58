"""Residual LFQ: stage k is an LFQ with codes +-2^-k quantizing the residual of stages < k."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from ..layout import check_mask, from_tokens, indices_from_tokens, to_tokens, without_padding
from ..non_finite import mark_losses, mark_non_finite, non_finite_tokens
from ..precision import fp32_island, project
from .lfq import LFQ, check_codebook_size
from .residual import GroupedResidual, ResidualQuantizer, last_kept_stage, run_stages


class ResidualLFQ(ResidualQuantizer):
    """Residual lookup-free quantization (SoundStream's Algorithm 1 with LFQ stages).

    Shapes:
        forward(x, mask=None): x (b, n, dim) | (b, dim) | channel-first (b, dim, h, w); mask
            (b,) bool keeps or drops whole samples, (b, n) or (b, h, w) single tokens (as LFQ)
            -> (quantized like x in x's dtype (zeros where masked), indices (b, n, q) |
            (b, h, w, q) int64 (-1 for dropped stages and masked tokens, and every stage of a
            token whose input is not finite, whose output is NaN and which makes the losses
            NaN), aux losses (q,) fp32
            [, all_codes (q, b, n, d) in x's dtype with return_all_codes]).
    Every LFQ keyword (entropy_loss_weight, spherical, ...) passes through to the stages.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | None = None,
        channel_first: bool | None = None,
        process_group=None,
        **lfq_kwargs,
    ):
        codebook_size = check_codebook_size(codebook_size)
        super().__init__(dim, int(math.log2(codebook_size)), num_quantizers, quantize_dropout,
                         quantize_dropout_cutoff_index, quantize_dropout_multiple_of, process_group)
        self.codebook_size = codebook_size
        for name in ("codebook_scale", "num_codebooks", "has_projections", "keep_num_codebooks_dim"):
            if name in lfq_kwargs:  # set by ResidualLFQ: stage k is one 2^-k codebook, no projections
                raise ValueError(f"{name}: set by ResidualLFQ for its stages, got {lfq_kwargs[name]!r}")
        self.channel_first = channel_first  # None: channel-first for 4+ dims, as LFQ
        self.layers = nn.ModuleList(
            LFQ(dim=self.codebook_dim, codebook_size=codebook_size, codebook_scale=2.0**-k,
                soft_clamp_input_value=None if soft_clamp_input_value is None else soft_clamp_input_value * 2.0**-k,
                channel_first=False, process_group=process_group, **lfq_kwargs)
            for k in range(num_quantizers)
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, num_quantizers={self.num_quantizers}"

    @property
    def codebooks(self) -> Tensor:
        """(q, codebook_size, log2(codebook_size)) codes of every stage, built on demand."""
        return torch.stack([layer.codebook for layer in self.layers])

    @fp32_island
    def _residual_quantize(self, x: Tensor, mask, last_kept: int, inv_temperature: float):
        def stage(layer, residual, active):  # a dropped stage's outputs and loss are masked by run_stages
            return layer(residual, mask=mask, inv_temperature=inv_temperature)

        stages = [partial(stage, layer) for layer in self.layers]
        quantized, indices, codes, extras = run_stages(x, stages, last_kept)
        losses = [extra[0] if extra is not None else x.new_zeros(()) for extra in extras]
        return quantized, indices, codes, torch.stack(losses)

    def forward(self, x: Tensor, mask=None, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | None = None, inv_temperature: float = 100.0):
        dtype = x.dtype
        channel_first = self._channel_first(x.ndim)
        tokens, spatial = to_tokens(x, channel_first, self.dim, "ResidualLFQ")
        mask = check_mask(mask, tokens, spatial, per_sample=True)
        bad = non_finite_tokens(tokens, mask)
        self._broadcast_initial_state(tokens)
        last_kept = last_kept_stage(self, rand_quantize_dropout_fixed_seed)
        quantized, indices, codes, losses = self._residual_quantize(project(self.project_in, without_padding(tokens, mask)), mask,
                                                                    last_kept, inv_temperature)
        out = project(self.project_out, quantized)
        if mask is not None:  # masked tokens (every index -1): zeros, as get_output_from_indices decodes them
            out = torch.where(mask.unsqueeze(-1), out, 0.0)
        out = from_tokens(mark_non_finite(out.to(dtype), bad), spatial, channel_first)
        indices = indices_from_tokens(mark_non_finite(indices, bad), spatial)
        losses = mark_losses(losses, bad)
        if not return_all_codes:
            return out, indices, losses
        codes = mark_non_finite(codes, bad.unsqueeze(0))
        # the stages' own codes: the same values a lookup by indices would give, without one
        all_codes = codes.reshape(codes.shape[0], *indices.shape[:-1], codes.shape[-1]).to(dtype)
        return out, indices, losses, all_codes

    def get_output_from_indices(self, indices: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """indices as forward returns them -> the output forward gave (bitwise, in eval); masked
        tokens, all of whose indices are -1, are zeros."""
        out = super().get_output_from_indices(indices, dtype)
        masked = (indices < 0).all(-1)
        return out.masked_fill(masked.unsqueeze(1 if self._channel_first_output(indices) else -1), 0.0)

    def _channel_first(self, ndim: int) -> bool:
        return self.channel_first if self.channel_first is not None else ndim >= 4

    def _lookup_stage(self, k: int, indices: Tensor) -> Tensor:
        return self.layers[k]._indices_to_raw_codes(indices)

    def _channel_first_output(self, indices: Tensor) -> bool:
        # indices (b, h, w, q) of an image decode channel-first, like forward's output
        return self._channel_first(indices.ndim)


class GroupedResidualLFQ(GroupedResidual):
    """`groups` independent ResidualLFQs over equal slices of the feature dim.

    Shapes: x (b, n, dim) -> (quantized like x, indices (g, b, n, q), losses (g, q)
    [, all_codes (g, q, b, n, d)]).
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        kwargs.setdefault("channel_first", True if accept_image_fmap else None)
        super().__init__(ResidualLFQ, dim, groups, accept_image_fmap, **kwargs)

    def forward(self, x: Tensor, mask=None, return_all_codes: bool = False, inv_temperature: float = 100.0):
        return super().forward(x, mask=mask, return_all_codes=return_all_codes, inv_temperature=inv_temperature)
