"""A model trained with vector-quantize-pytorch (the peer, 1.32) keeps its codes in vq_layers.

Where vq_layers deliberately differs in a way that changes a trained model's codes, a peer
checkpoint (which cannot record our choice) gets the peer's behaviour, with one warning; our
own state dicts record the choice. Each test trains the *peer* layer a few steps, saves its
state dict, loads it strictly into ours and compares both on fresh input.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from reference import randn
from vq_layers import GroupedResidualFSQ, GroupedResidualVQ, ResidualFSQ, ResidualVQ

peer = pytest.importorskip("vector_quantize_pytorch")


def saved_and_loaded(state_dict):
    """A state dict as torch.save / torch.load give it back."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def train(model, x, steps=5, seed=0):
    """A few Adam steps on reconstruction (the quantizer's projections move; a model without
    parameters only runs its training forwards)."""
    torch.manual_seed(seed)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-2) if params else None
    for _ in range(steps):
        out = model(x)[0]
        if opt is not None:
            loss = (out - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def load_recording_warnings(model, state_dict):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model.load_state_dict(saved_and_loaded(state_dict))  # strict
    assert not result.missing_keys and not result.unexpected_keys
    return [w for w in caught if issubclass(w.category, UserWarning)]


def assert_same_codes(ours, theirs, x, **forward_kwargs):
    """Identical indices, outputs to float tolerance, and decoding from indices alike."""
    with torch.no_grad():
        out, indices = ours(x, **forward_kwargs)[:2]
        peer_out, peer_indices = theirs(x, **forward_kwargs)[:2]
        assert torch.equal(indices, peer_indices.long())
        torch.testing.assert_close(out, peer_out, rtol=1e-5, atol=1e-6)
        decoded = ours.get_output_from_indices(indices)
        if getattr(theirs, "is_channel_first", False):  # the peer decodes (b, n, q) to (b, n, d)
            peer_decoded = theirs.get_output_from_indices(peer_indices.transpose(1, 2)).transpose(1, 2)
        else:
            peer_decoded = theirs.get_output_from_indices(peer_indices)
        torch.testing.assert_close(decoded, peer_decoded, rtol=1e-5, atol=1e-6)


def stage_scale_warnings(caught):
    return [w for w in caught if "stage scales" in str(w.message)]


def levels_table(levels, num_quantizers, minus):
    base = torch.tensor(levels, dtype=torch.float32) - minus
    return torch.stack([base**-k for k in range(num_quantizers)])


# ------------------------------------------------------------------------------------------
# ResidualFSQ / GroupedResidualFSQ: stage scales (levels - 1)^-k here, levels^-k there

RFSQ_CASES = {
    "projections": (dict(dim=16, levels=[8, 5, 5, 5], num_quantizers=4), (4, 64, 16)),
    "no_projections": (dict(levels=[8, 5, 5, 5], num_quantizers=4), (4, 64, 4)),
    "dropout_channel_first": (dict(dim=12, levels=[7, 5, 3], num_quantizers=3, quantize_dropout=True,
                                   is_channel_first=True), (2, 12, 40)),
    "soft_clamp": (dict(dim=16, levels=[8, 6, 5], num_quantizers=3, bound_hard_clamp=False,
                        soft_clamp_input_value=1.5), (4, 64, 16)),
}


@pytest.mark.parametrize("case", list(RFSQ_CASES))
def test_residual_fsq_peer_checkpoint_keeps_codes(case):
    kwargs, shape = RFSQ_CASES[case]
    theirs = train(peer.ResidualFSQ(**kwargs), randn(*shape, seed=1))
    ours = ResidualFSQ(**kwargs)
    caught = load_recording_warnings(ours, theirs.state_dict())
    assert_same_codes(ours, theirs, randn(*shape, seed=2))
    assert len(stage_scale_warnings(caught)) == 1
    assert ours.stage_scales == "vector_quantize_pytorch"


class SoundStreamLike(nn.Module):
    """audiolm-pytorch's SoundStream with use_finite_scalar_quantizer=True, reduced: a conv
    encoder, GroupedResidualFSQ over channel-last latents (quantize dropout on), a conv decoder."""

    def __init__(self, module, groups=1):
        super().__init__()
        self.encoder = nn.Conv1d(1, 32, 4, stride=4)
        self.rq = module.GroupedResidualFSQ(dim=32, levels=[8, 5, 5, 5], num_quantizers=4, groups=groups,
                                            quantize_dropout=True, quantize_dropout_cutoff_index=1)
        self.decoder = nn.ConvTranspose1d(32, 1, 4, stride=4)

    def forward(self, wave):
        latents = self.encoder(wave).transpose(1, 2)
        quantized, indices = self.rq(latents)
        return self.decoder(quantized.transpose(1, 2)), indices


@pytest.mark.parametrize("groups", [1, 2])
def test_soundstream_like_checkpoint_keeps_tokens(groups):
    torch.manual_seed(0)
    theirs = train(SoundStreamLike(peer, groups), randn(4, 1, 256, seed=3))
    torch.manual_seed(1)  # other initial weights: all of them must come from the checkpoint
    ours = SoundStreamLike(__import__("vq_layers"), groups)
    caught = load_recording_warnings(ours, theirs.state_dict())
    wave = randn(4, 1, 256, seed=4)
    with torch.no_grad():
        out, tokens = ours.eval()(wave)
        peer_out, peer_tokens = theirs(wave)
    assert torch.equal(tokens, peer_tokens.long())
    torch.testing.assert_close(out, peer_out, rtol=1e-5, atol=1e-6)
    (warning,) = stage_scale_warnings(caught)  # one, for the grouped layer, naming where it is
    assert "GroupedResidualFSQ ('rq')" in str(warning.message)


def test_grouped_residual_fsq_peer_checkpoint_keeps_codes():
    kwargs = dict(dim=16, groups=2, levels=[8, 5, 5, 5], num_quantizers=3)
    theirs = train(peer.GroupedResidualFSQ(**kwargs), randn(4, 64, 16, seed=5))
    ours = GroupedResidualFSQ(**kwargs)
    caught = load_recording_warnings(ours, theirs.state_dict())
    assert_same_codes(ours, theirs, randn(4, 64, 16, seed=6))
    (warning,) = stage_scale_warnings(caught)
    message = str(warning.message)
    assert message.startswith("GroupedResidualFSQ:")
    assert "levels ** -k" in message and "stage_scales='vq_layers'" in message
    assert all(rvq.stage_scales == "vector_quantize_pytorch" for rvq in ours.rvqs)


def test_new_model_keeps_levels_minus_one_scales_and_records_them():
    levels, q = [8, 5, 5, 5], 4
    layer = ResidualFSQ(dim=16, levels=levels, num_quantizers=q)
    assert layer.stage_scales == "vq_layers"
    assert torch.equal(layer.scales, levels_table(levels, q, 1))
    assert torch.equal(layer.state_dict()["scales"], levels_table(levels, q, 1))
    grouped = GroupedResidualFSQ(dim=16, groups=2, levels=levels, num_quantizers=q)
    assert {"rvqs.0.scales", "rvqs.1.scales"} <= set(grouped.state_dict())
    # with one stage both rules give the scale 1: nothing to record, nor to warn about
    single = ResidualFSQ(dim=16, levels=levels, num_quantizers=1)
    assert "scales" not in single.state_dict()
    assert load_recording_warnings(single, peer.ResidualFSQ(dim=16, levels=levels, num_quantizers=1).state_dict()) == []


@pytest.mark.parametrize("cast", [None, torch.bfloat16])
def test_own_checkpoint_round_trips_our_scales(cast):
    """A vq_layers checkpoint loads with the scales it was trained with, whatever the new model
    was told (the record wins), even when a tool cast the state dict to bf16."""
    kwargs = dict(dim=16, levels=[8, 5, 5, 5], num_quantizers=4)
    trained = train(ResidualFSQ(**kwargs), randn(4, 64, 16, seed=7))
    state = trained.state_dict()
    if cast is not None:
        state = {k: v.to(cast) for k, v in state.items()}
    for stage_scales in (None, "vector_quantize_pytorch"):
        loaded = ResidualFSQ(**kwargs, stage_scales=stage_scales)
        assert load_recording_warnings(loaded, state) == []
        assert loaded.stage_scales == "vq_layers"
        assert torch.equal(loaded.scales, levels_table(kwargs["levels"], 4, 1))
        if cast is None:
            assert_same_codes(loaded.eval(), trained, randn(4, 64, 16, seed=8))


def test_peer_scales_round_trip_and_load_into_the_peer():
    """A model that took the peer's scales keeps them through our own checkpoints, and its state
    dict is the peer's: it loads strictly into the peer, which gives the same codes."""
    kwargs = dict(dim=16, levels=[8, 5, 5, 5], num_quantizers=4)
    theirs = train(peer.ResidualFSQ(**kwargs), randn(4, 64, 16, seed=9))
    first = ResidualFSQ(**kwargs)
    load_recording_warnings(first, theirs.state_dict())
    assert "scales" not in first.state_dict()
    again = ResidualFSQ(**kwargs, stage_scales="vector_quantize_pytorch")  # told: no warning
    assert load_recording_warnings(again, first.state_dict()) == []
    assert_same_codes(again.eval(), theirs, randn(4, 64, 16, seed=10))

    back = peer.ResidualFSQ(**kwargs).eval()
    back.load_state_dict(saved_and_loaded(again.state_dict()))  # strict
    assert_same_codes(again, back, randn(4, 64, 16, seed=11))


def test_peer_refuses_our_scales_strictly():
    """Our scales would give other codes in the peer: its strict load names the entry."""
    ours = ResidualFSQ(dim=16, levels=[8, 5, 5, 5], num_quantizers=4)
    with pytest.raises(RuntimeError, match="scales"):
        peer.ResidualFSQ(dim=16, levels=[8, 5, 5, 5], num_quantizers=4).load_state_dict(ours.state_dict())


def test_opt_in_keeps_our_scales_for_an_unrecorded_checkpoint():
    """A vq_layers checkpoint from before the record (no `scales` entry) was trained with ours:
    stage_scales='vq_layers' keeps them, silently; without it the peer's are taken, with the warning."""
    kwargs = dict(dim=16, levels=[8, 5, 5, 5], num_quantizers=4)
    trained = train(ResidualFSQ(**kwargs), randn(4, 64, 16, seed=12))
    old_style = {k: v for k, v in trained.state_dict().items() if k != "scales"}

    told = ResidualFSQ(**kwargs, stage_scales="vq_layers")
    assert load_recording_warnings(told, old_style) == []
    assert told.stage_scales == "vq_layers"
    assert_same_codes(told.eval(), trained, randn(4, 64, 16, seed=13))

    untold = ResidualFSQ(**kwargs)
    assert len(stage_scale_warnings(load_recording_warnings(untold, old_style))) == 1
    assert torch.equal(untold.scales, levels_table(kwargs["levels"], 4, 0))


def test_new_model_with_peer_scales_equals_the_peer():
    kwargs = dict(dim=16, levels=[8, 5, 5, 5], num_quantizers=4)
    theirs = peer.ResidualFSQ(**kwargs).eval()
    ours = ResidualFSQ(**kwargs, stage_scales="vector_quantize_pytorch").eval()
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.scales, theirs.scales)
    assert_same_codes(ours, theirs, randn(4, 64, 16, seed=14))


