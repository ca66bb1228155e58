"""The whole benchmark suite in one command: the issue's configurations and a codebook-size sweep,
vq_layers side by side with vector-quantize-pytorch and the bound of each layer's work.

    python -m benchmarks.run                    # full suite (~8 min on 2 idle CPU cores)
    python -m benchmarks.run --quick            # small subset, a couple of minutes
    python -m benchmarks.run --smoke            # tiny sizes, checks the pipeline (tests/test_benchmarks.py)
    python -m benchmarks.run --device cuda      # on a GPU: peak allocated memory, absolute ms in the plot
    python -m benchmarks.run --replot results/<machine>.json   # re-render .md and .png from a .json

Writes <out>/<machine>.json (every row, the machine, torch and peer versions, the date),
<out>/<machine>.md (one table per section) and <out>/<machine>.png (step time and peak memory
against codebook size, log-log, one line per implementation per layer). <out> defaults to
benchmarks/results/. Each measurement runs in its own subprocess (benchmarks.common.run_isolated).

Sections (full suite):
  VectorQuantize 1024 and 8192 codes and ResidualVQ 8 x 1024, dim 256, 16384 tokens
  VectorQuantize sweep 1k, 4k, 16k, 64k, 256k codes, dim 256, 4096 tokens
  LFQ sweep 2^10, 2^12, .. 2^18 codes, 4096 tokens, inv_temperature 100; LFQ 2^18 at 16384 tokens
  LFQ at tokenizer sizes: 2^8-2^10 codes, 256-1024 tokens (benchmarks.lfq_tokenizer)
  FSQ 2^10 .. 2^16 codes (the paper's levels), dim 256, 16384 tokens
The sweeps use 4096 tokens so the whole suite stays under 10 minutes on 2 idle CPU cores: a
VectorQuantize step at 256k codes x 4096 tokens is already ~10^9 distances.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import fsq, lfq, lfq_tokenizer, vq
from benchmarks.common import PEER, RESULTS, describe_machine, machine_slug, measure_rows, render


@dataclass
class Section:
    name: str
    title: str
    bench: object  # benchmarks.vq / .lfq / .fsq
    configs: list
    plot: str | None = None  # legend name of the layer when the section is a codebook-size sweep
    rows: list = field(default_factory=list)


def vq_config(codes: int, tokens: int, layer: str = "VectorQuantize", num_quantizers: int = 1, dim: int = 256):
    return layer, dim, codes, tokens, num_quantizers


def lfq_config(codes: int, tokens: int, inv_temperature: float = 100.0):
    return codes, tokens, inv_temperature


def sections(mode: str) -> list[Section]:
    """mode: "full", "quick" or "smoke"."""
    if mode == "smoke":  # tiny: every section and implementation, milliseconds of compute, in-process
        return [
            Section("vq", "VectorQuantize and ResidualVQ", vq, [vq_config(256, 256, "ResidualVQ", 2, dim=32)]),
            Section("vq_sweep", "VectorQuantize codebook sweep", vq, [vq_config(k, 256, dim=32) for k in (64, 256)],
                    plot="VectorQuantize"),
            Section("lfq_sweep", "LFQ codebook sweep", lfq, [lfq_config(2**k, 256) for k in (6, 8)], plot="LFQ"),
            Section("lfq_tokenizer", "LFQ at tokenizer sizes", lfq_tokenizer, lfq_tokenizer.CONFIGS[:1]),
            Section("fsq", "FSQ", fsq, [fsq.config(k, dim=32, tokens=256) for k in (2**8, 2**10)], plot="FSQ"),
        ]
    quick = mode == "quick"
    vq_sweep = [1024, 16384] if quick else [1024, 4096, 16384, 65536, 262144]
    lfq_sweep = [10, 14] if quick else range(10, 19, 2)  # 4x steps, as the VectorQuantize sweep
    fsq_sweep = [2**10, 2**16] if quick else fsq.SIZES
    return [
        Section("vq", "VectorQuantize and ResidualVQ, dim 256, 16384 tokens", vq,
                [] if quick else [vq_config(1024, 16384), vq_config(8192, 16384),
                                  vq_config(1024, 16384, "ResidualVQ", 8)]),
        Section("vq_sweep", "VectorQuantize codebook-size sweep, dim 256, 4096 tokens", vq,
                [vq_config(k, 4096) for k in vq_sweep], plot="VectorQuantize"),
        Section("lfq_sweep", "LFQ codebook-size sweep, 4096 tokens, inv_temperature 100", lfq,
                [lfq_config(2**k, 4096) for k in lfq_sweep], plot="LFQ"),
        Section("lfq", "LFQ at 16384 tokens", lfq, [] if quick else [lfq_config(2**18, 16384)]),
        Section("lfq_tokenizer", "LFQ at tokenizer sizes (2^8-2^10 codes, 256-1024 tokens)", lfq_tokenizer,
                [c for c in lfq_tokenizer.CONFIGS if not quick or c[3] <= 256]),
        Section("fsq", "FSQ, dim 256, 16384 tokens (levels from FSQ.levels_for)", fsq,
                [fsq.config(k) for k in fsq_sweep], plot="FSQ"),
    ]


def markdown(payload: dict, by_name: dict[str, Section]) -> str:
    lines = [
        f"# vq_layers benchmarks on {payload['machine']}",
        "",
        f"`{payload['command']}`, {payload['date']}, torch {payload['torch']}, {PEER} {payload['peer_version']}, "
        f"median of {payload['repeats']} steps after a warm-up, "
        + ("each measurement in its own process; " if payload["isolated"] else
           "all measured in one process (--smoke: the memory figures mean nothing); ")
        + f"suite wall time {payload['wall_seconds'] / 60:.1f} min.",
        "",
        "Each cell is how many times longer / how much more peak memory (RSS added on CPU, allocated on "
        "CUDA) the other implementation needed than vq_layers: > 1 means vq_layers is faster or leaner; "
        "for a bound, < 1 is expected and 1 / (time ×) is how far vq_layers is from it.",
    ]
    for section in payload["sections"]:
        if not section["rows"]:
            continue
        bench = by_name[section["name"]].bench
        lines += ["", f"## {section['title']}", "", render(bench, section["rows"])]
        ours = [row["vq_layers"] for row in section["rows"] if "seconds" in row["vq_layers"]]
        if ours:
            largest = max(ours, key=lambda result: result["peak_mib_added"])
            lines += ["", f"vq_layers' largest added peak memory in this section: {largest['peak_mib_added']:.0f} MiB."]
    return "\n".join(lines) + "\n"


STYLE = {"vq_layers": ("-", "o"), PEER: ("--", "s")}  # any bound: (":", "^")
COLOURS = {"VectorQuantize": "tab:blue", "LFQ": "tab:orange", "FSQ": "tab:green"}


def plot(payload: dict, by_name: dict[str, Section], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuda = payload["device"] == "cuda"
    swept = [(by_name[s["name"]], s["rows"]) for s in payload["sections"] if by_name[s["name"]].plot and s["rows"]]
    # CPU: times relative to one step of vq_layers (absolute CPU seconds describe the machine)
    first_section, first_rows = swept[0]
    reference = first_rows[0]
    unit = 1e-3 if cuda else reference["vq_layers"]["seconds"]
    reference_name = (f"vq_layers {first_section.plot} step at {reference['codebook_size']} codes, "
                      f"{reference['tokens']} tokens")

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(14, 8))
    for section, rows in swept:
        for impl in section.bench.IMPLS:
            points = [(row["codebook_size"], row[impl]) for row in rows if "seconds" in row[impl]]
            if not points:
                continue
            tokens = sorted({row["tokens"] for row in rows})
            label = f"{section.plot}: {impl} ({'/'.join(map(str, tokens))} tokens)"
            linestyle, marker = STYLE.get(impl, (":", "^"))
            style = dict(linestyle=linestyle, marker=marker, color=COLOURS.get(section.plot), label=label)
            codes = [c for c, _ in points]
            ax_time.plot(codes, [r["seconds"] / unit for _, r in points], **style)
            ax_mem.plot(codes, [max(r["peak_mib_added"], 1.0) for _, r in points], **style)
            missing = [row for row in rows if "error" in row[impl]]
            if missing:
                codes = ", ".join(str(row["codebook_size"]) for row in missing)
                ax_time.plot([], [], " ", label=f"    not at {codes} codes: {missing[0][impl]['error'][:40]}")
    for ax in (ax_time, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("codebook size (codes)")
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_ylabel("training step time (ms)" if cuda else f"training step time, × {reference_name}")
    ax_time.set_title("time per training step (forward + backward)" + ("" if cuda else ", relative"))
    ax_mem.set_ylabel("peak memory added by the step (MiB, " + ("allocated, CUDA" if cuda else "RSS, CPU")
                      + "; floored at 1)")
    ax_mem.set_title("peak memory added by the step")
    handles, labels = ax_time.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"one training step: vq_layers vs {PEER} {payload['peer_version']} vs the bound of the work — "
                 f"{payload['machine']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(payload: dict, by_name: dict[str, Section], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(payload, by_name))
    plot(payload, by_name, stem.with_suffix(".png"))
    print(f"written: {stem}.json, {stem}.md, {stem}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small subset (a couple of minutes on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline, measures nothing useful")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results (default: %(default)s)")
    parser.add_argument("--replot", help="re-render the .md and .png of an existing suite .json, and exit")
    args = parser.parse_args()

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.replot:
        payload = json.loads(Path(args.replot).read_text())
        by_name = {section.name: section for section in sections(payload["mode"])}
        write(payload, by_name, Path(args.replot).with_suffix(""))
        return

    start = time.perf_counter()
    suite = sections(mode)
    for section in suite:
        print(f"== {section.title}", flush=True)
        # --smoke measures in this process: a fresh one per measurement costs seconds of imports each
        section.rows = measure_rows(section.bench, section.configs, args.repeats, args.device, args.timeout,
                                    isolated=not args.smoke)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    import torch

    payload = {
        "benchmark": "vq_layers suite: one training step per layer, vq_layers vs vector-quantize-pytorch vs bound",
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        "mode": mode,
        "machine": describe_machine(args.device),
        "device": args.device,
        "torch": torch.__version__,
        "peer_version": importlib.metadata.version(PEER),
        "vq_layers_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "isolated": not args.smoke,
        "wall_seconds": time.perf_counter() - start,
        "sections": [{"name": s.name, "title": s.title, "benchmark": s.bench.TITLE, "keys": s.bench.KEYS,
                      "rows": s.rows} for s in suite],
    }
    write(payload, {section.name: section for section in suite}, Path(args.out) / machine_slug(args.device))


if __name__ == "__main__":
    main()
