"""Non-finite input never becomes a code (docs/precision.md, "Non-finite input").

For every public layer, in training and eval, with NaN, +inf and -inf: the token whose input
holds one gets index -1 (every index of it: codebooks, stages, groups) and a NaN output, every
loss is NaN, and every other token's indices and output are those of the same batch with a
finite value in its place (an independent run, compared bitwise). Layers whose training step
updates codebook statistics still raise there, with every buffer and parameter untouched, and
follow the rule on their no_grad and frozen paths. Decoding takes -1 as no code (zeros) and
still refuses -2. The dtype matrix (tests/dtype_matrix.py) runs the rule in every dtype mix.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from dtype_matrix import CPU_AUTOCASTS, Parts, dtype_matrix, run_non_finite_cell
from reference import randn
from vq_layers import (
    FSP,
    FSQ,
    LFQ,
    BinaryMapper,
    GroupedResidualFSQ,
    GroupedResidualLFQ,
    GroupedResidualVQ,
    HierarchicalVQ,
    LatentQuantize,
    RandomProjectionQuantizer,
    ResidualFSQ,
    ResidualLFQ,
    ResidualSimVQ,
    ResidualVQ,
    SimVQ,
    VectorQuantize,
)

KINDS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
BAD_TOKEN, BAD_FEATURE = (0, 1), 1  # sample 0, token 1 (token layout); feature 1 is in group 0's slice


@pytest.fixture(autouse=True, scope="module")
def _fast(one_intra_op_thread):
    yield


def tokens(t: Tensor, channel_first: bool) -> Tensor:
    """A layer's output (b, ..., d) or (b, d, ...) -> token layout (b, n, d)."""
    t = t.movedim(1, -1) if channel_first else t
    return t.reshape(t.shape[0], -1, t.shape[-1])


def per_token(t: Tensor, b: int, n: int) -> Tensor:
    """Indices or per-token values (b, ...spatial[, extra]) -> (b, n, extra...)."""
    return t.reshape(b, n, -1)


def with_value(x: Tensor, feature_axis: int, token: tuple[int, int], feature: int, value: float) -> Tensor:
    """x with one feature of one token (token layout (sample, position)) set to `value`."""
    x = x.clone()
    moved = x.movedim(feature_axis, -1)  # a view: writing it writes x
    position = torch.unravel_index(torch.tensor(token[1]), moved.shape[1:-1])
    moved[(token[0], *(int(p) for p in position), feature)] = value
    return x


@dataclass
class Seen:
    """What a forward returned, in token layout (b, n, ...)."""
    out: Tensor | None
    indices: Tensor | None
    losses: list = field(default_factory=list)  # over the batch: all NaN with a non-finite token
    extras: list = field(default_factory=list)  # per token (b, n, ...): NaN / -1 at it


@dataclass
class Case:
    make: Callable[[], nn.Module]
    shape: tuple
    channel_first: bool  # features on axis 1 of the input and the output
    unpack: Callable  # (result, b, n) -> Seen
    call: Callable = lambda layer, x: layer(x)
    decode: Callable | None = None  # (layer, result) -> the output decoded from the returned indices
    statistics: bool = False  # its training step updates statistics: raises for non-finite input
    frozen: Callable | None = None  # a training call that updates nothing

    @property
    def feature_axis(self) -> int:
        return 1 if self.channel_first else -1


def plain(channel_first=False):
    """(out, indices[, loss]) -> Seen."""
    def unpack(result, b, n):
        out, indices, *losses = result
        return Seen(tokens(out, channel_first), per_token(indices, b, n), list(losses))
    return unpack


def with_codes(channel_first=False, indices_layout=lambda i: i):
    """(out, indices[, losses], all_codes (q, b, ..., d)) -> Seen, all_codes per token."""
    def unpack(result, b, n):
        out, indices, *losses, all_codes = result
        codes = all_codes.movedim(2, -1) if channel_first else all_codes
        codes = codes.reshape(codes.shape[0], b, n, -1).movedim(0, 2)
        return Seen(tokens(out, channel_first), per_token(indices_layout(indices), b, n), list(losses), [codes])
    return unpack


