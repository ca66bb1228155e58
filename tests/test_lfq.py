"""LFQ against an fp64 re-implementation of the papers' formulas, the peer package, the dtype matrix.

The reference (`reference`) is written here from the description of the scheme (MAGVIT-v2,
arXiv 2310.05737; BSQ, arXiv 2406.07548), not from the code under test:

- z = project_in(x) (fp64 with the layer's weights), split as (c d), optionally rotated
  (z @ R) and, with `spherical`, L2-normalized per codebook and scaled by codebook_scale;
- code_i = +v if z_i > 0 else -v, v = codebook_scale (or codebook_scale / sqrt(d) on the sphere);
  index = sum_i (z_i > 0) 2^(d-1-i), most significant bit first;
- entropies by brute force over all 2^d codes: p(k | token) = softmax_k(2 T <z, code_k>);
  per-sample = mean over tokens (and codebooks) of H(p(. | token)), batch = mean over codebooks
  of H(mean over tokens of p); commitment = mean (z - code)^2 over kept tokens;
- aux = (per_sample - gamma * batch) * entropy_loss_weight + commitment * commitment_loss_weight.

The op computing the entropies is tested exactly in tests/test_lfq_entropy.py; here the layer's
plumbing around it (the logit factor, masks, codebooks, weights, spherical scale) is checked.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dtype_matrix import dtype_matrix, run_cell
from lfq_reference import all_codes, code_value, reference
from reference import close, linear64, randn
from vq_layers import LFQ, ResidualLFQ

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# codes and indices against the reference


CONFIGS = {
    "plain_d6": dict(dim=6),
    "proj": dict(dim=16, codebook_size=2**5),
    "codebooks2": dict(dim=8, codebook_size=2**4, num_codebooks=2),
    "codebooks2_proj": dict(dim=20, codebook_size=2**3, num_codebooks=2),
    "spherical": dict(dim=5, spherical=True),
    "spherical_scaled": dict(dim=12, codebook_size=2**4, spherical=True, codebook_scale=0.5),
    "scale": dict(dim=4, codebook_scale=0.25),
    "rotation": dict(dim=5, orthogonal_rotation=True),
    "rotation_codebooks2": dict(dim=6, codebook_size=2**3, num_codebooks=2, orthogonal_rotation=True),
    "soft_clamp": dict(dim=4, soft_clamp_input_value=1.5),
    "keep_dim": dict(dim=4, keep_num_codebooks_dim=True),
    "forced_proj": dict(dim=4, has_projections=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_indices_and_output_match_reference(name):
    torch.manual_seed(0)
    layer = LFQ(**CONFIGS[name]).eval()
    x = randn(3, 40, layer.dim, seed=1, scale=1.5)
    (out, indices, aux), breakdown = layer(x, return_loss_breakdown=True)
    ref = reference(layer, x)
    assert indices.dtype == torch.long and out.dtype == torch.float32
    assert indices.shape == ref["indices"].shape
    clear = ref["margin"] > 1e-4
    assert clear.float().mean() > 0.8
    assert torch.equal(indices[clear], ref["indices"][clear])
    close(out[clear], ref["out"][clear], rtol=1e-5, atol=1e-5)
    # eval: no losses at all
    assert aux.dtype == torch.float32 and aux.item() == 0
    assert all(t.item() == 0 and t.dtype == torch.float32 for t in breakdown)


def test_index_is_the_sign_bit_pattern_msb_first():
    layer = LFQ(dim=4).eval()
    x = torch.tensor([[[0.3, -1.0, -0.2, 2.0], [-1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0],
                       [-0.5, 0.0, 0.0, 1e-30], [1.0, 0.0, 0.0, -1.0]]])
    out, indices, _ = layer(x)
    assert indices.tolist() == [[0b1001, 0, 15, 0b0001, 0b1000]]  # z == 0 -> bit 0
    expected = torch.where(x > 0, 1.0, -1.0)
    assert torch.equal(out, expected)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 12), c=st.integers(1, 3), scale=st.sampled_from([0.5, 1.0, 3.0]),
       spherical=st.booleans(), seed=st.integers(0, 2**16))
def test_eval_property_sign_bits(d, c, scale, spherical, seed):
    layer = LFQ(dim=d * c, codebook_size=2**d, num_codebooks=c, codebook_scale=scale, spherical=spherical).eval()
    x = randn(2, 9, d * c, seed=seed)
    out, indices, _ = layer(x)
    ref = reference(layer, x)
    clear = ref["margin"] > 1e-6
    assert torch.equal(indices[clear], ref["indices"][clear])
    assert indices.min() >= 0 and indices.max() < 2**d
    close(out[clear], ref["out"][clear], rtol=1e-6, atol=1e-7)
    # |code| per dimension
    expected_abs = scale / math.sqrt(d) if spherical else scale
    close(out.abs(), torch.full_like(out, expected_abs, dtype=F64), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------
# layouts


def test_layouts():
    torch.manual_seed(0)
    layer = LFQ(dim=12, codebook_size=2**4).eval()
    image = randn(2, 12, 5, 6, seed=2)
    out, indices, _ = layer(image)
    assert out.shape == image.shape and indices.shape == (2, 5, 6)
    tokens = image.flatten(2).transpose(1, 2)  # (b, h*w, d): the same tokens
    tok_out, tok_indices, _ = layer(tokens)
    assert torch.equal(tok_indices.reshape(2, 5, 6), indices)
    assert torch.equal(tok_out.transpose(1, 2).reshape(image.shape), out)
    ref = reference(layer, tokens)
    clear = ref["margin"] > 1e-4
    assert torch.equal(tok_indices[clear], ref["indices"][clear])

    video = randn(1, 12, 2, 3, 4, seed=3)
    out, indices, _ = layer(video)
    assert out.shape == video.shape and indices.shape == (1, 2, 3, 4)
    assert torch.equal(layer.indices_to_codes(indices), out)

    seq_first = LFQ(dim=12, codebook_size=2**4, channel_first=True).eval()
    seq_first.load_state_dict(layer.state_dict())
    seq = randn(2, 12, 7, seed=4)
    out, indices, _ = seq_first(seq)
    assert out.shape == seq.shape and indices.shape == (2, 7)
    assert torch.equal(indices, layer(seq.transpose(1, 2))[1])
    assert torch.equal(seq_first.indices_to_codes(indices), out)

    single_out, single_indices, _ = layer(randn(3, 12, seed=5))  # (b, d) tokens
    assert single_out.shape == (3, 12) and single_indices.shape == (3,)

    multi = LFQ(dim=8, codebook_size=2**4, num_codebooks=2).eval()
    out, indices, _ = multi(randn(2, 8, 3, 4, seed=6))
    assert indices.shape == (2, 3, 4, 2)


# ------------------------------------------------------------------------------------------
# training losses against the brute force


LOSS_CONFIGS = {
    "plain": (dict(dim=5), 100.0),
    "low_temperature": (dict(dim=5), 0.7),
    "codebooks2": (dict(dim=6, codebook_size=2**3, num_codebooks=2), 1.0),
    "spherical": (dict(dim=4, spherical=True), 1.0),
    "spherical_scaled_hot": (dict(dim=6, spherical=True, codebook_scale=2.0), 30.0),
    "proj_weights": (dict(dim=12, codebook_size=2**5, entropy_loss_weight=0.3, diversity_gamma=2.5,
                          commitment_loss_weight=0.7), 0.5),
    "scale_commit": (dict(dim=4, codebook_scale=0.25, commitment_loss_weight=1.0), 3.0),
    "spherical_commit": (dict(dim=5, spherical=True, commitment_loss_weight=0.5), 2.0),
    "rotation": (dict(dim=5, orthogonal_rotation=True, commitment_loss_weight=0.2), 1.0),
    "soft_clamp": (dict(dim=4, soft_clamp_input_value=1.2, commitment_loss_weight=0.2), 1.0),
    "softplus": (dict(dim=5, experimental_softplus_entropy_loss=True, entropy_loss_offset=0.3), 1.0),
    "d8": (dict(dim=8), 0.2),
}


@pytest.mark.parametrize("name", list(LOSS_CONFIGS))
def test_training_losses_match_brute_force(name):
    kwargs, T = LOSS_CONFIGS[name]
    torch.manual_seed(0)
    layer = LFQ(**kwargs).train()
    x = randn(2, 37, layer.dim, seed=7)
    (out, indices, aux), breakdown = layer(x, inv_temperature=T, return_loss_breakdown=True)
    ref = reference(layer, x, T)
    assert aux.dtype == torch.float32 and aux.shape == ()
    close(breakdown.per_sample_entropy, ref["per_sample"], rtol=1e-4, atol=1e-5)
    close(breakdown.batch_entropy, ref["batch"], rtol=1e-4, atol=1e-5)
    if layer.commitment_loss_weight > 0:
        close(breakdown.commitment, ref["commitment"], rtol=1e-5, atol=1e-6)
    close(aux, ref["aux"], rtol=1e-4, atol=1e-5)
    # the losses are not trivially zero: a test that can fail
    assert ref["batch"] > 0.1
    # training output values are the codes, exactly as in eval
    eval_out, eval_indices, _ = layer.eval()(x)
    assert torch.equal(indices, eval_indices) and torch.equal(out, eval_out)


def test_eval_losses_are_zero_even_with_softplus_and_commitment():
    layer = LFQ(dim=5, experimental_softplus_entropy_loss=True, commitment_loss_weight=1.0).eval()
    (_, _, aux), breakdown = layer(randn(2, 10, 5, seed=8), return_loss_breakdown=True)
    assert aux.item() == 0 and aux.dtype == torch.float32
    assert [t.item() for t in breakdown] == [0, 0, 0]


def test_spherical_logit_factor_is_four_t_code_value():
    """The bit logits are 4 T |code| z_i: with the factor off by 2 the entropies would differ."""
    layer = LFQ(dim=3, spherical=True, codebook_scale=1.0).train()
    x = randn(1, 50, 3, seed=9)
    T = 0.8
    _, breakdown = layer(x, inv_temperature=T, return_loss_breakdown=True)
    z = F.normalize(x.to(F64), dim=-1)
    v = 1 / math.sqrt(3)
    p1 = torch.sigmoid(4 * T * v * z)  # p(bit = 1), bits independent
    h = -(torch.special.xlogy(p1, p1) + torch.special.xlogy(1 - p1, 1 - p1)).sum(-1).mean()
    close(breakdown.per_sample_entropy, h, rtol=1e-5, atol=1e-6)
    wrong = torch.sigmoid(2 * T * v * z)
    h_wrong = -(torch.special.xlogy(wrong, wrong) + torch.special.xlogy(1 - wrong, 1 - wrong)).sum(-1).mean()
    assert abs(h - h_wrong) > 1e-2  # the check above discriminates


def test_returncall_structure():
    layer = LFQ(dim=4).train()
    ret = layer(randn(2, 3, 4, seed=10))
    assert type(ret).__name__ == "Return" and ret._fields == ("quantized", "indices", "entropy_aux_loss")
    ret, breakdown = layer(randn(2, 3, 4, seed=10), return_loss_breakdown=True)
    assert type(ret).__name__ == "Return"
    assert type(breakdown).__name__ == "LossBreakdown"
    assert breakdown._fields == ("per_sample_entropy", "batch_entropy", "commitment")
    assert all(t.dtype == torch.float32 and t.shape == () for t in breakdown)


# gradients


def surrogate64(layer, x, activation=lambda t: t):
    """fp64 straight-through surrogate: the output with every code replaced by act(z)."""
    z = linear64(layer.project_in, x) if layer.has_projections else x
    z = z.reshape(*z.shape[:-1], layer.num_codebooks, layer.codebook_dim)
    if layer.orthogonal_rotation:
        z = z @ layer.orthogonal_rot.to(F64)
    if layer.spherical:
        z = F.normalize(z, dim=-1) * layer.codebook_scale
    q = activation(z)
    if layer.orthogonal_rotation:
        q = q @ layer.orthogonal_rot.to(F64).t()
    q = q.reshape(*q.shape[:-2], -1)
    return linear64(layer.project_out, q) if layer.has_projections else q


@pytest.mark.parametrize(
    "kwargs,activation",
    [
        (dict(dim=6), None),
        (dict(dim=10, codebook_size=2**4), None),
        (dict(dim=6, codebook_size=2**3, num_codebooks=2, orthogonal_rotation=True), None),
        (dict(dim=5, spherical=True), None),
        (dict(dim=5), "tanh"),
    ],
    ids=["identity", "proj", "codebooks_rotation", "spherical", "tanh_activation"],
)
def test_straight_through_gradient_matches_reference(kwargs, activation):
    torch.manual_seed(0)
    act_module = nn.Tanh() if activation == "tanh" else nn.Identity()
    layer = LFQ(**kwargs, straight_through_activation=act_module).train()
    x = randn(2, 11, layer.dim, seed=18).requires_grad_(True)
    weights = randn(2, 11, layer.dim, seed=19)
    out, _, _ = layer(x)
    (out * weights).sum().backward()
    x64 = x.detach().to(F64).requires_grad_(True)
    act = torch.tanh if activation == "tanh" else (lambda t: t)
    (surrogate64(layer, x64, act) * weights.to(F64)).sum().backward()
    close(x.grad, x64.grad, rtol=1e-5, atol=1e-6)
    assert x.grad.abs().sum() > 0
    if activation is None and not (layer.has_projections or layer.spherical or layer.orthogonal_rotation):
        assert torch.equal(x.grad, weights)  # identity, exactly


@pytest.mark.parametrize(
    "kwargs,T,scale",
    [
        (dict(dim=5), 1.0, 1.0),
        (dict(dim=5), 100.0, 0.01),
        (dict(dim=10, codebook_size=2**4, commitment_loss_weight=0.5, diversity_gamma=1.5), 0.5, 1.0),
        (dict(dim=4, spherical=True, commitment_loss_weight=0.3), 2.0, 1.0),
        (dict(dim=6, codebook_size=2**3, num_codebooks=2), 1.0, 1.0),
    ],
    ids=["plain", "hot_small_inputs", "proj_commit", "spherical", "codebooks2"],
)
def test_loss_gradient_matches_brute_force(kwargs, T, scale):
    torch.manual_seed(0)
    layer = LFQ(**kwargs).train()
    x = randn(2, 13, layer.dim, seed=20, scale=scale).requires_grad_(True)
    _, _, aux = layer(x, inv_temperature=T)
    aux.backward()
    x64 = x.detach().to(F64).requires_grad_(True)
    ref = reference(layer, x64, T)
    ref["aux"].backward()
    assert x64.grad.abs().max() > 1e-4  # the losses do depend on the input here
    close(x.grad, x64.grad, rtol=1e-4, atol=1e-6 * float(x64.grad.abs().max()) + 1e-8)
    if layer.has_projections:
        assert layer.project_in.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# indices -> codes


@pytest.mark.parametrize(
    "kwargs,image",
    [
        (dict(dim=6), False),
        (dict(dim=16, codebook_size=2**5), False),
        (dict(dim=16, codebook_size=2**5), True),
        (dict(dim=8, codebook_size=2**4, num_codebooks=2), True),
        (dict(dim=12, codebook_size=2**3, num_codebooks=2), False),
        (dict(dim=5, spherical=True, codebook_scale=0.7), True),
        (dict(dim=6, orthogonal_rotation=True), False),
        (dict(dim=12, codebook_size=2**4, num_codebooks=2, orthogonal_rotation=True, spherical=True), True),
    ],
    ids=["plain", "proj", "proj_image", "codebooks2_image", "codebooks2_proj", "spherical_image", "rotation",
         "all_image"],
)
def test_quantized_equals_indices_to_codes_in_eval(kwargs, image):
    torch.manual_seed(0)
    layer = LFQ(**kwargs).eval()
    x = randn(2, layer.dim, 3, 5, seed=21) if image else randn(2, 17, layer.dim, seed=21)
    out, indices, _ = layer(x)
    codes = layer.indices_to_codes(indices)
    assert codes.shape == out.shape
    assert torch.equal(codes, out)
    raw = layer.indices_to_codes(indices, project_out=False)
    assert raw.shape[-1 if not image else 1] == layer.codebook_dim * layer.num_codebooks


def test_codebook_property():
    layer = LFQ(dim=4, codebook_scale=0.5)
    torch.testing.assert_close(layer.codebook.to(F64), all_codes(4, 0.5), rtol=0, atol=0)
    sph = LFQ(dim=4, spherical=True)
    torch.testing.assert_close(sph.codebook.to(F64), all_codes(4, 0.5), rtol=1e-7, atol=0)  # 1/sqrt(4)


# ------------------------------------------------------------------------------------------
# configuration and input errors


@pytest.mark.parametrize("size,suggestion", [(1000, 1024), (3, 4), (2**16 + 1, 2**17), (100, 128)])
def test_codebook_size_not_power_of_two(size, suggestion):
    with pytest.raises(ValueError, match=rf"codebook_size.*{suggestion}"):
        LFQ(codebook_size=size)


@pytest.mark.parametrize("size", [1, 0, -4, 2.0, True])
def test_codebook_size_invalid(size):
    with pytest.raises(ValueError, match="codebook_size"):
        LFQ(codebook_size=size)


def test_bad_configuration():
    with pytest.raises(ValueError, match="dim"):
        LFQ()
    with pytest.raises(ValueError, match=r"\bdim\b"):
        LFQ(dim=10, codebook_size=2**4, has_projections=False)
    with pytest.raises(ValueError, match=r"\bdim\b"):
        LFQ(dim=0)
    with pytest.raises(ValueError, match="num_codebooks"):
        LFQ(dim=8, num_codebooks=0)
    with pytest.raises(ValueError, match="keep_num_codebooks_dim"):
        LFQ(dim=8, codebook_size=2**4, num_codebooks=2, keep_num_codebooks_dim=False)
    with pytest.raises(ValueError, match="soft_clamp_input_value"):
        LFQ(dim=4, codebook_scale=2.0, soft_clamp_input_value=1.0)
    with pytest.raises(ValueError, match="frac_per_sample_entropy"):
        LFQ(dim=4, frac_per_sample_entropy=0.0)


def test_wrong_feature_dim_raises():
    layer = LFQ(dim=16, codebook_size=2**4)
    with pytest.raises(ValueError, match="dim 16.*got 12"):
        layer(randn(2, 5, 12))
    with pytest.raises(ValueError, match="dim"):
        layer(randn(2, 12, 4, 4))  # channel-first image with the wrong channel count
    with pytest.raises(ValueError):
        layer(randn(16))


def test_bad_indices_raise():
    layer = LFQ(dim=4)
    with pytest.raises(ValueError, match=r"indices.*\[0, 16\)"):
        layer.indices_to_codes(torch.tensor([[0, 16]]))
    with pytest.raises(ValueError, match="indices"):
        layer.indices_to_codes(torch.tensor([[-2, 3]]))  # -1 is no code (zeros)
    with pytest.raises(TypeError, match="indices"):
        layer.indices_to_codes(torch.tensor([[0.0, 3.0]]))
    multi = LFQ(dim=8, codebook_size=2**4, num_codebooks=2)
    with pytest.raises(ValueError, match="indices"):
        multi.indices_to_codes(torch.tensor([[[0, 16]]]))


# ------------------------------------------------------------------------------------------
# large configurations


def test_dim_256_alone_splits_into_codebooks_of_2_16():
    """LFQ(dim=256): 2^256 codes fit no int64 index; documented as 16 codebooks of 2^16."""
    layer = LFQ(dim=256).eval()
    assert layer.num_codebooks * layer.codebook_dim == 256 and not layer.has_projections
    assert layer.codebook_size == 2**16 and layer.num_codebooks == 16
    x = randn(2, 3, 256, seed=22)
    out, indices, _ = layer(x)
    assert indices.shape == (2, 3, 16)
    bits = (x > 0).long().reshape(2, 3, 16, 16)
    assert torch.equal(indices, (bits * 2 ** torch.arange(15, -1, -1)).sum(-1))
    assert torch.equal(out, torch.where(x > 0, 1.0, -1.0))
    assert torch.equal(layer.indices_to_codes(indices), out)


@pytest.mark.parametrize("autocast", [False, True], ids=["no_autocast", "cpu_bf16_autocast"])
def test_tokenizer_signature_bf16_input_on_fp32_module(autocast):
    """LFQ(dim=256, codebook_size=2**16) as tokenizers use it: bf16 activations, fp32 weights."""
    torch.manual_seed(0)
    layer = LFQ(dim=256, codebook_size=2**16).train()
    x = randn(2, 24, 256, seed=23).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        (out, indices, aux), breakdown = layer(x, return_loss_breakdown=True)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out).all()
    assert aux.dtype == torch.float32 and aux.shape == () and torch.isfinite(aux)
    assert all(t.dtype == torch.float32 for t in breakdown)
    assert indices.dtype == torch.long and indices.shape == (2, 24)
    assert indices.min() >= 0 and indices.max() < 2**16
    (out.float().square().mean() + aux).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the codes are those of the fp32 projection of the input values (up to bf16 rounding of it)
    ref = reference(layer, x.detach())
    bits = (indices[..., None] >> torch.arange(15, -1, -1)) & 1
    ref_bits = (ref["indices"][..., None] >> torch.arange(15, -1, -1)) & 1
    clear = ref["z"][..., 0, :].abs() > (0.05 if autocast else 1e-4)
    assert torch.equal(bits[clear], ref_bits[clear])
    if not autocast:  # a bf16 input meets fp32 weights: the fp32 path, exactly
        out32, indices32, _ = layer.eval()(x.detach().float())
        assert torch.equal(indices, indices32)
        assert torch.equal(out, out32.bfloat16())


def test_codebook_too_large_to_build_raises():
    with pytest.raises(ValueError, match="codebook"):
        LFQ(dim=24).codebook


@pytest.mark.parametrize("shape", [(2, 0, 6), (0, 5, 6)], ids=["n0", "b0"])
def test_empty_batch_gives_zero_losses(shape):
    layer = LFQ(dim=6, commitment_loss_weight=1.0).train()
    x = randn(*shape, seed=34).requires_grad_(True)
    (out, indices, aux), breakdown = layer(x, return_loss_breakdown=True)
    assert out.shape == x.shape and indices.shape == shape[:-1]
    assert aux.item() == 0 and [t.item() for t in breakdown] == [0, 0, 0]
    (out.sum() + aux).backward()


# ------------------------------------------------------------------------------------------
# the dtype matrix


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_with_projections(cell):
    result = run_cell(cell, lambda: LFQ(dim=16, codebook_size=2**8),
                      lambda dtype: randn(2, 16, 4, 4, seed=24).to(dtype))
    (indices,) = result.parts.indices
    assert indices.shape == (2, 4, 4)
    assert indices.min() >= 0 and indices.max() < 2**8
    assert result.parts.output.shape == (2, 16, 4, 4)
    assert len(result.parts.losses) == 1


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_indices_are_sign_bits_of_the_input(cell):
    """Without projections the indices depend on the input values alone, in every cell."""
    result = run_cell(cell, lambda: LFQ(dim=8, commitment_loss_weight=0.1),
                      lambda dtype: randn(2, 8, 3, 5, seed=25).to(dtype))
    (indices,) = result.parts.indices
    values = result.x.detach().float().cpu().permute(0, 2, 3, 1)  # (b, h, w, d)
    expected = ((values > 0).long() * 2 ** torch.arange(7, -1, -1)).sum(-1)
    assert torch.equal(indices.cpu(), expected)
    out = result.parts.output.detach().float().cpu().permute(0, 2, 3, 1)
    assert torch.equal(out, torch.where(values > 0, 1.0, -1.0))


# ------------------------------------------------------------------------------------------
# state, compile, usage


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = LFQ(dim=16, codebook_size=2**5, orthogonal_rotation=True).eval()
    torch.manual_seed(1)
    b = LFQ(dim=16, codebook_size=2**5, orthogonal_rotation=True).eval()
    x = randn(2, 9, 16, seed=26)
    out_a, indices_a, _ = a(x)
    assert not torch.equal(b(x)[0], out_a)  # a fresh instance really differs
    assert set(a.state_dict()) >= {"mask", "orthogonal_rot", "project_in.weight", "project_out.weight"}
    b.load_state_dict(a.state_dict())
    out_b, indices_b, _ = b(x)
    assert torch.equal(out_a, out_b) and torch.equal(indices_a, indices_b)
    half = LFQ(dim=16, codebook_size=2**5, orthogonal_rotation=True).half()
    half.load_state_dict(a.state_dict())
    assert half.orthogonal_rot.dtype == torch.float32 and half.project_in.weight.dtype == torch.float16
    assert half.mask.dtype == torch.long
    assert torch.equal(half.orthogonal_rot, a.orthogonal_rot)


def test_bit_values_keep_the_checkpoint_key_mask():
    """The bit values are the buffer `bit_values`; state dicts keep the key `mask` (the peer's
    persistent buffer, and this layer's name before the rename), so checkpoints saved before the
    rename load strictly, the peer loads ours, and errors name the checkpoint's key."""
    layer = LFQ(dim=4, codebook_size=2**4)
    assert torch.equal(layer.bit_values, torch.tensor([8, 4, 2, 1])) and layer.mask is layer.bit_values
    assert list(layer.state_dict()) == ["mask"]
    before_rename = {"mask": torch.tensor([8, 4, 2, 1])}  # what LFQ(dim=4) saved until the rename
    assert not any(LFQ(dim=4).load_state_dict(before_rename))  # strict
    assert LFQ(dim=4).load_state_dict({}, strict=False).missing_keys == ["mask"]
    with pytest.raises(RuntimeError, match=r"size mismatch for mask: .*\[3\]"):
        LFQ(dim=4).load_state_dict({"mask": torch.tensor([4, 2, 1])})
    residual = ResidualLFQ(dim=4, num_quantizers=2, codebook_size=2**4)
    assert [k for k in residual.state_dict() if "mask" in k or "bit_values" in k] == ["layers.0.mask", "layers.1.mask"]
    residual.load_state_dict({f"layers.{k}.mask": torch.tensor([8, 4, 2, 1]) for k in range(2)})  # strict


@pytest.mark.parametrize("kwargs,shape", [(dict(dim=16, codebook_size=2**8), (2, 16, 4, 4)),
                                          (dict(dim=8, codebook_size=2**4, num_codebooks=2, spherical=True,
                                                orthogonal_rotation=True), (2, 5, 8))],
                         ids=["proj_image", "codebooks_spherical_rotation"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "sample_mask"])
def test_compile_fullgraph_eval_forward(kwargs, shape, masked):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LFQ(**kwargs).eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = randn(*shape, seed=27)
    mask = torch.tensor([False, True]) if masked else None
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            eager = layer(x, mask=mask)
            got = compiled(x, mask=mask)
        assert torch.equal(got.indices, eager.indices)
        assert got.quantized.dtype == eager.quantized.dtype
        torch.testing.assert_close(got.quantized, eager.quantized)
        assert got.entropy_aux_loss.item() == 0
        if masked:
            assert (got.indices[0] == -1).all() and (got.quantized[0] == 0).all()


COMPILE_MASKS = {
    "no_mask": None,
    "samples": torch.tensor([True, False, True]),
    "tokens": randn(3, 10, seed=36) > 0,
}


@pytest.mark.parametrize("mask", list(COMPILE_MASKS))
@pytest.mark.parametrize("inv_temperature", [100.0, 0.3], ids=["sparse_tokens", "dense_tokens"])
def test_compile_fullgraph_training_forward_and_backward(inv_temperature, mask):
    """The entropy's code mass is a torch.library op (its data-dependent split into sparse and
    dense tokens runs inside it), and a mask selects the kept tokens in place (no boolean
    indexing): the training forward and backward compile without a break."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LFQ(dim=20, codebook_size=2**8, num_codebooks=2, entropy_loss_weight=0.5,
                commitment_loss_weight=0.25).train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    mask = COMPILE_MASKS[mask]
    for autocast in (False, True):
        results = []
        for module in (layer, compiled):
            x = randn(3, 10, 20, seed=28).requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = module(x, inv_temperature=inv_temperature, mask=mask)
            (out.quantized.float().square().sum() + out.entropy_aux_loss).backward()
            results.append((out, x.grad, layer.project_in.weight.grad.clone()))
            layer.zero_grad()
        (want, *want_grads), (got, *got_grads) = results
        assert torch.equal(got.indices, want.indices)
        if mask is not None:
            dropped = ~mask
            assert (got.indices[dropped] == -1).all() and (got_grads[0][dropped] == 0).all()
        assert got.entropy_aux_loss.item() != 0
        torch.testing.assert_close(got.entropy_aux_loss, want.entropy_aux_loss)
        torch.testing.assert_close(got.quantized, want.quantized)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w)


def test_code_usage_against_counting():
    layer = LFQ(dim=3)
    indices = torch.tensor([[0, 0, 1, 1, 1, 7], [7, 7, 7, 5, 5, 3]])
    usage = layer.code_usage(indices)
    counts = Counter(indices.flatten().tolist())
    probs = torch.tensor(list(counts.values()), dtype=F64) / indices.numel()
    assert usage.codes_used.item() == len(counts) == 5
    assert usage.usage.item() == pytest.approx(5 / 8)
    assert usage.perplexity.item() == pytest.approx(torch.exp(-(probs * probs.log()).sum()).item(), rel=1e-6)
    # from a forward pass, several codebooks pooled
    multi = LFQ(dim=8, codebook_size=2**4, num_codebooks=2).eval()
    _, idx, _ = multi(randn(3, 30, 8, seed=28))
    counts = Counter(idx.flatten().tolist())
    n = idx.numel()
    ppl = math.exp(-sum(c / n * math.log(c / n) for c in counts.values()))
    usage = multi.code_usage(idx)
    assert usage.codes_used.item() == len(counts)
    assert usage.usage.item() == pytest.approx(len(counts) / 16)
    assert usage.perplexity.item() == pytest.approx(ppl, rel=1e-5)


# ------------------------------------------------------------------------------------------
# drop-in for vector-quantize-pytorch


PEER_CONFIGS = {
    "plain": dict(dim=6),
    "proj": dict(dim=16, codebook_size=2**5),
    "proj_no_bias": dict(dim=16, codebook_size=2**5, projection_has_bias=False),
    "codebooks2": dict(dim=8, codebook_size=2**4, num_codebooks=2),
    "spherical": dict(dim=5, spherical=True, codebook_scale=0.5),
    "rotation": dict(dim=6, orthogonal_rotation=True),
    "soft_clamp_commit": dict(dim=4, soft_clamp_input_value=1.5, commitment_loss_weight=0.5),
    "cosine_sim_in": dict(dim=16, codebook_size=2**4, cosine_sim_project_in=True),
    "channel_first": dict(dim=12, codebook_size=2**4, channel_first=True),
}


@pytest.mark.parametrize("name", list(PEER_CONFIGS))
@pytest.mark.parametrize("direction", ["peer_to_ours", "ours_to_peer"])
def test_same_codes_as_vector_quantize_pytorch(name, direction):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = PEER_CONFIGS[name]
    torch.manual_seed(0)
    ours, peer = LFQ(**kwargs).eval(), peer_module.LFQ(**kwargs).eval()
    if direction == "peer_to_ours":
        ours.load_state_dict(peer.state_dict())  # strict
    else:
        peer.load_state_dict(ours.state_dict())  # strict
    assert set(ours.state_dict()) == set(peer.state_dict())
    x = randn(2, kwargs["dim"], 3, 4, seed=29) if name != "channel_first" else randn(2, 12, 7, seed=29)
    ours_ret, peer_ret = ours(x), peer(x)
    assert type(ours_ret).__name__ == type(peer_ret).__name__ and ours_ret._fields == peer_ret._fields
    assert torch.equal(ours_ret.indices, peer_ret.indices.long())
    assert ours_ret.quantized.shape == peer_ret.quantized.shape
    torch.testing.assert_close(ours_ret.quantized, peer_ret.quantized, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.indices_to_codes(ours_ret.indices), peer.indices_to_codes(peer_ret.indices),
                               rtol=1e-6, atol=1e-6)
    assert ours.codebook_size == peer.codebook_size and ours.codebook_dim == peer.codebook_dim
    assert ours.has_projections == peer.has_projections


@pytest.mark.parametrize(
    "kwargs,T",
    [
        (dict(dim=4), 0.3),
        (dict(dim=12, codebook_size=2**4, diversity_gamma=2.0, entropy_loss_weight=0.5,
              commitment_loss_weight=0.25), 0.2),
        (dict(dim=4, spherical=True), 1.0),
        (dict(dim=4, experimental_softplus_entropy_loss=True), 0.3),
        (dict(dim=6, codebook_size=2**3, num_codebooks=2), 0.3),
    ],
    ids=["plain", "proj_weights_commit", "spherical", "softplus", "codebooks2"],
)
def test_same_losses_as_vector_quantize_pytorch_where_its_clamp_does_not_bite(kwargs, T):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    ours, peer = LFQ(**kwargs).train(), peer_module.LFQ(**kwargs).train()
    ours.load_state_dict(peer.state_dict())
    x = randn(2, 23, kwargs["dim"], seed=30)
    # precondition: every probability is above the peer's 1e-5 clamp
    ref = reference(ours, x, T)
    z = ref["z"].reshape(-1, ours.num_codebooks, ours.codebook_dim)
    probs = (2 * T * z @ all_codes(ours.codebook_dim, code_value(ours)).t()).softmax(-1)
    assert probs.min() > 1e-5
    (o_ret, o_loss) = ours(x, inv_temperature=T, return_loss_breakdown=True)
    (p_ret, p_loss) = peer(x, inv_temperature=T, return_loss_breakdown=True)
    assert torch.equal(o_ret.indices, p_ret.indices.long())
    torch.testing.assert_close(o_ret.quantized, p_ret.quantized, rtol=1e-6, atol=1e-6)
    assert o_loss._fields == p_loss._fields
    for a, b in zip(o_loss, p_loss):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o_ret.entropy_aux_loss, p_ret.entropy_aux_loss, rtol=1e-4, atol=1e-5)


def test_peer_clamp_is_not_copied_at_high_temperature():
    """At T=100 the peer's clamp of probabilities at 1e-5 bites; ours stays with the brute force."""
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    ours, peer = LFQ(dim=8).train(), peer_module.LFQ(dim=8).train()
    x = randn(2, 30, 8, seed=31, scale=0.03)
    _, o_loss = ours(x, return_loss_breakdown=True)
    _, p_loss = peer(x, return_loss_breakdown=True)
    ref = reference(ours, x, 100.0)
    for name in ("per_sample", "batch"):
        expected = ref[name].item()
        ours_err = abs(getattr(o_loss, f"{name}_entropy").item() - expected) / expected
        peer_err = abs(getattr(p_loss, f"{name}_entropy").item() - expected) / expected
        assert ours_err < 2e-6, (name, ours_err)
        assert peer_err > 5e-6 and peer_err > 10 * ours_err, (name, peer_err, ours_err)  # the clamp's bias


def test_peer_keywords_construct():
    """Every keyword of the peer's LFQ.__init__ and forward is accepted."""
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    import inspect

    peer_init = set(inspect.signature(peer_module.LFQ.__init__).parameters) - {"self"}
    ours_init = set(inspect.signature(LFQ.__init__).parameters) - {"self"}
    assert peer_init <= ours_init, peer_init - ours_init
    peer_fwd = set(inspect.signature(peer_module.LFQ.forward).parameters) - {"self"}
    ours_fwd = set(inspect.signature(LFQ.forward).parameters) - {"self"}
    assert peer_fwd <= ours_fwd, peer_fwd - ours_fwd
    peer_itc = set(inspect.signature(peer_module.LFQ.indices_to_codes).parameters) - {"self"}
    assert peer_itc <= set(inspect.signature(LFQ.indices_to_codes).parameters) - {"self"}
    layer = LFQ(dim=16, codebook_size=2**4, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                diversity_gamma=1.0, straight_through_activation=nn.Identity(), num_codebooks=1,
                keep_num_codebooks_dim=False, codebook_scale=1.0, frac_per_sample_entropy=0.5,
                has_projections=True, projection_has_bias=False, soft_clamp_input_value=2.0,
                cosine_sim_project_in=True, cosine_sim_project_in_scale=2.0, channel_first=False,
                experimental_softplus_entropy_loss=True, entropy_loss_offset=1.0, spherical=True,
                force_quantization_f32=True, orthogonal_rotation=True).train()
    ret, breakdown = layer(randn(2, 5, 16, seed=32), inv_temperature=50.0, return_loss_breakdown=True,
                           mask=torch.ones(2, 5, dtype=torch.bool))
    assert ret.indices.shape == (2, 5) and torch.isfinite(ret.entropy_aux_loss)


@pytest.mark.parametrize("dim,num_codebooks", [(8, 2), (4, 3)])
def test_dim_and_num_codebooks_without_codebook_size_as_the_peer(dim, num_codebooks):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    peer = peer_module.LFQ(dim=dim, num_codebooks=num_codebooks).eval()
    ours = LFQ(dim=dim, num_codebooks=num_codebooks).eval()
    assert ours.codebook_size == peer.codebook_size == 2**dim
    ours.load_state_dict(peer.state_dict())
    x = randn(2, 5, dim, seed=35)
    assert torch.equal(ours(x).indices, peer(x).indices.long())


# ------------------------------------------------------------------------------------------
# extreme values


def test_huge_finite_input_gives_finite_losses():
    layer = LFQ(dim=4).train()
    x = torch.tensor([[[1e36, -1e36, 1.0, -2.0], [0.5, 0.25, 1.0, -2.0]]], requires_grad=True)
    (out, _, aux), breakdown = layer(x, return_loss_breakdown=True)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t) for t in breakdown), breakdown
    # the huge bits are certain: per-sample entropy is that of the moderate token only
    ref = reference(layer, x.detach()[:, 1:], 100.0)
    close(breakdown.per_sample_entropy * 2, ref["per_sample"], rtol=1e-4, atol=1e-6)
    aux.backward()
    assert torch.isfinite(x.grad).all()


