"""benchmarks/gpu_check.sh, the prepared check for a node with one GPU: run here on the CPU (GPU_CHECK_DEVICE=cpu, small
sizes), it writes every file its steps promise and a summary; asked for CUDA where there is none, it says so and stops.
What it measures on a GPU is not tested here (there is none)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.timeout(620)
def test_the_gpu_check_runs_its_steps_on_the_cpu_and_writes_its_figures(tmp_path):
    out = tmp_path / "gpu"
    proc = _run(out, GPU_CHECK_DEVICE="cpu", GPU_CHECK_CLIENTS="300", GPU_CHECK_ROUNDS="1", GPU_CHECK_SKIP="4")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    assert summary.splitlines()[0] == "0 env: ok" and "4 " in summary and "skipped" in summary
    assert summary.count(": ok") == 4, summary
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "opacus" not in env["missing"]
    eq = json.loads((out / "equal.json").read_text())
    assert eq["equal"] and eq["max_relative_difference"] <= 1e-5
    assert (out / "default" / "results.json").exists()
    rows = json.loads((out / "scale" / "scale.json").read_text())["rows"]
    assert rows and rows[0]["clients"] == 300 and "error" not in rows[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_gpu_check_asked_for_cuda_without_one_says_so_and_stops(tmp_path):
    proc = _run(tmp_path / "gpu")
    assert proc.returncode == 2
    assert "torch sees no CUDA device here" in proc.stderr
    assert "0 env: FAILED" in (tmp_path / "gpu" / "summary.txt").read_text()
    assert not (tmp_path / "gpu" / "equal.json").exists()