def grouped(result, b, n):
    """(out, indices (g, b, n, q), losses (g, q)) -> Seen."""
    out, indices, losses = result
    return Seen(tokens(out, False), per_token(indices.movedim(0, -1), b, n), [losses])


def with_breakdown(result, b, n):
    """((out, indices, loss), breakdown) -> Seen; LFQ's Return and VectorQuantize's 4-tuple."""
    if len(result) == 2:
        (out, indices, loss), breakdown = result
    else:
        out, indices, loss, breakdown = result
    return Seen(tokens(out, False), per_token(indices, b, n), [loss, *breakdown])


def topk(result, b, n):
    out, indices, loss = result  # (b, n, k, d), (b, n, k), per-position (b, n, k)
    return Seen(out.reshape(b, n, -1), indices, [], [loss])


def output_and_loss(result, b, n):
    out, loss = result
    return Seen(tokens(out, False), None, [loss])


def targets_and_loss(result, b, n):
    """RandomProjectionQuantizer's (targets, cross-entropy to given targets)."""
    targets, loss = result
    return Seen(None, per_token(targets, b, n), [loss])


def fsp(result, b, n):
    out, indices, loss, info = result
    batch = [loss, *info["norm_info"].values()] + ([info["p_accept_prob"]] if "p_accept_prob" in info else [])
    return Seen(tokens(out, False), per_token(indices, b, n), batch, [per_token(info["level_indices"], b, n)])


def binary_mapper(result, b, n):
    one_hot, indices, loss = result
    if loss.ndim:  # per token (reduce_aux_kl_loss=False)
        return Seen(tokens(one_hot, False), per_token(indices, b, n), [], [loss.reshape(b, n)])
    return Seen(tokens(one_hot, False), per_token(indices, b, n), [loss])


def decode_output(channel_first=False):
    return lambda layer, result: tokens(layer.get_output_from_indices(result[1]), channel_first)


def decode_codes(channel_first=False):
    return lambda layer, result: tokens(layer.indices_to_codes(result[1]), channel_first)


TARGETS = torch.randint(0, 16, (2, 5, 2), generator=torch.Generator().manual_seed(7))
NO_TARGET = TARGETS.clone()
NO_TARGET[BAD_TOKEN] = -1  # what the quantizer's own targets give that token: the loss is NaN still

