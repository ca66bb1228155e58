"""Lookup-free quantization (MAGVIT-v2, arXiv 2310.05737) and binary spherical quantization
(BSQ, arXiv 2406.07548, `spherical=True`).

Each code dimension is quantized to its sign; the code index is the bit pattern (most
significant bit first). The entropy loss is exact over all 2^d codes at O(N·d + 2^d) memory
(kernels/lfq_entropy.py): no N x 2^d tensor, no probability clamping.
"""

from __future__ import annotations

import math
import numbers
from collections import namedtuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..checks import MAX_MATERIALIZED_ELEMENTS, check_codebook_axis, check_indices, check_positive_int
from ..lfq_entropy_loss import lfq_entropy
from ..layout import check_mask, from_tokens, indices_from_tokens, to_tokens, without_padding
from ..non_finite import NO_CODE, fill_tokens, mark_losses, mark_non_finite, non_finite_tokens
from ..precision import Fp32BuffersModule, fp32_island, project
from ..straight_through import straight_through
from ..usage import CodeUsage, code_usage
from ..codebook_losses import masked_mse

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])

# without codebook_size, dim bits make one 2^dim codebook up to this many bits (as in
# vector-quantize-pytorch); beyond, int64 indices and a 2^dim entropy accumulator are out of
# reach, so the bits are split into codebooks of at most DEFAULT_SPLIT_BITS bits each
MAX_DEFAULT_CODEBOOK_BITS = 24
DEFAULT_SPLIT_BITS = 16


def default_codebooks(dim: int, num_codebooks: int) -> tuple[int, int]:
    """(codebook_size, num_codebooks) when only dim is given.

    Up to MAX_DEFAULT_CODEBOOK_BITS: 2^dim codes per codebook, as vector-quantize-pytorch.
    Beyond, with one codebook: the dim signs split into codebooks of at most
    DEFAULT_SPLIT_BITS bits, e.g. LFQ(dim=256) -> 16 codebooks of 2^16.
    """
    if dim <= MAX_DEFAULT_CODEBOOK_BITS:
        return 2**dim, num_codebooks
    if num_codebooks != 1:
        raise ValueError(f"codebook_size: needed with dim={dim} and num_codebooks={num_codebooks} "
                         f"(2^{dim} codes per codebook cannot be indexed), got None")
    split = max(b for b in range(1, DEFAULT_SPLIT_BITS + 1) if dim % b == 0)
    return 2**split, dim // split


