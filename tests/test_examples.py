"""examples/train_tokenizer.py (the README's first command) runs as users run it: a subprocess."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_tokenizer.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_tokenizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# every registered quantizer gets a run, so a new registry entry is tested without edits here
QUANTIZERS = sorted(load_example().QUANTIZERS)


def start_example(*args: str, cwd: Path) -> subprocess.Popen:
    """Starts the example with output to files in `cwd` (pipes could fill up and block it)."""
    # this checkout's vq_layers first, whether or not the package is installed
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    with open(cwd / "stdout.txt", "w") as stdout, open(cwd / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                                stdout=stdout, stderr=stderr)


def finish(proc: subprocess.Popen, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()  # no-op once it has exited
    stdout, stderr = ((cwd / name).read_text() for name in ("stdout.txt", "stderr.txt"))
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# a few small steps per registered quantizer: this checks the plumbing end to end, not quality
TRAIN_ARGS = ["--steps", "30", "--batch-size", "16", "--out", "out"]
# bad arguments -> what the one-line error must say
BAD_ARGS = {
    "--steps 0": "--steps: must be a positive int",
    "--quantizer nope": "--quantizer: invalid choice: 'nope'",
    "--codebook-size 100": "choose from 256, 1024, 4096, 16384, 65536",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Run name -> (working dir, finished run), for every run above. All start at once: the
    example runs single-threaded, and most of each run is imports, so they overlap well."""
    commands = {q: ["--quantizer", q, *TRAIN_ARGS] for q in QUANTIZERS}
    commands.update({bad: bad.split() for bad in BAD_ARGS})
    started = {}
    for name, args in commands.items():
        cwd = tmp_path_factory.mktemp("run")
        started[name] = (cwd, start_example(*args, cwd=cwd))
    return {name: (cwd, finish(proc, cwd)) for name, (cwd, proc) in started.items()}


def final_metrics(stdout: str) -> dict[str, list[float]]:
    """'held-out: mse=0.0150 perplexity=253.7 usage=0.624' -> {'mse': [0.015], ...}.

    Residual quantizers print one value per stage: perplexity=141.9/647.7.
    """
    match = re.search(r"^held-out: mse=(\S+) perplexity=(\S+) usage=(\S+)$", stdout, flags=re.M)
    assert match, f"no final metrics line in:\n{stdout}"
    names = ("mse", "perplexity", "usage")
    return {name: [float(v) for v in text.split("/")] for name, text in zip(names, match.groups())}


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_trains_and_writes_plots(quantizer, runs):
    cwd, result = runs[quantizer]
    assert result.returncode == 0, result.stderr
    for name in ("reconstructions.png", "codebook_usage.png"):
        assert (cwd / "out" / name).stat().st_size > 0, name
    assert str((cwd / "out").resolve()) in result.stdout

    metrics = final_metrics(result.stdout)
    assert all(math.isfinite(v) for values in metrics.values() for v in values), metrics
    assert all(v >= 1.0 for v in metrics["perplexity"]), metrics
    assert all(0.0 < v <= 1.0 for v in metrics["usage"]), metrics


@pytest.mark.parametrize("args", BAD_ARGS)
def test_bad_argument_fails_with_one_clear_line(args, runs):
    cwd, result = runs[args]
    assert result.returncode != 0
    assert BAD_ARGS[args] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (cwd / "outputs").exists(), "a rejected run must not write outputs"
