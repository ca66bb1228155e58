"""Residual SimVQ: SoundStream's residual quantization (arXiv 2107.03312, Algorithm 1) with a
SimVQ stage (arXiv 2411.02038) per quantizer, a drop-in for vector-quantize-pytorch's
ResidualSimVQ. The stage loop, quantize dropout and decoding are residual.py's."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_indices
from .residual import ResidualQuantizer, sum_stages
from .sim_vq import SimVQ


class ResidualSimVQ(ResidualQuantizer):
    """Residual quantization with SimVQ stages: stage k quantizes what stages < k left.

    Shapes:
        forward(x): x (b, ..., dim), or (b, dim, ...) with channel_first
            -> (quantized like x in x's dtype, indices (b, ..., q) int64, losses (q,) fp32
                [, all_codes (q, b, ..., dim) (or (q, b, dim, ...)) in x's dtype with
                return_all_codes]).
        Quantize dropout (training with gradients) keeps stages 0..k for a k drawn alike on
        every rank; dropped stages get index -1, zero codes and zero loss. Every stage of a
        token whose input is not finite gets -1, its output is NaN, the losses NaN.
        get_codes_from_indices(indices (b, ..., q'), q' <= q, -1 = dropped) -> (q, b, ..., dim)
        fp32; get_output_from_indices -> their sum (b, ..., dim), in eval exactly forward's output.

    Each stage has its own frozen codebook and map; a `codebook_transform` module given in
    `sim_vq_kwargs` is shared by all stages (as in vector-quantize-pytorch).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool = False,
        rotation_trick: bool = True,
        process_group=None,
        **sim_vq_kwargs,
    ):
        if heads != 1:
            raise ValueError(f"heads: ResidualSimVQ supports 1 (multi-headed codes are not residual), got {heads!r}")
        super().__init__(dim, dim, num_quantizers, quantize_dropout, quantize_dropout_cutoff_index,
                         quantize_dropout_multiple_of, process_group)
        self.channel_first = channel_first
        # the stages see (b, n, dim) tokens: the layout is the outer layer's
        self.layers = nn.ModuleList(
            SimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=rotation_trick, process_group=process_group,
                  **sim_vq_kwargs)
            for _ in range(num_quantizers)
        )
        self.codebook_size = self.layers[0].codebook_size

    def _synced_owners(self, stages: bool = True) -> list:
        return super()._synced_owners() + [owner for layer in self.layers if stages for owner in layer.synced_owners()]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_size={self.codebook_size}, "
                f"channel_first={self.channel_first}, quantize_dropout={self.quantize_dropout}")

    @property
    def codebooks(self) -> Tensor:
        """The implicit codebooks (q, codebook_size, dim)."""
        return torch.stack([layer.codebook for layer in self.layers])

    def _stage(self, k: int, residual: Tensor, active, keep: None) -> tuple[Tensor, Tensor, Tensor]:
        # a dropped stage's outputs and loss are masked by run_stages
        layer = self.layers[k]
        return layer.quantize(residual, codebook=layer.codebook)

    def _stage_parameters(self, k: int) -> list:
        return list(self.layers[k].parameters())

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        result = self.quantize_tokens(x, seed=rand_quantize_dropout_fixed_seed)
        ret = (result.out, result.indices, result.losses)
        return (*ret, self._codes_layout(self._all_codes(result))) if return_all_codes else ret

    # decoding

    def _codes_layout(self, codes: Tensor) -> Tensor:
        return rearrange(codes, "q b ... d -> q b d ...") if self.channel_first and codes.ndim > 3 else codes

    def _checked_codes(self, indices: Tensor) -> Tensor:
        check_indices(indices, self.codebook_size, allow_dropped=True, values=False)  # (values: stage_codes)
        if indices.ndim < 2:
            raise ValueError(f"indices: expected (b, ..., q), got shape {tuple(indices.shape)}")
        return self._stage_codes(indices.long())

    def _lookup_stage(self, k: int, indices: Tensor) -> Tensor:
        return self.layers[k].lookup(indices)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (b, ..., q'), q' <= q, -1 = dropped -> each stage's codes (q, b, ..., dim) fp32
        (q, b, dim, ... with channel_first); missing stages count as dropped."""
        return self._codes_layout(self._checked_codes(indices))

    def get_output_from_indices(self, indices: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """indices as forward returns them -> the output forward gave (bitwise, in eval); float32
        unless `dtype` is given."""
        out = sum_stages(self._checked_codes(indices))
        out = out if dtype is None else out.to(dtype)
        return rearrange(out, "b ... d -> b d ...") if self.channel_first and out.ndim > 2 else out
