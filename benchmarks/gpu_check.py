"""One command for a GPU machine: the CUDA test cells, the Triton kernels compiled for real against
an fp64 brute force, the kernels' self-checks, and the GPU benchmarks, in one report.

    python -m benchmarks.gpu_check             # everything: about 7 minutes on an H100/H200
    python -m benchmarks.gpu_check --quick     # about 3 minutes: smaller sizes, the bf16 test cells
    python -m benchmarks.gpu_check --out DIR   # the report elsewhere (default: benchmarks/results/)

Writes <out>/<gpu>.md and <out>/<gpu>.json (e.g. benchmarks/results/nvidia-h200.md): the GPU, the
torch, CUDA, Triton and peer versions, the commit and the date, then each section's results. Exit
status 0 when every check passed, 1 when one failed (the report says which), 2 without CUDA.

1. Self-check: each kernel's one-time self-check (vq_layers/kernels/self_check.py) run for a set
   of keys: its verdict, its first call (with compilation) and its cost once compiled.
2. Kernels against fp64: nearest_code's kernel (l2 and dot, heads, up to 262144 codes, few rows
   against many codes, data far from the origin, tf32x3; "tf32" reported, not judged) must give
   the fp64 argmin on every row but near-ties (relative gap below 1e-6) and its scores within
   1e-5; its Gumbel sampling must match softmax(-cost / t) (chi-square, 7 degrees of freedom);
   lfq_entropy (dense kernels, 2^10 to 2^18 codes, and tokens mixing confident and uncertain
   bits) must give both entropies and the logits gradient within 1e-5 of fp64. The self-check is
   off here, so a wrong kernel is measured rather than replaced; launches are counted, so a
   fallback to torch cannot pass for the kernel.
3. CUDA tests: `pytest -m cuda` (every test skipped without CUDA: the dtype matrix's CUDA
   autocast cells, FSDP1; with --quick the bf16 cells and FSDP1) in a subprocess with
   TRITON_INTERPRET=0 and the default backend, so the kernels and their self-checks run as a
   user's would. It runs while this process does section 2 (no timing overlaps it) and is
   stopped 0.6 x the budget into the run (--tests-deadline).
4. Benchmarks: benchmarks.kernels' configurations (Triton against the torch reference, cdist +
   argmin and the fp32 matmul bound) and benchmarks.run's sections (VectorQuantize, ResidualVQ,
   LFQ and FSQ training steps against vector-quantize-pytorch and each layer's bound), on cuda.
   Measured in this process: on CUDA the peak is torch.cuda.max_memory_allocated after a reset,
   which other measurements in the process do not disturb, and a fresh process per measurement
   would cost ~5 s each.

The run keeps to a time budget (--budget seconds, default 420, 170 with --quick): a benchmark
measurement that would start past it is skipped and marked so in the report. Every part runs on
a CPU too where it can (tests/test_gpu_check.py: the fp64 comparisons, the report, the kernels in
Triton's interpreter at tiny sizes, the test runner, the benchmark loop).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NO_CUDA = "benchmarks.gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine"
NEAR_TIE = 1e-6  # docs/design.md's exactness contract: rows whose two best codes are closer may differ
SCORE_TOL = 1e-5
LFQ_TOL = 1e-5
CHI2_LIMIT = 35.0  # 7 degrees of freedom: p < 1e-5 for a correct sampler

# (rows, codes, dim, heads, metric, precision, offset): offset moves the data away from the origin
SEARCH_CONFIGS = [
    (4096, 1024, 64, 1, "l2", "ieee", 0.0),
    (4096, 1024, 64, 1, "dot", "ieee", 0.0),
    (2048, 4096, 32, 8, "l2", "ieee", 0.0),
    (256, 65536, 256, 1, "l2", "ieee", 0.0),
    (4096, 8192, 64, 1, "l2", "ieee", 1000.0),
    (4096, 16384, 128, 1, "dot", "tf32x3", 0.0),
    (16384, 16384, 256, 1, "l2", "ieee", 0.0),
    (16384, 262144, 64, 1, "l2", "ieee", 0.0),
    (4096, 16384, 128, 1, "l2", "tf32", 0.0),
]
QUICK_SEARCH = 6  # the first six
# (tokens, bits, kind): "dense" = every bit uncertain; "mixed" = self_check.lfq_problem's tokens
LFQ_CONFIGS = [(4096, 10, "dense"), (2048, 12, "mixed"), (4096, 14, "dense"), (2048, 16, "dense"),
               (4096, 16, "dense"), (1024, 18, "dense")]
QUICK_LFQ = 4
SELF_CHECK_DIMS, QUICK_SELF_CHECK_DIMS = (16, 64, 256), (64,)
SELF_CHECK_BITS, QUICK_SELF_CHECK_BITS = (4, 8, 12, 14, 16, 18), (8, 14, 16)


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


# --------------------------------------------------------------------------------------------
# fp64 references (any device; CPU tensors in the tests)


def brute_search64(x, codebook, metric: str, chunk_elements: int = 2**27):
    """fp64 search of x (h, n, d) against codebook (h, k, d) -> (index (h, n): the first best code,
    relative gap (h, n) between the two best as tests/test_nearest_code.py defines it). Rows go
    in chunks of at most `chunk_elements` costs."""
    import torch

    x64, c64 = x.double(), codebook.double()
    h, n, _ = x64.shape
    k = c64.shape[1]
    code_norms = c64.square().sum(-1)[:, None]  # (h, 1, k)
    largest = code_norms.sqrt().amax(-1)  # (h, 1)
    index = torch.empty((h, n), dtype=torch.long, device=x.device)
    gap = torch.full((h, n), math.inf, dtype=torch.float64, device=x.device)
    rows = max(1, chunk_elements // (h * k))
    for start in range(0, n, rows):
        part = x64[:, start : start + rows]
        dots = torch.einsum("hnd,hkd->hnk", part, c64)
        if metric == "dot":
            cost = -dots
            scale = part.norm(dim=-1) * largest
        else:
            cost = part.square().sum(-1, keepdim=True) + code_norms - 2 * dots
        index[:, start : start + rows] = cost.argmin(-1)  # the first minimum: the lowest index
        if k > 1:
            two = cost.topk(2, dim=-1, largest=False).values
            if metric == "dot":
                gap[:, start : start + rows] = (two[..., 1] - two[..., 0]) / scale.clamp(min=1e-300)
            else:
                gap[:, start : start + rows] = (two[..., 1] - two[..., 0]) / two[..., 1].clamp(min=1e-300)
    return index, gap


def search_agreement(x, codebook, metric: str, indices, score) -> dict:
    """The kernel's indices (h, n) and scores against the fp64 brute force: rows that differ outside
    near-ties (must be 0), near-ties and how many of them differ, the largest score error."""
    want, gap = brute_search64(x, codebook, metric)
    clear = gap >= NEAR_TIE
    wrong = (indices != want) & clear
    chosen = codebook.double().gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x64 = x.double()
    if metric == "dot":
        exact = (x64 * chosen).sum(-1)
        scale = x64.norm(dim=-1) * chosen.norm(dim=-1)
    else:
        exact = (x64 - chosen).square().sum(-1)
        scale = exact
    score_error = ((score.double() - exact).abs() / scale.clamp(min=1e-30)).max().item() if score.numel() else 0.0
    result = {
        "rows": int(indices.numel()),
        "wrong": int(wrong.sum()),
        "near_ties": int((~clear).sum()),
        "near_ties_differing": int(((indices != want) & ~clear).sum()),
        "max_score_error": score_error,
    }
    if result["wrong"]:
        h, r = (int(v) for v in wrong.nonzero()[0])
        result["first_wrong"] = f"head {h}, row {r}: {int(indices[h, r])} instead of {int(want[h, r])}"
    result["ok"] = result["wrong"] == 0 and score_error <= SCORE_TOL
    return result


def lfq_brute64(logits):
    """fp64 (per-sample entropy, codebook entropy, d/dlogits of per_sample - 0.7 codebook) of
    logits (n, c, d) over all 2^d codes."""
    import torch

    logits64 = logits.detach().double().requires_grad_()
    n, c, d = logits64.shape
    bits = ((torch.arange(2**d, device=logits.device)[:, None] >> torch.arange(d - 1, -1, -1, device=logits.device))
            & 1).double()
    log_p = torch.nn.functional.logsigmoid(logits64) @ bits.T + torch.nn.functional.logsigmoid(-logits64) @ (1 - bits).T
    p = log_p.exp()
    per_sample = -(p * log_p).sum(-1).mean()
    mean = p.mean(0)
    codebook = -(mean * mean.clamp_min(1e-300).log()).sum(-1).mean()
    (per_sample - 0.7 * codebook).backward()
    return per_sample.item(), codebook.item(), logits64.grad


def lfq_agreement(logits, per_sample, codebook, grad) -> dict:
    """lfq_entropy's outputs against the fp64 brute force: relative errors of both entropies and
    the gradient's largest error relative to its largest value."""
    want_per_sample, want_codebook, want_grad = lfq_brute64(logits)
    scale = want_grad.abs().max().item()
    result = {
        "per_sample_error": abs(float(per_sample) - want_per_sample) / max(abs(want_per_sample), 1e-30),
        "codebook_error": abs(float(codebook) - want_codebook) / max(abs(want_codebook), 1e-30),
        "grad_error": (grad.double() - want_grad).abs().max().item() / max(scale, 1e-30),
    }
    result["ok"] = all(result[key] <= LFQ_TOL for key in ("per_sample_error", "codebook_error", "grad_error"))
    return result


