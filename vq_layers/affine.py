"""The affine reparameterization of a codebook (vqtorch, arXiv 2305.08842; vector-quantize-pytorch's
`affine_param`), in fp32.

Running per-dimension moments of the batch (mean mu_b, variance var_b) and of the codebook
(mu_c, var_c) define an affine map that carries the codebook onto the batch's statistics:

    searched code = (c - mu_c) * sigma_b / sigma_c + mu_b,   sigma = sqrt(max(var, 1e-5))

and its inverse carries a batch vector back to the codebook's frame (where the EMA statistics
and revived dead codes live). Variances are the biased ones (divide by the count). Masked rows
count nowhere; under sync the batch moments are those of the global batch (two all-reduces:
the count and sum, then the squared deviations from the global mean, as a two-pass variance).

`AffineFrame` owns the running moments of one Codebook (a submodule of it) and their update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed import all_reduce_sum_
from .precision import Fp32BuffersModule, fp32_island

VARIANCE_FLOOR = 1e-5
# the state, as vector-quantize-pytorch names it on its codebook (the flags always agree here)
MOMENTS = ("codebook_mean", "codebook_variance", "batch_mean", "batch_variance")
INIT_FLAGS = ("codebook_mean_needs_init", "codebook_variance_needs_init")


@torch.no_grad()
def batch_moments(x: Tensor, keep: Tensor | None, sync: bool, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """x (h, n, d) fp32, keep (h, n) or None -> count (h, 1, 1), mean (h, 1, d), variance (h, 1, d).

    A codebook with no kept row anywhere gets count 0 and mean/variance 0 (callers skip it)."""
    weight = torch.ones_like(x[..., :1]) if keep is None else keep.unsqueeze(-1).to(torch.float32)
    x = x if keep is None else torch.where(keep.unsqueeze(-1), x, 0.0)
    first = torch.cat([weight.sum(1, keepdim=True), x.sum(1, keepdim=True)], dim=-1)  # (h, 1, 1 + d)
    if sync:
        all_reduce_sum_(first, group)
    count = first[..., :1]
    mean = first[..., 1:] / count.clamp(min=1)
    squares = ((x - mean).square() * weight).sum(1, keepdim=True)
    if sync:
        all_reduce_sum_(squares, group)
    return count, mean, squares / count.clamp(min=1)


def codebook_moments(codes: Tensor) -> tuple[Tensor, Tensor]:
    """codes (h, k, d) -> mean (h, 1, d), biased variance (h, 1, d) over the codes."""
    var, mean = torch.var_mean(codes, dim=1, keepdim=True, correction=0)
    return mean, var


def scale(from_var: Tensor, to_var: Tensor) -> Tensor:
    """sigma_to / sigma_from with both variances floored at VARIANCE_FLOOR."""
    return (to_var.clamp(min=VARIANCE_FLOOR) / from_var.clamp(min=VARIANCE_FLOOR)).sqrt()


def to_batch_frame(codes: Tensor, codebook_mean: Tensor, codebook_var: Tensor, batch_mean: Tensor,
                   batch_var: Tensor) -> Tensor:
    """codes (h, k, d) -> the codes as searched: (c - mu_c) * sigma_b / sigma_c + mu_b."""
    return (codes - codebook_mean) * scale(codebook_var, batch_var) + batch_mean


def to_codebook_frame(x: Tensor, codebook_mean: Tensor, codebook_var: Tensor, batch_mean: Tensor,
                      batch_var: Tensor) -> Tensor:
    """x (h, n, d) -> the codebook's frame, the inverse map: (x - mu_b) * sigma_c / sigma_b + mu_c."""
    return (x - batch_mean) * scale(batch_var, codebook_var) + codebook_mean


def _decay_towards_(buffer: Tensor, value: Tensor, decay: float, first: Tensor, seen: Tensor) -> None:
    """buffer <- value on the first batch (`first`), else lerp(buffer, value, 1 - decay); kept
    where not `seen`. No host sync."""
    new = torch.where(first, value, buffer.lerp(value, 1 - decay))
    buffer.copy_(torch.where(seen, new, buffer))


