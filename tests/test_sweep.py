"""Sweeps without SLURM: the grid, parameter checks, dry runs, the debug and local clusters, collection."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedhypevae.slurm import collect, job, sweep
from fedhypevae.slurm.job import read_events

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["--config", "tiny", "--seeds", "0", "--partitions", "iid"]


def run_sweep(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "MPI_", "HYDRA_"))}
    return subprocess.run(
        [sys.executable, "-m", "fedhypevae.slurm.sweep", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_grid_runs_epsilon_free_methods_once_per_seed_and_partition():
    s = {
        "methods": ["fedhypevae-strict", "local", "dpcvae-loop"],
        "partitions": ["iid", "dirichlet0.3"],
        "seeds": [0, 1],
        "epsilons": [1.0, 4.0],
        "overrides": [],
        "ranks": 2,
    }
    pts = sweep.build_grid(s)
    ids = {p.id for p in pts}
    assert len(pts) == 2 * 2 * 2 + 2 * 2 * 1 + 2 * 2 * 2
    assert "local__dirichlet0.3__epsnone__seed1" in ids and "fedhypevae-strict__iid__eps4__seed0" in ids
    strict = next(p for p in pts if p.id == "fedhypevae-strict__dirichlet0.3__eps1__seed1")
    assert strict.ranks == 2 and "partition.alpha=0.3" in strict.overrides and "privacy.mode=strict" in strict.overrides
    assert all(p.ranks == 1 for p in pts if p.method in ("local", "dpcvae-loop"))  # baselines run on one rank
    with pytest.raises(sweep.SweepError, match="dirichlet<alpha>"):
        sweep.parse_partition("dirichletX")
    with pytest.raises(sweep.SweepError, match="unknown method"):
        sweep.build_grid({**s, "methods": ["fedavgg"]})


def test_the_private_recipe_reaches_the_private_engine_points_only():
    """--private-set / private_set (a table's private_overrides): FedHypeVAE strict and DP-CVAE get it, after
    --set; the non-private ceiling and the baselines do not; the method's own settings still come last."""
    recipe = ["model.class_anchor=true", "train.lr=0.001"]
    s = {
        "methods": ["fedhypevae-strict", "dpcvae", "fedhypevae-nonprivate", "local"],
        "partitions": ["iid"],
        "seeds": [0],
        "epsilons": [1.0],
        "overrides": ["train.rounds=2"],
        "private_overrides": recipe,
        "ranks": 1,
    }
    by = {p.method: p.overrides for p in sweep.build_grid(s)}
    strict = by["fedhypevae-strict"]
    assert all(r in strict for r in recipe) and strict.index("train.rounds=2") < strict.index(recipe[0])
    assert strict.index(recipe[-1]) < strict.index("privacy.mode=strict")
    assert all(r in by["dpcvae"] for r in recipe) and by["dpcvae"][-1] != recipe[-1]  # DP-CVAE's own settings last
    assert not any(r in by["fedhypevae-nonprivate"] for r in recipe) and not any(r in by["local"] for r in recipe)


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


def test_submitits_parameter_names_are_the_ones_its_public_update_parameters_accepts(tmp_path):
    """valid_parameters reads submitit's private per-executor name lists (submitit has no public one): this
    fails when a submitit release moves or renames them, before a sweep refuses good names or lets wrong ones by."""
    import inspect

    import submitit

    valid = sweep.valid_parameters()
    assert {
        "name",
        "timeout_min",
        "nodes",
        "tasks_per_node",
        "cpus_per_task",
        "gpus_per_node",
        "mem_gb",
        "slurm_partition",
        "slurm_srun_args",
        "slurm_setup",
        "slurm_additional_parameters",
        "local_setup",
    } <= set(valid)
    typed = {"name": "x", "mem_gb": 1.0, "stderr_to_stdout": False}  # the other generic ones are ints
    ex = submitit.AutoExecutor(folder=tmp_path, cluster="debug")  # checks every executor's names, applies none
    for name, group in valid.items():
        if name == "slurm_max_num_timeout":  # a keyword of the executor, not of update_parameters
            assert "max_num_timeout" in inspect.signature(submitit.SlurmExecutor).parameters
            continue
        ex.update_parameters(**{name: typed.get(name, 1) if group == "generic" else "x"})
    with pytest.raises(NameError, match="partiton"):
        ex.update_parameters(slurm_partiton="gpu")
    assert "slurm_partiton" not in valid


def test_a_local_jobs_id_is_the_process_the_sweep_follows(tmp_path):
    import submitit

    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="local")
    ex.update_parameters(timeout_min=1)
    j = ex.submit(time.sleep, 5)
    pid = sweep.local_pid(j)
    # running, and a submitit process (once exec'd: between fork and exec its command line is the parent's)
    deadline = time.monotonic() + 4
    while not sweep._pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sweep._pid_alive(pid)
    j.result()
    assert j.state == "FINISHED" and not sweep._pid_alive(pid)


