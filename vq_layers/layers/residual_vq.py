"""Residual VQ (SoundStream, arXiv 2107.03312, Algorithm 1; EnCodec): quantizer k quantizes the
residual the quantizers before it left, each with its own (or one shared) EMA codebook."""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from ..checks import check_indices
from ..layout import check_mask, from_tokens, indices_from_tokens, to_tokens, without_padding
from ..precision import cat, fp32_island, project
from .residual import GroupedResidual, ResidualQuantizer, last_kept_stage, run_stages
from .vq import VectorQuantize

# VectorQuantize keywords that describe the outer layer's input, not a stage's
_LAYOUT_KEYWORDS = ("channel_last", "accept_3d_fmap", "heads", "separate_codebook_per_head")


class ResidualVQ(ResidualQuantizer):
    """Residual vector quantization.

    Shapes:
        forward(x): x (b, n, dim) (or (b, dim, h, w) with accept_image_fmap); mask (b, n) bool
            -> (quantized like x in x's dtype, indices (b, n, q) (or (b, h, w, q)) int64,
                losses (q,) fp32 [, all_codes (q, b, n, d) with return_all_codes]).
            With `indices` (b, n, q) given -> (the output of those codes, summed cross-entropy of
            each stage's residual to its given code), the residuals taken from the given codes.
        Dropped quantizers (quantize_dropout in training) and masked tokens get index -1.

    With shared_codebook, every stage searches the codebook as it was before the step, and the
    codebook is updated once from all stages' statistics at the end of the step.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        return_zeros_for_masked_padding: bool = True,
        process_group=None,
        **vq_kwargs,
    ):
        if heads != 1:
            raise ValueError(f"heads: ResidualVQ supports 1 (use GroupedResidualVQ to split features), got {heads}")
        for name in _LAYOUT_KEYWORDS:
            if name in vq_kwargs:
                raise ValueError(f"{name}: not a ResidualVQ keyword (stages see (b, n, codebook_dim) tokens)")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        super().__init__(dim, codebook_dim, num_quantizers, quantize_dropout, quantize_dropout_cutoff_index,
                         quantize_dropout_multiple_of, process_group)
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.shared_codebook = shared_codebook
        self.layers = nn.ModuleList(
            VectorQuantize(dim=codebook_dim, codebook_size=codebook_size, process_group=process_group,
                           return_zeros_for_masked_padding=return_zeros_for_masked_padding, **vq_kwargs)
            for _ in range(num_quantizers)
        )
        if shared_codebook:
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook
        self.codebook_size = self.layers[0].codebook_size

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_size={self.codebook_size}, "
                f"shared_codebook={self.shared_codebook}, quantize_dropout={self.quantize_dropout}")

    @property
    def codebooks(self) -> Tensor:
        """(q, codebook_size, codebook_dim)."""
        return torch.stack([layer.codebook for layer in self.layers])

    @fp32_island
    def _residual_quantize(self, z: Tensor, keep: Tensor | None, temperature: float | None, freeze: bool,
                           last_kept: int):
        """z (b, n, d) fp32 -> quantized (b, n, d), indices (b, n, q), losses (q,), stage codes (q, b, n, d)."""
        updating = self.training and torch.is_grad_enabled() and not freeze
        results = []

        def stage(layer, residual):
            temp = layer.sample_codebook_temp if temperature is None else temperature
            result = layer._quantize(residual, keep, temp, updating, updating and not self.shared_codebook,
                                     layer.ema_update, freeze)
            results.append(result)
            return result.quantized, result.indices[..., 0], result.loss

        stages = [lambda r, layer=layer: stage(layer, r) for layer in self.layers]
        quantized, indices, codes, extras = run_stages(z, stages, last_kept)
        if updating and self.shared_codebook and results:
            # one update from every stage's vectors, after all stages searched the same codebook
            keeps = None if keep is None else torch.cat([r.keep for r in results], dim=1)
            first = self.layers[0]
            first._codebook.update_(torch.cat([r.search for r in results], dim=1),
                                    torch.cat([r.codebook_indices for r in results], dim=1), keeps,
                                    first.ema_update, first._sync(), self.process_group)
        losses = torch.stack([extra[0] if extra is not None else z.new_zeros(()) for extra in extras])
        return quantized, indices, losses, codes

    @fp32_island
    def _teacher_forced(self, z: Tensor, keep: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Each stage's cross-entropy to its given code, residuals taken from the given codes."""
        residual, total, ce = z, torch.zeros_like(z), z.new_zeros(())
        for k, layer in enumerate(self.layers):
            given = targets[..., k : k + 1]
            if keep is not None:
                given = given.masked_fill(~keep.unsqueeze(-1), -1)
            result = layer._quantize(residual, keep, 0.0, False, False, False, True,
                                     targets=rearrange(given, "b n 1 -> 1 (b n)"))
            ce = ce + result.loss
            codes = layer._lookup(given)
            residual, total = residual - codes, total + codes
        return total, ce

    def forward(self, x: Tensor, mask: Tensor | None = None, indices: Tensor | None = None,
                return_all_codes: bool = False, sample_codebook_temp: float | None = None,
                freeze_codebook: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        dtype = x.dtype
        tokens, spatial = to_tokens(x, self.accept_image_fmap, self.dim, "ResidualVQ")
        keep = check_mask(mask, tokens, spatial)
        z = project(self.project_in, without_padding(tokens, keep))
        if indices is not None:
            targets = self._check_targets(indices, tokens)
            quantized, ce = self._teacher_forced(z, keep, targets)
            return self._output(quantized, tokens, keep, dtype, spatial), ce
        last_kept = last_kept_stage(self, x, rand_quantize_dropout_fixed_seed)
        quantized, all_indices, losses, codes = self._residual_quantize(
            z, keep, sample_codebook_temp, freeze_codebook, last_kept)
        out = self._output(quantized, tokens, keep, dtype, spatial)
        all_indices = indices_from_tokens(all_indices, spatial)
        if not return_all_codes:
            return out, all_indices, losses
        all_codes = codes.reshape(codes.shape[0], *all_indices.shape[:-1], codes.shape[-1]).to(dtype)
        return out, all_indices, losses, all_codes

    def _output(self, quantized: Tensor, tokens: Tensor, keep: Tensor | None, dtype, spatial) -> Tensor:
        out = project(self.project_out, quantized)
        if keep is not None:
            masked_value = torch.zeros_like(out) if self.return_zeros_for_masked_padding else tokens.to(out.dtype)
            out = torch.where(keep.unsqueeze(-1), out, masked_value)
        return from_tokens(out.to(dtype), spatial, self.accept_image_fmap)

    def _check_targets(self, indices: Tensor, tokens: Tensor) -> Tensor:
        """indices (b, ..., q) -> (b, n, q) int64, checked."""
        check_indices(indices, self.codebook_size)  # no -1: every stage needs its given code
        expected = (tokens.shape[0], tokens.shape[1], self.num_quantizers)
        if indices.numel() != tokens.shape[0] * tokens.shape[1] * self.num_quantizers or indices.shape[-1] != self.num_quantizers:
            raise ValueError(f"indices: expected one index per token and quantizer, (b, ..., q) = {expected}, "
                             f"got shape {tuple(indices.shape)}")
        return indices.long().reshape(expected)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (b, ..., q'), q' <= q, -1 = dropped or masked -> each stage's codes (q, b, ..., d) fp32."""
        check_indices(indices, self.codebook_size, allow_dropped=True)
        if indices.ndim < 2:
            raise ValueError(f"indices: expected (b, ..., q), got shape {tuple(indices.shape)}")
        return super().get_codes_from_indices(indices)

    def get_output_from_indices(self, indices: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """indices as forward returns them -> the output forward gave (bitwise in eval; masked
        tokens, all of whose indices are -1, are zeros)."""
        out = super().get_output_from_indices(indices, dtype)
        masked = (indices < 0).all(-1)
        return out.masked_fill(masked.unsqueeze(1 if self.accept_image_fmap else -1), 0.0)

    def _lookup_stage(self, k: int, indices: Tensor) -> Tensor:
        return self.layers[k]._lookup(indices.unsqueeze(-1))

    def _channel_first_output(self, indices: Tensor) -> bool:
        return self.accept_image_fmap


class GroupedResidualVQ(GroupedResidual):
    """`groups` independent ResidualVQs over equal slices of the feature dim.

    Shapes: x (b, n, dim) (or (b, dim, h, w) with accept_image_fmap) -> (quantized like x,
    indices (g, b, n, q), losses (g, q) [, all_codes (g, q, b, n, d)]); with `indices`
    (g, b, n, q) given -> (quantized, summed cross-entropy).
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__(partial(ResidualVQ, accept_image_fmap=accept_image_fmap), dim, groups, accept_image_fmap, **kwargs)

    def forward(self, x: Tensor, indices: Tensor | None = None, return_all_codes: bool = False,
                sample_codebook_temp: float | None = None, freeze_codebook: bool = False, mask: Tensor | None = None):
        if indices is None:
            return super().forward(x, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                                   freeze_codebook=freeze_codebook, mask=mask)
        self._check_groups(indices)
        chunks = x.chunk(self.groups, dim=self.split_dim)
        outs = [rvq(chunk, mask=mask, indices=i) for rvq, chunk, i in zip(self.rvqs, chunks, indices)]
        return cat([q for q, _ in outs], dim=self.split_dim), sum(ce for _, ce in outs)