def test_bad_stage_scales():
    with pytest.raises(ValueError, match="stage_scales"):
        ResidualFSQ(levels=[5, 5], num_quantizers=2, stage_scales="peer")
    ours = ResidualFSQ(levels=[5, 5], num_quantizers=2)
    state = ours.state_dict()
    state["scales"] = state["scales"] * 3
    with pytest.raises(RuntimeError, match="scales: expected the stage scales"):
        ResidualFSQ(levels=[5, 5], num_quantizers=2).load_state_dict(state)


# ------------------------------------------------------------------------------------------
# ResidualVQ / GroupedResidualVQ: our beam search never prunes the greedy path, the peer's may
# (neither dominates: each finds the better path on some tokens)

BEAM = dict(dim=16, codebook_size=16, num_quantizers=4, beam_size=2)


def beam_warnings(caught):
    return [w for w in caught if "beam-search procedure" in str(w.message)]


def trained_peer_rvq(module=None, seed=15, **kwargs):
    """EMA codebooks trained by the peer's training forwards (beam search in training too)."""
    torch.manual_seed(0)
    model = (module or peer).ResidualVQ(**{**BEAM, **kwargs})
    return train(model, randn(16, 256, 16, seed=seed), steps=10)


def test_residual_vq_beam_search_peer_checkpoint_keeps_codes():
    theirs = trained_peer_rvq(codebook_dim=8)  # projections trained too
    ours = ResidualVQ(**BEAM, codebook_dim=8)
    caught = load_recording_warnings(ours, theirs.state_dict())
    x = randn(16, 256, 16, seed=16)
    assert_same_codes(ours.eval(), theirs, x)
    (warning,) = beam_warnings(caught)
    assert "beam_keep_greedy=True" in str(warning.message)
    assert ours.beam_keep_greedy is False
    # on these tokens the procedures differ: our default would choose other codes on some
    with torch.no_grad():
        fresh = ResidualVQ(**BEAM, codebook_dim=8, beam_keep_greedy=True).eval()
        fresh.load_state_dict(theirs.state_dict())
        assert not torch.equal(fresh(x)[1], theirs(x)[1].long())


