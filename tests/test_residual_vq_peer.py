"""ResidualVQ and GroupedResidualVQ as drop-ins for vector-quantize-pytorch: keywords, state dict,
call structure, codes, outputs and one training step against the peer (skipped without it)."""

from __future__ import annotations

import inspect

import pytest
import torch

from reference import call_structure, close, randn
from vq_layers import GroupedResidualVQ, ResidualVQ

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# ------------------------------------------------------------------------------------------
# drop-in for vector-quantize-pytorch


PEER_CONFIGS = [
    dict(dim=8, num_quantizers=3, codebook_size=16),
    dict(dim=12, num_quantizers=3, codebook_size=16, codebook_dim=4),
    dict(dim=12, num_quantizers=4, codebook_size=16, codebook_dim=4, quantize_dropout=True,
         quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2),
    dict(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True),
    dict(dim=8, num_quantizers=2, codebook_size=16, kmeans_init=True, kmeans_iters=3, decay=0.9, eps=1e-4,
         threshold_ema_dead_code=1, commitment_weight=0.5, rotation_trick=False),
    dict(dim=8, num_quantizers=2, codebook_size=16, use_cosine_sim=True, orthogonal_reg_weight=0.1,
         return_zeros_for_masked_padding=False),
    dict(dim=8, num_quantizers=2, codebook_size=16, learnable_codebook=True, ema_update=False,
         commitment_use_cross_entropy_loss=True),
    dict(dim=8, num_quantizers=2, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=0.5,
         straight_through=True, rotation_trick=False, codebook_diversity_loss_weight=0.1, heads=1),
]


@pytest.mark.parametrize("kwargs", PEER_CONFIGS, ids=range(len(PEER_CONFIGS)))
def test_same_keywords_state_dict_and_call_structure_as_peer(kwargs):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    peer = peer_module.ResidualVQ(**kwargs)
    ours = ResidualVQ(**kwargs)
    assert set(ours.state_dict()) == set(peer.state_dict())
    ours.load_state_dict(peer.state_dict())  # strict, both ways
    peer.load_state_dict(ours.state_dict())
    x = randn(2, 7, kwargs["dim"], seed=39).requires_grad_(True)
    for train in (True, False):
        ours.train(train), peer.train(train)
        for all_codes in (False, True):
            ours_out = ours(x, return_all_codes=all_codes, rand_quantize_dropout_fixed_seed=3)
            peer_out = peer(x, return_all_codes=all_codes, rand_quantize_dropout_fixed_seed=3)
            assert call_structure(ours_out) == call_structure(peer_out)
    assert ours.codebook_size == peer.codebook_size
    assert ours.codebooks.shape == peer.codebooks.shape


@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("dim", [6, 12], ids=["no_proj", "proj"])
def test_same_codes_and_outputs_as_peer(dim, masked):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=dim, codebook_dim=6, num_quantizers=3, codebook_size=32, rotation_trick=False,
                  kmeans_init=False, decay=0.8)
    torch.manual_seed(0)
    peer = peer_module.ResidualVQ(**kwargs)
    ours = ResidualVQ(**kwargs)
    ours.load_state_dict(peer.state_dict())
    x = randn(2, 25, dim, seed=40)
    mask = randn(2, 25, seed=41) > -0.5 if masked else None
    peer.eval(), ours.eval()
    p_out, p_idx, _, p_codes = peer(x, mask=mask, return_all_codes=True)
    o_out, o_idx, _, o_codes = ours(x, mask=mask, return_all_codes=True)
    kept = torch.ones(2, 25, dtype=torch.bool) if mask is None else mask
    assert torch.equal(o_idx[kept], p_idx.long()[kept])
    close(o_out, p_out, rtol=1e-6, atol=1e-6)
    close(o_codes[:, kept], p_codes[:, kept], rtol=0, atol=0)
    if mask is None:
        close(ours.get_output_from_indices(o_idx), peer.get_output_from_indices(p_idx), rtol=1e-6, atol=1e-6)
    # one training step (non-shared: no documented difference): same codes, same EMA buffers
    peer.train(), ours.train()
    p_out, p_idx, p_losses = peer(x, mask=mask)
    o_out, o_idx, o_losses = ours(x.clone().requires_grad_(True), mask=mask)
    assert torch.equal(o_idx[kept], p_idx.long()[kept])
    # the peer's masked commitment loss is documented as wrong with projections
    if not ours.has_projections or mask is None:
        close(o_losses, p_losses, rtol=1e-5, atol=1e-7)
    peer_state = peer.state_dict()
    for name, buf in ours.state_dict().items():
        close(buf.float(), peer_state[name].float(), rtol=1e-5, atol=1e-6, msg=f"state {name}")


def test_drop_in_signatures_and_unprovided_keywords():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    unprovided = set()
    for name in ("ResidualVQ", "GroupedResidualVQ"):
        ours = {"ResidualVQ": ResidualVQ, "GroupedResidualVQ": GroupedResidualVQ}[name]
        peer = getattr(peer_module, name)
        for method in ("__init__", "forward", "get_output_from_indices", "get_codes_from_indices"):
            theirs = {p.name for p in inspect.signature(getattr(peer, method)).parameters.values()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - unprovided
            mine = set(inspect.signature(getattr(ours, method)).parameters)
            assert theirs <= mine, f"{name}.{method} lacks {theirs - mine}"


def test_grouped_same_as_peer():
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    kwargs = dict(dim=12, groups=2, num_quantizers=3, codebook_size=16, codebook_dim=4, rotation_trick=False)
    torch.manual_seed(0)
    peer = peer_module.GroupedResidualVQ(**kwargs).eval()
    ours = GroupedResidualVQ(**kwargs).eval()
    assert set(ours.state_dict()) == set(peer.state_dict())
    ours.load_state_dict(peer.state_dict())
    peer.load_state_dict(ours.state_dict())
    x = randn(2, 9, 12, seed=42)
    for all_codes in (False, True):
        o, p = ours(x, return_all_codes=all_codes), peer(x, return_all_codes=all_codes)
        assert len(o) == len(p)
        assert call_structure(o[:3]) == call_structure(p[:3])
        assert torch.equal(o[1], p[1].long())
        close(o[0], p[0], rtol=1e-6, atol=1e-6)
        if all_codes:  # ours stacks the groups' codes (g, q, b, n, d); the peer returns a tuple of them
            close(o[3], torch.stack(p[3]), rtol=0, atol=0)
    assert ours.codebooks.shape == peer.codebooks.shape