# --------------------------------------------------------------------------------------------
# the kernels, compiled for real (or interpreted on a CPU)


@contextlib.contextmanager
def kernels_only():
    """VQ_LAYERS_BACKEND=triton with the self-check off (a wrong kernel is measured, not
    replaced), and the kernels' launches counted: -> the counts dict."""
    import vq_layers.kernels.triton_lfq_entropy as triton_lfq
    import vq_layers.kernels.triton_nearest_code as triton_search

    counts = {"search": 0, "code_mass": 0, "bit_sums": 0}
    saved_env = {name: os.environ.get(name) for name in ("VQ_LAYERS_BACKEND", "VQ_LAYERS_SELF_CHECK")}
    originals = [(triton_search, "search"), (triton_lfq, "code_mass"), (triton_lfq, "bit_sums")]
    saved = [getattr(module, name) for module, name in originals]
    for (module, name), original in zip(originals, saved):
        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        setattr(module, name, counted)
    os.environ.update(VQ_LAYERS_BACKEND="triton", VQ_LAYERS_SELF_CHECK="0")
    try:
        yield counts
    finally:
        for (module, name), original in zip(originals, saved):
            setattr(module, name, original)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def validate_search(rows: int, codes: int, dim: int, heads: int, metric: str, precision: str, offset: float,
                    device: str, seed: int = 0) -> dict:
    import torch

    from vq_layers.kernels.nearest_code import nearest_code

    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(heads, rows, dim, device=device, generator=generator) + offset
    codebook = torch.randn(heads, codes, dim, device=device, generator=generator) + offset
    if metric == "dot":  # cosine codebooks on normalized inputs, the usual use
        x, codebook = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(codebook, dim=-1)
    with kernels_only() as launches:
        indices, score = nearest_code(x, codebook, metric=metric, precision=precision)
    result = search_agreement(x, codebook, metric, indices, score)
    result["launches"] = launches["search"]
    result["judged"] = precision != "tf32"  # 10-bit mantissas pick wrong codes at near-ties: documented
    result["ok"] = result["ok"] and launches["search"] > 0 or not result["judged"]
    return result