CASES = {
    "FSQ": Case(lambda: FSQ([8, 5, 5]), (2, 5, 3), False, plain(), decode=decode_codes()),
    "FSQ-image-projected-2-codebooks-noise": Case(
        lambda: FSQ([5, 5, 5], dim=8, num_codebooks=2, preserve_symmetry=True, noise_dropout=0.5),
        (2, 8, 2, 3), True, plain(True), decode=decode_codes(True)),
    "ResidualFSQ-all-codes": Case(
        lambda: ResidualFSQ(dim=6, levels=[5, 5, 5], num_quantizers=3), (2, 5, 6), False, with_codes(),
        call=lambda layer, x: layer(x, return_all_codes=True), decode=decode_output()),
    "ResidualFSQ-channel-first": Case(
        lambda: ResidualFSQ(dim=6, levels=[5, 5, 5], num_quantizers=2, is_channel_first=True), (2, 6, 5), True,
        lambda r, b, n: Seen(tokens(r[0], True), per_token(r[1].movedim(1, -1), b, n)), decode=decode_output(True)),
    "GroupedResidualFSQ": Case(
        lambda: GroupedResidualFSQ(dim=6, groups=2, levels=[5, 5, 5], num_quantizers=2), (2, 5, 6), False,
        lambda r, b, n: Seen(tokens(r[0], False), per_token(r[1].movedim(0, -1), b, n)), decode=decode_output()),
    "LFQ-projected-breakdown": Case(
        lambda: LFQ(dim=6, codebook_size=16, commitment_loss_weight=0.1), (2, 5, 6), False, with_breakdown,
        call=lambda layer, x: layer(x, return_loss_breakdown=True),
        decode=lambda layer, r: layer.indices_to_codes(r[0][1])),
    "LFQ-image-2-codebooks-spherical": Case(
        lambda: LFQ(dim=8, codebook_size=16, num_codebooks=2, spherical=True), (2, 8, 2, 3), True, plain(True),
        decode=decode_codes(True)),
    "ResidualLFQ-all-codes": Case(
        lambda: ResidualLFQ(dim=6, num_quantizers=2, codebook_size=16), (2, 5, 6), False, with_codes(),
        call=lambda layer, x: layer(x, return_all_codes=True), decode=decode_output()),
    "GroupedResidualLFQ": Case(
        lambda: GroupedResidualLFQ(dim=8, groups=2, num_quantizers=2, codebook_size=16), (2, 5, 8), False, grouped,
        decode=decode_output()),
    "VectorQuantize-breakdown": Case(
        lambda: VectorQuantize(dim=6, codebook_dim=4, codebook_size=16), (2, 5, 6), False, with_breakdown,
        call=lambda layer, x: layer(x, return_loss_breakdown=True), decode=decode_output(), statistics=True,
        frozen=lambda layer, x: layer(x, return_loss_breakdown=True, freeze_codebook=True)),
    "VectorQuantize-heads-image": Case(
        lambda: VectorQuantize(dim=8, codebook_dim=4, heads=2, separate_codebook_per_head=True, codebook_size=16,
                               accept_image_fmap=True), (2, 8, 2, 3), True, plain(True),
        decode=decode_output(True), statistics=True, frozen=lambda layer, x: layer(x, freeze_codebook=True)),
    "VectorQuantize-topk": Case(
        lambda: VectorQuantize(dim=4, codebook_size=16), (2, 5, 4), False, topk,
        call=lambda layer, x: layer(x, topk=2), statistics=True,
        frozen=lambda layer, x: layer(x, topk=2, freeze_codebook=True)),
    "VectorQuantize-given-indices": Case(
        lambda: VectorQuantize(dim=4, codebook_size=16), (2, 5, 4), False, output_and_loss,
        call=lambda layer, x: layer(x, indices=TARGETS[..., 0])),
    "ResidualVQ-all-codes": Case(
        lambda: ResidualVQ(dim=6, codebook_dim=4, num_quantizers=2, codebook_size=16), (2, 5, 6), False,
        with_codes(), call=lambda layer, x: layer(x, return_all_codes=True), decode=decode_output(),
        statistics=True, frozen=lambda layer, x: layer(x, return_all_codes=True, freeze_codebook=True)),
    "ResidualVQ-beam-search": Case(
        lambda: ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, beam_size=2), (2, 5, 4), False, plain(),
        decode=decode_output(), statistics=True, frozen=lambda layer, x: layer(x, freeze_codebook=True)),
    "ResidualVQ-given-indices": Case(
        lambda: ResidualVQ(dim=4, num_quantizers=2, codebook_size=16), (2, 5, 4), False, output_and_loss,
        call=lambda layer, x: layer(x, indices=TARGETS)),
    "GroupedResidualVQ": Case(
        lambda: GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=16), (2, 5, 8), False, grouped,
        decode=decode_output(), statistics=True, frozen=lambda layer, x: layer(x, freeze_codebook=True)),
    "RandomProjectionQuantizer-targets-and-loss": Case(
        lambda: RandomProjectionQuantizer(dim=4, codebook_size=16, codebook_dim=4, num_codebooks=2), (2, 5, 4),
        False, targets_and_loss, call=lambda layer, x: (layer(x), layer(x, indices=NO_TARGET))),
    "SimVQ": Case(lambda: SimVQ(dim=4, codebook_size=16), (2, 5, 4), False, plain(), decode=decode_codes()),
    "ResidualSimVQ-all-codes": Case(
        lambda: ResidualSimVQ(dim=4, num_quantizers=2, codebook_size=16), (2, 5, 4), False, with_codes(),
        call=lambda layer, x: layer(x, return_all_codes=True), decode=decode_output()),
    "LatentQuantize": Case(lambda: LatentQuantize([5, 5, 5], dim=6), (2, 6, 5), True, plain(True),
                           decode=decode_codes(True)),
    "LatentQuantize-in-place-optimizer": Case(
        lambda: LatentQuantize([5, 5, 5], dim=3, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)),
        (2, 3, 5), True, plain(True), decode=decode_codes(True), statistics=True),
    "FSP": Case(lambda: FSP([5, 5, 5], dim=6, quantize_rate=0.5), (2, 5, 6), False, fsp, decode=decode_codes()),
    "BinaryMapper": Case(lambda: BinaryMapper(3), (2, 5, 3), False, binary_mapper,
                         call=lambda layer, x: layer(x, return_indices=True, calc_aux_loss=True)),
    "BinaryMapper-per-token-loss": Case(
        lambda: BinaryMapper(3), (2, 5, 3), False, binary_mapper,
        call=lambda layer, x: layer(x, return_indices=True, calc_aux_loss=True, reduce_aux_kl_loss=False)),
}


