"""Triton kernel for `nearest_code`'s search: fused distance + running argmin, O(n + k) memory.

Each program takes a tile of BLOCK_N rows of one head and walks its share of the codebook in
tiles of BLOCK_K codes: cost = ||c||^2 - 2 x.c (or -x.c) on a (BLOCK_N, BLOCK_K) block of
register accumulators over D in BLOCK_D slices, then a running minimum and its index kept in
registers. Within a tile `tl.argmin` takes the first minimum; across tiles a later tile must be
strictly better; across splits (below) torch.argmin takes the first: ties go to the lowest index,
as torch.argmin. With few row tiles (small n, large k) the codebook is split across programs
and the per-split winners are reduced on the host side (split, n) -> n.

Precision: tl.dot in "ieee" fp32 by default; "tf32x3" (three TF32 products, about fp32
accuracy, on tensor cores) and plain "tf32" only when asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import interpreting, split_blocks


@triton.jit
def _search_kernel(x_ptr, codebook_ptr, code_norms_ptr, row_norms_ptr, best_ptr, index_ptr,
                   n, k, d, codes_per_split, splits, temperature, seed,
                   L2: tl.constexpr, EUCLIDEAN: tl.constexpr, SAMPLE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    # int64 offsets: h * n or h * k may pass 2^31
    row_block, split, head = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    dims = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + (head * n + rows) * d  # (BLOCK_N,) row starts, contiguous (h, n, d)
    start = split * codes_per_split
    stop = tl.minimum(start + codes_per_split, k)
    if EUCLIDEAN:
        row_norms = tl.load(row_norms_ptr + head * n + rows, mask=row_ok, other=0.0)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_index = tl.zeros((BLOCK_N,), tl.int32)
    for first in range(start, stop, BLOCK_K):
        codes = first + tl.arange(0, BLOCK_K)
        code_ok = codes < stop
        code_cols = codebook_ptr + (head * k + codes) * d  # (BLOCK_K,)
        dots = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for offset in range(0, d, BLOCK_D):
            dim_ok = offset + dims < d
            x_tile = tl.load(x_rows[:, None] + offset + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                             other=0.0)  # (BLOCK_N, BLOCK_D)
            c_tile = tl.load(code_cols[None, :] + offset + dims[:, None], mask=dim_ok[:, None] & code_ok[None, :],
                             other=0.0)  # (BLOCK_D, BLOCK_K)
            dots = tl.dot(x_tile, c_tile, dots, input_precision=PRECISION)
        if L2:
            code_norms = tl.load(code_norms_ptr + head * k + codes, mask=code_ok, other=0.0)
            cost = code_norms[None, :] - 2.0 * dots
        else:
            cost = -dots
        if EUCLIDEAN:  # the distance itself: ||x||^2 no longer cancels out
            cost = tl.sqrt(tl.maximum(cost + row_norms[:, None], 0.0))
        if SAMPLE:  # Gumbel-max: one counter-based draw per (head, row, code), seeded from torch
            counter = (head * n + rows)[:, None] * k + codes[None, :]
            uniform = tl.minimum(tl.maximum(tl.rand(seed, counter), 1e-20), 1.0 - 1e-7)
            cost = cost / temperature + tl.log(-tl.log(uniform))
        cost = tl.where(code_ok[None, :] & (cost == cost), cost, float("inf"))  # a NaN code is never nearest
        tile_best = tl.min(cost, axis=1)
        tile_index = tl.argmin(cost, axis=1, tie_break_left=True)
        better = tile_best < best  # strict: an earlier tile keeps ties
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index + first, best_index)
    out = (head * splits + split) * n + rows
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(index_ptr + out, best_index, mask=row_ok)


def search(x: Tensor, codebook: Tensor, l2: bool, euclidean: bool, temperature: float, seed: int,
           precision: str = "ieee") -> Tensor:
    """x (h, n, d), codebook (h, k, d) fp32 -> indices (h, n) int64 minimizing the cost."""
    h, n, d = x.shape
    k = codebook.shape[1]
    if n == 0:
        return torch.zeros((h, 0), dtype=torch.long, device=x.device)
    x, codebook = x.contiguous(), codebook.contiguous()
    code_norms = codebook.square().sum(-1) if l2 else codebook.new_empty(0)
    row_norms = x.square().sum(-1) if euclidean else x.new_empty(0)
    # the interpreter pays per tile step, not per element: fewer, wider code tiles there
    block_n, block_k = (128, 256) if interpreting() else (64, 64)
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    row_blocks, code_blocks = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    splits, blocks_per_split = split_blocks(h * row_blocks, code_blocks, x.device)
    codes_per_split = blocks_per_split * block_k
    best = torch.empty((h, splits, n), dtype=torch.float32, device=x.device)
    index = torch.empty((h, splits, n), dtype=torch.int32, device=x.device)
    _search_kernel[(row_blocks, splits, h)](
        x, codebook, code_norms, row_norms, best, index, n, k, d, codes_per_split, splits,
        float(temperature) if temperature > 0 else 1.0, int(seed),
        L2=l2, EUCLIDEAN=euclidean, SAMPLE=temperature > 0,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, PRECISION=precision)
    if splits == 1:
        return index[:, 0].long()
    winner = best.argmin(dim=1, keepdim=True)  # the first split among equals: the lowest index
    return index.gather(1, winner).squeeze(1).long()