def validate_sampling(metric: str, device: str, samples: int = 60000, seed: int = 4) -> dict:
    """One row repeated `samples` times against 8 codes at a temperature: the sampled codes'
    chi-square against softmax(-cost / t) (fp64), cost = ||x - c||^2, ||x - c|| or -x.c."""
    import torch

    from vq_layers.kernels.nearest_code import nearest_code

    generator = torch.Generator(device=device).manual_seed(seed)
    codebook = torch.randn(8, 4, device=device, generator=generator)
    row = torch.randn(4, device=device, generator=generator)
    c64, x64 = codebook.double(), row.double()
    cost = {"l2": (x64 - c64).square().sum(-1), "euclidean": (x64 - c64).norm(dim=-1), "dot": -(c64 @ x64)}[metric]
    temperature = (cost.max() - cost.min()).item() / 3
    p = torch.softmax(-cost / temperature, dim=0)
    with kernels_only() as launches:
        indices, _ = nearest_code(row.expand(samples, -1), codebook, metric=metric, temperature=temperature,
                                  generator=torch.Generator(device=device).manual_seed(seed))
    counts = torch.bincount(indices, minlength=8).double()
    expected = p * samples
    chi2 = ((counts - expected).square() / expected).sum().item()
    return {"samples": samples, "chi2": chi2, "launches": launches["search"],
            "ok": chi2 < CHI2_LIMIT and launches["search"] > 0}


