"""Counter-based pseudo-random numbers: a hash of (seed, position), in integer ops only.

Draws made this way are the same eager and compiled (integer arithmetic is exact, whatever the
backend fuses), on every device, without a host sync, and a row's draw depends on its own
position only: the kept rows of a masked batch draw what the same rows draw alone, however
many masked rows sit between them. Inputs are int64 tensors or Python ints (the same function
serves both, for draws the host needs without asking the device).
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: consecutive positions land far apart before mixing


def mix32(x):
    """A 32-bit integer hash (xor-shift-multiply rounds) of x in [0, 2^32) -> [0, 2^32). Every
    product stays below 2^59: exact in int64."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    return (x >> 16) ^ x


def counter_hash(seed, position):
    """Pseudo-random 32-bit value of `position` (int64 tensor or int, 0 <= position < 2^31) in
    the stream `seed` (0 <= seed < 2^32)."""
    return mix32((seed + position * GOLDEN) & MASK32)


def draw_seed(device, bits: int = 31) -> Tensor:
    """A 0-dim int64 seed in [0, 2^bits) from torch's generator (torch.manual_seed reproduces
    it): one draw, however many values are then hashed from it."""
    return torch.randint(0, 2**bits, (), dtype=torch.long, device=device)
