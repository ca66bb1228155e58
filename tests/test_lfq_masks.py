"""LFQ's token masks and per-sample (b,) masks, against the fp64 reference (lfq_reference.py)
and against the kept samples run alone."""

from __future__ import annotations

import re

import pytest
import torch

from lfq_reference import all_codes, reference
from reference import close, randn
from vq_layers import LFQ

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# ------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("kwargs", [dict(dim=5, commitment_loss_weight=0.5),
                                    dict(dim=12, codebook_size=2**3, num_codebooks=2, commitment_loss_weight=0.5,
                                         spherical=True)],
                         ids=["plain", "proj_codebooks_spherical"])
def test_mask_equals_running_on_the_kept_subset(kwargs):
    torch.manual_seed(0)
    layer = LFQ(**kwargs).train()
    x = randn(3, 20, layer.dim, seed=11)
    mask = randn(3, 20, seed=12) > 0.3
    (out, indices, aux), masked = layer(x, inv_temperature=1.0, mask=mask, return_loss_breakdown=True)
    (_, sub_indices, sub_aux), subset = layer(x[mask][None], inv_temperature=1.0, return_loss_breakdown=True)
    for a, b in zip(masked, subset):
        close(a, b, rtol=1e-5, atol=1e-6)
    close(aux, sub_aux, rtol=1e-5, atol=1e-6)
    # and both equal the brute force on the subset; indices are still computed everywhere
    ref = reference(layer, x, 1.0, mask=mask)
    close(masked.per_sample_entropy, ref["per_sample"], rtol=1e-4, atol=1e-5)
    close(masked.batch_entropy, ref["batch"], rtol=1e-4, atol=1e-5)
    close(masked.commitment, ref["commitment"], rtol=1e-5, atol=1e-6)
    assert torch.equal(indices[mask], sub_indices[0])
    unmasked = layer(x, inv_temperature=1.0, return_loss_breakdown=True)[1]
    assert abs(unmasked.batch_entropy.item() - masked.batch_entropy.item()) > 1e-4


