"""SimVQ against an fp64 re-implementation of the scheme (arXiv 2411.02038), the peer, the dtype matrix.

The reference is written here from the paper's description, not from the code under test:

- implicit codebook C' = code_transform(C) of the frozen codebook C, evaluated in fp64 with the
  layer's own transform (a float64 copy of it);
- index = argmin_k ||x - C'_k||^2 by brute force; rows whose two best squared distances are
  within NEAR_TIE (relative) are left out as near-ties;
- commit loss = commitment_weight * (1 + input_to_quantize_commit_loss_weight) * mean (x - q)^2
  in value; its gradient reaches the map through the first term only, x through the second;
- output = q in value; its input gradient is lambda R^T g (rotation trick, arXiv 2410.06424,
  R = I - 2 w w^T + 2 q^ u^T as an explicit matrix) or g itself (straight-through).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dtype_matrix import DTYPES, dtype_matrix, run_cell
from reference import randn, rotation_vjp64
from vq_layers import SimVQ

F64 = torch.float64
NEAR_TIE = 1e-5
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def implicit64(layer):
    """The implicit codebook (K, dim) in fp64, from a float64 copy of the layer's transform."""
    transform = copy.deepcopy(layer.code_transform).to(F64)
    with torch.no_grad():
        return transform(layer.frozen_codebook.to(F64))


def brute(rows, codebook):
    """rows (N, d), codebook (K, d) -> fp64 argmin indices (N,), clear (N,) (no near-tie)."""
    d2 = (rows.to(F64).unsqueeze(1) - codebook.to(F64)).square().sum(-1)
    top = d2.topk(min(2, d2.shape[1]), dim=-1, largest=False).values
    gap = (top[:, -1] - top[:, 0]) / top[:, -1].clamp(min=1e-300)
    return d2.argmin(-1), gap > NEAR_TIE




def mlp(frozen_dim, dim):
    return nn.Sequential(nn.Linear(frozen_dim, 12), nn.ReLU(), nn.Linear(12, dim))


CONFIGS = {
    "linear": dict(dim=8, codebook_size=32),
    "mlp_frozen_dim": dict(dim=6, codebook_size=24, frozen_codebook_dim=4, transform=(4, 6)),
    "straight_through": dict(dim=8, codebook_size=16, rotation_trick=False, commitment_weight=0.5,
                             input_to_quantize_commit_loss_weight=0.1),
}


def make(name, seed=0, **extra):
    kwargs = dict(CONFIGS[name], **extra)
    transform = kwargs.pop("transform", None)
    torch.manual_seed(seed)
    if transform is not None:
        kwargs["codebook_transform"] = mlp(*transform)
    return SimVQ(**kwargs)


# ------------------------------------------------------------------------------------------
# indices, output, loss and gradients against the fp64 reference


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_matches_fp64_reference(name, train):
    layer = make(name).train(train)
    x = randn(3, 20, layer.dim, seed=1).requires_grad_(True)
    out, indices, loss = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype and indices.shape == (3, 20) and indices.dtype == torch.long
    codebook = implicit64(layer)
    idx, clear = brute(x.detach().reshape(-1, layer.dim), codebook)
    assert clear.float().mean() > 0.9
    assert torch.equal(indices.reshape(-1)[clear], idx[clear])
    q = codebook[indices.reshape(-1)].reshape(x.shape)
    torch.testing.assert_close(out.detach().to(F64), q, rtol=1e-6, atol=1e-6)
    expected = layer.commitment_weight * (1 + layer.input_to_quantize_commit_loss_weight) * (
        (x.detach().to(F64) - q).square().mean())
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss.to(F64), expected, rtol=1e-5, atol=1e-7)

    # input gradient of the output: rotation trick or straight-through
    g = randn(3, 20, layer.dim, seed=2)
    (grad,) = torch.autograd.grad(out, x, g, retain_graph=True)
    if layer.rotation_trick:
        ref = rotation_vjp64(x.detach().to(F64).reshape(-1, layer.dim), q.reshape(-1, layer.dim),
                             g.to(F64).reshape(-1, layer.dim))
        torch.testing.assert_close(grad.to(F64), ref.reshape(x.shape), rtol=1e-5, atol=1e-6)
        assert (grad - g).abs().max() > 1e-2
    else:
        assert torch.equal(grad, g)
    # the output carries no gradient to the map (the paper's estimator)
    params = list(layer.code_transform.parameters())
    assert all(p is None for p in torch.autograd.grad(out.sum(), params, allow_unused=True, retain_graph=True))


