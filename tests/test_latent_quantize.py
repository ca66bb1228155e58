"""LatentQuantize against fp64 brute force over each dimension's values, through the dtype matrix."""

import inspect
import itertools
import math

import pytest
import torch

from dist_utils import run_in_processes
from dtype_matrix import dtype_matrix, run_cell
from reference import F64, linear64, randn
from vq_layers import LatentQuantize

LEVELS = [5, 4, 3]


def nearest64(z, values):
    """fp64 brute force: z (..., d), values [(L_i,)] -> positions (..., d), margins (..., d)
    (gap between the best and second-best distance; small = near-tie)."""
    positions, margins = [], []
    for i, vals in enumerate(values):
        dist = (z[..., i, None].to(F64) - vals.detach().to(F64)).abs()
        best = dist.topk(2, largest=False) if len(vals) > 1 else None
        positions.append(dist.argmin(-1))
        margins.append(best.values[..., 1] - best.values[..., 0])
    return torch.stack(positions, -1), torch.stack(margins, -1)


def mixed_radix(positions, levels):
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    return (positions * basis).sum(-1)


def scramble_values(layer, seed=0):
    """Values as training leaves them: moved, unsorted, not on the initial grid."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in layer.values_per_latent:
            v.copy_(torch.randn(v.shape, generator=g))


# --- the dtype matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_with_projections(cell):
    run_cell(cell, lambda: LatentQuantize(LEVELS, dim=16), lambda dtype: randn(2, 16, 6).to(dtype))


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_indices_equal_fp64_nearest(cell):
    """No projections: each dimension's value is the nearest of its (module-dtype) values."""
    x = randn(2, 3, 40)
    result = run_cell(cell, lambda: LatentQuantize(LEVELS, dim=3), lambda dtype: x.to(dtype))
    (indices,) = result.parts.indices
    tokens = result.x.detach().cpu().transpose(1, 2)
    positions, margin = nearest64(tokens, [v.cpu() for v in result.layer.values()])
    clear = (margin > 1e-5).all(-1)
    assert torch.equal(indices.cpu()[clear], mixed_radix(positions, LEVELS)[clear])


# --- the search, indices and codes ---------------------------------------------------------------------


@pytest.mark.parametrize("levels", [[5, 4, 3], [2, 7], [16, 2, 9, 3]])
def test_each_dimension_picks_its_fp64_nearest_value(levels):
    layer = LatentQuantize(levels, dim=len(levels)).eval()
    scramble_values(layer)
    z = randn(3, len(levels), 50, scale=1.5)
    out, indices, _ = layer(z)
    tokens = z.transpose(1, 2)
    positions, margin = nearest64(tokens, layer.values())
    clear = (margin > 1e-6).all(-1)
    assert clear.float().mean() > 0.98
    assert indices.dtype == torch.long and torch.equal(indices[clear], mixed_radix(positions, levels)[clear])
    chosen = torch.stack([layer.values()[i].detach()[positions[..., i]] for i in range(len(levels))], -1)
    assert torch.equal(out.transpose(1, 2)[clear], chosen[clear])  # the values themselves, exactly


def test_ties_go_to_the_lowest_position():
    layer = LatentQuantize([3, 2], dim=2)
    with torch.no_grad():
        layer.values_per_latent[0].copy_(torch.tensor([0.5, 0.0, 0.5]))  # duplicate value
        layer.values_per_latent[1].copy_(torch.tensor([0.25, -0.25]))
    z = torch.tensor([[[0.25], [0.0]]])  # dim 0: |0.25 - 0.5| = |0.25 - 0|; dim 1: equidistant
    _, indices, _ = layer(z)
    assert indices.item() == 0 + 3 * 0


def test_indices_to_codes_is_the_eval_forward():
    layer = LatentQuantize(LEVELS, dim=10, num_codebooks=2).eval()
    scramble_values(layer, seed=1)
    x = randn(2, 10, 3, 4)
    out, indices, loss = layer(x)
    assert indices.shape == (2, 3, 4, 2) and out.shape == x.shape and loss.item() == 0.0
    assert torch.equal(layer.indices_to_codes(indices), out)
    latent = layer.indices_to_codes(indices, project_out=False)
    assert latent.shape == (2, 6, 3, 4)
    assert torch.equal(layer.codes_to_indices(latent.movedim(1, -1).unflatten(-1, (2, 3))), indices)


