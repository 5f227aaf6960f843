"""The throughput benchmark runs end to end on a very small configuration and writes its four files
with every headline key. Nothing about speed: only that the numbers exist, are finite and positive."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
HEADLINE = (
    "dp_over_nonprivate_step_time",
    "speedup_vs_opacus_loop",
    "per_client_overhead_ms",
    "per_client_overhead_noise_ms",
    "sigma_calibration_s",
)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.timeout(240)
def test_small_benchmark_writes_files_and_positive_figures(tmp_path):
    out = tmp_path / "bench"
    mpi = MPIEXEC.exists() or shutil.which("mpiexec")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.throughput",
        "--out",
        str(out),
        "--dims",
        "12",
        "--hidden",
        "8",
        "--latent",
        "3",
        "--clients",
        "3",
        "--per-client",
        "40",
        "--reps",
        "2",
        "--clients-sweep",
        "3,6",
        "--sweep-records",
        "120",
        "--ranks",
        "2" if mpi else "none",
        "--opacus-rounds",
        "1",
        "--peers",
        "off",
        "--calibration-steps",
        "200",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "part 1: engine d_x=12" in proc.stderr  # progress goes to stderr
    for name in ("throughput.json", "throughput.csv", "throughput.md", "throughput.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert proc.stdout == (out / "throughput.md").read_text()

    res = json.loads((out / "throughput.json").read_text())
    for key in HEADLINE:
        assert key in res, key
    assert all(
        positive(res[k]) for k in ("dp_over_nonprivate_step_time", "speedup_vs_opacus_loop", "sigma_calibration_s")
    )
    assert math.isfinite(res["per_client_overhead_ms"]) and math.isfinite(res["per_client_overhead_noise_ms"])
    assert set(res["headline"]["targets"]) == {
        "dp_over_nonprivate_step_time",
        "speedup_vs_opacus_loop",
        "per_client_overhead_ms",
        "sigma_calibration_s",
    }
    (eng,) = res["engine"]
    for variant in ("dp", "nonprivate"):
        s = eng[variant]
        assert positive(s["step_s"]) and positive(s["samples_per_s"]) and s["rounds"] == 2
        for k in ("forward", "backward", "clip", "optimizer", "phi_update"):
            assert positive(s["breakdown_s"][k]), (variant, k)
    for k in ("norms", "noise", "ledger"):  # DP-only work: per-sample norms, noise draws, ledger appends
        assert positive(eng["dp"]["breakdown_s"][k]), k
        assert eng["nonprivate"]["breakdown_s"][k] < eng["dp"]["breakdown_s"][k], k
    assert eng["nonprivate"]["breakdown_s"]["norms"] == 0
    assert {(r["d_x"], r["dp"]) for r in res["opacus"]} == {(12, True), (12, False)}
    assert all(positive(r["samples_per_s"]) for r in res["opacus"])
    assert [r["clients"] for r in res["clients"]] == [3, 6]
    assert all(positive(r["round_s"]) and positive(r["breakdown_s"]["noise"]) for r in res["clients"])
    if mpi:
        (rk,) = res["ranks"]
        assert "error" not in rk, rk.get("error")
        assert rk["ranks"] == 2 and positive(rk["samples_per_s"])
    assert res["sigma"]["steps"] == 200 and positive(res["sigma"]["rdp"]["seconds"])
    assert res["peers"] == {}

    rows = list(csv.DictReader((out / "throughput.csv").open()))
    assert any(r["part"] == "engine" and r["metric"] == "samples_per_s" and float(r["value"]) > 0 for r in rows)
    assert any(r["part"] == "headline" and r["metric"] == "speedup_vs_opacus_loop" for r in rows)


def test_the_benchmark_times_through_the_trainers_hooks_and_patches_nothing(tmp_path):
    """instrument() registers a timer on Trainer.hooks; no attribute of the trainer, its ledger or its
    DP steps is replaced (the steps turn their own phase timings on while the trainer is timed)."""
    from benchmarks.throughput import PHASE_KEYS, build_trainer, make_config, make_data, timed_round

    data = make_data(tmp_path / "d.npz", 12, 120, 3)
    cfg = make_config(
        data,
        clients=3,
        enabled=True,
        rounds=2,
        local_steps=1,
        model=["model.hidden=[8]", "model.latent_dim=3"],
        extra=["privacy.diagnostics=true"],
    )
    from fedhypevae.trainer import Trainer

    tr, tm = build_trainer(cfg, tmp_path / "run", "cpu")
    assert isinstance(tr, Trainer) and tr.engine == "batched"
    own = {name: dict(vars(obj)) for name, obj in (("trainer", tr), ("ledger", tr.ledger))}
    row = timed_round(tr, tm, 0)
    for name, obj in (("trainer", tr), ("ledger", tr.ledger)):
        for k in (
            "fits",
            "charge",
            "_allreduce",
            "allreduce",
            "_apply_flat_grad",
            "epsilon_spent",
            "prepare",
            "release",
        ):
            assert k not in vars(obj), (name, k)  # methods stay the class's
        assert set(own[name]) <= set(vars(obj))
    assert all("prepare" not in vars(st) and "release" not in vars(st) for st in tr.steps)
    assert set(row["parts"]) == set(PHASE_KEYS)
    for k in ("ledger", "guard", "all_reduce", "phi_update", "forward", "noise"):
        assert positive(row["parts"][k]), k
    assert positive(row["accounting_s"]) and row["steps_s"] < row["wall_s"]
