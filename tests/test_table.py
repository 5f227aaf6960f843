"""`fedhypevae table`: identical splits for every method, resumable cells, Markdown/CSV/PNG outputs."""

import csv
import json

import pytest

from fedhypevae.errors import ConfigError
from fedhypevae.table import TableConfig, load_table_config, run_table


def small_table(**kw):
    args = dict(
        name="t",
        train_config="tiny",
        overrides=["train.rounds=1"],
        data={"path": "digits"},
        partitions=["iid", "dirichlet"],
        alpha=0.5,
        clients=3,
        min_client_size=20,
        seeds=[0],
        epsilon=2.0,
        methods=["local", "fedavg-dp", "dpcvae", "fedhypevae-strict", "pooled"],
        baselines={
            "fedavg-dp": {"rounds": 2},
        },
    )
    args.update(kw)
    return TableConfig(**args)


@pytest.mark.slow
def test_table_runs_every_method_on_the_same_splits_and_resumes(tmp_path):
    res = run_table(small_table(), tmp_path, command="test", progress=False)
    for name in ("table.md", "table.csv", "table.json", "per_client_bacc.png"):
        assert (tmp_path / name).is_file()
    md = res["markdown"]
    for label in ("Local only", "FedAvg (DP-SGD)", "Pooled"):
        assert f"| {label}" in md
    for label in ("DP-CVAE (strict, on the engine)", "FedHypeVAE (strict)"):  # a generative method: a row per protocol
        assert f"| {label} · augment |" in md and f"| {label} · λ-mix |" in md
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert (
        len(rows) == (3 + 2 * 2) * 2 * 3
    )  # (predicting methods + generative methods x protocols) x partitions x clients
    for r in rows:
        assert 0.0 <= float(r["balanced_accuracy"]) <= 1.0
        assert (r["protocol"] == "") == (r["method"] in ("local", "fedavg-dp", "pooled"))
        assert (r["lambda"] != "") == (r["protocol"] == "lambda-mix")
    eps = {r["method"]: r["epsilon_spent"] for r in rows}
    assert float(eps["fedhypevae-strict"]) <= 2.0 + 1e-9 and float(eps["fedavg-dp"]) <= 2.0 + 1e-9
    # every method scored the same clients' test splits
    clients = {
        (r["method"], r["protocol"], r["partition"]): sorted(
            r2["client"]
            for r2 in rows
            if (r2["method"], r2["protocol"], r2["partition"]) == (r["method"], r["protocol"], r["partition"])
        )
        for r in rows
    }
    assert len({tuple(v) for v in clients.values()}) == 1
    # the same synthetic set scored two ways: augment and lambda-mix differ somewhere
    by = {(r["method"], r["protocol"], r["partition"], r["client"]): float(r["balanced_accuracy"]) for r in rows}
    assert any(
        by[("fedhypevae-strict", "augment", p, c)] != by[("fedhypevae-strict", "lambda-mix", p, c)]
        for (m, pr, p, c) in by
        if m == "fedhypevae-strict" and pr == "augment"
    )
    assert "VALIDATION" not in md
    # a second run reuses the finished cells
    before = {p.name: p.stat().st_mtime for p in (tmp_path / "cells").iterdir()}
    run_table(small_table(), tmp_path, command="test", progress=False)
    assert {p.name: p.stat().st_mtime for p in (tmp_path / "cells").iterdir()} == before


def test_a_deleted_cells_folder_reuses_the_finished_runs_of_the_same_settings_only(tmp_path):
    """The cells' settings check can be passed by deleting OUT/cells: the finished FedHypeVAE runs under OUT/runs are
    then reused only where they were trained with the cell's settings; under others (here the private recipe) the
    table stops with one line naming the setting, never scoring a run of another table."""
    import shutil

    tc = small_table(methods=["fedhypevae-strict"], partitions=["iid"])
    run_table(tc, tmp_path, command="test", progress=False)
    results = tmp_path / "runs" / "iid_s0_fedhypevae-strict" / "results.json"
    stamp = results.stat().st_mtime
    shutil.rmtree(tmp_path / "cells")
    run_table(tc, tmp_path, command="test", progress=False)  # the same settings: the run is reused, not trained
    assert results.stat().st_mtime == stamp
    shutil.rmtree(tmp_path / "cells")
    with pytest.raises(ConfigError, match="finished run with other settings: train.lr"):
        run_table(
            small_table(methods=["fedhypevae-strict"], partitions=["iid"], private_overrides=["train.lr=0.0001"]),
            tmp_path,
            command="test",
            progress=False,
        )