def validate_lfq(tokens: int, bits: int, kind: str, device: str, seed: int = 0) -> dict:
    import torch

    from vq_layers.kernels import self_check
    from vq_layers.lfq_entropy_loss import lfq_entropy

    if kind == "dense":
        generator = torch.Generator(device=device).manual_seed(seed)
        logits = 0.3 * torch.randn(tokens, bits, device=device, generator=generator)
    else:
        logits = self_check.lfq_problem(bits, device, tokens, seed=seed)
    logits = logits[:, None].requires_grad_()
    with kernels_only() as launches:
        per_sample, codebook = lfq_entropy(logits)
        (per_sample - 0.7 * codebook).backward()
    result = lfq_agreement(logits, per_sample.item(), codebook.item(), logits.grad)
    result.update(launches=launches["code_mass"] + launches["bit_sums"])
    result["ok"] = result["ok"] and result["launches"] >= 2
    return result


def validate_kernels(device: str, quick: bool, search_configs=None, lfq_configs=None) -> dict:
    search_configs = search_configs if search_configs is not None else SEARCH_CONFIGS[: QUICK_SEARCH if quick else None]
    lfq_configs = lfq_configs if lfq_configs is not None else LFQ_CONFIGS[: QUICK_LFQ if quick else None]
    out = {"search": [], "sampling": [], "lfq": []}
    for config in search_configs:
        out["search"].append({"config": list(config), **guarded(lambda: validate_search(*config, device))})
    for metric in ("l2", "euclidean", "dot"):
        samples = 60000 if device == "cuda" else 2000
        out["sampling"].append({"metric": metric, **guarded(lambda: validate_sampling(metric, device, samples))})
    for config in lfq_configs:
        out["lfq"].append({"config": list(config), **guarded(lambda: validate_lfq(*config, device))})
    out["ok"] = all(entry["ok"] for part in ("search", "sampling", "lfq") for entry in out[part])
    return out


