"""ResidualVQ's validation and edge cases: bad configuration, input and indices raise naming the
argument (buffers untouched), non-finite training input, torch.compile against eager, empty and
2-d inputs."""

from __future__ import annotations

import pytest
import torch

from reference import randn
from rvq_reference import assert_buffers_equal, codebook_state
from test_compile import assert_compiled_matches_eager
from vq_layers import ResidualVQ

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# ------------------------------------------------------------------------------------------
# bad configuration and input


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(heads=2), "heads"),
        (dict(channel_last=False), "channel_last"),
        (dict(accept_3d_fmap=True), "accept_3d_fmap"),
        (dict(separate_codebook_per_head=True), "separate_codebook_per_head"),
        (dict(num_quantizers=0), "num_quantizers"),
        (dict(quantize_dropout=True, quantize_dropout_cutoff_index=3), "quantize_dropout_cutoff_index"),
        (dict(quantize_dropout_multiple_of=0), "quantize_dropout_multiple_of"),
        (dict(codebook_size=0), "codebook_size"),
        (dict(dim=0), "dim"),
        (dict(decay=1.5), "decay"),
    ],
    ids=["heads", "channel_last", "3d_fmap", "separate_codebooks", "q_0", "cutoff", "multiple_of", "size_0",
         "dim_0", "decay"],
)
def test_bad_config_raises_naming_the_argument(kwargs, name):
    base = dict(dim=8, num_quantizers=3, codebook_size=16)
    with pytest.raises((ValueError, TypeError), match=name):
        ResidualVQ(**{**base, **kwargs})


def test_bad_input_raises_naming_the_argument():
    rvq = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16)
    with pytest.raises(ValueError, match="dim 12.*got 10"):
        rvq(randn(2, 5, 10))
    with pytest.raises(ValueError, match="dim"):
        ResidualVQ(dim=12, num_quantizers=2, codebook_size=8, accept_image_fmap=True)(randn(2, 10, 3, 12))
    with pytest.raises(TypeError, match="input"):
        rvq(torch.ones(2, 5, 12, dtype=torch.long))
    x = randn(2, 5, 12)
    with pytest.raises(ValueError, match="mask"):
        rvq(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="mask"):
        rvq(x, mask=torch.ones(2, 5))


@pytest.mark.parametrize(
    "bad,error",
    [
        (torch.full((2, 5, 3), 16), ValueError),  # == codebook_size
        (torch.full((2, 5, 3), -1), ValueError),  # dropped stages cannot be teacher-forced
        (torch.zeros(2, 5, 2, dtype=torch.long), ValueError),  # too few quantizers
        (torch.zeros(2, 4, 3, dtype=torch.long), ValueError),  # wrong length
        (torch.zeros(2, 5, 3), TypeError),  # float
    ],
    ids=["too_large", "minus_one", "few_quantizers", "wrong_n", "float"],
)
def test_forward_with_bad_indices_raises(bad, error):
    rvq = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16).train()
    saved = codebook_state(rvq)
    with pytest.raises(error, match="indices"):
        rvq(randn(2, 5, 12), indices=bad)
    assert_buffers_equal(rvq, saved)


@pytest.mark.parametrize(
    "bad,error",
    [
        (torch.full((2, 5, 3), 16), ValueError),  # == codebook_size
        (torch.full((2, 5, 3), -2), ValueError),  # below -1 (the only marker)
        (torch.zeros(2, 5, 4, dtype=torch.long), ValueError),  # more quantizers than layers
        (torch.tensor(3), ValueError),  # no quantizer axis
        (torch.zeros(2, 5, 3), TypeError),  # float
        (torch.zeros(2, 5, 3, dtype=torch.bool), TypeError),  # bool
    ],
    ids=["too_large", "below_minus_one", "many_quantizers", "scalar", "float", "bool"],
)
@pytest.mark.parametrize("method", ["get_output_from_indices", "get_codes_from_indices"])
def test_decoding_bad_indices_raises(method, bad, error):
    rvq = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16)
    with pytest.raises(error, match="indices"):
        getattr(rvq, method)(bad)


def test_non_finite_training_input_raises_before_touching_buffers():
    for shared in (False, True):
        rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, shared_codebook=shared).train()
        saved = codebook_state(rvq)
        x = randn(2, 5, 4)
        x[1, 2, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            rvq(x.requires_grad_(True))
        assert_buffers_equal(rvq, saved)


def test_compile_fullgraph_training_matches_eager():
    """torch.compile(fullgraph=True): every stage's EMA step, the output and the gradients as
    eager; a NaN batch raises before any stage's buffers changed."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16)
    assert_compiled_matches_eager(rvq, (2, 12, 8), mask=True)


@pytest.mark.parametrize("shape", [(2, 0, 12), (0, 5, 12), (3, 12)], ids=["n0", "b0", "2d"])
def test_empty_and_2d_inputs(shape):
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=12, codebook_dim=4, num_quantizers=3, codebook_size=16).eval()
    x = randn(*shape, seed=43)
    out, indices, losses = rvq(x)
    assert out.shape == x.shape and indices.shape == (*shape[:-1], 3) and losses.shape == (3,)
    assert torch.equal(rvq.get_output_from_indices(indices), out)
    rvq.train()
    saved = codebook_state(rvq)
    if x.numel() == 0:  # an empty training batch leaves the statistics alone
        out, indices, losses = rvq(x.requires_grad_(True))
        assert out.shape == x.shape and (losses == 0).all()
        assert_buffers_equal(rvq, saved)
