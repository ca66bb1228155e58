"""examples/train_ddp.py runs as users run it: under torchrun with 2 CPU ranks (gloo), as a
plain single process, and with a bad argument. Subprocesses, like tests/test_examples.py."""

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_ddp.py"
TIMEOUT = 150  # seconds per run; the 2-rank run takes about 15 s on 2 cores

# a few small steps: this checks the distributed plumbing end to end, not training quality
RUNS = {
    # `--standalone` rendezvous on localhost at a free port: runs in parallel never collide
    "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(SCRIPT), "--steps", "20", "--batch-size", "16", "--no-autocast"],
    "single": [sys.executable, str(SCRIPT), "--steps", "5", "--batch-size", "8", "--no-autocast"],
    "bad": [sys.executable, str(SCRIPT), "--steps", "0"],
}
# variables a launcher sets; an outer torchrun's must not leak into the runs
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    """Starts `command` with output to files in `cwd` (pipes could fill up and block it), in a
    session of its own so that a timeout kills torchrun's workers too."""
    # this checkout's vq_layers first, whether or not the package is installed
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = pythonpath
    with open(cwd / "stdout.txt", "w") as stdout, open(cwd / "stderr.txt", "w") as stderr:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                                start_new_session=True)


def finish(proc: subprocess.Popen, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=timeout)
    finally:
        try:  # the whole session: the launcher and any rank still running (no-op once exited)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    stdout, stderr = ((cwd / name).read_text() for name in ("stdout.txt", "stderr.txt"))
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Run name -> finished run. All start at once: much of each run is imports."""
    started = {}
    for name, command in RUNS.items():
        cwd = tmp_path_factory.mktemp(name)
        started[name] = (cwd, start(command, cwd))
    return {name: finish(proc, cwd, TIMEOUT) for name, (cwd, proc) in started.items()}


def held_out_metrics(stdout: str) -> dict[str, list[float]]:
    """'held-out: mse=0.0150 perplexity=253.7 usage=0.624' -> {'mse': [0.015], ...}."""
    found = re.findall(r"^held-out: mse=(\S+) perplexity=(\S+) usage=(\S+)$", stdout, flags=re.MULTILINE)
    assert len(found) == 1, f"expected one held-out line (rank 0 alone prints) in:\n{stdout}"
    names = ("mse", "perplexity", "usage")
    return {name: [float(v) for v in text.split("/")] for name, text in zip(names, found[0])}


def check_metrics(stdout: str) -> None:
    metrics = held_out_metrics(stdout)
    assert all(math.isfinite(v) for values in metrics.values() for v in values), metrics
    assert all(v >= 1.0 for v in metrics["perplexity"]), metrics
    assert all(0.0 < v <= 1.0 for v in metrics["usage"]), metrics


@pytest.mark.timeout(TIMEOUT + 60)
def test_two_ranks_train_with_identical_codebooks(runs):
    result = runs["ddp"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rank(s) x 16 = 32 digits per step" in result.stdout, result.stdout
    assert "on cpu (gloo)" in result.stdout, result.stdout
    check_metrics(result.stdout)
    identical = re.findall(r"^codebooks identical on all 2 ranks: (\S+)", result.stdout, flags=re.MULTILINE)
    assert identical == ["yes"], result.stdout


@pytest.mark.timeout(TIMEOUT + 60)
def test_single_process_without_launcher(runs):
    result = runs["single"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rank(s) x 8 = 8 digits per step" in result.stdout, result.stdout
    check_metrics(result.stdout)
    assert re.search(r"^codebooks identical on the 1 rank: yes", result.stdout, flags=re.MULTILINE), result.stdout


@pytest.mark.timeout(TIMEOUT + 60)
def test_bad_argument_fails_with_one_clear_line(runs):
    result = runs["bad"]
    assert result.returncode != 0
    assert "--steps: must be a positive int, got '0'" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == "", result.stdout