def guarded(fn) -> dict:
    """fn()'s result, or {"ok": False, "error": ...} when it raises; frees CUDA memory after."""
    try:
        return fn()
    except Exception as error:  # a failing kernel must not end the run
        return {"ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    finally:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_self_checks(device: str, quick: bool) -> dict:
    """Each key's self-check run twice: the first call compiles the kernel, the second is what a
    process pays on first use of a key once the kernel is compiled."""
    import torch

    from vq_layers.kernels import self_check

    device = torch.device(device)
    entries = []
    variants = [("l2", True, False, False), ("dot", False, False, False), ("l2 sampled", True, False, True),
                ("euclidean sampled", True, True, True), ("dot sampled", False, False, True)]
    for d in QUICK_SELF_CHECK_DIMS if quick else SELF_CHECK_DIMS:
        for name, l2, euclidean, sampled in variants:
            for precision in ("ieee", "tf32x3", "tf32") if name == "l2" else ("ieee",):
                entries.append((f"nearest_code {name}, {precision}, d={d}",
                                lambda d=d, l2=l2, euclidean=euclidean, sampled=sampled, precision=precision:
                                self_check.check_nearest_code(device, d, l2, euclidean, sampled, precision)))
    for bits in QUICK_SELF_CHECK_BITS if quick else SELF_CHECK_BITS:
        entries.append((f"lfq_entropy bits={bits}", lambda bits=bits: self_check.check_lfq_entropy(device, bits)))
    results = []
    for name, check in entries:
        def timed(check=check):
            times, errors = [], []
            for _ in range(2):
                synchronize(device)
                start = time.perf_counter()
                errors.append(check())
                synchronize(device)
                times.append(time.perf_counter() - start)
            return {"error": errors[0], "first_seconds": times[0], "seconds": times[1], "ok": errors[0] is None}
        results.append({"key": name, **guarded(timed)})
    return {"checks": results, "ok": all(entry["ok"] for entry in results)}


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# the CUDA test cells


def pytest_command(quick: bool, junit: str) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfE",
               f"--junitxml={junit}"]
    return command + ["-k", "cuda-bf16 or fsdp1"] if quick else command


def parse_junit(path: str) -> dict:
    """Counts and failures of a pytest JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                failures.append({"test": name, "message": (child.get("message") or "")[:300]})
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
    return {**counts, "failures": failures[:50]}


def start_cuda_tests(quick: bool) -> dict:
    """Starts `pytest -m cuda` in a subprocess (compiled kernels, default backend and self-check)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    for name in ("VQ_LAYERS_BACKEND", "VQ_LAYERS_SELF_CHECK"):
        env.pop(name, None)
    folder = tempfile.TemporaryDirectory()
    junit = str(Path(folder.name) / "junit.xml")
    command = pytest_command(quick, junit)
    output = open(Path(folder.name) / "output.txt", "w+")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    return {"process": process, "folder": folder, "junit": junit, "output": output, "start": time.perf_counter(),
            "command": "python " + " ".join(command[1:]).replace(junit, "junit.xml")}


def finish_cuda_tests(started: dict, deadline: float) -> dict:
    """Waits for the tests until `deadline` (time.perf_counter()), then stops them -> results."""
    process = started["process"]
    try:
        process.wait(timeout=max(1.0, deadline - time.perf_counter()))
        timed_out = False
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        timed_out = True
    started["output"].seek(0)
    output = started["output"].read()
    started["output"].close()
    junit = started["junit"]
    if Path(junit).exists() and not timed_out:
        result = parse_junit(junit)
    else:
        result = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    started["folder"].cleanup()
    result.update(command=started["command"], seconds=time.perf_counter() - started["start"],
                  returncode=process.returncode, timed_out=timed_out,
                  self_check_warnings=output.count("disagrees with the torch reference"),
                  summary=(output.strip().splitlines() or [""])[-1])
    result["ok"] = (not timed_out and process.returncode == 0 and result["failed"] == result["errors"] == 0
                    and result["passed"] > 0 and result["self_check_warnings"] == 0)
    if not result["ok"]:
        result["tail"] = output[-3000:]
    return result


# --------------------------------------------------------------------------------------------
# benchmarks (in this process, on cuda)