def test_grouped_residual_vq_eval_beam_peer_checkpoint_keeps_codes():
    kwargs = dict(dim=32, groups=2, codebook_size=16, num_quantizers=4, beam_size=1, eval_beam_size=2)
    torch.manual_seed(0)
    theirs = train(peer.GroupedResidualVQ(**kwargs), randn(16, 256, 32, seed=17), steps=10)
    ours = GroupedResidualVQ(**kwargs)
    caught = load_recording_warnings(ours, theirs.state_dict())
    x = randn(16, 256, 32, seed=18)
    with torch.no_grad():
        out, indices, _ = ours.eval()(x)
        peer_out, peer_indices, _ = theirs(x)
    assert torch.equal(indices, peer_indices.long())
    torch.testing.assert_close(out, peer_out, rtol=1e-5, atol=1e-6)
    (warning,) = beam_warnings(caught)
    assert str(warning.message).startswith("GroupedResidualVQ:")


def test_new_residual_vq_keeps_greedy_and_records_it():
    ours = ResidualVQ(**BEAM)
    assert ours.beam_keep_greedy is True
    assert ours.state_dict()["beam_keep_greedy"].item() is True
    # the record wins over the keyword; a round trip keeps it, silently
    trained = train(ResidualVQ(**BEAM), randn(16, 256, 16, seed=19), steps=3)
    for keep_greedy in (None, False):
        loaded = ResidualVQ(**BEAM, beam_keep_greedy=keep_greedy)
        assert load_recording_warnings(loaded, trained.state_dict()) == []
        assert loaded.beam_keep_greedy is True
        assert_same_codes(loaded.eval(), trained, randn(16, 256, 16, seed=20))
    # the peer refuses it strictly (it would search otherwise)
    with pytest.raises(RuntimeError, match="beam_keep_greedy"):
        peer.ResidualVQ(**BEAM).load_state_dict(trained.state_dict())


