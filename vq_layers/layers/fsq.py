"""Finite scalar quantization (Mentzer et al. 2023, https://arxiv.org/abs/2309.15505).

Each of the d code dimensions is bounded and rounded to one of L_i levels; the codebook is the
implicit grid of prod(L_i) points, never stored. Bound and round run in an fp32 island, so the
chosen codes do not depend on module dtype, input dtype or autocast.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from ..checks import check_positive_int
from ..mixed_radix import digits_to_indices, indices_to_digits, register_mixed_radix
from ..non_finite import NO_CODE, fill_tokens, mark_non_finite, non_finite_tokens
from ..precision import fp32_island
from ..straight_through import straight_through
from .token_quantizer import Core, TokenQuantizer, check_keep_num_codebooks_dim

# the paper's recommended levels per codebook size (Table 1 of the FSQ paper)
RECOMMENDED_LEVELS = {
    2**8: (8, 6, 5),
    2**10: (8, 5, 5, 5),
    2**12: (7, 5, 5, 5, 5),
    2**14: (8, 8, 8, 6, 5),
    2**16: (8, 8, 8, 5, 5, 5),
}


def check_levels(levels) -> list[int]:
    """Validates `levels`: a non-empty sequence of integers >= 2."""
    if isinstance(levels, Tensor) or type(levels).__module__ == "numpy":
        levels = levels.tolist()
    if not isinstance(levels, Sequence) or isinstance(levels, str) or len(levels) == 0:
        raise ValueError(f"levels: expected a non-empty list of integers >= 2, got {levels!r}")
    checked = []
    for level in levels:
        integral = isinstance(level, numbers.Integral) or (
            isinstance(level, numbers.Real) and float(level).is_integer()
        )
        if isinstance(level, bool) or not integral or level < 2:
            raise ValueError(f"levels: expected integers >= 2, got {list(levels)!r}")
        checked.append(int(level))
    return checked


class FSQ(TokenQuantizer):
    """Finite scalar quantizer.

    Args (vector-quantize-pytorch's, plus no surprises):
        levels: levels per code dimension, e.g. [8, 5, 5, 5] (codebook_size = prod(levels)).
        dim: feature dim of the input; projections in/out are added when it differs from
            len(levels) * num_codebooks.
        num_codebooks: independent FSQ codes per token, each over `levels`.
        keep_num_codebooks_dim: keep a trailing codebook axis on indices (default:
            num_codebooks > 1).
        channel_first: inputs are (b, d, n) sequences. Inputs with 4+ dims (images (b, d, h, w),
            video (b, d, t, h, w)) are always channel-first.
        preserve_symmetry: symmetric grid on [-1, 1] (arXiv 2411.19842, Sec. 3.2).
        noise_dropout: in training, this fraction of code values is replaced by code + U(-.5, .5)
            (clamped to [-1, 1]); indices are taken before the noise.
        bound_hard_clamp: clamp to [-1, 1] instead of tanh.
        orthogonal_rotation: rotate codes by a fixed random orthogonal matrix.
        force_quantization_f32, allowed_dtypes, scale: accepted for compatibility; quantization
            always runs in float32 here.

    Shapes:
        forward(z): z (b, n, dim) | (b, dim) | (b, dim, n) with channel_first |
            (b, dim, h, w) | (b, dim, t, h, w)
            -> (quantized like z in z's dtype, indices (b, ...) int64 [, num_codebooks axis]).
        A token whose input is not finite gets index -1 (every codebook) and a NaN output
        (docs/precision.md); indices_to_codes decodes -1 to zeros.
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes=(torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
    ):
        super().__init__()
        levels = check_levels(levels)
        if 2 in levels and not preserve_symmetry:
            # the default grid's shift atanh(0.5 / 0.5005) = 3.8 puts the boundary at z = -3.8:
            # nearly every input lands on one code and tanh is saturated there
            raise ValueError(f"levels: a level of 2 needs preserve_symmetry=True, got levels={levels}")
        if not isinstance(noise_dropout, (int, float)) or not 0.0 <= noise_dropout <= 1.0:
            raise ValueError(f"noise_dropout: expected a probability in [0, 1], got {noise_dropout!r}")
        num_codebooks = check_positive_int("num_codebooks", num_codebooks)

        self.levels = levels
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = check_keep_num_codebooks_dim(keep_num_codebooks_dim, num_codebooks)
        self.dim = self.effective_codebook_dim if dim is None else check_positive_int("dim", dim)
        # int64 levels and mixed-radix basis: dtype casts never touch them, indices stay exact
        self.codebook_size = register_mixed_radix(self, levels)

        self.scale = scale
        self.channel_first = channel_first
        self.return_indices = return_indices
        self.force_quantization_f32 = force_quantization_f32
        self.allowed_dtypes = allowed_dtypes
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.bound_hard_clamp = bound_hard_clamp

        self._init_projections(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
        self._init_rotation(orthogonal_rotation, self.codebook_dim)

    @staticmethod
    def levels_for(codebook_size: int) -> list[int]:
        """The FSQ paper's recommended levels for a codebook size (2^8, 2^10, ..., 2^16)."""
        if codebook_size not in RECOMMENDED_LEVELS:
            sizes = ", ".join(f"2**{int(math.log2(k))}" for k in RECOMMENDED_LEVELS)
            raise ValueError(f"codebook_size: expected one of {sizes}, got {codebook_size}")
        return list(RECOMMENDED_LEVELS[codebook_size])

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, dim={self.dim}, num_codebooks={self.num_codebooks}, "
            f"codebook_size={self.codebook_size}, preserve_symmetry={self.preserve_symmetry}"
        )

    # numerics: level index l in [0, L) <-> code value in [-1, 1] (affine, per dimension)

    def _levels_f32(self) -> Tensor:
        return self._levels.to(torch.float32)

    def _half_width(self) -> Tensor:
        return torch.div(self._levels, 2, rounding_mode="floor").to(torch.float32)

    def _level_to_code(self, level: Tensor) -> Tensor:
        levels = self._levels_f32()
        if self.preserve_symmetry:
            return level * (2.0 / (levels - 1)) - 1.0
        return (level - self._half_width()) / self._half_width()

    def _code_to_level(self, code: Tensor) -> Tensor:
        levels = self._levels_f32()
        if self.preserve_symmetry:
            return (code + 1.0) / (2.0 / (levels - 1))
        return code * self._half_width() + self._half_width()

    def _squash(self, t: Tensor) -> Tensor:
        return t.clamp(-1.0, 1.0) if self.bound_hard_clamp else torch.tanh(t)

    def _bound(self, z: Tensor) -> Tensor:
        """The paper's bound, in level units centred on zero: half_l * tanh(z + shift) - offset,
        half_l = (L - 1)(1 + eps) / 2 with eps = 1e-3, offset = 1/2 for even L (its levels are
        then -L/2 .. L/2 - 1) and shift = atanh(offset / half_l), so that z = 0 maps to level 0
        (vector-quantize-pytorch's eps sign and atanh; the paper's listing has 1 - eps and tan).
        bound_hard_clamp: clamp to [-1, 1] instead of tanh, and shift = offset / half_l."""
        half_l = (self._levels_f32() - 1) * (1 + 1e-3) / 2
        offset = (self._levels % 2 == 0).to(torch.float32) * 0.5
        shift = offset / half_l if self.bound_hard_clamp else torch.atanh(offset / half_l)
        return self._squash(z + shift) * half_l - offset

    def _level_index(self, level: Tensor) -> Tensor:
        """Integer level index as float -> clamped to [0, L): NaN (a non-finite input, which
        forward marks: non_finite.py) becomes 0, keeping the integer arithmetic in range."""
        return torch.minimum(level.nan_to_num(0.0).clamp(min=0.0), self._levels_f32() - 1)

    def _symmetric_grid(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """preserve_symmetry (arXiv 2411.19842, Sec. 3.2): L levels spaced evenly on [-1, 1].
        The position (L - 1)(squash(z) + 1) / 2 in [0, L - 1] is rounded half up, with a
        straight-through gradient, and normalized to [-1, 1]. -> (codes, level index)."""
        position = (self._levels_f32() - 1) * (self._squash(z) + 1) / 2
        level = self._level_index(torch.floor(position + 0.5))
        return self._level_to_code(straight_through(level, position)), level

    @fp32_island
    def _core(self, z: Tensor, keep: None = None) -> Core:
        """z (b, n, c*d) fp32 -> codes (b, n, c*d) fp32 with straight-through grad, indices (b, n, c).

        The paper's quantizer (its appendix A.1), per code dimension of L levels:
            bound:      zb = half_l * tanh(z + shift) - offset     (_bound)
            round:      zq = round(zb), straight-through           (an integer level)
            normalize:  code = zq / (L // 2)                       (in [-1, 1])
        the index digit of zq being zq + L // 2. preserve_symmetry takes _symmetric_grid instead.
        """
        z = self._rotate(rearrange(z, "b n (c d) -> b n c d", c=self.num_codebooks))
        if self.preserve_symmetry:
            codes, level = self._symmetric_grid(z)
        else:
            half_width = self._half_width()
            bounded = self._bound(z)
            level = self._level_index(torch.round(bounded) + half_width)
            codes = straight_through(level - half_width, bounded) / half_width
        indices = digits_to_indices(level, self._basis)
        if self.training and self.noise_dropout > 0:
            noisy = torch.rand_like(codes) < self.noise_dropout
            codes = torch.where(noisy, codes + torch.rand_like(codes) - 0.5, codes).clamp(-1.0, 1.0)
        return Core(rearrange(self._rotate_back(codes), "b n c d -> b n (c d)"), indices)

    def _channel_first(self, x: Tensor) -> bool:
        return x.ndim >= 4 or bool(self.channel_first)  # images and video always

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        result = self.quantize_tokens(z)
        return result.out, result.indices if self.return_indices else None

    # indices <-> codes

    def indices_to_level_indices(self, indices: Tensor, checked: bool = False) -> Tensor:
        """indices (...) -> level index per code dimension (..., d), int64 (-1 for index -1)."""
        return indices_to_digits(indices, self._basis, self._levels, self.codebook_size, checked)

    def indices_to_raw_codes(self, indices: Tensor, checked: bool = False) -> Tensor:
        """indices (...) -> codes (..., d) in fp32, before rotation and projection; zeros for -1.
        `checked`: the caller read their range already (a residual layer: all stages at once)."""
        level = self.indices_to_level_indices(indices, checked)
        return fill_tokens(self._level_to_code(level.to(torch.float32)), level[..., 0] == NO_CODE, 0.0)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """codes (..., d) on the grid -> indices (...), int64 (exact for any codebook size); -1
        for a non-finite code (what forward outputs for non-finite input)."""
        if codes.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"codes: expected last dim {self.codebook_dim} (len(levels)), got {codes.shape[-1]}"
            )
        level = self._code_to_level(codes.float()).round().nan_to_num(0.0, 0.0, 0.0)
        return mark_non_finite(digits_to_indices(level, self._basis), non_finite_tokens(codes))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (b, ...[, c]) -> codes (b, ..., dim) (channel-first for images/video).

        The result is float32, or the projection's dtype when there are projections. Index -1
        (no code) decodes as the other layers decode it: a codebook's -1 contributes zeros, and
        a token whose every index is -1 decodes to zeros.
        """
        return self._decode(indices, lambda i: self._rotate_back(self.indices_to_raw_codes(i)))

    @property
    def implicit_codebook(self) -> Tensor:
        """All codebook_size codes (codebook_size, len(levels)), fp32, built on demand."""
        self._check_buildable("implicit_codebook")
        return self.indices_to_raw_codes(torch.arange(self.codebook_size, device=self._levels.device))