def measure(fn, clock: Clock, reserve: float) -> dict:
    """fn() unless the budget is spent; an error (out of memory included) becomes the cell's text."""
    if clock.left() < reserve:
        return {"error": "skipped: time budget"}
    saved = os.environ.get("VQ_LAYERS_BACKEND")  # benchmarks.kernels sets it for LFQ
    try:
        result = guarded(fn)
    finally:
        if saved is None:
            os.environ.pop("VQ_LAYERS_BACKEND", None)
        else:
            os.environ["VQ_LAYERS_BACKEND"] = saved
    if result.get("ok") is False and "error" in result:
        return {"error": result["error"][:120]}
    return result


def run_benchmarks(quick: bool, repeats: int, clock: Clock, device: str = "cuda", reserve: float = 15.0) -> dict:
    from benchmarks import kernels, run
    from benchmarks.common import PEER, PEER_MAX_GIB

    kernel_rows = []
    for op, tokens, codes, dim in kernels.CONFIGS:
        if quick and not (codes <= 2**16 and tokens * codes <= 2**26):  # benchmarks.kernels --quick
            continue
        row = {"op": op, "tokens": tokens, "codes": codes, "dim": dim}
        for impl in kernels.IMPLS:
            if op == "lfq_entropy" and impl not in ("triton", "torch"):
                row[impl] = {"error": "n/a"}
                continue
            row[impl] = measure(lambda: kernels.measure_one(impl, op, tokens, codes, dim, repeats, device), clock,
                                reserve)
            print(f"kernels {op} {tokens}x{codes}x{dim} {impl}: {row[impl]}", flush=True)
        kernel_rows.append(row)
    sections = []
    for section in run.sections("quick" if quick else "full"):
        rows = []
        for config in section.configs:
            row = dict(zip(section.bench.KEYS, config))
            for impl in section.bench.IMPLS:
                need = section.bench.peer_gib(*config) if impl == PEER else None
                if need is not None and need > PEER_MAX_GIB:
                    row[impl] = {"error": f"skipped: would need ~{need:.0f} GiB"}
                else:
                    row[impl] = measure(lambda: section.bench.measure_one(*config, impl, repeats, device), clock,
                                        reserve)
                print(f"{section.name} {list(config)} {impl}: {row[impl]}", flush=True)
            rows.append(row)
        sections.append({"name": section.name, "title": section.title, "rows": rows})
    return {"kernels": kernel_rows, "sections": sections}


# --------------------------------------------------------------------------------------------
# the report


