"""examples/audio_tokenizer.py runs as users run it: a subprocess per quantizer, all at once."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_examples import finish

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "audio_tokenizer.py"


def registered_quantizers() -> list[str]:
    """The example's QUANTIZERS registry: a new entry is tested without edits here."""
    sys.path.insert(0, str(SCRIPT.parent))  # the example imports its neighbour train_tokenizer
    try:
        spec = importlib.util.spec_from_file_location("audio_tokenizer", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return sorted(module.QUANTIZERS)


QUANTIZERS = registered_quantizers()
# few small steps: enough to beat predicting silence by a clear margin, in seconds
TRAIN_ARGS = ["--steps", "25", "--batch-size", "8"]
# bad arguments -> what the one-line error must say
BAD_ARGS = {
    "--steps 0": "argument --steps: must be a positive int, got '0'",
    "--lr nan": "argument --lr: must be a positive float, got 'nan'",
    "--quantizer lfq": "argument --quantizer: invalid choice: 'lfq'",
    "--codebook-size 100": "argument --codebook-size: invalid choice: 100",
    "--device nope": "argument --device:",
}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """Starts the example with output to files in `cwd` (pipes could fill up and block it)."""
    # this checkout's vq_layers first, whether or not the package is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(cwd / "stdout.txt", "w") as stdout, open(cwd / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                                stdout=stdout, stderr=stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Run name -> finished run. All start at once: the example runs single-threaded and much
    of each run is imports. "again" repeats the first quantizer's run to check the seeding."""
    commands = {q: ["--quantizer", q, *TRAIN_ARGS] for q in QUANTIZERS}
    commands["again"] = commands[QUANTIZERS[0]]
    commands.update({bad: bad.split() for bad in BAD_ARGS})
    started = {}
    for name, args in commands.items():
        cwd = tmp_path_factory.mktemp("run")
        started[name] = (cwd, start(args, cwd))
    return {name: finish(proc, cwd, timeout=300) for name, (cwd, proc) in started.items()}


def held_out(stdout: str) -> dict[str, list[float]]:
    """'held-out: mse=0.27 zeros_mse=0.82 perplexity=693.0/740.7 usage=0.87/0.90
    bits_per_second=20000' -> {'mse': [0.27], ..., 'perplexity': [693.0, 740.7], ...}."""
    match = re.search(r"^held-out: (.*)$", stdout, flags=re.MULTILINE)
    assert match, f"no final metrics line in:\n{stdout}"
    pairs = (item.split("=") for item in match.group(1).split())
    return {name: [float(v) for v in text.split("/")] for name, text in pairs}


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_learns_to_reconstruct(quantizer, runs):
    result = runs[quantizer]
    assert result.returncode == 0, result.stderr
    metrics = held_out(result.stdout)
    assert set(metrics) == {"mse", "zeros_mse", "perplexity", "usage", "bits_per_second"}, metrics
    # predicting silence scores zeros_mse; a few steps already do clearly better
    assert metrics["mse"][0] < 0.85 * metrics["zeros_mse"][0], metrics
    stages = len(metrics["perplexity"])
    assert len(metrics["usage"]) == stages and (stages > 1) == (quantizer == "rvq"), metrics
    assert all(p >= 1.0 for p in metrics["perplexity"]), metrics
    assert all(0.0 < u <= 1.0 for u in metrics["usage"]), metrics
    # 500 tokens per second, log2(1024) = 10 bits a code (FSQ: 8*5*5*5 = 1000 codes)
    expected_bits = {"vq": 5000, "rvq": 4 * 5000, "fsq": 500 * 9.9658}.get(quantizer)
    if expected_bits is not None:
        assert metrics["bits_per_second"][0] == pytest.approx(expected_bits, abs=1), metrics


def test_same_seed_same_numbers(runs):
    first, again = runs[QUANTIZERS[0]], runs["again"]
    assert again.returncode == 0, again.stderr
    assert held_out(again.stdout) == held_out(first.stdout)


@pytest.mark.parametrize("args", BAD_ARGS)
def test_bad_argument_fails_with_one_clear_line(args, runs):
    result = runs[args]
    assert result.returncode != 0
    assert BAD_ARGS[args] in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
