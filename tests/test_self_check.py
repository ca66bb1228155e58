"""The kernels' one-time self-check (vq_layers/kernels/self_check.py), run by Triton's interpreter
on the CPU (conftest sets TRITON_INTERPRET=1 before triton is imported).

"auto" picks the kernels for CUDA tensors only; the `auto_on_cpu` fixture makes it pick them for
CPU tensors too, so that the fallback a GPU would take runs here. Broken kernels are the real
ones with their results perturbed (a swapped pair of indices, TF32 products, the last index
among ties, a biased sampler, a code mass or gradient off by a little): the check must catch
each, warn once naming the kernel and its key, and hand that key to the torch reference for
good, leaving other keys on their kernels.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("triton")

import vq_layers.kernels.backend as backend  # noqa: E402
import vq_layers.kernels.triton_lfq_entropy as triton_lfq  # noqa: E402
import vq_layers.kernels.triton_nearest_code as triton_search  # noqa: E402
from dtype_matrix import RecordDtypes  # noqa: E402
from kernel_launches import count_launches  # noqa: E402
from vq_layers.kernels import self_check  # noqa: E402
from vq_layers.kernels.nearest_code import _torch_search, nearest_code  # noqa: E402
from vq_layers.lfq_entropy_loss import lfq_entropy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """No verdicts from earlier tests, the check enabled, no global kernel failure."""
    self_check.reset()
    monkeypatch.delenv(self_check.ENV, raising=False)
    monkeypatch.setattr(backend, "_triton_failure", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
    self_check.reset()


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """VQ_LAYERS_BACKEND=auto, choosing the kernels for CPU tensors as it would for CUDA ones."""
    monkeypatch.setenv("VQ_LAYERS_BACKEND", "auto")
    monkeypatch.setattr(backend, "use_triton", lambda device, name=None: backend.check_backend(name) != "torch")


@pytest.fixture
def launches(monkeypatch):
    """Counts the kernels' host calls (the self-check's and the ops')."""
    return count_launches(monkeypatch)


def break_search(monkeypatch, how: str, when=lambda x, l2, precision: True):
    """Replaces the search kernel by the real one with its results perturbed (where `when`)."""
    real = triton_search.search
    calls = []

    def broken(x, codebook, l2, euclidean, temperature, seed, precision="ieee"):
        calls.append(x.shape)
        if not when(x, l2, precision):
            return real(x, codebook, l2, euclidean, temperature, seed, precision)
        if how == "tf32":  # products of 11-bit mantissas, as TF32 tensor cores compute them
            def tf32(t):
                mantissa, exponent = torch.frexp(t)
                return torch.ldexp(torch.round(mantissa * 2**11) / 2**11, exponent)
            return real(tf32(x), tf32(codebook), l2, euclidean, temperature, seed, precision)
        if how == "last_tie":  # the highest index among equals
            k = codebook.shape[1]
            return k - 1 - real(x, codebook.flip(1), l2, euclidean, temperature, seed, precision)
        if how == "no_noise":  # sampling that ignores its noise: always the first copy
            return real(x, codebook, l2, euclidean, 0.0, seed, precision)
        out = real(x, codebook, l2, euclidean, temperature, seed, precision)
        if how == "swap":
            out[:, [0, 1]] = out[:, [1, 0]]
        elif how == "next_code":
            out[0, 0] = (out[0, 0] + 1) % codebook.shape[1]
        return out

    monkeypatch.setattr(triton_search, "search", broken)
    return calls


def break_lfq(monkeypatch, how: str, when=lambda d: True):
    real_mass, real_sums = triton_lfq.code_mass, triton_lfq.bit_sums
    calls = []

    def mass(pos, neg):
        calls.append("mass")
        out = real_mass(pos, neg)
        if when(pos.shape[-1]) and how == "mass":
            out[0] += 1e-3 * out.max()
        if when(pos.shape[-1]) and how == "dropped_token":
            out = real_mass(pos[1:], neg[1:])
        return out

    def sums(pos, neg, grad_mass):
        calls.append("sums")
        ones, zeros = real_sums(pos, neg, grad_mass)
        if when(pos.shape[-1]) and how == "gradient":
            ones = ones * (1 + 1e-3)
        return ones, zeros

    monkeypatch.setattr(triton_lfq, "code_mass", mass)
    monkeypatch.setattr(triton_lfq, "bit_sums", sums)
    return calls