def environment(command: str, mode: str) -> dict:
    import torch

    info = {"command": command, "mode": mode, "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for package, key in (("triton", "triton"), ("vector-quantize-pytorch", "peer_version")):
        try:
            info[key] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[key] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=ROOT).stdout.strip() or None
    except OSError:
        info["commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    return info


def _mark(ok: bool | None) -> str:
    return "—" if ok is None else "✅" if ok else "❌"


def _fmt(value, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def markdown(payload: dict) -> str:
    from benchmarks import kernels
    from benchmarks.common import markdown_table
    from benchmarks.run import sections as suite_sections

    env = payload["environment"]
    lines = [
        f"# vq_layers on {env.get('gpu', 'an unknown GPU')}: GPU check",
        "",
        f"`{env['command']}`, {env['date']}; GPU {env.get('gpu')} (compute capability {env.get('capability')}, "
        f"{env.get('sms')} SMs, {env.get('memory_gib')} GiB); torch {env['torch']} (CUDA {env.get('cuda')}), "
        f"triton {env.get('triton')}, vector-quantize-pytorch {env.get('peer_version')}; vq_layers commit "
        f"{env.get('commit')}; wall time {payload['wall_seconds'] / 60:.1f} min.",
        "",
        "| section | result | seconds |",
        "|---|---|---|",
    ]
    for name, title in (("self_check", "kernels' self-check"), ("kernels", "kernels vs fp64"),
                        ("tests", "CUDA tests"), ("benchmarks", "benchmarks")):
        section = payload.get(name)
        ok = None if section is None or name == "benchmarks" else section.get("ok")
        lines.append(f"| {title} | {_mark(ok) if section is not None else 'not run'} | "
                     f"{_fmt(payload.get('seconds', {}).get(name), '.0f')} |")

    checks = payload.get("self_check")
    if checks:
        lines += ["", "## Self-check (each kernel against the torch reference on its check problem)", "",
                  "| key | verdict | first call s (compiles) | cost s | error |", "|---|---|---|---|---|"]
        for entry in checks["checks"]:
            lines.append(f"| {entry['key']} | {_mark(entry['ok'])} | {_fmt(entry.get('first_seconds'))} | "
                         f"{_fmt(entry.get('seconds'))} | {entry.get('error') or ''} |")

    validation = payload.get("kernels")
    if validation:
        lines += ["", "## Triton kernels against an fp64 brute force", "",
                  f"nearest_code: indices must equal the fp64 argmin outside near-ties (relative gap < {NEAR_TIE:g}), "
                  f"scores within {SCORE_TOL:g}; \"tf32\" is reported, not judged.", "",
                  "| rows × codes × dim × heads | metric | precision | offset | result | wrong rows | near-ties "
                  "(differing) | max score error | launches |", "|---|---|---|---|---|---|---|---|---|"]
        for entry in validation["search"]:
            rows, codes, dim, heads, metric, precision, offset = entry["config"]
            lines.append(f"| {rows} × {codes} × {dim} × {heads} | {metric} | {precision} | {offset:g} | "
                         f"{_mark(entry['ok']) if entry.get('judged', True) else 'reported'} | "
                         f"{entry.get('wrong', entry.get('error', ''))} | {entry.get('near_ties', '—')} "
                         f"({entry.get('near_ties_differing', '—')}) | {_fmt(entry.get('max_score_error'))} | "
                         f"{entry.get('launches', '—')} |")
        lines += ["", f"Sampling (one row × many draws, 8 codes): chi-square against softmax(-cost / t), "
                      f"7 degrees of freedom, must stay below {CHI2_LIMIT:g}.", "",
                  "| metric | draws | chi-square | result |", "|---|---|---|---|"]
        for entry in validation["sampling"]:
            lines.append(f"| {entry['metric']} | {entry.get('samples', '—')} | "
                         f"{_fmt(entry.get('chi2'), '.1f') if 'chi2' in entry else entry.get('error', '')} | "
                         f"{_mark(entry['ok'])} |")
        lines += ["", f"lfq_entropy (dense kernels; \"mixed\": confident and uncertain bits): errors relative to "
                      f"fp64, tolerance {LFQ_TOL:g}.", "",
                  "| tokens × bits | logits | per-sample entropy | codebook entropy | gradient | result |",
                  "|---|---|---|---|---|---|"]
        for entry in validation["lfq"]:
            tokens, bits, kind = entry["config"]
            lines.append(f"| {tokens} × {bits} | {kind} | {_fmt(entry.get('per_sample_error'))} | "
                         f"{_fmt(entry.get('codebook_error'))} | {_fmt(entry.get('grad_error'))} | "
                         f"{_mark(entry['ok'])} {entry.get('error', '')} |")

    tests = payload.get("tests")
    if tests:
        lines += ["", "## CUDA tests", "", f"`{tests.get('command', '')}`: "
                  + ("timed out" if tests.get("timed_out") else
                     f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('errors', 0)} "
                     f"errors, {tests.get('skipped', 0)} skipped")
                  + f" in {_fmt(tests.get('seconds'), '.0f')} s; self-check warnings: "
                  f"{tests.get('self_check_warnings', '—')}."]
        for failure in tests.get("failures", []):
            lines.append(f"- `{failure['test']}`: {failure['message']}")
        if tests.get("tail"):
            lines += ["", "```", tests["tail"].strip()[-1500:], "```"]

    bench = payload.get("benchmarks")
    if bench:
        lines += ["", "## Benchmarks on cuda (medians after a warm-up; cells past the budget are skipped)", "",
                  "### Kernels: Triton against the torch reference, cdist + argmin and the fp32 matmul bound", "",
                  "Each × column is that implementation's time / added peak memory over the Triton kernel's.", "",
                  markdown_table(bench["kernels"], kernels.COLUMNS, kernels.IMPLS, reference="triton")]
        by_name = {section.name: section for section in suite_sections("full")}
        for section in bench["sections"]:
            if not section["rows"]:
                continue
            module = by_name[section["name"]].bench
            lines += ["", f"### {section['title']}", "", markdown_table(section["rows"], module.COLUMNS, module.IMPLS,
                                                                       reference="vq_layers"), "", module.NOTE]
            ours = [row["vq_layers"] for row in section["rows"] if "seconds" in row["vq_layers"]]
            if ours:
                steps = ", ".join(f"{1e3 * result['seconds']:.3g} ms / {result['peak_mib_added']:.0f} MiB"
                                  for result in ours)
                lines += ["", f"vq_layers' steps, row by row (time / added peak memory): {steps}."]
    return "\n".join(lines) + "\n"


def slug(payload: dict) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", str(payload["environment"].get("gpu", "unknown-gpu")).lower()).strip("-")


def write_report(payload: dict, out: Path | str) -> Path:
    """<out>/<gpu slug>.md and .json -> the stem."""
    stem = Path(out) / slug(payload)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(payload))
    return stem


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and the bf16 test cells (~3 minutes)")
    parser.add_argument("--budget", type=float, help="seconds the run aims to finish in (default 420, quick 170)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per benchmark measurement (median)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the report (default: %(default)s)")
    parser.add_argument("--tests-deadline", type=float,
                        help="seconds into the run at which unfinished tests are stopped (default: 0.6 x budget)")
    parser.add_argument("--skip", action="append", default=[], choices=["self_check", "kernels", "tests", "benchmarks"],
                        help="leave a section out (repeatable)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, whatever the shell says
    clock = Clock(args.budget or (170.0 if args.quick else 420.0))
    mode = "quick" if args.quick else "full"
    payload = {"environment": environment(" ".join(["python -m benchmarks.gpu_check", *(argv or sys.argv[1:])]),
                                          mode),
               "seconds": {}}
    print(f"gpu_check on {payload['environment']['gpu']}, budget {clock.budget:.0f} s", flush=True)

    def section(name: str, fn) -> None:
        if name in args.skip:
            return
        start = time.perf_counter()
        payload[name] = fn()
        payload["seconds"][name] = time.perf_counter() - start
        print(f"== {name}: ok={payload[name].get('ok', '-')} ({payload['seconds'][name]:.0f} s, "
              f"{clock.elapsed():.0f} s in)", flush=True)

    # the self-check alone (its cost is quoted), then the tests in a subprocess while this process
    # compares the kernels with fp64 (correctness only: no timing overlaps the tests), then the
    # benchmarks alone
    section("self_check", lambda: run_self_checks("cuda", args.quick))
    tests = None if "tests" in args.skip else start_cuda_tests(args.quick)
    section("kernels", lambda: validate_kernels("cuda", args.quick))
    if tests is not None:
        deadline = clock.start + (args.tests_deadline or 0.6 * clock.budget)
        section("tests", lambda: finish_cuda_tests(tests, deadline))
        payload["seconds"]["tests"] = payload["tests"]["seconds"]
    section("benchmarks", lambda: run_benchmarks(args.quick, args.repeats, clock))
    payload["wall_seconds"] = clock.elapsed()
    stem = write_report(payload, args.out)
    print(f"written: {stem}.md, {stem}.json ({clock.elapsed():.0f} s)")
    ok = all(payload[name]["ok"] for name in ("self_check", "kernels", "tests") if name in payload)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
