"""Shared by the benchmark scripts: machine description, memory probe, tables, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def describe_machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"


def machine_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", describe_machine(device).split(" (torch")[0].split(", torch")[0].lower()).strip("-")


def peak_memory_mib(device: str) -> float:
    """Peak memory of this process so far: RSS on CPU, allocated memory on CUDA."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def results_path(name: str, device: str) -> Path:
    return RESULTS / f"{name}-{machine_slug(device)}"


def _cell(result: dict, key: str, fmt: str) -> str:
    return fmt.format(result[key]) if "error" not in result else "—"


def markdown_table(rows: list[dict], columns: list, impls: list[str], reference: str) -> str:
    """Per other implementation: its time and added peak memory as multiples of `reference`'s.

    Ratios, not seconds: absolute CPU times say more about the machine than the code.
    """
    others = [impl for impl in impls if impl != reference]
    head = [name for name, _ in columns]
    for impl in others:
        head += [f"{impl}: time ×", f"{impl}: memory ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [fn(row) for _, fn in columns]
        ours = row[reference]
        for impl in others:
            theirs = row[impl]
            if "error" in theirs or "error" in ours:
                cells += [theirs.get("error", ours.get("error", "")), "—"]
                continue
            cells.append(f"{theirs['seconds'] / ours['seconds']:.3g}")
            cells.append(f"{theirs['peak_mib_added'] / max(ours['peak_mib_added'], 1.0):.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(path: Path, payload: dict, table: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    path.with_suffix(".md").write_text(f"{payload['benchmark']} on {payload['machine']}\n\n{table}\n")


def time_steps(step, x, repeats: int, device: str) -> dict:
    """Median seconds of `step(x)` over `repeats` runs after one warm-up, and the peak memory
    added over the baseline (run it in a fresh process: `run_isolated`)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_memory_mib(device)
    step(x)  # warm-up
    times = []
    for _ in range(repeats):
        x.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(x)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_mib_added": peak_memory_mib(device) - baseline}


def run_isolated(module: str, config: list, repeats: int, device: str, timeout: int) -> dict:
    """Runs `python -m <module> --one <config>` in a fresh process; its last stdout line is the result."""
    args = [sys.executable, "-m", module, "--one", json.dumps(config), "--repeats", str(repeats), "--device", device]
    try:
        done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark_cli(doc: str, quick_help: str, timeout: int, columns: list, impls: list[str], measure_one):
    """The command line every benchmark script shares. Answers --render (re-print a results file's
    table) and --one (one measurement, inside run_isolated's subprocess) itself and returns None;
    otherwise returns the parsed arguments for the script's full run."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=int, default=timeout)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--render", help="print the table of an existing results .json and exit")
    args = parser.parse_args()
    if args.render:
        payload = json.loads(Path(args.render).read_text())
        print(markdown_table(payload["rows"], columns, impls, reference="vq_layers"))
        return None
    if args.one:
        print(json.dumps(measure_one(*json.loads(args.one), args.repeats, args.device)))
        return None
    return args
