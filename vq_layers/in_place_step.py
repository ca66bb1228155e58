"""One optimizer step on given gradients, for the layers that train their codebook in place
(VectorQuantize's and LatentQuantize's `in_place_codebook_optimizer`)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor


def step_on(optimizer: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor | None]) -> None:
    """`optimizer.step()` on exactly `grads`; the parameters' `.grad` (the user's accumulated
    gradients) is left as it was.

    A step that leaves a parameter non-finite is undone (parameters and optimizer state) and
    raises ValueError: in fp16 a stateful optimizer's eps (Adam's 1e-8) rounds to 0, and codes
    with a zero gradient become 0/0 = NaN, which every later forward would return silently.
    """
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    saved = [p.grad for p in params]
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(p.dtype)
    optimizer.step()
    for p, grad in zip(params, saved):
        p.grad = grad
    if bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        return
    with torch.no_grad():
        for p, value in zip(params, before):
            p.copy_(value)
    optimizer.load_state_dict(state)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    raise ValueError(f"in_place_codebook_optimizer: its step made the {'/'.join(dtypes)} codebook non-finite and "
                     "was undone (in float16 a stateful optimizer's eps, e.g. Adam's 1e-8, rounds to 0); keep the "
                     "codebook in float32 or bfloat16, give the optimizer a larger eps, or lower its learning rate")
