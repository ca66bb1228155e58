"""What every residual quantizer shares: the stage loop (a TokenQuantizer core), quantize
dropout drawn alike on all ranks, looking codes up from (possibly dropped or coarse) indices,
and grouping."""

from __future__ import annotations

import random
from functools import partial
from typing import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_positive_int, check_stage_indices
from ..counter_random import CounterDraws
from ..distributed import broadcast_once_, is_distributed
from ..non_finite import NO_CODE, fill_tokens, mark_non_finite, non_finite_tokens
from ..precision import cat, fp32_island, project, stack
from ..usage import CodeUsage, stack_usage
from .token_quantizer import Core, Quantization, TokenQuantizer


def check_quantize_dropout(num_quantizers: int, cutoff_index: int, multiple_of: int) -> None:
    check_positive_int("num_quantizers", num_quantizers)
    if not 0 <= cutoff_index < num_quantizers:
        raise ValueError(
            f"quantize_dropout_cutoff_index: expected 0 <= index < num_quantizers={num_quantizers}, "
            f"got {cutoff_index}"
        )
    check_positive_int("quantize_dropout_multiple_of", multiple_of)


def quantize_dropout_depth(num_quantizers: int, cutoff_index: int, multiple_of: int, seed: int) -> int:
    """Index of the last quantizer kept (those after it are dropped), as in SoundStream/EnCodec,
    for a seed the user fixed (`rand_quantize_dropout_fixed_seed`: Python's random, as the peer).

    Uniform over [cutoff_index, num_quantizers), then rounded so that the number of kept
    quantizers is a multiple of `multiple_of` (structured dropout).
    """
    last = random.Random(seed).randrange(cutoff_index, num_quantizers)
    return _round_to_multiple(last, multiple_of)


