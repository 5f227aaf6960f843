"""The scale benchmark runs end to end (real `fedhypevae train` runs, stopped by SIGTERM and resumed on another number
of ranks) at a small size and writes its files, with each row's phases. Nothing about speed. (1,000 clients: the stop
is sent within 0.2 s of the second round's row, and the run must still be in its third round then.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_a_small_scale_run_reports_rounds_phases_checkpoints_and_resumes(tmp_path):
    if not (MPIEXEC.exists() or shutil.which("mpiexec")):
        pytest.skip("no mpiexec")
    out = tmp_path / "scale"
    cmd = [sys.executable, "-m", "benchmarks.scale", "--out", str(out), "--clients", "1000", "--ranks", "1,2"]
    proc = subprocess.run(
        [*cmd, "--mmd", "off", "--rounds", "2"], cwd=REPO, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "scale.json").read_text())
    assert [(r["clients"], r["ranks"]) for r in res["rows"]] == [(1000, 1), (1000, 2)]
    for r in res["rows"]:
        assert "error" not in r, r
        assert len(r["round_s_all"]) >= 2 and r["round_s"] > 0  # the stop may land after a third round
        assert r["files_per_checkpoint"] == 2 + r["ranks"]  # one shard per rank, shared.pt, COMPLETE
        assert r["ranks_resumed_on"] == (2 if r["ranks"] == 1 else 1) and r["resume_s"] > 0
        assert len(r["peak_rss_mb"]) == r["ranks"] and sum(r["clients_per_rank"]) == 1000
        phases = {k for k in r["phases_s"] if k.startswith("time/phase/")}
        assert {f"time/phase/{p}(s)" for p in ("sample", "forward", "clip", "noise", "optimizer")} <= phases
        assert 0 < sum(r["phases_s"][k] for k in phases) <= r["round_s"] * 1.05
    md = (out / "scale.md").read_text()
    assert "Seconds per round by phase" in md and md.count("| 1,000 |") == 4
    assert (out / "scale.png").stat().st_size > 1000
    # the rows of two runs in one table, each with its own disk rate
    merged = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--merge", str(out / "scale.json"), str(out / "scale.json")]
        + ["--out", str(merged)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    both = json.loads((merged / "scale.json").read_text())
    assert [r["ranks"] for r in both["rows"]] == [1, 1, 2, 2] and len(both["merged_from"]) == 2
    assert all(r["disk_write_mb_s"] == res["disk_write_mb_s"] for r in both["rows"])
    assert (merged / "scale.md").read_text().count("| 1,000 |") == 8
