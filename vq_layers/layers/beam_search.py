"""Beam search over residual-quantization paths (as vector-quantize-pytorch's ResidualVQ).

A path's score is sum_k w_k * mean_d(r_{k+1}^2): the weighted squared residual left after each
stage (w = beam_score_quantizer_weights; all 1 by default, [0, ..., 0, 1] scores the final
residual only). Each stage extends every beam by its `beam_size` nearest codes and keeps the
`beam_size` best partial paths; the last stage keeps the best one. Ties go to the lowest
candidate (beam, then code), so beam_size=1 is greedy residual quantization.

One addition to the peer's procedure: the greedy path is never pruned (when it falls out of the
beams, it replaces the last one), so the result never scores worse than greedy. With
beam_size >= K^(q-1) nothing is pruned before the last stage: the result is the exact optimum
over all K^q paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# stage(residual (m, B, d), reconstruction so far (m, B, d), k) -> (indices (m, B, k), squared
# distances ||residual - code||^2 (m, B, k) fp32, lookup(beam (m, B'), index (m, B')) -> codes (m, B', d))
Lookup = Callable[[Tensor, Tensor], Tensor]
StageSearch = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, Lookup]]


def _select(t: Tensor, rows: Tensor) -> Tensor:
    """t (m, C, ...) -> t at candidates rows (m, B) -> (m, B, ...)."""
    return t.gather(1, rows.reshape(*rows.shape, *([1] * (t.ndim - 2))).expand(*rows.shape, *t.shape[2:]))


@torch.no_grad()
def beam_search(z: Tensor, stages: Sequence[StageSearch], beam_size: int, weights: Sequence[float]) -> Tensor:
    """z (m, d) fp32 -> the chosen path's indices (m, len(stages)) int64.

    Memory per stage: the candidates' scores (m, B, B) and the kept beams' residuals (m, B, d);
    codes are looked up for the kept candidates only (never (m, B, B, d))."""
    m, d = z.shape
    if m == 0:
        return torch.zeros((0, len(stages)), dtype=torch.long, device=z.device)
    residual, so_far = z[:, None], torch.zeros_like(z)[:, None]  # (m, B, d), B = 1 at first
    score = z.new_zeros((m, 1))
    paths = torch.zeros((m, 1, 0), dtype=torch.long, device=z.device)
    greedy = torch.ones((m, 1), dtype=torch.bool, device=z.device)  # which beam is the greedy path
    for k, (stage, weight) in enumerate(zip(stages, weights)):
        indices, distances, lookup = stage(residual, so_far, beam_size)  # (m, B, c) twice
        c = indices.shape[-1]
        candidates = (score[:, :, None] + weight * (distances / d)).reshape(m, -1)  # (m, B * c)
        keep = 1 if k == len(stages) - 1 else min(beam_size, candidates.shape[1])
        chosen = candidates.sort(dim=-1, stable=True).indices[:, :keep]  # (m, keep)
        greedy_candidate = (greedy.int().argmax(-1) * c)[:, None]  # its nearest code is the extension's first
        if keep > 1 or k < len(stages) - 1:
            kept = (chosen == greedy_candidate).any(-1, keepdim=True)
            chosen[:, -1:] = torch.where(kept, chosen[:, -1:], greedy_candidate)
        beam, index = chosen // c, _select(indices.reshape(m, -1), chosen)
        codes = lookup(beam, index)  # (m, keep, d)
        residual = _select(residual, beam) - codes
        so_far = _select(so_far, beam) + codes
        score = candidates.gather(1, chosen)
        paths = torch.cat([_select(paths, beam), index[..., None]], dim=-1)
        greedy = chosen == greedy_candidate
    return paths[:, 0]
