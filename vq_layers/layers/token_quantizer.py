"""The forward skeleton every token quantizer shares, written once.

    x (any layout) -> tokens (b, n, dim) -> mask checked -> padding zeroed -> project_in
    -> the family's fp32 core (FSQ's rounding, LFQ's signs, VQ's search, a residual chain)
    -> project_out -> masked tokens filled -> the input's dtype -> non-finite tokens marked
    -> the input's layout; indices (b, n, c) -> (b, ..., c)

A family implements `_core(z, keep, **options) -> Core` on (b, n, inner) tokens and writes a
`forward` that only maps its public arguments onto `quantize_tokens` and its result onto the
tuple its users expect. The pieces the families' constructors and decoders share live here too:
projections, the fixed orthogonal rotation, the codebook-axis option, decoding into the input's
layout, code usage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from ..checks import MAX_MATERIALIZED_ELEMENTS, check_codebook_axis
from ..layout import check_mask, from_tokens, indices_from_tokens, lens_to_mask, to_tokens, without_padding
from ..non_finite import NO_CODE, fill_tokens, mark_non_finite, nan_if_any, non_finite_tokens
from ..precision import Fp32BuffersModule, project
from ..usage import CodeUsage, code_usage


class Core(NamedTuple):
    """What a family's fp32 core returns, in token layout."""
    quantized: Tensor  # (b, n, inner) fp32, before project_out
    indices: Tensor  # (b, n, c) int64, -1 where masked
    losses: Any = ()  # a loss tensor, or a tuple (named or not) or dict of them, each over the batch
    extra: Any = None  # anything else the family's forward returns (all codes, info dicts)


class Layout(NamedTuple):
    """Where the tokens came from: enough to put results back."""
    dtype: torch.dtype
    spatial: tuple[int, ...]
    channel_first: bool
    single: bool  # a (b, dim) input of one token per sample (VectorQuantize's)


class Quantization(NamedTuple):
    """`quantize_tokens`' result, in the input's layout."""
    out: Tensor  # like x, in x's dtype
    indices: Tensor  # (b, ...[, c])
    losses: Any  # as the core returned them, NaN when any token was not finite
    extra: Any
    keep: Tensor | None  # (b, n) the checked mask
    bad: Tensor | None  # (b, n) the non-finite tokens, None when the core refused them


def mark_all(losses, bad: Tensor | None, factor: Tensor | None = None):
    """Every loss in a core's `losses` (a tensor, or a tuple, NamedTuple or dict of them, nested
    as deep as need be) NaN when a token is bad: times one `factor` (`nan_if_any(bad)`)."""
    if bad is None:
        return losses
    factor = nan_if_any(bad) if factor is None else factor
    if isinstance(losses, Tensor):
        return losses * factor.to(losses.dtype)
    if isinstance(losses, dict):
        return {name: mark_all(loss, bad, factor) for name, loss in losses.items()}
    marked = [mark_all(loss, bad, factor) for loss in losses]
    return type(losses)(*marked) if hasattr(losses, "_fields") else type(losses)(marked)


def check_keep_num_codebooks_dim(keep_num_codebooks_dim: bool | None, num_codebooks: int) -> bool:
    """The `keep_num_codebooks_dim` option resolved: by default a codebook axis on the indices
    when there are several codebooks; one must be kept then."""
    if keep_num_codebooks_dim is None:
        return num_codebooks > 1
    if num_codebooks > 1 and not keep_num_codebooks_dim:
        raise ValueError(f"keep_num_codebooks_dim: must be True with num_codebooks={num_codebooks} > 1")
    return keep_num_codebooks_dim


