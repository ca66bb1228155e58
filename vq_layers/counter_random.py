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


class CounterDraws:
    """A stream of 32-bit draws: counter_hash(seed, step) for step = 0, 1, ...; the seed drawn
    from torch's generator at construction (torch.manual_seed reproduces it; 24 bits, exact
    through distributed.broadcast_tensors_' float32). Tensors held outside any module's state
    (not buffers: no checkpoint, buffer averaging or DDP broadcast sees them); CPU ones let the
    host read a draw without waiting for a device, device ones (to_) a step advance the counter
    without a sync; a compiled step advances it in its graph. `synced_state`/`_state_broadcast`: an owner for
    distributed.broadcast_once_ (the ranks' streams become the first rank's)."""

    def __init__(self):
        self.seed = draw_seed("cpu", bits=24)
        self.step = torch.zeros((), dtype=torch.long)
        self._state_broadcast = False
        self._host = None  # (seed, step) as Python ints, with the tensors' state they mirror

    def synced_state(self) -> list[Tensor]:
        return [self.seed]

    def to_(self, device) -> None:
        """Moves the stream (a module whose device draws use it calls this from its _apply)."""
        self.seed, self.step, self._host = self.seed.to(device), self.step.to(device), None

    def next(self):
        """The next draw: a Python int when eager, a CPU int64 tensor under torch.compile.

        Eagerly the draw is hashed from Python ints mirroring the tensors, read back only when
        something else wrote them (a compiled step, the first synced step's broadcast): a step
        reads nothing back, which would be a host sync for a stream on a device."""
        if torch.compiler.is_compiling():
            value = counter_hash(self.seed, self.step)
            self.step.add_(1)
            return value
        state = (self.seed._version, self.step._version, self._state_broadcast)
        if self._host is None or self._host[1] != state:
            self._host = ((int(self.seed), int(self.step)), state)
        seed, step = self._host[0]
        self.step.add_(1)
        self._host = ((seed, step + 1), (self.seed._version, self.step._version, self._state_broadcast))
        return counter_hash(seed, step)