class CosineSimLinear(nn.Module):
    """x -> normalize(x) @ normalize(weight, over inputs) * scale; weight (dim_in, dim_out)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0) * self.scale


def check_codebook_size(codebook_size) -> int:
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, numbers.Integral) or codebook_size < 2:
        raise ValueError(f"codebook_size: expected a power of two >= 2, got {codebook_size!r}")
    if codebook_size & (codebook_size - 1):
        suggestion = 2 ** math.ceil(math.log2(codebook_size))
        raise ValueError(f"codebook_size: expected a power of two, got {codebook_size} (try {suggestion})")
    return int(codebook_size)


class LFQ(Fp32BuffersModule):
    """Lookup-free quantizer with an exact entropy loss.

    Shapes:
        forward(x): x (b, n, dim) | (b, dim) | (b, dim, h, w) | (b, dim, t, h, w) (channel-first
            when channel_first, or by default for 4+ dims); mask bool, True = keep: (b,) keeps or
            drops whole samples (as the peer), (b, n) or (b, ...spatial) single tokens
            -> Return(quantized like x in x's dtype, indices (b, ...[, c]) int64, aux loss fp32),
               and LossBreakdown(per_sample_entropy, batch_entropy, commitment) with
               return_loss_breakdown. A kept token whose input is not finite gets index -1 and
               a NaN output, and the losses are NaN (docs/precision.md).

    Masked tokens (and every token of a dropped sample) count nowhere: the losses are those of
    the kept tokens alone (the codebook entropy over the kept tokens of all ranks), an all-False
    mask gives zero losses; they get index -1 and output zeros (what indices_to_codes gives for
    -1), and no gradient. No host sync: a masked forward compiles with fullgraph=True.

    `LFQ(dim=256)` without codebook_size quantizes all 256 signs: as one index cannot hold 256
    bits, they form num_codebooks=16 codebooks of 2^16 codes (indices (b, n, 16)), each with its
    exact entropy; the peer crashes there. Up to 24 bits, dim alone gives 2^dim codes per
    codebook, as in the peer.

    The entropies are exact means over all 2^d codes (vector-quantize-pytorch clamps
    probabilities at 1e-5 and can only afford them at small d); `frac_per_sample_entropy` is
    accepted for compatibility and has no effect, as nothing needs sub-sampling.
    """

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        straight_through_activation: nn.Module | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        channel_first: bool | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
        process_group=None,
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("dim, codebook_size: LFQ needs at least one of them, got neither")
        num_codebooks = check_positive_int("num_codebooks", num_codebooks)
        if codebook_size is None:
            codebook_size, num_codebooks = default_codebooks(check_positive_int("dim", dim), num_codebooks)
        codebook_size = check_codebook_size(codebook_size)
        codebook_dim = int(math.log2(codebook_size))
        codebook_dims = codebook_dim * num_codebooks
        dim = codebook_dims if dim is None else check_positive_int("dim", dim)
        has_projections = dim != codebook_dims if has_projections is None else has_projections
        if not has_projections and dim != codebook_dims:
            raise ValueError(
                f"dim: without projections dim must equal log2(codebook_size) * num_codebooks = "
                f"{codebook_dims}, got {dim}"
            )
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError(f"keep_num_codebooks_dim: must be True with num_codebooks={num_codebooks} > 1")
        if not 0 < frac_per_sample_entropy <= 1:
            raise ValueError(f"frac_per_sample_entropy: expected a value in (0, 1], got {frac_per_sample_entropy}")
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError(
                f"soft_clamp_input_value: expected >= codebook_scale={codebook_scale}, got {soft_clamp_input_value}"
            )

        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.num_codebooks, self.keep_num_codebooks_dim = num_codebooks, keep_num_codebooks_dim
        self.has_projections, self.channel_first = has_projections, channel_first
        self.entropy_loss_weight, self.commitment_loss_weight = entropy_loss_weight, commitment_loss_weight
        self.diversity_gamma, self.codebook_scale = diversity_gamma, codebook_scale
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.soft_clamp_input_value = soft_clamp_input_value
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset
        self.spherical, self.force_quantization_f32 = spherical, force_quantization_f32
        self.activation = straight_through_activation if straight_through_activation is not None else nn.Identity()
        self.process_group = process_group

        if has_projections:
            if cosine_sim_project_in:
                scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
                self.project_in = CosineSimLinear(dim, codebook_dims, scale=scale)
            else:
                self.project_in = nn.Linear(dim, codebook_dims, bias=projection_has_bias)
            self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

        # value of each bit in an index, most significant first; persistent under the peer's name
        # so its checkpoints load strictly
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1, dtype=torch.long))

        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            self.register_fp32_buffer("orthogonal_rot", nn.init.orthogonal_(torch.empty(codebook_dim, codebook_dim)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, "
            f"spherical={self.spherical}, entropy_loss_weight={self.entropy_loss_weight}"
        )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype codes are computed in (the peer's `codebook.dtype`): always float32 here."""
        return torch.float32

    # numerics (fp32)

    @property
    def code_value(self) -> float:
        """|code| per dimension: codebook_scale, or codebook_scale / sqrt(d) on the sphere."""
        return self.codebook_scale / math.sqrt(self.codebook_dim) if self.spherical else self.codebook_scale

    def _bits_to_codes(self, bits: Tensor) -> Tensor:
        """bits (..., d) in {0, 1} -> codes (..., d) = +-code_value, fp32."""
        return (bits.to(torch.float32) * 2 - 1) * self.code_value

    @fp32_island
    def _quantize(self, z: Tensor, mask: Tensor | None, inv_temperature: float):
        """z (b, n, c*d) fp32, mask (b, n) or None -> codes (b, n, c*d), indices (b, n, c) (-1
        where masked), losses over the kept tokens (fp32 scalars).

        The kept tokens are selected in place (weights, not boolean indexing): no host sync.
        """
        if self.soft_clamp_input_value is not None:
            z = (z / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        z = rearrange(z, "b n (c d) -> b n c d", c=self.num_codebooks)
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot
        if self.spherical:
            z = F.normalize(z, dim=-1) * self.codebook_scale
        bits = z > 0
        indices = (bits.long() * self.mask).sum(-1)
        if mask is not None:
            indices = indices.masked_fill(~mask.unsqueeze(-1), -1)
        codes = self._bits_to_codes(bits)
        zero = z.new_zeros(())
        per_sample = batch = commitment = zero
        if self.training:
            quantized = straight_through(codes, project(self.activation, z))  # its params may be bf16
            keep = rearrange(mask, "b n -> (b n)") if mask is not None else None
            # softmax over codes of 2 T <z, code> factorizes into bits: logit_i = 4 T |code| z_i
            logits = rearrange(z, "b n c d -> (b n) c d") * (4 * inv_temperature * self.code_value)
            # the global batch's entropy when gradients flow; under no_grad this rank's alone, so
            # that no_grad forwards (a GAN's discriminator step) issue no collective
            per_sample, batch = lfq_entropy(logits, self.process_group, sync=torch.is_grad_enabled(), keep=keep)
            if self.commitment_loss_weight > 0:
                commitment, _ = masked_mse(rearrange(z, "b n c d -> b n (c d)"),
                                           rearrange(codes, "b n c d -> b n (c d)"), mask)
        else:
            quantized = codes
        entropy_loss = per_sample - self.diversity_gamma * batch
        if self.training and self.experimental_softplus_entropy_loss:
            entropy_loss = F.softplus(entropy_loss + self.entropy_loss_offset)
        aux_loss = entropy_loss * self.entropy_loss_weight + commitment * self.commitment_loss_weight
        if self.orthogonal_rotation:
            quantized = quantized @ self.orthogonal_rot.t()
        quantized = rearrange(quantized, "b n c d -> b n (c d)")
        return quantized, indices, aux_loss, LossBreakdown(per_sample, batch, commitment)

    def forward(self, x: Tensor, inv_temperature: float = 100.0, return_loss_breakdown: bool = False, mask=None):
        dtype = x.dtype
        channel_first = self.channel_first if self.channel_first is not None else x.ndim >= 4
        tokens, spatial = to_tokens(x, channel_first, self.dim, "LFQ")
        mask = check_mask(mask, tokens, spatial, per_sample=True)
        if not inv_temperature > 0:
            raise ValueError(f"inv_temperature: expected > 0, got {inv_temperature}")
        bad = non_finite_tokens(tokens, mask)
        quantized, indices, aux_loss, breakdown = self._quantize(project(self.project_in, without_padding(tokens, mask)), mask,
                                                                 inv_temperature)
        out = project(self.project_out, quantized)
        if mask is not None:  # masked tokens (index -1): zeros, as indices_to_codes decodes -1
            out = torch.where(mask.unsqueeze(-1), out, 0.0)
        out = from_tokens(mark_non_finite(out.to(dtype), bad), spatial, channel_first)
        indices = indices_from_tokens(mark_non_finite(indices, bad), spatial)
        aux_loss = mark_losses(aux_loss, bad)
        breakdown = LossBreakdown(*(mark_losses(loss, bad) for loss in breakdown))
        if not self.keep_num_codebooks_dim:
            indices = rearrange(indices, "... 1 -> ...")
        ret = Return(out, indices, aux_loss)
        return (ret, breakdown) if return_loss_breakdown else ret

    def _indices_to_raw_codes(self, indices: Tensor) -> Tensor:
        """indices (...) -> codes (..., d), fp32, rotated back, before projection; zeros for -1."""
        check_indices(indices, self.codebook_size, allow_dropped=True)
        codes = self._bits_to_codes((indices.long().unsqueeze(-1) & self.mask) != 0)
        codes = fill_tokens(codes, indices == NO_CODE, 0.0)
        return codes @ self.orthogonal_rot.t() if self.orthogonal_rotation else codes

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices (b, ...[, c]) -> codes (b, ..., dim) (channel-first for images/video).

        fp32, or the projection's dtype when projected. Index -1 (no code) decodes as the other
        layers decode it: a codebook's -1 contributes zeros, and a token whose every index is -1
        decodes to zeros.
        """
        check_codebook_axis(indices, self.keep_num_codebooks_dim, self.num_codebooks)
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        channel_first = self.channel_first if self.channel_first is not None else is_img_or_video
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = rearrange(self._indices_to_raw_codes(indices), "... c d -> ... (c d)")
        if project_out:
            codes = fill_tokens(project(self.project_out, codes), (indices == NO_CODE).all(-1), 0.0)
        return rearrange(codes, "b ... d -> b d ...") if channel_first else codes

    @property
    def codebook(self) -> Tensor:
        """All codes (codebook_size, d) before rotation, fp32, built on demand (refused when too large)."""
        if self.codebook_size * self.codebook_dim > MAX_MATERIALIZED_ELEMENTS:
            raise ValueError(f"codebook: {self.codebook_size} codes x {self.codebook_dim} dims is too large to "
                             "build; call indices_to_codes on the indices you need instead")
        all_codes = torch.arange(self.codebook_size, device=self.mask.device)
        return self._bits_to_codes((all_codes.unsqueeze(-1) & self.mask) != 0)

    def code_usage(self, indices: Tensor, process_group=None) -> CodeUsage:
        """Perplexity and fraction of the codebook used by `indices` (all codebooks pooled)."""
        group = process_group if process_group is not None else self.process_group
        return code_usage(indices, self.codebook_size, group)