@pytest.mark.parametrize("name", ["linear", "mlp_frozen_dim"])
def test_commit_loss_gradients_reach_the_map_and_the_input(name):
    layer = make(name).train()
    x = randn(2, 16, layer.dim, seed=3).requires_grad_(True)
    _, indices, loss = layer(x)
    loss.backward()

    reference = copy.deepcopy(layer.code_transform).to(F64)
    reference.zero_grad()
    x64 = x.detach().to(F64).requires_grad_(True)
    q = reference(layer.frozen_codebook.to(F64))[indices.reshape(-1)].reshape(x.shape)
    w_in, cw = layer.input_to_quantize_commit_loss_weight, layer.commitment_weight
    ref_loss = cw * ((x64.detach() - q).square().mean() + w_in * (x64 - q.detach()).square().mean())
    ref_loss.backward()
    for (pname, p), p64 in zip(layer.code_transform.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.to(F64), p64.grad, rtol=1e-5, atol=1e-7, msg=pname)
    torch.testing.assert_close(x.grad.to(F64), x64.grad, rtol=1e-5, atol=1e-8)
    assert layer.frozen_codebook.grad is None and not layer.frozen_codebook.requires_grad


def test_the_map_learns():
    """A few SGD steps on the map alone lower the commitment loss on a fixed batch."""
    layer = make("linear").train()
    x = randn(4, 32, 8, seed=4) * 2
    opt = torch.optim.SGD(layer.code_transform.parameters(), lr=5.0)
    losses = []
    for _ in range(20):
        _, _, loss = layer(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.65 * losses[0], losses


@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.parametrize("name", ["linear", "mlp_frozen_dim"])
def test_indices_to_codes_equals_forward(name, channel_first):
    layer = make(name, channel_first=channel_first).eval()
    shape = (2, layer.dim, 3, 5) if channel_first else (2, 3, 5, layer.dim)
    x = randn(*shape, seed=5)
    out, indices, _ = layer(x)
    assert indices.shape == (2, 3, 5)
    assert torch.equal(layer.indices_to_codes(indices), out)
    # the same layout as the input, and the reference's codes
    codes = implicit64(layer)[indices]
    if channel_first:
        codes = codes.movedim(-1, 1)
    torch.testing.assert_close(out.to(F64), codes, rtol=1e-6, atol=1e-6)
    assert layer.indices_to_codes(indices, dtype=torch.bfloat16).dtype == torch.bfloat16
    # training mode: the same value
    out_train, _, _ = layer.train()(x.requires_grad_(True))
    assert torch.equal(out_train, out)


@pytest.mark.parametrize("name", ["linear", "straight_through"])
def test_same_indices_and_output_as_vector_quantize_pytorch(name):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = {k: v for k, v in CONFIGS[name].items() if k != "transform"}
    torch.manual_seed(0)
    peer = peer_module.SimVQ(**kwargs).train()
    ours = SimVQ(**kwargs).train()
    assert set(peer.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(peer.state_dict())
    x = randn(2, 24, kwargs["dim"], seed=6)
    p_out, p_idx, p_loss = peer(x)
    o_out, o_idx, o_loss = ours(x)
    assert torch.equal(o_idx, p_idx)
    torch.testing.assert_close(o_out, p_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_loss, p_loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# the dtype matrix: codes equal the fp64 search against the codebook the map gave


@pytest.mark.parametrize("cell", dtype_matrix())
@pytest.mark.parametrize("name", ["linear", "mlp_frozen_dim"])
def test_dtype_matrix(name, cell):
    snap = {}
    channel_first = name == "mlp_frozen_dim"

    def forward(layer, x):
        with torch.autocast("cpu", enabled=False):  # the codebook the module's dtype gives, whatever
            snap["codebook"] = layer.codebook.detach().float()  # the autocast around forward
        return layer(x)

    dim = CONFIGS[name]["dim"]
    # many codes and tokens: a search in half precision would pick other codes somewhere
    shape = (4, dim, 8, 4) if channel_first else (4, 32, dim)
    res = run_cell(cell, lambda: make(name, channel_first=channel_first, codebook_size=512),
                   lambda dt: randn(*shape, seed=7).to(dt), forward=forward)
    rows = res.x.detach().movedim(1, -1) if channel_first else res.x.detach()
    idx, clear = brute(rows.reshape(-1, dim), snap["codebook"])
    indices = res.parts.indices[0].reshape(-1)
    assert clear.float().mean() > 0.8
    assert torch.equal(indices[clear], idx[clear])
    assert res.layer.frozen_codebook.dtype == torch.float32
    if DTYPES[cell.module_dtype] == DTYPES[cell.input_dtype] and cell.autocast == "off" and not cell.train:
        assert torch.equal(res.layer.indices_to_codes(res.parts.indices[0]), res.parts.output)


# ------------------------------------------------------------------------------------------
# state, empty batches, errors


def test_state_dict_round_trip_and_fp32_frozen_codebook():
    layer = make("mlp_frozen_dim", seed=0).eval()
    other = make("mlp_frozen_dim", seed=1).eval()
    x = randn(2, 10, 6, seed=8)
    assert not torch.equal(layer(x)[1], other(x)[1]) or not torch.equal(layer(x)[0], other(x)[0])
    other.load_state_dict(layer.state_dict())
    for a, b in zip(layer(x), other(x)):
        assert torch.equal(a, b)
    frozen = layer.frozen_codebook.clone()
    layer.half()
    assert layer.frozen_codebook.dtype == torch.float32 and torch.equal(layer.frozen_codebook, frozen)
    assert all(p.dtype == torch.float16 for p in layer.code_transform.parameters())
    assert layer(x.half())[0].dtype == torch.float16


def test_init_fn_shapes_the_frozen_codebook():
    layer = SimVQ(dim=4, codebook_size=8, init_fn=lambda c: torch.full_like(c, 0.5))
    assert torch.equal(layer.frozen_codebook, torch.full((8, 4), 0.5))


@pytest.mark.parametrize("train", [False, True])
def test_empty_batch(train):
    layer = make("linear").train(train)
    x = torch.zeros(0, 5, 8, requires_grad=True)
    out, indices, loss = layer(x)
    assert out.shape == (0, 5, 8) and indices.shape == (0, 5) and loss.item() == 0.0
    loss.backward()


@pytest.mark.parametrize("kwargs,name", [
    (dict(dim=0), "dim"),
    (dict(codebook_size=2.5), "codebook_size"),
    (dict(frozen_codebook_dim=0), "frozen_codebook_dim"),
    (dict(codebook_transform="linear"), "codebook_transform"),
    (dict(init_fn=None), "init_fn"),
    (dict(init_fn=lambda c: c[:2]), "init_fn"),
    (dict(commitment_weight=-1.0), "commitment_weight"),
    (dict(input_to_quantize_commit_loss_weight=float("nan")), "input_to_quantize_commit_loss_weight"),
])
def test_bad_config_raises_naming_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        SimVQ(**dict(dict(dim=8, codebook_size=16), **kwargs))


def test_bad_inputs_raise_naming_the_argument():
    layer = make("linear")
    with pytest.raises(ValueError, match="dim"):
        layer(randn(2, 5, 7))
    with pytest.raises(TypeError, match="input"):
        layer(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="input"):
        layer([1.0] * 8)
    with pytest.raises(ValueError, match="indices"):
        layer.indices_to_codes(torch.tensor([[0, 32]]))
    with pytest.raises(ValueError, match="indices"):
        layer.indices_to_codes(torch.tensor([[-2, 0]]))  # -1 is no code (zeros)
    with pytest.raises(TypeError, match="indices"):
        layer.indices_to_codes(torch.tensor([[0.0]]))
    wrong = SimVQ(dim=8, codebook_size=16, codebook_transform=nn.Linear(8, 5))
    with pytest.raises(ValueError, match="codebook_transform"):
        wrong(randn(2, 5, 8))


def test_compile_fullgraph_matches_eager():
    layer = make("linear").train()
    x = randn(2, 12, 8, seed=9)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_x, compiled_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager, graph = layer(eager_x), compiled(compiled_x)
    for a, b in zip(eager, graph):
        assert torch.equal(a, b)
    (eager[0].square().sum() + eager[2]).backward()
    eager_grads = [eager_x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    (graph[0].square().sum() + graph[2]).backward()
    for a, b in zip(eager_grads, [compiled_x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
