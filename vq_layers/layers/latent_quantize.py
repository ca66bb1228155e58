"""Latent quantization (Hsu et al. 2023, "Disentanglement via Latent Quantization",
https://arxiv.org/abs/2305.18378).

Every latent dimension i has its own small scalar codebook of L_i values (learnable by default);
each dimension snaps independently to its nearest value, so the codebook is the implicit grid of
prod(L_i) points, never stored. The nearest-value search runs in an fp32 island; the index mixes
the per-dimension choices by the mixed-radix basis in int64 arithmetic.

Losses, on the quantizer's latent z (after project_in), as in the paper:
    quantization = mean (zhat - sg(z))^2     (moves the values towards the latents)
    commitment   = mean (z - sg(zhat))^2     (moves the latents towards the values)
    loss = commitment_loss_weight * commitment + quantization_loss_weight * quantization
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_positive_int
from ..distributed import all_reduce_sum_, check_finite, is_distributed
from ..in_place_step import check_in_place_optimizer, step_on
from ..mixed_radix import digits_to_indices, indices_to_digits, register_mixed_radix
from ..non_finite import NO_CODE, mark_non_finite, non_finite_tokens
from ..precision import fp32_island, stack
from ..straight_through import straight_through
from .fsq import check_levels
from .token_quantizer import Core, TokenQuantizer, check_keep_num_codebooks_dim


def initial_values(level: int) -> Tensor:
    """L values in [-0.5, 0.5] with 0 among them for odd L: linspace for odd, k/L - 1/2 for even."""
    if level % 2:
        return torch.linspace(-0.5, 0.5, level, dtype=torch.float32)
    return torch.arange(level, dtype=torch.float32) / level - 0.5


def nearest_values(z: Tensor, values: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """z (..., d) fp32, values[i] (L_i,) fp32 -> (the nearest value per dimension (..., d),
    differentiable in the values; its position (..., d) int64, lowest on ties). One (..., L_i)
    block of distances at a time."""
    chosen, positions = [], []
    for i, vals in enumerate(values):
        position = (z[..., i, None] - vals).abs().argmin(dim=-1)
        positions.append(position)
        chosen.append(vals[position])
    return torch.stack(chosen, dim=-1), torch.stack(positions, dim=-1)


class LatentQuantize(TokenQuantizer):
    """Latent quantizer with a learnable scalar codebook per latent dimension.

    Args (vector-quantize-pytorch's):
        levels: values per latent dimension, a list, or one int repeated codebook_dim times.
        dim: input feature dim; projections in/out when it differs from codebook_dim * num_codebooks.
        commitment_loss_weight, quantization_loss_weight: weights of the two losses (see the
            module docstring); the loss is zero in eval.
        num_codebooks: independent latent codes per token, each over `levels`.
        codebook_dim: latent dimensions per codebook (default: len(levels)).
        keep_num_codebooks_dim: keep a trailing codebook axis on indices (default: num_codebooks > 1).
        optimize_values: the values are parameters `values_per_latent.{i}` (gradient from the
            quantization loss); otherwise fixed.
        in_place_codebook_optimizer: an optimizer class (called with the values) that the
            forward steps on the quantization loss in training before quantizing again; the
            returned loss then carries no gradient to the values.
        sync_codebook, process_group (extras): the in-place step averages the quantization loss
            over all ranks when torch.distributed runs (default), not with sync_codebook=False.

    Shapes:
        forward(z): z channel-first (b, dim) | (b, dim, n) | (b, dim, h, w) | ...
            -> (quantized like z in z's dtype, indices (b, ...[, c]) int64, loss fp32 scalar).
        A token whose input is not finite gets index -1 and a NaN output, and the loss is NaN
        (docs/precision.md); the in-place optimizer's training step raises for it instead.
    """

    def __init__(
        self,
        levels: Sequence[int] | int,
        dim: int,
        commitment_loss_weight: float | None = 0.1,
        quantization_loss_weight: float | None = 0.1,
        num_codebooks: int = 1,
        codebook_dim: int = -1,
        keep_num_codebooks_dim: bool | None = None,
        optimize_values: bool | None = True,
        in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        sync_codebook: bool | None = None,
        process_group=None,
    ):
        super().__init__()
        if isinstance(levels, numbers.Integral) and not isinstance(levels, bool):
            if isinstance(codebook_dim, bool) or not isinstance(codebook_dim, numbers.Integral) or codebook_dim < 1:
                raise ValueError(f"codebook_dim: expected a positive integer with a single int levels={levels}, "
                                 f"got {codebook_dim!r}")
            levels = [levels] * int(codebook_dim)
        levels = check_levels(levels)
        if codebook_dim not in (-1, len(levels)):
            raise ValueError(f"codebook_dim: expected len(levels)={len(levels)} (or -1), got {codebook_dim!r}")
        num_codebooks = check_positive_int("num_codebooks", num_codebooks)
        keep_num_codebooks_dim = check_keep_num_codebooks_dim(keep_num_codebooks_dim, num_codebooks)
        for name, weight in (("commitment_loss_weight", commitment_loss_weight),
                             ("quantization_loss_weight", quantization_loss_weight)):
            if weight is not None and (isinstance(weight, bool) or not isinstance(weight, numbers.Real)):
                raise TypeError(f"{name}: expected a number or None, got {type(weight).__name__}")
            if weight is not None and not weight >= 0:  # NaN fails too
                raise ValueError(f"{name}: expected a weight >= 0 (or None for 0), got {weight!r}")
        if in_place_codebook_optimizer is not None and not optimize_values:
            raise ValueError("in_place_codebook_optimizer: needs optimize_values=True (there are no values "
                             "to optimize), got optimize_values=False")

        self.levels = levels
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = check_positive_int("dim", dim)
        self.codebook_size = register_mixed_radix(self, levels)
        self.commitment_loss_weight = float(commitment_loss_weight or 0.0)
        self.quantization_loss_weight = float(quantization_loss_weight or 0.0)
        self.optimize_values = bool(optimize_values)
        self.sync_codebook, self.process_group = sync_codebook, process_group

        self._init_projections(self.dim, self.effective_codebook_dim)

        if self.optimize_values:  # the peer's parameter names: its checkpoints load
            self.values_per_latent = nn.ParameterList([nn.Parameter(initial_values(L)) for L in levels])
        else:  # fixed values: fp32 constants, not in the state dict (as the peer)
            for i, L in enumerate(levels):
                self.register_fp32_buffer(f"_fixed_values_{i}", initial_values(L), persistent=False)
        self.in_place_codebook_optimizer = None
        if in_place_codebook_optimizer is not None:
            self.in_place_codebook_optimizer = in_place_codebook_optimizer(self.values_per_latent)

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, dim={self.dim}, num_codebooks={self.num_codebooks}, "
                f"codebook_size={self.codebook_size}, optimize_values={self.optimize_values}")

    def values(self) -> list[Tensor]:
        """The value table of every latent dimension, [(L_i,)], in its stored dtype."""
        if self.optimize_values:
            return list(self.values_per_latent)
        return [getattr(self, f"_fixed_values_{i}") for i in range(self.codebook_dim)]

    def _values_f32(self) -> list[Tensor]:
        return [v.float() for v in self.values()]

    # numerics (fp32)

    @fp32_island
    def _core(self, z: Tensor, keep: None = None) -> Core:
        """z (b, n, c*d) fp32 -> codes (b, n, c*d) fp32 (straight-through), indices (b, n, c), loss."""
        z = rearrange(z, "b n (c d) -> b n c d", c=self.num_codebooks)
        in_place = self.in_place_codebook_optimizer is not None and self.training and torch.is_grad_enabled()
        if in_place:
            self._in_place_step(z.detach())
        values = self._values_f32()
        zhat, positions = nearest_values(z, [v.detach() for v in values] if in_place else values)
        indices = digits_to_indices(positions, self._basis)
        loss = z.new_zeros(())
        if self.training and z.numel():
            if self.commitment_loss_weight:
                loss = loss + F.mse_loss(z, zhat.detach()) * self.commitment_loss_weight
            if self.quantization_loss_weight:
                loss = loss + F.mse_loss(zhat, z.detach()) * self.quantization_loss_weight
        codes = straight_through(zhat, z)
        return Core(rearrange(codes, "b n c d -> b n (c d)"), indices, loss)

    def _in_place_step(self, z: Tensor) -> None:
        """One step of the in-place optimizer on the quantization loss of the batch z (b, n, c, d)
        fp32; under torch.distributed (unless sync_codebook=False) of the global batch: the
        gradients of the summed squared error and the element count are all-reduced, so every
        rank takes the same step, the one a single process would take on all ranks' tokens."""
        sync = self.sync_codebook is not False and is_distributed(self.process_group)
        check_in_place_optimizer(self.in_place_codebook_optimizer)
        check_finite(z, "LatentQuantize: input has NaN/Inf in training; the in-place codebook step "
                     "would write it into the values", self.process_group, sync=sync)
        values = list(self.values_per_latent)
        zhat, _ = nearest_values(z, [v.float() for v in values])
        squared_error = (zhat - z).square().sum() * self.quantization_loss_weight
        grads = torch.autograd.grad(squared_error, values, allow_unused=True, materialize_grads=True)
        summed = torch.cat([g.float().reshape(-1) for g in grads] + [z.new_tensor([float(z.numel())])])
        if sync:
            all_reduce_sum_(summed, self.process_group)
        if summed[-1] == 0:  # no tokens on any rank: nothing to learn from
            return
        mean_grads = (summed[:-1] / summed[-1]).split([v.numel() for v in values])
        step_on(self.in_place_codebook_optimizer, values, [g.reshape(v.shape) for v, g in zip(values, mean_grads)])

    def _channel_first(self, x: Tensor) -> bool:
        return True  # (b, dim, ...), as the peer

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(z, Tensor):
            raise TypeError(f"z: expected a floating point tensor, got {type(z).__name__}")
        # non-finite tokens are marked (a training step of the in-place optimizer raises for them)
        result = self.quantize_tokens(z)
        return result.out, result.indices, result.losses

    # indices <-> codes

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """zhat (..., codebook_dim) -> indices (...) int64 of each dimension's nearest value; -1
        for a non-finite zhat (what forward outputs for non-finite input)."""
        if not isinstance(zhat, Tensor) or not zhat.is_floating_point():
            got = getattr(zhat, 'dtype', type(zhat).__name__)
            raise TypeError(f"zhat: expected a floating point tensor, got {got}")
        if zhat.ndim == 0 or zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"zhat: expected last dim codebook_dim={self.codebook_dim}, got {tuple(zhat.shape)}")
        _, positions = fp32_island(nearest_values)(zhat, self._values_f32())
        return mark_non_finite(digits_to_indices(positions, self._basis), non_finite_tokens(zhat))

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """indices (...) -> position in each dimension's values (..., codebook_dim), int64 (-1
        for index -1)."""
        return indices_to_digits(indices, self._basis, self._levels, self.codebook_size)

    def _lookup(self, level_indices: Tensor) -> Tensor:
        """(..., d) positions -> values (..., d) in the values' dtype; zeros for position -1."""
        values = stack([v[level_indices[..., i].clamp(min=0)] for i, v in enumerate(self.values())], dim=-1)
        return values.masked_fill(level_indices == NO_CODE, 0.0)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices (b, ...[, c]) -> codes channel-first (b, dim, ...), in the values' (or the
        projection's) dtype; equal to forward's output in eval. Index -1 (no code) decodes as
        the other layers decode it: a codebook's -1 contributes zeros, and a token whose every
        index is -1 decodes to zeros."""
        return self._decode(indices, lambda i: self._lookup(self.indices_to_level_indices(i)), project_out)

    @property
    def implicit_codebook(self) -> Tensor:
        """All codebook_size codes (codebook_size, codebook_dim) from the current values, built on demand."""
        self._check_buildable("implicit_codebook")
        all_indices = torch.arange(self.codebook_size, device=self._levels.device)
        return self._lookup(self.indices_to_level_indices(all_indices))
