"""Tests of `vq_layers.kernels.nearest_code` against an fp64 brute force.

The reference (`brute64`) never calls the code under test: it forms every distance
||x - c||^2 as a sum of squared differences (or every dot product x . c) in float64 from the
op's own (fp32-upcast) input values, and takes the first best code by comparing against the
minimum. fp32 inputs make those float64 differences and products exact, so the reference is
exact up to one float64 rounding per addition.

Near-ties: the op computes in fp32, so where the two best codes are within fp32 resolution
of each other either answer is right. A row is a near-tie when its relative gap is below
NEAR_TIE = 1e-6 (docs/design.md's exactness contract):
- l2:  (d2 - d1) / d2 with d1 <= d2 the two smallest fp64 distances;
- dot: (s1 - s2) / (||x|| max_j ||c_j||) with s1 >= s2 the two largest fp64 dot products
  (a dot product has no natural zero: its error scale is the magnitude of its terms).
Those rows are excluded from the index comparison; the tests check they are rare, so the
comparison is not vacuous. Exact ties are tested separately (test_*tie*): there the lowest
index must win.

Module constant TILE_ELEMENTS is read at call time; `tiles(n)` sets it, so rows and codes are
split into many tiles (code tiles of min(k, n), row tiles of max(1, n // code_tile)).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vq_layers.kernels.nearest_code as nc
from vq_layers.kernels.nearest_code import nearest_code

F64 = torch.float64
NEAR_TIE = 1e-6
SCORE_TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# --------------------------------------------------------------------------------------------
# fp64 reference and helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0, offset=0.0):
    return torch.randn(*shape, generator=gen(seed)) * scale + offset


def brute64(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"):
    """(indices, score, gap) of the fp64 brute force, shaped like the op's (n,) or (h, n).

    indices: the first best code (lowest index among exact ties); score: its ||x - c||^2 or
    x . c in float64; gap: the relative gap of the module docstring (0 for exact ties, inf
    when k == 1). Chunked over rows so the (rows, k, d) differences stay below 2^22 elements.
    """
    single = x.ndim == 2
    x64, c64 = x.to(F64), codebook.to(F64)
    if single:
        x64, c64 = x64[None], c64[None]
    h, n, d = x64.shape
    k = c64.shape[1]
    rows = max(1, 2**22 // max(1, k * d))
    costs = []
    for r in range(0, n, rows):
        xr = x64[:, r:r + rows]
        if metric == "l2":
            costs.append((xr[:, :, None, :] - c64[:, None, :, :]).square().sum(-1))
        else:
            costs.append(-(xr[:, :, None, :] * c64[:, None, :, :]).sum(-1))
    cost = torch.cat(costs, 1) if costs else x64.new_zeros(h, 0, k)  # (h, n, k), minimized
    best = cost.min(-1, keepdim=True).values if n else cost[..., :1]
    index = torch.where(cost == best, torch.arange(k), k).min(-1).values
    two = cost.topk(min(k, 2), dim=-1, largest=False).values
    if k == 1:
        gap = torch.full((h, n), math.inf, dtype=F64)
    elif metric == "l2":
        gap = (two[..., 1] - two[..., 0]) / two[..., 1].clamp_min(1e-300)
    else:
        scale = x64.norm(dim=-1) * c64.norm(dim=-1).max(-1, keepdim=True).values
        gap = (two[..., 1] - two[..., 0]) / scale.clamp_min(1e-300)
    score = best[..., 0] if metric == "l2" else -best[..., 0]
    if single:
        return index[0], score[0], gap[0]
    return index, score, gap


def score64(x, codebook, indices, metric, magnitude=False):
    """The fp64 score of the given codes (the op's own choice), shaped like indices; with
    magnitude=True also the sum of its terms' absolute values (the scale of its rounding)."""
    x64, c64 = x.to(F64), codebook.to(F64)
    if x.ndim == 2:
        chosen = c64[indices]
    else:
        chosen = torch.gather(c64, 1, indices[..., None].expand(-1, -1, c64.shape[-1]))
    terms = (x64 - chosen).square() if metric == "l2" else x64 * chosen
    return (terms.sum(-1), terms.abs().sum(-1)) if magnitude else terms.sum(-1)


def assert_matches_brute_force(x, codebook, metric, indices, score, max_near_ties=0.01):
    """Indices equal the fp64 brute force outside near-ties; scores are the chosen code's."""
    ref_index, _, gap = brute64(x, codebook, metric)
    assert indices.dtype == torch.int64 and score.dtype == torch.float32
    assert indices.shape == score.shape == ref_index.shape
    clear = gap >= NEAR_TIE
    assert (~clear).sum() <= max_near_ties * max(1, clear.numel()), "too many near-ties: a vacuous test"
    wrong = (indices != ref_index) & clear
    assert not wrong.any(), (
        f"{int(wrong.sum())} of {wrong.numel()} rows differ from the fp64 argmin outside near-ties; "
        f"first: ours {indices[wrong][:5].tolist()} vs fp64 {ref_index[wrong][:5].tolist()}, "
        f"relative gaps {gap[wrong][:5].tolist()}")
    ref_score, scale = score64(x, codebook, indices, metric, magnitude=True)  # l2: scale = score
    err = (score.to(F64) - ref_score).abs()
    assert (err <= SCORE_TOL * scale + 1e-30).all(), f"score error {(err / scale).max().item():.3g} relative"


@contextlib.contextmanager
def tiles(elements):
    """Temporarily sets nearest_code's TILE_ELEMENTS (None: leave the default)."""
    old = nc.TILE_ELEMENTS
    if elements is not None:
        nc.TILE_ELEMENTS = elements
    try:
        yield
    finally:
        nc.TILE_ELEMENTS = old


def make_inputs(n, k, d, h, metric, seed):
    shape_x = (n, d) if h is None else (h, n, d)
    shape_c = (k, d) if h is None else (h, k, d)
    x, codebook = randn(*shape_x, seed=seed), randn(*shape_c, seed=seed + 1)
    if metric == "dot" and seed % 2:  # cosine codebooks on normalized inputs (the usual use)
        x = torch.nn.functional.normalize(x, dim=-1)
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
    return x, codebook


class Recorder(TorchDispatchMode):
    """Records the largest storage (in elements) of any tensor an op returns, and their dtypes."""

    def __init__(self):
        super().__init__()
        self.largest, self.op, self.dtypes = 0, None, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
                elements = t.untyped_storage().nbytes() // t.element_size()
                if elements > self.largest:
                    self.largest, self.op = elements, func
        return out


# --------------------------------------------------------------------------------------------
# 1. against the fp64 brute force, with and without many tiles

# (n, k, d, h, TILE_ELEMENTS); None: the default tile. Comments: code tiles / row tiles.
CASES = [
    (1, 1, 1, None, None),
    (37, 5, 3, None, None),
    (500, 64, 16, None, None),
    (300, 1000, 32, None, None),
    (128, 300, 8, 3, None),
    (40, 50, 8, None, 7),      # code tiles 7 x 7 + 1 (k not divisible), one row per tile
    (40, 50, 8, 2, 7),
    (60, 37, 5, None, 100),    # one code tile of 37, row tiles of 2
    (33, 16, 4, None, 40),     # row tiles of 2, the last of 1
    (45, 250, 8, None, 100),   # code tiles 100, 100, 50
    (30, 64, 8, None, 63),     # k - 1: code tiles 63 + 1
    (30, 64, 8, 2, 65),        # k + 1: one code tile, one row per tile
    (50, 1, 4, None, 3),       # k = 1: row tiles of 3, the last of 2
    (20, 9, 6, None, 1),       # one score per tile
]


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("n, k, d, h, tile", CASES)
def test_matches_brute_force(n, k, d, h, tile, metric):
    for seed in (2 * n + k, 2 * n + k + 1):  # an even seed: raw vectors; odd: normalized for dot
        x, codebook = make_inputs(n, k, d, h, metric, seed)
        with tiles(tile):
            indices, score = nearest_code(x, codebook, metric=metric)
        assert_matches_brute_force(x, codebook, metric, indices, score)


def test_non_contiguous_inputs():
    x = randn(16, 300, seed=1).t()  # (300, 16), transposed
    codebook = randn(1, 16, seed=2).expand(70, 16) + randn(70, 1, seed=3)  # broadcast-built
    codebook = codebook[::2]  # a strided view
    for metric in ("l2", "dot"):
        for tile in (None, 13):
            with tiles(tile):
                indices, score = nearest_code(x, codebook, metric=metric)
            assert_matches_brute_force(x, codebook, metric, indices, score)


@st.composite
def random_problems(draw):
    n, k, d = draw(st.integers(0, 30)), draw(st.integers(1, 30)), draw(st.integers(1, 8))
    h = draw(st.sampled_from([None, 1, 3]))
    tile = draw(st.sampled_from([None, 1, 2, 3, 5, 7, k - 1 or 1, k, k + 1, 2 * k + 1, 100]))
    metric = draw(st.sampled_from(["l2", "dot"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    seed = draw(st.integers(0, 2**31 - 2))
    x, codebook = make_inputs(n, k, d, h, metric, seed)
    return x * scale, codebook * scale, metric, tile


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_problems())
def test_random_shapes_and_tiles(problem):
    x, codebook, metric, tile = problem
    with tiles(tile):
        indices, score = nearest_code(x, codebook, metric=metric)
    # few rows, and exact ties (d = 1 normalized codes are +-1): no vacuity check here
    assert_matches_brute_force(x, codebook, metric, indices, score, max_near_ties=1.0)


def test_off_center_data_matches_brute_force():
    """Distances are translation invariant; docs/design.md's exactness contract speaks of the distances.

    Data: unit-spread clusters around a common offset 100 per coordinate (||m||^2 = 1.6e5 vs
    distances ~32), as unnormalized features or raw 8-bit pixel patches are. Found by this test
    (fixed since by centring): minimizing ||c||^2 - 2 x.c in fp32 from the origin picked wrong
    codes in 46 of these 4096 rows, at relative gaps up to 6.5e-3.
    """
    x = randn(4096, 16, seed=1, offset=100.0)
    codebook = randn(512, 16, seed=2, offset=100.0)
    indices, score = nearest_code(x, codebook)
    assert_matches_brute_force(x, codebook, "l2", indices, score)


# --------------------------------------------------------------------------------------------
# 2. ties go to the lowest index


# code tiles: default (one tile); 1 (every code its own tile); 4 (3 and 10 in tiles 0 and 2);
# 8 (tiles 0 and 1, 20 and 41 in tiles 2 and 5); 11 (one tile holds both 3 and 10)
TIE_TILES = [None, 1, 4, 8, 11]


@pytest.mark.parametrize("tile", TIE_TILES)
@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_duplicate_codes_lowest_index(metric, tile):
    k, d = 50, 16
    codebook = randn(k, d, seed=4)
    if metric == "dot":
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
    codebook[10] = codebook[3]
    codebook[37] = codebook[3]
    codebook[41] = codebook[20]
    rows = 20 if tile == 1 else 60  # one code per tile: 50 tiles per row
    near = torch.cat([codebook[3] + 0.05 * randn(rows // 3, d, seed=5),
                      codebook[20] + 0.05 * randn(rows // 3, d, seed=6)])
    x = torch.cat([near, randn(rows // 3, d, seed=7)])
    ref_index, _, _ = brute64(x, codebook, metric)
    assert (ref_index == 3).sum() >= rows // 3 and (ref_index == 20).sum() >= rows // 3
    assert not torch.isin(ref_index, torch.tensor([10, 37, 41])).any()
    with tiles(tile):
        indices, score = nearest_code(x, codebook, metric=metric)
        heads, _ = nearest_code(torch.stack([x, x.flip(0)]), torch.stack([codebook, codebook]), metric=metric)
    assert indices.equal(ref_index)
    assert heads.equal(torch.stack([ref_index, ref_index.flip(0)]))
    assert torch.allclose(score.double(), score64(x, codebook, ref_index, metric), rtol=SCORE_TOL, atol=1e-6)


def lattice_problem(seed: int, rows: int, offset: float = 0.0):
    """Integer codes (shuffled, with duplicates) and integer / half-integer inputs: every
    distance and dot product (and ||c||^2 - 2 x.c) is exact in fp32, also with an integer
    offset of 100, and many rows have several exactly-best codes."""
    grid = torch.cartesian_prod(torch.arange(-2.0, 3.0), torch.arange(-2.0, 3.0), torch.arange(-1.0, 2.0))
    g = gen(seed)
    codebook = torch.cat([grid, grid[torch.randint(len(grid), (20,), generator=g)]])
    codebook = codebook[torch.randperm(len(codebook), generator=g)]
    x = torch.randint(-6, 7, (rows, 3), generator=g) / 2.0
    return x + offset, codebook + offset


@pytest.mark.parametrize("tile", [None, 1, 7, 94, 96, 300])
@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_exact_ties_lowest_index(metric, tile):
    # k = 95; tiles below k have one row per tile: fewer rows keep it fast
    x, codebook = lattice_problem(seed=3, rows=300 if tile is None or tile > 95 else 20 if tile == 1 else 48)
    ref_index, ref_score, gap = brute64(x, codebook, metric)
    assert (gap == 0).float().mean() > 0.25  # many rows do tie
    with tiles(tile):
        indices, score = nearest_code(x, codebook, metric=metric)
    assert indices.equal(ref_index), (indices != ref_index).nonzero()[:5].tolist()
    assert score.double().equal(ref_score)  # exact here


@pytest.mark.parametrize("tile", [None, 7])
def test_exact_ties_off_center_lattice(tile):
    """The lattice moved to around (100, 100, 100): still exact in fp32 (integers and halves
    below 2^23), so ties still go to the lowest index and scores are exact."""
    x, codebook = lattice_problem(seed=4, rows=300 if tile is None else 48, offset=100.0)
    ref_index, ref_score, gap = brute64(x, codebook, "l2")
    assert (gap == 0).float().mean() > 0.25
    with tiles(tile):
        indices, score = nearest_code(x, codebook)
    assert indices.equal(ref_index), (indices != ref_index).nonzero()[:5].tolist()
    assert score.double().equal(ref_score)


@pytest.mark.parametrize("metric", ["l2", "euclidean"])
def test_far_codes_do_not_cost_the_near_ones_accuracy(metric):
    """Data around the origin, a quarter of the codes with it and the rest 1000 away (dead codes
    a batch never reaches): the codebook's mean is far, the data's is not. Centring on the
    codebook would put every competing code ~500 from the origin, where the rounding of
    ||c||^2 - 2 x.c (~6e-2) exceeds many rows' gaps (measured: 261 wrong rows of 4000)."""
    x = randn(4000, 4, seed=60)
    codebook = torch.cat([randn(16, 4, seed=61), 1000 + randn(48, 4, seed=62)])
    indices, score = nearest_code(x, codebook, metric=metric)
    assert_matches_brute_force(x, codebook, "l2", indices, score)
    # and the same data moved far away together with its codes: centred on the data
    indices, score = nearest_code(x + 3000, codebook + 3000, metric=metric)
    assert_matches_brute_force(x + 3000, codebook + 3000, "l2", indices, score)


@pytest.mark.parametrize("spoiler", ["nan_row", "inf_value", "outlier_rows", "padding_marked_invalid"])
def test_centre_ignores_rows_that_are_not_data(spoiler):
    """Data and codes around 1000: a NaN row, an Inf value, 1% outlier rows or zero-filled padding
    (marked by `valid`) must not move the centre, or every other row loses its accuracy
    (measured with a mean over all rows: 1342, 1342 and 1329 of ~2000 rows wrong, 535 of 800)."""
    x, codebook = 1000 + randn(2000, 32, seed=63), 1000 + randn(512, 32, seed=64)
    spoilt, valid = x.clone(), None
    if spoiler == "nan_row":
        spoilt[7] = float("nan")
    elif spoiler == "inf_value":
        spoilt[7, 3] = float("inf")
    elif spoiler == "outlier_rows":
        spoilt[:20] = 1e5
    else:
        spoilt[800:] = 0.0
        valid = torch.arange(2000) < 800
    indices, score = nearest_code(spoilt, codebook, valid=valid)
    data = torch.ones(2000, dtype=torch.bool)
    data[7] = spoiler not in ("nan_row", "inf_value")
    if spoiler == "outlier_rows":
        data[:20] = False
    if valid is not None:
        data = valid
    assert_matches_brute_force(x[data], codebook, "l2", indices[data], score[data])


def test_centre_comes_from_valid_rows_off_the_sampling_stride():
    """8192 rows (the centre samples every 8th), the valid ones all off that stride: the centre
    still comes from them (measured when it did not: most valid rows wrong)."""
    x = torch.zeros(8192, 32)
    valid = (torch.arange(8192) % 8 == 3) & (torch.arange(8192) < 800)
    x[valid] = 1000 + randn(int(valid.sum()), 32, seed=67)
    codebook = 1000 + randn(512, 32, seed=68)
    indices, score = nearest_code(x, codebook, valid=valid)
    assert_matches_brute_force(x[valid], codebook, "l2", indices[valid], score[valid])


def test_nan_code_is_never_the_nearest():
    x, codebook = randn(50, 8, seed=65), randn(20, 8, seed=66)
    codebook[4] = float("nan")
    indices, _ = nearest_code(x, codebook)
    ref, _, _ = brute64(x, torch.cat([codebook[:4], codebook[5:]]))
    assert indices.equal(ref + (ref >= 4).long())


def test_valid_mask_shape_is_checked():
    with pytest.raises(ValueError, match=r"valid: expected a bool mask of shape \(5,\), got torch.bool \(4,\)"):
        nearest_code(randn(5, 3), randn(4, 3), valid=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("offset", [0.0, 3.0, 100.0])
def test_score_accurate_next_to_the_code(offset):
    """x a hair from its code (1e-4: the regime of a converged commitment loss): the chosen
    code's score ||x - c||^2 is still accurate to 1e-5 relative (computed from x and c, where
    x - c is exact for nearby fp32 values), whatever the data's offset."""
    codebook = randn(64, 16, seed=50, offset=offset)
    x = codebook[:32] + 1e-4 * randn(32, 16, seed=51)
    indices, score = nearest_code(x, codebook)
    assert indices.equal(torch.arange(32))
    assert_matches_brute_force(x, codebook, "l2", indices, score)


@pytest.mark.xfail(strict=False, reason=(
    "known limitation, BLAS-dependent (so not strict): identical codes do not always tie: "
    "x . c comes from one BLAS call (einsum -> bmm) per tile whose rounding depends on the code's "
    "column position in the call (remainder columns "
    "are summed differently), so a later copy of the best code can score an ulp lower and win. "
    "Here (AVX2, 1 thread), default tile, 64 rows of k identical codes: k = 5-7 pick index 4, "
    "k = 9-11 index 8; one query row against k = 50 codes with copies at 3 and 48/49: 48/49 in "
    "~30% of queries; TILE_ELEMENTS = 38 with copies at 3 and 37: 37"))
def test_identical_codes_lowest_index():
    """A codebook of k copies of one vector: every row gets index 0, for any k, any number of
    rows, any tile. Scans shapes so that any position-dependent rounding shows."""
    d = 16
    v = randn(d, seed=40)
    failures = []
    for metric in ("l2", "dot"):
        for n in (1, 3, 9):
            x = v + 0.1 * randn(n, d, seed=41 + n)
            for k in range(2, 41):
                for tile in (None, 38):
                    with tiles(tile):
                        indices, _ = nearest_code(x, v.expand(k, d).contiguous(), metric=metric)
                    if indices.any():
                        failures.append((metric, n, k, tile, indices.tolist()))
    assert not failures, f"{len(failures)} shapes pick a later copy, e.g. (metric, n, k, tile, indices): {failures[:4]}"


def test_dot_ties_constructed():
    # x = e_0: x . c is c's first coordinate, exact; codes 2, 5 and 9 share the largest
    codebook = randn(12, 6, seed=8)
    codebook[:, 0] = torch.arange(12.0) / 20
    codebook[[2, 5, 9], 0] = 1.0
    x = torch.zeros(4, 6)
    x[:, 0] = torch.tensor([1.0, 2.0, 0.5, 1e-3])
    for tile in (None, 1, 3, 4, 6, 11):
        with tiles(tile):
            indices, score = nearest_code(x, codebook, metric="dot")
        assert indices.tolist() == [2, 2, 2, 2], tile
        assert score.tolist() == x[:, 0].tolist()
    # distinct vectors with equal dot products: (1, 1, 0) . c = 2 for codes 1, 3 and 4
    x = torch.tensor([[1.0, 1.0, 0.0]])
    codebook = torch.tensor([[1.0, 0.0, 9.0], [2.0, 0.0, 5.0], [0.0, 1.0, 1.0], [0.0, 2.0, -3.0], [1.0, 1.0, 7.0]])
    for tile in (None, 1, 2, 3):
        with tiles(tile):
            assert nearest_code(x, codebook, metric="dot")[0].tolist() == [1]
    # l2, x = 0 and codes +-e_i: all at distance 1
    codebook = torch.cat([torch.eye(4), -torch.eye(4)])[[5, 2, 7, 0, 1, 3, 4, 6]]
    for tile in (None, 1, 3):
        with tiles(tile):
            indices, score = nearest_code(torch.zeros(3, 4), codebook)
        assert indices.tolist() == [0, 0, 0] and score.tolist() == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------
# 3. precision: an fp32 island


def naive_indices(x, codebook):
    """The textbook distance in the inputs' / autocast's precision: what the island prevents."""
    dots = x @ codebook.t()
    dist = codebook.square().sum(-1).to(dots.dtype) - 2 * dots
    return dist.argmin(-1), dist


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, metric):
    x, codebook = randn(1000, 32, seed=11).to(dtype), randn(512, 32, seed=12).to(dtype)
    x32, c32 = x.float(), codebook.float()
    with torch.autocast("cpu", enabled=False):
        expected, expected_score = nearest_code(x32, c32, metric=metric)
    assert_matches_brute_force(x32, c32, metric, expected, expected_score)
    if metric == "l2":  # the data discriminates: computing in `dtype` picks other codes
        assert (naive_indices(x, codebook)[0] != expected).sum() > 0
    for xi, ci in [(x, codebook), (x, c32), (x32, codebook)]:
        indices, score = nearest_code(xi, ci, metric=metric)
        assert indices.dtype == torch.int64 and score.dtype == torch.float32
        assert indices.equal(expected) and score.equal(expected_score)


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast(dtype, metric):
    x, codebook = randn(1000, 32, seed=13), randn(512, 32, seed=14)
    for inputs in [(x, codebook), (x.to(dtype), codebook), (x.to(dtype), codebook.to(dtype))]:
        fp32_inputs = inputs[0].dtype == torch.float32
        upcast = [t.float() for t in inputs]
        expected, expected_score = nearest_code(*upcast, metric=metric)
        if fp32_inputs:  # (the low-precision values: test_low_precision_inputs)
            assert_matches_brute_force(*upcast, metric, expected, expected_score)
        with torch.autocast("cpu", dtype=dtype):
            if metric == "l2" and fp32_inputs:
                # autocast is really on: the same formula outside an island runs in `dtype`
                naive, dist = naive_indices(*inputs)
                assert dist.dtype == dtype and (naive != expected).sum() > 0
            for tile in (None, 5000) if fp32_inputs else (None,):
                with tiles(tile):
                    indices, score = nearest_code(*inputs, metric=metric)
                assert indices.dtype == torch.int64 and score.dtype == torch.float32
                assert indices.equal(expected) and score.equal(expected_score)


@pytest.mark.parametrize("autocast", [False, True])
def test_fp16_large_inputs_no_overflow(autocast):
    """||x||^2 ~ 300^2 * 16 = 1.4e6 >> 65504: an fp16 distance (or dot product) would be inf."""
    x = randn(1000, 16, seed=15, scale=300.0).half()
    codebook = randn(256, 16, seed=16, scale=300.0).half()
    assert torch.isinf(naive_indices(x, codebook)[1]).any()  # fp16 arithmetic overflows
    context = torch.autocast("cpu", dtype=torch.float16) if autocast else contextlib.nullcontext()
    for metric in ("l2", "dot"):
        with context:
            indices, score = nearest_code(x, codebook, metric=metric)
        assert torch.isfinite(score).all()
        assert score.abs().max() > 65504  # the scores themselves are past fp16's range
        assert_matches_brute_force(x.float(), codebook.float(), metric, indices, score)


def test_recorder_sees_float64():
    with Recorder() as rec:
        torch.ones(3).double().sum()
    assert F64 in rec.dtypes and torch.float32 in rec.dtypes


@pytest.mark.parametrize("input_dtype, metric, temperature", [
    (torch.float32, "l2", 0.0), (torch.float32, "dot", 0.7), (torch.float32, "l2", 0.7),
    (torch.bfloat16, "dot", 0.0)])
def test_no_float64_created(input_dtype, metric, temperature):
    codebook = randn(2, 40, 8, seed=18)
    for tile, n in ((None, 300), (7, 30)):
        x = randn(n, 8, seed=17).to(input_dtype)
        with tiles(tile), Recorder() as rec:
            nearest_code(x, codebook[0], metric=metric, temperature=temperature, generator=gen(0))
            nearest_code(torch.stack([x, x]), codebook, metric=metric, temperature=temperature, generator=gen(0))
        assert F64 not in rec.dtypes, rec.dtypes
        assert torch.float32 in rec.dtypes  # the recorder sees the op's work
        assert rec.dtypes <= {torch.float32, torch.int64, torch.bool, input_dtype}, rec.dtypes


# `_ieee_fp32_matmul(device)` is what keeps TF32 off for the fp32 matmul on CUDA. It only
# toggles torch's global backend flags, so it runs on a CPU-only build when handed a CUDA
# device. Those flags are process-global (and mixing torch's legacy and new TF32 APIs makes
# later reads raise for the rest of the process), so each scenario runs in a forked child of
# one fresh interpreter.
_TF32_SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    import torch
    from vq_layers.kernels.nearest_code import _ieee_fp32_matmul

    m = torch.backends.cuda.matmul

    def setup_high(): torch.set_float32_matmul_precision("high")
    def setup_medium(): torch.set_float32_matmul_precision("medium")
    def setup_legacy(): m.allow_tf32 = True
    def setup_new_api(): m.fp32_precision = "tf32"

    def observe():
        out = {}
        for name, read in [("fp32_precision", lambda: m.fp32_precision),
                           ("float32_matmul_precision", torch.get_float32_matmul_precision)]:
            try:
                out[name] = read()
            except Exception as e:
                out[name] = "raised " + type(e).__name__
        return out

    def scenario(setup):
        setup()
        result = {"before": observe()}
        try:
            with _ieee_fp32_matmul(torch.device("cuda")):
                result["inside"] = observe()
        except Exception as e:
            result["error"] = type(e).__name__ + ": " + str(e)[:200]
        result["after"] = observe()
        return result

    results = {}
    for name, setup in [("default", lambda: None), ("high", setup_high), ("medium", setup_medium),
                        ("legacy", setup_legacy), ("new_api", setup_new_api)]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.write(write, json.dumps(scenario(setup)).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            results[name] = json.loads(f.read())
        os.waitpid(pid, 0)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module", autouse=True)
def _tf32_probe():
    """Starts the scenarios' interpreter when the module starts (its ~3 s torch import then
    overlaps the other tests: they run on one thread); stops it at the end if still running."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        yield None
        return
    process = subprocess.Popen([sys.executable, "-c", _TF32_SCRIPT], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:  # not read by tf32_scenarios (deselected) or not done
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def tf32_scenarios(_tf32_probe):
    if _tf32_probe is None:
        pytest.skip("this torch has no torch.backends.cuda.matmul.fp32_precision")
    stdout, stderr = _tf32_probe.communicate(timeout=120)
    assert _tf32_probe.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])


# how a script set TF32 before calling the op: not at all; torch.set_float32_matmul_precision
# "high" / "medium"; the legacy allow_tf32 flag; the new fp32_precision setting (torch >= 2.9)
@pytest.mark.parametrize("scenario", ["default", "high", "medium", "legacy", "new_api"])
def test_cuda_matmul_is_ieee_fp32_and_restored(tf32_scenarios, scenario):
    """IEEE fp32 inside the op, and the script's setting back after, whichever API it used.

    Found by this test (fixed since): the helper read and wrote the legacy `allow_tf32`, which
    raises RuntimeError ("mix of the legacy and new APIs") after a script used the new
    `fp32_precision = "tf32"` (so every CUDA call raised), and after
    set_float32_matmul_precision("medium") left the state mixed so that a later
    torch.get_float32_matmul_precision() raised.
    """
    result = tf32_scenarios[scenario]
    assert "error" not in result, result["error"]
    assert result["inside"]["fp32_precision"] == "ieee"
    assert result["after"] == result["before"]
    if scenario != "default":
        assert result["before"]["fp32_precision"] == "tf32"  # the scenario did allow TF32


# --------------------------------------------------------------------------------------------
# 4. memory: no N x K tensor


def test_recorder_sees_a_dense_tensor():
    n, k = 256, 512
    with Recorder() as rec:
        torch.cdist(torch.randn(n, 4), torch.randn(k, 4)).argmin(-1)
    assert rec.largest >= n * k


@pytest.mark.parametrize("metric, temperature", [("l2", 0.0), ("dot", 1.0)])
def test_no_n_by_k_tensor(metric, temperature):
    n, k, d, tile = 4096, 8192, 16, 2**16
    x, codebook = randn(n, d, seed=19), randn(k, d, seed=20)
    with tiles(tile), Recorder() as rec:
        indices, score = nearest_code(x, codebook, metric=metric, temperature=temperature, generator=gen(1))
    assert rec.largest < n * k // 8, (rec.op, rec.largest)
    # one tile, and otherwise tensors the size of the inputs and outputs
    assert rec.largest <= 2 * max(tile, n * d, k * d), (rec.op, rec.largest)
    assert indices.shape == (n,) and ((indices >= 0) & (indices < k)).all()
    if temperature == 0:  # still right: 512 rows against the brute force (all of them is slow)
        rows = torch.randperm(n, generator=gen(2))[:512]
        assert_matches_brute_force(x[rows], codebook, metric, indices[rows], score[rows])


def test_heads_respect_the_tile_budget():
    """TILE_ELEMENTS bounds the scores of all heads together. Found by this test (fixed since):
    the budget was per head, so 32 heads made one (h, rows, codes) tensor of 2^21 scores here,
    a quarter of the whole distance tensor."""
    h, n, k, d, tile = 32, 512, 512, 4, 2**16
    x, codebook = randn(h, n, d, seed=21), randn(h, k, d, seed=22)
    with tiles(tile), Recorder() as rec:
        indices, _ = nearest_code(x, codebook)
    assert indices.shape == (h, n)
    assert rec.largest <= 2 * max(tile, h * n * d, h * k * d), (rec.op, rec.largest)
    assert rec.largest < h * n * k // 8, (rec.op, rec.largest)


# --------------------------------------------------------------------------------------------
# 5. sampling


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("tile", [None, 7])
def test_tiny_temperature_is_argmin(tile, metric):
    t = 1e-6
    x, codebook = randn(200, 8, seed=23), randn(30, 8, seed=24)
    ref_index, _, _ = brute64(x, codebook, metric)
    cost = brute64_costs(x, codebook, metric)
    two = cost.topk(2, dim=-1, largest=False).values
    # exclude rows where the Gumbel noise (|g| < ~17) or fp32 rounding (~1e-5) of cost / t could flip
    clear = (two[:, 1] - two[:, 0]) > 40 * t + 1e-4
    assert clear.float().mean() > 0.95
    with tiles(tile):
        indices, score = nearest_code(x, codebook, metric=metric, temperature=t, generator=gen(3))
    assert indices[clear].equal(ref_index[clear])
    assert torch.isfinite(score).all()


def brute64_costs(x, codebook, metric):
    """(n, k) fp64 cost, minimized: ||x - c||^2 or -x . c."""
    x64, c64 = x.to(F64), codebook.to(F64)
    if metric in ("l2", "euclidean"):
        squared = (x64[:, None] - c64[None]).square().sum(-1)
        return squared.sqrt() if metric == "euclidean" else squared
    return -(x64 @ c64.t())


def sampled_distribution_check(x_row, codebook, metric, t, samples, tile, seed):
    """Chi-square and total variation of the sampled codes of one row repeated `samples` times
    against softmax(-cost / t) in fp64."""
    p = torch.softmax(-brute64_costs(x_row[None], codebook, metric)[0] / t, dim=0)
    assert p.min() * samples >= 10  # every cell well populated: chi-square applies
    x = x_row.expand(samples, -1)
    with tiles(tile):
        indices, _ = nearest_code(x, codebook, metric=metric, temperature=t, generator=gen(seed))
    counts = torch.bincount(indices, minlength=len(p)).to(F64)
    expected = p * samples
    chi2 = ((counts - expected).square() / expected).sum().item()
    tv = 0.5 * (counts / samples - p).abs().sum().item()
    return chi2, tv, p


# tile 3: code tiles 3, 3, 2 and one row per tile (slow: fewer samples, one metric)
@pytest.mark.parametrize("metric, tile, samples", [("l2", None, 50_000), ("dot", None, 50_000), ("l2", 3, 1_000),
                                                  ("euclidean", None, 50_000), ("euclidean", 3, 1_000)])
def test_sampling_distribution(metric, tile, samples):
    k, d = 8, 4
    codebook = randn(k, d, seed=25)
    x_row = randn(d, seed=26)
    cost = brute64_costs(x_row[None], codebook, metric)[0]
    t = (cost.max() - cost.min()).item() / 3  # a spread distribution: every p >= e^-3 / k-ish
    chi2, tv, p = sampled_distribution_check(x_row, codebook, metric, t, samples, tile, seed=4)
    # chi-square with k - 1 = 7 degrees of freedom: P(chi2 > 35) ~ 1e-5
    assert chi2 < 35, (chi2, tv, p.tolist())
    assert tv < 3 * math.sqrt(k / samples), (chi2, tv)
    # and it is not the argmin or the uniform distribution (the check can tell them apart)
    assert p.max() < 0.9 and (p - 1 / k).abs().max() > 0.05


def test_sampling_temperature_scales():
    """Two temperatures give two different distributions, each matched (a cost * t or an
    ignored t would match neither)."""
    codebook = randn(6, 3, seed=27)
    x_row = randn(3, seed=28)
    cost = brute64_costs(x_row[None], codebook, "l2")[0]
    spread = (cost.max() - cost.min()).item()
    dists = []
    for t in (spread / 2, spread / 5):
        chi2, tv, p = sampled_distribution_check(x_row, codebook, "l2", t, 40_000, None, seed=5)
        assert chi2 < 35, (t, chi2, tv, p.tolist())
        dists.append(p)
    assert (dists[0] - dists[1]).abs().max() > 0.1


@pytest.mark.parametrize("tile", [None, 7])
@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_sampling_reproducible(metric, tile):
    x, codebook = randn(3, 500 if tile is None else 60, 8, seed=29), randn(3, 20, 8, seed=30)
    with tiles(tile):
        a, score_a = nearest_code(x, codebook, metric=metric, temperature=1.0, generator=gen(7))
        b, score_b = nearest_code(x, codebook, metric=metric, temperature=1.0, generator=gen(7))
        c, _ = nearest_code(x, codebook, metric=metric, temperature=1.0, generator=gen(8))
        argmin, _ = nearest_code(x, codebook, metric=metric)
    assert a.equal(b) and score_a.equal(score_b)
    assert (a != c).float().mean() > 0.2  # different seeds, different samples
    assert (a != argmin).float().mean() > 0.2  # it samples
    assert torch.allclose(score_a.double(), score64(x, codebook, a, metric), rtol=SCORE_TOL, atol=1e-5)
    # the default generator: torch.manual_seed reproduces
    with tiles(tile):
        torch.manual_seed(3)
        d1, _ = nearest_code(x, codebook, metric=metric, temperature=1.0)
        torch.manual_seed(3)
        d2, _ = nearest_code(x, codebook, metric=metric, temperature=1.0)
    assert d1.equal(d2)


# --------------------------------------------------------------------------------------------
# 6. heads


@pytest.mark.parametrize("tile", [None, 7, 61])
@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_heads_equal_separate_calls(metric, tile):
    h, n, k, d = 4, 120 if tile is None else 40, 60, 8
    x, codebook = randn(h, n, d, seed=31), randn(h, k, d, seed=32)
    codebook[1] = codebook[0].flip(0)  # head 1 has head 0's codes in reverse order
    with tiles(tile):
        indices, score = nearest_code(x, codebook, metric=metric)
        separate = [nearest_code(x[i], codebook[i], metric=metric) for i in range(h)]
    assert indices.shape == score.shape == (h, n)
    _, _, gap = brute64(x, codebook, metric)
    clear = gap >= NEAR_TIE
    assert clear.all()
    assert indices.equal(torch.stack([s[0] for s in separate]))
    # (torch.testing.assert_close would import torch.distributed.tensor: 1.5 s)
    assert torch.allclose(score, torch.stack([s[1] for s in separate]), rtol=1e-6, atol=1e-6)
    assert_matches_brute_force(x, codebook, metric, indices, score)


# --------------------------------------------------------------------------------------------
# 7. errors


# (x shape, codebook shape, keyword arguments, the argument named, what came)
@pytest.mark.parametrize("x_shape, c_shape, kwargs, name, came", [
    ((5, 4), (3, 4), {"metric": "cosine"}, "metric", "'cosine'"),
    ((5, 4), (3, 4), {"metric": "L2"}, "metric", "'L2'"),
    ((5, 4), (3, 5), {}, "codebook", "(3, 5)"),               # feature dims
    ((2, 5, 4), (3, 7, 4), {}, "codebook", "(3, 7, 4)"),      # heads
    ((2, 5, 4), (2, 7, 5), {}, "codebook", "(2, 7, 5)"),
    ((5, 4), (2, 3, 4), {}, "codebook", "(2, 3, 4)"),         # (n, d) against (h, k, d)
    ((2, 5, 4), (3, 4), {}, "codebook", "(3, 4)"),
    ((4,), (3, 4), {}, "x", "(4,)"),                          # not (n, d)
    ((1, 2, 5, 4), (1, 2, 3, 4), {}, "x", "(1, 2, 5, 4)"),
    ((5, 4), (0, 4), {}, "codebook", "0"),                    # empty codebook
    ((2, 5, 4), (2, 0, 4), {}, "codebook", "0"),
    ((5, 4), (3, 4), {"temperature": -1.0}, "temperature", "-1.0"),
    ((5, 4), (3, 4), {"temperature": -1e-30}, "temperature", "-1e-30"),
    ((5, 0), (3, 0), {}, "codebook", "got 0"),               # no features
    ((5, 4), (3, 4), {"precision": "fp16"}, "precision", "'fp16'"),
])
def test_errors_name_the_argument(x_shape, c_shape, kwargs, name, came):
    with pytest.raises(ValueError, match=rf"\b{name}\b") as error:
        nearest_code(torch.zeros(x_shape), torch.zeros(c_shape), **kwargs)
    assert came in str(error.value)


def test_nan_temperature_raises():
    """Found by this test (fixed since): nan passed `temperature < 0` and then meant argmin."""
    with pytest.raises(ValueError, match="temperature"):
        nearest_code(torch.zeros(5, 4), torch.zeros(3, 4), temperature=float("nan"))


# --------------------------------------------------------------------------------------------
# 8. empty batches


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("tile", [None, 1])
def test_no_rows(tile, metric, temperature):
    for dtype in (torch.float32, torch.bfloat16):
        with tiles(tile):
            indices, score = nearest_code(torch.zeros(0, 4, dtype=dtype), torch.randn(7, 4), metric=metric,
                                          temperature=temperature, generator=gen(0))
            assert indices.shape == score.shape == (0,)
            assert indices.dtype == torch.int64 and score.dtype == torch.float32
            indices, score = nearest_code(torch.zeros(3, 0, 4, dtype=dtype), torch.randn(3, 7, 4), metric=metric,
                                          temperature=temperature, generator=gen(0))
            assert indices.shape == score.shape == (3, 0)
            assert indices.dtype == torch.int64 and score.dtype == torch.float32


@pytest.mark.parametrize("tile", [None, 7])
def test_euclidean_is_l2_without_sampling(tile):
    """"euclidean" only changes what is sampled from: its nearest code and score are l2's."""
    x, codebook = randn(2, 300, 8, seed=40, offset=3.0), randn(2, 50, 8, seed=41, offset=3.0)
    with tiles(tile):
        a, score_a = nearest_code(x, codebook, metric="l2")
        b, score_b = nearest_code(x, codebook, metric="euclidean")
    assert a.equal(b) and score_a.equal(score_b)


def test_euclidean_and_l2_sample_different_distributions():
    """At one temperature, softmax(-d / t) and softmax(-d^2 / t) differ, and each metric matches its own."""
    codebook = randn(6, 3, seed=42)
    x_row = randn(3, seed=43)
    t = 1.0
    chi2, _, p_euclid = sampled_distribution_check(x_row, codebook, "euclidean", t, 40_000, None, seed=6)
    assert chi2 < 35, chi2
    p_l2 = torch.softmax(-brute64_costs(x_row[None], codebook, "l2")[0] / t, dim=0)
    assert (p_euclid - p_l2).abs().max() > 0.05
