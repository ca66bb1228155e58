"""Run a function in a few local processes joined in a gloo `torch.distributed` group.

`run_in_processes(fn, 2, *args)` calls `fn(rank, world_size, *args)` in freshly spawned
processes, so the pytest process itself never holds a process group. A child's exception
(an assert included) is re-raised here with the child's traceback, and everything is killed
after `timeout` seconds so that a mismatched collective fails the test instead of hanging CI.

`fn` and `args` are pickled to the children: `fn` must be a module-level function of an
importable module (test modules are, under pytest's default import mode).

The rest are the helpers the `test_distributed_*` modules share to check the distributed
contract (docs/design.md, "Distributed"). Every rank's data is a pure function of (step, rank),
so each rank can rebuild the global batch (the ranks' batches concatenated) and run the
reference in its own process. References:

- a single process (`sync_codebook=False`, or a one-rank `process_group`) trained on the
  global batch: EMA statistics, parameters after optimizer steps, LFQ's entropy and gradients
  must match it (to 1e-5; the loss is a mean over equal-sized per-rank batches, so DDP's
  averaged gradients are the single process's);
- exact cross-rank equality (the bytes of every parameter and buffer all-gathered), where no
  single-process reference exists (k-means init, dead-code replacement, different seeds);
- an fp64 brute-force nearest code on the quantizer's captured input (FSDP2 mixed precision);
- a recorder of every `torch.distributed` collective call: the same sequence on every rank
  whatever the data (empty, masked, uneven), and none at all outside training steps.

Each test spawns one 2-process group (spawning costs seconds, so a worker batches many checks)
and has a timeout: a rank stuck in a collective fails the test instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import vq_layers.distributed
from vq_layers import VectorQuantize

DEFAULT_TIMEOUT = 60.0


def free_port() -> int:
    # The OS hands out an unused port; it could in principle be taken again before rank 0's
    # store binds it, which is an accepted (tiny) race.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_group(rank: int, world_size: int, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Joins the default gloo group at the address `run_in_processes` put in the environment.

    For workers started with `init=False` that want to observe the state before the group exists.
    """
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
    )