def batch_and_tokens(case: Case) -> tuple[int, int]:
    return case.shape[0], math.prod(case.shape[1:]) // case.shape[case.feature_axis]


def state(layer: nn.Module) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_state_equal(layer: nn.Module, saved: dict) -> None:
    now = layer.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), k


def forward(case: Case, layer: nn.Module, x: Tensor, mode: str) -> Seen:
    """One forward in `mode` on a copy of the layer (the same random draws for every call)."""
    layer = copy.deepcopy(layer).train(mode != "eval")
    if mode in ("train", "frozen"):  # the straight-through paths too
        x = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    if mode == "no_grad":
        with torch.no_grad():
            result = case.call(layer, x)
    else:
        result = (case.frozen if mode == "frozen" else case.call)(layer, x)
    return case.unpack(result, *batch_and_tokens(case))


def assert_rule(bad: Seen, clean: Seen, shape: tuple[int, int]) -> None:
    """The token BAD_TOKEN of `bad` has no code; every other token is as in `clean`."""
    at = torch.zeros(shape, dtype=torch.bool)
    at[BAD_TOKEN] = True
    for got, want in [(bad.out, clean.out), (bad.indices, clean.indices), *zip(bad.extras, clean.extras)]:
        if got is None:
            continue
        assert got.shape == want.shape and got.dtype == want.dtype
        marker = got[at].isnan().all() if got.is_floating_point() else (got[at] == -1).all()
        assert marker, f"not {'NaN' if got.is_floating_point() else -1} at the non-finite token: {got[at]}"
        assert torch.equal(got[~at], want[~at]), "another token changed"
    if clean.indices is not None:
        assert (clean.indices >= 0).all()
    assert len(bad.losses) == len(clean.losses)
    for got, want in zip(bad.losses, clean.losses):
        assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
        assert got.isnan().all(), f"loss not NaN: {got}"
        assert torch.isfinite(want).all()


def modes(name: str) -> list[str]:
    case = CASES[name]
    return ["train", "eval"] + (["frozen"] if case.frozen is not None else [])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name, mode", [(name, mode) for name in CASES for mode in modes(name)])
