"""BinaryMapper against fp64 brute force over all 2^bits codes, through the dtype matrix."""

import inspect
import math

import pytest
import torch

from dtype_matrix import dtype_matrix, run_cell
from reference import F64, randn
from vq_layers import BinaryMapper

BITS = 4


def all_codes(bits):
    """(2^bits, bits) fp64 bit patterns, code k's bit i = (k >> i) & 1 (brute-force enumeration)."""
    return torch.tensor([[(k >> i) & 1 for i in range(bits)] for k in range(2**bits)], dtype=F64)


def code_log_probs64(logits):
    """fp64 log p(code) for every code: (..., bits) -> (..., 2^bits), from the product of Bernoullis."""
    logits = logits.to(F64)[..., None, :]  # log sigmoid(l) = -log(1 + e^-l), in fp64
    b = all_codes(logits.shape[-1])
    return (-torch.log1p(torch.exp(-logits)) * b - torch.log1p(torch.exp(logits)) * (1 - b)).sum(-1)


def sign_indices(logits):
    return sum(int(bit) << i for i, bit in enumerate((logits > 0).tolist()))


# --- the dtype matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix(cell):
    x = randn(2, 5, BITS, scale=3.0)
    result = run_cell(cell, lambda: BinaryMapper(BITS), lambda dtype: x.to(dtype),
                      forward=lambda layer, t: layer(t, return_indices=True))
    one_hot, (indices,) = result.parts.output, result.parts.indices
    assert one_hot.shape == (2, 5, 2**BITS) and indices.shape == (2, 5)
    assert torch.equal(one_hot.argmax(-1), indices)
    assert torch.equal(one_hot.detach().float().sum(-1), torch.ones(2, 5, device=one_hot.device))


@pytest.mark.parametrize("cell", dtype_matrix())
def test_dtype_matrix_deterministic_picks_the_sign_bits(cell):
    x = randn(3, 7, BITS, scale=2.0)
    result = run_cell(cell, lambda: BinaryMapper(BITS), lambda dtype: x.to(dtype),
                      forward=lambda layer, t: layer(t, deterministic=True, return_indices=True))
    (indices,) = result.parts.indices
    logits = result.x.detach().float().cpu()
    expected = torch.tensor([[sign_indices(token) for token in row] for row in logits])
    assert torch.equal(indices.cpu(), expected)


# --- codes and probabilities ------------------------------------------------------------------------


def test_deterministic_on_eval_and_sampling_otherwise():
    logits = randn(64, 6)
    mapper = BinaryMapper(6, deterministic_on_eval=True).eval()
    _, indices, _ = mapper(logits, return_indices=True)
    assert indices.tolist() == [sign_indices(t) for t in logits]
    _, sampled, _ = mapper(logits, deterministic=False, return_indices=True)
    assert not torch.equal(sampled, indices)  # 64 tokens of 6 uncertain bits: never all likely
    assert mapper.codes.shape == (64, 6) and torch.equal(mapper.codes.double(), all_codes(6))


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_log_prob_equals_brute_force_over_all_codes(bits):
    logits = randn(2, 3, bits, scale=4.0)
    logits[0, 0, 0] = 40.0  # saturated bits: log p must stay exact, not log(0)
    logits[0, 1, -1] = -40.0
    mapper = BinaryMapper(bits)
    expected = code_log_probs64(logits)  # (2, 3, 2^bits)
    torch.testing.assert_close(expected.logsumexp(-1), torch.zeros(2, 3, dtype=F64))
    for k in range(2**bits):
        indices = torch.full((2, 3), k)
        got = mapper.log_prob(logits, indices=indices)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected[..., k], rtol=1e-6, atol=1e-6)
        one_hot = torch.nn.functional.one_hot(indices, 2**bits).float()
        assert torch.equal(mapper.log_prob(logits, one_hot=one_hot), got)
        per_bit = mapper.log_prob(logits, indices=indices, sum_bits=False)
        assert per_bit.shape == (2, 3, bits)
        torch.testing.assert_close(per_bit.sum(-1), got)


