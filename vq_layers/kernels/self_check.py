"""A Triton kernel checks itself once against the torch reference before it is trusted.

A kernel that compiles but computes wrong results on some GPU (a Triton or driver bug, an
architecture the kernels were never run on) raises nothing, so the dispatch's fallback on
exceptions cannot notice it. Before the first launch of a kernel for a key — (kernel, device,
dtype, the options that select a different compiled kernel: `nearest_code`'s metric variant,
precision and feature dim; `lfq_entropy`'s number of bits) — `trusted` runs the kernel and the
torch reference on a small problem built to expose wrong results, and keeps the verdict for the
process:

- `nearest_code`: integer-valued data on which fp32 is exact (every product and sum below 2^24),
  so both paths must agree index for index: rows whose two best codes differ by one unit at a
  magnitude near 2^22 (a relative gap of a few ulps), rows whose two best codes are distinct but
  equally good, rows whose best code has three exact copies (the lowest index wins), plain rows
  among the codes; the rows' values have up to 21 significant bits, so a kernel that silently
  computes its products in TF32 (11 bits) picks wrong codes ("tf32" itself is checked on data
  it represents exactly). Two heads, ragged row and code tiles, and on CUDA a codebook large
  enough to be split across programs. Sampled variants (temperature > 0): every code twice,
  rows whose best code is clear by 64 temperatures (more than the Gumbel noise can bridge): the
  kernel must pick the best code in one of its two copies, each copy about half the time.
- `lfq_entropy` (the dense kernels, forward and backward): tokens with every bit uncertain, with
  confident (|l| >= 30) and uncertain bits mixed, at the confidence threshold, and with
  saturated (1e4) and zero logits; the code mass and the logits' gradient must be within 1e-4 of
  the reference's largest value.

A mismatch under `VQ_LAYERS_BACKEND=auto` warns once (naming the kernel, the key and the error)
and the torch reference runs for that key from then on; other keys keep their kernels. Under an
insisting `VQ_LAYERS_BACKEND=triton` (or `backend="triton"`) it raises `KernelMismatchError`
instead, on that call and every later one for the key: asking for the kernel means wanting to
know when it is wrong. `VQ_LAYERS_SELF_CHECK=0` skips the check (read at every call); `reset()`
forgets the verdicts, `verdicts()` lists them.

The check runs inside the op's eager implementation, so under torch.compile it runs when the
compiled graph first calls the op, never while tracing. It costs one host sync and a few small
launches per key, once per process; later calls only look the key up in a dict. It creates no
float64 tensor. A first call during CUDA graph capture cannot sync: it runs the torch reference
(the kernel, unchecked, when insisting) and leaves the check to the first call outside capture.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..precision import without_autocast

ENV = "VQ_LAYERS_SELF_CHECK"
# the dense LFQ kernels' outputs (code mass, logits gradient) against the reference's, as a
# fraction of the reference's largest absolute value (both paths agree to ~1e-6 on CPU and fp64)
LFQ_TOLERANCE = 1e-4
# a correct sampler picks the second copy of a code between these fractions of the rows (more
# than 6 standard deviations from 1/2 at 300 rows)
COPY_BALANCE = (0.3, 0.7)


class KernelMismatchError(RuntimeError):
    """A Triton kernel disagreed with the torch reference under VQ_LAYERS_BACKEND=triton."""


@dataclass
class Verdict:
    kernel: str
    key: tuple
    error: str | None  # None: the kernel agreed with the reference
    seconds: float
    warned: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


_verdicts: dict[tuple, Verdict] = {}


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


def reset() -> None:
    """Forget every verdict: the next call of each key checks again."""
    _verdicts.clear()


def verdicts() -> dict[tuple, Verdict]:
    return dict(_verdicts)


def describe(key: tuple) -> str:
    """("nearest_code", device, dtype, (("metric", "l2"), ...)) -> "nearest_code on cpu (float32, metric=l2, ...)"."""
    kernel, device, dtype, options = key
    details = ", ".join([str(dtype).replace("torch.", "")] + [f"{name}={value}" for name, value in options])
    return f"{kernel} on {device} ({details})"


def trusted(key: tuple, check: Callable[[], str | None], insisting: bool) -> bool:
    """Whether the kernel of `key` may run: checks it the first time (`check()` returns None when
    the kernel agrees with the reference, else what differed). A mismatch warns once and returns
    False under auto, raises KernelMismatchError when `insisting`. Exceptions of `check` (a kernel
    that fails to compile) propagate to the dispatch, which handles them as any kernel failure."""
    if not enabled():
        return True
    verdict = _verdicts.get(key)
    if verdict is None:
        if _capturing(key[1]):  # the check needs a host sync: not now; the next call outside capture checks
            return insisting
        start = time.perf_counter()
        with torch.no_grad():
            error = without_autocast(check)()
        verdict = _verdicts[key] = Verdict(key[0], key, error, time.perf_counter() - start)
    if verdict.ok:
        return True
    message = (f"vq_layers: the Triton kernel {describe(key)} disagrees with the torch reference on its "
               f"self-check: {verdict.error}.")
    if insisting:
        raise KernelMismatchError(f"{message} VQ_LAYERS_BACKEND=triton insists on the kernel; use auto (falls "
                                  f"back to torch for this key) or torch, or {ENV}=0 to skip the check.")
    if not verdict.warned:
        verdict.warned = True
        warnings.warn(f"{message} The torch reference runs for this key from now on ({ENV}=0 skips the check, "
                      f"VQ_LAYERS_BACKEND=triton raises instead).", RuntimeWarning, stacklevel=4)
    return False


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# --------------------------------------------------------------------------------------------
# nearest_code


def search_key(x: Tensor, l2: bool, euclidean: bool, sampled: bool, precision: str) -> tuple:
    metric = "euclidean" if euclidean else "l2" if l2 else "dot"
    variant = f"{metric} sampled" if sampled else metric
    return ("nearest_code", x.device, x.dtype, (("metric", variant), ("precision", precision), ("d", x.shape[-1])))


def _sizes(device: torch.device, d: int) -> tuple[int, int, int]:
    """(heads, rows, codes) of the check: ragged row and code tiles either way; on CUDA enough
    codes that the codebook is split across programs with several tiles per split (up to 64 MiB
    of codebook)."""
    return (2, 150, min(20000, max(300, 2**23 // d))) if device.type == "cuda" else (2, 150, 300)


CODE_BOX = 4  # the special codes' coordinates lie in [-4, 4], the others in [-2, 2]
LARGE = 62  # coordinates of a far row with large values


def search_problem(d: int, l2: bool, precision: str, device, heads: int = 2, rows: int = 150,
                   codes: int = 300, seed: int = 0) -> tuple[Tensor, Tensor, dict]:
    """x (heads, rows, d), codebook (heads, codes, d) float32 with integer (or quarter-integer)
    values on which fp32 search is exact, and {"near", "tie", "copies", "plain"}: (rows,) masks
    of the row kinds.

    - "near" (d >= 2): two codes c1, c2 that differ by a swap of coordinates j, m where
      x_j = x_m + 1: x.c1 - x.c2 = 1 exactly at |x.c| ~ 2^22 (c1 wins by a few ulps);
    - "tie" (d >= 2): the same with x_j = x_m: two distinct codes equally good, the lowest index wins;
    - "copies": the row's best code at three positions, the lowest index wins;
    - "plain": quarter-integer rows inside the codes' box, among lattice codes (ties abound).
    Up to 62 coordinates of a far row have large values, of up to 21 significant bits (11 for
    precision "tf32", which cannot do better), the others small: every dot product and
    ||c||^2 - 2 x.c stays within 2^24, exact in fp32.
    """
    generator = torch.Generator(device=device).manual_seed(seed)

    def ints(low: int, high: int, shape) -> Tensor:  # integer values, float32 (no int64 blocks)
        return torch.randint(low, high + 1, shape, generator=generator, device=device, dtype=torch.float32)

    box = CODE_BOX
    # at most LARGE coordinates of a row are large (up to `limit`), the others in [-2, 2]:
    # |2 x.c| + ||c||^2 <= 8 (LARGE limit + 2 d) + 16 d <= 2^24
    large = min(d, LARGE)
    limit = max(8, (2**21 - 4 * d) // large)
    if precision == "tf32":
        limit = min(limit, 2**11 - 1)
    pairs_each = rows // 5 if d >= 2 else 0
    row = torch.arange(rows, device=device)
    near, tie = row < pairs_each, (row >= pairs_each) & (row < 2 * pairs_each)
    copies = (row >= 2 * pairs_each) & (row < 2 * pairs_each + rows // 5)
    plain = row >= 2 * pairs_each + rows // 5
    pairs = near | tie
    needed = 2 * 2 * pairs_each + 3 * (rows // 5)
    if needed > codes:
        raise ValueError(f"search_problem: {needed} special codes do not fit in {codes}")

    order = torch.rand(heads, rows, d, generator=generator, device=device).argsort(-1)  # the large ones first
    is_large = torch.zeros(heads, rows, d, dtype=torch.bool, device=device).scatter_(2, order[..., :large], True)
    x = torch.where(is_large, ints(-limit, limit, (heads, rows, d)), ints(-2, 2, (heads, rows, d)))
    if pairs_each:  # x_m = a, x_j = a + 1 (near) or a (tie), a large and positive
        j, m = order[..., :1], order[..., 1:2]
        a = ints(limit // 2, limit - 1, (heads, rows, 1))
        x.scatter_(2, m, torch.where(pairs[:, None], a, x.gather(2, m)))
        x.scatter_(2, j, torch.where(pairs[:, None], a + near[:, None].float(), x.gather(2, j)))
    x = torch.where(plain[:, None], ints(-4 * box, 4 * box, (heads, rows, d)) / 4, x)
    # the best code in the box for a far row: clamp(x) for l2, sign(x) * box for dot
    best = x.clamp(-box, box) if l2 else torch.where(x >= 0, box, -box).float()
    swapped = best
    if pairs_each:  # c1 = best with box - 1 at m; c2 = c1 with j and m swapped
        best.scatter_(2, m, torch.where(pairs[:, None], box - 1.0, best.gather(2, m)))
        swapped = best.clone()
        swapped.scatter_(2, j, best.gather(2, m))
        swapped.scatter_(2, m, best.gather(2, j))

    codebook = ints(-2, 2, (heads, codes, d))
    slots = torch.stack([torch.randperm(codes, generator=generator, device=device) for _ in range(heads)])
    used = 0
    for sources, mask in (((best, swapped), pairs), ((best, best, best), copies)):
        chosen = mask.nonzero()[:, 0]
        for source in sources:
            position = slots[:, used : used + chosen.numel(), None].expand(-1, -1, d)
            codebook.scatter_(1, position, source[:, chosen])
            used += chosen.numel()
    return x.contiguous(), codebook.contiguous(), {"near": near, "tie": tie, "copies": copies, "plain": plain}


def sampled_problem(d: int, device, heads: int = 2, rows: int = 150, codes: int = 300,
                    seed: int = 1) -> tuple[Tensor, Tensor, int]:
    """For sampled search: integer rows near distinct integer codes, each code twice (at i and
    i + half) -> (x, codebook (heads, 2 * half, d), half). Costs stay below 2^17, so cost / t is
    exact for any power-of-two temperature t >= 2^-6."""
    generator = torch.Generator(device=device).manual_seed(seed)
    box = max(1, math.isqrt(2**17 // (3 * d)) - 1)  # ||c||^2 + 2|x.c| <= 3 d (box + 1)^2 <= 2^17
    half = codes // 2 if d >= 20 else min(codes // 2, (2 * box + 1) ** d // 2)
    distinct = []
    for _ in range(heads):
        draws = 4 * half + 8 if d < 20 else half  # in 20 or more dims, random codes are distinct
        drawn = torch.randint(-box, box + 1, (draws, d), generator=generator, device=device,
                              dtype=torch.float32).unique(dim=0)
        distinct.append(drawn[torch.randperm(drawn.shape[0], generator=generator, device=device)[:half]])
    half = min(table.shape[0] for table in distinct)
    table = torch.stack([codes_[:half] for codes_ in distinct])  # (heads, half, d)
    pick = torch.randint(0, half, (heads, rows, 1), generator=generator, device=device)
    x = table.gather(1, pick.expand(-1, -1, d)) + torch.randint(-1, 2, (heads, rows, d), generator=generator,
                                                                 device=device, dtype=torch.float32)
    return x.contiguous(), torch.cat([table, table], dim=1).contiguous(), half


def exact_dots(x: Tensor, codebook: Tensor) -> Tensor:
    """x . c (heads, rows, codes) in fp32 with TF32 off on CUDA: exact on the problems' integers."""
    from .nearest_code import _ieee_fp32_matmul

    with _ieee_fp32_matmul(x.device):
        return torch.einsum("hnd,hkd->hnk", x, codebook)