def _round_to_multiple(last, multiple_of: int):
    """The kept count last + 1 rounded up to a multiple (int or int64 tensor; may pass the last
    stage: callers cap it)."""
    if multiple_of == 1:
        return last
    return ((last + multiple_of) // multiple_of) * multiple_of - 1


def dropout_depth(draw, num_quantizers: int, cutoff_index: int, multiple_of: int):
    """The last stage kept for a 32-bit draw (int or int64 tensor): uniform over
    [cutoff_index, num_quantizers), rounded up to a multiple of kept stages, capped."""
    last = cutoff_index + draw % (num_quantizers - cutoff_index)
    last = _round_to_multiple(last, multiple_of)
    return min(last, num_quantizers - 1) if isinstance(last, int) else last.clamp(max=num_quantizers - 1)


def last_kept_stage(module, seed=None):
    """The last stage to run: all of them (an int), unless quantize dropout applies (training
    with grad): then an int when eager, a CPU int64 tensor under torch.compile (the stages after
    it run masked: run_stages). `seed`: the user's fixed seed (an int), or a parent's draw
    (a DropoutDraw, so that all groups of a grouped layer drop alike)."""
    last = module.num_quantizers - 1
    if not (module.training and module.quantize_dropout and torch.is_grad_enabled()):
        return last
    q, cutoff = module.num_quantizers, module.quantize_dropout_cutoff_index
    multiple_of = module.quantize_dropout_multiple_of
    if isinstance(seed, DropoutDraw):
        return dropout_depth(seed.value, q, cutoff, multiple_of)
    if seed is not None:
        return min(quantize_dropout_depth(q, cutoff, multiple_of, seed), q - 1)
    return dropout_depth(module.dropout_draws.next(), q, cutoff, multiple_of)


class DropoutDraw:
    """A parent's draw handed to its children (GroupedResidual): every group drops alike. Drawn
    on first use, from the first group's draws, once that group's first synced step has made
    its seed the same on every rank."""

    def __init__(self, draws: CounterDraws):
        self._draws, self._value = draws, None

    @property
    def value(self):
        if self._value is None:
            self._value = self._draws.next()
        return self._value


def frac_gradient(t: Tensor, frac: float) -> Tensor:
    """t in value (exactly: frac * t + (1 - frac) * t would round); a fraction `frac` of the
    gradient flows into it (none when frac <= 0)."""
    return t.detach() if frac <= 0 else t.detach() + frac * (t - t.detach())


def zero_touch(params) -> Tensor | None:
    """0 in value, depending on `params`: their gradient is zeros (not None). None without any."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return None
    total = sum(p.float().sum() for p in params)
    return torch.where(torch.zeros((), dtype=torch.bool, device=total.device), total, 0.0)


def run_stages(x: Tensor, stages: list[Callable], last_kept, quant_grad_frac: float = 0.0,
               stage_parameters: list | None = None, keep_outputs: bool = True):
    """Stage k quantizes the residual of stages < k: stage(residual, active) -> (quantized,
    indices, *extra), `active` None or, when quantize dropout drew a tensor depth (compiled),
    a bool 0-dim tensor: whether stage k is kept (a stage with statistics must then count
    nothing when it is not; its outputs are masked here).

    Returns the sum of the stages' outputs (summed in stage order, as `sum_stages` does), their
    indices stacked on a last axis (-1 for dropped stages), the stages' outputs detached (q, ...)
    (zeros for dropped stages; the codes `get_codes_from_indices` would look up), and each
    stage's extras (a dropped stage's loss, extra[0], is zero). The next residual takes a fraction
    `quant_grad_frac` of the gradient through the stage's output (default 0: detached, each
    stage learns its own target).

    A dropped stage's learnable parameters (`stage_parameters[k]`) get a zero gradient through
    its zero loss, eagerly as in a compiled step (where every stage runs, masked), so the two
    agree, and DDP needs no find_unused_parameters for them.

    `keep_outputs=False`: the stages' outputs are not kept (None in their place), so that each
    one is freed once added to the sum (q x b x n x d less at the end of the forward).
    """
    quantized, residual, all_indices, outputs, extras = torch.zeros_like(x), x, [], [], []
    masked = isinstance(last_kept, Tensor)
    if masked:
        last_kept = last_kept.to(x.device)
    for k, stage in enumerate(stages):
        if not masked and k > last_kept:
            all_indices.append(torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device))
            outputs.append(torch.zeros_like(x) if keep_outputs else None)
            touch = zero_touch(stage_parameters[k]) if stage_parameters is not None else None
            extras.append(None if touch is None else [touch])
            continue
        active = last_kept >= k if masked else None
        stage_out, indices, *extra = stage(residual, active)
        if masked:  # a dropped stage (statically run): zero output, index -1, zero loss
            stage_out = torch.where(active, stage_out, 0.0)
            indices = torch.where(active, indices, -1)
            if extra:
                extra[0] = torch.where(active, extra[0], 0.0)
        residual = residual - frac_gradient(stage_out, quant_grad_frac)
        quantized = quantized + stage_out
        all_indices.append(indices)
        outputs.append(stage_out.detach() if keep_outputs else None)
        extras.append(extra)
    return quantized, torch.stack(all_indices, dim=-1), torch.stack(outputs) if keep_outputs else None, extras


def stage_codes(indices: Tensor, lookups: list[Callable], sizes: list[int] | None = None) -> Tensor:
    """indices (b, ..., q'), q' <= q, -1 = dropped -> codes (q, b, ..., d); missing stages dropped.

    lookups[k](valid indices (b, ...)) -> codes (b, ..., d) of stage k. With `sizes` (each
    stage's codebook size), every stage's indices are checked first, in one read (the lookups
    need not read them again); None: the caller checked them.
    """
    if indices.shape[-1] > len(lookups):
        raise ValueError(f"indices: expected at most {len(lookups)} quantizers on the last axis, "
                         f"got {indices.shape[-1]}")
    if sizes is not None:
        check_stage_indices(indices, sizes)
    if indices.shape[-1] < len(lookups):  # coarse indices (quantize dropout): pad as dropped
        pad = indices.new_full((*indices.shape[:-1], len(lookups) - indices.shape[-1]), -1)
        indices = torch.cat([indices, pad], dim=-1)
    codes = []
    for k, lookup in enumerate(lookups):
        dropped = indices[..., k] == -1
        stage = lookup(indices[..., k].masked_fill(dropped, 0))
        codes.append(stage.masked_fill(dropped.unsqueeze(-1), 0.0))
    return torch.stack(codes)


def sum_stages(codes: Tensor) -> Tensor:
    """(q, ...) -> (...), summed in stage order from zero, bit-for-bit like `run_stages`."""
    total = torch.zeros_like(codes[0])
    for stage in codes:
        total = total + stage
    return total


class ResidualQuantizer(TokenQuantizer):
    """What the residual families share: projections around the stages, quantize-dropout
    settings, the stage loop as the TokenQuantizer core, and decoding from indices. A subclass
    builds `self.layers` and says how stage k quantizes (`_stage`) and looks codes up
    (`_lookup_stage`), and how its index layout relates to (b, ..., q)."""

    quant_grad_frac = 0.0  # the fraction of the gradient through a stage's output into the next residual

    def __init__(self, dim: int, codebook_dim: int, num_quantizers: int, quantize_dropout: bool,
                 quantize_dropout_cutoff_index: int, quantize_dropout_multiple_of: int, process_group):
        super().__init__()
        check_quantize_dropout(num_quantizers, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        self.dim, self.codebook_dim = check_positive_int("dim", dim), codebook_dim
        self.num_quantizers = num_quantizers
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.process_group = process_group
        self._init_projections(self.dim, codebook_dim)
        self.dropout_draws = CounterDraws()  # quantize dropout's depths, alike on every rank

    # the core: the stage loop

    @fp32_island
    def _core(self, z: Tensor, keep: Tensor | None, seed=None, **options) -> Core:
        """z (b, n, d) fp32 -> the stages' sum (b, n, d), indices (b, n, q) (-1 for dropped
        stages), losses: each stage's first extra stacked (q,) (none when the stages return
        only codes and indices), extra: the stages' codes (q, b, n, d). `seed`: quantize
        dropout's (last_kept_stage); `options` go to every `_stage`."""
        self._broadcast_initial_state(z)
        last_kept = last_kept_stage(self, seed)
        stages = [partial(self._stage, k, keep=keep, **options) for k in range(self.num_quantizers)]
        quantized, indices, codes, extras = run_stages(z, stages, last_kept, self.quant_grad_frac,
                                                       [self._stage_parameters(k) for k in range(self.num_quantizers)])
        losses = torch.stack([extra[0] if extra else z.new_zeros(()) for extra in extras]) if any(extras) else ()
        return Core(quantized, indices, losses, codes)

    def _stage(self, k: int, residual: Tensor, active, keep: Tensor | None, **options) -> tuple:
        """Stage k on the residual (b, n, d) fp32 -> (quantized (b, n, d), indices (b, n), [loss])
        (run_stages' stage, whose `active` says whether a statically run stage is kept)."""
        raise NotImplementedError

    def _stage_parameters(self, k: int) -> list:
        """The parameters of stage k that get a zero gradient when quantize dropout drops it
        (run_stages): none by default."""
        return []

    def _all_codes(self, result: Quantization) -> Tensor:
        """The stages' codes of a forward (`result.extra`, (q, b, n, d) fp32) -> (q, b, ..., d) in
        the output's dtype, NaN at the non-finite tokens: the values a lookup by the indices
        would give, without one."""
        codes = mark_non_finite(result.extra, None if result.bad is None else result.bad.unsqueeze(0))
        return codes.reshape(codes.shape[0], *result.indices.shape[:-1], codes.shape[-1]).to(result.out.dtype)

    def _lookup_stage(self, k: int, indices: Tensor) -> Tensor:
        """Valid indices (b, ...) of stage k -> its contribution (b, ..., d), fp32."""
        raise NotImplementedError

    # every rank alike from the first synced step

    def _synced_owners(self, stages: bool = True) -> list:
        """What a synced training step makes identical on every rank (owners for
        distributed.broadcast_once_): the quantize-dropout seed; subclasses add every stage's
        state (unless `stages` is False: a frozen step), whether or not dropout runs the stage
        this step."""
        return [self.dropout_draws] if self.quantize_dropout and is_distributed(self.process_group) else []

    def _check_before_broadcast(self, z: Tensor) -> None:
        """Before the broadcast changes any state (a subclass whose stages raise on non-finite
        input checks it here)."""

    def _broadcast_initial_state(self, z: Tensor, stages: bool = True) -> None:
        """At the first synced training step (before quantize dropout draws): one broadcast of
        everything _synced_owners() lists from the group's first rank."""
        if not (self.training and torch.is_grad_enabled()):
            return
        broadcast_once_(self._synced_owners(stages), self.process_group, z.device,
                        before=lambda: self._check_before_broadcast(z))

    def _q_last(self, indices: Tensor) -> Tensor:
        """Indices as forward returns them -> (b, ..., q)."""
        return indices

    def _channel_first_output(self, indices: Tensor) -> bool:
        """Whether indices as forward returns them decode channel-first (as its output was)."""
        return self._channel_first(indices)

    @property
    def stage_sizes(self) -> list[int]:
        """Each stage's codebook size."""
        return [self.codebook_size] * self.num_quantizers

    def _stage_codes(self, indices: Tensor, checked: bool = False) -> Tensor:
        """`checked`: the caller read the indices' range already (GroupedResidual: all groups at once)."""
        return stage_codes(indices, [partial(self._lookup_stage, k) for k in range(self.num_quantizers)],
                           None if checked else self.stage_sizes)

    def get_codes_from_indices(self, indices: Tensor, *, _checked: bool = False) -> Tensor:
        """indices as forward returns them, -1 for dropped -> each stage's codes (q, b, ..., d) fp32.

        Fewer quantizers than num_quantizers (coarse indices) count the missing ones as dropped.
        """
        return self._stage_codes(self._q_last(indices), _checked)

    def get_output_from_indices(self, indices: Tensor, dtype: torch.dtype | None = None, *,
                                _checked: bool = False) -> Tensor:
        """indices as forward returns them -> the output forward gave (bitwise, in eval).

        float32 (the projection's dtype with projections) unless `dtype` is given. A token all
        of whose indices are -1 (masked, or non-finite input) decodes to zeros.
        """
        out = project(self.project_out, sum_stages(self.get_codes_from_indices(indices, _checked=_checked)))
        out = fill_tokens(out, (self._q_last(indices) == NO_CODE).all(-1), 0.0)
        out = out if dtype is None else out.to(dtype)
        return rearrange(out, "b ... d -> b d ...") if self._channel_first_output(indices) else out

    def code_usage(self, indices: Tensor, process_group=None) -> CodeUsage:
        """Per-quantizer usage of `indices` as forward returns them: fields of shape (q,)."""
        group = process_group if process_group is not None else self.process_group
        stages = self._q_last(indices).unbind(-1)
        return stack_usage([layer.code_usage(stage, group) for layer, stage in zip(self.layers, stages)])


