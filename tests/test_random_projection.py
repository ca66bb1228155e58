"""RandomProjectionQuantizer against an fp64 re-implementation of BEST-RQ (arXiv 2202.01855),
the peer, the dtype matrix, and 2 gloo ranks.

The reference is written here from the paper's description (and the peer's choice of metric,
cosine similarity), not from the code under test:

- z = layer_norm(x) without learned parameters (eps 1e-5) when norm=True, else x, in fp64;
- per codebook h: p_h = z @ rand_projs[h], index = argmax_k <p_h / ||p_h||, c_hk / ||c_hk||>
  by brute force; tokens whose two best similarities are within NEAR_TIE are near-ties;
- with given indices: the cross-entropy of softmax_k(cosine similarities) to them, averaged
  over tokens and codebooks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_in_processes
from dtype_matrix import Parts, dtype_matrix, run_cell
from reference import randn
from vq_layers import RandomProjectionQuantizer

F64 = torch.float64
NEAR_TIE = 1e-6
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def similarities64(layer, x):
    """x (b, ..., dim) -> cosine similarities (b, ..., h, K) fp64, differentiable in x."""
    z = x.to(F64)
    if layer.norm:
        z = F.layer_norm(z, (layer.dim,), eps=1e-5)
    projected = F.normalize(torch.einsum("...d,hde->...he", z, layer.rand_projs.to(F64)), dim=-1)
    codebooks = F.normalize(layer.vq.codebook.to(F64), dim=-1)  # (h, K, e)
    return torch.einsum("...he,hke->...hk", projected, codebooks)


def reference(layer, x):
    """-> indices (b, ..., h), clear (b, ...) (no near-tie in any codebook)."""
    sims = similarities64(layer, x.detach())
    top = sims.topk(2, dim=-1).values
    return sims.argmax(-1), ((top[..., 0] - top[..., 1]) > NEAR_TIE).all(-1)


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    return RandomProjectionQuantizer(**dict(dict(dim=12, codebook_size=32, codebook_dim=6), **kwargs))


def per_codebook(layer, indices):
    """Indices as forward returns them -> (..., h)."""
    return indices if layer.num_codebooks > 1 else indices.unsqueeze(-1)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("num_codebooks", [1, 3])
def test_indices_match_fp64_reference(num_codebooks, norm):
    layer = make(num_codebooks=num_codebooks, norm=norm)
    x = randn(3, 40, 12, seed=1) * 3 + 1
    indices = layer(x)
    assert indices.dtype == torch.long
    assert indices.shape == ((3, 40) if num_codebooks == 1 else (3, 40, num_codebooks))
    idx, clear = reference(layer, x)
    assert clear.float().mean() > 0.95
    assert torch.equal(per_codebook(layer, indices)[clear], idx[clear])
    # the same targets for every layout of the tokens: one token, and (b, h, w, dim)
    assert torch.equal(layer(x[:, 0]), indices[:, 0])
    assert torch.equal(layer(x.reshape(3, 5, 8, 12)), indices.reshape(3, 5, 8, *indices.shape[2:]))


@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_cross_entropy_to_given_indices(num_codebooks):
    layer = make(num_codebooks=num_codebooks)
    x = randn(2, 30, 12, seed=2).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    given = torch.randint(0, 32, (2, 30, num_codebooks), generator=g)
    given = given if num_codebooks > 1 else given[..., 0]
    ce = layer(x, indices=given)
    assert ce.dtype == torch.float32 and ce.ndim == 0
    x64 = x.detach().to(F64).requires_grad_(True)
    sims = similarities64(layer, x64)
    expected = F.cross_entropy(sims.reshape(-1, 32), per_codebook(layer, given).reshape(-1))
    torch.testing.assert_close(ce.to(F64), expected, rtol=1e-5, atol=1e-6)
    ce.backward()
    expected.backward()
    torch.testing.assert_close(x.grad.to(F64), x64.grad, rtol=1e-4, atol=1e-7)


def test_nothing_learns_nor_changes():
    layer = make(num_codebooks=2).train()
    assert not layer.vq.training and not list(layer.parameters())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = randn(2, 16, 12, seed=4).requires_grad_(True)
    for _ in range(2):
        indices = layer(x)
        layer(x, indices=indices).backward()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    assert torch.equal(layer(x), indices)


def test_same_targets_and_loss_as_vector_quantize_pytorch():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=12, codebook_size=32, codebook_dim=6)
    torch.manual_seed(0)
    peer = peer_module.RandomProjectionQuantizer(**kwargs)
    ours = RandomProjectionQuantizer(**kwargs)
    assert set(peer.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(peer.state_dict())
    x = randn(2, 30, 12, seed=5)
    indices = peer(x)
    assert torch.equal(ours(x), indices)
    torch.testing.assert_close(ours(x, indices=indices), peer(x, indices=indices), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# the dtype matrix: targets equal the fp64 reference on the input as given


def _unpack(result):
    x, indices, ce = result
    return Parts(x, indices=[indices], losses=[ce])


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix(cell):
    def forward(layer, x):
        indices = layer(x)
        # the layer has no output of x's dtype: x itself stands in, and carries the CE's gradient
        return x, indices, layer(x, indices=indices)

    res = run_cell(cell, lambda: make(num_codebooks=2, codebook_size=512, codebook_dim=4),
                   lambda dt: (randn(4, 32, 12, seed=6) * 4).to(dt),
                   forward=forward, unpack=_unpack)
    idx, clear = reference(res.layer, res.x.detach())
    assert clear.float().mean() > 0.9
    assert torch.equal(res.parts.indices[0][clear], idx[clear])
    assert res.layer.rand_projs.dtype == torch.float32


# ------------------------------------------------------------------------------------------
# state, empty batches, errors


def test_state_dict_round_trip_and_fp32_buffers():
    layer, other = make(seed=0, num_codebooks=2), make(seed=1, num_codebooks=2)
    x = randn(2, 20, 12, seed=7)
    assert not torch.equal(layer(x), other(x))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.half()
    for key, value in layer.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    assert torch.equal(layer(x.half()), layer(x.half().float()))


@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_empty_batch(num_codebooks):
    layer = make(num_codebooks=num_codebooks)
    indices = layer(torch.zeros(0, 5, 12))
    assert indices.shape == ((0, 5) if num_codebooks == 1 else (0, 5, num_codebooks))
    assert layer(torch.zeros(0, 5, 12), indices=indices).item() == 0.0


@pytest.mark.parametrize("kwargs,name", [
    (dict(dim=0), "dim"),
    (dict(codebook_dim=0), "codebook_dim"),
    (dict(num_codebooks=0), "num_codebooks"),
    (dict(codebook_size=0), "codebook_size"),
    (dict(kmeans_init=True), "kmeans_init"),
    (dict(heads=2), "heads"),
    (dict(use_cosine_sim=False), "use_cosine_sim"),
])
def test_bad_config_raises_naming_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make(**kwargs)


def test_bad_inputs_raise_naming_the_argument():
    layer = make(num_codebooks=2)
    x = randn(2, 5, 12)
    with pytest.raises(ValueError, match="dim"):
        layer(randn(2, 5, 11))
    with pytest.raises(TypeError, match="input"):
        layer(x.long())
    with pytest.raises(ValueError, match="indices"):
        layer(x, indices=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="indices"):
        layer(x, indices=torch.full((2, 5, 2), 32))
    with pytest.raises(TypeError, match="indices"):
        layer(x, indices=torch.zeros(2, 5, 2))


# ------------------------------------------------------------------------------------------
# distributed (2-process gloo): ranks built from different seeds agree from the first forward


def _gathered(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def _dist_worker(rank, world):
    kwargs = dict(dim=12, codebook_size=32, codebook_dim=6, num_codebooks=2)
    synced, unsynced = make(seed=rank, **kwargs), make(seed=rank, sync_codebook=False, **kwargs)
    single = make(seed=0, sync_codebook=False, **kwargs)  # what rank 0 built, seen whole
    x = randn(4, 10, 12, seed=8)
    half = x.chunk(world)[rank]
    with torch.no_grad():
        indices = synced(half)
        unsynced(half)
    for key, value in synced.state_dict().items():
        parts = _gathered(value.float())
        assert all(torch.equal(parts[0], p) for p in parts[1:]), f"{key} differs across ranks"
    assert torch.equal(torch.cat(_gathered(indices)), single(x))
    parts = _gathered(unsynced.rand_projs)
    assert not torch.equal(parts[0], parts[1])  # sync_codebook=False: each rank its own


@pytest.mark.timeout(120)
def test_distributed_ranks_agree_and_equal_one_process():
    run_in_processes(_dist_worker, 2, timeout=90)
