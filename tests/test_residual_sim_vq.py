"""ResidualSimVQ against an fp64 greedy reference, the peer, the dtype matrix.

The reference is written here from the scheme (SoundStream's Algorithm 1 with SimVQ stages):
residual_0 = x; stage k picks argmin_j ||residual_k - C'_kj||^2 over its implicit codebook
C'_k = code_transform_k(frozen_k) (fp64), residual_{k+1} = residual_k - q_k, output = sum_k q_k,
loss_k = commitment_weight * (1 + input_to_quantize_commit_loss_weight) * mean (residual_k - q_k)^2.
Quantize dropout keeps stages 0..last with last = randrange(cutoff, q) of `random.Random(seed)`,
rounded up so that last + 1 is a multiple of quantize_dropout_multiple_of (SoundStream/EnCodec);
dropped stages give index -1, zero codes and zero loss.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from dtype_matrix import Parts, dtype_matrix, run_cell
from reference import brute_force_usage, randn
from test_sim_vq import brute, implicit64
from vq_layers import ResidualSimVQ

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def greedy(rows, codebooks, kept=None, weight=1.25):
    """rows (N, d), codebooks [(K, d)] fp64 -> indices (N, q), codes (q, N, d), losses (q,), clear (N,)."""
    residual = rows.detach().to(F64)
    kept = len(codebooks) if kept is None else kept
    indices, codes, losses = [], [], []
    clear = torch.ones(rows.shape[0], dtype=torch.bool)
    for k, codebook in enumerate(codebooks):
        if k >= kept:
            indices.append(torch.full((rows.shape[0],), -1, dtype=torch.long))
            codes.append(torch.zeros_like(residual))
            losses.append(torch.zeros((), dtype=F64))
            continue
        idx, stage_clear = brute(residual, codebook)
        q = codebook.to(F64)[idx]
        losses.append(weight * (residual - q).square().mean())
        residual = residual - q
        indices.append(idx)
        codes.append(q)
        clear &= stage_clear
    return torch.stack(indices, -1), torch.stack(codes), torch.stack(losses), clear


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    return ResidualSimVQ(**dict(dict(dim=6, num_quantizers=3, codebook_size=16), **kwargs))


def tokens(x, channel_first):
    return (x.movedim(1, -1) if channel_first else x).reshape(-1, x.shape[1 if channel_first else -1])


@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_matches_greedy_fp64_reference(train, channel_first):
    layer = make(channel_first=channel_first).train(train)
    x = randn(*((2, 6, 4, 5) if channel_first else (2, 20, 6)), seed=1)
    out, indices, losses, all_codes = layer(x, return_all_codes=True)
    idx, codes, ref_losses, clear = greedy(tokens(x, channel_first), [implicit64(s) for s in layer.layers])
    assert clear.all()  # this batch has no near-tie: the losses are comparable
    assert indices.shape == ((2, 4, 5, 3) if channel_first else (2, 20, 3)) and indices.dtype == torch.long
    assert torch.equal(indices.reshape(-1, 3)[clear], idx[clear])
    ref_out = codes.sum(0)
    torch.testing.assert_close(tokens(out, channel_first)[clear].to(F64), ref_out[clear], rtol=1e-5, atol=1e-5)
    assert all_codes.shape == (3, *out.shape)
    stage_codes = torch.stack([tokens(c, channel_first) for c in all_codes])
    torch.testing.assert_close(stage_codes[:, clear].to(F64), codes[:, clear], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.to(F64), ref_losses, rtol=1e-4, atol=1e-6)
    assert losses.shape == (3,) and losses.dtype == torch.float32


@pytest.mark.parametrize("channel_first", [False, True])
def test_decoding_from_indices_equals_forward(channel_first):
    layer = make(channel_first=channel_first).eval()
    x = randn(*((2, 6, 3, 4) if channel_first else (2, 12, 6)), seed=2)
    out, indices, _, all_codes = layer(x, return_all_codes=True)
    assert torch.equal(layer.get_output_from_indices(indices), out)  # bitwise, fp32
    assert torch.equal(layer.get_codes_from_indices(indices), all_codes)
    # coarse indices (the first stage only) decode like dropped later stages
    coarse = layer.get_output_from_indices(indices[..., :1])
    assert torch.equal(coarse, all_codes[0])
    dropped = indices.clone()
    dropped[..., 1:] = -1
    assert torch.equal(layer.get_output_from_indices(dropped), coarse)
    assert layer.get_output_from_indices(indices, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("cutoff,multiple_of", [(0, 1), (1, 1), (0, 2)])
def test_quantize_dropout_drops_the_stages_after_the_drawn_one(cutoff, multiple_of):
    layer = make(num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=cutoff,
                 quantize_dropout_multiple_of=multiple_of).train()
    x = randn(2, 10, 6, seed=3)
    codebooks = [implicit64(s) for s in layer.layers]
    seen = set()
    for seed in range(12):
        last = random.Random(seed).randrange(cutoff, 4)
        last = math.ceil((last + 1) / multiple_of) * multiple_of - 1
        seen.add(last)
        out, indices, losses, all_codes = layer(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=seed)
        idx, codes, _, clear = greedy(x.reshape(-1, 6), codebooks, kept=last + 1)
        assert (indices[..., last + 1:] == -1).all() and (indices[..., : last + 1] >= 0).all()
        assert torch.equal(indices.reshape(-1, 4)[clear], idx[clear])
        assert (losses[last + 1:] == 0).all() and (losses[: last + 1] > 0).all()
        assert (all_codes[last + 1:] == 0).all()
        torch.testing.assert_close(out.reshape(-1, 6)[clear].to(F64), codes.sum(0)[clear], rtol=1e-5, atol=1e-5)
    assert len(seen) > 1  # the seeds drew different depths
    # no dropout in eval nor without gradients
    assert (layer.eval()(x)[1] >= 0).all()
    with torch.no_grad():
        assert (layer.train()(x)[1] >= 0).all()


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix(cell):
    snap = {}

    def forward(layer, x):
        snap["codebooks"] = [s.codebook.detach().float() for s in layer.layers]  # as forward sees them
        return layer(x, return_all_codes=True)

    def unpack(result):
        out, indices, losses, all_codes = result
        return Parts(out, indices=[indices], losses=[losses], others=[all_codes])

    # many codes and tokens: a search in half precision would pick other codes somewhere
    res = run_cell(cell, lambda: make(codebook_size=512), lambda dt: randn(4, 32, 6, seed=4).to(dt), forward=forward,
                   unpack=unpack)
    idx, _, _, clear = greedy(res.x.detach().reshape(-1, 6), snap["codebooks"])
    indices = res.parts.indices[0].reshape(-1, 3)
    # a half-precision input is exact in fp32; residuals are fp32 in the layer, fp64 here
    assert clear.float().mean() > 0.7
    assert torch.equal(indices[clear], idx[clear])
    assert res.parts.losses[0].shape == (3,) and res.parts.others[0].shape == (3, 4, 32, 6)


def test_same_indices_as_vector_quantize_pytorch():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=6, num_quantizers=3, codebook_size=16)
    torch.manual_seed(0)
    peer = peer_module.ResidualSimVQ(**kwargs).eval()
    ours = ResidualSimVQ(**kwargs).eval()
    ours.load_state_dict(peer.state_dict())
    x = randn(2, 16, 6, seed=5)
    p_out, p_idx, p_losses = peer(x)
    o_out, o_idx, o_losses = ours(x)
    assert torch.equal(o_idx, p_idx)
    torch.testing.assert_close(o_out, p_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_losses, p_losses, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_and_shared_transform():
    layer, other = make(seed=0).eval(), make(seed=1).eval()
    x = randn(2, 8, 6, seed=6)
    assert not torch.equal(layer(x)[1], other(x)[1])
    other.load_state_dict(layer.state_dict())
    for a, b in zip(layer(x), other(x)):
        assert torch.equal(a, b)
    transform = nn.Linear(6, 6, bias=False)
    shared = make(codebook_transform=transform)
    assert all(s.code_transform is transform for s in shared.layers)
    assert not torch.equal(shared.layers[0].frozen_codebook, shared.layers[1].frozen_codebook)
    assert shared.codebooks.shape == (3, 16, 6)


def test_code_usage_per_stage():
    layer = make().eval()
    _, indices, _ = layer(randn(2, 30, 6, seed=7))
    indices[0, :5, 2] = -1  # dropped or masked: counted nowhere
    usage = layer.code_usage(indices)
    for k in range(3):
        perplexity, fraction, used = brute_force_usage(indices[..., k], 16)
        assert usage.perplexity[k].item() == pytest.approx(perplexity, rel=1e-5)
        assert usage.usage[k].item() == pytest.approx(fraction) and usage.codes_used[k].item() == used


@pytest.mark.parametrize("train", [False, True])
def test_empty_batch(train):
    layer = make().train(train)
    out, indices, losses = layer(torch.zeros(0, 4, 6, requires_grad=True))
    assert out.shape == (0, 4, 6) and indices.shape == (0, 4, 3) and torch.equal(losses, torch.zeros(3))


@pytest.mark.parametrize("kwargs,name", [
    (dict(heads=2), "heads"),
    (dict(num_quantizers=0), "num_quantizers"),
    (dict(quantize_dropout_cutoff_index=3), "quantize_dropout_cutoff_index"),
    (dict(quantize_dropout_multiple_of=0), "quantize_dropout_multiple_of"),
    (dict(commitment_weight=-1.0), "commitment_weight"),
])
def test_bad_config_raises_naming_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make(**kwargs)


def test_bad_inputs_raise_naming_the_argument():
    layer = make()
    with pytest.raises(ValueError, match="dim"):
        layer(randn(2, 5, 7))
    with pytest.raises(ValueError, match="indices"):
        layer.get_output_from_indices(torch.tensor([[[0, 16, 0]]]))
    with pytest.raises(ValueError, match="indices"):
        layer.get_output_from_indices(torch.tensor([[[0, 1, 2, 3]]]))
    with pytest.raises(ValueError, match="indices"):
        layer.get_codes_from_indices(torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="indices"):
        layer.get_codes_from_indices(torch.tensor([[[0.0, 1.0, 2.0]]]))