def test_log_prob_and_aux_loss_need_no_one_hot_at_40_bits():
    mapper = BinaryMapper(40)
    logits = randn(3, 40)
    indices = torch.tensor([0, 2**40 - 1, 123456789012])
    p = torch.sigmoid(logits.double())
    bits = torch.stack([(indices >> i) & 1 for i in range(40)], -1).double()
    expected = (bits * p.log() + (1 - bits) * (-p).log1p()).sum(-1)
    torch.testing.assert_close(mapper.log_prob(logits, indices=indices).double(), expected, rtol=1e-6, atol=1e-5)
    assert mapper.calc_aux_loss(logits).isfinite()
    with pytest.raises(ValueError, match="one-hot"):
        mapper(logits)  # 3 x 2^40 values: refused, not attempted


@pytest.mark.parametrize("threshold", [0.0, math.log(2), 2.0])
def test_aux_loss_is_relu_of_kl_to_uniform_minus_threshold(threshold):
    logits = randn(4, 6, 5, scale=3.0)
    logits[0, 0] = 60.0  # confident: KL = 5 ln 2
    logits[0, 1] = 0.0  # uniform: KL = 0
    p = torch.sigmoid(logits.double())
    entropy = -(p * p.log() + (1 - p) * (-p).log1p()).nan_to_num(0.0).sum(-1)
    kl = 5 * math.log(2) - entropy
    expected = torch.relu(kl - threshold)
    mapper = BinaryMapper(5, kl_loss_threshold=threshold)
    per_token = mapper.calc_aux_loss(logits, reduce_aux_kl_loss=False)
    assert per_token.shape == (4, 6) and per_token.dtype == torch.float32
    torch.testing.assert_close(per_token.double(), expected, rtol=1e-5, atol=1e-6)
    _, loss = mapper.train()(logits)
    torch.testing.assert_close(loss.double(), expected.mean(), rtol=1e-5, atol=1e-6)
    _, _, unreduced = mapper(logits, return_indices=True, reduce_aux_kl_loss=False)
    torch.testing.assert_close(unreduced, per_token)
    _, eval_loss = mapper.eval()(logits)
    assert eval_loss.item() == 0.0 and eval_loss.dtype == torch.float32


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sampling_distribution_is_the_product_of_bernoullis(temperature):
    """Chi-square over 40000 samples of each of two tokens (df = 7, critical value 24.3 at p = 0.001)."""
    torch.manual_seed(0)
    bits, n = 3, 40000
    mapper = BinaryMapper(bits).train()
    for token in ([0.3, -1.2, 2.0], [-0.5, 0.0, 1.0]):
        logits = torch.tensor(token).expand(n, bits)
        _, indices, _ = mapper(logits, temperature=temperature, return_indices=True)
        counts = torch.bincount(indices, minlength=2**bits).double()
        expected = code_log_probs64(torch.tensor(token) / temperature).exp() * n
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 24.3, (token, temperature, chi2)


def test_straight_through_gradient_is_the_soft_probabilities_gradient():
    bits = 4
    logits = randn(3, 5, bits, scale=2.0, seed=1).requires_grad_(True)
    upstream = randn(3, 5, 2**bits, seed=2)
    one_hot, _ = BinaryMapper(bits).train()(logits, calc_aux_loss=False)
    assert set(one_hot.unique().tolist()) == {0.0, 1.0}  # the value is the one-hot exactly
    (grad,) = torch.autograd.grad((one_hot * upstream).sum(), logits)
    logits64 = logits.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad((code_log_probs64(logits64).exp() * upstream.double()).sum(), logits64)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)
    no_st, _ = BinaryMapper(bits).train()(logits, straight_through=False)
    assert not no_st.requires_grad


def test_shapes_empty_batch_and_leading_dims():
    mapper = BinaryMapper(3).train()
    one_hot, indices, loss = mapper(torch.randn(0, 3), return_indices=True)
    assert one_hot.shape == (0, 8) and indices.shape == (0,) and loss.item() == 0.0
    one_hot, loss = mapper(torch.randn(3))  # a single token
    assert one_hot.shape == (8,)
    one_hot, indices, _ = mapper(torch.randn(2, 3, 4, 3), return_indices=True)
    assert one_hot.shape == (2, 3, 4, 8) and indices.shape == (2, 3, 4)


