"""The all-reduce benchmark runs end to end at 2 ranks and writes its four files. Nothing about speed."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.allreduce import FLAG_BYTES

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_quick_benchmark_writes_files_with_finite_timings(tmp_path):
    if not (MPIEXEC.exists() or shutil.which("mpiexec")):
        pytest.skip("no mpiexec")
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.allreduce",
        "--out",
        str(out),
        "--quick",
        "--ranks",
        "2",
        "--sizes",
        "1K,16K",
        "--rounds",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("allreduce.csv", "allreduce.md", "allreduce.json", "allreduce.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert proc.stdout == (out / "allreduce.md").read_text()

    res = json.loads((out / "allreduce.json").read_text())
    assert {"machine", "micro", "train", "extra_sizes", "timing", "wall_s", "quick"} <= set(res)
    assert {"cpu_count", "torch", "mpi4py", "mpich"} <= set(res["machine"])
    assert {(j["backend"], j["ranks"]) for j in res["micro"]} == {("mpi", 2), ("gloo", 2)}
    payload = next(int(b) for b, what in res["extra_sizes"].items() if what == "step payload")
    for job in res["micro"]:
        assert "error" not in job, job.get("error")
        # the requested sizes, the step payload and the release guard's 16-byte flags
        assert {r["bytes"] for r in job["rows"]} == {FLAG_BYTES, 1024, 16384, payload}
        for r in job["rows"]:
            assert r["correct"] and r["reps"] == len(r["max_over_ranks_ms"])
            for key in ("median_ms", "p90_ms", "min_ms", "rank0_median_ms"):
                assert math.isfinite(r[key]) and r[key] > 0, (job["backend"], r["bytes"], key)
            assert r["min_ms"] <= r["median_ms"] <= r["p90_ms"]

    assert [t["ranks"] for t in res["train"]] == [1, 2]
    for t in res["train"]:
        assert "error" not in t, t.get("error")
        assert t["rounds"] == 1 and all(math.isfinite(x) and x > 0 for x in t["round_s"])
        assert math.isfinite(t["share"]) and 0 <= t["share"] <= 1
    assert math.isfinite(res["train"][1]["micro_estimate_ms"]) and res["train"][1]["micro_estimate_ms"] > 0

    rows = list(csv.DictReader((out / "allreduce.csv").open()))
    assert len(rows) == 2 * 4 and all(float(r["median_ms"]) > 0 for r in rows)