def sampled_costs(x: Tensor, table: Tensor, l2: bool, euclidean: bool) -> Tensor:
    """The cost the sampled search minimizes before noise: ||c||^2 - 2 x.c, ||x - c|| or -x.c."""
    dots = exact_dots(x, table)
    if not l2:
        return -dots
    cost = table.square().sum(-1)[:, None] - 2 * dots
    return (cost + x.square().sum(-1, keepdim=True)).clamp(min=0).sqrt() if euclidean else cost


def _first_difference(got: Tensor, want: Tensor, mask: Tensor | None = None) -> str:
    differ = got != want if mask is None else (got != want) & mask
    head, row = (int(v) for v in differ.nonzero()[0])
    return f"head {head}, row {row}: {int(got[head, row])} instead of {int(want[head, row])}"


def check_nearest_code(device: torch.device, d: int, l2: bool, euclidean: bool, sampled: bool,
                       precision: str) -> str | None:
    """None when the kernel agrees with the torch reference, else what differed."""
    from . import triton_nearest_code
    from .nearest_code import _torch_search

    heads, rows, codes = _sizes(device, d)
    if not sampled:
        x, codebook, _ = search_problem(d, l2, precision, device, heads, rows, codes)
        got = triton_nearest_code.search(x, codebook, l2, False, 0.0, 0, precision)
        want = _torch_search(x, codebook, l2, False, 0.0, 0)
        wrong = int((got != want).sum())
        if wrong:
            return f"{wrong} of {got.numel()} indices differ ({_first_difference(got, want)})"
        return None
    x, codebook, half = sampled_problem(d, device, heads, rows, codes)
    two = sampled_costs(x, codebook[:, :half], l2, euclidean).topk(2, dim=-1, largest=False).values
    clear = two[..., 0] < two[..., 1]  # the rows whose best code is unique
    if not bool(clear.any()):
        return None
    # a margin of 64 temperatures: more than the Gumbel noise spans (-16.1 to 3.9, both paths)
    gap = (two[..., 1] - two[..., 0])[clear].min().item()
    temperature = 2.0 ** (math.floor(math.log2(gap)) - 6)
    got = triton_nearest_code.search(x, codebook, l2, euclidean, temperature, 12345, precision)
    want = _torch_search(x, codebook, l2, euclidean, temperature, 6789)
    wrong = int(((got % half != want % half) & clear).sum())
    if wrong:
        return (f"{wrong} of {int(clear.sum())} sampled rows with a clear best code (at temperature {temperature:g}) "
                f"picked another code ({_first_difference(got % half, want % half, clear)})")
    if int(clear.sum()) >= 100:
        second = float((got >= half)[clear].float().mean())
        if not COPY_BALANCE[0] <= second <= COPY_BALANCE[1]:
            return (f"the Gumbel noise is biased: of two identical copies of the best code, the second was picked "
                    f"in {second:.0%} of {int(clear.sum())} rows (expected about half)")
    return None