def nest_frame_keys_(state_dict: dict, prefix: str, name: str) -> None:
    """A checkpoint that keeps the moments on the codebook itself (vector-quantize-pytorch's,
    vq_layers' before AffineFrame) -> the keys of the frame, the codebook's submodule `name`."""
    for key in (*MOMENTS, *INIT_FLAGS):
        if prefix + key in state_dict and f"{prefix}{name}.{key}" not in state_dict:
            state_dict[f"{prefix}{name}.{key}"] = state_dict.pop(prefix + key)


class AffineFrame(Fp32BuffersModule):
    """The running moments of h codebooks of dim d, and the maps between their frames.

    State: codebook_mean, codebook_variance, batch_mean, batch_variance (h, 1, d) fp32, and
    codebook_mean_needs_init, codebook_variance_needs_init () True until the first batch with
    vectors. Until then the map is the identity (means 0, variances 1), so an untrained codebook
    searches its own codes.
    """

    def __init__(self, num_codebooks: int, dim: int, batch_decay: float = 0.99, codebook_decay: float = 0.9):
        super().__init__()
        self.batch_decay, self.codebook_decay = batch_decay, codebook_decay
        for name, value in zip(MOMENTS, (0.0, 1.0, 0.0, 1.0)):
            self.register_fp32_buffer(name, torch.full((num_codebooks, 1, dim), value))
        for name in INIT_FLAGS:
            self.register_buffer(name, torch.tensor(True))

    def extra_repr(self) -> str:
        return f"batch_decay={self.batch_decay}, codebook_decay={self.codebook_decay}"

    def moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.codebook_mean, self.codebook_variance, self.batch_mean, self.batch_variance

    def state(self) -> list[Tensor]:
        """Every tensor of the state (what a synced step broadcasts)."""
        return [*self.moments(), self.codebook_mean_needs_init, self.codebook_variance_needs_init]

    def to_batch_frame(self, codes: Tensor) -> Tensor:
        """codes (h, k, d) -> as searched."""
        return to_batch_frame(codes, *self.moments())

    def to_codebook_frame(self, x: Tensor) -> Tensor:
        """x (h, n, d) as searched -> the frame the codes and their statistics live in."""
        return to_codebook_frame(x, *self.moments())

    @fp32_island
    @torch.no_grad()
    def update_(self, x: Tensor, keep: Tensor | None, codes: Tensor, sync: bool, group=None) -> None:
        """One step of the moments: the codebook's from `codes` (h, k, d) (before this step's
        update), the batch's from x (h, n, d), keep (h, n) (the global batch's when `sync`). The
        first batch with vectors sets them; a codebook without vectors (all masked) keeps all four."""
        self.keep_fp32_buffers_()
        first = self.codebook_mean_needs_init
        count, batch_mean, batch_var = batch_moments(x, keep, sync, group)
        seen = count > 0
        codebook_mean, codebook_var = codebook_moments(codes)
        for buffer, value, decay in zip(self.moments(), (codebook_mean, codebook_var, batch_mean, batch_var),
                                        (self.codebook_decay,) * 2 + (self.batch_decay,) * 2):
            _decay_towards_(buffer, value, decay, first, seen)
        still = first & ~seen.any()
        self.codebook_mean_needs_init.copy_(still)
        self.codebook_variance_needs_init.copy_(still)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # vector-quantize-pytorch registers the batch moments at its first training step: its
        # untrained checkpoint lacks them and loads as the identity map; a trained or cut one as it is
        untrained_peer = all(prefix + name not in state_dict for name in ("batch_mean", "batch_variance")) and bool(
            state_dict.get(prefix + "codebook_mean_needs_init", False))
        if untrained_peer:
            like = state_dict.get(prefix + "codebook_mean", self.codebook_mean)
            for name, value in (("batch_mean", 0.0), ("batch_variance", 1.0)):
                state_dict[prefix + name] = torch.full(like.shape, value, dtype=torch.float32, device=like.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