def test_table_config_rejects_unknown_methods_and_keys(tmp_path):
    with pytest.raises(ConfigError, match="valid"):
        small_table(methods=["local", "gan"])
    with pytest.raises(ConfigError, match="protocols"):
        small_table(protocols=["augment", "local"])
    with pytest.raises(ConfigError, match="protocols"):
        small_table(protocols="augment")
    p = tmp_path / "t.yaml"
    p.write_text("name: x\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_table_config(str(p))


def test_shipped_table_configs_load():
    for name in ("table1_digits", "table1_ham10000", "table1_pneumoniamnist"):
        tc = load_table_config(name)
        assert (
            tc.clients == 10
            and tc.epsilon == 1.0
            and tc.seeds == [0, 1, 2]
            and set(tc.partitions) == {"iid", "dirichlet"}
        )


def test_a_table_on_validation_splits_says_so(tmp_path):
    from fedhypevae.table import aggregate, markdown

    tc = small_table(data={"path": "digits", "holdout": "validation"}, methods=["local"], partitions=["iid"])
    res = run_table(tc, tmp_path, command="test", progress=False)
    assert "scored on VALIDATION splits" in res["markdown"]
    assert "VALIDATION" not in markdown(small_table(), aggregate([]), "test")


def _numbers(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k not in ("seconds", "train_seconds")}


@pytest.mark.slow
def test_table_jobs_run_cells_in_worker_processes_with_the_same_numbers(tmp_path):
    import json

    tc = dict(methods=["local", "fedavg", "pooled", "gaussian", "fedhypevae-strict"], partitions=["dirichlet"])
    serial = run_table(small_table(**tc), tmp_path / "serial", command="test", progress=False)
    parallel = run_table(small_table(**tc), tmp_path / "jobs", command="test", progress=False, jobs=2)
    assert set(serial["seconds"]) == set(parallel["seconds"])
    for name in serial["seconds"]:
        a = json.loads((tmp_path / "serial" / "cells" / f"{name}.json").read_text())
        b = json.loads((tmp_path / "jobs" / "cells" / f"{name}.json").read_text())
        if b["epsilon_spent"] is not None:  # private: securely seeded noise, a fresh draw each run
            assert 0 < b["epsilon_spent"] <= 2.0 + 1e-9, name
            continue
        assert _numbers(a) == _numbers(b), name  # seeded by the cell alone: the process does not matter
    assert (tmp_path / "jobs" / "runs" / "dirichlet_s0_fedhypevae-strict" / "results.json").is_file()
    # the workers wrote every cell; a second run reads them back instead of computing
    before = {p.name: p.stat().st_mtime for p in (tmp_path / "jobs" / "cells").iterdir()}
    run_table(small_table(**tc), tmp_path / "jobs", command="test", progress=False, jobs=2)
    assert {p.name: p.stat().st_mtime for p in (tmp_path / "jobs" / "cells").iterdir()} == before


def test_jobs_take_the_fedhypevae_cells_first():
    from fedhypevae.table import submission_order

    cells = [("iid", 0, "local"), ("iid", 0, "dpcvae"), ("iid", 0, "pooled"), ("iid", 1, "fedhypevae-strict")]
    cells += [("iid", 1, "gaussian"), ("iid", 1, "fedhypevae-nonprivate")]
    assert submission_order(cells) == [
        ("iid", 0, "dpcvae"),
        ("iid", 1, "fedhypevae-strict"),
        ("iid", 1, "fedhypevae-nonprivate"),
        ("iid", 0, "local"),
        ("iid", 0, "pooled"),
        ("iid", 1, "gaussian"),
    ]


def _children(pid: int) -> set:
    """Live (not zombie) processes whose parent is `pid`."""
    from pathlib import Path

    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_a_killed_table_command_takes_its_workers_with_it_and_the_same_command_completes_the_table(tmp_path):
    """SIGKILL of `fedhypevae table --jobs 2` while both workers train: the workers end within seconds (they used to
    finish their cells as orphans, writing into the run folders that the re-run command resumes); the same command
    again resumes the interrupted runs and completes the table."""
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from helpers import process_running, wait_for

    table = dict(
        name="t",
        train_config="tiny",
        overrides=["train.rounds=150", "train.checkpoint_every=5"],
        data={"path": "digits"},
        partitions=["iid"],
        clients=3,
        min_client_size=20,
        seeds=[0],
        epsilon=2.0,
        methods=["fedhypevae-strict", "fedhypevae-nonprivate"],
        protocols=["synthetic-only"],
    )
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(table))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fedhypevae", "table", "--config", str(tmp_path / "t.yaml"), "--out", str(out)]
    cmd += ["--jobs", "2", "--no-progress"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = [out / "runs" / f"iid_s0_{m}" for m in table["methods"]]
    try:
        wait_for(lambda: all((r / "checkpoints").is_dir() for r in runs), 120, "both cells to train")
        workers = _children(parent.pid) - {parent.pid}
        workers = {w for w in workers if "spawn_main" in open(f"/proc/{w}/cmdline").read()}
        assert len(workers) == 2, workers
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        t0 = time.time()
        wait_for(lambda: not any(process_running(w) for w in workers), 20, "the orphaned workers to end")
        print(f"workers ended {time.time() - t0:.1f} s after their table process was killed")
    finally:
        if parent.poll() is None:
            parent.kill()
    assert not (out / "table.md").exists()
    assert not any((r / "results.json").exists() for r in runs)  # killed mid-training, not finished as orphans
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "table.md").is_file()
    for r in runs:
        assert json.loads((r / "results.json").read_text())["status"] == "complete"
