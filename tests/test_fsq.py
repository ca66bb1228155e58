"""FSQ against an fp64 re-implementation of the paper's formulas, through the dtype matrix."""

import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dtype_matrix import DTYPES, dtype_matrix, run_cell
from vq_layers import FSQ

LEVELS = [8, 5, 5, 5]


def reference(z, levels, symmetric=False, hard_clamp=False):
    """fp64 FSQ: z (..., d) -> codes (..., d), indices (...), tie margin (...) per token.

    Default grid as in vector-quantize-pytorch (and the paper's Appendix A.1 up to its eps sign):
    bound = tanh(z + atanh(offset / half_l)) * half_l - offset, round, divide by L // 2.
    Symmetric grid (arXiv 2411.19842): floor((L - 1)(tanh z + 1) / 2 + 1/2) on [-1, 1].
    The margin is how far the rounded value is from a rounding boundary (small = near-tie).
    """
    z = z.double()
    L = torch.tensor(levels, dtype=torch.float64)
    squash = (lambda t: t.clamp(-1, 1)) if hard_clamp else torch.tanh
    if symmetric:
        position = (L - 1) * (squash(z) + 1) / 2 + 0.5
        level = position.floor()
        codes = level * 2 / (L - 1) - 1
        margin = (position - position.round()).abs()
    else:
        half_l = (L - 1) * (1 + 1e-3) / 2
        offset = (L % 2 == 0).double() * 0.5
        shift = offset / half_l if hard_clamp else torch.atanh(offset / half_l)
        bounded = squash(z + shift) * half_l - offset
        half_width = torch.div(L, 2, rounding_mode="floor")
        level = bounded.round() + half_width
        codes = bounded.round() / half_width
        margin = (bounded - bounded.floor() - 0.5).abs()
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.float64)
    indices = (level * basis).sum(-1).long()
    return codes, indices, margin.amin(-1)