# --------------------------------------------------------------------------------------------
# lfq_entropy


def lfq_key(logits: Tensor) -> tuple:
    return ("lfq_entropy", logits.device, logits.dtype, (("bits", logits.shape[-1]),))


def lfq_problem(d: int, device, tokens: int, seed: int = 2) -> Tensor:
    """Bit logits (tokens, d) fp32: every bit uncertain; confident (|l| in [30, 80]) and uncertain
    bits mixed; all confident but one bit at the threshold (29.5 to 30.5); saturated (1e4) and
    zero logits among uncertain ones."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(tokens, d, generator=generator, device=device)

    sign = torch.where(torch.rand(tokens, d, generator=generator, device=device) < 0.5, -1.0, 1.0)
    kind = torch.arange(tokens, device=device) % 4
    uncertain = 2.0 * torch.randn(tokens, d, generator=generator, device=device)
    confident = sign * uniform(30.0, 80.0)
    mixed = torch.where(torch.rand(tokens, d, generator=generator, device=device) < 0.5, confident, uncertain)
    threshold = confident.clone()
    threshold[:, 0] = sign[:, 0] * uniform(29.5, 30.5)[:, 0]
    extreme = torch.where(uniform(0, 1) < 0.2, sign * 1e4, torch.where(uniform(0, 1) < 0.2, 0.0, uncertain))
    choices = torch.stack([uncertain, mixed, threshold, extreme])  # (4, tokens, d)
    return choices.gather(0, kind[None, :, None].expand(1, -1, d))[0].contiguous()


def check_lfq_entropy(device: torch.device, d: int) -> str | None:
    """The dense kernels' code mass and logits gradient against the torch reference's."""
    from .lfq_entropy import _dense_mass, _triton_dense_mass

    logits = lfq_problem(d, device, tokens=160 if device.type == "cuda" else 32)
    mass = _dense_mass(logits[:, None], torch_only=True)[0]
    generator = torch.Generator(device=device).manual_seed(3)
    grad_mass = torch.randn(2**d, generator=generator, device=device)
    grad_mass = grad_mass - (grad_mass * mass).sum() / mass.sum()  # centred, as the op's backward does
    grad = _dense_mass(logits[:, None], None, grad_mass[None], torch_only=True)[:, 0]
    mass_error = ((_triton_dense_mass(logits, None) - mass).abs().max() / mass.abs().max()).item()
    grad_error = ((_triton_dense_mass(logits, grad_mass) - grad).abs().max() / grad.abs().max().clamp(min=1e-30)).item()
    if mass_error <= LFQ_TOLERANCE and grad_error <= LFQ_TOLERANCE:  # False for NaN too
        return None
    return (f"code mass off by {mass_error:.3g} and logits gradient by {grad_error:.3g} of the reference's "
            f"largest value (tolerance {LFQ_TOLERANCE:g})")
