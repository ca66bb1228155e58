"""SimVQ (Zhu et al. 2024, arXiv 2411.02038): vector quantization whose codebook is a learned
linear map of a frozen random one, a drop-in for vector-quantize-pytorch's SimVQ.

The frozen codebook C (K, frozen_codebook_dim) never changes; the implicit codebook is
C W = code_transform(C) (K, dim), and the map W (or any module given as `codebook_transform`)
is what learns, through the commitment loss. Every code moves with W, so none is left dead.

The map builds the codebook in its own dtype (the module's), with autocast off: a surrounding
autocast must not round the codes. The search, the losses and the gradient estimator run in an
fp32 island on the implicit codebook it gave.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..checks import check_indices, check_non_negative, check_positive_int
from ..distributed import broadcast_once_, is_distributed
from ..kernels.nearest_code import nearest_code
from ..precision import fp32_island, project, without_autocast
from ..rotation_trick import rotation_trick
from ..straight_through import straight_through
from ..usage import CodeUsage, code_usage
from .token_quantizer import Core, TokenQuantizer


def identity(t: Tensor) -> Tensor:
    return t



class SimVQ(TokenQuantizer):
    """Vector quantizer over the implicit codebook code_transform(frozen_codebook).

    Shapes:
        forward(x): x (b, ..., dim), or (b, dim, ...) with channel_first
            -> (quantized like x in x's dtype, indices (b, ...) int64, commit_loss fp32 scalar);
            a token whose input is not finite gets index -1, a NaN output and a NaN loss.
        indices_to_codes(indices (b, ...)) -> codes (b, ..., dim) (or (b, dim, ...) with
            channel_first) in the implicit codebook's dtype unless `dtype` is given: in eval
            exactly what forward returned.
        codebook -> the implicit codebook (codebook_size, dim).

    commit_loss = commitment_weight * (mse(sg[x], q) + input_to_quantize_commit_loss_weight *
    mse(x, sg[q])), q the chosen code: the first term trains the map, the second the encoder.
    The output is q in value; its gradient reaches x by the rotation trick (arXiv 2410.06424) or
    straight through, never the map (as in the paper).

    sync_codebook, process_group (extras): under torch.distributed the first training step
    broadcasts the frozen codebook from the group's first rank (unless sync_codebook=False), so
    ranks built from different seeds search the same codes even where no wrapper broadcasts
    buffers (FSDP2 does not; DDP does).
    """

    keep_num_codebooks_dim = False  # one index per token

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_transform: nn.Module | None = None,
        init_fn: Callable[[Tensor], Tensor] = identity,
        channel_first: bool = False,
        rotation_trick: bool = True,
        input_to_quantize_commit_loss_weight: float = 0.25,
        commitment_weight: float = 1.0,
        frozen_codebook_dim: int | None = None,
        sync_codebook: bool | None = None,
        process_group=None,
    ):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.codebook_size = check_positive_int("codebook_size", codebook_size)
        self.frozen_codebook_dim = (self.dim if frozen_codebook_dim is None
                                    else check_positive_int("frozen_codebook_dim", frozen_codebook_dim))
        if codebook_transform is not None and not isinstance(codebook_transform, nn.Module):
            raise TypeError(f"codebook_transform: expected an nn.Module (or None for a linear map), got "
                            f"{type(codebook_transform).__name__}")
        if not callable(init_fn):
            raise TypeError(f"init_fn: expected a callable taking and returning the frozen codebook, got "
                            f"{type(init_fn).__name__}")
        self.channel_first, self.rotation_trick = channel_first, rotation_trick
        self.input_to_quantize_commit_loss_weight = check_non_negative("input_to_quantize_commit_loss_weight",
                                                                 input_to_quantize_commit_loss_weight)
        self.commitment_weight = check_non_negative("commitment_weight", commitment_weight)

        shape = (self.codebook_size, self.frozen_codebook_dim)
        frozen = init_fn(torch.randn(shape, dtype=torch.float32) * self.frozen_codebook_dim**-0.5)
        if not isinstance(frozen, Tensor) or tuple(frozen.shape) != shape or not frozen.is_floating_point():
            raise ValueError(f"init_fn: expected it to return a floating tensor of shape {shape}, got "
                             f"{getattr(frozen, 'dtype', type(frozen).__name__)} {tuple(getattr(frozen, 'shape', ()))}")
        # frozen, not a statistic, but kept float32 so that .half() does not round the codes
        self.register_fp32_buffer("frozen_codebook", frozen)
        if codebook_transform is None:
            codebook_transform = nn.Linear(self.frozen_codebook_dim, self.dim, bias=False)
        self.code_transform = codebook_transform
        self._init_projections(self.dim, self.dim)  # none: the codes live in the input's space
        self.sync_codebook, self.process_group = sync_codebook, process_group
        self._state_broadcast = False  # per process: has a synced step made the frozen codebooks one?

    # every rank alike from the first synced step (DDP broadcasts buffers at wrap; FSDP2 does not)

    def _sync(self) -> bool:
        """Whether this forward makes the ranks' frozen codebooks one: training forwards with
        gradients under torch.distributed, unless sync_codebook=False."""
        return (self.sync_codebook is not False and self.training and torch.is_grad_enabled()
                and is_distributed(self.process_group))

    def synced_state(self) -> list[Tensor]:
        return [self.frozen_codebook]

    def synced_owners(self) -> list:
        """What a first synced training step broadcasts for this layer (as a ResidualSimVQ stage too)."""
        return [self] if self._sync() else []

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, frozen_codebook_dim={self.frozen_codebook_dim}, "
                f"rotation_trick={self.rotation_trick}, commitment_weight={self.commitment_weight}, "
                f"input_to_quantize_commit_loss_weight={self.input_to_quantize_commit_loss_weight}")

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook (codebook_size, dim): code_transform(frozen_codebook)."""
        self.keep_fp32_buffers_()
        # the codebook, not an activation: built in the map's own dtype whatever the autocast
        # (a bf16 autocast would round every code and change the chosen ones)
        codebook = without_autocast(project)(self.code_transform, self.frozen_codebook)
        expected = (self.codebook_size, self.dim)
        if tuple(codebook.shape) != expected:
            raise ValueError(f"codebook_transform: expected it to map the frozen codebook "
                             f"{tuple(self.frozen_codebook.shape)} to {expected}, got {tuple(codebook.shape)}")
        return codebook

    @fp32_island
    def quantize(self, z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (b, n, dim), the implicit codebook (K, dim), both fp32 here
        -> (quantized (b, n, dim) fp32, indices (b, n) int64, commit loss fp32)."""
        b, n, d = z.shape
        rows = z.reshape(b * n, d)
        indices, _ = nearest_code(rows.detach(), codebook.detach(), "l2")
        codes = codebook[indices]  # differentiable in the map
        count = max(rows.numel(), 1)  # an empty batch has no loss (not mse's NaN)
        to_codes = (rows.detach() - codes).square().sum() / count
        to_input = (rows - codes.detach()).square().sum() / count
        loss = (to_codes + to_input * self.input_to_quantize_commit_loss_weight) * self.commitment_weight
        if not rows.requires_grad:
            quantized = codes.detach()
        elif self.rotation_trick:
            quantized = rotation_trick(rows, codes.detach())
        else:
            quantized = straight_through(codes, rows)
        return quantized.reshape(b, n, d), indices.reshape(b, n), loss

    def _core(self, z: Tensor, keep: None = None) -> Core:
        broadcast_once_(self.synced_owners(), self.process_group, z.device)
        quantized, indices, loss = self.quantize(z, self.codebook)
        return Core(quantized, indices.unsqueeze(-1), loss)

    def forward(self, x: Tensor):
        result = self.quantize_tokens(x)
        return result.out, result.indices, result.losses

    def lookup(self, indices: Tensor) -> Tensor:
        """Valid indices (...) int64 -> codes (..., dim) fp32, gathered from the same codebook
        (and so bitwise the same values) as forward."""
        return self.codebook.float()[indices]

    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """indices (b, ...) in [0, codebook_size), or -1 (no code: zeros) -> codes (b, ..., dim)
        (channel_first: (b, dim, ...)) in the implicit codebook's dtype unless `dtype` is given."""
        check_indices(indices, self.codebook_size, allow_dropped=True)
        codebook = self.codebook
        return self._decode(indices, lambda i: codebook[i.long().clamp(min=0)].to(dtype or codebook.dtype))

    def code_usage(self, indices: Tensor, process_group=None) -> CodeUsage:
        """Perplexity and fraction of the codebook used by `indices` (-1 ignored), over
        `process_group` (the default group when None, not the layer's)."""
        return code_usage(indices, self.codebook_size, process_group)
