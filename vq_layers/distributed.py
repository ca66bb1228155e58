"""Collective helpers over `torch.distributed`, each a no-op (or identity) when not distributed.

Every helper takes an optional `group`; `None` means the default process group. Nothing is
cached: `is_distributed()` asks torch each time, so init/destroy between calls is honoured.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .non_finite import not_all_finite

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without distributed support
    DTensor = ()


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialized and `group` spans more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def _in_place(tensor: Tensor, collective) -> None:
    """Runs `collective` on a contiguous buffer for `tensor`, then writes the result back.

    c10d collectives (gloo at least) walk the raw storage from the data pointer without
    checking strides: a strided view would be reduced against the wrong elements of the other
    ranks and spill into its neighbours in memory.
    """
    if tensor.is_contiguous():
        collective(tensor)
    else:
        buf = tensor.contiguous()
        collective(buf)
        tensor.copy_(buf)


def rank_in(group=None) -> int:
    """This process's rank within `group` (0 when not distributed)."""
    return dist.get_rank(group) if is_distributed(group) else 0


def first_rank(group=None) -> int:
    """Global rank of the group's rank 0 (the default group's is 0)."""
    return dist.get_global_rank(group, 0) if group is not None and is_distributed(group) else 0


def any_rank(flag: Tensor, group=None, sync: bool = True) -> bool:
    """True when the boolean scalar `flag` is True on any rank of the group (on this one alone
    when not `sync`). Every rank gets the same answer, so a decision on it (raising, skipping)
    keeps the ranks' collectives in step."""
    flag = flag.reshape(1).to(torch.float32)
    if sync:
        all_reduce_sum_(flag, group)
    return bool(flag.item() > 0)


# check_finite's messages for data about to enter the statistics, raised before any buffer changes
NON_FINITE = ("{}: non-finite values (NaN or Inf) on this rank or another; the codebook and its statistics were "
              "left untouched")
NON_FINITE_INPUT = NON_FINITE.format("input")


def check_finite(x: Tensor | list[Tensor], message: str, group=None, sync: bool = True) -> None:
    """Raises ValueError(message) when `x` (a tensor, or several judged in one read) holds a
    NaN or Inf on any rank of the group (this one alone when not `sync`); every rank raises alike.

    Under torch.compile without sync, for CPU tensors, the check is an assert inside the graph
    (no host sync, no graph break): it raises RuntimeError with the same message, before the
    graph's buffer writes take effect. On CUDA that assert is a device-side assert, which would
    poison the process's CUDA context instead of raising: there the check stays a host sync (a
    graph break under torch.compile)."""
    parts = [x] if isinstance(x, Tensor) else x
    finite = ~torch.stack([not_all_finite(part.reshape(-1)) for part in parts]).any()
    if torch.compiler.is_compiling() and not sync and parts[0].device.type == "cpu":
        torch._assert_async(finite, message)
    elif any_rank(~finite, group, sync):
        raise ValueError(message)


def broadcast_tensors_(tensors: list[Tensor], src: int = 0, group=None, device=None) -> None:
    """Every tensor takes rank `src`'s values, in one collective on `device` (default: the
    first tensor's), flattened as float32: floats, bools and integers below 2^24 travel exactly."""
    if not is_distributed(group) or not tensors:
        return
    device = tensors[0].device if device is None else device
    flat = torch.cat([t.detach().reshape(-1).float().to(device) for t in tensors])
    broadcast_(flat, src, group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.data.copy_(part.reshape(t.shape).to(t.dtype))


def broadcast_once_(owners: list, group=None, device=None, before=None) -> None:
    """At a layer's first synced step: the owners (objects with `synced_state()`, a list of
    tensors, and a `_state_broadcast` flag) not broadcast yet in this process take the group's
    first rank's state, in one collective, and are marked; `before()` runs first, only then (a
    check that must pass before any state changes). Every rank holds the same flags, so every
    rank issues the same collective."""
    pending = [o for o in dict.fromkeys(owners) if not o._state_broadcast]  # (in order, once each)
    if not pending:
        return
    if before is not None:
        before()
    broadcast_tensors_([t for o in pending for t in o.synced_state()], first_rank(group), group, device)
    for owner in pending:
        owner._state_broadcast = True


def all_reduce_sum_(tensor: Tensor, group=None) -> Tensor:
    """Sums `tensor` over the group in place (no autograd); returns it."""
    if is_distributed(group):
        _in_place(tensor, lambda buf: dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group))
    return tensor


