"""FSP against an fp64 re-implementation of its formulas, through the dtype matrix."""

import inspect
import math
import pickle

import pytest
import torch

from dtype_matrix import Parts, dtype_matrix, run_cell
from reference import F64, linear64, randn
from vq_layers import FSP

LEVELS = [8, 5, 4]
ACTS = ["tanh", "sigmoid", "normal", "laplace", "cauchy"]
SQRT12 = math.sqrt(12.0)

# the CDFs and their inverses as the paper/peer write them, in fp64
ACT64 = {
    "tanh": lambda z: (torch.tanh(z) + 1) / 2,
    "sigmoid": torch.sigmoid,
    "normal": lambda z: (1 + torch.erf(z / math.sqrt(2))) / 2,
    "laplace": lambda z: 0.5 * (1 + torch.sign(z) * (1 - torch.exp(-z.abs()))),
    "cauchy": lambda z: torch.atan(z) / math.pi + 0.5,
}
INV64 = {
    "tanh": lambda p: torch.atanh(2 * p - 1),
    "sigmoid": torch.logit,
    "normal": lambda p: torch.erfinv(2 * p - 1) * math.sqrt(2),
    "laplace": lambda p: -torch.sign(p - 0.5) * torch.log(1 - 2 * (p - 0.5).abs()),
    "cauchy": lambda p: torch.tan((p - 0.5) * math.pi),
}


FP32_EPS = torch.finfo(torch.float32).eps


def reference(z, levels, act, need_inv_act, eps=FP32_EPS):
    """fp64 eval FSP on z (..., d): codes, indices, level indices, margin to the nearest bin edge."""
    z = z.to(F64)
    L = torch.tensor(levels, dtype=F64)
    position = ACT64[act](z) * L
    level = torch.minimum(position.floor(), L - 1)
    midpoint = (level + 0.5) / L
    codes = INV64[act](midpoint.clamp(eps, 1 - eps)) if need_inv_act else (midpoint - 0.5) * SQRT12
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=F64)
    # to the nearest inner bin edge
    margin = (position - torch.minimum(position.round().clamp(min=1), L - 1)).abs().amin(-1)
    return codes, (level * basis).sum(-1).long(), level.long(), margin


def moments64(z):
    """(mean, unbiased variance, skewness, excess kurtosis) over axis 0, fp64."""
    z = z.to(F64)
    mean, var = z.mean(0), z.var(0, correction=1)
    s = (z - mean) / var.sqrt()
    return mean, var, (s**3).mean(0), (s**4).mean(0) - 3


def unpack(result):
    out, indices, norm_loss, info = result
    for moment in info["norm_info"].values():
        assert moment.dtype == torch.float32
    losses = [norm_loss] + ([info["p_accept_prob"]] if "p_accept_prob" in info else [])
    return Parts(out, indices=[indices, info["level_indices"]], losses=losses)


