"""BEST-RQ's random-projection quantizer (Chiu et al. 2022, arXiv 2202.01855), a drop-in for
vector-quantize-pytorch's RandomProjectionQuantizer.

Targets for self-supervised speech models: the input is normalized (layer norm without learned
parameters, section 3 of the paper), projected by a frozen random matrix per codebook, and
assigned the nearest code of a frozen random codebook by cosine similarity. Nothing learns.
Normalization, projection and search all run in an fp32 island, so the targets do not depend on
module dtype, input dtype or autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive_int
from ..distributed import broadcast_, first_rank, is_distributed
from ..kernels.nearest_code import _ieee_fp32_matmul
from ..layout import to_tokens
from ..non_finite import mark_losses, mark_non_finite, non_finite_tokens
from ..precision import Fp32BuffersModule, fp32_island
from .vq import VectorQuantize

# VectorQuantize keywords this layer decides itself
_FIXED = ("dim", "heads", "codebook_dim", "use_cosine_sim", "separate_codebook_per_head")


class RandomProjectionQuantizer(Fp32BuffersModule):
    """Frozen random projections and codebooks, one per codebook.

    Shapes:
        forward(x): x (b, ..., dim) -> indices (b, ...) int64 with num_codebooks == 1,
            (b, ..., num_codebooks) otherwise.
        forward(x, indices): indices as forward returns them -> cross-entropy (fp32 scalar) of
            softmax over codes of the cosine similarities to the given codes (mean over tokens
            and codebooks), differentiable in x.
        A token whose input is not finite gets target -1, and the cross-entropy is NaN with one.

    rand_projs (num_codebooks, dim, codebook_dim) and the codebooks are fp32 buffers (also under
    `.half()`). Ranks built from different seeds agree: under torch.distributed (unless
    sync_codebook=False) the first forward broadcasts both from the group's first rank, so every
    rank must call that forward. Further keywords go to the inner VectorQuantize (which always
    runs as in eval: no statistics change).
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        codebook_dim: int,
        num_codebooks: int = 1,
        norm: bool = True,
        sync_codebook: bool | None = None,
        process_group=None,
        **kwargs,
    ):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.codebook_dim = check_positive_int("codebook_dim", codebook_dim)
        self.num_codebooks = check_positive_int("num_codebooks", num_codebooks)
        for name in _FIXED:
            if name in kwargs:
                raise ValueError(f"{name}: set by RandomProjectionQuantizer itself, not a keyword it passes on")
        if kwargs.get("kmeans_init"):
            raise ValueError("kmeans_init: the codebook of a random-projection quantizer is frozen random "
                             "(BEST-RQ); k-means would need training steps it never takes")
        self.norm, self.sync_codebook, self.process_group = norm, sync_codebook, process_group

        rand_projs = nn.init.xavier_normal_(torch.empty(self.num_codebooks, self.dim, self.codebook_dim))
        self.register_fp32_buffer("rand_projs", rand_projs)
        self.vq = VectorQuantize(
            dim=self.codebook_dim * self.num_codebooks, codebook_size=codebook_size, codebook_dim=self.codebook_dim,
            heads=self.num_codebooks, separate_codebook_per_head=True, use_cosine_sim=True, sync_codebook=False,
            **kwargs,
        ).eval()  # the targets never train (`train` keeps it so)
        self.codebook_size = self.vq.codebook_size
        self._broadcast = False  # per process: has the first synced forward made the ranks agree?

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"num_codebooks={self.num_codebooks}, norm={self.norm}")

    def train(self, mode: bool = True):
        super().train(mode)
        self.vq.eval()  # the targets never train
        return self

    @torch.no_grad()
    def _agree_across_ranks(self) -> None:
        """Every rank takes the first rank's projections and codebooks, once per process."""
        if self._broadcast or self.sync_codebook is False or not is_distributed(self.process_group):
            return
        self.keep_fp32_buffers_()
        broadcast_(self.rand_projs, first_rank(self.process_group), self.process_group)
        self.vq.broadcast_codebook_(self.process_group)
        self._broadcast = True

    @fp32_island
    def _project(self, tokens: Tensor) -> Tensor:
        """tokens (b, n, dim) -> (b, n, num_codebooks * codebook_dim), fp32."""
        if self.norm:
            tokens = F.layer_norm(tokens, (self.dim,))
        with _ieee_fp32_matmul(tokens.device):
            projected = torch.einsum("b n d, h d e -> b n h e", tokens, self.rand_projs)
        return projected.flatten(2)

    def forward(self, x: Tensor, indices: Tensor | None = None):
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a tensor, got {type(x).__name__}")
        tokens, _ = to_tokens(x, False, self.dim, "RandomProjectionQuantizer")
        bad = non_finite_tokens(tokens)  # no target (-1) for them; the loss NaN with one
        self._agree_across_ranks()
        projected = self._project(tokens)
        if indices is not None:
            targets = self._token_indices(indices, tokens)
            if targets.numel() == 0:  # no token: no loss (VectorQuantize cannot place 0 given indices)
                return projected.sum() * 0.0
            return mark_losses(self.vq(projected, indices=targets)[1], bad)
        _, codes, _ = self.vq(projected)  # (b, n[, num_codebooks])
        codes = mark_non_finite(codes, bad)
        return codes.reshape(*x.shape[:-1], *codes.shape[2:])

    def _token_indices(self, indices: Tensor, tokens: Tensor) -> Tensor:
        """Given indices (b, ...[, num_codebooks]) -> (b, n[, num_codebooks])."""
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices: expected an integer tensor, got {type(indices).__name__}")
        expected = (*tokens.shape[:2], *((self.num_codebooks,) if self.num_codebooks > 1 else ()))
        if indices.numel() != tokens.shape[0] * tokens.shape[1] * self.num_codebooks or (
                self.num_codebooks > 1 and (indices.ndim < 2 or indices.shape[-1] != self.num_codebooks)):
            raise ValueError(f"indices: expected one index per token and codebook, {expected} in token layout, "
                             f"got shape {tuple(indices.shape)}")
        return indices.reshape(expected)
