"""examples/collapse_study.py (docs/training-guide.md's table) runs as users run it: a subprocess."""

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "collapse_study.py"
VARIANTS = ["fsq-8555", "vq-kmeans-dead"]  # cheap, and the second reports dead codes replaced


def start(*args: str, cwd: Path) -> subprocess.Popen:
    # this checkout's vq_layers first, whether or not the package is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def mean(cell: str) -> float:
    """'0.1234' or '0.1234 ± 0.0010' -> 0.1234."""
    return float(cell.split("±")[0])


def test_smoke_run_and_bad_variant(tmp_path):
    good = start("--steps", "5", "--seeds", "0", "--variants", ",".join(VARIANTS), "--out", "table.md",
                 cwd=tmp_path)
    bad = start("--steps", "5", "--variants", "vq-plain,nope", cwd=tmp_path)  # overlaps the good run
    stdout, stderr = good.communicate(timeout=300)
    bad_stdout, bad_stderr = bad.communicate(timeout=300)

    assert good.returncode == 0, stderr
    assert (tmp_path / "table.md").read_text() in stdout
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in VARIANTS:
            rows[cells[0]] = cells
    assert sorted(rows) == sorted(VARIANTS), stdout
    for name, (_, _, mse, perplexity, usage, replaced, seconds) in rows.items():
        assert math.isfinite(mean(mse)) and mean(mse) > 0, (name, mse)
        assert 1.0 <= mean(perplexity) <= 1024, (name, perplexity)
        assert 0.0 < mean(usage) <= 1.0, (name, usage)
        assert math.isfinite(mean(seconds)), (name, seconds)
    assert rows["fsq-8555"][5] == "—"  # FSQ has no codebook to revive
    assert mean(rows["vq-kmeans-dead"][5]) >= 0

    assert bad.returncode != 0
    assert "--variants" in bad_stderr and "'nope'" in bad_stderr, bad_stderr
    assert len(bad_stderr.strip().splitlines()) == 1, bad_stderr
    assert bad_stdout == ""