def test_implicit_codebook_enumerates_the_values_and_round_trips():
    layer = LatentQuantize(LEVELS, dim=3)
    scramble_values(layer, seed=2)
    values = [v.detach().tolist() for v in layer.values()]
    expected = torch.tensor([list(reversed(c)) for c in itertools.product(*reversed(values))])
    assert torch.equal(layer.implicit_codebook.detach(), expected)  # first dimension fastest
    assert torch.equal(layer.codes_to_indices(expected), torch.arange(60))


def test_indices_are_exact_beyond_float32_integers():
    levels = [16] * 8  # 2^32 codes
    layer = LatentQuantize(levels, dim=8).eval()
    z = randn(1, 8, 20)
    _, indices, _ = layer(z)
    positions, _ = nearest64(z.transpose(1, 2), layer.values())
    expected = [sum(int(p) * 16**i for i, p in enumerate(row)) for row in positions[0].tolist()]
    assert indices[0].tolist() == expected and max(expected) > 2**24


# --- losses and gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(0.1, 0.1), (0.25, 0.0), (0.0, 0.5), (None, 1.0)])
def test_losses_are_the_paper_formulas(weights):
    wc, wq = weights
    layer = LatentQuantize(LEVELS, dim=8, commitment_loss_weight=wc, quantization_loss_weight=wq).train()
    scramble_values(layer, seed=3)
    x = randn(2, 8, 9, seed=4).requires_grad_(True)
    _, _, loss = layer(x)
    latent = linear64(layer.project_in, x.detach().transpose(1, 2))
    positions, _ = nearest64(latent, layer.values())
    values64 = [v.detach().double().requires_grad_(True) for v in layer.values()]
    zhat = torch.stack([values64[i][positions[..., i]] for i in range(3)], -1)
    mse = ((latent - zhat) ** 2).mean()
    expected = ((wc or 0.0) + wq) * mse
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    loss.backward()
    # the values move by the quantization loss only, towards the latents that chose them
    expected_grads = torch.autograd.grad(wq * mse, values64) if wq else [torch.zeros_like(v) for v in values64]
    for value, want in zip(layer.values_per_latent, expected_grads):
        got = value.grad if value.grad is not None else torch.zeros_like(value)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    # the input moves by the commitment loss only: d/dx wc * mse(proj(x), sg(zhat))
    x64 = x.detach().double().requires_grad_(True)
    commit = (wc or 0.0) * ((linear64(layer.project_in, x64.transpose(1, 2)) - zhat.detach()) ** 2).mean()
    want = torch.autograd.grad(commit, x64)[0] if wc else torch.zeros_like(x64)
    got = x.grad if x.grad is not None else torch.zeros_like(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_output_gradient_is_straight_through():
    layer = LatentQuantize(LEVELS, dim=3).train()
    x = randn(2, 3, 5).requires_grad_(True)
    out, _, _ = layer(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))


def test_fixed_values():
    layer = LatentQuantize(LEVELS, dim=3, optimize_values=False).half()
    assert list(layer.parameters()) == [] and set(layer.state_dict()) == set()
    assert all(v.dtype == torch.float32 for v in layer.values())
    expected = [torch.linspace(-0.5, 0.5, 5), torch.arange(4) / 4 - 0.5, torch.linspace(-0.5, 0.5, 3)]
    for got, want in zip(layer.values(), expected):
        assert torch.equal(got, want)
    out, _, loss = layer.train()(randn(2, 3, 5).half())
    assert out.dtype == torch.float16 and loss.dtype == torch.float32