def test_huge_fp16_logits_give_finite_results():
    logits = torch.tensor([[60000.0, -60000.0, 1.0]], dtype=torch.float16, requires_grad=True)
    mapper = BinaryMapper(3).train()
    one_hot, indices, loss = mapper(logits, return_indices=True, deterministic=True)
    assert indices.item() == 1 + 4 and torch.isfinite(loss)
    one_hot.float().square().sum().backward()
    assert torch.isfinite(logits.grad).all()


# --- state, errors, drop-in ---------------------------------------------------------------------------


def test_state_dict_round_trip():
    mapper = BinaryMapper(5, kl_loss_threshold=0.3)
    assert mapper.state_dict() == {}  # nothing learned or counted; the peer's buffers are non-persistent too
    clone = BinaryMapper(5, kl_loss_threshold=0.3)
    clone.load_state_dict(mapper.state_dict())
    logits = randn(4, 5)
    for a, b in zip(mapper(logits, deterministic=True), clone(logits, deterministic=True)):
        assert torch.equal(a, b)
    half = BinaryMapper(5).half()
    assert half.power_two.dtype == torch.long
    assert "bits=5" in repr(mapper) and "kl_loss_threshold=0.3" in repr(mapper)


@pytest.mark.parametrize("bits, error", [(0, ValueError), (-1, ValueError), (2.5, ValueError), (True, ValueError),
                                         (63, ValueError)])
def test_bad_bits(bits, error):
    with pytest.raises(error, match="bits"):
        BinaryMapper(bits)


