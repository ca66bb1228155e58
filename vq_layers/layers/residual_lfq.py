"""Residual LFQ: stage k is an LFQ with codes +-2^-k quantizing the residual of stages < k."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .lfq import LFQ, check_codebook_size
from .residual import GroupedResidual, ResidualQuantizer


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

    per_sample_mask = True

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

    def _stage(self, k: int, residual: Tensor, active, keep: Tensor | None, inv_temperature: float):
        # a whole LFQ forward (a dropped stage's outputs and loss are masked by run_stages)
        return self.layers[k](residual, mask=keep, inv_temperature=inv_temperature)

    def forward(self, x: Tensor, mask=None, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | None = None, inv_temperature: float = 100.0):
        result = self.quantize_tokens(x, mask, seed=rand_quantize_dropout_fixed_seed, inv_temperature=inv_temperature)
        ret = (result.out, result.indices, result.losses)
        return (*ret, self._all_codes(result)) if return_all_codes else ret

    def _lookup_stage(self, k: int, indices: Tensor) -> Tensor:
        return self.layers[k].indices_to_raw_codes(indices, checked=True)


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
