"""Residual FSQ: quantizer k sees the residual of quantizers < k, at a scale (levels-1)^-k.

With symmetric levels the grid step is 2/(L-1), so a residual lies in [-1/(L-1), 1/(L-1)];
scaling stage k by (L-1)^-k maps the whole [-1, 1] grid of the next stage exactly onto that
interval (vector-quantize-pytorch scales by L^-k, which leaves part of the cell uncovered).

A model trained with the other scales gives other codes with ours, and the scales are not in
vector-quantize-pytorch's state dict. So a state dict records ours (the `scales` entry, written
when the stages use (L-1)^-k), and loading one without that record (vector-quantize-pytorch's, or
vq_layers' from before the record existed) takes L^-k and warns once, unless `stage_scales` says
which to take.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from ..precision import fp32_island
from .fsq import FSQ, check_levels
from .peer_checkpoint import GroupsWarnOnce, warn_unrecorded
from .residual import GroupedResidual, ResidualQuantizer

# stage k's scale: (levels - 1) ** -k (ours) or levels ** -k (vector-quantize-pytorch's)
STAGE_SCALES = ("vq_layers", "vector_quantize_pytorch")


def stage_scales_table(levels: list[int], num_quantizers: int, rule: str) -> Tensor:
    """(num_quantizers, len(levels)) fp32 scales of `rule`, computed as the peer computes its own."""
    base = torch.tensor(levels, dtype=torch.float32) - (1.0 if rule == "vq_layers" else 0.0)
    return torch.stack([base**-k for k in range(num_quantizers)])


def check_stage_scales(stage_scales) -> str | None:
    if stage_scales is not None and stage_scales not in STAGE_SCALES:
        raise ValueError(f"stage_scales: expected None, 'vq_layers' or 'vector_quantize_pytorch', got {stage_scales!r}")
    return stage_scales


class ResidualFSQ(ResidualQuantizer):
    """Residual finite scalar quantization (SoundStream's Algorithm 1 with FSQ stages).

    Shapes:
        forward(x): x (b, n, dim) | (b, dim), or (b, dim, ...) with is_channel_first
            -> (quantized like x in x's dtype, indices (b, n, q) int64 | (b, q, ...) channel-first
               [, all_codes (q, b, n, d) scaled codes in x's dtype with return_all_codes]).
        Dropped quantizers (quantize_dropout in training) get index -1; so does every stage of
        a token whose input is not finite, with a NaN output (docs/precision.md).

    stage_scales: stage k's scale. None (default): (levels - 1) ** -k for a new model; loading a
        state dict takes the scales it records, and levels ** -k (vector-quantize-pytorch's, with
        one warning) when it records none. 'vq_layers' or 'vector_quantize_pytorch' take
        (levels - 1) ** -k or levels ** -k, for a new model and for a state dict without a record.
        The state dict records (levels - 1) ** -k (entry `scales`, with num_quantizers > 1);
        with levels ** -k it is vector-quantize-pytorch's.
    """

    def __init__(
        self,
        dim: int | None = None,
        levels=None,
        num_quantizers: int | None = None,
        *,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value=None,
        bound_hard_clamp: bool = True,
        stage_scales: str | None = None,
        process_group=None,
        **fsq_kwargs,
    ):
        levels = check_levels(levels)
        stage_scales = check_stage_scales(stage_scales)
        super().__init__(len(levels) if dim is None else dim, len(levels), num_quantizers, quantize_dropout,
                         quantize_dropout_cutoff_index, quantize_dropout_multiple_of, process_group)
        if not fsq_kwargs.pop("preserve_symmetry", True):
            raise ValueError("preserve_symmetry: ResidualFSQ needs the symmetric grid, got False")
        if fsq_kwargs.get("num_codebooks", 1) != 1:
            raise ValueError(f"num_codebooks: ResidualFSQ supports 1, got {fsq_kwargs['num_codebooks']}")
        if bound_hard_clamp and soft_clamp_input_value is not None:
            raise ValueError("soft_clamp_input_value: must be None with bound_hard_clamp=True")

        self.levels = levels
        self.is_channel_first = is_channel_first
        self.layers = nn.ModuleList(
            FSQ(levels=levels, dim=self.codebook_dim, preserve_symmetry=True,
                bound_hard_clamp=bound_hard_clamp, **fsq_kwargs)
            for _ in range(num_quantizers)
        )
        self.codebook_size = self.layers[0].codebook_size

        # None: (levels - 1) ** -k, and levels ** -k for a checkpoint that records no scales
        self._stage_scales_given = stage_scales
        self._warn_on_load = True  # GroupedResidualFSQ warns once for all its groups
        self.stage_scales = stage_scales or "vq_layers"
        # not a plain persistent buffer: written by _save_to_state_dict only when it is ours
        self.register_fp32_buffer("scales", stage_scales_table(levels, num_quantizers, self.stage_scales),
                                  persistent=False)
        steps = torch.tensor(levels, dtype=torch.float32) - 1
        if bound_hard_clamp:
            # inputs up to one half-cell past +-1 still round to the outermost code
            soft_clamp_input_value = 1 + 1 / steps
        if soft_clamp_input_value is not None:
            soft_clamp_input_value = torch.as_tensor(soft_clamp_input_value, dtype=torch.float32)
            self.register_fp32_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)
        else:
            self.soft_clamp_input_value = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, levels={self.levels}, num_quantizers={self.num_quantizers}, "
            f"quantize_dropout={self.quantize_dropout}, stage_scales={self.stage_scales!r}"
        )

    # checkpoints: the scales are recorded when they are ours; vector-quantize-pytorch's state
    # dict (which has no entry for them) stays what it is for a model with its scales

    def _records_scales(self) -> bool:
        return self.stage_scales == "vq_layers" and self.num_quantizers > 1

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._records_scales():
            destination[prefix + "scales"] = self.scales if keep_vars else self.scales.detach()

    def _falls_back(self, state_dict, prefix) -> bool:
        """Whether loading `state_dict` takes levels ** -k without having been told to."""
        return prefix + "scales" not in state_dict and self._stage_scales_given is None and self.num_quantizers > 1

    def _warn_unrecorded(self, layer: str, prefix: str) -> None:
        warn_unrecorded(layer, prefix, "stage scales", "stage scales levels ** -k", "(levels - 1) ** -k",
                        "stage_scales", "vq_layers", "vector_quantize_pytorch")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = state_dict.pop(prefix + "scales", None)  # (a copy of the caller's dict)
        if saved is None:
            if self._falls_back(state_dict, prefix) and self._warn_on_load:
                self._warn_unrecorded(type(self).__name__, prefix)
            self._set_stage_scales(self._stage_scales_given or "vector_quantize_pytorch")
        else:
            rule = self._rule_of(saved)
            if rule is None:
                error_msgs.append(
                    f"{prefix}scales: expected the stage scales (levels - 1) ** -k or levels ** -k, of shape "
                    f"{tuple(self.scales.shape)}, for levels={self.levels}, got {saved!r}")
            else:
                self._set_stage_scales(rule)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _rule_of(self, saved: Tensor) -> str | None:
        """The rule a saved table follows: the nearer one, within 1% (a checkpoint cast to bf16
        still loads, with the exact scales)."""
        if not isinstance(saved, Tensor) or saved.shape != self.scales.shape or saved.is_meta:
            return None
        saved = saved.detach().to("cpu", torch.float32)
        errors = {}
        for rule in STAGE_SCALES:
            table = stage_scales_table(self.levels, self.num_quantizers, rule)
            errors[rule] = float(((saved - table).abs() / table).max())
        rule = min(errors, key=errors.get)
        return rule if errors[rule] <= 1e-2 else None

    @torch.no_grad()
    def _set_stage_scales(self, rule: str) -> None:
        self.stage_scales = rule
        self.scales.copy_(stage_scales_table(self.levels, self.num_quantizers, rule))  # the same buffer object

    @property
    def codebooks(self) -> Tensor:
        """(q, codebook_size, len(levels)) unscaled implicit codebooks, built on demand."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def _channel_first(self, x: Tensor) -> bool:
        return self.is_channel_first

    @fp32_island
    def _core(self, z: Tensor, keep: None = None, **options):
        """The soft clamp, then the stages (ResidualQuantizer's core); the non-finite tokens were
        judged before it (it makes +-inf finite)."""
        if self.soft_clamp_input_value is not None:
            z = (z / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        return super()._core(z, keep, **options)

    def _stage(self, k: int, residual: Tensor, active, keep: None) -> tuple[Tensor, Tensor]:
        codes, indices = self.layers[k](residual / self.scales[k])
        return codes * self.scales[k], indices

    def _lookup_stage(self, k: int, indices: Tensor) -> Tensor:
        return self.layers[k].indices_to_raw_codes(indices, checked=True) * self.scales[k]

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        result = self.quantize_tokens(x, seed=rand_quantize_dropout_fixed_seed)
        indices = rearrange(result.indices, "b ... q -> b q ...") if self.is_channel_first else result.indices
        return (result.out, indices, self._all_codes(result)) if return_all_codes else (result.out, indices)

    def _q_last(self, indices: Tensor) -> Tensor:
        return rearrange(indices, "b q ... -> b ... q") if self.is_channel_first else indices


class GroupedResidualFSQ(GroupsWarnOnce, GroupedResidual):
    """`groups` independent ResidualFSQs over equal slices of the feature dim.

    Shapes: x (b, n, dim) (or (b, dim, ...) with accept_image_fmap) -> (quantized like x,
    indices (g, b, n, q) [, all_codes (g, q, b, n, d)]).
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        kwargs.setdefault("is_channel_first", accept_image_fmap)
        super().__init__(ResidualFSQ, dim, groups, accept_image_fmap, **kwargs)
        self._silence_groups()

    def forward(self, x: Tensor, return_all_codes: bool = False):
        return super().forward(x, return_all_codes=return_all_codes)
