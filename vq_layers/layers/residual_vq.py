"""Residual VQ (SoundStream, arXiv 2107.03312, Algorithm 1; EnCodec): quantizer k quantizes the
residual the quantizers before it left, each with its own (or one shared) EMA codebook."""

from __future__ import annotations

import math
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_indices, check_non_negative, check_positive_int, check_stage_indices
from ..codebook_losses import mse_count
from ..directional_reparam import directional_reparam
from ..distributed import NON_FINITE_INPUT, check_finite
from ..precision import cat, fp32_island
from .beam_search import (
    BeamProcedureRecord,
    beam_width,
    check_beam_search,
    check_beam_training,
    residual_beam_path,
)
from .codebook_quantizer import Step
from .implicit_codebook import ImplicitCodebookMLP
from .peer_checkpoint import GroupsWarnOnce
from .residual import (
    GroupedResidual,
    ResidualQuantizer,
    last_kept_stage,
    run_stages,
    stage_codes,
    sum_stages,
)
from .token_quantizer import Core
from .vq import VectorQuantize
from .vq_fused import ChainStage, routed_chain


def codebook_sizes(codebook_size, num_quantizers) -> tuple[int, ...]:
    """One codebook size per stage: a tuple given (num_quantizers may be left out), or one size
    repeated num_quantizers times."""
    if isinstance(codebook_size, (tuple, list)):
        sizes = tuple(check_positive_int("codebook_size", size) for size in codebook_size)
        if not sizes or (num_quantizers is not None and num_quantizers != len(sizes)):
            raise ValueError(f"codebook_size: expected one size per quantizer (num_quantizers={num_quantizers}), "
                             f"got {tuple(codebook_size)}")
        return sizes
    if num_quantizers is None:
        raise ValueError("num_quantizers: expected a positive integer (or codebook_size as a tuple of one size per "
                         "quantizer), got None")
    return (check_positive_int("codebook_size", codebook_size),) * check_positive_int("num_quantizers", num_quantizers)


# VectorQuantize keywords that describe the outer layer's input, not a stage's
_LAYOUT_KEYWORDS = ("channel_last", "accept_3d_fmap", "heads", "separate_codebook_per_head")