def test_dry_run_lists_points_and_writes_plain_sbatch_scripts(tmp_path):
    out = tmp_path / "s"
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("slurm_partition: gpu\ntimeout_min: 30\n")
    r = run_sweep(
        *TINY,
        "--epsilons",
        "1,2",
        "--methods",
        "fedhypevae-strict,local",
        "--ranks",
        "2",
        "--cluster",
        "slurm",
        "--cluster-config",
        str(cfg),
        "--param",
        "mem_gb=4",
        "--out",
        str(out),
        "--dry-run",
    )
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
    args = [
        *TINY,
        "--set",
        "partition.clients=1",
        "--set",
        "partition.kind=iid",
        "--epsilons",
        "2",
        "--ranks",
        "2",
        "--cluster",
        "local",
        "--out",
        str(bad),
    ]
    r = run_sweep(*args)
    assert r.returncode == 1
    assert "FAILED fedhypevae-strict__iid__eps2__seed0" in r.stdout and "_log.err" in r.stdout
    assert "cannot fill 2 ranks" in r.stdout  # the cause, from the log
    again = run_sweep(*args, "--dry-run")
    assert "1 failed" in again.stdout and "_log.err" in again.stdout and "resubmit" in again.stdout


def test_example_sweep_config_and_help(tmp_path):
    r = run_sweep(
        "--sweep-config", "slurm/sweep_example.yaml", "--cluster", "local", "--out", str(tmp_path / "s"), "--dry-run"
    )
    assert r.returncode == 0, r.stderr
    assert "96 points" in r.stdout and "ranks=4" in r.stdout
    h = run_sweep("--help")
    assert h.returncode == 0 and "--epsilons" in h.stdout and "submitit's names" in h.stdout
    c = subprocess.run(
        [sys.executable, "-m", "fedhypevae.slurm.collect", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert c.returncode == 2 and "holds no sweep" in c.stderr


# ------------------------------------------------------------------------------------ partial points
WHY = (
    "class statistics: the budget has no room left for their release (epsilon spent 1.9999 of 2.0), so the "
    "meta-code was not fitted"
)
NOT_FITTED = "meta-code: not fitted (no class statistics); synthetic.npz was generated from the untrained zero code"


def _spec(pid, method="fedhypevae-strict", eps=1.0, seed=0, ranks=1):
    return {
        "id": pid,
        "method": method,
        "partition": "iid",
        "epsilon": eps,
        "seed": seed,
        "ranks": ranks,
        "config": str(REPO / "configs" / "tiny.yaml"),
        "overrides": [f"seed={seed}", "partition.kind=iid", f"privacy.target_epsilon={eps}", "privacy.mode=strict"],
        "protocol": "augment",
        "comm_timeout_s": 60.0,
        "device": "cpu",
        "baseline_settings": {},
    }


def _write_point(out, spec, result=None):
    """A point directory as fedhypevae.slurm.sweep (spec.json) and fedhypevae.slurm.job (result.json) write it."""
    d = out / "points" / spec["id"]
    d.mkdir(parents=True, exist_ok=True)
    job.write_json(d / "spec.json", spec)
    if result is not None:
        job.write_json(
            d / "result.json",
            {**{k: spec[k] for k in ("id", "method", "partition", "epsilon", "seed", "ranks")}, **result},
        )
    return d


def _complete(acc):
    rows = [{"client": c, "accuracy": acc, "balanced_accuracy": acc - 0.1} for c in range(2)]
    return {
        "status": "complete",
        "missing": [],
        "rows": rows,
        "accuracy": acc,
        "balanced_accuracy": acc - 0.1,
        "epsilon_spent": 0.99,
        "formal_guarantee": True,
        "seconds": 1.0,
        "starts": 1,
        "resumed_from_rounds": [],
        "resumed_from_steps": [],
    }


def _partial():
    return {
        "status": "partial",
        "missing": [WHY, NOT_FITTED],
        "rows": [],
        "epsilon_spent": 1.9999,
        "formal_guarantee": True,
        "seconds": 1.0,
        "starts": 2,
        "resumed_from_rounds": [3],
        "resumed_from_steps": [0],
    }


def test_collect_lists_partial_points_apart_and_leaves_them_out_of_means_and_plot(tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    _write_point(out, _spec("fedhypevae-strict__iid__eps1__seed0"), _complete(0.8))
    _write_point(out, _spec("fedhypevae-strict__iid__eps1__seed1", seed=1), _partial())  # same group as seed0
    _write_point(out, _spec("fedhypevae-strict__iid__eps4__seed0", eps=4.0), _partial())  # a group of its own
    _write_point(out, _spec("fedhypevae-strict__iid__epsinf__seed0", eps=float("inf")))  # no result yet
    plotted = []
    monkeypatch.setattr(collect, "plot", lambda rows, path, protocol=None: plotted.append(rows))

    assert collect.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 of 4 point(s) collected, 2 partial" in printed

    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] == 1 and s["points"] == 4
    assert [p["id"] for p in s["partial"]] == [
        "fedhypevae-strict__iid__eps1__seed1",
        "fedhypevae-strict__iid__eps4__seed0",
    ]
    assert s["partial"][0]["missing"] == [WHY, NOT_FITTED]
    assert s["missing"] == ["fedhypevae-strict__iid__epsinf__seed0"]  # points without a result: as before
    (row,) = s["summary"]  # the partial seed is not averaged in; the eps=4 group (only partial) is absent
    assert row["epsilon"] == 1.0 and row["seeds"] == 1 and row["accuracy_mean"] == pytest.approx(80.0)
    assert [[r["epsilon"] for r in rows] for rows in plotted] == [[1.0]]
    assert [r["epsilon"] for r in csv.DictReader(open(out / "summary.csv"))] == ["1.0"]
    assert {r["point"] for r in csv.DictReader(open(out / "points.csv"))} == {"fedhypevae-strict__iid__eps1__seed0"}

    md = (out / "summary.md").read_text()
    assert "## Partial (2 point(s))" in md and "Missing (1 point(s)" in md
    assert f"- fedhypevae-strict__iid__eps4__seed0 (ε spent 2.000) — missing: {WHY}; {NOT_FITTED}" in md


def test_point_status_says_partial_and_the_dry_run_does_not_resubmit_it(tmp_path):
    out = tmp_path / "s"
    done = _write_point(out, _spec("a"), _complete(0.8))
    part = _write_point(out, _spec("b"), _partial())
    old = _write_point(out, _spec("c"), {k: v for k, v in _complete(0.8).items() if k not in ("status", "missing")})
    assert sweep.point_status(done) == ("finished", None)
    assert sweep.point_status(old) == ("finished", None)  # results written before statuses existed are complete
    state, res = sweep.point_status(part)
    assert state == "partial" and res["missing"] == [WHY, NOT_FITTED]
    assert sweep.point_status(_write_point(out, _spec("d"))) == ("new", None)

    # the sweep command: a partial point is skipped and said to be partial, with what it misses
    s = tmp_path / "sweep"
    args = [*TINY, "--epsilons", "1,4", "--cluster", "local", "--out", str(s)]
    assert run_sweep(*args, "--dry-run").returncode == 0
    pid = "fedhypevae-strict__iid__eps4__seed0"
    job.write_json(s / "points" / pid / "result.json", {"id": pid, **_partial()})
    (s / "points" / pid / "job.sbatch").unlink()  # written by the first dry run, when the point was new
    r = run_sweep(*args, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "2 points (1 new, 1 partial)" in r.stdout and "would submit 1 of 2" in r.stdout
    assert f"skip: partial (not retried: {WHY}; {NOT_FITTED})" in r.stdout
    assert not (s / "points" / pid / "job.sbatch").exists()  # no script written to resubmit it by hand


def test_json_files_are_strict_and_keep_an_infinite_target_epsilon(tmp_path):
    f = tmp_path / "x.json"
    job.write_json(
        f,
        {
            "epsilon": float("inf"),
            "epsilons": [1.0, float("inf")],
            "epsilon_spent": float("nan"),
            "summary": [{"epsilon": float("inf"), "accuracy_std": float("nan")}],
        },
    )
    text = f.read_text()
    assert "Infinity" not in text and "NaN" not in text
    back = job.read_json(f)
    assert back["epsilon"] == float("inf") and back["epsilons"] == [1.0, float("inf")]
    assert back["summary"] == [{"epsilon": float("inf"), "accuracy_std": None}] and back["epsilon_spent"] is None
    from fedhypevae.run import EXIT_PARTIAL

    assert job.EXIT_PARTIAL == EXIT_PARTIAL == 3


def _single_process(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA_", "TORCHELASTIC_")):
            monkeypatch.delenv(k)


def test_job_writes_a_partial_result_unscored_exits_3_and_is_not_run_again(tmp_path, monkeypatch, capsys):
    # the job-level handling of a partial run_training result (the end-to-end tests below make one for real)
    import fedhypevae.run

    _single_process(monkeypatch)
    point = _write_point(tmp_path / "s", _spec("fedhypevae-strict__iid__eps2__seed0", eps=2.0))
    calls = []

    def partial_run(cfg, out, comm, **kw):
        calls.append(kw)
        return {
            "status": "partial",
            "missing": [WHY, NOT_FITTED],
            "training": {"rounds": 3},
            "provenance": {},
            "privacy": {"epsilon_spent": 1.9999, "formal_guarantee": True},
        }

    monkeypatch.setattr(fedhypevae.run, "run_training", partial_run)
    assert job.main([str(point)]) == job.EXIT_PARTIAL
    assert len(calls) == 1 and calls[0]["catch_signals"] is True
    assert "is PARTIAL (not retried)" in capsys.readouterr().err
    text = (point / "result.json").read_text()
    res = json.loads(text)
    assert res["status"] == "partial" and res["missing"] == [WHY, NOT_FITTED] and res["rows"] == []
    assert "accuracy" not in res and "balanced_accuracy" not in res  # an unfitted synthetic set is not scored
    assert res["epsilon_spent"] == 1.9999 and res["formal_guarantee"] is True and res["starts"] == 1
    assert res["run_results"].endswith("run/results.json")
    assert [e["event"] for e in read_events(point)] == ["start", "partial"]
    assert read_events(point)[-1]["missing"] == [WHY, NOT_FITTED]

    # started again (a requeue, or the plain sbatch script submitted by hand): not run again, same status
    monkeypatch.setattr(fedhypevae.run, "run_training", lambda *a, **k: pytest.fail("a partial point was run again"))
    assert job.main([str(point)]) == job.EXIT_PARTIAL
    assert "already has a partial result" in capsys.readouterr().err
    assert [e["event"] for e in read_events(point)] == ["start", "partial"]
    out = job.PointJob(str(point), "tasks")()  # what submitit runs: returns normally, so it is not retried
    assert out == {"interrupted": False, "point": res["id"], "status": "partial", "missing": [WHY, NOT_FITTED]}


def test_start_event_after_a_stop_between_steps_records_round_and_step(tmp_path, monkeypatch):
    import fedhypevae.run

    _single_process(monkeypatch)
    point = _write_point(tmp_path / "s", _spec("fedhypevae-strict__iid__eps1__seed0"))
    (point / "run").mkdir()
    (point / "run" / "config.yaml").write_text("seed: 0\n")  # a run to resume
    for name, complete in (
        ("round_000001", True),
        ("round_000002", True),
        ("round_000002_step_00001", True),
        ("round_000002_step_00003", False),
    ):  # the last one was being written: ignored
        d = point / "run" / "checkpoints" / name
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text("ok\n")
    seen = {}

    def stopped(cfg, out, comm, *, resume, **kw):
        seen["resume"] = resume
        return {
            "interrupted": True,
            "signal": 15,
            "round": 2,
            "step": 3,
            "epsilon_spent": 0.5,
            "checkpoint": str(out / "checkpoints" / "round_000002_step_00003"),
            "out": str(out),
        }

    monkeypatch.setattr(fedhypevae.run, "run_training", stopped)
    assert job.main([str(point)]) == 143
    start, stop = read_events(point)
    assert seen["resume"] is True
    assert start["event"] == "start" and start["resume"] is True
    assert start["resume_from_round"] == 2 and start["resume_from_step"] == 1
    assert stop["event"] == "interrupted" and stop["round"] == 2 and stop["step"] == 3 and stop["signal"] == 15


def test_run_with_mpiexec_takes_the_ranks_status_3_as_partial(tmp_path, monkeypatch):
    point = _write_point(tmp_path / "s", _spec("p", ranks=2), _partial())
    fake = tmp_path / "mpiexec"
    monkeypatch.setattr(job, "mpiexec_path", lambda: str(fake))
    for rc, expect in (
        (3, {"interrupted": False, "point": "p", "status": "partial", "missing": [WHY, NOT_FITTED]}),
        (143, {"interrupted": True, "signal": 15, "point": "p"}),
        (130, {"interrupted": True, "signal": 2, "point": "p"}),
    ):
        fake.write_text(f"#!/bin/sh\nexit {rc}\n")
        fake.chmod(0o755)
        assert job.run_with_mpiexec(point) == expect
    (point / "result.json").unlink()
    fake.write_text("#!/bin/sh\nexit 3\n")
    with pytest.raises(job.SweepError, match="does not say partial"):
        job.run_with_mpiexec(point)


def _crash_after_the_statistics_charge(point):
    """What a job killed after charging its statistics release, before keeping the released statistics
    (run/class_stats.pt) or writing any result, leaves: the ledger holds the charge; the statistics, results,
    synthetic set and the 'finished' events are not there."""
    names = ("result.json", "run/results.json", "run/synthetic.npz", "run/meta_codes.pt", "run/hypernetwork.pt")
    for name in (*names, "run/class_stats.pt"):
        (point / name).unlink()
    for f in (point / "events.jsonl", point / "run" / "events.jsonl"):
        lines = [t for t in f.read_text().splitlines() if json.loads(t)["event"] != "finished"]
        f.write_text("".join(t + "\n" for t in lines))


def _stats_charges(run_dir):
    return sum(
        json.loads(t).get("key") == "stats"
        for f in sorted((run_dir / "ledger").glob("rank_*.jsonl"))
        for t in f.read_text().splitlines()
        if t.strip()
    )


@pytest.mark.slow
def test_debug_cluster_point_made_partial_for_real_is_reported_not_retried_and_collected_apart(tmp_path):
    out = tmp_path / "s"
    args = [*TINY, "--epsilons", "2", "--methods", "fedhypevae-strict,local", "--cluster", "debug", "--out", str(out)]
    r = run_sweep(*args)
    assert r.returncode == 0 and "2 of 2 point(s) finished" in r.stdout, r.stdout + r.stderr
    point = out / "points" / "fedhypevae-strict__iid__eps2__seed0"
    assert json.loads((point / "result.json").read_text())["status"] == "complete"

    # the job died after its statistics release was charged: the resumed run has no budget left for it (secure
    # noise: a new release, not a free replay), so it ends partial
    _crash_after_the_statistics_charge(point)
    r = run_sweep(*args)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "1 failed" in r.stdout and "0 of 1 point(s) finished, 1 partial" in r.stdout
    assert f"PARTIAL {point.name}: partial (not retried: {WHY}" in r.stdout
    text = (point / "result.json").read_text()
    res = json.loads(text)
    assert res["status"] == "partial" and res["rows"] == [] and "accuracy" not in res
    assert res["missing"][0] == WHY and "meta-code: not fitted" in res["missing"][1]
    assert 1.9 < res["epsilon_spent"] <= 2.0 + 1e-9 and res["starts"] == 2
    assert res["resumed_from_rounds"] == [3] and res["resumed_from_steps"] == [0]
    assert "Infinity" not in text and "NaN" not in text
    events = read_events(point)
    assert [e["event"] for e in events] == ["start", "start", "partial"]
    assert events[1]["resume"] is True and events[1]["resume_from_round"] == 3 and events[1]["resume_from_step"] == 0
    assert _stats_charges(point / "run") == 1  # the refused release was not charged

    again = run_sweep(*args)  # not retried
    assert again.returncode == 0 and "1 finished, 1 partial" in again.stdout and "nothing to submit" in again.stdout
    assert f"{point.name}  partial (not retried: {WHY}" in again.stdout and "submitted 1 point" not in again.stdout
    assert [e["event"] for e in read_events(point)] == ["start", "start", "partial"]

    c = subprocess.run(
        [sys.executable, "-m", "fedhypevae.slurm.collect", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert c.returncode == 0 and "1 of 2 point(s) collected, 1 partial" in c.stdout, c.stdout + c.stderr
    s = json.loads((out / "summary.json").read_text())
    assert [p["id"] for p in s["partial"]] == [point.name] and s["missing"] == []
    assert [r["method"] for r in s["summary"]] == ["local"]
    assert "## Partial (1 point(s))" in (out / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.mpi
def test_local_cluster_multi_rank_partial_point_exits_3_on_every_rank_and_is_not_a_failure(tmp_path):
    if not (BIN / "mpiexec").exists():
        pytest.skip("needs mpiexec in the environment (pip install mpich)")
    out = tmp_path / "s"
    args = [*TINY, "--epsilons", "2", "--ranks", "2", "--cluster", "local", "--out", str(out)]
    r = run_sweep(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    point = out / "points" / "fedhypevae-strict__iid__eps2__seed0"
    _crash_after_the_statistics_charge(point)
    r = run_sweep(*args)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "0 of 1 point(s) finished, 1 partial" in r.stdout and "FAILED" not in r.stdout
    res = json.loads((point / "result.json").read_text())
    assert res["status"] == "partial" and res["ranks"] == 2 and res["missing"][0] == WHY
    assert _stats_charges(point / "run") == 2  # one charge per rank's clients, made once, not again
    # the ranks themselves: status 3 from mpiexec (the point already has its partial result: not run again)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "MPI_", "HYDRA_"))}
    m = subprocess.run(
        [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "fedhypevae.slurm.job", str(point)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert m.returncode == 3 and "already has a partial result" in m.stderr, m.stdout + m.stderr