def test_image_mask():
    torch.manual_seed(0)
    layer = LFQ(dim=8, codebook_size=2**4, commitment_loss_weight=1.0).train()
    x = randn(2, 8, 4, 5, seed=13)
    mask = randn(2, 4, 5, seed=14) > 0
    _, masked = layer(x, inv_temperature=1.0, mask=mask, return_loss_breakdown=True)
    tokens = x.permute(0, 2, 3, 1)  # (b, h, w, d)
    _, subset = layer(tokens[mask][None], inv_temperature=1.0, return_loss_breakdown=True)
    for a, b in zip(masked, subset):
        close(a, b, rtol=1e-5, atol=1e-6)
    ref = reference(layer, tokens, 1.0, mask=mask)
    close(masked.batch_entropy, ref["batch"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make_mask,error",
    [
        (lambda: torch.ones(2, 9, dtype=torch.bool), ValueError),
        (lambda: torch.ones(3, 10, dtype=torch.bool), ValueError),
        (lambda: torch.ones(2, 10), (ValueError, TypeError)),
        (lambda: torch.ones(2, 10, dtype=torch.long), (ValueError, TypeError)),
        (lambda: [[True] * 10] * 2, (ValueError, TypeError)),
    ],
    ids=["short", "batch", "float", "long", "list"],
)
def test_bad_mask_raises_naming_mask(make_mask, error):
    layer = LFQ(dim=4).train()
    with pytest.raises(error, match="mask"):
        layer(randn(2, 10, 4, seed=15), mask=make_mask())


def test_bad_image_mask_raises():
    layer = LFQ(dim=4).train()
    with pytest.raises(ValueError, match="mask"):
        layer(randn(2, 4, 3, 5, seed=16), mask=torch.ones(2, 5, 3, dtype=torch.bool))


def test_all_masked_gives_zero_losses():
    layer = LFQ(dim=6, commitment_loss_weight=1.0).train()
    x = randn(2, 10, 6, seed=17).requires_grad_(True)
    (out, indices, aux), breakdown = layer(x, mask=torch.zeros(2, 10, dtype=torch.bool), return_loss_breakdown=True)
    assert [t.item() for t in breakdown] == [0, 0, 0]
    assert aux.item() == 0 and torch.isfinite(aux)
    assert out.shape == x.shape and torch.isfinite(out).all()
    (aux + out.sum()).backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------
# per-sample masks: a (b,) mask keeps or drops whole samples, as the peer's test_masked_lfq
#
# The independent reference is the same layer (same state) run on the kept samples alone; the
# fp64 brute force checks the losses on the kept tokens once more.


SAMPLE_MASK_LAYOUTS = {
    "sequence": (dict(dim=5, commitment_loss_weight=0.5), (3, 7, 5)),
    "single_token": (dict(dim=5, commitment_loss_weight=0.5), (3, 5)),
    "image_proj_codebooks": (dict(dim=12, codebook_size=2**3, num_codebooks=2, commitment_loss_weight=0.5),
                             (3, 12, 4, 5)),
    "video_spherical": (dict(dim=8, codebook_size=2**4, spherical=True, commitment_loss_weight=0.5), (3, 8, 2, 3, 4)),
}


def kept_alone(x, samples):
    """x's kept samples, selected on the host (the reference may sync; the layer may not)."""
    return x[[i for i, keep in enumerate(samples.tolist()) if keep]]


def token_mask(samples, x, channel_first):
    """A (b,) sample mask spread over x's tokens in their layout: (b, ...spatial)."""
    spatial = x.shape[2:] if channel_first else x.shape[1:-1]
    return samples.reshape(-1, *(1,) * len(spatial)).expand(-1, *spatial)


def as_tokens(x, channel_first):
    """(b, ...) -> (b, n, d), independently of the layer."""
    if channel_first:
        x = x.movedim(1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


SAMPLE_MASKS = {"TfT": [True, False, True], "fTT": [False, True, True], "all_false": [False, False, False],
                "all_true": [True, True, True]}


# (b, d) with an all-True (b,) mask was already accepted, as a per-token mask (the same thing)
@pytest.mark.parametrize("layout,samples", [(layout, samples)
                                            for layout in SAMPLE_MASK_LAYOUTS for samples in SAMPLE_MASKS
                                            if (layout, samples) != ("single_token", "all_true")])
def test_sample_mask_equals_running_the_kept_samples_alone(layout, samples):
    kwargs, shape = SAMPLE_MASK_LAYOUTS[layout]
    samples = SAMPLE_MASKS[samples]
    torch.manual_seed(0)
    layer = LFQ(**kwargs).train()
    x = randn(*shape, seed=40)
    samples = torch.tensor(samples)
    (out, indices, aux), masked = layer(x, inv_temperature=1.0, mask=samples, return_loss_breakdown=True)
    (sub_out, sub_indices, sub_aux), alone = layer(kept_alone(x, samples), inv_temperature=1.0,
                                                   return_loss_breakdown=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    for a, b in zip(masked, alone):
        close(a, b, rtol=1e-5, atol=1e-6)
    close(aux, sub_aux, rtol=1e-5, atol=1e-6)
    # kept samples: the same codes and output; dropped samples: index -1, output zeros
    assert torch.equal(kept_alone(indices, samples), sub_indices)
    torch.testing.assert_close(kept_alone(out, samples), sub_out, rtol=1e-6, atol=1e-6)
    dropped = ~samples
    assert (indices[dropped] == -1).all() and (out[dropped] == 0).all()
    # the losses on the kept tokens, by brute force in fp64
    tokens = as_tokens(x, channel_first=x.ndim >= 4)
    ref = reference(layer, tokens, 1.0, mask=samples[:, None].expand(tokens.shape[:2]))
    close(masked.per_sample_entropy, ref["per_sample"], rtol=1e-4, atol=1e-5)
    close(masked.batch_entropy, ref["batch"], rtol=1e-4, atol=1e-5)
    close(masked.commitment, ref["commitment"], rtol=1e-5, atol=1e-6)
    if not samples.any():
        assert [t.item() for t in masked] == [0, 0, 0] and aux.item() == 0


@pytest.mark.parametrize("layout", list(SAMPLE_MASK_LAYOUTS))
def test_sample_mask_equals_its_per_token_form(layout):
    """(b,) and the same decision written per token, (b, ...spatial), give the same everything."""
    kwargs, shape = SAMPLE_MASK_LAYOUTS[layout]
    torch.manual_seed(0)
    layer = LFQ(**kwargs).train()
    x = randn(*shape, seed=41)
    samples = torch.arange(shape[0]) % 2 == 0
    per_token = token_mask(samples, x, x.ndim >= 4)
    (out, indices, aux), losses = layer(x, inv_temperature=1.0, mask=samples, return_loss_breakdown=True)
    (t_out, t_indices, t_aux), t_losses = layer(x, inv_temperature=1.0, mask=per_token, return_loss_breakdown=True)
    assert torch.equal(indices, t_indices) and torch.equal(out, t_out) and torch.equal(aux, t_aux)
    assert all(torch.equal(a, b) for a, b in zip(losses, t_losses))
    assert (indices[~samples] == -1).all()


@pytest.mark.parametrize("layout", ["sequence", "image_proj_codebooks", "video_spherical"])
def test_sample_mask_gradients(layout):
    """Dropped samples get a zero gradient, and the parameters the gradient of the kept samples alone."""
    kwargs, shape = SAMPLE_MASK_LAYOUTS[layout]
    torch.manual_seed(0)
    layer = LFQ(**kwargs, has_projections=True).train()  # parameters the dropped samples must not reach
    x = randn(*shape, seed=42)
    weights = randn(*shape, seed=43)
    samples = torch.tensor([False, True, True])
    grads = []
    for inp, mask, w in ((x, samples, weights), (kept_alone(x, samples), None, kept_alone(weights, samples))):
        inp = inp.clone().requires_grad_()
        out, _, aux = layer(inp, inv_temperature=1.0, mask=mask)
        ((out * w).sum() + aux).backward()
        grads.append((inp.grad, [p.grad.clone() for p in layer.parameters()]))
        layer.zero_grad()
    (x_grad, params), (sub_x_grad, sub_params) = grads
    assert (x_grad[~samples] == 0).all() and x_grad[samples].abs().sum() > 0
    torch.testing.assert_close(kept_alone(x_grad, samples), sub_x_grad, rtol=1e-5, atol=1e-6)
    for p, q in zip(params, sub_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_all_false_sample_mask():
    """Zero, finite losses; zero gradients; -1 everywhere; no buffer changes."""
    layer = LFQ(dim=16, codebook_size=2**4, commitment_loss_weight=1.0, orthogonal_rotation=True).train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = randn(2, 16, 4, 4, seed=44).requires_grad_()
    (out, indices, aux), breakdown = layer(x, mask=torch.zeros(2, dtype=torch.bool), return_loss_breakdown=True)
    assert [t.item() for t in breakdown] == [0, 0, 0] and aux.item() == 0 and torch.isfinite(aux)
    assert (indices == -1).all() and (out == 0).all() and out.shape == x.shape
    (out.square().sum() + aux).backward()
    assert (x.grad == 0).all() and all((p.grad == 0).all() for p in layer.parameters())
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_eval_sample_mask_decodes_like_forward():
    """Eval: the output equals indices_to_codes(indices) everywhere, dropped samples included
    (the peer's test_masked_lfq assertion), with projections and several codebooks."""
    torch.manual_seed(0)
    layer = LFQ(dim=12, codebook_size=2**3, num_codebooks=2).eval()
    x = randn(3, 12, 4, 5, seed=45)
    samples = torch.tensor([True, False, True])
    out, indices, aux = layer(x, mask=samples)
    assert torch.equal(layer.indices_to_codes(indices), out) and (out[1] == 0).all() and (indices[1] == -1).all()
    assert aux.item() == 0


@pytest.mark.parametrize("samples", [[True, False], [False, True], [False, False], [True, True]],
                         ids=["TF", "FT", "all_false", "all_true"])
def test_sample_mask_as_vector_quantize_pytorch(samples):
    """The peer's test_masked_lfq input, (2, 16, 32, 32) with a (2,) mask, same weights: the same
    kept codes, output and losses; where the peer differs (documented in docs/migrating.md),
    dropped samples get -1 and zeros here (the peer: the padding's own codes), and an all-False
    mask zero losses (the peer: NaN, a mean over no tokens)."""
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=16, codebook_size=2**4, num_codebooks=4, commitment_loss_weight=0.5)  # 16 bits, 4 codebooks
    T = 0.2
    torch.manual_seed(0)
    peer, ours = peer_module.LFQ(**kwargs).train(), LFQ(**kwargs).train()
    ours.load_state_dict(peer.state_dict())
    x = randn(2, 16, 32, 32, seed=46)
    samples = torch.tensor(samples)
    (o_ret, o_loss) = ours(x, inv_temperature=T, return_loss_breakdown=True, mask=samples)
    (p_ret, p_loss) = peer(x, inv_temperature=T, return_loss_breakdown=True, mask=samples)
    # the peer's own assertion holds for both
    assert (p_ret.quantized == peer.indices_to_codes(p_ret.indices)).all()
    assert (o_ret.quantized == ours.indices_to_codes(o_ret.indices)).all()
    assert torch.equal(o_ret.indices[samples], p_ret.indices[samples].long())
    torch.testing.assert_close(o_ret.quantized[samples], p_ret.quantized[samples], rtol=1e-6, atol=1e-6)
    assert (o_ret.indices[~samples] == -1).all() and (o_ret.quantized[~samples] == 0).all()
    if samples.any():
        # precondition: the peer's 1e-5 probability clamp does not bite on these tokens
        z = x.movedim(1, -1)[samples].reshape(-1, 4, 4).to(F64)
        assert (2 * T * z @ all_codes(4, 1.0).t()).softmax(-1).min() > 1e-5
        for a, b in zip(o_loss, p_loss):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(o_ret.entropy_aux_loss, p_ret.entropy_aux_loss, rtol=1e-4, atol=1e-5)
    else:
        assert all(t.isnan() for t in p_loss)  # the peer's bug
        assert [t.item() for t in o_loss] == [0, 0, 0] and o_ret.entropy_aux_loss.item() == 0


@pytest.mark.parametrize(
    "x_shape,mask_shape,expected",
    [
        ((2, 10, 4), (3,), r"\(2,\) or \(2, 10\)"),
        ((2, 10, 4), (2, 10, 1), r"\(2,\) or \(2, 10\)"),
        ((2, 4, 3, 5), (3,), r"\(2,\) or \(2, 3, 5\) or \(2, 15\)"),
        ((2, 4, 2, 3, 5), (2, 2), r"\(2,\) or \(2, 2, 3, 5\) or \(2, 30\)"),
        ((2, 4), (4,), r"\(2,\) or \(2, 1\)"),
    ],
    ids=["sequence_batch", "sequence_extra_axis", "image_batch", "video_short", "single_token_batch"],
)
def test_bad_mask_shape_names_the_accepted_shapes(x_shape, mask_shape, expected):
    layer = LFQ(dim=4).train()
    with pytest.raises(ValueError, match=rf"mask: expected a bool tensor of shape {expected} .*"
                                         rf"got torch.bool {re.escape(str(mask_shape))}"):
        layer(randn(*x_shape, seed=47), mask=torch.ones(mask_shape, dtype=torch.bool))


# ------------------------------------------------------------------------------------------