def test_a_non_finite_token_has_no_code_and_the_others_are_untouched(name, mode, kind):
    case = CASES[name]
    torch.manual_seed(0)
    layer = case.make()
    x = randn(*case.shape, seed=3)
    bad_x = with_value(x, case.feature_axis, BAD_TOKEN, BAD_FEATURE, KINDS[kind])
    if mode == "train" and case.statistics:
        # the training step refuses the batch before any buffer or parameter changes, ...
        trained = copy.deepcopy(layer).train()
        saved = state(trained)
        with pytest.raises(ValueError, match="NaN"):
            case.call(trained, bad_x.requires_grad_(True))
        assert_state_equal(trained, saved)
        bad_x = bad_x.detach()
        mode = "no_grad"  # ... and a training-mode forward that updates nothing follows the rule
    assert_rule(forward(case, layer, bad_x, mode), forward(case, layer, x, mode), batch_and_tokens(case))


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.decode is not None])
def test_decoding_takes_minus_one_as_no_code(name):
    """Decoding the eval forward's indices gives its output at the finite tokens and zeros at the
    token without a code (as masked and dropped positions decode); -2 still raises."""
    case = CASES[name]
    torch.manual_seed(0)
    layer = case.make().eval()
    bad_x = with_value(randn(*case.shape, seed=3), case.feature_axis, BAD_TOKEN, BAD_FEATURE, math.nan)
    result = case.call(layer, bad_x)
    seen = case.unpack(result, *batch_and_tokens(case))
    decoded = case.decode(layer, result).to(seen.out.dtype)
    at = torch.zeros(seen.out.shape[:2], dtype=torch.bool)
    at[BAD_TOKEN] = True
    assert (decoded[at] == 0).all()
    assert torch.equal(decoded[~at], seen.out[~at])

    def minus_two(t):
        return t.masked_fill(t == -1, -2) if isinstance(t, Tensor) and not t.is_floating_point() else t

    result = [minus_two(t) for t in result] if isinstance(result, tuple) else result
    if isinstance(result[0], tuple):  # LFQ's (Return, breakdown)
        result = [tuple(minus_two(t) for t in result[0])]
    with pytest.raises(ValueError, match="indices"):
        case.decode(layer, result)


