"""Sweeps without SLURM: the grid, parameter checks, dry runs, the debug and local clusters, collection."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm import collect, sweep
from slurm.job import read_events

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["--config", "tiny", "--seeds", "0", "--partitions", "iid"]


def run_sweep(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "MPI_", "HYDRA_"))}
    return subprocess.run([sys.executable, "-m", "slurm.sweep", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_grid_runs_epsilon_free_methods_once_per_seed_and_partition():
    s = {"methods": ["fedhypevae-strict", "local", "dpcvae"], "partitions": ["iid", "dirichlet0.3"], "seeds": [0, 1],
         "epsilons": [1.0, 4.0], "overrides": [], "ranks": 2}
    pts = sweep.build_grid(s)
    ids = {p.id for p in pts}
    assert len(pts) == 2 * 2 * 2 + 2 * 2 * 1 + 2 * 2 * 2
    assert "local__dirichlet0.3__epsnone__seed1" in ids and "fedhypevae-strict__iid__eps4__seed0" in ids
    strict = next(p for p in pts if p.id == "fedhypevae-strict__dirichlet0.3__eps1__seed1")
    assert strict.ranks == 2 and "partition.alpha=0.3" in strict.overrides and "privacy.mode=strict" in strict.overrides
    assert all(p.ranks == 1 for p in pts if p.method in ("local", "dpcvae"))  # baselines run on one rank
    with pytest.raises(sweep.SweepError, match="dirichlet<alpha>"):
        sweep.parse_partition("dirichletX")
    with pytest.raises(sweep.SweepError, match="unknown method"):
        sweep.build_grid({**s, "methods": ["fedavgg"]})


def test_a_wrong_cluster_parameter_fails_listing_submitits_names(tmp_path):
    r = run_sweep(*TINY, "--param", "slurm_partiton=gpu", "--out", str(tmp_path / "s"), "--dry-run")
    assert r.returncode == 2
    assert "unknown cluster parameter(s) slurm_partiton" in r.stderr and "slurm_partition" in r.stderr
    assert "timeout_min" in r.stderr and "Traceback" not in r.stderr
    r = run_sweep(*TINY, "--ranks", "3", "--param", "tasks_per_node=2", "--out", str(tmp_path / "s"), "--dry-run")
    assert r.returncode == 2 and "disagrees" in r.stderr
    r = run_sweep(*TINY, "--epsilons", "0,1", "--out", str(tmp_path / "s"), "--dry-run")
    assert r.returncode == 2 and "positive" in r.stderr
    r = run_sweep("--config", "nope.yaml", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "not found" in r.stderr


def test_dry_run_lists_points_and_writes_plain_sbatch_scripts(tmp_path):
    out = tmp_path / "s"
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("slurm_partition: gpu\ntimeout_min: 30\n")
    r = run_sweep(*TINY, "--epsilons", "1,2", "--methods", "fedhypevae-strict,local", "--ranks", "2", "--cluster", "slurm",
                  "--cluster-config", str(cfg), "--param", "mem_gb=4", "--out", str(out), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would submit 3 of 3" in r.stdout and "slurm_partition = gpu" in r.stdout
    script = (out / "points" / "fedhypevae-strict__iid__eps2__seed0" / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --time=00:30:00" in script and "srun --mpi=pmi2" in script
    assert "#SBATCH --ntasks-per-node=1" in (out / "points" / "local__iid__epsnone__seed0" / "job.sbatch").read_text()
    assert not any((out / "points").glob("*/job.json"))  # nothing was submitted


@pytest.mark.slow
def test_debug_cluster_sweep_skips_finished_points_and_collects(tmp_path):
    out = tmp_path / "s"
    args = [*TINY, "--epsilons", "1,4", "--methods", "fedhypevae-strict,local", "--cluster", "debug", "--out", str(out)]
    r = run_sweep(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 of 3 point(s) finished" in r.stdout
    res = json.loads((out / "points" / "fedhypevae-strict__iid__eps1__seed0" / "result.json").read_text())
    assert 0.9 <= res["epsilon_spent"] <= 1.0 + 1e-9 and res["formal_guarantee"] is True
    assert 0 < res["balanced_accuracy"] <= 1 and len(res["rows"]) == 4
    again = run_sweep(*args)
    assert again.returncode == 0 and "3 finished" in again.stdout and "nothing to submit" in again.stdout
    changed = run_sweep(*args[:-2], "--set", "train.rounds=1", "--out", str(out))
    assert changed.returncode == 0 and "nothing to submit" in changed.stdout  # finished points are not rerun
    (out / "points" / "fedhypevae-strict__iid__eps4__seed0" / "result.json").unlink()
    changed = run_sweep(*args[:-2], "--set", "train.rounds=1", "--out", str(out))
    assert changed.returncode == 2 and "different overrides" in changed.stderr

    summary = collect.collect(out)
    assert summary["finished"] == 2 and summary["missing"] == ["fedhypevae-strict__iid__eps4__seed0"]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["method"], r["epsilon"]) for r in rows} == {("fedhypevae-strict", "1.0"), ("local", "")}
    assert (out / "privacy_utility.png").stat().st_size > 10_000
    md = (out / "summary.md").read_text()
    assert "FedHypeVAE (strict)" in md and "Missing (1 point(s)" in md


@pytest.mark.slow
@pytest.mark.mpi
def test_local_cluster_runs_multi_rank_points_with_mpiexec_and_lists_failures(tmp_path):
    if not (BIN / "mpiexec").exists():
        pytest.skip("needs mpiexec in the environment (pip install mpich)")
    out = tmp_path / "s"
    r = run_sweep(*TINY, "--epsilons", "2", "--ranks", "2", "--cluster", "local", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    point = out / "points" / "fedhypevae-strict__iid__eps2__seed0"
    starts = [e for e in read_events(point) if e["event"] == "start"]
    assert starts and starts[0]["world_size"] == 2 and starts[0]["launcher"] == "mpich"
    assert json.loads((point / "result.json").read_text())["ranks"] == 2

    # a point that cannot run (1 client on 2 ranks) fails; the sweep says which, with its log file
    bad = tmp_path / "bad"
    args = [*TINY, "--set", "partition.clients=1", "--set", "partition.kind=iid", "--epsilons", "2", "--ranks", "2",
            "--cluster", "local", "--out", str(bad)]
    r = run_sweep(*args)
    assert r.returncode == 1
    assert "FAILED fedhypevae-strict__iid__eps2__seed0" in r.stdout and "_log.err" in r.stdout
    assert "cannot fill 2 ranks" in r.stdout  # the cause, from the log
    again = run_sweep(*args, "--dry-run")
    assert "1 failed" in again.stdout and "_log.err" in again.stdout and "resubmit" in again.stdout


def test_example_sweep_config_and_help(tmp_path):
    r = run_sweep("--sweep-config", "slurm/sweep_example.yaml", "--cluster", "local", "--out", str(tmp_path / "s"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "96 points" in r.stdout and "ranks=4" in r.stdout
    h = run_sweep("--help")
    assert h.returncode == 0 and "--epsilons" in h.stdout and "submitit's names" in h.stdout
    c = subprocess.run([sys.executable, "-m", "slurm.collect", str(tmp_path / "none")], capture_output=True, text=True)
    assert c.returncode == 2 and "holds no sweep" in c.stderr