def search_inputs(d=16, n=90, k=70, seed=0):
    return randn(n, d, seed=seed), randn(k, d, seed=seed + 100)


def lfq_inputs(d=8, n=40, seed=0):
    return (0.5 * randn(n, 1, d, seed=seed)).requires_grad_()


def entropy_and_grad(logits, backend_name=None, monkeypatch=None):
    if backend_name:
        monkeypatch.setenv("VQ_LAYERS_BACKEND", backend_name)
    logits = logits.detach().clone().requires_grad_()
    per_sample, codebook = lfq_entropy(logits)
    (per_sample - 0.5 * codebook).backward()
    return per_sample.detach(), codebook.detach(), logits.grad


# --------------------------------------------------------------------------------------------
# the real kernels pass, and run afterwards


SEARCH_VARIANTS = [("l2", 0.0), ("dot", 0.0), ("l2", 0.5), ("euclidean", 0.5), ("dot", 0.5)]


@pytest.mark.parametrize("metric, temperature", SEARCH_VARIANTS)
def test_real_search_kernel_passes_and_runs_afterwards(metric, temperature, auto_on_cpu, launches):
    x, codebook = search_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first, _ = nearest_code(x, codebook, metric=metric, temperature=temperature)
        checked = launches["search"]
        assert checked == 2  # the check's kernel launch, then the op's
        [verdict] = self_check.verdicts().values()
        assert verdict.ok and verdict.kernel == "nearest_code"
        sampled = " sampled" if temperature else ""
        assert verdict.key[3] == (("metric", metric + sampled), ("precision", "ieee"), ("d", 16))
        for _ in range(3):  # later calls: the kernel only, no second check
            nearest_code(x, codebook, metric=metric, temperature=temperature)
        assert launches["search"] == checked + 3
    if not temperature:
        assert first.equal(nearest_code(x, codebook, metric=metric, backend="torch")[0])


def test_real_lfq_kernels_pass_and_run_afterwards(auto_on_cpu, launches, monkeypatch):
    logits = lfq_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = entropy_and_grad(logits)
        # the check: one forward and one backward launch; then the op's forward and backward
        assert launches == {"search": 0, "code_mass": 2, "bit_sums": 2}
        [verdict] = self_check.verdicts().values()
        assert verdict.ok and verdict.key[0] == "lfq_entropy" and verdict.key[3] == (("bits", 8),)
        entropy_and_grad(logits)
        assert launches == {"search": 0, "code_mass": 3, "bit_sums": 3}
    want = entropy_and_grad(logits, "torch", monkeypatch)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_insisting_backend_checks_and_passes_on_the_real_kernels(launches, monkeypatch):
    monkeypatch.setenv("VQ_LAYERS_BACKEND", "triton")
    x, codebook = search_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nearest_code(x, codebook)
        entropy_and_grad(lfq_inputs())
    assert launches == {"search": 2, "code_mass": 2, "bit_sums": 2}
    assert all(verdict.ok for verdict in self_check.verdicts().values()) and len(self_check.verdicts()) == 2


# --------------------------------------------------------------------------------------------
# broken kernels: one warning, the torch reference for good


