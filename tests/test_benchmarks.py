"""The benchmark scripts run end to end at toy sizes: each one asserts its own equivalence
checks (same sample moments, same covariances, bit-identical logits, ...) before printing, and ends
with ``ratio: <baseline time / clcli time>``. No timing is asserted here; the ratios are measured by
running the scripts at their default sizes (README "Speed options and benchmarks"). Each one is a
subprocess that imports torch (seconds each), so they are ``slow``: ``pytest -m slow``."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

TOY = {
    "bench_ca.py": ["--classes", "4", "--dim", "16", "--samples", "8", "--epochs", "2", "--device", "cpu"],
    "bench_stats.py": ["--classes", "2", "--per-class", "8", "--image-size", "32", "--batch-size", "8", "--device", "cpu"],
    "bench_train.py": ["--image-size", "32", "--batch-size", "4", "--steps", "2", "--repeats", "1", "--device", "cpu"],
    "bench_diki.py": ["--model", "tiny-clip", "--datasets", "2", "--classes", "3", "--test-per-class", "4",
                      "--train-per-class", "4", "--batch-size", "4", "--repeats", "1", "--device", "cpu"],
    "bench_frozen.py": ["--tasks", "2", "--classes-per-task", "2", "--test-per-class", "4", "--image-size", "32",
                        "--batch-size", "4", "--device", "cpu"],
    "bench_ca.py --scaling": ["--scaling", "--scaling-classes", "2,3", "--scaling-epochs", "1", "--rounds", "1",
                              "--classes", "3", "--dim", "16", "--samples", "8", "--epochs", "1", "--device", "cpu"],
    "bench_scale.py": ["--tasks", "2", "--classes-per-task", "2", "--dim", "16", "--samples", "8", "--ca-epochs", "1",
                       "--train-per-class", "4", "--test-per-class", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TOY))
def test_benchmark_runs_and_ends_with_a_ratio(script):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script.split()[0]), *TOY[script]], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio: \d+\.\d+", last), proc.stdout
    assert float(last.split()[1]) > 0