def test_bad_input():
    mapper = BinaryMapper(3)
    with pytest.raises(ValueError, match="logits: expected a last dim of bits=3, got shape"):
        mapper(torch.randn(2, 4))
    with pytest.raises(TypeError, match="logits"):
        mapper(torch.ones(2, 3, dtype=torch.long))
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            mapper(torch.randn(2, 3), temperature=temperature)
    with pytest.raises(ValueError, match="exactly one of indices or one_hot"):
        mapper.log_prob(torch.randn(2, 3))
    with pytest.raises(ValueError, match="both"):
        mapper.log_prob(torch.randn(2, 3), indices=torch.zeros(2, dtype=torch.long), one_hot=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 8\)"):
        mapper.log_prob(torch.randn(2, 3), indices=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="indices: expected shape"):
        mapper.log_prob(torch.randn(2, 3), indices=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one_hot"):
        mapper.log_prob(torch.randn(2, 3), one_hot=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="kl_loss_threshold"):
        BinaryMapper(3, kl_loss_threshold="1 bit")
    with pytest.raises(TypeError, match="indices: expected an integer tensor, got list"):
        mapper.log_prob(torch.randn(2, 3), indices=[1, 2])
    with pytest.raises(TypeError, match="one_hot: expected a tensor, got list"):
        mapper.log_prob(torch.randn(2, 3), one_hot=[[1, 0], [0, 1]])
    for limit in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_one_hot_elements"):
            BinaryMapper(3, max_one_hot_elements=limit)


def test_max_one_hot_elements_is_a_keyword_that_can_be_lifted():
    logits = randn(13, 3)
    with pytest.raises(ValueError, match=r"max_one_hot_elements: .*13 tokens x 2\^3 codes.*max_one_hot_elements=None"):
        BinaryMapper(3, max_one_hot_elements=100)(logits)
    assert BinaryMapper(3, max_one_hot_elements=104)(logits)[0].shape == (13, 8)  # the limit itself is allowed
    unlimited = BinaryMapper(3, max_one_hot_elements=None)
    assert unlimited.max_one_hot_elements is None and "max_one_hot_elements=None" in repr(unlimited)
    one_hot, indices, _ = unlimited(logits, deterministic=True, return_indices=True)
    assert indices.tolist() == [sign_indices(t) for t in logits] and torch.equal(one_hot.argmax(-1), indices)


def test_default_limit_lets_through_what_the_peer_runs_on_a_big_gpu():
    """4096 tokens x 2^17 codes (2 GiB of fp32 one-hot): the peer runs it; the default does
    not refuse it (shapes checked on the meta device, nothing allocated)."""
    mapper = BinaryMapper(17).to("meta").train()
    logits = torch.empty(4096, 17, device="meta", requires_grad=True)
    one_hot, indices, loss = mapper(logits, return_indices=True)
    assert one_hot.shape == (4096, 2**17) and one_hot.requires_grad and indices.shape == (4096,)


def test_soft_probability_table_is_built_only_when_a_gradient_can_flow(monkeypatch):
    """The (N, 2^bits) table of code probabilities feeds only the straight-through gradient:
    not built under no_grad or for logits that need no gradient; the one-hot is the same."""
    import vq_layers.layers.binary_mapper as module

    calls = []
    real = module.code_log_probs
    monkeypatch.setattr(module, "code_log_probs", lambda t: calls.append(t.shape) or real(t))
    mapper = BinaryMapper(BITS).train()
    logits = randn(6, BITS, scale=2.0)
    torch.manual_seed(0)
    with_grad, _ = mapper(logits.clone().requires_grad_(True), straight_through=True)
    assert calls == [(6, BITS)] and with_grad.requires_grad
    calls.clear()
    # logits that need no gradient; logits that do, under no_grad
    for make, context in ((lambda: logits, torch.enable_grad),
                          (lambda: logits.clone().requires_grad_(True), torch.no_grad)):
        torch.manual_seed(0)
        with context():
            one_hot, _ = mapper(make(), straight_through=True)
        assert calls == [] and not one_hot.requires_grad
        assert torch.equal(one_hot, with_grad.detach())


def test_same_as_vector_quantize_pytorch_where_deterministic():
    peer = pytest.importorskip("vector_quantize_pytorch")
    logits = randn(2, 6, 5, scale=2.0, seed=3)
    ours, theirs = BinaryMapper(5).train(), peer.BinaryMapper(5).train()
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    results = []
    for mapper in (ours, theirs):
        x = logits.clone().requires_grad_(True)
        one_hot, indices, loss = mapper(x, deterministic=True, return_indices=True)
        (one_hot * randn(2, 6, 32, seed=4)).sum().backward()
        results.append((one_hot, indices, loss, x.grad, mapper.log_prob(logits, indices=indices)))
    (o1, i1, l1, g1, lp1), (o2, i2, l2, g2, lp2) = results
    assert torch.equal(i1, i2)
    # the peer's one_hot + soft - soft.detach() is off the one-hot by rounding; ours is exact
    torch.testing.assert_close(o1, o2)
    assert not torch.equal(o1, o2) and torch.equal(o1, torch.nn.functional.one_hot(i1, 32).float())
    for a, b in ((l1, l2), (g1, g2), (lp1, lp2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.codes, theirs.codes)


def test_peer_keywords_are_accepted():
    peer = pytest.importorskip("vector_quantize_pytorch")
    for ours, theirs in ((BinaryMapper, peer.BinaryMapper), (BinaryMapper.forward, peer.BinaryMapper.forward)):
        assert set(inspect.signature(theirs).parameters) <= set(inspect.signature(ours).parameters)


def test_compile_fullgraph_training_forward_and_backward():
    torch._dynamo.reset()
    mapper = BinaryMapper(4).train()
    compiled = torch.compile(mapper, fullgraph=True, backend="aot_eager")
    grads = []
    for layer in (mapper, compiled):
        logits = randn(2, 5, 4, seed=5).requires_grad_(True)
        one_hot, indices, loss = layer(logits, deterministic=True, return_indices=True)
        ((one_hot * randn(2, 5, 16, seed=6)).sum() + loss).backward()
        grads.append((one_hot, indices, loss, logits.grad))
    for eager, got in zip(*grads):
        torch.testing.assert_close(got, eager)
