"""Finite scalar perturbation (FSP, VP-VAE, arXiv 2602.17133).

Each code dimension is mapped to [0, 1] by a CDF activation and falls into one of L_i equal
bins; the quantized value is the bin's midpoint. In training, a fraction 1 - quantize_rate of
the scalars is instead perturbed uniformly within half a bin (a proposal leaving (0, 1) is
rejected: the scalar keeps its activation). A VectorNorm loss pulls the batch's mean, variance,
skewness and kurtosis towards targets. Activations, bins, inverses and statistics run in an
fp32 island.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..checks import check_positive_int
from ..mixed_radix import digits_to_indices, indices_to_digits, register_mixed_radix
from ..non_finite import NO_CODE, fill_tokens, mark_non_finite
from ..precision import fp32_island
from ..straight_through import straight_through
from .fsq import check_levels
from .token_quantizer import Core, TokenQuantizer

UNIFORM_STD = 12**-0.5  # std of U(0, 1): bin midpoints are rescaled by it to unit variance
FP32_EPS = torch.finfo(torch.float32).eps  # the default eps: the island computes in fp32
BELOW_ONE = 1.0 - 2.0**-24  # the largest fp32 value below 1


# CDF activations R -> [0, 1] and their inverses (0, 1) -> R, written for fp32 accuracy in the
# tails (sigmoid(2z) = (tanh z + 1) / 2 and erfc keep small probabilities relative-accurate).
# Named functions, not lambdas: modules stay picklable.
def _tanh_cdf(z: Tensor) -> Tensor:
    return torch.sigmoid(2.0 * z)


def _tanh_inverse(p: Tensor) -> Tensor:
    return torch.atanh(2.0 * p - 1.0)


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def _normal_inverse(p: Tensor) -> Tensor:
    return torch.erfinv(2.0 * p - 1.0) * math.sqrt(2.0)


def _laplace_cdf(z: Tensor) -> Tensor:
    half_tail = 0.5 * torch.exp(-z.abs())
    return torch.where(z < 0, half_tail, 1.0 - half_tail)


def _laplace_inverse(p: Tensor) -> Tensor:
    return -torch.sign(p - 0.5) * torch.log1p(-2.0 * (p - 0.5).abs())


def _cauchy_cdf(z: Tensor) -> Tensor:
    return torch.atan(z) / math.pi + 0.5


def _cauchy_inverse(p: Tensor) -> Tensor:
    return torch.tan((p - 0.5) * math.pi)


ACTIVATIONS = {
    "tanh": (_tanh_cdf, _tanh_inverse),
    "sigmoid": (torch.sigmoid, torch.logit),
    "normal": (_normal_cdf, _normal_inverse),
    "laplace": (_laplace_cdf, _laplace_inverse),
    "cauchy": (_cauchy_cdf, _cauchy_inverse),
}

# VectorNorm presets: (mean, variance, skewness, kurtosis) targets and weights; "var_<act>"
# targets the activation's natural variance (logistic: pi^2/3, laplace: 2, tanh: pi^2/12)
VECTOR_NORM_PRESETS = {
    "none": {"l1_weight": 0.0, "l2_weight": 0.0, "l3_weight": 0.0, "l4_weight": 0.0},
    "var": {"l3_weight": 0.0, "l4_weight": 0.0},
    "kurt": {},
    "var_tanh": {"l2_target": 0.8225, "l3_weight": 0.0, "l4_weight": 0.0},
    "var_sigmoid": {"l2_target": 3.29, "l3_weight": 0.0, "l4_weight": 0.0},
    "var_laplace": {"l2_target": 2.0, "l3_weight": 0.0, "l4_weight": 0.0},
}


class VectorNorm(nn.Module):
    """Moment-matching loss over a batch of vectors.

    forward(z (n, d)) -> (loss fp32, {"mean", "variance", "skewness", "kurtosis"}: each (d,) fp32):
    loss = sum_j w_j mean_d (moment_j - target_j)^2 with the unbiased variance, std clamped at
    eps, skewness E[s^3] and excess kurtosis E[s^4] - 3 of the standardized s. The moments need
    two vectors: with fewer the loss is zero and the moments NaN.
    """

    def __init__(self, l1_target: float = 0.0, l1_weight: float = 0.1, l2_target: float = 1.0,
                 l2_weight: float = 0.07, l3_target: float = 0.0, l3_weight: float = 0.06,
                 l4_target: float = 0.0, l4_weight: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.targets = (float(l1_target), float(l2_target), float(l3_target), float(l4_target))
        self.weights = (float(l1_weight), float(l2_weight), float(l3_weight), float(l4_weight))
        self.eps = eps

    @classmethod
    def build(cls, name: str) -> VectorNorm:
        if name not in VECTOR_NORM_PRESETS:
            raise ValueError(f"vector_norm: expected one of {sorted(VECTOR_NORM_PRESETS)}, got {name!r}")
        return cls(**VECTOR_NORM_PRESETS[name])

    def extra_repr(self) -> str:
        return f"targets={self.targets}, weights={self.weights}"

    @fp32_island
    def forward(self, z: Tensor) -> tuple[Tensor, dict]:
        mean = z.mean(0)  # two passes; NaN moments for fewer than 2 vectors, without a warning
        variance = (z - mean).square().sum(0) / (z.shape[0] - 1)
        standard = (z - mean) / variance.sqrt().clamp_min(self.eps)
        moments = (mean, variance, standard.pow(3).mean(0), standard.pow(4).mean(0) - 3.0)
        loss = z.new_zeros(())
        if z.shape[0] >= 2:
            for moment, target, weight in zip(moments, self.targets, self.weights):
                if weight != 0:
                    loss = loss + (moment - target).square().mean() * weight
        return loss, dict(zip(("mean", "variance", "skewness", "kurtosis"), moments))


class FSP(TokenQuantizer):
    """Finite scalar perturbation quantizer.

    Args (vector-quantize-pytorch's):
        levels: bins per code dimension (codebook_size = prod(levels)).
        dim: input feature dim; projections in/out when it differs from len(levels).
        channel_first: inputs are (b, dim, ...).
        act_name: CDF activation, one of "tanh", "sigmoid", "normal", "laplace", "cauchy".
        quantize_rate: in training, the probability that a scalar is quantized (otherwise it is
            perturbed within half a bin); eval always quantizes.
        need_inv_act: output the inverse activation of the (quantized or perturbed) value, with
            an identity straight-through gradient; otherwise (value - 1/2) * sqrt(12).
        vector_norm: VectorNorm preset name ("none", "var", "kurt", "var_tanh", "var_sigmoid",
            "var_laplace").

    Shapes:
        forward(z, eps=None): z (..., dim) (or (b, dim, ...) with channel_first)
            -> (q_z like z in z's dtype, indices (...) int64, norm_loss fp32,
                info {"level_indices": (..., d) int64, "norm_info": moments (d,) fp32,
                      "p_accept_prob": fp32 (training with quantize_rate < 1)}).
        A token whose input is not finite gets index -1, level indices -1 and a NaN output;
        the norm loss and the batch statistics in info are then NaN (docs/precision.md).
        With need_inv_act, `eps` clamps a perturbed (or saturated) activation value to
        [eps, 1 - eps] before the inverse (default: float32's machine epsilon, as everything
        here runs in fp32). Bin midpoints (l + 1/2) / L are never clamped, so the output is the
        fp32 computation's for every input dtype and equals `indices_to_codes`. Code values are
        clamped to the input dtype's finite range (Cauchy's inverse exceeds fp16's 65504).
    """

    keep_num_codebooks_dim = False  # one index per token

    def __init__(self, levels: Sequence[int], dim: int | None = None, channel_first: bool = False,
                 projection_has_bias: bool = True, act_name: str = "tanh", quantize_rate: float = 0.0,
                 need_inv_act: bool = False, vector_norm: str = "var_tanh"):
        super().__init__()
        levels = check_levels(levels)
        if act_name not in ACTIVATIONS:
            raise ValueError(f"act_name: expected one of {sorted(ACTIVATIONS)}, got {act_name!r}")
        if (isinstance(quantize_rate, bool) or not isinstance(quantize_rate, (int, float))
                or not 0.0 <= quantize_rate <= 1.0):
            raise ValueError(f"quantize_rate: expected a probability in [0, 1], got {quantize_rate!r}")
        self.levels = levels
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else check_positive_int("dim", dim)
        self.codebook_size = register_mixed_radix(self, levels)
        self.channel_first = channel_first
        self.act_name, self.need_inv_act, self.quantize_rate = act_name, need_inv_act, float(quantize_rate)

        self._init_projections(self.dim, self.codebook_dim, bias=projection_has_bias)
        self.vector_norm = VectorNorm.build(vector_norm)

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, dim={self.dim}, codebook_size={self.codebook_size}, "
                f"act_name={self.act_name!r}, quantize_rate={self.quantize_rate}, need_inv_act={self.need_inv_act}")

    @property
    def act_func(self):
        return ACTIVATIONS[self.act_name][0]

    @property
    def inv_act_func(self):
        return ACTIVATIONS[self.act_name][1]

    # numerics (fp32): activation value in [0, 1] <-> bin (level index)

    def _midpoint(self, level: Tensor) -> Tensor:
        """Level index (..., d) -> bin midpoint (l + 1/2) / L in (0, 1), fp32 (for L > 2^24 the
        top midpoint rounds to 1 in fp32 and is kept just below it)."""
        return ((level + 0.5) / self._levels.to(torch.float32)).clamp(max=BELOW_ONE)

    def _code_value(self, value: Tensor) -> Tensor:
        """Activation-space value (..., d) in (0, 1) -> code value: the inverse activation, or
        (value - 1/2) / std(U(0, 1))."""
        if self.need_inv_act:
            return self.inv_act_func(value)
        return (value - 0.5) / UNIFORM_STD

    @fp32_island
    def _bins(self, act: Tensor) -> tuple[Tensor, Tensor]:
        """act (..., d) in [0, 1] -> (bin midpoints (..., d) fp32 with the straight-through
        gradient of act, level indices (..., d) int64). Bin = floor(act * L), the top edge
        act = 1 in the last bin; NaN -> bin 0."""
        levels = self._levels.to(torch.float32)
        level = torch.minimum(torch.floor(act * levels).nan_to_num(0.0).clamp(min=0.0), levels - 1)
        return straight_through(self._midpoint(level), act), level.long()

    def quantize_act_value(self, act_z: Tensor, eps: float | None = None) -> tuple[Tensor, Tensor]:
        """Activation values act_z (..., d) in [0, 1] -> (their bin midpoints (..., d) in act_z's
        dtype, straight-through gradient; level indices (..., d) int64). `eps` is accepted for
        compatibility: the bins need no clamp (the top edge 1 is in the last bin)."""
        value, level = self._bins(act_z)
        return value.to(act_z.dtype), level

    @fp32_island
    def _quantize(self, z: Tensor, eps: float, limit: float):
        """z (n, d) fp32 -> codes (n, d) in [-limit, limit], level indices (n, d) int64, info."""
        act = self.act_func(z)
        value, level = self._bins(act)
        info = {}
        quantize_rate = self.quantize_rate if self.training else 1.0
        if quantize_rate < 1.0:
            half_bin = 0.5 / self._levels.to(torch.float32)
            proposal = act + (torch.rand_like(act) * 2.0 - 1.0) * half_bin
            accept = (proposal > 0.0) & (proposal < 1.0)
            info["p_accept_prob"] = accept.to(torch.float32).mean()
            perturbed = torch.where(accept, proposal, act)  # a saturated act is 0 or 1
            if self.need_inv_act:
                perturbed = perturbed.clamp(eps, 1.0 - eps)
            value = torch.where(torch.rand_like(act) >= quantize_rate, perturbed, value)
        codes = self._code_value(value).clamp(-limit, limit)
        if self.need_inv_act:  # the gradient goes straight to z
            codes = straight_through(codes, z)
        return codes, level, info

    def _core(self, z: Tensor, keep: None = None, eps: float | None = None, input_dtype=None) -> Core:
        """z (b, n, d) -> codes (b, n, d) fp32, indices (b, n, 1), losses (norm loss, its moments,
        info), extra: level indices (b, n, d). The VectorNorm statistics and the bins are fp32
        islands of their own."""
        if not eps:  # None or 0, as the peer
            eps = FP32_EPS
        elif not 0.0 < eps < 0.5:
            raise ValueError(f"eps: expected a value in (0, 0.5), got {eps!r}")
        b, n, d = z.shape
        flat = z.reshape(b * n, d)
        norm_loss, norm_info = self.vector_norm(flat)
        codes, level, info = self._quantize(flat, eps, torch.finfo(input_dtype).max)
        indices = digits_to_indices(level, self._basis).reshape(b, n, 1)
        return Core(codes.reshape(b, n, d), indices, (norm_loss, norm_info, info), level.reshape(b, n, d))

    def forward(self, z: Tensor, eps: float | None = None):
        result = self.quantize_tokens(z, eps=eps, input_dtype=getattr(z, "dtype", None))
        # the batch's statistics (the loss, the moments, the acceptance rate) are NaN with a bad token
        norm_loss, norm_info, info = result.losses
        level = mark_non_finite(result.extra, result.bad).reshape(*result.indices.shape, self.codebook_dim)
        return result.out, result.indices, norm_loss, {"level_indices": level, "norm_info": norm_info, **info}

    # indices <-> codes

    def level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        """Bin per dimension (..., d) -> indices (...), int64 (first dimension fastest); -1 where
        the bins are -1 (forward's level indices of a token without a code)."""
        if level_indices.shape[-1] != self.codebook_dim:
            raise ValueError(f"level_indices: expected last dim {self.codebook_dim}, got {tuple(level_indices.shape)}")
        no_code = (level_indices == NO_CODE).any(-1)
        return fill_tokens(digits_to_indices(level_indices.clamp(min=0), self._basis), no_code, NO_CODE)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """indices (...) -> bin per dimension (..., d), int64 (-1 for index -1)."""
        return indices_to_digits(indices, self._basis, self._levels, self.codebook_size)

    def indices_to_act_value(self, indices: Tensor) -> Tensor:
        """indices (...) -> bin midpoints in (0, 1) (..., d), fp32; NaN for index -1 (no bin)."""
        level = self.indices_to_level_indices(indices)
        return self._midpoint(level.to(torch.float32)).masked_fill(level == NO_CODE, float("nan"))

    def indices_to_codes(self, indices: Tensor, eps: float = 1e-6) -> Tensor:
        """indices (b, ...) -> codes (b, ..., dim) (channel-first with channel_first), fp32 or
        the projection's dtype; equal to forward's output in eval; zeros for index -1 (no code),
        as the other layers decode it. `eps` is accepted for compatibility: bin midpoints are
        never clamped."""
        return self._decode(indices, lambda i: fp32_island(self._code_value)(self.indices_to_act_value(i)))