def test_residual_vq_beam_opt_in_and_peer_procedure_state_dict():
    """An unrecorded checkpoint trained with ours keeps it with beam_keep_greedy=True; a model
    with the peer's procedure writes the peer's state dict, which the peer loads strictly."""
    trained = train(ResidualVQ(**BEAM), randn(16, 256, 16, seed=21), steps=3)
    old_style = {k: v for k, v in trained.state_dict().items() if k != "beam_keep_greedy"}
    told = ResidualVQ(**BEAM, beam_keep_greedy=True)
    assert load_recording_warnings(told, old_style) == []
    assert told.beam_keep_greedy is True

    theirs = trained_peer_rvq()
    ours = ResidualVQ(**BEAM, beam_keep_greedy=False)
    assert load_recording_warnings(ours, theirs.state_dict()) == []
    assert "beam_keep_greedy" not in ours.state_dict()
    back = peer.ResidualVQ(**BEAM).eval()
    back.load_state_dict(saved_and_loaded(ours.state_dict()))  # strict
    assert_same_codes(ours.eval(), back, randn(16, 256, 16, seed=22))
    with pytest.raises(ValueError, match="beam_keep_greedy"):
        ResidualVQ(**BEAM, beam_keep_greedy="yes")


def test_residual_vq_without_beam_search_records_nothing_and_never_warns():
    """A model whose constructor enables no beam search keeps the peer's state dict, and loading
    a peer checkpoint says nothing; forward(beam_size=...) then searches as the peer does."""
    kwargs = {**BEAM, "beam_size": None}
    ours = ResidualVQ(**kwargs)
    assert ours.beam_keep_greedy is True and "beam_keep_greedy" not in ours.state_dict()
    theirs = trained_peer_rvq(beam_size=None)
    assert load_recording_warnings(ours, theirs.state_dict()) == []
    assert ours.beam_keep_greedy is False
    x = randn(16, 256, 16, seed=23)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x, beam_size=2)[1], theirs(x, beam_size=2)[1].long())
