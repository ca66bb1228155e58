"""How a VectorQuantize training output passes gradients: to the input by one estimator, and to
the chosen codes by the synchronized update rule.

Estimators (chosen once, at construction):
- "straight_through": the gradient of the output reaches the input unchanged;
- "gumbel" (straight_through=True): with a temperature t > 0, the Gumbel-softmax straight-through
  (the gradient of softmax(logits / t) @ codes), else as "straight_through";
- "rotation": the rotation trick (rotation_trick.py);
- "diveq": DiVeQ (directional_reparam.py), which also reaches the codes;
- "none" (route_gradients_to_input=False): the codes themselves, differentiable in a learnable
  codebook unless frozen.

`sync_update_v`: vqtorch's synchronized update rule (Huh et al., "Straightening Out the
Straight-Through Estimator", arXiv 2305.08842, eq. 21): the output is z_q in value and the
chosen codes get v x its gradient, so a learnable codebook follows the task loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..directional_reparam import check_directional_reparam, directional_reparam
from ..kernels.code_softmax import code_logits, soft_codes
from ..rotation_trick import rotation_trick
from ..straight_through import straight_through


@dataclass(frozen=True)
class GradientRoute:
    estimator: str  # "straight_through" | "gumbel" | "rotation" | "diveq" | "none"
    metric: str  # the search's: "l2" or "dot"
    diveq_variance: float = 5e-3
    sync_update_v: float = 0.0

    @classmethod
    def from_options(cls, *, straight_through: bool, rotation_trick: bool | None, directional_reparam: bool,
                     directional_reparam_variance: float, route_gradients_to_input: bool, sync_update_v: float,
                     learnable_codebook: bool, codebook_dim: int, threshold_ema_dead_code: float,
                     metric: str) -> GradientRoute:
        """The layer's keyword arguments (vector-quantize-pytorch's) -> the route, or a clear error."""
        rotation_trick = resolve_rotation_trick(rotation_trick, straight_through, directional_reparam, codebook_dim)
        if rotation_trick and straight_through:
            raise ValueError("straight_through, rotation_trick: choose one gradient estimator, got both True")
        check_directional_reparam(directional_reparam, directional_reparam_variance, straight_through,
                                  rotation_trick, threshold_ema_dead_code)
        if not 0 <= sync_update_v <= 1:
            raise ValueError(f"sync_update_v: expected a value in [0, 1], got {sync_update_v!r}")
        if sync_update_v > 0 and not learnable_codebook:
            raise ValueError("sync_update_v: the synchronized update trains the codebook by gradient; it needs "
                             "learnable_codebook=True")
        estimator = ("none" if not route_gradients_to_input else "diveq" if directional_reparam
                     else "rotation" if rotation_trick else "gumbel" if straight_through else "straight_through")
        return cls(estimator, metric, float(directional_reparam_variance), float(sync_update_v))

    def __call__(self, search: Tensor, codes: Tensor, codebook: Tensor, temperature: float, freeze: bool,
                 per_token: Tensor | None = None) -> Tensor:
        """A training forward's output: search (g, m, d) the inputs, codes (g, m[, k], d) the chosen
        codes (a k axis with topk), codebook (g, c, d) searched (or per-token codebooks (g, m, c, d))."""
        routed = self._to_input(search, codes, codebook, temperature, freeze, per_token)
        if self.sync_update_v <= 0 or freeze:
            return routed
        return routed + self.sync_update_v * (codes - codes.detach())

    def fused(self, temperature: float, freeze: bool, per_token: Tensor | None) -> str | None:
        """The estimator vq_fused.py runs for this step ("rotation" or "straight_through"), or None
        when the route is another (Gumbel with a temperature, DiVeQ, none, the synchronized update,
        per-token codebooks)."""
        if per_token is not None or (self.sync_update_v > 0 and not freeze):
            return None
        if self.estimator == "gumbel" and temperature <= 0:
            return "straight_through"
        return self.estimator if self.estimator in ("rotation", "straight_through") else None

    def _to_input(self, search, codes, codebook, temperature, freeze, per_token) -> Tensor:
        if self.estimator == "none":
            return codes.detach() if freeze else codes
        if self.estimator == "gumbel" and temperature > 0:
            soft = soft_codes(search, codebook, self.metric, 1.0 / temperature) if per_token is None else \
                per_token_soft_codes(search, per_token, self.metric, 1.0 / temperature)
            return straight_through(codes, soft if codes.ndim == soft.ndim else soft.unsqueeze(2).expand_as(codes))
        if search.ndim < codes.ndim:  # topk: each of the k codes routes to its input
            search = search.unsqueeze(2).expand_as(codes)
        if self.estimator == "diveq":  # the gradient reaches the input and the code
            return directional_reparam(search, codes, self.diveq_variance) if search.requires_grad else codes
        if self.estimator == "rotation" and search.requires_grad:
            return rotation_trick(search, codes.detach())
        return straight_through(codes, search)


def resolve_rotation_trick(rotation_trick: bool | None, straight_through: bool, directional_reparam: bool,
                           codebook_dim: int) -> bool:
    """rotation_trick=None: the default estimator wherever a rotation exists (d > 1) and no other
    estimator was asked for."""
    if rotation_trick is None:
        return not straight_through and not directional_reparam and codebook_dim > 1
    return bool(rotation_trick)


def per_token_soft_codes(search: Tensor, per_token: Tensor, metric: str, scale: float) -> Tensor:
    """softmax(logits) @ each token's own codebook, the logits as code_logits': search (g, m, d),
    per_token (g, m, c, d) -> (g, m, d). The per-token codebooks are already m x c x d: the
    logits (g, m, c) add less than they hold."""
    rows = search.reshape(-1, 1, search.shape[-1])  # each token against its own codebook
    logits = code_logits(rows, per_token.reshape(-1, *per_token.shape[2:]), metric, scale)  # (g*m, 1, c)
    soft = torch.einsum("rc,rcd->rd", logits[:, 0].softmax(-1), per_token.reshape(-1, *per_token.shape[2:]))
    return soft.reshape(search.shape)
