"""Smoke test of the benchmark suite's pipeline: `python -m benchmarks.run --smoke` (tiny sizes,
measured in one process) must write a valid .json, a .md with one table row per configuration and
a .png. Measures nothing: benchmarks are measurements, never timed tests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vector_quantize_pytorch")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_suite(out: Path) -> tuple[dict, str, bytes]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--repeats", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [stem] = {path.with_suffix("") for path in out.iterdir()}
    return (json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md").read_text(),
            stem.with_suffix(".png").read_bytes())


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of every markdown table: header and separator lines left out."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    body = [line for i, line in enumerate(lines)
            if not line.startswith("|---") and not (i + 1 < len(lines) and lines[i + 1].startswith("|---"))]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in body]


def test_smoke_run_writes_json_markdown_and_png(tmp_path):
    payload, markdown, png = run_suite(tmp_path)

    # json: machine, versions, date, and every layer family with every implementation measured
    for key in ("machine", "torch", "peer_version", "date", "sections"):
        assert payload[key], key
    rows = [row for section in payload["sections"] for row in section["rows"]]
    layers = {row.get("layer", section["name"]) for section in payload["sections"] for row in section["rows"]}
    assert {"VectorQuantize", "ResidualVQ", "lfq_sweep", "fsq"} <= layers
    for row in rows:
        impls = [key for key, value in row.items() if isinstance(value, dict)]
        assert len(impls) == 3 and impls[0] == "vq_layers", row
        for impl in impls:
            assert row[impl].get("seconds", 0) > 0, (impl, row)  # tiny sizes: nothing is skipped

    # md: one table row per configuration, in order, each with a ratio for every other implementation
    body = table_rows(markdown)
    assert len(body) == len(rows)
    for cells, row in zip(body, rows):
        assert str(row["tokens"]) in cells
        ratios = cells[-4:]
        assert all(float(cell) >= 0 for cell in ratios), cells
    assert payload["machine"] in markdown

    # png: a real image with two panels' worth of pixels
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.image

    image = matplotlib.image.imread(str(next(tmp_path.glob("*.png"))))
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert image.std() > 0.01  # not blank


def test_isolated_measurement_reports_time_and_memory(monkeypatch):
    """The full suite's path: one measurement in a fresh subprocess (`--one`)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.common import run_isolated

    result = run_isolated("benchmarks.fsq", [2**8, [8, 6, 5], 32, 256, "vq_layers"], 1, "cpu", 120)
    assert set(result) == {"seconds", "peak_mib_added"}, result
    assert result["seconds"] > 0


def test_extras_benchmark_runs_every_feature_on_both_libraries(monkeypatch):
    """benchmarks.extras at tiny sizes, in this process: each configuration's step runs for
    vq_layers, the peer and the bound (the full run writes the README's extras table)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import extras

    for feature, *_ in extras.CONFIGS:
        for impl in extras.IMPLS:
            result = extras.measure_one(feature, 16, 32, 64, 2, impl, 1, "cpu")
            assert result["seconds"] > 0, (feature, impl)