class TokenQuantizer(Fp32BuffersModule):
    """Base of the token quantizers: the skeleton above. A subclass sets `dim`, `project_in`,
    `project_out` (`_init_projections`) and `keep_num_codebooks_dim`, and implements `_core`;
    hooks with defaults: `_channel_first` and `_layout` (how an input maps to tokens),
    `return_zeros_for_masked_padding`, `per_sample_mask`."""

    keep_num_codebooks_dim = True
    num_codebooks = 1
    max_implicit_codebook_elements = MAX_MATERIALIZED_ELEMENTS  # the largest codebook built on request
    return_zeros_for_masked_padding = True  # False: masked tokens pass through unchanged
    per_sample_mask = False  # whether a (b,) mask keeps or drops whole samples

    def _core(self, z: Tensor, keep: Tensor | None, **options) -> Core:
        raise NotImplementedError

    def _channel_first(self, x: Tensor) -> bool:
        """Whether an input of x's rank is channel-first (it may be anything of that rank: the
        decoders ask with their (b, ..., dim) codes). Default: as `self.channel_first` says, and
        when that is None (or absent), for images and video (4+ dims)."""
        channel_first = getattr(self, "channel_first", None)
        return x.ndim >= 4 if channel_first is None else bool(channel_first)

    def _layout(self, x: Tensor) -> tuple[Tensor, Layout]:
        """x -> tokens (b, n, dim) and its Layout."""
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a floating point tensor, got {type(x).__name__}")
        channel_first = self._channel_first(x)
        tokens, spatial = to_tokens(x, channel_first, self.dim, type(self).__name__)
        return tokens, Layout(x.dtype, spatial, channel_first, False)

    def quantize_tokens(self, x: Tensor, mask: Tensor | None = None, lens: Tensor | None = None,
                        refuses_non_finite: bool = False, **options) -> Quantization:
        """The skeleton; `options` go to `_core`. `refuses_non_finite`: the core raises on a
        non-finite token (an updating step: docs/precision.md), so there is nothing to mark."""
        tokens, layout, keep, z = self._tokens_in(x, mask, lens)
        bad = None if refuses_non_finite else non_finite_tokens(tokens, keep)
        core = self._core(z, keep, **options)
        # NaN at the bad tokens before project_out (a Linear keeps a NaN row NaN): marked in the
        # codes' (often much smaller) dim rather than the output's
        out = project(self.project_out, mark_non_finite(core.quantized, bad))
        if keep is not None:
            masked = torch.zeros_like(out) if self.return_zeros_for_masked_padding else tokens.to(out.dtype)
            out = torch.where(keep.unsqueeze(-1), out, masked)
        out = from_tokens(out.to(layout.dtype), layout.spatial, layout.channel_first)
        indices = indices_from_tokens(mark_non_finite(core.indices, bad), layout.spatial)
        if not self.keep_num_codebooks_dim:
            indices = rearrange(indices, "... 1 -> ...")
        if layout.single:
            out, indices = out[:, 0], indices[:, 0]
        return Quantization(out, indices, mark_all(core.losses, bad), core.extra, keep, bad)

    def _tokens_in(self, x: Tensor, mask: Tensor | None = None, lens: Tensor | None = None):
        """x -> (tokens (b, n, dim), Layout, keep (b, n) or None, z: the kept tokens through
        project_in, (b, n, inner): what `_core` quantizes)."""
        tokens, layout = self._layout(x)
        keep = self._keep(mask, lens, tokens, layout)
        return tokens, layout, keep, project(self.project_in, without_padding(tokens, keep))

    def _keep(self, mask, lens, tokens: Tensor, layout: Layout) -> Tensor | None:
        """The mask (b, n) bool (True = keep), from `mask` or sequence `lens`, or None."""
        if mask is not None and lens is not None:
            raise ValueError("mask, lens: give at most one of them, got both")
        if lens is not None:
            return lens_to_mask(lens, tokens, layout.spatial)
        if layout.single and mask is not None and mask.ndim == 1:
            mask = mask.reshape(-1, 1)  # one token per sample: (b,) is per token
        return check_mask(mask, tokens, layout.spatial, per_sample=self.per_sample_mask)

    # what the families' constructors and decoders share

    def _init_projections(self, dim: int, inner: int, has_projections: bool | None = None, bias: bool = True,
                          make_project_in: Callable[[], nn.Module] | None = None) -> None:
        """project_in (dim -> inner) and project_out (inner -> dim) Linear layers, or Identity
        when the dims agree (or `has_projections` is False); `make_project_in` builds another
        project_in. Sets `has_projections`."""
        self.has_projections = dim != inner if has_projections is None else has_projections
        if self.has_projections:
            self.project_in = make_project_in() if make_project_in is not None else nn.Linear(dim, inner, bias=bias)
            self.project_out = nn.Linear(inner, dim, bias=bias)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

    def _init_rotation(self, orthogonal_rotation: bool, codebook_dim: int) -> None:
        """With `orthogonal_rotation`, a fixed random orthogonal matrix `orthogonal_rot` (float32,
        in the state dict) that codes are quantized in."""
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rotation = nn.init.orthogonal_(torch.empty(codebook_dim, codebook_dim))
            self.register_fp32_buffer("orthogonal_rot", rotation)

    def _rotate(self, z: Tensor) -> Tensor:
        """(..., codebook_dim) into the rotated frame (unchanged without a rotation)."""
        return z @ self.orthogonal_rot if self.orthogonal_rotation else z

    def _rotate_back(self, codes: Tensor) -> Tensor:
        return codes @ self.orthogonal_rot.t() if self.orthogonal_rotation else codes

    def _decode(self, indices: Tensor, lookup: Callable[[Tensor], Tensor], project_out: bool = True) -> Tensor:
        """indices as forward returns them, (b, ...[, c]) -> codes (b, ..., dim), channel-first
        where forward's output was. `lookup`: indices (b, ..., c) -> codes (b, ..., c, d), a
        codebook's -1 contributing zeros. With `project_out`, through project_out, and a token
        whose every index is -1 (masked, or non-finite input) decodes to zeros, as forward
        outputs a masked token (whatever `lookup` gave it)."""
        check_codebook_axis(indices, self.keep_num_codebooks_dim, self.num_codebooks)
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = rearrange(lookup(indices), "... c d -> ... (c d)")
        if project_out:
            codes = fill_tokens(project(self.project_out, codes), (indices == NO_CODE).all(-1), 0.0)
        return rearrange(codes, "b ... d -> b d ...") if self._channel_first(codes) else codes

    def _check_buildable(self, name: str) -> None:
        """Refuses to build all codebook_size codes (`name`) beyond max_implicit_codebook_elements."""
        elements = self.codebook_size * self.codebook_dim
        if elements > self.max_implicit_codebook_elements:
            raise ValueError(
                f"{name}: {self.codebook_size} codes x {self.codebook_dim} dims would take "
                f"{elements * 4 / 2**30:.1f} GiB (limit {self.max_implicit_codebook_elements * 4 / 2**30:.2f} GiB); "
                "call indices_to_codes on the indices you need instead")

    def code_usage(self, indices: Tensor, process_group=None) -> CodeUsage:
        """Perplexity and fraction of the codebook used by `indices` (all codebooks pooled; -1
        counts nowhere); over the layer's process group unless one is given."""
        group = process_group if process_group is not None else getattr(self, "process_group", None)
        return code_usage(indices, self.codebook_size, group)
