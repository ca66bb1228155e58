"""Shared by the benchmark scripts: machine description, memory probe, tables, result files, and the
measure-every-implementation-per-configuration loop.

A benchmark module (benchmarks.lfq, .vq, .fsq) describes itself with module-level names that
`measure_rows`, `render` and `write_benchmark` read, so benchmarks.run can drive all of them:

    NAME     results file stem            TITLE    one line for the results file
    KEYS     names of a config's fields   CONFIGS  the script's own configurations (tuples)
    IMPLS    implementations, vq_layers first, then the peer, then the bound
    COLUMNS  (header, row -> cell) pairs  NOTE     the sentence under the table
    measure_one(*config, impl, repeats, device) -> {"seconds", "peak_mib_added"}   (in the subprocess)
    peer_gib(*config) -> float | None     what the peer would allocate, to skip what cannot fit
"""

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
PEER = "vector-quantize-pytorch"
# The peer materializes the (tokens x codes) fp32 matrix about 7 times over (measured: 6.7x for
# VectorQuantize at 8192 x 16384, 7.0x for LFQ at 2^16 x 4096). Above this estimate it is not run:
# 2^28 pairs (7 GiB, ~30 s a step on 2 cores) still run, 2^29 do not.
PEER_MAX_GIB = 8.0
PEER_COPIES = 7


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
    machine = describe_machine(device).split(" (torch")[0].split(", torch")[0]
    return re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")


def peak_memory_mib(device: str) -> float:
    """Peak memory of this process so far: RSS on CPU, allocated memory on CUDA."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def results_path(name: str, device: str, out: Path | str | None = None) -> Path:
    return Path(out or RESULTS) / f"{name}-{machine_slug(device)}"


def matrix_gib(*sizes: int, copies: float = PEER_COPIES) -> float:
    """GiB of `copies` fp32 tensors of shape `sizes` (the peer's estimated peak)."""
    total = copies * 4
    for size in sizes:
        total *= size
    return total / 2**30


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

    # vector-quantize-pytorch imports torch._dynamo (and with it triton, ~110 MiB RSS) when it is
    # imported; vq_layers' torch.library custom ops import it on their first call. Import it before
    # the baseline so that one-time cost counts for no one's step.
    import torch._dynamo  # noqa: F401

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
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results files (default: %(default)s)")
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


def measure_rows(bench, configs: list, repeats: int, device: str, timeout: int, isolated: bool = True) -> list[dict]:
    """One row per config of benchmark module `bench`: each implementation measured in its own
    subprocess (`run_isolated`), the peer skipped, with the memory it would need, when
    `bench.peer_gib` puts it over PEER_MAX_GIB. `isolated=False` measures in this process instead:
    quick, for smoke checks of the pipeline, but the memory figures then mean nothing."""
    module = bench.__spec__.name  # "benchmarks.lfq" also when it runs as __main__ (python -m)
    rows = []
    for config in configs:
        row = dict(zip(bench.KEYS, config))
        for impl in bench.IMPLS:
            need = bench.peer_gib(*config) if impl == PEER else None
            if need is not None and need > PEER_MAX_GIB:
                row[impl] = {"error": f"skipped: would need ~{need:.0f} GiB"}
            else:
                row[impl] = (run_isolated(module, [*config, impl], repeats, device, timeout) if isolated
                             else bench.measure_one(*config, impl, repeats, device))
            print(f"{bench.NAME} {list(config)} {impl}: {row[impl]}", flush=True)
        rows.append(row)
    return rows


def render(bench, rows: list[dict]) -> str:
    """The markdown table of `rows` (ratios to vq_layers) and the module's note under it."""
    return markdown_table(rows, bench.COLUMNS, bench.IMPLS, reference="vq_layers") + "\n\n" + bench.NOTE


def write_benchmark(bench, rows: list[dict], args) -> Path:
    """Writes <out>/<NAME>-<machine>.{json,md} for one benchmark script's run, prints the table."""
    table = render(bench, rows)
    path = results_path(bench.NAME, args.device, args.out)
    write_results(path, {"benchmark": bench.TITLE, "machine": describe_machine(args.device), "rows": rows}, table)
    print(table)
    print(f"written: {path}.json, {path}.md")
    return path


def bench_main(bench, quick_help: str, timeout: int, quick) -> None:
    """The whole main() of a benchmark script: `quick(config)` says which configs --quick keeps."""
    args = benchmark_cli(bench.__doc__, quick_help, timeout, bench.COLUMNS, bench.IMPLS, bench.measure_one)
    if args is None:
        return
    configs = [config for config in bench.CONFIGS if not args.quick or quick(*config)]
    write_benchmark(bench, measure_rows(bench, configs, args.repeats, args.device, args.timeout), args)