@pytest.mark.parametrize("name", ["LFQ", "ResidualLFQ", "VectorQuantize", "ResidualVQ", "GroupedResidualLFQ"])
def test_masked_padding_stays_padding_and_only_kept_tokens_are_judged(name):
    """A NaN in masked padding is padding (never judged, never enters); a kept NaN token has no code."""
    make = {
        "LFQ": lambda: LFQ(dim=6, codebook_size=16),
        "ResidualLFQ": lambda: ResidualLFQ(dim=6, num_quantizers=2, codebook_size=16),
        "VectorQuantize": lambda: VectorQuantize(dim=6, codebook_dim=4, codebook_size=16),
        "ResidualVQ": lambda: ResidualVQ(dim=6, codebook_dim=4, num_quantizers=2, codebook_size=16),
        "GroupedResidualLFQ": lambda: GroupedResidualLFQ(dim=6, groups=2, num_quantizers=2, codebook_size=16),
    }[name]
    torch.manual_seed(0)
    layer = make().eval()
    x = randn(2, 5, 6, seed=4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    padded = x.clone()
    padded[1, 4] = math.nan
    both = padded.clone()
    both[0, 1, 1] = math.nan

    def run(t):
        out, indices, loss = layer(t, mask=mask)
        return out, (indices.movedim(0, -1) if name.startswith("Grouped") else indices).reshape(2, 5, -1), loss

    clean, only_padding, kept = run(x), run(padded), run(both)
    for got, want in zip(only_padding, clean):  # padding never enters, NaN or not
        assert torch.equal(got, want)
    out, indices, loss = kept
    assert out[0, 1].isnan().all() and (indices[0, 1] == -1).all() and loss.isnan().all()
    others = torch.ones(2, 5, dtype=torch.bool)
    others[0, 1] = False
    assert torch.equal(out[others], clean[0][others]) and torch.equal(indices[others], clean[1][others])


# HierarchicalVQ: a level's cell is judged by the vector it quantizes, the pooled residual


def hierarchical(scales, quant_resi=0.5):
    torch.manual_seed(0)
    return HierarchicalVQ(dim=3, codebook_size=8, scales=scales, quant_resi=quant_resi, kmeans_init=False,
                          threshold_ema_dead_code=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hierarchical_a_non_finite_position_takes_the_codes_of_its_whole_sample(mode, kind):
    """Level 0 (scale 1) pools the whole sample: every level's cells and the whole output of
    that sample have no code; the other sample is untouched. The training step raises."""
    layer = hierarchical([1, 2, 5])
    x = randn(2, 3, 5, seed=5)
    bad_x = x.clone()
    bad_x[0, 1, 3] = KINDS[kind]
    if mode == "train":
        trained = copy.deepcopy(layer).train()
        saved = state(trained)
        with pytest.raises(ValueError, match="NaN"):
            trained(bad_x.clone().requires_grad_(True))
        assert_state_equal(trained, saved)
    context = torch.no_grad() if mode == "train" else torch.enable_grad()
    with context:
        (out, indices, loss), (clean_out, clean_indices, _) = (copy.deepcopy(layer).train(mode == "train")(t)
                                                               for t in (bad_x, x))
    assert out[0].isnan().all() and torch.equal(out[1], clean_out[1]) and loss.isnan()
    for level, clean in zip(indices, clean_indices):
        assert (level[0] == -1).all() and torch.equal(level[1], clean[1])


def test_hierarchical_one_level_marks_the_cell_and_the_refinement_spreads_its_nan():
    """One level at full resolution: only the position's cell has no code. Without refinement
    (quant_resi=0) only its output is NaN; phi's 3-wide convolution spreads the NaN to the
    positions beside it. Decoding gives the output at the cells with a code, zeros at the other."""
    x = randn(2, 3, 5, seed=6)
    bad_x = x.clone()
    bad_x[0, 2, 2] = math.inf
    for quant_resi, nan_positions in ((0.0, [2]), (0.5, [1, 2, 3])):
        layer = hierarchical([5], quant_resi).eval()
        (out, (indices,), loss), (clean_out, (clean_indices,), _) = layer(bad_x), layer(x)
        at = torch.zeros(2, 5, dtype=torch.bool)
        at[0, 2] = True
        assert (indices[at] == -1).all() and torch.equal(indices[~at], clean_indices[~at]) and loss.isnan()
        nan = torch.zeros(2, 5, dtype=torch.bool)
        nan[0, nan_positions] = True
        out, clean_out = out.movedim(1, -1), clean_out.movedim(1, -1)
        assert out[nan].isnan().all() and torch.equal(out[~nan], clean_out[~nan])
        if quant_resi == 0.0:
            decoded = layer.get_output_from_indices((indices,)).movedim(1, -1)
            assert (decoded[at] == 0).all() and torch.equal(decoded[~at], out[~at])


# compiled layers follow the rule too (no host sync, static shapes)


@pytest.mark.parametrize("name", ["FSQ-image-projected-2-codebooks-noise", "LFQ-projected-breakdown",
                                  "VectorQuantize-breakdown"])
def test_compiled_fullgraph_follows_the_rule(name):
    torch._dynamo.reset()
    case = CASES[name]
    torch.manual_seed(0)
    layer = case.make().train(not case.statistics)
    bad_x = with_value(randn(*case.shape, seed=3), case.feature_axis, BAD_TOKEN, BAD_FEATURE, math.nan)
    compiled = torch.compile(lambda t: case.call(layer, t), fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    eager = case.unpack(case.call(layer, bad_x), *batch_and_tokens(case))
    torch.manual_seed(1)
    got = case.unpack(compiled(bad_x), *batch_and_tokens(case))
    assert (got.indices[BAD_TOKEN] == -1).all() and got.out[BAD_TOKEN].isnan().all()
    assert all(loss.isnan().all() for loss in got.losses)
    assert torch.equal(got.indices, eager.indices) and torch.equal(got.out.nan_to_num(), eager.out.nan_to_num())


# the dtype matrix: module dtype x input dtype x CPU autocast, train and eval, one forward per cell


def matrix_input(shape, channel_first, cell_index):
    kind = list(KINDS.values())[cell_index % 3]

    def make(dtype):
        x = with_value(randn(*shape, seed=8), 1 if channel_first else -1, BAD_TOKEN, BAD_FEATURE, kind)
        return x.to(dtype)
    return make


MATRIX = {name: CASES[name] for name in [
    "FSQ-image-projected-2-codebooks-noise", "ResidualFSQ-all-codes", "GroupedResidualFSQ",
    "LFQ-projected-breakdown", "ResidualLFQ-all-codes", "GroupedResidualLFQ", "VectorQuantize-breakdown",
    "ResidualVQ-all-codes", "GroupedResidualVQ", "RandomProjectionQuantizer-targets-and-loss", "SimVQ",
    "ResidualSimVQ-all-codes", "LatentQuantize", "FSP", "BinaryMapper"]}
MATRIX_CELLS = dtype_matrix(autocasts=CPU_AUTOCASTS)


def hierarchical_parts(result):
    out, indices, loss = result
    return Parts(tokens(out, True), list(indices), [loss])


@pytest.mark.parametrize("cell_index", range(len(MATRIX_CELLS)), ids=[p.id for p in MATRIX_CELLS])
@pytest.mark.parametrize("name", [*MATRIX, "HierarchicalVQ"])
def test_dtype_matrix(name, cell_index):
    cell = MATRIX_CELLS[cell_index].values[0]
    no_grad = cell.train and (name == "HierarchicalVQ" or MATRIX.get(name, CASES["FSQ"]).statistics)

    def run(call):
        def forward_(layer, x):
            with torch.no_grad() if no_grad else torch.enable_grad():
                return call(layer, x)
        return forward_

    if name == "HierarchicalVQ":  # level 0 (scale 1) pools the sample: all of sample 0 has no code
        bad = torch.tensor([[True], [False]])
        run_non_finite_cell(cell, lambda: hierarchical([1, 2, 5]), matrix_input((2, 3, 5), True, cell_index), bad,
                            forward=run(lambda layer, x: layer(x)), unpack=hierarchical_parts)
        return
    case = MATRIX[name]
    b, n = batch_and_tokens(case)
    bad = torch.zeros(b, n, dtype=torch.bool)
    bad[BAD_TOKEN] = True

    def unpack(result):
        seen = case.unpack(result, b, n)
        floats = [t for t in seen.extras if t.is_floating_point()]
        ints = [t for t in seen.extras if not t.is_floating_point()]
        indices = ([] if seen.indices is None else [seen.indices]) + ints
        return Parts(seen.out, indices, list(seen.losses), floats)

    run_non_finite_cell(cell, case.make, matrix_input(case.shape, case.channel_first, cell_index), bad,
                        forward=run(case.call), unpack=unpack)


def test_the_other_conversions_keep_the_marker():
    """codes -> indices gives -1 for the NaN codes forward outputs; indices -> level indices gives
    -1 in every dimension (FSP's forward level_indices) and back; log_prob of -1 is NaN."""
    x = with_value(randn(2, 5, 3, seed=9), -1, BAD_TOKEN, BAD_FEATURE, math.nan)
    at = torch.zeros(2, 5, dtype=torch.bool)
    at[BAD_TOKEN] = True
    for layer in (FSQ([8, 5, 5]), LatentQuantize([5, 5, 5], dim=3).eval()):
        latent = x.movedim(-1, 1) if isinstance(layer, LatentQuantize) else x
        out, indices = layer(latent)[:2]
        codes = out.movedim(1, -1) if isinstance(layer, LatentQuantize) else out
        assert torch.equal(layer.codes_to_indices(codes), indices) and (indices[at] == -1).all()
        levels = layer.indices_to_level_indices(indices)
        assert (levels[at] == -1).all() and (levels[~at] >= 0).all()
    fsp = FSP([5, 5, 5]).eval()
    out, indices, _, info = fsp(x)
    assert torch.equal(fsp.indices_to_level_indices(indices), info["level_indices"])
    assert torch.equal(fsp.level_indices_to_indices(info["level_indices"]), indices) and (indices[at] == -1).all()
    assert fsp.indices_to_act_value(indices)[at].isnan().all()
    mapper = BinaryMapper(3)
    logits = randn(2, 5, 3, seed=10)
    given = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(11)).masked_fill(at, -1)
    log_prob = mapper.log_prob(logits, indices=given)
    assert log_prob[at].isnan().all() and torch.isfinite(log_prob[~at]).all()
    assert torch.equal(mapper.log_prob(x, indices=given.clamp(min=0))[at].isnan(), torch.tensor([True]))
    with pytest.raises(ValueError, match="indices"):
        mapper.log_prob(logits, indices=given.masked_fill(at, -2))
