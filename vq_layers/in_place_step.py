"""One optimizer step on given gradients, for the layers that train their codebook in place
(VectorQuantize's and LatentQuantize's `in_place_codebook_optimizer`)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_in_place_optimizer(optimizer: torch.optim.Optimizer | None) -> None:
    """Before a training step changes anything: refuses an optimizer whose eps rounds to 0 in a
    float16 parameter's dtype (Adam's 1e-8 does): codes with a zero gradient would take 0/0 =
    NaN, and every later forward would return it silently."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        eps = group.get("eps")
        if not isinstance(eps, (int, float)) or eps <= 0:
            continue
        for p in group["params"]:
            if p.dtype == torch.float16 and float(torch.tensor(eps, dtype=torch.float16)) == 0:
                raise ValueError(
                    f"in_place_codebook_optimizer: its eps={eps:g} rounds to 0 in the float16 codebook, so codes "
                    "with a zero gradient would become NaN; keep the codebook in float32 or bfloat16 (a module "
                    "cast after construction casts it too), or give the optimizer an eps >= 6e-8")


def step_on(optimizer: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor | None]) -> None:
    """`optimizer.step()` on exactly `grads`; the parameters' `.grad` (the user's accumulated
    gradients) is left as it was, also when the step raises."""
    saved = [p.grad for p in params]
    try:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.dtype)
        optimizer.step()
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
