"""Implicit neural codebooks (QINCo, Huijben et al., arXiv 2401.14732): stage k's codes are
made, per token, by a small network from the stage's base codebook and the reconstruction of the
stages before it. ResidualVQ(implicit_neural_codebook=True) holds one per stage after the first.

The network is vector-quantize-pytorch's (same keywords and state-dict names): a linear map of
[condition, code] to the feature dim, then `depth` residual blocks Linear-SiLU-Linear,
optionally l2-normalized (cosine codebooks). The first linear is applied as two halves, so the
per-token codebooks (b, n, c, d) are the largest tensor it makes (no (b, n, c, 2d) concatenation).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_int
from ..precision import project, projection_input


class ImplicitCodebookMLP(nn.Module):
    """codes (h, c, d) or (c, d), condition (b, n, d) or (b, d) -> per-token codebooks
    (h, b, n, c, d) or (b, n, c, d) in the weights' dtype (the autocast dtype under autocast)."""

    def __init__(self, dim: int, dim_hidden: int | None = None, depth: int = 4, l2norm_output: bool = False):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        dim_hidden = dim if dim_hidden is None else check_positive_int("mlp_kwargs['dim_hidden']", dim_hidden)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"mlp_kwargs['depth']: expected an int >= 0, got {depth!r}")
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim)) for _ in range(depth))
        self.l2norm_output = l2norm_output

    def extra_repr(self) -> str:
        return f"dim={self.dim}, depth={len(self.layers)}, l2norm_output={self.l2norm_output}"

    def _blocks(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = project(layer, x) + x
        return F.normalize(x, dim=-1) if self.l2norm_output else x

    def _halves(self, condition: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        """proj_in([condition, code]) = W_cond condition + (W_code code + bias), each half alone."""
        weight, d = self.proj_in.weight, self.dim
        from_condition = F.linear(projection_input(condition, weight.dtype), weight[:, :d])
        from_codes = F.linear(projection_input(codes, weight.dtype), weight[:, d:], self.proj_in.bias)
        return from_condition, from_codes

    def forward(self, codes: Tensor, *, condition: Tensor) -> Tensor:
        one_headed = codes.ndim == 2
        codes = codes.unsqueeze(0) if one_headed else codes  # (h, c, d)
        condition = condition.unsqueeze(1) if condition.ndim == 2 else condition  # (b, n, d)
        from_condition, from_codes = self._halves(condition, codes)
        x = self._blocks(from_condition[None, :, :, None] + from_codes[:, None, None])  # (h, b, n, c, d)
        return x[0] if one_headed else x

    def transform_codes(self, codes: Tensor, condition: Tensor) -> Tensor:
        """One code per token: codes, condition (..., d) -> the transformed codes (..., d)."""
        from_condition, from_codes = self._halves(condition, codes)
        return self._blocks(from_condition + from_codes)