def test_infinite_input_has_no_code_in_training():
    """A non-finite token gets no code (docs/precision.md, "Non-finite input"); a huge finite
    one still takes its signs."""
    layer = LFQ(dim=4).train()
    x = torch.tensor([[[float("inf"), -float("inf"), 1.0, -2.0], [3e38, -3e38, 1.0, -2.0]]], requires_grad=True)
    out, indices, loss = layer(x)
    assert indices.tolist() == [[-1, 0b1010]] and loss.isnan()
    assert out[0, 0].isnan().all() and torch.equal(out[0, 1].detach(), torch.tensor([1.0, -1.0, 1.0, -1.0]))


def test_review_regressions():
    """Errors and dtype rules found by review: each of these once misbehaved."""
    with pytest.raises(ValueError, match="indices: expected a last axis of num_codebooks=2"):
        LFQ(dim=16, codebook_size=256, num_codebooks=2).indices_to_codes(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="input: expected a floating point tensor"):
        LFQ(dim=8)(torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="inv_temperature"):
        LFQ(dim=8)(torch.randn(2, 3, 8), inv_temperature=0.0)
    # an activation with parameters, cast with the module: no dtype clash, gradient reaches it
    layer = LFQ(dim=8, straight_through_activation=nn.PReLU()).bfloat16().train()
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    out, _, loss = layer(x)
    (out.float().sum() + loss).backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.activation.weight.grad is not None
    assert LFQ(dim=8).dtype == torch.float32

