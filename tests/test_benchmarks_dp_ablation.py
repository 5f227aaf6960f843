"""benchmarks/dp_ablation.py: trains, evaluates and summarizes a variant (2 rounds here, to be quick)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_dp_ablation_runs_a_variant_and_writes_its_row(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "dp_ablation.py"), "--out", str(tmp_path), "--seeds", "0"]
    cmd += ["--only", "B2_T50_q1", "--set", "train.rounds=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "| B2_T50_q1 |" in (tmp_path / "dp_ablation.md").read_text()
    (row,) = json.loads((tmp_path / "dp_ablation.json").read_text())
    assert 0 <= row["so"][0] <= 100 and 0 <= row["lm"][0] <= 100 and row["eps"] <= 1.0 + 1e-9
    assert row["real_spread"][0] > 0 and 0 <= row["own_nearest"][0] <= row["per_seed"][0]["classes"]
    cfg = (tmp_path / "runs" / "B2_T50_q1_s0" / "config.yaml").read_text()
    assert "holdout: validation" in cfg  # chosen on validation splits: the test splits are never loaded
    # a second call resumes: nothing is trained again
    before = (tmp_path / "runs" / "B2_T50_q1_s0" / "results.json").stat().st_mtime
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    assert (tmp_path / "runs" / "B2_T50_q1_s0" / "results.json").stat().st_mtime == before
