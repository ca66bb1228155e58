"""Run a function in a few local processes joined in a gloo `torch.distributed` group.

`run_in_processes(fn, 2, *args)` calls `fn(rank, world_size, *args)` in freshly spawned
processes, so the pytest process itself never holds a process group. A child's exception
(an assert included) is re-raised here with the child's traceback, and everything is killed
after `timeout` seconds so that a mismatched collective fails the test instead of hanging CI.

`fn` and `args` are pickled to the children: `fn` must be a module-level function of an
importable module (test modules are, under pytest's default import mode).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
