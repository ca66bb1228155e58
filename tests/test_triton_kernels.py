"""The Triton kernels, run as kernels by Triton's interpreter on the CPU (conftest sets
TRITON_INTERPRET=1 before triton is first imported), with VQ_LAYERS_BACKEND=triton.

1. Shapes that exercise ragged tiles and codebook splits (D in {1, 3, 8, 64, 256}, K from 1 to
   70000, heads, no rows), against the fp64 brute force and the torch reference.
2. The reference suites of tests/test_nearest_code.py and tests/test_lfq_entropy.py, and the
   layer suites of tests/test_vq.py and tests/test_lfq.py, re-run here against the kernels:
   every test but those listed in NOT_RERUN and LAYER_SUITES_SKIP (with the reasons).
3. Layers end to end with the kernels equal the torch backend, and torch.compile(fullgraph=True)
   through the torch.library ops with the kernels inside.

A spy counts kernel launches, so a test here cannot pass on the torch fallback unnoticed.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("triton")  # the test extra installs it (Linux); the kernels need it

import test_lfq as lfq_layer_suite  # noqa: E402
import test_lfq_entropy as lfq_suite  # noqa: E402
import test_lfq_masks as lfq_mask_suite  # noqa: E402
import test_nearest_code as search_suite  # noqa: E402
import test_vq as vq_suite  # noqa: E402
import test_vq_training as vq_training_suite  # noqa: E402
from kernel_launches import count_launches  # noqa: E402
from test_nearest_code import assert_matches_brute_force, brute64, gen, randn, sampled_distribution_check  # noqa: E402
from vq_layers import LFQ, ResidualVQ, VectorQuantize  # noqa: E402
from vq_layers.kernels.backend import use_triton  # noqa: E402
from vq_layers.kernels.nearest_code import nearest_code  # noqa: E402
from vq_layers.lfq_entropy_loss import lfq_entropy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(autouse=True)
def launches(monkeypatch):
    """Every test here runs with VQ_LAYERS_BACKEND=triton; counts the kernels' host calls. The
    kernels' self-check is off here (its launches would count too): tests/test_self_check.py."""
    monkeypatch.setenv("VQ_LAYERS_BACKEND", "triton")
    monkeypatch.setenv("VQ_LAYERS_SELF_CHECK", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return count_launches(monkeypatch)


# --------------------------------------------------------------------------------------------
# 1. nearest_code: ragged tiles, splits, heads, no rows

# (n, k, d, heads): the interpreter's tiles are 128 rows x 256 codes, the GPU's 64 x 64; D goes
# in slices of min(64, next power of two >= 16); few row tiles split the codebook in 4
SHAPES = [
    (1, 1, 1, None),
    (0, 5, 3, None),
    (0, 7, 8, 3),
    (37, 5, 3, None),
    (130, 1, 8, 3),
    (129, 255, 64, None),
    (65, 257, 256, 2),
    (300, 1000, 8, None),
    (200, 300, 64, 3),
    (5, 4099, 256, None),
    (7, 70000, 3, None),
]


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("n, k, d, h", SHAPES)
def test_search_matches_brute_force_and_reference(n, k, d, h, metric, launches):
    x, codebook = search_suite.make_inputs(n, k, d, h, metric, seed=n + k + d)
    indices, score = nearest_code(x, codebook, metric=metric)
    assert launches["search"] == 1
    assert_matches_brute_force(x, codebook, metric, indices, score)
    reference, reference_score = nearest_code(x, codebook, metric=metric, backend="torch")
    assert launches["search"] == 1
    _, _, gap = brute64(x, codebook, metric)
    differ = indices != reference
    assert not (differ & (gap >= search_suite.NEAR_TIE)).any()  # the two backends differ at near-ties only
    torch.testing.assert_close(score[~differ], reference_score[~differ], rtol=1e-5, atol=1e-5)


def test_search_splits_keep_the_lowest_index(launches):
    """Two rows against 1000 codes: the codebook goes in 4 splits of 256. Exact copies of a row
    (the only zero-distance codes: the rest of the codebook is integers, the rows halves) in
    two splits, and in one tile, go to the lowest index."""
    codebook = 10.0 + torch.randint(-3, 4, (1000, 4), generator=gen(0)).float()
    x = torch.tensor([[10.5, 10.5, 10.5, 10.5], [13.5, 7.5, 10.5, 12.5]])
    codebook[[999, 600]] = x[0]
    codebook[[700, 301, 300]] = x[1]
    for metric in ("l2", "dot"):
        ref, _, _ = brute64(x, codebook, metric)
        indices, _ = nearest_code(x, codebook, metric=metric)
        assert indices.equal(ref)
    assert nearest_code(x, codebook)[0].tolist() == [600, 300]
    assert launches["search"] == 3


@pytest.mark.parametrize("metric", ["l2", "euclidean", "dot"])
def test_sampling_distribution(metric):
    """Gumbel-max in the kernel samples softmax(-cost / t) (chi-square, 7 degrees of freedom)."""
    k, d, samples = 8, 4, 6000
    codebook, x_row = randn(k, d, seed=25), randn(d, seed=26)
    cost = search_suite.brute64_costs(x_row[None], codebook, metric)[0]
    t = (cost.max() - cost.min()).item() / 3
    chi2, tv, p = sampled_distribution_check(x_row, codebook, metric, t, samples, None, seed=4)
    assert chi2 < 35, (chi2, tv, p.tolist())
    assert p.max() < 0.9 and (p - 1 / k).abs().max() > 0.05  # neither the argmin nor uniform


def test_sampling_rows_and_heads_draw_independently():
    """The noise counter is (head, row, code): identical rows and heads get different samples."""
    codebook = randn(2, 16, 4, seed=1)
    codebook[1] = codebook[0]
    x = randn(4, 1, seed=2).new_zeros(2, 500, 4)
    indices, _ = nearest_code(x, codebook, temperature=10.0, generator=gen(1))
    assert (indices[0] != indices[1]).float().mean() > 0.5
    assert indices[0].unique().numel() > 8


def test_tf32x3_precision_is_accepted_and_bad_precision_names_the_argument():
    x, codebook = randn(40, 8, seed=3), randn(50, 8, seed=4)
    indices, score = nearest_code(x, codebook, precision="tf32x3")  # the interpreter computes fp32
    assert_matches_brute_force(x, codebook, "l2", indices, score)
    with pytest.raises(ValueError, match="precision"):
        nearest_code(x, codebook, precision="fp16")


@pytest.mark.parametrize("metric, temperature", [("l2", 0.0), ("dot", 0.7), ("euclidean", 0.7)])
def test_kernels_create_no_float64(metric, temperature, launches):
    x, codebook = randn(2, 300, 8, seed=17), randn(2, 40, 8, seed=18)
    logits = (0.3 * randn(50, 1, 8, seed=19)).requires_grad_()
    with search_suite.Recorder() as recorder:
        nearest_code(x, codebook, metric=metric, temperature=temperature, generator=gen(0))
        per_sample, codebook_entropy = lfq_entropy(logits)
        (per_sample - codebook_entropy).backward()
    assert launches["search"] == 1 and launches["code_mass"] == 1 and launches["bit_sums"] == 1
    assert torch.float32 in recorder.dtypes and torch.float64 not in recorder.dtypes, recorder.dtypes


def test_backend_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_triton(cpu) and use_triton(cpu, "auto") is False and use_triton(cpu, "torch") is False
    assert use_triton(cuda, "auto")  # triton imports here
    monkeypatch.setenv("VQ_LAYERS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="VQ_LAYERS_BACKEND.*'cuda'"):
        nearest_code(randn(3, 2), randn(4, 2))
    with pytest.raises(ValueError, match="backend.*'fast'"):
        nearest_code(randn(3, 2), randn(4, 2), backend="fast")
    monkeypatch.setenv("VQ_LAYERS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors.*TRITON_INTERPRET"):
        nearest_code(randn(3, 2), randn(4, 2))


def test_auto_falls_back_to_torch_when_a_kernel_fails(monkeypatch):
    """Under "auto" a kernel that cannot compile or launch (an unsupported GPU) hands over to the
    reference, with one warning, for good; an explicit "triton" raises."""
    import vq_layers.kernels.backend as backend

    monkeypatch.setattr(backend, "_triton_failure", None)
    monkeypatch.setenv("VQ_LAYERS_BACKEND", "auto")
    calls = []

    def broken():
        calls.append("triton")
        raise RuntimeError("no kernel for this GPU")

    cuda = torch.device("cuda")  # auto picks Triton for CUDA tensors; nothing here touches a GPU
    with pytest.raises(RuntimeError, match="no kernel"):
        backend.run(cuda, "triton", broken, lambda: "torch")
    with pytest.warns(RuntimeWarning, match="Triton kernels failed.*no kernel for this GPU"):
        assert backend.run(cuda, "auto", broken, lambda: "torch") == "torch"
    assert backend.run(cuda, None, broken, lambda: "torch") == "torch"
    assert calls == ["triton", "triton"]  # not tried again after the failure
    with pytest.raises(torch.cuda.OutOfMemoryError):
        monkeypatch.setattr(backend, "_triton_failure", None)
        backend.run(cuda, "auto", lambda: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")), lambda: 0)


# --------------------------------------------------------------------------------------------
# 2. the reference suites, re-run against the kernels

NOT_RERUN = {
    # identical codes at two columns: numpy's sgemm (the interpreter's tl.dot) rounds a column's
    # dot products by its position, so exact copies can differ in the last bit (measured: 6 of
    # 32 rows); exact ties on lattice data (exact products) are re-run and hold
    "test_duplicate_codes_lowest_index", "test_identical_codes_lowest_index",
    # the torch path's own tiling, TF32 switch and allocation budget; not the kernel's
    "test_no_n_by_k_tensor", "test_heads_respect_the_tile_budget", "test_recorder_sees_a_dense_tensor",
    "test_cuda_matmul_is_ieee_fp32_and_restored", "test_allocation_recorder_sees_a_dense_tensor",
    "test_no_n_by_codes_tensor", "test_recorder_sees_float64",
    # its dtype set is the torch path's; the kernel adds its int32 index buffer and the
    # interpreter its own buffers (no float64: test_kernels_create_no_float64 below)
    "test_no_float64_created",
    # 50 000 samples: minutes in the interpreter; the kernel's sampling is tested above
    "test_sampling_distribution", "test_sampling_temperature_scales",
    "test_euclidean_and_l2_sample_different_distributions",
    # two processes; the distributed sums are the same code whichever backend computes the mass
    "test_distributed_matches_single_process",
}

# and the layers that use them, but for the dtype matrix (hundreds of cells, the search is the
# same in each), the 2-process tests and the compile tests (test 3 compiles with the kernels)
LAYER_SUITES_SKIP = ("dtype_matrix", "distributed", "compile")

for _prefix, _suite in (("search", search_suite), ("lfq", lfq_suite), ("vq_layer", vq_suite),
                        ("vq_training", vq_training_suite), ("lfq_layer", lfq_layer_suite),
                        ("lfq_masks", lfq_mask_suite)):
    for _name, _test in vars(_suite).items():
        if not (_name.startswith("test_") and callable(_test)) or _name in NOT_RERUN:
            continue
        if (_suite in (vq_suite, vq_training_suite, lfq_layer_suite, lfq_mask_suite)
                and any(part in _name for part in LAYER_SUITES_SKIP)):
            continue
        globals()[f"test_{_prefix}_suite_{_name[5:]}"] = _test
del _prefix, _suite, _name, _test


def test_the_rerun_suites_run_the_kernels(launches):
    search_suite.test_matches_brute_force(300, 1000, 32, None, None, "l2")
    lfq_suite.test_forced_paths_match_brute_force(1.0, 11, "all_dense")
    assert launches["search"] >= 2 and launches["code_mass"] >= 1 and launches["bit_sums"] >= 1


# --------------------------------------------------------------------------------------------
# 3. lfq_entropy's dense kernels, layers end to end, compile


def brute_lfq(logits):
    """fp64 per-sample and codebook entropies over all 2^d codes, (n, c, d) -> two scalars."""
    n, c, d = logits.shape
    bits = ((torch.arange(2**d)[:, None] >> torch.arange(d - 1, -1, -1)) & 1).double()
    log_p = torch.nn.functional.logsigmoid(logits) @ bits.T + torch.nn.functional.logsigmoid(-logits) @ (1 - bits).T
    p = log_p.exp()  # (n, c, 2^d)
    per_sample = -(p * log_p).sum(-1).mean()
    mean = p.mean(0)
    return per_sample, -(mean * mean.clamp_min(1e-300).log()).sum(-1).mean()


@pytest.mark.parametrize("n, c, d, scale", [(1, 1, 1, 1.0), (37, 2, 4, 0.3), (200, 1, 10, 1.0), (70, 3, 13, 0.2),
                                            (33, 1, 16, 0.1)])
def test_dense_entropy_and_gradients_match_fp64(n, c, d, scale, launches):
    logits = (scale * torch.randn(n, c, d, generator=gen(n + d))).requires_grad_()
    per_sample, codebook = lfq_entropy(logits)
    (per_sample - 0.7 * codebook).backward()
    assert launches["code_mass"] == c and launches["bit_sums"] == c  # every token is dense here
    logits64 = logits.detach().double().requires_grad_()
    ref_per_sample, ref_codebook = brute_lfq(logits64)
    (ref_per_sample - 0.7 * ref_codebook).backward()
    assert abs(per_sample.item() - ref_per_sample.item()) <= 1e-5 * ref_per_sample.item()
    assert abs(codebook.item() - ref_codebook.item()) <= 1e-5 * ref_codebook.item()
    scale = logits64.grad.abs().max().item()
    assert (logits.grad.double() - logits64.grad).abs().max().item() <= 1e-5 * scale


def test_vq_training_equals_torch_backend(monkeypatch, launches):
    """Three EMA steps with k-means init, dead codes, heads and a mask: same indices, buffers
    and outputs with the kernel as with the reference."""
    torch.manual_seed(0)
    # more rows than codes: k-means and dead codes leave no exact copies (see NOT_RERUN)
    kwargs = dict(dim=32, codebook_size=64, heads=2, separate_codebook_per_head=True, kmeans_init=True,
                  threshold_ema_dead_code=1, commitment_weight=1.0)
    layer = VectorQuantize(**kwargs).train()
    layers = {"triton": layer, "torch": copy.deepcopy(layer)}  # (the row draws' seeds too)
    mask = torch.ones(4, 100, dtype=torch.bool)
    mask[1, 30:] = False
    revived = 0
    for step in range(3):
        x = randn(4, 100, 32, seed=step)
        out = {}
        for backend, layer in layers.items():
            monkeypatch.setenv("VQ_LAYERS_BACKEND", backend)
            torch.manual_seed(step)
            out[backend] = layer(x, mask=mask)
        (quantized, indices, loss), (ref_quantized, ref_indices, ref_loss) = out["triton"], out["torch"]
        assert indices.equal(ref_indices)
        torch.testing.assert_close(quantized, ref_quantized)
        torch.testing.assert_close(loss, ref_loss)
        replaced = int(layers["triton"]._codebook.dead_codes_replaced)
        assert replaced == int(layers["torch"]._codebook.dead_codes_replaced)
        revived += replaced
    assert revived > 0 and bool(layers["triton"]._codebook.initted)
    assert launches["search"] >= 3
    for name, buffer in layers["triton"].state_dict().items():
        torch.testing.assert_close(buffer, layers["torch"].state_dict()[name], msg=name)


def test_residual_vq_eval_equals_fp64_greedy():
    """ResidualVQ's stages through the kernel: each stage's index is the fp64 nearest code of
    the residual the stages before it left."""
    rvq = ResidualVQ(dim=16, codebook_size=100, num_quantizers=3).eval()
    x = randn(2, 40, 16, seed=5)
    _, indices, _ = rvq(x)
    residual = x.reshape(-1, 16).double()
    for q, layer in enumerate(rvq.layers):
        codebook = layer.codebook.double()
        ref = ((residual[:, None] - codebook[None]).square().sum(-1)).argmin(-1)
        assert indices[..., q].reshape(-1).equal(ref)
        residual = residual - codebook[ref]


def test_lfq_training_equals_torch_backend(monkeypatch, launches):
    """Low inv_temperature: many dense tokens; the entropy loss and the input gradient agree."""
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("VQ_LAYERS_BACKEND", backend)
        torch.manual_seed(0)
        layer = LFQ(dim=24, codebook_size=2**12, num_codebooks=2, entropy_loss_weight=0.5,
                    commitment_loss_weight=0.25).train()
        x = randn(3, 40, 24, seed=7).requires_grad_()
        out = layer(x, inv_temperature=0.5)
        (out.quantized.square().sum() + out.entropy_aux_loss).backward()
        results[backend] = (out.indices, out.entropy_aux_loss.detach(), x.grad)
    assert launches["code_mass"] >= 1 and launches["bit_sums"] >= 1
    assert results["triton"][0].equal(results["torch"][0])
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][2], results["torch"][2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_kind", ["vq", "lfq"])
def test_compile_fullgraph_with_the_kernels_inside(layer_kind, launches):
    """The torch.library ops are opaque to the compiler: a fullgraph compile of a training
    forward runs the interpreted kernels inside, and equals eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if layer_kind == "vq":
        make = lambda: VectorQuantize(dim=16, codebook_size=100, ema_update=False, learnable_codebook=True)  # noqa: E731
        call = lambda layer, x: layer(x)  # noqa: E731
    else:
        make = lambda: LFQ(dim=16, codebook_size=2**8, entropy_loss_weight=1.0)  # noqa: E731
        call = lambda layer, x: layer(x, inv_temperature=0.3)  # noqa: E731
    eager, compiled = make().train(), make().train()
    compiled.load_state_dict(eager.state_dict())
    fn = torch.compile(lambda x: call(compiled, x), fullgraph=True, backend="aot_eager")
    x = randn(2, 30, 16, seed=9)
    got, want = fn(x), call(eager, x)
    assert launches["search"] + launches["code_mass"] >= 2  # eager's launch and the compiled one's
    assert got[1].equal(want[1])  # indices
    loss, ref = got[-1], want[-1]  # VQ's loss; LFQ's entropy_aux_loss
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(loss, ref)
    assert math.isfinite(loss.item())
