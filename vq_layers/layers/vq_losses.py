"""VectorQuantize's training losses, weighted and summed in one place: the commitment loss
(mean squared error to the chosen codes, or the cross-entropy of the input's code distribution
to them), the codebook-diversity loss and the orthogonal regularizer (codebook_losses.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import check_non_negative, check_positive_int
from ..codebook_losses import diversity_loss, masked_mse, mse_count, orthogonal_loss
from ..kernels.code_softmax import code_cross_entropy


class LossBreakdown(NamedTuple):  # vector-quantize-pytorch's names
    commitment: Tensor
    codebook_diversity: Tensor
    orthogonal_reg: Tensor
    inplace_optimize: Tensor


@dataclass(frozen=True)
class VQLosses:
    metric: str
    commitment_weight: float = 1.0
    commitment_use_cross_entropy_loss: bool = False
    commitment_on: bool = True  # DiVeQ has no commitment loss (as the peer)
    codebook_diversity_loss_weight: float = 0.0
    codebook_diversity_temperature: float = 100.0
    orthogonal_reg_weight: float = 0.0
    orthogonal_reg_active_codes_only: bool = False
    orthogonal_reg_max_codes: int | None = None

    def __post_init__(self):
        for name in ("commitment_weight", "codebook_diversity_loss_weight", "orthogonal_reg_weight"):
            check_non_negative(name, getattr(self, name))
        if self.orthogonal_reg_max_codes is not None:
            check_positive_int("orthogonal_reg_max_codes", self.orthogonal_reg_max_codes)

    def terms(self, search: Tensor, codebook: Tensor, codes: Tensor, indices: Tensor, kept: Tensor | None,
              codes_learn: bool, sync: bool, group,
              squared_error: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(commitment, diversity, orthogonal), unweighted, for one training step: search (g, m, d),
        codebook (g, c, d), codes (g, m[, k], d) chosen, indices (g, m[, k]) (a k axis with topk:
        `topk_commitment`).
        `codes_learn`: the commitment loss also pulls the codes (a learnable, unfrozen codebook).
        `squared_error`: the mean squared error's numerator, already formed (vq_fused.py)."""
        zero = search.new_zeros(())
        commitment = diversity = orthogonal = zero
        target = codes if codes_learn else codes.detach()
        if codes.ndim > search.ndim:  # topk: per position and code, computed whatever the weight
            commitment = topk_commitment(search, target, kept)
        elif self.weighs_commitment:
            if self.commitment_use_cross_entropy_loss:
                targets = indices if kept is None else indices.masked_fill(~kept, -1)
                commitment = code_cross_entropy(search, codebook, targets, self.metric)
            elif squared_error is not None:
                commitment = squared_error / mse_count(search, kept).clamp(min=1)
            else:
                commitment, _ = masked_mse(search, target, kept)
        if self.codebook_diversity_loss_weight > 0:
            diversity = diversity_loss(search, codebook, self.metric, self.codebook_diversity_temperature, kept,
                                       sync, group)
        if self.orthogonal_reg_weight > 0:  # with topk, all k codes are active
            flat_kept = None if kept is None else kept.repeat_interleave(indices.numel() // kept.numel(), dim=1)
            orthogonal = orthogonal_loss(codebook, indices.flatten(1), flat_kept,
                                         self.orthogonal_reg_active_codes_only, self.orthogonal_reg_max_codes)
        return commitment, diversity, orthogonal

    @property
    def fusable(self) -> bool:
        """Whether the commitment loss, if any, is a mean squared error (vq_fused.py forms its numerator)."""
        return not (self.weighs_commitment and self.commitment_use_cross_entropy_loss)

    @property
    def weighs_commitment(self) -> bool:
        return self.commitment_on and self.commitment_weight > 0

    def total(self, commitment: Tensor, diversity: Tensor, orthogonal: Tensor) -> Tensor:
        return (commitment * self.commitment_weight + diversity * self.codebook_diversity_loss_weight
                + orthogonal * self.orthogonal_reg_weight)


def topk_commitment(search: Tensor, target: Tensor, kept: Tensor | None) -> Tensor:
    """search (g, m, d), target (g, m, k, d) -> mean over features of (code - input)^2 (g, m, k),
    zero where masked."""
    commitment = (target - search.unsqueeze(2)).square().mean(-1)
    return commitment if kept is None else torch.where(kept.unsqueeze(-1), commitment, 0.0)


def trainable_loss(loss: Tensor, training: bool) -> Tensor:
    """A training loss that backward() accepts even when no term depends on a parameter (DiVeQ
    has no commitment loss; commitment_weight=0), as the peer's."""
    if training and torch.is_grad_enabled() and not loss.requires_grad and not torch.compiler.is_compiling():
        return loss.detach().requires_grad_()  # (torch.compile refuses a requires_grad_() output)
    return loss