class ResidualVQ(BeamProcedureRecord, ResidualQuantizer):
    """Residual vector quantization.

    Shapes:
        forward(x): x (b, n, dim) (or (b, dim, h, w) with accept_image_fmap); mask (b, n) bool
            -> (quantized like x in x's dtype, indices (b, n, q) (or (b, h, w, q)) int64,
                losses (q,) fp32 [, all_codes (q, b, n, d) with return_all_codes]).
            With `indices` (b, n, q) given -> (the output of those codes, summed cross-entropy of
            each stage's residual to its given code), the residuals taken from the given codes.
        Dropped quantizers (quantize_dropout in training) and masked tokens get index -1; so does
        every stage of a token whose input is not finite, with a NaN output and NaN losses (a
        training step that updates the codebooks raises instead; docs/precision.md).

    With shared_codebook, every stage searches the codebook as it was before the step, and the
    codebook is updated once from all stages' statistics at the end of the step (an
    in_place_codebook_optimizer takes one step there, on the sum of the stages' codebook losses).

    Extras (vector-quantize-pytorch's keywords): `codebook_size` a tuple of one size per stage
    (num_quantizers may then be left out); `quant_grad_frac`, the fraction of the gradient that
    flows through a stage's output into the next residual; `implicit_neural_codebook` (QINCo,
    implicit_codebook.py, with `mlp_kwargs`); `diveq`, DiVeQ (directional_reparam.py) on the sum
    of the stages in training; beam search with `beam_size` (training; forward's
    `beam_size` overrides), `eval_beam_size` and `beam_score_quantizer_weights` (beam_search.py):
    the path is searched first, then quantized stage by stage along it, so gradients, losses and
    codebook updates follow the chosen path. `beam_keep_greedy` (None: ours for a new model, the
    peer's for a checkpoint that does not record it; BeamProcedureRecord in beam_search.py).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int | None = None,
        codebook_size: int | tuple[int, ...],
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        return_zeros_for_masked_padding: bool = True,
        process_group=None,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: dict | None = None,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_quantizer_weights: list[float] | None = None,
        beam_keep_greedy: bool | None = None,
        quant_grad_frac: float = 0.0,
        diveq: bool = False,
        **vq_kwargs,
    ):
        if heads != 1:
            raise ValueError(f"heads: ResidualVQ supports 1 (use GroupedResidualVQ to split features), got {heads}")
        for name in _LAYOUT_KEYWORDS:
            if name in vq_kwargs:
                raise ValueError(f"{name}: not a ResidualVQ keyword (stages see (b, n, codebook_dim) tokens)")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        sizes = codebook_sizes(codebook_size, num_quantizers)
        num_quantizers = len(sizes)
        super().__init__(dim, codebook_dim, num_quantizers, quantize_dropout, quantize_dropout_cutoff_index,
                         quantize_dropout_multiple_of, process_group)
        if shared_codebook and len(set(sizes)) > 1:
            raise ValueError(f"codebook_size: shared_codebook=True needs one size for every stage, got {sizes}")
        if shared_codebook and vq_kwargs.get("affine_param"):  # one set of moments for residuals of every scale
            raise ValueError("affine_param, shared_codebook: not supported together (the stages' residuals have "
                             "different scales; one set of batch moments cannot map the codes onto all of them)")
        check_non_negative("quant_grad_frac", quant_grad_frac)
        self.diveq = bool(diveq)
        if diveq:  # DiVeQ on the sum of the stages: learnable codebooks, trained through the output only
            if vq_kwargs.get("ema_update"):
                raise ValueError("diveq, ema_update: DiVeQ trains the codebooks by gradients; ema_update must be False")
            vq_kwargs.update(ema_update=False, learnable_codebook=True, route_gradients_to_input=False,
                             commitment_weight=0.0)
            quant_grad_frac = 1.0
        self.quant_grad_frac = float(quant_grad_frac)
        self.codebook_sizes = sizes
        self.implicit_neural_codebook = implicit_neural_codebook
        if implicit_neural_codebook:  # the networks learn through the stages' commitment losses (as the peer)
            if vq_kwargs.get("in_place_codebook_optimizer") is not None:
                raise ValueError("implicit_neural_codebook, in_place_codebook_optimizer: the in-place step fits the "
                                 "base codebook, not the per-token codebooks the stages search; give at most one")
            vq_kwargs.update(learnable_codebook=True, ema_update=False)
        self.beam_size, self.eval_beam_size, self.beam_score_weights = check_beam_search(
            beam_size, eval_beam_size, beam_score_quantizer_weights, num_quantizers, vq_kwargs)
        self._init_beam_record(beam_keep_greedy, max(self.beam_size or 1, self.eval_beam_size or 1) > 1)
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.shared_codebook = shared_codebook
        self.layers = nn.ModuleList(
            VectorQuantize(dim=codebook_dim, codebook_size=size, process_group=process_group,
                           return_zeros_for_masked_padding=return_zeros_for_masked_padding, **vq_kwargs)
            for size in sizes
        )
        self.mlps = None
        if implicit_neural_codebook:  # one per stage after the first (state-dict names as the peer's)
            self.mlps = nn.ModuleList(
                ImplicitCodebookMLP(codebook_dim, l2norm_output=self.layers[0].use_cosine_sim, **(mlp_kwargs or {}))
                for _ in range(num_quantizers - 1))
        if shared_codebook:  # the first stage's in-place optimizer (over the shared codes) steps for all
            for layer in self.layers[1:]:
                layer.share_codebook_of(self.layers[0])
        self.codebook_size = self.layers[0].codebook_size

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_size={self.codebook_sizes}, "
                f"shared_codebook={self.shared_codebook}, quantize_dropout={self.quantize_dropout}, "
                f"implicit_neural_codebook={self.implicit_neural_codebook}, beam_size={self.beam_size}")

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """(q, codebook_size, codebook_dim); a tuple of (size_k, codebook_dim) when the sizes differ."""
        codebooks = tuple(layer.codebook for layer in self.layers)
        return torch.stack(codebooks) if len(set(self.codebook_sizes)) == 1 else codebooks

    @fp32_island
    def _residual_quantize(self, z: Tensor, keep: Tensor | None, temperature: float | None, freeze: bool,
                           last_kept: int, beam_size: int | None = None, all_codes: bool = True,
                           checked: bool = False):
        """z (b, n, d) fp32 -> quantized (b, n, d), indices (b, n, q), losses (q,), stage codes (q, b, n, d)
        (None unless `all_codes`). `checked`: the caller refused non-finite z already."""
        updating = self.training and torch.is_grad_enabled() and not freeze
        if updating and not checked:  # once for the call: each stage's residual is z less finite codes
            check_finite(z, NON_FINITE_INPUT, self.process_group, self.layers[0]._sync())
        results = []
        path = None  # (b*n, stages kept): the beam search's path, quantized along below
        if beam_size is not None and updating:
            first = self.layers[0]
            check_beam_training(beam_size, first.in_place_codebook_optimizer is not None, first.affine_param)
        if beam_size is not None and not (updating and any(layer.needs_init() for layer in self.layers)):
            # (k-means init runs on a greedy step first)
            path = residual_beam_path(self.layers, self.mlps, z, beam_size, last_kept, self.beam_score_weights,
                                      self.beam_keep_greedy)
        # the reconstruction so far: implicit codebooks are conditioned on it
        so_far = [None if self.mlps is None else torch.zeros_like(z)]

        def step_of(k, layer, transform=None):
            temp = layer.sample_codebook_temp if temperature is None else temperature
            return Step(temp, updating, updating and not self.shared_codebook, layer.ema_update, freeze,
                        transform=transform, chosen=None if path is None else path[None, :, k], checked=True)

        # the usual case routes the chain's gradients in one Function (vq_fused.routed_chain): the
        # stages quantize z detached, and no stage's residual is kept for the backward
        chain = (self.training and torch.is_grad_enabled() and z.requires_grad and self.quant_grad_frac == 0
                 and self.mlps is None and not self.diveq
                 and all(layer.fused_route(step_of(k, layer), chain=True) for k, layer in enumerate(self.layers)))
        routes = {}  # stage -> ChainStage

        def stage(k, layer, residual, active):
            transform = None if k == 0 or self.mlps is None else partial(self.mlps[k - 1], condition=so_far[0])
            stage_keep = keep
            if active is not None:  # dropped (compiled: a tensor depth): the stage counts no token
                stage_keep = active.expand(residual.shape[:2]) if keep is None else keep & active
            step = step_of(k, layer, transform)
            result = layer.quantize(residual, stage_keep, step)
            if chain:
                routes[k] = ChainStage(result.codebook, result.codebook_indices, result.kept,
                                       layer.fused_route(step) == "rotation", result.squared_error,
                                       mse_count(result.search, result.kept))
            if self.shared_codebook:  # what commit_statistics reads (not the N x d output)
                results.append(result._replace(quantized=None))
            if self.mlps is not None:
                so_far[0] = so_far[0] + result.quantized
            return result.quantized, result.indices[..., 0], result.loss

        stages = [partial(stage, k, layer) for k, layer in enumerate(self.layers)]
        quantized, indices, codes, extras = run_stages(z.detach() if chain else z, stages, last_kept,
                                                       self.quant_grad_frac,
                                                       [self._stage_parameters(k) for k in range(self.num_quantizers)],
                                                       keep_outputs=all_codes)
        if routes:
            quantized = self._route_chain(z, quantized, routes, extras)
        if updating and self.shared_codebook and results:  # all stages searched the same codebook
            self.layers[0].commit_statistics(results)
        losses = torch.stack([extra[0] if extra is not None else z.new_zeros(()) for extra in extras])
        if self.diveq and self.training and torch.is_grad_enabled():  # eval outputs stay the codes exactly
            quantized = directional_reparam(z, quantized)
        return quantized, indices, losses, codes

    def _route_chain(self, z: Tensor, quantized: Tensor, routes: dict, extras: list) -> Tensor:
        """The stages' sum, differentiable in z by each stage's estimator, and each stage's loss
        (extras[k][0]) given its commitment gradient: loss + w (e - e) / count, the same value."""
        stages = sorted(routes)
        quantized, errors = routed_chain(z, quantized, [routes[k] for k in stages])
        for j, k in enumerate(stages):
            layer = self.layers[k]
            if layer.losses.weighs_commitment:  # d loss / d e = w / count, as the stage's own loss has it
                pull = (errors[j] - errors[j].detach()) / routes[k].count.clamp(min=1) * layer.commitment_weight
                extras[k][0] = extras[k][0] + pull
        return quantized

    def _stage_parameters(self, k: int) -> list:
        """Stage k's learnable parameters: its codebook (and map, with implicit codebooks)."""
        params = list(self.layers[k].parameters())
        return params + list(self.mlps[k - 1].parameters()) if self.mlps is not None and k > 0 else params

    def _synced_owners(self, stages: bool = True) -> list:
        codebooks = [owner for layer in self.layers for owner in layer.synced_owners()] if stages else []
        return super()._synced_owners() + codebooks

    def _check_before_broadcast(self, z: Tensor) -> None:
        check_finite(z, NON_FINITE_INPUT, self.process_group, True)

    @fp32_island
    def _teacher_forced(self, z: Tensor, keep: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Each stage's cross-entropy to its given code, residuals taken from the given codes."""
        residual, total, ce = z, torch.zeros_like(z), z.new_zeros(())
        for k, layer in enumerate(self.layers):
            given = targets[..., k : k + 1]
            if keep is not None:
                given = given.masked_fill(~keep.unsqueeze(-1), -1)
            result = layer.quantize(residual, keep, Step(ema_update=False, freeze=True,
                                                         targets=rearrange(given, "b n 1 -> 1 (b n)")))
            ce = ce + result.loss
            codes = layer.lookup(given)
            residual, total = residual - codes, total + codes
        return total, ce

    @fp32_island
    def _core(self, z: Tensor, keep: Tensor | None, seed=None, temperature: float | None = None, freeze: bool = False,
              beam_size: int | None = None, given: Tensor | None = None, all_codes: bool = True,
              checked: bool = False) -> Core:
        """z (b, n, d) fp32 -> the stages' sum, indices (b, n, q), losses (q,), the stages' codes
        (q, b, n, d) (None unless `all_codes`); with `given` indices: each stage's cross-entropy to
        its given code, summed."""
        if given is not None:
            if self.mlps is not None:
                raise ValueError("indices: the cross-entropy to given codes is not supported with "
                                 "implicit_neural_codebook=True")
            targets = self._check_targets(given, z)
            quantized, ce = self._teacher_forced(z, keep, targets)
            return Core(quantized, targets, ce)
        self._broadcast_initial_state(z, stages=not freeze)
        last_kept = last_kept_stage(self, seed)
        quantized, indices, losses, codes = self._residual_quantize(z, keep, temperature, freeze, last_kept, beam_size,
                                                                    all_codes, checked)
        return Core(quantized, indices, losses, codes)

    def forward(self, x: Tensor, mask: Tensor | None = None, indices: Tensor | None = None,
                return_all_codes: bool = False, sample_codebook_temp: float | None = None,
                freeze_codebook: bool = False, rand_quantize_dropout_fixed_seed: int | None = None,
                beam_size: int | None = None, *, _input_checked: bool = False):
        # (_input_checked: GroupedResidualVQ refused non-finite input for all groups in one read)
        updating = self.training and torch.is_grad_enabled() and not freeze_codebook and indices is None
        beam = beam_width(beam_size, self.beam_size if self.training else self.eval_beam_size, self.num_quantizers,
                          self.layers[0].use_cosine_sim)
        result = self.quantize_tokens(x, mask, refuses_non_finite=updating, seed=rand_quantize_dropout_fixed_seed,
                                      temperature=sample_codebook_temp, freeze=freeze_codebook, beam_size=beam,
                                      given=indices, all_codes=return_all_codes, checked=_input_checked)
        if indices is not None:
            return result.out, result.losses
        if not return_all_codes:
            return result.out, result.indices, result.losses
        return result.out, result.indices, result.losses, self._all_codes(result)

    def _channel_first(self, x: Tensor) -> bool:
        return self.accept_image_fmap

    def _check_targets(self, indices: Tensor, tokens: Tensor) -> Tensor:
        """indices (b, ..., q) for tokens (b, n, d) -> (b, n, q) int64, checked."""
        check_indices(indices, max(self.codebook_sizes), values=False)
        expected = (tokens.shape[0], tokens.shape[1], self.num_quantizers)
        if indices.numel() != math.prod(expected) or indices.shape[-1] != self.num_quantizers:
            raise ValueError(f"indices: expected one index per token and quantizer, (b, ..., q) = {expected}, "
                             f"got shape {tuple(indices.shape)}")
        check_stage_indices(indices, self.stage_sizes, allow_dropped=False)  # every stage needs its given code
        return indices.long().reshape(expected)

    @property
    def stage_sizes(self) -> list[int]:
        return list(self.codebook_sizes)

    def get_codes_from_indices(self, indices: Tensor, *, _checked: bool = False) -> Tensor:
        """indices (b, ..., q'), q' <= q, -1 = dropped or masked -> each stage's codes (q, b, ..., d) fp32."""
        check_indices(indices, max(self.codebook_sizes), allow_dropped=True, values=False)
        if indices.ndim < 2:
            raise ValueError(f"indices: expected (b, ..., q), got shape {tuple(indices.shape)}")
        return super().get_codes_from_indices(indices, _checked=_checked)

    def _lookup_stage(self, k: int, indices: Tensor) -> Tensor:
        """Valid indices (b, ...) of stage k (checked by stage_codes) -> its codes (b, ..., d)."""
        return self.layers[k].lookup(indices.unsqueeze(-1))

    def _stage_codes(self, indices: Tensor, checked: bool = False) -> Tensor:
        """With implicit codebooks, stage k's code is its network's transform of the base code,
        conditioned on the codes before it (one code per token: no per-token codebook)."""
        if self.mlps is None:
            return super()._stage_codes(indices, checked)
        so_far = []

        def lookup(k, stage_indices):
            codes = self._lookup_stage(k, stage_indices)
            if k > 0:  # dropped (trailing) and masked positions are zeroed by stage_codes afterwards
                codes = self.mlps[k - 1].transform_codes(codes, sum_stages(torch.stack(so_far))).float()
            so_far.append(codes)
            return codes

        return stage_codes(indices, [partial(lookup, k) for k in range(self.num_quantizers)],
                           None if checked else self.stage_sizes)

    def _channel_first_output(self, indices: Tensor) -> bool:
        return self.accept_image_fmap


class GroupedResidualVQ(GroupsWarnOnce, GroupedResidual):
    """`groups` independent ResidualVQs over equal slices of the feature dim.

    Shapes: x (b, n, dim) (or (b, dim, h, w) with accept_image_fmap) -> (quantized like x,
    indices (g, b, n, q), losses (g, q) [, all_codes (g, q, b, n, d)]); with `indices`
    (g, b, n, q) given -> (quantized, summed cross-entropy).
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__(partial(ResidualVQ, accept_image_fmap=accept_image_fmap), dim, groups, accept_image_fmap,
                         **kwargs)
        self._silence_groups()

    @property
    def codebooks(self) -> Tensor | tuple[Tensor | tuple[Tensor, ...], ...]:
        """(g, q, codebook_size, codebook_dim); with different sizes per stage, a tuple of each
        group's ResidualVQ.codebooks (a tuple of (size_k, codebook_dim))."""
        codebooks = [rvq.codebooks for rvq in self.rvqs]
        return torch.stack(codebooks) if isinstance(codebooks[0], Tensor) else tuple(codebooks)

    def forward(self, x: Tensor, indices: Tensor | None = None, return_all_codes: bool = False,
                sample_codebook_temp: float | None = None, freeze_codebook: bool = False, mask: Tensor | None = None,
                beam_size: int | None = None):
        if indices is None:
            return super().forward(x, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                                   freeze_codebook=freeze_codebook, mask=mask, beam_size=beam_size,
                                   _input_checked=self._check_groups_finite(x, mask, freeze_codebook))
        self._check_groups(indices)
        chunks = self._spread_non_finite(x, mask).chunk(self.groups, dim=self.split_dim)
        outs = [rvq(chunk, mask=mask, indices=i) for rvq, chunk, i in zip(self.rvqs, chunks, indices)]
        return cat([q for q, _ in outs], dim=self.split_dim), sum(ce for _, ce in outs)

    def _check_groups_finite(self, x: Tensor, mask: Tensor | None, freeze: bool) -> bool:
        """A training step refuses non-finite input before any group's statistics change: every
        group's projected input judged in one read (one host sync, not one per group) -> whether
        it was (the groups then need not)."""
        if not (self.training and torch.is_grad_enabled() and not freeze) or x.ndim < 2 \
                or x.shape[self.split_dim] != self.dim:  # (a wrong shape is the groups' to refuse)
            return False
        with torch.no_grad():
            chunks = x.chunk(self.groups, dim=self.split_dim)
            inputs = [rvq._tokens_in(chunk, mask)[3] for rvq, chunk in zip(self.rvqs, chunks)]
        first = self.rvqs[0]
        check_finite(inputs, NON_FINITE_INPUT, first.process_group, first.layers[0]._sync())
        return True
