"""Lookup-free quantization (MAGVIT-v2, arXiv 2310.05737) and binary spherical quantization
(BSQ, arXiv 2406.07548, `spherical=True`).

Each code dimension is quantized to its sign; the code index is the bit pattern (most
significant bit first). The entropy loss is exact over all 2^d codes at O(N·d + 2^d) memory
(lfq_entropy_loss.py, over kernels/lfq_entropy.py's code mass): no N x 2^d tensor, no
probability clamping.
"""

from __future__ import annotations

import math
import numbers
from collections import namedtuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_indices, check_positive_int
from ..codebook_losses import masked_mse
from ..lfq_entropy_loss import lfq_entropy
from ..non_finite import NO_CODE, fill_tokens
from ..precision import fp32_island, project
from ..straight_through import straight_through
from .token_quantizer import Core, TokenQuantizer, check_keep_num_codebooks_dim

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


class LFQ(TokenQuantizer):
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

    The bit values (2^(d-1), ..., 1) are the buffer `bit_values`, saved under the peer's name
    `mask` (its persistent buffer of the same values), so checkpoints load both ways strictly.
    """

    per_sample_mask = True

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
        keep_num_codebooks_dim = check_keep_num_codebooks_dim(keep_num_codebooks_dim, num_codebooks)
        if not 0 < frac_per_sample_entropy <= 1:
            raise ValueError(f"frac_per_sample_entropy: expected a value in (0, 1], got {frac_per_sample_entropy}")
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError(
                f"soft_clamp_input_value: expected >= codebook_scale={codebook_scale}, got {soft_clamp_input_value}"
            )

        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.num_codebooks, self.keep_num_codebooks_dim = num_codebooks, keep_num_codebooks_dim
        self.channel_first = channel_first
        self.entropy_loss_weight, self.commitment_loss_weight = entropy_loss_weight, commitment_loss_weight
        self.diversity_gamma, self.codebook_scale = diversity_gamma, codebook_scale
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.soft_clamp_input_value = soft_clamp_input_value
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset
        self.spherical, self.force_quantization_f32 = spherical, force_quantization_f32
        self.activation = straight_through_activation if straight_through_activation is not None else nn.Identity()
        self.process_group = process_group

        cosine_scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
        make_cosine = lambda: CosineSimLinear(dim, codebook_dims, scale=cosine_scale)  # noqa: E731
        self._init_projections(dim, codebook_dims, has_projections, projection_has_bias,
                               make_project_in=make_cosine if cosine_sim_project_in else None)
        # the value of each bit in an index, most significant first
        self.register_buffer("bit_values", 2 ** torch.arange(codebook_dim - 1, -1, -1, dtype=torch.long))
        self._init_rotation(orthogonal_rotation, codebook_dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, "
            f"spherical={self.spherical}, entropy_loss_weight={self.entropy_loss_weight}"
        )

    # checkpoints: the bit values under the peer's key

    @property
    def mask(self) -> Tensor:
        """The bit values under vector-quantize-pytorch's name (and this layer's state-dict key)."""
        return self.bit_values

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "mask"] = destination.pop(prefix + "bit_values")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "mask" in state_dict:  # (a copy of the caller's dict)
            state_dict[prefix + "bit_values"] = state_dict.pop(prefix + "mask")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        ours, saved = prefix + "bit_values", prefix + "mask"  # errors name the checkpoint's key
        missing_keys[:] = [saved if key == ours else key for key in missing_keys]
        error_msgs[:] = [message.replace(f" {ours}:", f" {saved}:") for message in error_msgs]

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
        value = self.code_value
        return bits.to(torch.float32) * (2 * value) - value  # exact: 2v - v = v

    @fp32_island
    def _core(self, z: Tensor, keep: Tensor | None, inv_temperature: float) -> Core:
        """z (b, n, c*d) fp32, keep (b, n) or None -> codes (b, n, c*d), indices (b, n, c) (-1
        where masked), losses (aux loss, LossBreakdown) over the kept tokens (fp32 scalars).

        The kept tokens are selected in place (weights, not boolean indexing): no host sync.
        """
        if not inv_temperature > 0:
            raise ValueError(f"inv_temperature: expected > 0, got {inv_temperature}")
        if self.soft_clamp_input_value is not None:
            z = (z / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        z = self._rotate(rearrange(z, "b n (c d) -> b n c d", c=self.num_codebooks))
        if self.spherical:
            z = F.normalize(z, dim=-1) * self.codebook_scale
        bits = z > 0
        indices = (bits.long() * self.bit_values).sum(-1)
        if keep is not None:
            indices = indices.masked_fill(~keep.unsqueeze(-1), NO_CODE)
        codes = self._bits_to_codes(bits)
        zero = z.new_zeros(())
        per_sample = batch = commitment = aux_loss = zero
        if self.training:
            quantized = straight_through(codes, project(self.activation, z))  # its params may be bf16
            kept = rearrange(keep, "b n -> (b n)") if keep is not None else None
            # softmax over codes of 2 T <z, code> factorizes into bits: logit_i = 4 T |code| z_i
            logits = rearrange(z, "b n c d -> (b n) c d") * (4 * inv_temperature * self.code_value)
            # the global batch's entropy when gradients flow; under no_grad this rank's alone, so
            # that no_grad forwards (a GAN's discriminator step) issue no collective
            per_sample, batch = lfq_entropy(logits, self.process_group, sync=torch.is_grad_enabled(), keep=kept)
            entropy_loss = per_sample - self.diversity_gamma * batch
            if self.experimental_softplus_entropy_loss:
                entropy_loss = F.softplus(entropy_loss + self.entropy_loss_offset)
            aux_loss = entropy_loss * self.entropy_loss_weight
            if self.commitment_loss_weight > 0:
                commitment, _ = masked_mse(rearrange(z, "b n c d -> b n (c d)"),
                                           rearrange(codes, "b n c d -> b n (c d)"), keep)
                aux_loss = aux_loss + commitment * self.commitment_loss_weight
        else:  # no losses in eval (zeros, as the peer's)
            quantized = codes
        quantized = rearrange(self._rotate_back(quantized), "b n c d -> b n (c d)")
        return Core(quantized, indices, (aux_loss, LossBreakdown(per_sample, batch, commitment)))

    def forward(self, x: Tensor, inv_temperature: float = 100.0, return_loss_breakdown: bool = False, mask=None):
        result = self.quantize_tokens(x, mask, inv_temperature=inv_temperature)
        aux_loss, breakdown = result.losses
        ret = Return(result.out, result.indices, aux_loss)
        return (ret, breakdown) if return_loss_breakdown else ret

    def indices_to_raw_codes(self, indices: Tensor, checked: bool = False) -> Tensor:
        """indices (...) -> codes (..., d), fp32, rotated back, before projection; zeros for -1.
        `checked`: the caller read their range already (a residual layer: all stages at once)."""
        check_indices(indices, self.codebook_size, allow_dropped=True, values=not checked)
        codes = self._bits_to_codes((indices.long().unsqueeze(-1) & self.bit_values) != 0)
        return self._rotate_back(fill_tokens(codes, indices == NO_CODE, 0.0))

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices (b, ...[, c]) -> codes (b, ..., dim) (channel-first for images/video).

        fp32, or the projection's dtype when projected. Index -1 (no code) decodes as the other
        layers decode it: a codebook's -1 contributes zeros, and a token whose every index is -1
        decodes to zeros.
        """
        return self._decode(indices, self.indices_to_raw_codes, project_out)

    @property
    def codebook(self) -> Tensor:
        """All codes (codebook_size, d) before rotation, fp32, built on demand (refused when too large)."""
        self._check_buildable("codebook")
        all_codes = torch.arange(self.codebook_size, device=self.bit_values.device)
        return self._bits_to_codes((all_codes.unsqueeze(-1) & self.bit_values) != 0)
