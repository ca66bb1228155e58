"""Beam search over residual-quantization paths (as vector-quantize-pytorch's ResidualVQ).

A path's score is sum_k w_k * mean_d(r_{k+1}^2): the weighted squared residual left after each
stage (w = beam_score_quantizer_weights; all 1 by default, [0, ..., 0, 1] scores the final
residual only). Each stage extends every beam by its `beam_size` nearest codes and keeps the
`beam_size` best partial paths; the last stage keeps the best one. Ties go to the lowest
candidate (beam, then code), so beam_size=1 is greedy residual quantization.

One addition to the peer's procedure (`keep_greedy`, on by default): the greedy path is never
pruned (when it falls out of the beams, it replaces the last one), so the result never scores
worse than greedy. It does not dominate the peer's procedure (which can return a better path by
keeping the beam the greedy path displaces), and a model trained there may choose other codes
with it on some tokens (measured: 0.02-0.4%), so `keep_greedy=False` is the peer's procedure
exactly. With beam_size >= K^(q-1) nothing is pruned before the last stage: either way the
result is the exact optimum over all K^q paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from ..checks import as_integer, check_positive_int
from ..kernels.nearest_code import nearest_codes, nearest_codes_per_token
from .peer_checkpoint import warn_unrecorded

# stage(residual (m, B, d), reconstruction so far (m, B, d), k) -> (indices (m, B, k), squared
# distances ||residual - code||^2 (m, B, k) fp32, lookup(beam (m, B'), index (m, B')) -> codes (m, B', d))
Lookup = Callable[[Tensor, Tensor], Tensor]
StageSearch = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, Lookup]]


def _select(t: Tensor, rows: Tensor) -> Tensor:
    """t (m, C, ...) -> t at candidates rows (m, B) -> (m, B, ...)."""
    return t.gather(1, rows.reshape(*rows.shape, *([1] * (t.ndim - 2))).expand(*rows.shape, *t.shape[2:]))


@torch.no_grad()
def beam_search(z: Tensor, stages: Sequence[StageSearch], beam_size: int, weights: Sequence[float],
                keep_greedy: bool = True) -> Tensor:
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
        if keep_greedy and (keep > 1 or k < len(stages) - 1):
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


def check_beam_search(beam_size, eval_beam_size, weights, num_quantizers: int, vq_kwargs: dict):
    """(beam_size, eval_beam_size (defaults to beam_size), score weights (q,)), checked."""
    for name, value in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
        if value is not None:
            check_positive_int(name, value)
    check_beam_training(beam_size, vq_kwargs.get("in_place_codebook_optimizer") is not None,
                        bool(vq_kwargs.get("affine_param", False)))
    if eval_beam_size is not None and beam_size is None:
        raise ValueError(f"eval_beam_size: needs beam_size too (as vector-quantize-pytorch), got eval_beam_size="
                         f"{eval_beam_size} with beam_size=None")
    if (beam_size or 1) > 1 and vq_kwargs.get("use_cosine_sim", False):
        raise ValueError("beam_size: beam search scores squared residuals; not supported with use_cosine_sim=True")
    weights = [1.0] * num_quantizers if weights is None else [float(w) for w in weights]
    if len(weights) != num_quantizers:
        raise ValueError(f"beam_score_quantizer_weights: expected {num_quantizers} weights, got {len(weights)}")
    return beam_size, beam_size if eval_beam_size is None else eval_beam_size, weights


def check_beam_training(beam_size, in_place: bool, affine: bool) -> None:
    """Beam search in a training step that updates the codebooks: refused where the stages change
    their codebooks before quantizing (the path would fit codebooks no longer used)."""
    if (beam_size or 1) <= 1:
        return
    for name, given in (("in_place_codebook_optimizer", in_place), ("affine_param=True", affine)):
        if given:
            raise ValueError(f"beam_size: beam search in training is not supported with {name}: each stage changes "
                             f"its codebook before quantizing, so the searched path would fit codes no longer used "
                             f"(search in eval only with beam_size=1 and eval_beam_size, or freeze the codebooks)")


def residual_beam_path(layers, mlps, z: Tensor, beam_size: int, last_kept: int, weights: Sequence[float],
                       keep_greedy: bool) -> Tensor:
    """ResidualVQ's best path (b*n, last_kept + 1) of the fp32 search over its stages' codebooks
    (`layers`, VectorQuantize stages; `mlps`: implicit codebooks' networks or None)."""
    def stage(k, residual, so_far, width):
        layer = layers[k]
        m, beams, d = residual.shape
        codebook = layer.searched_codes().detach()[0]
        width = min(width, layer.codebook_size)
        if k == 0 or mlps is None:
            indices, distances = nearest_codes(residual.reshape(-1, d), codebook, "l2", width)

            def lookup(beam, index):
                return codebook[index]
        else:  # per-token codebooks made from each beam's reconstruction (inherently m x B x K x d)
            per_token = mlps[k - 1](codebook, condition=so_far).float().reshape(m, beams, -1, d)
            indices, distances = nearest_codes_per_token(residual.reshape(-1, d), per_token.flatten(0, 1), "l2", width)

            def lookup(beam, index):
                return per_token[torch.arange(m, device=z.device)[:, None], beam, index]
        return indices.reshape(m, beams, width), distances.reshape(m, beams, width), lookup

    stages = [partial(stage, k) for k in range(last_kept + 1)]
    return beam_search(z.detach().reshape(-1, z.shape[-1]), stages, beam_size, weights, keep_greedy)


def beam_width(beam_size, default: int | None, num_quantizers: int, use_cosine_sim: bool) -> int | None:
    """A forward's beam (None: greedy): forward's `beam_size`, else `default` (beam_size in
    training, eval_beam_size in eval); 0 and 1 are greedy (as the peer)."""
    if beam_size is None:
        beam_size = default
    else:  # integral values (numpy, 0-dim tensors) as the peer's int()
        beam_size = as_integer("beam_size", beam_size)
        if beam_size < 0:
            raise ValueError(f"beam_size: expected an integer >= 0, got {beam_size}")
        check_beam_search(beam_size or None, None, None, num_quantizers, {"use_cosine_sim": use_cosine_sim})
    return beam_size if beam_size is not None and beam_size > 1 else None


class BeamProcedureRecord:
    """Mixin for ResidualVQ: `beam_keep_greedy` (None, True or False) and its state-dict record.

    None: True for a new model; loading a state dict takes the record (entry `beam_keep_greedy`,
    written when True and the constructor enables beam search), and False (the peer's procedure;
    with one warning when the constructor enables beam search) when there is none. True or
    False: for a new model and for a state dict without the record.
    """

    def _init_beam_record(self, keep_greedy: bool | None, beam_enabled: bool) -> None:
        if keep_greedy is not None and not isinstance(keep_greedy, bool):
            raise ValueError(f"beam_keep_greedy: expected None, True or False, got {keep_greedy!r}")
        self._keep_greedy_given = keep_greedy
        self.beam_keep_greedy = True if keep_greedy is None else keep_greedy
        self._beam_enabled = beam_enabled
        self._warn_on_load = True  # GroupedResidualVQ warns once for all its groups

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.beam_keep_greedy and self._beam_enabled:
            destination[prefix + "beam_keep_greedy"] = torch.tensor(True)

    def _falls_back(self, state_dict, prefix) -> bool:
        return prefix + "beam_keep_greedy" not in state_dict and self._keep_greedy_given is None and self._beam_enabled

    def _warn_unrecorded(self, layer: str, prefix: str) -> None:
        warn_unrecorded(layer, prefix, "beam-search procedure", "beam search (which may prune the greedy path)",
                        "beam search (never worse than greedy)", "beam_keep_greedy", True, False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.pop(prefix + "beam_keep_greedy", None)  # (a copy of the caller's dict)
        if saved is not None:
            self.beam_keep_greedy = bool(saved)
        else:
            if self._falls_back(state_dict, prefix) and self._warn_on_load:
                self._warn_unrecorded(type(self).__name__, prefix)
            self.beam_keep_greedy = bool(self._keep_greedy_given)  # None: the peer's
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
