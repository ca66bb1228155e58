"""benchmarks/gpu_check.py on a CPU: its refusal without CUDA, its fp64 comparisons, the kernel
validation in Triton's interpreter at tiny sizes, the self-check section, the test runner and
its JUnit parsing, the benchmarks loop, and the report. The GPU run itself needs a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vq_layers.kernels.triton_nearest_code as triton_search  # noqa: E402
from benchmarks import gpu_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TINY_SEARCH = [(70, 300, 8, 2, "l2", "ieee", 0.0), (50, 40, 3, 1, "dot", "ieee", 0.0),
               (40, 64, 16, 1, "l2", "ieee", 100.0), (40, 64, 16, 1, "l2", "tf32", 0.0)]
TINY_LFQ = [(40, 6, "dense"), (48, 8, "mixed")]


def test_without_cuda_it_says_so_in_one_line_and_fails():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.strip() == gpu_check.NO_CUDA
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_cuda_marker_selects_the_tests_skipped_without_cuda():
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                           "no:cacheprovider", "tests/test_dtype_matrix.py", "tests/test_distributed_fsdp.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert ids and any("fsdp1" in test for test in ids)
    assert all("autocast_cuda" in test or "fsdp1" in test for test in ids), ids[:5]
    assert sum("autocast_cuda" in test for test in ids) == 36  # 3 x 3 dtypes x 2 autocasts x train/eval


# --------------------------------------------------------------------------------------------
# fp64 comparisons


def test_search_agreement_flags_a_wrong_row_but_not_a_near_tie():
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(1, 50, 8, generator=generator)
    x = torch.randn(1, 30, 8, generator=generator)
    codebook[0, 7] = codebook[0, 3]  # exact copies: index 3 wins
    x[0, 0] = codebook[0, 3] + 0.01
    offset = 0.5 * torch.randn(8, generator=generator)  # a near-tie for row 1: codes 11 and 12 at
    codebook[0, 11] = x[0, 1] + offset  # distances equal to within ~1e-7 relative
    codebook[0, 12] = x[0, 1] + offset.flip(0) * (1 + 1e-7)
    want, gap = gpu_check.brute_search64(x, codebook, "l2", chunk_elements=100)  # several row chunks
    assert want[0, 0] == 3 and gap[0, 1] < gpu_check.NEAR_TIE
    score = (x - codebook[0, want[0]]).square().sum(-1)
    assert gpu_check.search_agreement(x, codebook, "l2", want, score)["ok"]

    near = want.clone()
    near[0, 1] = 11 if want[0, 1] == 12 else 12
    result = gpu_check.search_agreement(x, codebook, "l2", near, (x - codebook[0, near[0]]).square().sum(-1))
    assert result["ok"] and result["near_ties_differing"] == 1 and result["wrong"] == 0

    wrong = want.clone()
    wrong[0, 2] = (want[0, 2] + 1) % 50  # row 2 has a clear nearest code
    assert gap[0, 2] >= gpu_check.NEAR_TIE
    result = gpu_check.search_agreement(x, codebook, "l2", wrong, score)
    assert not result["ok"] and result["wrong"] == 1
    assert result["first_wrong"] == f"head 0, row 2: {int(wrong[0, 2])} instead of {int(want[0, 2])}"
    result = gpu_check.search_agreement(x, codebook, "l2", want, score * (1 + 1e-4))
    assert not result["ok"] and result["max_score_error"] > gpu_check.SCORE_TOL


def test_lfq_agreement_against_fp64():
    from vq_layers.lfq_entropy_loss import lfq_entropy

    logits = (0.5 * torch.randn(30, 1, 6, generator=torch.Generator().manual_seed(1))).requires_grad_()
    per_sample, codebook = lfq_entropy(logits)  # the torch reference (CPU, auto)
    (per_sample - 0.7 * codebook).backward()
    assert gpu_check.lfq_agreement(logits, per_sample.item(), codebook.item(), logits.grad)["ok"]
    result = gpu_check.lfq_agreement(logits, per_sample.item(), codebook.item() * (1 + 1e-4), logits.grad)
    assert not result["ok"] and result["codebook_error"] > gpu_check.LFQ_TOL
    result = gpu_check.lfq_agreement(logits, per_sample.item(), codebook.item(), logits.grad * 1.001)
    assert not result["ok"] and result["grad_error"] > gpu_check.LFQ_TOL


# --------------------------------------------------------------------------------------------
# the kernels, interpreted


def test_kernel_validation_runs_the_kernels_and_passes():
    result = gpu_check.validate_kernels("cpu", quick=True, search_configs=TINY_SEARCH, lfq_configs=TINY_LFQ)
    assert result["ok"], result
    assert all(entry["launches"] >= 1 for part in ("search", "sampling", "lfq") for entry in result[part])
    assert [entry["judged"] for entry in result["search"]] == [True, True, True, False]
    assert len(result["sampling"]) == 3 and len(result["lfq"]) == 2


def test_kernel_validation_catches_a_broken_kernel(monkeypatch):
    real = triton_search.search

    def broken(x, codebook, *args, **kwargs):
        out = real(x, codebook, *args, **kwargs)
        out[:, :2] = out[:, [1, 0]]
        return out

    monkeypatch.setattr(triton_search, "search", broken)
    result = gpu_check.validate_kernels("cpu", quick=True, search_configs=TINY_SEARCH[:1], lfq_configs=[])
    assert not result["ok"] and result["search"][0]["wrong"] >= 1


def test_the_self_check_section_times_every_key(monkeypatch):
    monkeypatch.setattr(gpu_check, "QUICK_SELF_CHECK_DIMS", (8,))
    monkeypatch.setattr(gpu_check, "QUICK_SELF_CHECK_BITS", (6,))
    result = gpu_check.run_self_checks("cpu", quick=True)
    assert result["ok"]
    keys = [entry["key"] for entry in result["checks"]]
    assert keys == ["nearest_code l2, ieee, d=8", "nearest_code l2, tf32x3, d=8", "nearest_code l2, tf32, d=8",
                    "nearest_code dot, ieee, d=8", "nearest_code l2 sampled, ieee, d=8",
                    "nearest_code euclidean sampled, ieee, d=8", "nearest_code dot sampled, ieee, d=8",
                    "lfq_entropy bits=6"]
    assert all(entry["seconds"] > 0 and entry["first_seconds"] > 0 for entry in result["checks"])


# --------------------------------------------------------------------------------------------
# the test runner, the benchmarks loop, the report, main


FAKE_TESTS = '''
import time, pytest
def test_a(): pass
def test_b(): pass
def test_fails(): assert 1 == 2, "one is not two"
@pytest.mark.skip(reason="no")
def test_skipped(): pass
def test_slow():
    time.sleep(float(__import__("os").environ.get("SLEEP", "0")))
'''


def test_cuda_tests_runner_parses_junit_and_stops_at_the_deadline(tmp_path, monkeypatch):
    (tmp_path / "test_fake.py").write_text(FAKE_TESTS)

    def command(quick, junit):
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                str(tmp_path / "test_fake.py")]

    monkeypatch.setattr(gpu_check, "pytest_command", command)
    result = gpu_check.finish_cuda_tests(gpu_check.start_cuda_tests(quick=True), time.perf_counter() + 120)
    assert (result["passed"], result["failed"], result["errors"], result["skipped"]) == (3, 1, 0, 1)
    assert not result["ok"] and not result["timed_out"]
    assert result["failures"][0]["test"].endswith("test_fails") and "one is not two" in result["failures"][0]["message"]

    monkeypatch.setenv("SLEEP", "60")
    start = time.perf_counter()
    result = gpu_check.finish_cuda_tests(gpu_check.start_cuda_tests(quick=True), time.perf_counter() + 5)
    assert result["timed_out"] and not result["ok"] and time.perf_counter() - start < 30


def test_benchmarks_loop_measures_each_implementation_and_keeps_to_the_budget(monkeypatch):
    from benchmarks import fsq, kernels, run, vq

    monkeypatch.setattr(kernels, "CONFIGS", [("nearest_code", 64, 32, 8), ("lfq_entropy", 64, 2**4, 4)])
    monkeypatch.setattr(run, "sections", lambda mode: [
        run.Section("vq", "VectorQuantize", vq, [run.vq_config(32, 64, dim=8)]),
        run.Section("fsq", "FSQ", fsq, [fsq.config(2**8, dim=8, tokens=64)])])
    monkeypatch.setenv("VQ_LAYERS_BACKEND", "auto")
    result = gpu_check.run_benchmarks(quick=False, repeats=1, clock=gpu_check.Clock(600), device="cpu")
    search, lfq = result["kernels"]
    assert all(search[impl]["seconds"] > 0 for impl in kernels.IMPLS)
    assert lfq["cdist+argmin"] == {"error": "n/a"} and lfq["triton"]["seconds"] > 0
    assert [section["name"] for section in result["sections"]] == ["vq", "fsq"]
    for section in result["sections"]:
        assert all(section["rows"][0][impl]["seconds"] > 0 for impl in ("vq_layers", "vector-quantize-pytorch"))
    import os
    assert os.environ["VQ_LAYERS_BACKEND"] == "auto"  # benchmarks.kernels' setting does not leak

    spent = gpu_check.Clock(0)
    result = gpu_check.run_benchmarks(quick=False, repeats=1, clock=spent, device="cpu")
    assert result["kernels"][0]["triton"] == {"error": "skipped: time budget"}


def fake_payload(tmp_path) -> dict:
    return {
        "environment": {"command": "python -m benchmarks.gpu_check --quick", "mode": "quick", "torch": "2.x",
                        "cuda": "12.x", "date": "2030-01-01T00:00:00+00:00", "triton": "3.x", "peer_version": "1.32.0",
                        "commit": "abc1234", "gpu": "NVIDIA H200", "capability": "9.0", "sms": 132,
                        "memory_gib": 139.8},
        "seconds": {"self_check": 3.0, "kernels": 20.0, "tests": 90.0, "benchmarks": 60.0},
        "self_check": {
            "checks": [{"key": "nearest_code l2, ieee, d=64", "error": None, "first_seconds": 1.2, "seconds": 0.004,
                        "ok": True}], "ok": True},
        "kernels": gpu_check.validate_kernels("cpu", quick=True, search_configs=TINY_SEARCH[:2],
                                              lfq_configs=TINY_LFQ[:1]),
        "tests": {"command": "python -m pytest -m cuda", "passed": 719, "failed": 1, "errors": 0, "skipped": 0,
                  "seconds": 88.0, "self_check_warnings": 0, "ok": False, "timed_out": False,
                  "failures": [{"test": "tests.test_vq::test_dtype_matrix[x]", "message": "boom"}]},
        "benchmarks": {"kernels": [{"op": "nearest_code", "tokens": 16384, "codes": 1024, "dim": 64,
                                    "triton": {"seconds": 0.001, "peak_mib_added": 10.0, "fp64_agreement": 1.0},
                                    "torch": {"seconds": 0.002, "peak_mib_added": 20.0},
                                    "cdist+argmin": {"seconds": 0.003, "peak_mib_added": 64.0},
                                    "matmul bound": {"error": "skipped: time budget"}}],
                       "sections": [{"name": "vq_sweep", "title": "VectorQuantize codebook-size sweep", "rows": [
                           {"layer": "VectorQuantize", "dim": 256, "codebook_size": 1024, "tokens": 4096,
                            "num_quantizers": 1, "vq_layers": {"seconds": 0.004, "peak_mib_added": 30.0},
                            "vector-quantize-pytorch": {"seconds": 0.008, "peak_mib_added": 90.0},
                            "matmul bound": {"seconds": 0.001, "peak_mib_added": 16.0}}]}]},
        "wall_seconds": 175.0,
    }


def test_report_names_the_gpu_versions_and_every_section(tmp_path):
    payload = fake_payload(tmp_path)
    stem = gpu_check.write_report(payload, tmp_path)
    assert stem == tmp_path / "nvidia-h200"
    assert json.loads(stem.with_suffix(".json").read_text())["environment"]["gpu"] == "NVIDIA H200"
    text = stem.with_suffix(".md").read_text()
    for needle in ("# vq_layers on NVIDIA H200", "torch 2.x (CUDA 12.x)", "triton 3.x", "2030-01-01", "abc1234",
                   "## Self-check", "nearest_code l2, ieee, d=64", "## Triton kernels against an fp64 brute force",
                   "70 × 300 × 8 × 2", "Sampling", "lfq_entropy", "## CUDA tests", "719 passed, 1 failed",
                   "tests.test_vq::test_dtype_matrix[x]`: boom", "## Benchmarks", "skipped: time budget",
                   "VectorQuantize codebook-size sweep", "| kernels' self-check | ✅ |", "| CUDA tests | ❌ |"):
        assert needle in text, needle
    # ratios over vq_layers (the peer: 2x the time, 3x the memory) and over the Triton kernel
    assert "| VectorQuantize | 256 | 1024 | 4096 | 2 | 3 | 0.25 |" in text
    assert "| nearest_code | 16384 × 1024 × 64 | 1 | 10 | 1.0000 | 2 | 2 | 3 | 6.4 |" in text


@pytest.mark.parametrize("tests_ok, status", [(True, 0), (False, 1)])
def test_main_runs_the_sections_in_order_and_sets_the_status(tests_ok, status, tmp_path, monkeypatch):
    order = []

    def section(name, result):
        def fn(*args, **kwargs):
            order.append(name)
            return result
        return fn

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main sets it to 0; restored after the test
    payload = fake_payload(tmp_path)
    monkeypatch.setattr(gpu_check, "environment", lambda command, mode: {**payload["environment"], "command": command})
    monkeypatch.setattr(gpu_check, "run_self_checks", section("self_check", payload["self_check"]))
    monkeypatch.setattr(gpu_check, "start_cuda_tests", section("start_tests", {}))
    monkeypatch.setattr(gpu_check, "validate_kernels", section("kernels", payload["kernels"]))
    monkeypatch.setattr(gpu_check, "finish_cuda_tests", section("tests", {**payload["tests"], "ok": tests_ok}))
    monkeypatch.setattr(gpu_check, "run_benchmarks", section("benchmarks", payload["benchmarks"]))
    assert gpu_check.main(["--quick", "--out", str(tmp_path)]) == status
    assert order == ["self_check", "start_tests", "kernels", "tests", "benchmarks"]
    report = (tmp_path / "nvidia-h200.md").read_text()
    assert "python -m benchmarks.gpu_check --quick --out" in report
