"""Codebook updates outside VectorQuantize's plain training step (vector-quantize-pytorch's names):

- `in_place_codebook_optimizer`: each training step first moves a learnable codebook by one
  step of that optimizer on the codebook loss mean((code - sg(z))^2) over the kept tokens (of
  the global batch under sync), then searches the moved codebook;
- the updates a user calls: `update_indices(x, indices)` (one EMA step with given codes),
  `expire_codes_(x)`, `update_in_place_optimizer()`;
- the rollback that makes a step which raises change nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from ..codebook import Codebook
from ..codebook_losses import masked_mse
from ..compiling import runs_eagerly
from ..distributed import NON_FINITE, all_reduce_sum_, check_finite
from ..in_place_step import step_on
from ..kernels.nearest_code import nearest_code


def make_in_place_optimizer(factory, codebook: Codebook) -> torch.optim.Optimizer | None:
    """`factory` (params -> optimizer) or None -> the optimizer over the codebook's parameters."""
    if factory is None:
        return None
    if not callable(factory):
        raise TypeError(f"in_place_codebook_optimizer: expected a callable params -> optimizer, got "
                        f"{type(factory).__name__}")
    if not codebook.learnable:
        raise ValueError("in_place_codebook_optimizer: steps a learnable codebook; pass learnable_codebook=True "
                         "(or orthogonal_reg_weight > 0)")
    return factory(codebook.parameters())


@runs_eagerly("in_place_codebook_optimizer: the optimizer step runs eagerly, a graph break; compile with "
              "fullgraph=False")
def in_place_step(optimizer: torch.optim.Optimizer, codebook: Codebook, searched_codes: Callable[[], Tensor],
                  parts: list, metric: str, manual: bool, sync: bool, group) -> Tensor:
    """One optimizer step on the sum over `parts`, pairs (search (g, m, d), kept (g, m) or None)
    (one per stage of a ResidualVQ with a shared codebook), of each part's mean((nearest code -
    sg(z))^2) over its kept rows -> that loss (detached; the global batch's under sync).

    The gradient is that of the global batch's loss (per-rank sums over the global count, summed
    over the ranks). No step where no part has a row anywhere (empty or all-masked batches change
    nothing: no momentum or weight decay step either). `manual`: the gradients are added to the
    parameters' .grad for `update_in_place` instead of a step."""
    codebook._check_in_place_write("in_place_codebook_optimizer")
    params = [p for param_group in optimizer.param_groups for p in param_group["params"]]
    with torch.enable_grad():
        codes_now = searched_codes()
        loss, count = 0.0, 0.0
        for search, kept in parts:
            target = search.detach()
            indices, _ = nearest_code(target, codes_now.detach(), metric, valid=kept)
            codes = torch.gather(codes_now, 1, indices.unsqueeze(-1).expand(-1, -1, codes_now.shape[-1]))
            part_loss, part_count = masked_mse(codes, target, kept, sync, group)
            loss, count = loss + part_loss, count + part_count
        if not bool(count > 0):
            return codes_now.new_zeros(())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [None if g is None else (all_reduce_sum_(g, group) if sync else g) for g in grads]
    if manual:  # the user's .grad: added to, in place (keeps DDP's gradient_as_bucket_view aliasing)
        for p, g in zip(params, grads):
            if g is not None:
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.dtype))
    else:  # the step on exactly these gradients; the parameters' .grad is left as it was
        step_on(optimizer, params, grads)
    loss = loss.detach()
    return all_reduce_sum_(loss.clone(), group) if sync else loss


def update_by_hand(codebook: Codebook, search: Tensor, targets: Tensor | None, ema_update: bool, sync: bool,
                   group) -> None:
    """VectorQuantize's update_indices (`targets` (g, m) given, -1 ignored) or expire_codes_ (None)
    on the vectors searched (g, m, d): first the NaN check (on every rank under sync) and, at the
    first synced step, the first rank's state, as a training step takes them."""
    check_finite(search, NON_FINITE.format("x"), group, sync)
    if sync:
        codebook.broadcast_state_(group, once=True)
    if targets is None:
        codebook.expire_codes_(search, None, sync, group)
    elif codebook.needs_init():
        raise ValueError("update_indices: the codebook is not initialized yet (kmeans_init=True runs on the "
                         "first training forward); run one before updating with given indices")
    else:
        codebook.update_(search, targets.clamp(min=0), targets >= 0, ema_update, sync, group)


def update_in_place(optimizer: torch.optim.Optimizer | None) -> None:
    """manual_in_place_optimizer_update: the step on the gradients gathered since the last call
    (already the global batch's under sync), then zero_grad."""
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()


def undone_on_error(step: Callable, codebook: Codebook, optimizer: torch.optim.Optimizer | None,
                    manual: bool) -> Callable:
    """`step` wrapped so that, should it raise, the codebook's state (statistics, row-draw
    counter, affine moments, k-means init, codes), the optimizer's and the gradients a manual
    in-place step added are as before it. For a callable ema_update_weight: its result can be
    checked only once the step's statistics exist, after state already changed."""
    def run(*args, **kwargs):
        saved = {k: v.detach().clone() for k, v in codebook.state_dict().items()}
        draws = codebook.sample_draws.step.clone()
        saved_optimizer = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
        params = [] if optimizer is None or not manual else [
            p for param_group in optimizer.param_groups for p in param_group["params"]]
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