# --- the dtype matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_with_projections(cell):
    run_cell(cell, lambda: FSP(LEVELS, dim=16, quantize_rate=0.5), lambda dtype: randn(2, 6, 16).to(dtype),
             unpack=unpack)


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_indices_equal_fp32_reference(cell):
    """No projections: the bins depend on the input values alone; need_inv_act with the normal
    CDF, whose inverse near 0 and 1 is where low precision breaks."""
    x = randn(2, 40, 3, scale=2.0)
    x[0, 0] = 30.0  # saturated: the activation is 1 (in fp32) and the inverse is clamped
    result = run_cell(cell, lambda: FSP(LEVELS, act_name="normal", need_inv_act=True, quantize_rate=0.5),
                      lambda dtype: x.to(dtype), unpack=unpack)
    _, expected, levels, margin = reference(result.x.detach().cpu(), LEVELS, "normal", True)
    indices, level_indices = result.parts.indices
    clear = margin > 1e-5
    assert torch.equal(indices.cpu()[clear], expected[clear])
    assert torch.equal(level_indices.cpu()[clear], levels[clear])


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_many_levels_with_inverse_equals_fp32(cell):
    """L = 256 with need_inv_act: the outer bins' midpoints 0.5/256 lie below bf16's eps and
    fp16's is close; in eval the output is the fp64 formula rounded to the input dtype."""
    levels = [256, 256]
    x = randn(2, 30, 2, scale=2.0)
    x[0, :2] = torch.tensor([[-6.0, 6.0], [30.0, -30.0]])  # outer bins; saturated
    result = run_cell(cell, lambda: FSP(levels, need_inv_act=True, quantize_rate=0.5),
                      lambda dtype: x.to(dtype), unpack=unpack)
    codes, expected, _, margin = reference(result.x.detach().cpu(), levels, "tanh", True, eps=0.0)
    indices, _ = result.parts.indices
    clear = margin > 1e-5
    assert torch.equal(indices.cpu()[clear], expected[clear])
    if not cell.train:
        out, dtype = result.parts.output.detach().cpu(), result.x.dtype
        clear = clear[..., None].expand_as(out)
        torch.testing.assert_close(out[clear].double(), codes.to(dtype)[clear].double(), rtol=torch.finfo(dtype).eps,
                                   atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_gives_the_fp32_output_at_every_level_count(dtype):
    """The review's repro (L = 256, bf16 gave -2.4219 for the fp32 -3.1182) and every bin of
    other level counts: forward equals the fp32 forward rounded to the input dtype and
    indices_to_codes."""
    fsp = FSP([256, 256], need_inv_act=True).eval()
    x = torch.tensor([[-6.0, 6.0]])
    out, indices, _, _ = fsp(x.to(dtype))
    expected = fsp.indices_to_codes(indices)
    torch.testing.assert_close(expected, torch.tensor([[-3.1182, 3.1182]]), rtol=0, atol=1e-4)
    assert torch.equal(out, expected.to(dtype)) and torch.equal(indices, fsp(x)[1])
    for act in ACTS:
        for L in (2, 65, 129, 513, 1000, 4099):
            fsp = FSP([L], act_name=act, need_inv_act=True).eval()
            every_bin = fsp.indices_to_codes(torch.arange(L))  # fp32: each bin's code, fed back in
            z = torch.cat([every_bin, torch.tensor([[-1e4], [1e4]])]).to(dtype)
            out, indices, _, _ = fsp(z)
            fp32_out, fp32_indices, _, _ = fsp(z.float())
            assert torch.equal(indices, fp32_indices), (act, L)
            assert torch.equal(out, fp32_out.to(dtype)), (act, L)
            assert torch.equal(out, fsp.indices_to_codes(indices).to(dtype)), (act, L)
            assert indices[-2:].tolist() == [0, L - 1], (act, L)


def test_quantize_act_value_is_the_bin_midpoint():
    peer = pytest.importorskip("vector_quantize_pytorch")
    levels = [8, 5, 256]
    fsp, theirs = FSP(levels), peer.FSP(levels)
    act = torch.rand(50, 3, generator=torch.Generator().manual_seed(0))
    act[0] = torch.tensor([0.0, 1.0, 0.5 / 256])  # the bottom edge, the top edge (last bin), a midpoint
    act.requires_grad_(True)
    value, level = fsp.quantize_act_value(act, eps=1e-6)
    L = torch.tensor(levels, dtype=F64)
    expected_level = torch.minimum((act.detach().double() * L).floor(), L - 1)
    assert level.dtype == torch.long and torch.equal(level, expected_level.long())
    assert value.dtype == act.dtype
    torch.testing.assert_close(value.double(), (expected_level + 0.5) / L, rtol=0, atol=1e-7)
    (grad,) = torch.autograd.grad(value.sum(), act)
    assert torch.equal(grad, torch.ones_like(act))  # straight-through
    p_value, p_level = theirs.quantize_act_value(act[1:].detach(), 1e-7)
    assert torch.equal(level[1:], p_level.long()) and torch.equal(value[1:].detach(), p_value)
    half_value, half_level = fsp.quantize_act_value(act.detach().bfloat16())
    assert half_value.dtype == torch.bfloat16 and half_level.dtype == torch.long
    z = randn(20, 3, scale=2.0)
    assert torch.equal(fsp.eval()(z)[3]["level_indices"], fsp.quantize_act_value(fsp.act_func(z))[1])


# --- values against the formulas ---------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("need_inv_act", [False, True])
def test_eval_forward_equals_fp64_reference(act, need_inv_act):
    z = randn(4, 50, 3, scale=2.0)
    fsp = FSP(LEVELS, act_name=act, need_inv_act=need_inv_act).eval()
    out, indices, _, info = fsp(z)
    codes, expected, levels, margin = reference(z, LEVELS, act, need_inv_act)
    clear = margin > 1e-5
    assert clear.float().mean() > 0.99
    assert indices.dtype == torch.long and torch.equal(indices[clear], expected[clear])
    assert torch.equal(info["level_indices"][clear], levels[clear])
    torch.testing.assert_close(out[clear].double(), codes[clear], rtol=1e-5, atol=1e-5)
    assert "p_accept_prob" not in info


@pytest.mark.parametrize("preset", ["none", "var", "kurt", "var_tanh", "var_sigmoid", "var_laplace"])
def test_norm_loss_is_the_moment_matching_formula(preset):
    targets = {"none": (0, 1, 0, 0, 0, 0, 0, 0), "var": (0, 1, 0, 0, 0.1, 0.07, 0, 0),
               "kurt": (0, 1, 0, 0, 0.1, 0.07, 0.06, 0.05), "var_tanh": (0, 0.8225, 0, 0, 0.1, 0.07, 0, 0),
               "var_sigmoid": (0, 3.29, 0, 0, 0.1, 0.07, 0, 0), "var_laplace": (0, 2.0, 0, 0, 0.1, 0.07, 0, 0)}
    t1, t2, t3, t4, w1, w2, w3, w4 = targets[preset]
    fsp = FSP(LEVELS, dim=6, vector_norm=preset)
    x = randn(3, 20, 6, scale=1.5) + 0.3
    _, _, loss, info = fsp(x)
    latents = linear64(fsp.project_in, x.reshape(-1, 6))
    mean, var, skew, kurt = moments64(latents)
    expected = (w1 * ((mean - t1) ** 2).mean() + w2 * ((var - t2) ** 2).mean()
                + w3 * ((skew - t3) ** 2).mean() + w4 * ((kurt - t4) ** 2).mean())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    for name, value in zip(("mean", "variance", "skewness", "kurtosis"), (mean, var, skew, kurt)):
        torch.testing.assert_close(info["norm_info"][name].double(), value, rtol=1e-4, atol=1e-5)


def test_norm_loss_moments_do_not_overflow_in_fp16():
    """z^4 of fp16 latents near 100 exceeds 65504: the moments run in fp32."""
    x = (randn(64, 3) * 100).half()
    _, _, loss, info = FSP(LEVELS, vector_norm="kurt")(x)
    torch.testing.assert_close(info["norm_info"]["kurtosis"].double(), moments64(x)[3], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(loss)


def test_fewer_than_two_tokens_give_zero_norm_loss():
    fsp = FSP(LEVELS).train()
    out, indices, loss, _ = fsp(torch.randn(0, 3))
    assert out.shape == (0, 3) and indices.shape == (0,) and loss.item() == 0.0
    out, indices, loss, _ = fsp(torch.randn(1, 3))
    assert indices.shape == (1,) and loss.item() == 0.0 and torch.isfinite(out).all()


# --- indices <-> codes --------------------------------------------------------------------------


@pytest.mark.parametrize("need_inv_act", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_indices_to_codes_is_the_eval_forward(act, need_inv_act):
    fsp = FSP(LEVELS, dim=5, act_name=act, need_inv_act=need_inv_act, channel_first=True).eval()
    x = randn(2, 5, 3, 4, scale=2.0)
    out, indices, _, info = fsp(x)
    assert indices.shape == (2, 3, 4) and info["level_indices"].shape == (2, 3, 4, 3)
    assert torch.equal(fsp.indices_to_codes(indices), out)
    assert torch.equal(fsp.indices_to_level_indices(indices), info["level_indices"])
    assert torch.equal(fsp.level_indices_to_indices(info["level_indices"]), indices)


@pytest.mark.parametrize("act", ACTS)
def test_indices_codes_indices_round_trip(act):
    """With the inverse activation, a code fed back in lands in its own bin."""
    fsp = FSP(LEVELS, act_name=act, need_inv_act=True).eval()
    indices = torch.arange(fsp.codebook_size)
    codes = fsp.indices_to_codes(indices)
    assert codes.shape == (160, 3) and torch.isfinite(codes).all()
    _, again, _, _ = fsp(codes)
    assert torch.equal(again, indices)
    midpoints = fsp.indices_to_act_value(indices)
    digits = torch.stack([indices // math.prod(LEVELS[:i]) % L for i, L in enumerate(LEVELS)], -1)
    torch.testing.assert_close(midpoints.double(), (digits + 0.5) / torch.tensor(LEVELS, dtype=F64))


# --- training: quantize_rate, perturbation, gradients ---------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_quantize_rate_is_the_fraction_of_quantized_scalars(rate):
    torch.manual_seed(0)
    fsp = FSP([8, 6, 5], quantize_rate=rate).train()
    z = randn(10000, 3, scale=1.5)
    out, indices, _, info = fsp(z)
    eval_out, eval_indices, _, _ = fsp.eval()(z)
    assert torch.equal(indices, eval_indices)  # bins are taken before any perturbation
    quantized = (out == eval_out).double().mean().item()
    sigma = math.sqrt(rate * (1 - rate) / z.numel()) + 1e-12
    assert abs(quantized - rate) < 5 * sigma + 1e-4, quantized
    # perturbed scalars stay within half a bin of their activation, inside (0, 1)
    value = out.double() / SQRT12 + 0.5
    act = ACT64["tanh"](z.double())
    half_bin = 1 / (2 * torch.tensor([8, 6, 5], dtype=F64))
    perturbed = out != eval_out
    assert ((value - act).abs() <= half_bin + 1e-6)[perturbed].all()
    assert (rate < 1) == ("p_accept_prob" in info)
    again, _, _, _ = fsp(z)
    assert torch.equal(again, eval_out)  # eval: deterministic


def test_rejected_proposals_keep_the_activation():
    """At a saturated activation (exactly 1 in fp32) half the proposals leave (0, 1)."""
    torch.manual_seed(0)
    z = torch.full((4000, 3), 30.0)
    out, _, _, info = FSP(LEVELS, quantize_rate=0.0).train()(z)
    assert abs(info["p_accept_prob"].item() - 0.5) < 5 * math.sqrt(0.25 / z.numel())
    kept = torch.isclose(out.double(), torch.tensor(0.5 * SQRT12, dtype=F64), rtol=0, atol=1e-6)  # act = 1
    assert abs(kept.double().mean().item() - (1 - info["p_accept_prob"].item())) < 1e-3
    assert (out.double() < 0.5 * SQRT12 + 1e-6).all()


@pytest.mark.parametrize("act", ACTS)
def test_gradients_are_straight_through(act):
    z = randn(7, 3, scale=1.5).requires_grad_(True)
    out, _, _, _ = FSP(LEVELS, act_name=act, need_inv_act=True, vector_norm="none").train()(z)
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert torch.equal(grad, torch.ones_like(z))  # identity through the inverse
    out, _, _, _ = FSP(LEVELS, act_name=act, quantize_rate=1.0, vector_norm="none").train()(z)
    (grad,) = torch.autograd.grad(out.sum(), z)
    z64 = z.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(ACT64[act](z64).sum() * SQRT12, z64)  # through the CDF
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_fp16_inverse_activation_stays_finite():
    """Cauchy's inverse at fp32's eps (a saturated activation whose perturbation is rejected)
    is ~2.7e6, past fp16's 65504: the code is clamped to the input dtype's range."""
    z = torch.tensor([[1e4, -1e4, 0.5], [200.0, 3.0, -3.0]], dtype=torch.float16)
    for train in (False, True):
        out, _, _, _ = FSP(LEVELS, act_name="cauchy", need_inv_act=True).train(train)(z)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.manual_seed(0)
    # a finite input whose activation saturates (act = 1 even in fp32) behind a steep projection
    # (an infinite input has no code: NaN, tests/test_non_finite.py)
    layer = FSP(LEVELS, dim=1, act_name="cauchy", need_inv_act=True, quantize_rate=0.0).train()
    with torch.no_grad():
        layer.project_in.weight.fill_(1e9), layer.project_in.bias.zero_()
        layer.project_out.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]])), layer.project_out.bias.zero_()
    out, _, _, _ = layer(torch.ones(200, 1, dtype=torch.float16))
    assert torch.isfinite(out).all() and (out == 65504).any()  # rejected proposals keep act = 1
    big = FSP(LEVELS, act_name="cauchy", need_inv_act=True, quantize_rate=0.0).train()(z.float())[0]
    assert torch.isfinite(big).all()


# --- layouts, state, errors, drop-in ----------------------------------------------------------------


def test_channel_first_equals_channel_last():
    x = randn(2, 16, 3, 5)
    a = FSP(LEVELS, dim=16, channel_first=True).eval()
    b = FSP(LEVELS, dim=16).eval()
    b.load_state_dict(a.state_dict())
    out_a, idx_a, loss_a, _ = a(x)
    out_b, idx_b, loss_b, _ = b(x.permute(0, 2, 3, 1))
    assert torch.equal(idx_a, idx_b) and torch.equal(out_a, out_b.permute(0, 3, 1, 2))
    torch.testing.assert_close(loss_a, loss_b)
    out, indices, _, _ = b(torch.randn(4, 16))
    assert out.shape == (4, 16) and indices.shape == (4,)


def test_state_dict_round_trip():
    fsp = FSP(LEVELS, dim=8, act_name="laplace", need_inv_act=True)
    assert set(fsp.state_dict()) == {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"}
    clone = FSP(LEVELS, dim=8, act_name="laplace", need_inv_act=True)
    clone.load_state_dict(fsp.state_dict())
    x = randn(3, 4, 8)
    for a, b in zip(fsp.eval()(x)[:3], clone.eval()(x)[:3]):
        assert torch.equal(a, b)
    half = FSP(LEVELS, dim=8).half()
    half.load_state_dict(fsp.state_dict())
    assert half._levels.dtype == torch.long and half.project_in.weight.dtype == torch.float16
    assert "act_name='laplace'" in repr(fsp) and "levels=[8, 5, 4]" in repr(fsp)
    restored = pickle.loads(pickle.dumps(fsp))
    assert torch.equal(restored(x)[0], fsp(x)[0])


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="levels"):
        FSP([1, 5])
    with pytest.raises(ValueError, match="act_name: expected one of"):
        FSP(LEVELS, act_name="gelu")
    with pytest.raises(ValueError, match="vector_norm: expected one of"):
        FSP(LEVELS, vector_norm="skew")
    for rate in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="quantize_rate"):
            FSP(LEVELS, quantize_rate=rate)
    with pytest.raises(ValueError, match="dim"):
        FSP(LEVELS, dim=0)
    fsp = FSP(LEVELS, dim=8)
    with pytest.raises(ValueError, match="expected input feature dim 8.*got 3"):
        fsp(torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="input"):
        fsp(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        fsp(torch.randn(2, 8), eps=0.7)
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 160\)"):
        fsp.indices_to_codes(torch.tensor([[0, 160]]))
    with pytest.raises(ValueError, match="level_indices"):
        fsp.level_indices_to_indices(torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("need_inv_act", [False, True])
def test_same_as_vector_quantize_pytorch_in_eval(act, need_inv_act):
    peer = pytest.importorskip("vector_quantize_pytorch")
    kwargs = {"dim": 6, "act_name": act, "need_inv_act": need_inv_act, "vector_norm": "kurt"}
    ours, theirs = FSP(LEVELS, **kwargs).eval(), peer.FSP(LEVELS, **kwargs).eval()
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = randn(2, 30, 6, scale=2.0)
    out, indices, loss, info = ours(x)
    p_out, p_indices, p_loss, p_info = theirs(x)
    assert torch.equal(indices, p_indices.long())
    assert torch.equal(info["level_indices"], p_info["level_indices"].long())
    torch.testing.assert_close(out, p_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, p_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.indices_to_codes(indices), theirs.indices_to_codes(p_indices), rtol=1e-5, atol=1e-5)


def test_peer_keywords_are_accepted():
    peer = pytest.importorskip("vector_quantize_pytorch")
    for ours, theirs in ((FSP, peer.FSP), (FSP.forward, peer.FSP.forward)):
        assert set(inspect.signature(theirs).parameters) <= set(inspect.signature(ours).parameters)


def test_compile_fullgraph_training_forward_and_backward():
    torch._dynamo.reset()
    fsp = FSP(LEVELS, dim=8, need_inv_act=True, quantize_rate=1.0).train()
    compiled = torch.compile(fsp, fullgraph=True, backend="aot_eager")
    grads = []
    for layer in (fsp, compiled):
        x = randn(2, 5, 8, seed=5).requires_grad_(True)
        out, indices, loss, _ = layer(x)
        (out.square().sum() + loss).backward()
        grads.append((out, indices, loss, x.grad, fsp.project_in.weight.grad.clone()))
        fsp.zero_grad()
    for eager, got in zip(*grads):
        torch.testing.assert_close(got, eager)
