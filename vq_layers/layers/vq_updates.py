"""Codebook updates the user drives, for VectorQuantize (vector-quantize-pytorch's names):

- `update_ema()`: with manual_ema_update=True, training steps only track the EMA statistics;
  this sets the codes from them.
- `expire_codes_(x)`: dead codes (EMA count below threshold_ema_dead_code) take rows of x.
- `update_indices(x, indices)`: one EMA step (and dead-code expiry) with the given codes in
  place of the nearest ones.
- `in_place_codebook_optimizer`: each training step first moves a learnable codebook by one
  step of that optimizer on the codebook loss mean((code - sg(z))^2) over the kept tokens (of
  the global batch under sync), then searches the moved codebook.
- `sync_update_v`: vqtorch's synchronized update rule (eq. 21 of the vqtorch draft, Huh et al.,
  "Straightening Out the Straight-Through Estimator", arXiv 2305.08842): the output
  is z_q in value, its gradient reaches the input unchanged (by the layer's estimator) and
  the chosen codes as v x the output gradient, so the codebook follows the task loss.

A mixin: VectorQuantize provides `_codebook`, `_searched`, `_searched_codebook`, `_to_tokens`, `_targets` and the
options; the statistics themselves live in codebook.py / ema.py.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..compiling import runs_eagerly
from ..distributed import NON_FINITE, all_reduce_sum_, check_finite, is_distributed
from ..ema import ema_weight
from ..in_place_step import step_on
from ..kernels.nearest_code import nearest_code
from ..layout import check_mask, without_padding
from ..precision import fp32_island, project



def masked_mse(x: Tensor, target: Tensor, kept: Tensor | None, sync: bool = False, group=None) -> tuple[Tensor, Tensor]:
    """x, target (g, m, d), kept (g, m) or None -> (sum of the kept rows' squared errors over
    their element count, that count); under `sync` the count is the global batch's (the caller
    sums the ranks' losses or gradients), so the ranks' terms add up to the global mean."""
    error = (x - target).square()
    if kept is not None:
        error = torch.where(kept.unsqueeze(-1), error, 0.0)
    rows = x.new_tensor(float(x.shape[0] * x.shape[1])) if kept is None else kept.sum().float()
    count = rows * x.shape[-1]
    if sync:
        count = all_reduce_sum_(count.clone(), group)
    return error.sum() / count.clamp(min=1), count


class CodebookUpdates:
    def _init_updates(self, sync_affine_param: bool | None, sync_update_v: float, in_place_codebook_optimizer,
                      manual_in_place_optimizer_update: bool) -> None:
        """Checks and stores the options; call once `_codebook` exists (the optimizer takes its parameters)."""
        if sync_affine_param is True and not self._codebook.affine_param:
            raise ValueError("sync_affine_param: syncs the affine batch statistics, which need affine_param=True; "
                             "got affine_param=False")
        if not 0 <= sync_update_v <= 1:
            raise ValueError(f"sync_update_v: expected a value in [0, 1], got {sync_update_v!r}")
        if sync_update_v > 0 and not self.learnable_codebook:
            raise ValueError("sync_update_v: the synchronized update trains the codebook by gradient; it needs "
                             "learnable_codebook=True")
        self.sync_affine_param, self.sync_update_v = sync_affine_param, float(sync_update_v)
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update
        self.in_place_codebook_optimizer = None
        if in_place_codebook_optimizer is not None:
            if not callable(in_place_codebook_optimizer):
                raise TypeError("in_place_codebook_optimizer: expected a callable params -> optimizer, got "
                                f"{type(in_place_codebook_optimizer).__name__}")
            if not self._codebook.learnable:
                raise ValueError("in_place_codebook_optimizer: steps a learnable codebook; pass learnable_codebook=True "
                                 "(or orthogonal_reg_weight > 0)")
            self.in_place_codebook_optimizer = in_place_codebook_optimizer(self._codebook.parameters())

    def _checked_ema_weight(self, weight):
        """A given `ema_update_weight` tensor checked at the boundary, before anything changes (a
        callable's result is checked once the statistics it takes exist)."""
        if weight is None or callable(weight):
            return weight
        return ema_weight(weight, None, self._codebook.cluster_size)

    def _undone_on_error(self, step):
        """`step` wrapped so that, should it raise, the codebook's state (statistics, row-draw counter, affine
        moments, k-means init, codes), the in-place optimizer's and the gradients it
        added (manual_in_place_optimizer_update) are as before it. For a
        callable ema_update_weight: its result can be checked only once the step's statistics
        exist, after the affine moments, k-means init and an in-place step changed state."""
        def run(*args, **kwargs):
            codebook, optimizer = self._codebook, self.in_place_codebook_optimizer
            saved = {k: v.detach().clone() for k, v in codebook.state_dict().items()}
            draws = codebook.sample_draws.step.clone()
            saved_optimizer = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
            params = [] if optimizer is None or not self.manual_in_place_optimizer_update else [
                p for group in optimizer.param_groups for p in group["params"]]  # manual mode adds to .grad
            grads = [None if p.grad is None else p.grad.clone() for p in params]
            attributes = {name: getattr(codebook, name) for name in ("_state_broadcast", "dead_codes_replaced")}
            try:
                return step(*args, **kwargs)
            except Exception:
                with torch.no_grad():
                    codebook.load_state_dict(saved)
                    codebook.sample_draws.step.copy_(draws)
                if optimizer is not None:
                    optimizer.load_state_dict(saved_optimizer)
                for p, grad in zip(params, grads):
                    if grad is None or p.grad is None:
                        p.grad = grad
                    else:  # in place: keeps DDP's gradient_as_bucket_view aliasing
                        p.grad.copy_(grad)
                for name, value in attributes.items():
                    setattr(codebook, name, value)
                raise
        return run

    def _explicit_sync(self) -> bool:
        """Whether a method the user calls (update_indices, expire_codes_) talks to the other
        ranks: whenever distributed and sync_codebook is not False (every rank must call)."""
        return self.sync_codebook is not False and is_distributed(self.process_group)

    def _sync_affine(self) -> bool:
        """Whether the affine batch moments are the global batch's: by default (None) whenever the
        codebook syncs, as every other statistic (the peer's default, False, leaves each rank its own)."""
        if self.sync_affine_param is None:
            return self.sync_codebook is not False and is_distributed(self.process_group)
        return self.sync_affine_param and is_distributed(self.process_group)

    # the EMA, by hand

    def update_ema(self) -> None:
        """Sets the codes from the EMA statistics (for manual_ema_update=True)."""
        self._codebook.update_ema()

    def expire_codes_(self, x: Tensor) -> None:
        """Replaces dead codes (EMA count below threshold_ema_dead_code) by rows of x
        (..., heads * codebook_dim), vectors as the codebook sees them (after project_in), as
        vector-quantize-pytorch does; a no-op in eval or without a threshold. Under sync every
        rank must call (the rows are drawn from the union of the ranks')."""
        if not isinstance(x, Tensor) or x.shape[-1:] != (self.heads * self.codebook_dim,):
            raise ValueError(f"x: expected a tensor (..., {self.heads * self.codebook_dim}) (heads * codebook_dim), "
                             f"got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if not self.training or self._codebook.threshold_ema_dead_code <= 0:
            return
        self._expire(x.detach().reshape(1, -1, x.shape[-1]))

    @fp32_island
    @torch.no_grad()
    def _expire(self, z: Tensor) -> None:
        search, _ = self._searched(z, None)
        self._codebook.expire_codes_(search, None, self._explicit_checked(search), self.process_group)

    def _explicit_checked(self, search: Tensor) -> bool:
        """Before update_indices / expire_codes_ change anything: the NaN check (on every rank
        under sync) and, at the first synced step, the first rank's state, as a training step
        takes them -> whether to sync."""
        sync = self._explicit_sync()
        check_finite(search, NON_FINITE.format("x"), self.process_group, sync)
        if sync:
            self._codebook.broadcast_state_(self.process_group, once=True)
        return sync

    @torch.no_grad()
    def update_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
        """One codebook update from x (as forward takes it) with `indices` (as forward returns
        them) in place of the nearest codes: the EMA step (if ema_update) and dead-code expiry.
        Masked positions and index -1 count nowhere. In any mode; under sync every rank must call."""
        tokens, spatial, _, only_one = self._to_tokens(x)
        if only_one and mask is not None and mask.ndim == 1:
            mask = mask.reshape(-1, 1)
        keep = check_mask(mask, tokens, spatial)
        targets = self._targets(indices.unsqueeze(1) if only_one else indices, tokens, keep)
        self._update_from(project(self.project_in, without_padding(tokens, keep)), keep, targets)

    @fp32_island
    def _update_from(self, z: Tensor, keep: Tensor | None, targets: Tensor) -> None:
        search, _ = self._searched(z, keep)
        sync = self._explicit_checked(search)
        if self._codebook.needs_init():
            raise ValueError("update_indices: the codebook is not initialized yet (kmeans_init=True runs on the "
                             "first training forward); run one before updating with given indices")
        self._codebook.update_(search, targets.clamp(min=0), targets >= 0, self.ema_update, sync, self.process_group)

    update_ema_indices = update_indices  # the peer's older name

    def _update_shared(self, results: list) -> None:
        """A codebook shared by several searches of one step (ResidualVQ's stages, HierarchicalVQ's
        levels), each against the codebook as it was before the step (`Quantized` results): one
        in-place step on the sum of their losses, then one statistics update from all their vectors."""
        sync = self._sync()
        keep = None if results[0].keep is None else torch.cat([r.keep for r in results], dim=1)
        self._in_place_step([(r.search, r.keep) for r in results], sync, results[0].search.new_zeros(()))
        self._codebook.update_(torch.cat([r.search for r in results], dim=1),
                               torch.cat([r.codebook_indices for r in results], dim=1), keep, self.ema_update, sync,
                               self.process_group)

    # the in-place optimizer

    def _in_place_step(self, parts: list, sync: bool, zero: Tensor) -> Tensor:
        """One optimizer step on the codebook loss (fp32, inside the island): the sum over
        `parts`, pairs (search (g, m, d), kept (g, m) or None) (one per stage of a ResidualVQ with
        a shared codebook), of each part's mean((nearest code - sg(z))^2) over its kept rows ->
        the loss (detached; the global batch's under sync); `zero` without an optimizer."""
        if self.in_place_codebook_optimizer is None:
            return zero
        return self._in_place_optimize(parts, sync)

    @runs_eagerly("in_place_codebook_optimizer: the optimizer step runs eagerly, a graph break; compile with "
                  "fullgraph=False")
    def _in_place_optimize(self, parts: list, sync: bool) -> Tensor:
        """The gradient is that of the global batch's loss (per-rank sums over the global count,
        summed over the ranks). No step where no part has a row anywhere (empty or all-masked
        batches change nothing: no momentum or weight decay step either)."""
        self._codebook._check_in_place_write("in_place_codebook_optimizer")
        params = [p for group in self.in_place_codebook_optimizer.param_groups for p in group["params"]]
        with torch.enable_grad():
            codebook = self._searched_codebook()
            loss, count = 0.0, 0.0
            for search, kept in parts:
                target = search.detach()
                indices, _ = nearest_code(target, codebook.detach(), self.metric, valid=kept)
                codes = torch.gather(codebook, 1, indices.unsqueeze(-1).expand(-1, -1, codebook.shape[-1]))
                part_loss, part_count = masked_mse(codes, target, kept, sync, self.process_group)
                loss, count = loss + part_loss, count + part_count
            if not bool(count > 0):
                return codebook.new_zeros(())
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [None if g is None else (all_reduce_sum_(g, self.process_group) if sync else g) for g in grads]
        self._apply_in_place(params, grads)
        loss = loss.detach()
        return all_reduce_sum_(loss.clone(), self.process_group) if sync else loss

    def _apply_in_place(self, params: list, grads: list) -> None:
        """The step on exactly these gradients; the parameters' .grad (the user's accumulated
        gradients) is left as it was. With manual_in_place_optimizer_update, the gradients are
        added to .grad instead, for update_in_place_optimizer()."""
        if self.manual_in_place_optimizer_update:
            for p, g in zip(params, grads):
                if g is not None:
                    if p.grad is None:
                        p.grad = g.to(p.dtype)
                    else:  # in place: keeps DDP's gradient_as_bucket_view aliasing
                        p.grad.add_(g.to(p.dtype))
            return
        step_on(self.in_place_codebook_optimizer, params, grads)

    def update_in_place_optimizer(self) -> None:
        """With manual_in_place_optimizer_update=True: the optimizer step on the gradients
        gathered since the last call (already the global batch's under sync), then zero_grad."""
        if self.in_place_codebook_optimizer is None:
            return
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    # the synchronized update rule

    def _synchronized_update(self, quantized: Tensor, codes: Tensor, freeze: bool) -> Tensor:
        """quantized + v (codes - sg(codes)): the same value; the chosen codes get v x its gradient."""
        if not self.training or self.sync_update_v <= 0 or freeze:
            return quantized
        return quantized + self.sync_update_v * (codes - codes.detach())