def broadcast_(tensor: Tensor, src: int = 0, group=None) -> Tensor:
    """Overwrites `tensor` in place with rank `src`'s copy (a global rank); returns it."""
    if is_distributed(group):
        _in_place(tensor, lambda buf: dist.broadcast(buf, src=src, group=group))
    return tensor


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward is the sum of the ranks' incoming gradients.

    That is the adjoint under DDP's convention (the objective is the mean of the ranks' losses,
    each rank back-propagating its own, DDP then averaging): every rank receives world_size x
    d(objective)/d(its input), as for any loss that is a mean over the rank's own batch.
    """

    @staticmethod
    def forward(ctx, tensor, group, anchor):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)  # gloo ignores strides
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None, None


def _sum_node(tensor: Tensor, group) -> Tensor:
    # A rank whose share has no graph (an empty batch: nothing was computed from the input)
    # must still join the all-reduce the other ranks' backward issues; a leaf that requires
    # grad gives the sum a backward node on every rank alike.
    anchor = None
    if torch.is_grad_enabled() and not tensor.requires_grad:
        anchor = torch.zeros((), device=tensor.device, requires_grad=True)
    return _AllReduceSum.apply(tensor, group, anchor)


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Differentiable sum of `tensor` over the group (a new tensor); identity when alone.

    With grad enabled, the backward all-reduce runs on every rank, whether or not this rank's
    `tensor` requires grad."""
    if not is_distributed(group):
        return tensor
    return _sum_node(tensor, group)


def all_reduce_mean(tensor: Tensor, group=None) -> Tensor:
    """Differentiable mean over the group (backward: mean of the ranks' gradients)."""
    if not is_distributed(group):
        return tensor
    return _sum_node(tensor, group) / dist.get_world_size(group)


def all_gather_stacked(tensor: Tensor, group=None) -> Tensor:
    """Every rank's `tensor` (the same shape on every rank) stacked in rank order: (world, ...).
    No host sync, no autograd; (1, ...) when not distributed."""
    if not is_distributed(group):
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def all_gather(tensor: Tensor, group=None) -> Tensor:
    """Concatenates every rank's `tensor` along dim 0; ranks may hold different sizes (0 too).

    All other dims must agree. Returns the input itself when not distributed. No autograd.
    """
    if not is_distributed(group):
        return tensor
    size = world_size(group)
    counts = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    all_counts = [torch.empty_like(counts) for _ in range(size)]
    dist.all_gather(all_counts, counts, group=group)
    all_counts = [int(c.item()) for c in all_counts]
    longest = max(all_counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    return torch.cat([chunk[:count] for chunk, count in zip(gathered, all_counts)], dim=0)


def fsdp_holds(module, tensor: Tensor) -> bool:
    """Whether FSDP manages `module` (FSDP1's mark on it) or holds `tensor` sharded (FSDP2's DTensor)."""
    return getattr(module, "_is_fsdp_managed_module", False) or isinstance(tensor, DTensor)


def unsharded(tensor: Tensor, message: str) -> Tensor:
    """`tensor`, or the whole of it where FSDP2 holds it sharded (a DTensor outside the forward of
    the module fully_shard wraps): all-gathered, every rank must call. Only without gradients:
    full_tensor's backward keeps each rank's own gradient slice (no reduce-scatter), so with
    them it raises ValueError(message)."""
    if not isinstance(tensor, DTensor):
        return tensor
    if torch.is_grad_enabled():
        raise ValueError(message)
    return tensor.full_tensor()