def test_in_place_codebook_optimizer_steps_the_values_on_the_quantization_loss():
    layer = LatentQuantize(LEVELS, dim=3, quantization_loss_weight=0.5,
                           in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=2.0)).train()
    before = [v.detach().clone() for v in layer.values()]
    x = randn(2, 3, 30, seed=5).requires_grad_(True)
    tokens = x.detach().transpose(1, 2)
    positions, _ = nearest64(tokens, before)
    values64 = [v.double().requires_grad_(True) for v in before]
    zhat = torch.stack([values64[i][positions[..., i]] for i in range(3)], -1)
    grads = torch.autograd.grad(0.5 * ((zhat - tokens.double()) ** 2).mean(), values64)
    _, indices, loss = layer(x)
    for value, old, grad in zip(layer.values(), before, grads):
        torch.testing.assert_close(value.detach().double(), old.double() - 2.0 * grad, rtol=1e-6, atol=1e-7)
        assert value.grad is None
    # the output is quantized again with the stepped values, and the loss leaves them alone
    new_positions, _ = nearest64(tokens, layer.values())
    assert torch.equal(indices, mixed_radix(new_positions, LEVELS))
    loss.backward()
    assert all(v.grad is None or not v.grad.any() for v in layer.values_per_latent)
    bad = x.detach().clone()
    bad[0, 0, 0] = float("nan")
    snapshot = [v.detach().clone() for v in layer.values()]
    with pytest.raises(ValueError, match="NaN"):
        layer(bad)
    assert all(torch.equal(a, b) for a, b in zip(layer.values(), snapshot))


# --- layouts, state, errors, drop-in ----------------------------------------------------------------


def test_layouts_and_empty_batches():
    layer = LatentQuantize(4, dim=6, codebook_dim=2, num_codebooks=3).train()
    assert layer.levels == [4, 4] and layer.codebook_size == 16
    out, indices, loss = layer(randn(5, 6))
    assert out.shape == (5, 6) and indices.shape == (5, 3)
    out, indices, loss = layer(randn(2, 6, 0))
    assert out.shape == (2, 6, 0) and indices.shape == (2, 0, 3) and loss.item() == 0.0
    single = LatentQuantize(LEVELS, dim=3)
    out, indices, _ = single(randn(2, 3, 4, 5))
    assert out.shape == (2, 3, 4, 5) and indices.shape == (2, 4, 5)


def test_state_dict_round_trip():
    layer = LatentQuantize(LEVELS, dim=8)
    scramble_values(layer, seed=6)
    assert set(layer.state_dict()) == {"project_in.weight", "project_in.bias", "project_out.weight",
                                       "project_out.bias", "values_per_latent.0", "values_per_latent.1",
                                       "values_per_latent.2"}
    clone = LatentQuantize(LEVELS, dim=8)
    clone.load_state_dict(layer.state_dict())
    x = randn(2, 8, 5)
    for a, b in zip(layer.eval()(x), clone.eval()(x)):
        assert torch.equal(a, b)
    half = LatentQuantize(LEVELS, dim=8).half()
    half.load_state_dict(layer.state_dict())
    assert half.values_per_latent[0].dtype == torch.float16 and half._basis.dtype == torch.long
    assert "levels=[5, 4, 3]" in repr(layer) and "codebook_size=60" in repr(layer)


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="codebook_dim"):
        LatentQuantize(5, dim=3)  # an int levels needs codebook_dim
    with pytest.raises(ValueError, match="codebook_dim"):
        LatentQuantize([5, 4], dim=3, codebook_dim=3)
    for levels in ([1, 4], [2.5], [], "54"):
        with pytest.raises(ValueError, match="levels"):
            LatentQuantize(levels, dim=3)
    with pytest.raises(ValueError, match="keep_num_codebooks_dim"):
        LatentQuantize(LEVELS, dim=6, num_codebooks=2, keep_num_codebooks_dim=False)
    with pytest.raises(ValueError, match="in_place_codebook_optimizer"):
        LatentQuantize(LEVELS, dim=3, optimize_values=False, in_place_codebook_optimizer=torch.optim.SGD)
    with pytest.raises(TypeError, match="commitment_loss_weight"):
        LatentQuantize(LEVELS, dim=3, commitment_loss_weight="0.1")
    for name in ("commitment_loss_weight", "quantization_loss_weight"):
        for weight in (-1.0, -1e-9, float("nan")):
            with pytest.raises(ValueError, match=f"{name}: expected a weight >= 0"):
                LatentQuantize([5, 5], dim=2, **{name: weight})
        for weight in (None, 0, 0.0):  # None means 0, as the peer
            assert getattr(LatentQuantize([5, 5], dim=2, **{name: weight}), name) == 0.0
    layer = LatentQuantize(LEVELS, dim=3)
    with pytest.raises(ValueError, match="expected input feature dim 3 on axis 1, got 4"):
        layer(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="input"):
        layer(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 60\)"):
        layer.indices_to_codes(torch.tensor([[0, 60]]))
    with pytest.raises(ValueError, match="zhat: expected last dim codebook_dim=3"):
        layer.codes_to_indices(torch.zeros(4, 2))
    with pytest.raises(TypeError, match="zhat: expected a floating point tensor, got list"):
        layer.codes_to_indices([0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match="z: expected a floating point tensor, got list"):
        layer([1, 2, 3])
    with pytest.raises(ValueError, match="num_codebooks=2"):
        LatentQuantize(LEVELS, dim=6, num_codebooks=2).indices_to_codes(torch.zeros(2, 3, dtype=torch.long))


def test_same_as_vector_quantize_pytorch_where_it_is_right():
    """At the initial values and without projections the peer's codes, indices and loss value
    agree; its values get no gradient (straight-through detaches them) and its two losses'
    input gradients cancel, which is why ours are the paper's."""
    peer = pytest.importorskip("vector_quantize_pytorch")
    levels = [5, 4, 8]
    ours, theirs = LatentQuantize(levels, dim=3).train(), peer.LatentQuantize(levels, dim=3).train()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = randn(2, 3, 40, scale=0.4)
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, indices, loss = ours(x_ours)
    p_out, p_indices, p_loss = theirs(x_theirs)
    assert torch.equal(indices, p_indices.long())
    assert torch.equal(out, p_out)
    torch.testing.assert_close(loss, p_loss)
    p_loss.backward()
    assert all(v.grad is None for v in theirs.values_per_latent)
    assert x_theirs.grad.abs().max() < 1e-9
    loss.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in ours.values_per_latent)
    assert x_ours.grad.abs().max() > 1e-4