def _child(rank, fn, world_size, port, init, timeout, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # the ranks share the machine's cores
    if init:
        init_group(rank, world_size, timeout)
    fn(rank, world_size, *args)
    # Only on success: after a failure the peers may be stuck in a collective, and tearing the
    # group down could block this process from reporting its error; exiting frees it anyway.
    if dist.is_initialized():
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: once torch._dynamo is loaded (DDP's forward
    # imports it) a gloo worker sometimes aborts there ("terminate called without an active
    # exception", measured: 1 run in 5), after its work succeeded. A torch exit-time issue.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_in_processes(fn, world_size: int = 2, *args, timeout: float = DEFAULT_TIMEOUT, init=True):
    """Runs `fn(rank, world_size, *args)` on ranks 0..world_size-1; raises if any rank fails.

    Raises `torch.multiprocessing.ProcessRaisedException` (its message carries the failing rank's
    traceback) or `ProcessExitedException` when a rank dies, `TimeoutError` after `timeout`
    seconds. With `init=False` the worker calls `init_group` itself.
    """
    context = mp.start_processes(
        _child,
        args=(fn, world_size, free_port(), init, timeout, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",  # fork would copy the parent's torch threads and state
    )
    deadline = time.monotonic() + timeout
    # join() returns False while ranks are still running, True once all exited cleanly, and on
    # the first failure terminates the other ranks and raises with the failing rank's traceback.
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish within {timeout}s")


# ------------------------------------------------------------------------------------------
# the distributed contract's shared helpers (run inside the workers)

WORLD = 2
DIM, LATENT = 4, 6  # autoencoder input and latent (quantizer) widths
LR = 0.5


def _batch(step: int, rank: int, b: int = 2, n: int = 6, dim: int = DIM) -> torch.Tensor:
    """Rank `rank`'s batch at `step`: the same on every rank that asks (no communication)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(b, n, dim, generator=g) * (1 + rank)  # ranks see different distributions


def _alone_group(rank: int):
    """A one-rank group holding this rank: a layer on it is the single-process computation.
    Every rank must create every group, in the same order."""
    return [dist.new_group([r]) for r in range(WORLD)][rank]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, detached copies (FSDP2's sharded ones all-gathered)."""
    state = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        t = t.full_tensor() if isinstance(t, DTensor) else t
        state[name] = t.detach().clone()
    return state


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # a byte view compares bitwise (NaN == NaN, -0.0 != 0.0) and passes bools through gloo
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_identical_across_ranks(state: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor of `state` bitwise equal on all ranks (one all-gather; all ranks must call,
    and all reach the same verdict)."""
    names = sorted(state)
    parts = [_bytes(state[name]) for name in names]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    differ, start = [], 0
    for name, part in zip(names, parts):
        stop = start + part.numel()
        if not all(torch.equal(copies[0][start:stop], c[start:stop]) for c in copies[1:]):
            differ.append(name)
        start = stop
    assert not differ, f"{what}: {differ} differ across ranks"


def _assert_finite(state: dict[str, torch.Tensor], what: str) -> None:
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"{what}: non-finite {bad}"


def _assert_close_state(state, reference, what: str, tol: float = 1e-5) -> None:
    assert state.keys() == reference.keys(), what
    for name, t in state.items():
        if t.is_floating_point():
            torch.testing.assert_close(t, reference[name], rtol=tol, atol=tol,
                                       msg=lambda m, name=name: f"{what}: {name}: {m}")
        else:
            assert torch.equal(t, reference[name]), f"{what}: {name}"


def _assert_unchanged(before, after, what: str) -> None:
    changed = [name for name in before if not torch.equal(_bytes(before[name]), _bytes(after[name]))]
    assert not changed, f"{what}: {changed} changed"


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "gather", "scatter", "all_gather_object", "broadcast_object_list", "barrier")


def _describe(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(_describe(v) for v in value)
    return None


class _CollectiveLog(list):
    """(name, shapes and dtypes of the tensor arguments) per collective call, plus markers.

    With a `lockstep` group, every entry is first compared with the other ranks' (over that
    group, by the unpatched all_gather_object): the first difference raises AssertionError on
    every rank, naming it, where the mismatched collective itself would abort or hang. With
    `forbidden`, a collective call raises AssertionError instead of running.
    """

    def __init__(self, all_gather_object, lockstep=None, forbidden=False):
        super().__init__()
        self._all_gather_object, self._lockstep, self._forbidden = all_gather_object, lockstep, forbidden

    def last_marker(self):
        return next((e for e in reversed(self) if e[0] == "marker"), None)

    def add(self, entry) -> None:
        if self._forbidden and entry[0] != "marker":
            raise AssertionError(f"collective {entry} during {self.last_marker()}")
        if self._lockstep is not None:
            entries = [None] * dist.get_world_size(self._lockstep)
            self._all_gather_object(entries, entry, group=self._lockstep)
            if any(e != entries[0] for e in entries):
                raise AssertionError(f"collectives differ across ranks after {self.last_marker()} and "
                                     f"{len(self)} entries: the ranks call {entries}")
        self.append(entry)

    def mark(self, *what) -> None:
        self.add(("marker", what))


@contextlib.contextmanager
def _record_collectives(lockstep=None, forbidden=False):
    """Logs every collective called through the `torch.distributed` module (as the library calls
    them: `dist.all_reduce(...)`) into a `_CollectiveLog`, then runs it."""
    assert vq_layers.distributed.dist is dist  # the attributes patched here are the library's
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}
    log = _CollectiveLog(originals["all_gather_object"], lockstep, forbidden)

    def recorder(name, original):
        def call(*args, **kwargs):
            described = (_describe(a) for a in (*args, *kwargs.values()))
            log.add((name, tuple(d for d in described if d is not None)))
            return original(*args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(dist, name, recorder(name, original))
    try:
        yield log
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


class _AutoEncoder(nn.Module):
    """Linear encoder -> VectorQuantize -> Linear decoder."""

    def __init__(self, **vq_kwargs):
        super().__init__()
        self.encoder = nn.Linear(DIM, LATENT)
        self.vq = VectorQuantize(LATENT, **vq_kwargs)
        self.decoder = nn.Linear(LATENT, DIM)

    def forward(self, x):
        quantized, indices, loss = self.vq(self.encoder(x))
        return self.decoder(quantized), indices, loss


def _train_step(model, optimizer, x):
    """One step on the mean loss over x's tokens; returns the chosen indices."""
    out, indices, vq_loss = model(x)
    loss = F.mse_loss(out.float(), x) + vq_loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return indices


def _fully_shard(model, **kwargs):
    from torch.distributed.fsdp import fully_shard

    for module in (model.encoder, model.decoder, model):
        fully_shard(module, **kwargs)
    return model


# ------------------------------------------------------------------------------------------
# 1, 2. DDP and FSDP2 training: identical across ranks, equal to one process on the global batch

STEPS = 4
# (VectorQuantize keywords, compare with one process on the global batch, DDP broadcast_buffers)
TRAIN_CONFIGS = [
    ({"codebook_size": 8}, True, True),
    # inner width 2 * 2 != LATENT: the quantizer's own projections train too
    ({"codebook_size": 8, "heads": 2, "separate_codebook_per_head": True, "codebook_dim": 2}, True, False),
    # k-means and dead codes sample data: no single-process reference, ranks must agree exactly
    ({"codebook_size": 16, "kmeans_init": True, "kmeans_iters": 3, "threshold_ema_dead_code": 2.0, "heads": 2,
      "separate_codebook_per_head": True, "codebook_dim": 3}, False, False),
]


def _train_and_compare(rank: int, world: int, wrapper: str) -> None:
    for vq_kwargs, compare, broadcast_buffers in TRAIN_CONFIGS:
        what = f"{wrapper} {vq_kwargs}"
        torch.manual_seed(0)
        model = _AutoEncoder(**vq_kwargs)
        torch.manual_seed(0)
        single = _AutoEncoder(sync_codebook=False, **vq_kwargs)
        initial = _state(model)
        _assert_close_state(initial, _state(single), what, tol=0)
        if wrapper == "ddp":
            # broadcast_buffers=False: only the library keeps the codebooks alike
            wrapped = DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
        else:
            wrapped = _fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)  # after wrapping: FSDP2 swaps params
        single_optimizer = torch.optim.SGD(single.parameters(), lr=LR)
        torch.manual_seed(100 + rank)  # from here on, a local random draw differs between ranks
        replaced = 0
        for step in range(STEPS):
            batches = [_batch(step, r) for r in range(world)]
            indices = _train_step(wrapped, optimizer, batches[rank])
            replaced += int(model.vq._codebook.dead_codes_replaced)
            if compare:
                single_indices = _train_step(single, single_optimizer, torch.cat(batches))
                assert torch.equal(indices, single_indices.chunk(world)[rank]), f"{what}: step {step} indices"
        state = _state(model)
        _assert_identical_across_ranks(state, what)
        _assert_finite(state, what)
        for name in ("encoder.weight", "vq._codebook.embed", "vq._codebook.embed_avg"):
            assert not torch.equal(state[name], initial[name]), f"{what}: {name} did not train"
        if compare:
            _assert_close_state(state, _state(single), what)
        if vq_kwargs.get("threshold_ema_dead_code"):
            assert replaced > 0, f"{what}: the dead-code path never ran"


# ------------------------------------------------------------------------------------------
# uneven, empty and all-masked per-rank batches (the ragged tests and the collective recorder's)

# per step, per rank: (b, n, mask) with mask None | "some" | "none" (every token masked)
RAGGED_STEPS = [
    ((0, 4, None), (0, 3, None)),  # no tokens on any rank
    ((0, 4, None), (2, 3, None)),  # rank 0 empty (b = 0)
    ((1, 5, None), (1, 9, None)),  # 5 and 9 tokens
    ((2, 4, "none"), (2, 4, "some")),  # rank 0 all masked
    ((2, 0, None), (3, 2, "some")),  # rank 0 empty (n = 0)
    ((2, 3, "some"), (1, 4, None)),
    ((1, 6, "some"), (2, 4, "none")),  # rank 1 all masked
]


def _ragged(step: int, rank: int, dim: int = 4):
    """(x, mask or None, x's kept tokens (m, dim)) of `rank` at `step` of RAGGED_STEPS."""
    b, n, kind = RAGGED_STEPS[step][rank]
    g = torch.Generator().manual_seed(500 + 10 * step + rank)
    x = torch.randn(b, n, dim, generator=g) * (1 + rank)
    if kind is None:
        return x, None, x.reshape(-1, dim)
    mask = torch.rand(b, n, generator=g) > 0.4 if kind == "some" else torch.zeros(b, n, dtype=torch.bool)
    if kind == "some":
        mask[0, 0] = True
    return x, mask, x[mask]