@pytest.mark.parametrize("metric, temperature, how", [
    ("l2", 0.0, "swap"), ("dot", 0.0, "swap"), ("l2", 0.0, "tf32"), ("dot", 0.0, "tf32"), ("l2", 0.0, "last_tie"),
    ("dot", 0.0, "last_tie"), ("l2", 0.5, "next_code"), ("euclidean", 0.5, "no_noise"), ("dot", 0.5, "no_noise"),
])
def test_broken_search_kernel_warns_once_and_falls_back(metric, temperature, how, auto_on_cpu, monkeypatch):
    calls = break_search(monkeypatch, how)
    sampled = " sampled" if temperature else ""
    with pytest.warns(RuntimeWarning) as caught:
        results = [nearest_code(*search_inputs(seed=seed), metric=metric, temperature=temperature,
                                generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    [warning] = [w for w in caught if "self-check" in str(w.message)]
    message = str(warning.message)
    assert f"nearest_code on cpu (float32, metric={metric}{sampled}, precision=ieee, d=16)" in message
    assert ("indices differ" if not temperature else "sampled rows" if how == "next_code" else "biased") in message
    assert "torch reference runs for this key" in message
    assert len(calls) == 1  # the check's launch only: later calls never reach the broken kernel
    for seed, (indices, score) in enumerate(results):
        want, want_score = nearest_code(*search_inputs(seed=seed), metric=metric, temperature=temperature,
                                        generator=torch.Generator().manual_seed(seed), backend="torch")
        assert indices.equal(want) and score.equal(want_score)
    [verdict] = self_check.verdicts().values()
    assert not verdict.ok and verdict.warned


@pytest.mark.parametrize("how, error", [("mass", "code mass off by"), ("dropped_token", "code mass off by"),
                                        ("gradient", "logits gradient by")])
def test_broken_lfq_kernel_warns_once_and_falls_back(how, error, auto_on_cpu, monkeypatch):
    calls = break_lfq(monkeypatch, how)
    with pytest.warns(RuntimeWarning) as caught:
        results = [entropy_and_grad(lfq_inputs(seed=seed)) for seed in range(3)]
    [warning] = [w for w in caught if "self-check" in str(w.message)]
    message = str(warning.message)
    assert "lfq_entropy on cpu (float32, bits=8)" in message and error in message
    assert calls == ["mass", "sums"]  # the check's; later calls run the reference
    for seed, got in enumerate(results):
        want = entropy_and_grad(lfq_inputs(seed=seed), "torch", monkeypatch)
        for a, b in zip(got, want):
            assert a.equal(b)


def test_a_broken_key_leaves_the_other_keys_on_their_kernels(auto_on_cpu, monkeypatch, launches):
    """Broken for the dot metric at d = 16 in ieee precision only: l2, other feature dims and
    tf32x3 keep the kernel; the LFQ kernel broken at 6 bits only keeps 5 bits."""
    calls = break_search(monkeypatch, "swap", when=lambda x, l2, precision: not l2 and x.shape[-1] == 16
                         and precision == "ieee")
    x, codebook = search_inputs()
    with pytest.warns(RuntimeWarning, match="metric=dot, precision=ieee, d=16"):
        for _ in range(2):
            nearest_code(x, codebook, metric="dot")
    before = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nearest_code(x, codebook, metric="l2")  # check + launch
        nearest_code(x, codebook, metric="l2")  # launch
        nearest_code(x[:, :8], codebook[:, :8], metric="dot")  # another d: check + launch
        nearest_code(x, codebook, metric="dot", precision="tf32x3")  # another precision: check + launch
        nearest_code(x, codebook, metric="dot")  # the broken key: the reference
    assert len(calls) == before + 7
    ok = {verdict.key[3]: verdict.ok for verdict in self_check.verdicts().values()}
    assert ok == {(("metric", "dot"), ("precision", "ieee"), ("d", 16)): False,
                  (("metric", "l2"), ("precision", "ieee"), ("d", 16)): True,
                  (("metric", "dot"), ("precision", "ieee"), ("d", 8)): True,
                  (("metric", "dot"), ("precision", "tf32x3"), ("d", 16)): True}

    lfq_calls = break_lfq(monkeypatch, "mass", when=lambda d: d == 6)
    with pytest.warns(RuntimeWarning, match="lfq_entropy on cpu .float32, bits=6."):
        entropy_and_grad(lfq_inputs(d=6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entropy_and_grad(lfq_inputs(d=5))
        entropy_and_grad(lfq_inputs(d=6))
    assert lfq_calls == ["mass", "sums"] * 3  # bits=6: the check only; bits=5: the check, then the op's


def test_insisting_backend_raises_on_a_mismatch_every_call(monkeypatch):
    monkeypatch.setenv("VQ_LAYERS_BACKEND", "triton")
    calls = break_search(monkeypatch, "swap")
    x, codebook = search_inputs()
    for _ in range(2):
        with pytest.raises(self_check.KernelMismatchError, match=r"nearest_code on cpu \(float32, metric=l2.*"
                                                                 r"indices differ.*VQ_LAYERS_BACKEND=triton insists"):
            nearest_code(x, codebook)
    assert len(calls) == 1  # checked once; the verdict is kept
    break_lfq(monkeypatch, "mass")
    with pytest.raises(self_check.KernelMismatchError, match="lfq_entropy on cpu .float32, bits=8.*code mass off by"):
        entropy_and_grad(lfq_inputs())
    # a later "auto" call of the same key falls back, and warns (the error was raised, not warned)
    monkeypatch.setenv("VQ_LAYERS_BACKEND", "auto")
    monkeypatch.setattr(backend, "use_triton", lambda device, name=None: backend.check_backend(name) != "torch")
    with pytest.warns(RuntimeWarning, match="torch reference runs for this key"):
        indices, _ = nearest_code(x, codebook)
    assert indices.equal(nearest_code(x, codebook, backend="torch")[0]) and len(calls) == 1


def test_env_var_skips_the_check_and_reset_forgets_the_verdicts(auto_on_cpu, monkeypatch):
    calls = break_search(monkeypatch, "swap")
    x, codebook = search_inputs()
    monkeypatch.setenv(self_check.ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        broken, _ = nearest_code(x, codebook)  # unchecked: the broken kernel's result
    assert len(calls) == 1 and not self_check.verdicts()
    assert not broken.equal(nearest_code(x, codebook, backend="torch")[0])
    monkeypatch.delenv(self_check.ENV)
    with pytest.warns(RuntimeWarning, match="self-check"):
        nearest_code(x, codebook)
    self_check.reset()
    assert not self_check.verdicts()
    with pytest.warns(RuntimeWarning, match="self-check"):  # checked (and warned) again
        nearest_code(x, codebook)
    assert len(calls) == 3


@pytest.mark.parametrize("kind", ["search", "lfq"])
def test_the_check_runs_inside_torch_compile(kind, auto_on_cpu, monkeypatch):
    """The ops are opaque to the compiler: the check runs when the compiled graph first calls
    the op (not while tracing), warns once, and the compiled function returns the reference's
    results; later calls do not check again."""
    torch._dynamo.reset()
    if kind == "search":
        calls = break_search(monkeypatch, "swap")
        x, codebook = search_inputs()
        fn = torch.compile(lambda x: nearest_code(x, codebook)[0], fullgraph=True, backend="aot_eager")
        want = nearest_code(x, codebook, backend="torch")[0]
    else:
        calls = break_lfq(monkeypatch, "mass")
        x = lfq_inputs().detach()
        fn = torch.compile(lambda x: torch.stack(lfq_entropy(x)), fullgraph=True, backend="aot_eager")
        monkeypatch.setenv("VQ_LAYERS_BACKEND", "torch")
        want = torch.stack(lfq_entropy(x))
        monkeypatch.setenv("VQ_LAYERS_BACKEND", "auto")
    with pytest.warns(RuntimeWarning, match="self-check"):
        first = fn(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = fn(x)
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, want, rtol=0, atol=0)
    assert len(calls) == (1 if kind == "search" else 2)  # the check's launches only
    torch._dynamo.reset()


def test_a_first_call_during_cuda_graph_capture_leaves_the_check_for_later(monkeypatch):
    """The check needs a host sync, which CUDA graph capture forbids: during capture an unchecked
    key runs the reference (auto) or the unchecked kernel (triton), and is checked on the first
    call outside capture. (A CUDA device with no GPU: nothing here touches one.)"""
    cuda, capturing, checks = torch.device("cuda"), [True], []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(backend, "use_triton", lambda device, name=None: backend.check_backend(name) != "torch")
    key = ("nearest_code", cuda, torch.float32, (("metric", "l2"),))
    check = (key, lambda: checks.append(1))
    assert backend.run(cuda, "auto", lambda: "triton", lambda: "torch", check) == "torch"
    assert backend.run(cuda, "triton", lambda: "triton", lambda: "torch", check) == "triton"
    assert not checks and not self_check.verdicts()
    capturing[0] = False
    assert backend.run(cuda, "auto", lambda: "triton", lambda: "torch", check) == "triton"
    capturing[0] = True  # checked: capture changes nothing now
    assert backend.run(cuda, "auto", lambda: "triton", lambda: "torch", check) == "triton"
    assert checks == [1] and self_check.verdicts()[key].ok


# --------------------------------------------------------------------------------------------
# the check's problems


def brute64(x, codebook, l2):
    """(costs sorted ascending, their code indices, stable: ties keep the lowest index), fp64."""
    x, codebook = x.double(), codebook.double()
    dots = torch.einsum("hnd,hkd->hnk", x, codebook)
    cost = codebook.square().sum(-1)[:, None] - 2 * dots if l2 else -dots
    return cost.sort(dim=-1, stable=True)


@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("d", [8, 64, 256])
def test_search_problem_has_near_ties_ties_and_copies_exact_in_fp32(d, l2):
    x, codebook, kinds = self_check.search_problem(d, l2, "ieee", "cpu")
    cost, index = brute64(x, codebook, l2)
    assert cost.abs().max() <= 2**24  # every fp32 sum is exact
    gap = cost[..., 1] - cost[..., 0]
    near, tie, copies = kinds["near"], kinds["tie"], kinds["copies"]
    # near-ties: the two best differ by one unit at ~2^22, a relative gap of 1 to 4 ulps (2^-23)
    relative = gap[:, near] / cost[:, near][..., 0].abs()
    assert ((relative > 0) & (relative <= 2**-21)).float().mean() >= 0.5
    assert (gap[:, tie] == 0).float().mean() >= 0.8  # two distinct codes, equally good
    distinct = (codebook.gather(1, index[..., :1].expand(-1, -1, d)) != codebook.gather(1, index[..., 1:2].expand(
        -1, -1, d))).any(-1)
    assert distinct[:, tie].float().mean() >= 0.6  # at d = 8 rows share sign patterns, hence codes
    assert (cost[:, copies][..., 2] == cost[:, copies][..., 0]).all()  # three exact copies of the best
    # the torch reference in fp32 is the fp64 search with ties to the lowest index
    assert _torch_search(x, codebook, l2, False, 0.0, 0).equal(index[..., 0])
    # products of 11-bit mantissas (TF32) pick other codes on several rows; "tf32" gets exact data
    def tf32(t):
        mantissa, exponent = torch.frexp(t)
        return torch.ldexp(torch.round(mantissa * 2**11) / 2**11, exponent)
    assert int((_torch_search(tf32(x), tf32(codebook), l2, False, 0.0, 0) != index[..., 0]).sum()) >= 5
    x, codebook, _ = self_check.search_problem(d, l2, "tf32", "cpu")
    assert tf32(x).equal(x) and tf32(codebook).equal(codebook)


@pytest.mark.parametrize("metric", ["l2", "euclidean", "dot"])
@pytest.mark.parametrize("d", [1, 3, 16, 256])
def test_sampled_problem_passes_the_reference_and_catches_a_noiseless_sampler(d, metric, monkeypatch):
    """With the torch reference standing in for the kernel the sampled check passes (so a kernel
    that fails it is wrong); a sampler without noise (always the first copy) fails it."""
    l2, euclidean = metric != "dot", metric == "euclidean"
    cpu = torch.device("cpu")
    monkeypatch.setattr(triton_search, "search", lambda x, c, l2, eu, t, seed, precision: _torch_search(
        x, c, l2, eu, t, seed + 1))
    assert self_check.check_nearest_code(cpu, d, l2, euclidean, True, "ieee") is None
    monkeypatch.setattr(triton_search, "search", lambda x, c, l2, eu, t, seed, precision: _torch_search(
        x, c, l2, eu, 0.0, 0))
    assert "biased" in self_check.check_nearest_code(cpu, d, l2, euclidean, True, "ieee")


def test_lfq_problem_mixes_confident_and_uncertain_bits():
    logits = self_check.lfq_problem(10, "cpu", tokens=32)
    confident = logits.abs() >= 30
    assert confident.all(-1).any() and (~confident).all(-1).any()
    assert (confident.any(-1) & (~confident).any(-1)).sum() >= 8  # both kinds in one token
    assert ((logits.abs() - 30).abs() < 0.5).any() and (logits.abs() == 1e4).any() and (logits == 0).any()


def test_the_checks_create_no_float64():
    """The check runs inside layers (whose dtype contract forbids float64 anywhere)."""
    with RecordDtypes() as recorder:
        assert self_check.check_nearest_code(torch.device("cpu"), 16, True, False, False, "ieee") is None
        assert self_check.check_nearest_code(torch.device("cpu"), 16, True, True, True, "ieee") is None
        assert self_check.check_lfq_entropy(torch.device("cpu"), 8) is None
    assert not recorder.float64_ops, recorder.float64_ops