def test_peer_keywords_are_accepted():
    peer = pytest.importorskip("vector_quantize_pytorch")
    for method in ("__init__", "forward", "codes_to_indices", "indices_to_codes"):
        ours, theirs = getattr(LatentQuantize, method), getattr(peer.LatentQuantize, method)
        assert set(inspect.signature(theirs).parameters) <= set(inspect.signature(ours).parameters), method
    layer = LatentQuantize(LEVELS, dim=3)
    zhat = torch.tensor([[0.5, -0.5, 0.0]])  # positions (4, 0, 1) of levels (5, 4, 3)
    assert layer.codes_to_indices(zhat=zhat).tolist() == [4 + 0 * 5 + 1 * 20]


def _in_place_layer(**kwargs):
    return LatentQuantize(LEVELS, dim=3, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=3.0),
                          **kwargs).train()


def _in_place_worker(rank, world_size):
    x = randn(4, 3, 10, seed=7)
    rows = slice(0, 3) if rank == 0 else slice(3, 4)  # uneven shares
    alone = _in_place_layer(sync_codebook=False)
    _, whole_indices, _ = alone(x)
    layer = _in_place_layer()
    _, indices, _ = layer(x[rows])
    for got, want in zip(layer.values(), alone.values()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(indices, whole_indices[rows])
    bad = x[rows].clone()
    if rank == 1:
        bad[0, 0, 0] = float("nan")
    before = [v.detach().clone() for v in layer.values()]
    with pytest.raises(ValueError, match="NaN"):  # on both ranks: no rank waits in a collective
        layer(bad)
    assert all(torch.equal(a, b) for a, b in zip(layer.values(), before))


def test_in_place_step_over_two_ranks_equals_one_process_on_the_whole_batch():
    run_in_processes(_in_place_worker, 2)


def test_compile_fullgraph_training_forward_and_backward():
    torch._dynamo.reset()
    layer = LatentQuantize(LEVELS, dim=8).train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    grads = []
    for module in (layer, compiled):
        x = randn(2, 8, 5, seed=5).requires_grad_(True)
        out, indices, loss = module(x)
        (out.square().sum() + loss).backward()
        grads.append((out, indices, loss, x.grad, *(v.grad.clone() for v in layer.values_per_latent)))
        layer.zero_grad()
    for eager, got in zip(*grads):
        torch.testing.assert_close(got, eager)
