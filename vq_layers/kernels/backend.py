"""Which implementation runs a kernel op: the pure-torch reference or the Triton kernel.

Chosen per call (so an op registered with torch.library decides at run time, not at trace time)
from an explicit `backend` argument or the VQ_LAYERS_BACKEND environment variable:
- "auto" (default): Triton for CUDA tensors when triton imports, torch otherwise;
- "torch": always the reference;
- "triton": always the kernel; CPU tensors only under the interpreter (TRITON_INTERPRET=1, set
  before triton is first imported), where it serves to test the kernels, slowly.

Before a kernel's first launch for a key it checks itself against the reference (self_check.py).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from . import self_check

BACKENDS = ("auto", "torch", "triton")
ENV = "VQ_LAYERS_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str | None) -> str:
    """The backend named by the argument, or else by VQ_LAYERS_BACKEND, validated."""
    name = "backend" if backend else ENV
    backend = backend or os.environ.get(ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{name}: expected one of {BACKENDS}, got {backend!r}")
    return backend


def use_triton(device: torch.device, backend: str | None = None) -> bool:
    """Whether an op on tensors of `device` runs its Triton kernel."""
    backend = check_backend(backend)
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and triton_importable()
    if not triton_importable():
        raise RuntimeError("backend 'triton' was asked for but triton cannot be imported (pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"backend 'triton': expected CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                         f"got tensors on {device}")
    return True


SYNC_FREE_ENV = "VQ_LAYERS_SYNC_FREE"


def sync_free(device: torch.device) -> bool:
    """Whether ops on `device` take their host-sync-free paths (static shapes, nothing read back).

    On an accelerator always: a sync stalls its queue and breaks CUDA graphs, and the data-
    dependent alternative (LFQ's sparse-exact entropy, which partitions the tokens) is there no
    faster. On the CPU a sync costs nothing, and those paths run unless VQ_LAYERS_SYNC_FREE=1 (read at
    every call): tests and benchmarks set it to count, on the CPU, what a GPU step does."""
    if device.type != "cpu":
        return True
    return os.environ.get(SYNC_FREE_ENV, "0") not in ("", "0")


def split_blocks(programs: int, blocks: int, device: torch.device) -> tuple[int, int]:
    """Launch geometry shared by the kernels: when `programs` alone would leave the GPU idle, the
    `blocks` each of them walks are split over several programs (a few per SM), whose partial
    results the host then reduces. -> (splits, blocks per split)."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = max(1, min(blocks, -(-target // max(programs, 1))))
    per_split = max(1, -(-blocks // splits))
    return max(1, -(-blocks // per_split)), per_split


_triton_failure: str | None = None  # why the kernels failed under "auto" (then the reference runs)


def run(device: torch.device, backend: str | None, triton_fn, torch_fn, check=None):
    """Runs `triton_fn()` where the Triton kernel is chosen, else `torch_fn()`.

    Under "auto", a kernel that fails to compile or launch (a GPU or Triton version it does not
    support) hands over to the reference for the rest of the process, with one warning; an
    explicit "triton" raises instead. Running out of memory is not a kernel failure.

    `check`: (key, fn) of the kernel's self-check (self_check.py), run before the key's first
    launch; a kernel that disagrees with the reference is not launched for that key again
    (under "auto" the reference runs, with one warning; "triton" raises KernelMismatchError).
    """
    global _triton_failure
    if not use_triton(device, backend) or (_triton_failure and check_backend(backend) == "auto"):
        return torch_fn()
    try:
        if check is None or self_check.trusted(*check, insisting=check_backend(backend) == "triton"):
            return triton_fn()
    except (torch.cuda.OutOfMemoryError, ValueError, TypeError):  # not the kernel's fault
        raise
    except Exception as error:
        if check_backend(backend) != "auto":
            raise
        result = torch_fn()  # raises too when the failure was not the kernel's (a broken CUDA context)
        _triton_failure = f"{type(error).__name__}: {error}"
        warnings.warn(f"vq_layers: the Triton kernels failed ({_triton_failure[:300]}); the torch reference "
                      f"runs instead from now on. {ENV}=torch silences this, {ENV}=triton raises the error.",
                      RuntimeWarning, stacklevel=2)
        return result
    return torch_fn()  # the kernel failed its self-check for this key
