"""The kernels alone, on a GPU: nearest_code's Triton kernel against its torch reference, the
search vector-quantize-pytorch does (cdist then argmin) and the cuBLAS fp32 matmul x @ C^T of
the same shape (TF32 off) that bounds the work; LFQ's entropy (forward + backward) at up to
2^18 codes with every token on the dense path, Triton against torch.

    python -m benchmarks.kernels --device cuda           # writes benchmarks/results/kernels-<gpu>
    python -m benchmarks.kernels --device cuda --quick   # the small ones only

Every measurement runs in a fresh subprocess (peak allocated memory); the time is the median of
several calls after one warm-up. The table's "×" columns are time and memory as multiples of the
Triton kernel's: above 1 the kernel is faster or leaner; for the matmul bound, the kernel reaches
1 / (its time ×) of the matmul's throughput. Each row also records the fraction of rows whose
index equals an fp64 brute force (outside near-ties) for the search.
"""

from __future__ import annotations

import os

from benchmarks.common import (
    benchmark_cli,
    describe_machine,
    markdown_table,
    results_path,
    run_isolated,
    time_steps,
    write_results,
)

CONFIGS = [  # (op, tokens, codes, dim)
    ("nearest_code", 16384, 1024, 64),
    ("nearest_code", 16384, 4096, 64),
    ("nearest_code", 16384, 4096, 256),
    ("nearest_code", 16384, 16384, 256),
    ("nearest_code", 16384, 65536, 256),
    ("nearest_code", 256, 65536, 256),
    ("lfq_entropy", 4096, 2**14, 14),
    ("lfq_entropy", 4096, 2**16, 16),
    ("lfq_entropy", 4096, 2**18, 18),
]
IMPLS = ["triton", "torch", "cdist+argmin", "matmul bound"]


def step_fn(impl: str, op: str, tokens: int, codes: int, dim: int, device: str):
    import torch

    from vq_layers.kernels.nearest_code import nearest_code
    from vq_layers.lfq_entropy_loss import lfq_entropy

    generator = torch.Generator(device=device).manual_seed(0)
    if op == "lfq_entropy":
        if impl not in ("triton", "torch"):
            return None, None
        os.environ["VQ_LAYERS_BACKEND"] = impl
        logits = 0.3 * torch.randn(tokens, 1, dim, device=device, generator=generator)  # every bit uncertain: dense

        def entropy_step(x):
            per_sample, codebook = lfq_entropy(x)
            (per_sample - codebook).backward()

        return entropy_step, logits.requires_grad_()

    codebook = torch.randn(codes, dim, device=device, generator=generator)
    x = torch.randn(tokens, dim, device=device, generator=generator)
    if impl in ("triton", "torch"):
        return (lambda rows: nearest_code(rows, codebook, backend=impl)[0]), x
    if impl == "cdist+argmin":
        return (lambda rows: torch.cdist(rows, codebook).argmin(-1)), x
    torch.backends.cuda.matmul.allow_tf32 = False
    return (lambda rows: rows @ codebook.T), x


def accuracy(op: str, tokens: int, codes: int, dim: int, device: str) -> float | None:
    """Fraction of (up to 2048) rows where the Triton search equals the fp64 argmin, near-ties excluded."""
    import torch

    from vq_layers.kernels.nearest_code import nearest_code

    if op != "nearest_code":
        return None
    generator = torch.Generator(device=device).manual_seed(0)
    codebook = torch.randn(codes, dim, device=device, generator=generator)
    x = torch.randn(tokens, dim, device=device, generator=generator)[:2048]
    indices, _ = nearest_code(x, codebook, backend="triton")
    distances = torch.cdist(x.double(), codebook.double()).square()
    two = distances.topk(2, dim=-1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) / two[:, 1] >= 1e-6
    return ((indices == distances.argmin(-1)) | ~clear).double().mean().item()


def measure_one(impl: str, op: str, tokens: int, codes: int, dim: int, repeats: int, device: str) -> dict:
    step, x = step_fn(impl, op, tokens, codes, dim, device)
    if step is None:
        return {"error": "n/a"}
    result = time_steps(step, x, repeats, device)
    if impl == "triton":
        result["fp64_agreement"] = accuracy(op, tokens, codes, dim, device)
    return result


COLUMNS = [
    ("op", lambda r: r["op"]),
    ("tokens × codes × dim", lambda r: f"{r['tokens']} × {r['codes']} × {r['dim']}"),
    ("triton ms", lambda r: f"{1e3 * r['triton']['seconds']:.3g}" if "seconds" in r["triton"] else "—"),
    ("triton MiB", lambda r: f"{r['triton']['peak_mib_added']:.0f}" if "seconds" in r["triton"] else "—"),
    ("= fp64", lambda r: (f"{r['triton']['fp64_agreement']:.4f}"
                          if r["triton"].get("fp64_agreement") is not None else "—")),
]


def main():
    args = benchmark_cli(__doc__, "only the smaller configurations", 600, COLUMNS, IMPLS, measure_one)
    if args is None:
        return
    if args.device != "cuda":
        raise SystemExit("benchmarks.kernels: --device cuda expected (the kernels run on GPUs; "
                         "on the CPU they run in Triton's interpreter, which the tests use)")
    configs = [c for c in CONFIGS if not args.quick or c[2] <= 2**16 and c[1] * c[2] <= 2**26]
    rows = []
    for op, tokens, codes, dim in configs:
        row = {"op": op, "tokens": tokens, "codes": codes, "dim": dim}
        for impl in IMPLS:
            row[impl] = run_isolated("benchmarks.kernels", [impl, op, tokens, codes, dim], args.repeats,
                                     args.device, args.timeout)
        rows.append(row)
        print(row, flush=True)
    table = markdown_table(rows, COLUMNS, IMPLS, reference="triton")
    payload = {"benchmark": "nearest_code and lfq_entropy kernels", "machine": describe_machine(args.device),
               "rows": rows}
    write_results(results_path("kernels", args.device), payload, table)
    print(table)


if __name__ == "__main__":
    main()