def grid(levels, symmetric):
    """Every code of the implicit codebook, first dimension fastest (brute-force enumeration)."""
    axes = []
    for L in levels:
        values = torch.arange(L, dtype=torch.float64)
        axes.append(values * 2 / (L - 1) - 1 if symmetric else (values - L // 2) / (L // 2))
    return torch.tensor([list(reversed(c)) for c in itertools.product(*reversed(axes))])


# --- the dtype matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_with_projections(cell):
    run_cell(cell, lambda: FSQ(LEVELS, dim=16), lambda dtype: torch.randn(2, 16, 4, 4, dtype=dtype))


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_indices_equal_fp32_reference(cell):
    """Without projections the codes may depend on nothing but the input values."""
    x = torch.randn(3, 50, 4) * 3
    result = run_cell(cell, lambda: FSQ(LEVELS, preserve_symmetry=cell.train),
                      lambda dtype: x.to(dtype))
    _, expected, margin = reference(result.x.detach().float().cpu(), LEVELS, symmetric=cell.train)
    clear = margin > 1e-5
    (indices,) = result.parts.indices
    assert torch.equal(indices.cpu()[clear], expected[clear])


# --- codes <-> indices --------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3], [7, 5, 5, 5, 5], [16], [4, 4, 4, 4]])
@pytest.mark.parametrize("symmetric", [False, True])
def test_implicit_codebook_is_the_grid_and_round_trips(levels, symmetric):
    if 2 in levels and not symmetric:
        with pytest.raises(ValueError, match="preserve_symmetry"):
            FSQ(levels, preserve_symmetry=symmetric)
        return
    fsq = FSQ(levels, preserve_symmetry=symmetric)
    codebook = fsq.implicit_codebook
    assert codebook.dtype == torch.float32 and codebook.shape == (math.prod(levels), len(levels))
    torch.testing.assert_close(codebook.double(), grid(levels, symmetric), rtol=0, atol=1e-6)
    all_indices = torch.arange(fsq.codebook_size)
    assert torch.equal(fsq.codes_to_indices(codebook), all_indices)
    assert torch.equal(fsq.indices_to_codes(all_indices), codebook)


@settings(max_examples=60, deadline=None)
@given(
    levels=st.lists(st.integers(2, 16), min_size=1, max_size=8),
    symmetric=st.booleans(),
    data=st.data(),
)
def test_round_trip_property(levels, symmetric, data):
    assume(symmetric or 2 not in levels)  # a level of 2 needs the symmetric grid
    fsq = FSQ(levels, preserve_symmetry=symmetric)
    picks = data.draw(st.lists(st.integers(0, fsq.codebook_size - 1), min_size=1, max_size=20))
    indices = torch.tensor(picks)
    codes = fsq.indices_to_codes(indices)
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    assert torch.equal(fsq.indices_to_codes(fsq.codes_to_indices(codes)), codes)
    # level indices are the mixed-radix digits, first dimension fastest
    digits = fsq.indices_to_level_indices(indices)
    for i, L in enumerate(levels):
        assert torch.equal(digits[:, i], indices // math.prod(levels[:i]) % L)


@settings(max_examples=60, deadline=None)
@given(
    levels=st.lists(st.integers(2, 16), min_size=1, max_size=8),
    symmetric=st.booleans(),
    noise=st.sampled_from([0.0, 0.5, 1.0]),
    hard_clamp=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_indices_always_in_range_and_consistent(levels, symmetric, noise, hard_clamp, scale, seed):
    assume(symmetric or 2 not in levels)
    torch.manual_seed(seed)
    fsq = FSQ(levels, preserve_symmetry=symmetric, noise_dropout=noise, bound_hard_clamp=hard_clamp).train()
    z = torch.randn(2, 33, len(levels)) * scale
    z[0, 0] = float("inf")
    z[0, 1] = -float("inf")
    out, indices = fsq(z)
    assert indices.dtype == torch.long
    finite = torch.isfinite(z).all(-1)  # infinite tokens have no code (docs/precision.md)
    assert (indices[~finite] == -1).all() and out[~finite].isnan().all()
    assert indices[finite].min() >= 0 and indices[finite].max() < fsq.codebook_size
    _, expected, margin = reference(z, levels, symmetric, hard_clamp)
    clear = (margin > 1e-5) & finite
    assert torch.equal(indices[clear], expected[clear])
    if noise == 0:
        assert torch.equal(fsq.codes_to_indices(out), indices)


def test_forward_matches_reference_codes():
    z = torch.randn(4, 64, 4) * 2
    for symmetric in (False, True):
        out, indices = FSQ(LEVELS, preserve_symmetry=symmetric)(z)
        codes, expected, margin = reference(z, LEVELS, symmetric)
        clear = margin > 1e-5
        assert torch.equal(indices[clear], expected[clear])
        torch.testing.assert_close(out[clear].double(), codes[clear], rtol=0, atol=1e-6)


def test_indices_exact_beyond_float32_integers():
    """2^32 codes: float32 index arithmetic would be off by hundreds here."""
    fsq = FSQ([4] * 16)
    indices = torch.tensor([0, 1, 2**24 + 1, 2**31 + 12345, 2**32 - 1])
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(indices)), indices)
    z = fsq.indices_to_codes(indices) * 0.9  # inside the cells of those codes
    _, expected, _ = reference(z, [4] * 16)
    assert torch.equal(fsq(z.unsqueeze(0))[1][0], expected)


# --- memory: the implicit codebook is never materialized ----------------------------------------


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_huge_codebook_runs_in_small_memory():
    with LargestTensor() as probe:
        fsq = FSQ(levels=[4] * 16, dim=64)
        out, indices = fsq(torch.randn(2, 256, 64))
        out.sum().backward()
    assert fsq.codebook_size == 2**32
    assert probe.largest < 2**20, f"a {probe.largest} byte tensor was made"
    assert sum(b.numel() for b in fsq.buffers()) < 100
    with pytest.raises(ValueError, match="implicit_codebook"):
        fsq.implicit_codebook


# --- layouts, shapes, options -------------------------------------------------------------------


def test_layouts():
    fsq = FSQ(LEVELS, dim=12)
    image = torch.randn(2, 12, 5, 6)
    out, indices = fsq(image)
    assert out.shape == image.shape and indices.shape == (2, 5, 6)
    tokens = image.flatten(2).transpose(1, 2)  # the same tokens as (b, h*w, d)
    torch.testing.assert_close(fsq(tokens)[0].transpose(1, 2).reshape(image.shape), out)
    assert torch.equal(fsq(tokens)[1].reshape(2, 5, 6), indices)
    torch.testing.assert_close(fsq.indices_to_codes(indices), out)

    video = torch.randn(1, 12, 2, 3, 4)
    out, indices = fsq(video)
    assert out.shape == video.shape and indices.shape == (1, 2, 3, 4)

    seq_first = FSQ(LEVELS, dim=12, channel_first=True)
    seq_first.load_state_dict(fsq.state_dict())
    seq = torch.randn(2, 12, 7)
    out, indices = seq_first(seq)
    assert out.shape == seq.shape and indices.shape == (2, 7)
    assert torch.equal(indices, fsq(seq.transpose(1, 2))[1])
    torch.testing.assert_close(seq_first.indices_to_codes(indices), out)

    single = fsq(torch.randn(3, 12))  # (b, d) tokens
    assert single[0].shape == (3, 12) and single[1].shape == (3,)


def test_num_codebooks():
    fsq = FSQ(LEVELS, num_codebooks=3)
    z = torch.randn(2, 10, 12)
    out, indices = fsq(z)
    assert indices.shape == (2, 10, 3)
    for c in range(3):
        _, expected, margin = reference(z[..., 4 * c: 4 * c + 4], LEVELS)
        clear = margin > 1e-5
        assert torch.equal(indices[..., c][clear], expected[clear])
    torch.testing.assert_close(fsq.indices_to_codes(indices), out)


def test_noise_dropout_perturbs_codes_not_indices():
    torch.manual_seed(0)
    fsq = FSQ(LEVELS, preserve_symmetry=True, noise_dropout=1.0)
    z = torch.randn(2, 100, 4)
    train_out, train_indices = fsq.train()(z)
    eval_out, eval_indices = fsq.eval()(z)
    assert torch.equal(train_indices, eval_indices)
    assert not torch.equal(train_out, eval_out)
    assert (train_out - eval_out).abs().max() <= 0.5 + 1e-6 and train_out.abs().max() <= 1


def test_return_indices_false():
    out, indices = FSQ(LEVELS, return_indices=False)(torch.randn(1, 3, 4))
    assert indices is None and out.shape == (1, 3, 4)


def test_orthogonal_rotation_keeps_round_trip():
    fsq = FSQ([5, 5, 5, 5], orthogonal_rotation=True)
    out, indices = fsq(torch.randn(2, 20, 4))
    torch.testing.assert_close(fsq.indices_to_codes(indices), out)
    assert fsq.half().orthogonal_rot.dtype == torch.float32


def test_levels_for():
    for size, levels in [(2**8, [8, 6, 5]), (2**10, [8, 5, 5, 5]), (2**12, [7, 5, 5, 5, 5]),
                         (2**14, [8, 8, 8, 6, 5]), (2**16, [8, 8, 8, 5, 5, 5])]:
        assert FSQ.levels_for(size) == levels
        assert FSQ(FSQ.levels_for(size)).codebook_size == pytest.approx(size, rel=0.1)
    with pytest.raises(ValueError, match="codebook_size"):
        FSQ.levels_for(1000)


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_straight_through_gradient_is_the_bound_derivative(symmetric):
    z = (torch.randn(3, 20, 4) * 2).requires_grad_()
    weights = torch.randn(3, 20, 4)
    out, _ = FSQ(LEVELS, preserve_symmetry=symmetric)(z)
    (out * weights).sum().backward()
    # d(code)/dz of the continuous bound, in fp64
    zd = z.detach().double().requires_grad_()
    L = torch.tensor(LEVELS, dtype=torch.float64)
    if symmetric:
        surrogate = (L - 1) * (torch.tanh(zd) + 1) / 2 * (2 / (L - 1))
    else:
        half_l = (L - 1) * (1 + 1e-3) / 2
        shift = torch.atanh((L % 2 == 0).double() * 0.5 / half_l)
        surrogate = torch.tanh(zd + shift) * half_l / torch.div(L, 2, rounding_mode="floor")
    (surrogate * weights.double()).sum().backward()
    torch.testing.assert_close(z.grad.double(), zd.grad, rtol=1e-5, atol=1e-7)
    assert z.grad.abs().sum() > 0


def test_gradient_reaches_input_through_projections_under_autocast():
    fsq = FSQ(LEVELS, dim=32)
    x = torch.randn(2, 32, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fsq(x)
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0
    assert fsq.project_in.weight.grad.abs().sum() > 0


# --- precision details --------------------------------------------------------------------------


def test_bf16_input_on_fp32_module_with_projections():
    fsq = FSQ(LEVELS, dim=16)  # fp32 weights
    x = torch.randn(2, 9, 16).bfloat16()
    out, indices = fsq(x)
    assert out.dtype == torch.bfloat16
    expected_out, expected_indices = fsq(x.float())  # same values: the projection saw fp32
    assert torch.equal(indices, expected_indices)
    assert torch.equal(out, expected_out.bfloat16())


def test_codes_do_not_overflow_in_fp16():
    """fp16 input near its max: the bound runs in fp32, the output is finite."""
    x = torch.full((1, 4, 4), 60000.0, dtype=torch.float16)
    x[0, 1] = -60000.0
    with torch.autocast("cpu", dtype=torch.float16):
        out, indices = FSQ(LEVELS)(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.equal(indices[0, :2], reference(x[0, :2].float(), LEVELS)[1])


def test_module_dtype_and_default_dtype_do_not_touch_index_buffers():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fsq = FSQ(LEVELS)
    finally:
        torch.set_default_dtype(previous)
    fsq = fsq.half()
    assert fsq._levels.dtype == torch.long and fsq._basis.dtype == torch.long
    x = torch.randn(2, 5, 4)
    assert torch.equal(fsq(x)[1], FSQ(LEVELS)(x)[1])


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [[1, 5], [2.5, 4], [], "85", [5, -3], [True, 5], None, [2, 5]])
def test_bad_levels(levels):
    """[2, 5]: on the default grid a level of 2 puts its boundary at z = -3.8 (the peer asserts)."""
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels)


def test_level_two_on_the_symmetric_grid_uses_both_codes():
    out, indices = FSQ([2, 2, 2], preserve_symmetry=True)(torch.randn(1, 4000, 3))
    assert torch.bincount(indices.flatten(), minlength=8).min() > 300


def test_numpy_levels():
    np = pytest.importorskip("numpy")
    assert FSQ(np.array([8, 5])).levels == [8, 5]


def test_bad_input_and_indices():
    fsq = FSQ(LEVELS, dim=16)
    with pytest.raises(ValueError, match="expected input feature dim 16.*got 12"):
        fsq(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 1000\)"):
        fsq.indices_to_codes(torch.tensor([[0, 1000]]))
    with pytest.raises(ValueError, match="indices"):
        fsq.indices_to_codes(torch.tensor([[-2, 3]]))  # -1 is no code (zeros)
    with pytest.raises(TypeError, match="indices"):
        fsq.indices_to_codes(torch.tensor([[0.0, 3.0]]))
    with pytest.raises(ValueError, match="codes"):
        fsq.codes_to_indices(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="noise_dropout"):
        FSQ(LEVELS, noise_dropout=1.5)
    with pytest.raises(ValueError, match="keep_num_codebooks_dim"):
        FSQ(LEVELS, num_codebooks=2, keep_num_codebooks_dim=False)


# --- state, compile, usage, drop-in ---------------------------------------------------------------


def test_state_dict_round_trip():
    fsq = FSQ(LEVELS, dim=16, orthogonal_rotation=True)
    clone = FSQ(LEVELS, dim=16, orthogonal_rotation=True)
    clone.load_state_dict(fsq.state_dict())
    x = torch.randn(2, 7, 16)
    for a, b in zip(fsq(x), clone(x)):
        assert torch.equal(a, b)
    half = FSQ(LEVELS, dim=16, orthogonal_rotation=True).half()
    half.load_state_dict(fsq.state_dict())
    assert half.orthogonal_rot.dtype == torch.float32 and half.project_in.weight.dtype == torch.float16
    assert torch.equal(half.orthogonal_rot, fsq.orthogonal_rot)


def test_compile_fullgraph_eval_forward():
    fsq = FSQ(LEVELS, dim=16).eval()
    compiled = torch.compile(fsq, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 4, 4)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            eager_out, eager_indices = fsq(x)
            out, indices = compiled(x)
        assert torch.equal(indices, eager_indices)
        torch.testing.assert_close(out, eager_out)


def test_compile_fullgraph_training_forward_and_backward():
    torch._dynamo.reset()
    fsq = FSQ(LEVELS, dim=16).train()
    compiled = torch.compile(fsq, fullgraph=True, backend="aot_eager")
    for autocast in (False, True):
        grads = []
        for layer in (fsq, compiled):
            x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out, indices = layer(x)
            out.float().square().sum().backward()
            grads.append((out, indices, x.grad, fsq.project_in.weight.grad.clone()))
            fsq.zero_grad()
        (eager_out, eager_indices, *eager_grads), (out, indices, *got_grads) = grads
        assert torch.equal(indices, eager_indices)
        torch.testing.assert_close(out, eager_out)
        for got, want in zip(got_grads, eager_grads):
            torch.testing.assert_close(got, want)


def test_code_usage_against_counting():
    fsq = FSQ([5, 5])
    indices = torch.tensor([[0, 0, 1, 1, 1, 7], [7, 7, 7, 24, 24, 3]])
    usage = fsq.code_usage(indices)
    counts = torch.tensor([2, 3, 4, 2, 1], dtype=torch.float64)  # codes 0, 1, 7, 24, 3
    probs = counts / counts.sum()
    assert usage.codes_used == 5
    assert usage.usage.item() == pytest.approx(5 / 25)
    assert usage.perplexity.item() == pytest.approx(torch.exp(-(probs * probs.log()).sum()).item(), rel=1e-6)


def test_same_codes_as_vector_quantize_pytorch():
    peer = pytest.importorskip("vector_quantize_pytorch")
    z = torch.randn(4, 128, 4) * 2
    for kwargs in ({}, {"preserve_symmetry": True}):
        ours_out, ours_indices = FSQ(LEVELS, **kwargs)(z)
        peer_out, peer_indices = peer.FSQ(LEVELS, **kwargs)(z)
        assert torch.equal(ours_indices, peer_indices.long())
        torch.testing.assert_close(ours_out, peer_out)
    ours, theirs = FSQ(LEVELS, dim=16), peer.FSQ(LEVELS, dim=16)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 3, 3)
    assert torch.equal(ours(x)[1], theirs(x)[1].long())
    torch.testing.assert_close(ours.implicit_codebook, theirs.implicit_codebook)


def test_module_dtype_cast_keeps_parameters_in_module_dtype():
    fsq = FSQ(LEVELS, dim=16).to(DTYPES["bf16"])
    assert fsq.project_in.weight.dtype == torch.bfloat16


def test_codebook_axis_and_integer_input_are_checked():
    with pytest.raises(ValueError, match="num_codebooks=2"):
        FSQ([8, 5], num_codebooks=2).indices_to_codes(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="input"):
        FSQ([8, 5])(torch.ones(2, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="noise_dropout"):
        FSQ([8, 5], noise_dropout="a")