class GroupedResidual(nn.Module):
    """`groups` independent residual quantizers over equal slices of the feature dim.

    forward returns the residual quantizers' tuples joined: the output concatenated along the
    feature axis, everything else stacked on a leading group axis.
    """

    def __init__(self, make_residual: Callable[..., nn.Module], dim: int, groups: int, accept_image_fmap: bool,
                 **kwargs):
        super().__init__()
        dim = check_positive_int("dim", dim)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or dim % groups:
            raise ValueError(f"groups: expected a positive divisor of dim={dim}, got {groups!r}")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList(make_residual(dim=dim // groups, **kwargs) for _ in range(groups))
        self.codebook_size = self.rvqs[0].codebook_size

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    @property
    def codebooks(self) -> Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    def forward(self, x: Tensor, **kwargs):
        if x.ndim < 2 or x.shape[self.split_dim] != self.dim:
            raise ValueError(f"{type(self).__name__}: expected feature dim {self.dim} on axis {self.split_dim}, "
                             f"got input shape {tuple(x.shape)}")
        seed = None
        if self.training and any(rvq.quantize_dropout for rvq in self.rvqs) and torch.is_grad_enabled():
            seed = DropoutDraw(self.rvqs[0].dropout_draws)  # all groups drop alike
        chunks = self._spread_non_finite(x, kwargs.get("mask")).chunk(self.groups, dim=self.split_dim)
        outs = [rvq(chunk, rand_quantize_dropout_fixed_seed=seed, **kwargs) for rvq, chunk in zip(self.rvqs, chunks)]
        quantized, *rest = zip(*outs)
        return (cat(quantized, dim=self.split_dim), *(stack(parts) for parts in rest))

    def _spread_non_finite(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """A token is judged by its whole feature vector: a non-finite feature in one group's
        slice makes the token NaN in every group's, so every group marks it (non_finite.py).
        Masked tokens are left as they are (a mask of the wrong shape is the groups' to refuse)."""
        if self.groups == 1:
            return x
        bad = non_finite_tokens(x, dim=self.split_dim)
        if isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.numel() == bad.numel():
            bad = bad & mask.reshape(bad.shape)
        return fill_tokens(x.movedim(self.split_dim, -1), bad, float("nan")).movedim(-1, self.split_dim)

    def _check_groups(self, indices: Tensor) -> None:
        if indices.ndim == 0 or indices.shape[0] != self.groups:
            raise ValueError(f"indices: expected a leading axis of groups={self.groups}, "
                             f"got shape {tuple(indices.shape)}")

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        self._check_group_indices(indices)
        return torch.stack([rvq.get_codes_from_indices(i, _checked=True) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        self._check_group_indices(indices)
        outs = [rvq.get_output_from_indices(i, dtype, _checked=True) for rvq, i in zip(self.rvqs, indices)]
        return cat(outs, dim=self.split_dim)

    def _check_group_indices(self, indices: Tensor) -> None:
        """Every group's indices (g, b, ..., q') against each stage's size, in one read."""
        self._check_groups(indices)
        check_stage_indices(indices, self.rvqs[0].stage_sizes)  # (a wrong shape is the groups' to refuse)
