"""Triton kernels for the dense path of `code_mass` (lfq_entropy.py): the code mass over all 2^d
codes and its gradient, O(n·d + 2^d) memory.

For a tile of BLOCK_N tokens and BLOCK_K codes, log p(code | token) is a tiny matmul of the bit
log-probabilities against the code bits, generated in registers from the code index (most
significant bit first):

    log p[n, k] = logsigmoid(l)[n, :] @ b[:, k] + logsigmoid(-l)[n, :] @ (1 - b)[:, k]

(sums of non-positive terms with 0/1 weights: no cancellation). The forward sums exp of it over
tokens per code; the backward recomputes the tiles (as flash attention does) and sums
p[n, k] g[k] over the codes with each bit set and clear, the two same-sign sums the gradient is
built from. Programs split the other axis when one axis alone would leave the GPU idle; their
partial sums are added on the host side, so results do not depend on scheduling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import interpreting, split_blocks


@triton.jit
def _code_bits(codes, dims, d):
    """(BLOCK_D, BLOCK_K) bit i of each code, and its complement, both 0 on padding dims."""
    dim_ok = (dims < d)[:, None]
    bits = ((codes[None, :] >> tl.maximum(d - 1 - dims, 0)[:, None]) & 1).to(tl.float32)
    return tl.where(dim_ok, bits, 0.0), tl.where(dim_ok, 1.0 - bits, 0.0)


@triton.jit
def _log_probs(pos_ptr, neg_ptr, rows, row_ok, dims, d, ones, zeros):
    """(BLOCK_N, BLOCK_K) log p(code | token) of a tile."""
    mask = row_ok[:, None] & (dims < d)[None, :]
    offsets = rows.to(tl.int64)[:, None] * d + dims[None, :]
    pos = tl.load(pos_ptr + offsets, mask=mask, other=0.0)
    neg = tl.load(neg_ptr + offsets, mask=mask, other=0.0)
    log_p = tl.dot(pos, ones, input_precision="ieee")
    return tl.dot(neg, zeros, log_p, input_precision="ieee")


@triton.jit
def _mass_kernel(pos_ptr, neg_ptr, out_ptr, n, d, codes, tokens_per_split,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    code_block, split = tl.program_id(0), tl.program_id(1).to(tl.int64)
    code = code_block * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    ones, zeros = _code_bits(code, dims, d)
    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, n)
    mass = tl.zeros((BLOCK_K,), tl.float32)
    for first in range(start, stop, BLOCK_N):
        rows = first + tl.arange(0, BLOCK_N)
        row_ok = rows < stop
        probs = tl.exp(_log_probs(pos_ptr, neg_ptr, rows, row_ok, dims, d, ones, zeros))
        mass += tl.sum(tl.where(row_ok[:, None], probs, 0.0), axis=0)
    tl.store(out_ptr + split * codes + code, mass, mask=code < codes)


@triton.jit
def _bit_sums_kernel(pos_ptr, neg_ptr, grad_ptr, ones_ptr, zeros_ptr, n, d, codes, codes_per_split,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    row_block, split = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    dims = tl.arange(0, BLOCK_D)
    start = split * codes_per_split
    stop = tl.minimum(start + codes_per_split, codes)
    set_sum = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    clear_sum = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for first in range(start, stop, BLOCK_K):
        code = first + tl.arange(0, BLOCK_K)
        ones, zeros = _code_bits(code, dims, d)
        grad = tl.load(grad_ptr + code, mask=code < stop, other=0.0)  # codes past the split: weight 0
        weighted = tl.exp(_log_probs(pos_ptr, neg_ptr, rows, row_ok, dims, d, ones, zeros)) * grad[None, :]
        set_sum = tl.dot(weighted, tl.trans(ones), set_sum, input_precision="ieee")
        clear_sum = tl.dot(weighted, tl.trans(zeros), clear_sum, input_precision="ieee")
    out = (split * n + rows)[:, None] * d + dims[None, :]
    mask = row_ok[:, None] & (dims < d)[None, :]
    tl.store(ones_ptr + out, set_sum, mask=mask)
    tl.store(zeros_ptr + out, clear_sum, mask=mask)


def _blocks(d: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs 16 or more on every side
    return (32, 256, block_d) if interpreting() else (64, 64, block_d)


def code_mass(pos: Tensor, neg: Tensor) -> Tensor:
    """pos = logsigmoid(l), neg = logsigmoid(-l), both (n, d) fp32 -> sum_n p(k | n), (2^d,)."""
    n, d = pos.shape
    codes = 2**d
    block_n, block_k, block_d = _blocks(d)
    code_blocks = triton.cdiv(codes, block_k)
    splits, blocks_per_split = split_blocks(code_blocks, triton.cdiv(n, block_n), pos.device)
    tokens_per_split = blocks_per_split * block_n
    out = torch.zeros((splits, codes), dtype=torch.float32, device=pos.device)
    if n:
        _mass_kernel[(code_blocks, splits)](pos.contiguous(), neg.contiguous(), out, n, d, codes, tokens_per_split,
                                            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d)
    return out.sum(0)


def bit_sums(pos: Tensor, neg: Tensor, grad_mass: Tensor) -> tuple[Tensor, Tensor]:
    """-> (sum over codes with bit i set, sum over codes with bit i clear) of p(k | n) g_k, (n, d) each."""
    n, d = pos.shape
    codes = 2**d
    block_n, block_k, block_d = _blocks(d)
    row_blocks, code_blocks = triton.cdiv(n, block_n), triton.cdiv(codes, block_k)
    splits, blocks_per_split = split_blocks(row_blocks, code_blocks, pos.device)
    codes_per_split = blocks_per_split * block_k
    ones = torch.zeros((splits, n, d), dtype=torch.float32, device=pos.device)
    zeros = torch.zeros_like(ones)
    if n:
        _bit_sums_kernel[(row_blocks, splits)](pos.contiguous(), neg.contiguous(), grad_mass.contiguous(), ones,
                                               zeros, n, d, codes, codes_per_split,
                                               BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d)
    return ones.sum(0), zeros.sum(0)
