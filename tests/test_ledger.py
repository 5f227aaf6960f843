"""The durable per-rank privacy ledger (format 2): one file per rank, one fsync'd record per release for the
block of clients, re-shardable onto another world size, every client's history reconstructible; older
per-client ledgers are read."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedhypevae.cli import main
from fedhypevae.config import load_config
from fedhypevae.errors import PrivacyError
from fedhypevae.privacy import DP_SGD, Mechanism, PrivacyLedger
from fedhypevae.privacy.ledger import client_ranges, read_client_releases
from fedhypevae.trainer import Trainer

BIN = Path(sys.executable).parent


def tiny(*overrides):
    return load_config("tiny", ["train.checkpoint_every=1", *overrides])


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_record_and_one_fsync_per_step_per_rank_written_before_the_release(tmp_path, monkeypatch):
    fsyncs, released = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    out = tmp_path / "run"
    tr = Trainer(tiny("train.rounds=2"), out, progress=False)
    tr.setup()
    path = out / "ledger" / "rank_00000.jsonl"
    (step,) = tr.steps
    real_release = step.release

    def release(pending, **kw):  # at every release, its charge is already on disk
        released.append(sum(1 for r in lines(path) if r.get("mechanism") == DP_SGD))
        return real_release(pending, **kw)

    step.release = release
    ledger_fsyncs = len(fsyncs)
    tr.train()
    assert released == [1, 2, 3, 4]
    recs = lines(path)
    blocks = [r for r in recs if "clients" in r]
    assert len(blocks) == 1 and blocks[0]["clients"] == [[0, 3]] and blocks[0]["format"] == 2
    steps = [r for r in recs if r.get("mechanism") == DP_SGD]
    assert len(steps) == 4  # one record per step for the block of 4 clients (not one per client)
    assert {r["block"] for r in steps} == {blocks[0]["block"]}
    assert tr.ledger.fsyncs == 5  # the MMD release and 4 steps: one fsync each
    assert len(fsyncs) - ledger_fsyncs >= 4  # (checkpoint writes fsync too)


def test_reshard_account_client_and_format_1(tmp_path, capsys):
    """Ledgers written by 2 ranks, then by 1 rank hosting every client (a resume on another world size),
    then read back per client; a format-1 per-client ledger is read as blocks of one client."""
    run = tmp_path / "run"
    a = PrivacyLedger([0, 2], run_dir=run, rank=0, world_size=2)
    b = PrivacyLedger([1, 3], run_dir=run, rank=1, world_size=2)
    for led in (a, b):
        for s in range(3):
            led.charge(DP_SGD, 1.5, 0.2, f"round=0/step={s}", digest="d")
        led.close()
    b2 = PrivacyLedger([1, 3], run_dir=run, rank=1, world_size=2)
    b2.charge(DP_SGD, 1.5, 0.2, "round=0/step=3")  # rank 1 got one step further before the crash
    b2.close()
    one = PrivacyLedger([0, 1, 2, 3], run_dir=run, rank=0, world_size=1)
    assert one.session == 3
    hist = {tuple(ids.tolist()): h for ids, h in one.histories()}
    assert hist == {(0, 2): [Mechanism(DP_SGD, 1.5, 0.2, 3)], (1, 3): [Mechanism(DP_SGD, 1.5, 0.2, 4)]}
    assert one.latest(DP_SGD, "round=0/step=3") is None  # another block released it: no free replay
    assert one.fresh_epoch(DP_SGD, "round=0/step=3") == 1
    one.charge(DP_SGD, 1.5, 0.2, "round=0/step=3", epoch=1)
    one.close()
    keys = [(r["key"], r["epoch"]) for r in read_client_releases(run, 3)]
    assert keys == [
        ("round=0/step=0", 0),
        ("round=0/step=1", 0),
        ("round=0/step=2", 0),
        ("round=0/step=3", 0),
        ("round=0/step=3", 1),
    ]
    assert [k for k, _ in map(lambda r: (r["key"], r["epoch"]), read_client_releases(run, 0))][-1] == "round=0/step=3"
    # a format-1 ledger of a client 4 from an older run
    v1 = run / "clients" / "client_00004" / "ledger.jsonl"
    v1.parent.mkdir(parents=True)
    v1.write_text(
        "".join(
            json.dumps({"mechanism": DP_SGD, "sigma": 1.5, "q": 0.2, "key": k}) + "\n"
            for k in ("round=0/step=0", "round=0/step=0", "round=0/step=1")
        )
    )
    led = PrivacyLedger(None, run_dir=run)
    assert led.ids.tolist() == [0, 1, 2, 3, 4]
    assert [(r["key"], r["epoch"]) for r in read_client_releases(run, 4)] == [
        ("round=0/step=0", 0),
        ("round=0/step=0", 1),
        ("round=0/step=1", 0),
    ]
    assert main(["account", "--run", str(run), "--client", "3", "--json", str(tmp_path / "c3.json")]) == 0
    out = capsys.readouterr().out
    assert "client 3: 5 release(s)" in out and "round=0/step=3" in out
    got = json.loads((tmp_path / "c3.json").read_text())["client"]
    assert [r["epoch"] for r in got["releases"]] == [0, 0, 0, 0, 1] and [r["session"] for r in got["releases"]] == [
        1,
        1,
        1,
        2,
        3,
    ]
    with pytest.raises(PrivacyError, match="not in this ledger"):
        led.client_records(9)
    assert main(["account", "--run", str(run)]) == 0
    assert "2 client(s) [0, 2]" in capsys.readouterr().out


def test_a_ledger_of_another_format_is_refused_clearly(tmp_path):
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "rank_00000.jsonl").write_text(
        json.dumps({"format": 3, "block": "x", "clients": [[0, 0]], "session": 1}) + "\n"
    )
    with pytest.raises(PrivacyError, match="format 3"):
        PrivacyLedger([0], run_dir=tmp_path)
    assert client_ranges([5, 1, 2, 3, 9]) == [[1, 3], [5, 5], [9, 9]]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_crash_on_one_rank_resumed_on_two_ranks_charges_the_replay(tmp_path):
    """A run crashed mid-round on 1 rank, resumed with mpiexec -n 2: every rank reads the one-rank ledger,
    the lost step (computed by another block of clients) is charged again under a fresh epoch: not
    refused, not free; every client's history is whole and epsilon within the target."""
    if not (BIN / "mpiexec").exists():
        pytest.skip("needs mpiexec (pip install mpich)")
    out = tmp_path / "run"
    tr = Trainer(tiny("privacy.noise_seed=8"), out, progress=False)
    tr.setup()
    tr.run_round(0)
    tr.state.round = 1
    tr.save_checkpoint()
    tr.cfg.train.local_steps = 1
    tr.run_round(1)  # round 1 step 0 released, then the "crash"
    tr.ledger.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MPI_", "HYDRA_", "SLURM_"))}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(
        [
            str(BIN / "mpiexec"),
            "-n",
            "2",
            str(BIN / "fedhypevae"),
            "train",
            "--resume",
            "--out",
            str(out),
            "--no-progress",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((out / "ledger").glob("rank_*.jsonl"))) == 2
    res = json.loads((out / "results.json").read_text())
    assert res["provenance"]["world_size"] == 2
    for cid in range(4):
        keys = [(e["key"], e["epoch"]) for e in read_client_releases(out, cid) if e["mechanism"] == DP_SGD]
        assert keys[:4] == [("round=0/step=0", 0), ("round=0/step=1", 0), ("round=1/step=0", 0), ("round=1/step=0", 1)]
        assert len(keys) == len(set(keys))
    assert res["privacy"]["epsilon_spent"] <= 2.0 + 1e-9 and res["training"]["stopped_early"]
    assert sum(res["privacy"]["replays"].values()) >= 1  # rank 0's count; rank 1 charged its own


def test_place_groups_keeps_groups_whole_and_balances_them():
    from fedhypevae.hpc.placement import place_groups

    groups = [[0, 3], [1], [2, 4, 5]]
    sizes = [10, 50, 10, 10, 10, 10]  # group weights 20, 50, 30
    assert place_groups(groups, sizes, 2) == [[1], [0, 2]]  # 50 | 30 + 20
    assert place_groups(groups, sizes, 3) == [[1], [2], [0]]
    assert place_groups(groups, sizes, 4) is None  # a group is never split


def test_a_crash_on_three_ranks_resumed_on_two_keeps_the_blocks_whole_and_replays_free(tmp_path):
    """Reproducible noise, 3 ranks, then a resume on 2 ranks from the round-2 checkpoint (the steps of round 2 and
    the class statistics were released after it: a crash). The resume keeps the three ranks' blocks of clients whole
    (one rank hosts two of them, each its own block), so each replayed release is computed as before: every group's
    digest matches its block's record and the replay is free. No client is charged twice, epsilon is the
    uninterrupted run's, and so is the hypernetwork, bit for bit. (Placed client by client instead, the blocks
    change, the replays are charged again and this run ends partial: no budget left for its statistics.)
    Second case: one rank died before charging its last two releases (its ledger lacks them; the others have them):
    on resume that rank's group releases them for the first time (charged once, under the same epoch and noise) and
    the others re-release theirs free."""
    if not (BIN / "mpiexec").exists():
        pytest.skip("needs mpiexec (pip install mpich)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MPI_", "HYDRA_", "SLURM_"))}
    env["OMP_NUM_THREADS"] = "1"

    def train(n: int, out: Path, *extra: str) -> None:
        cmd = [str(BIN / "mpiexec"), "-n", str(n), str(BIN / "fedhypevae"), "train", "--out", str(out), *extra]
        r = subprocess.run([*cmd, "--no-progress", "--quiet"], capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stderr[-3000:]

    full = tmp_path / "full"
    train(3, full, "--config", "tiny", "--set", "privacy.noise_seed=8")
    ref = json.loads((full / "results.json").read_text())
    assert ref["provenance"]["world_size"] == 3
    for case in ("every rank charged", "rank 2 charged two releases less"):
        out = tmp_path / case.replace(" ", "-")
        shutil.copytree(full, out)
        # the crash: after the round-2 checkpoint, the last round's steps and the statistics released, nothing saved
        shutil.rmtree(out / "checkpoints" / "round_000003")
        for name in ("results.json", "class_stats.pt", "meta_codes.pt", "generator.json", "hypernetwork.pt"):
            (out / name).unlink()
        if case != "every rank charged":
            ledger = out / "ledger" / "rank_00002.jsonl"
            kept = ledger.read_text().splitlines()[:-2]
            assert [json.loads(x)["key"] for x in ledger.read_text().splitlines()[-2:]] == ["round=2/step=1", "stats"]
            ledger.write_text("\n".join(kept) + "\n")
        train(2, out, "--resume")

        res = json.loads((out / "results.json").read_text())
        resumed = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()][-2]
        assert resumed["event"] == "resumed" and resumed["world_size"] == 2 and resumed["round"] == 2, resumed
        assert resumed["placement"] == "the previous session's 3 blocks kept whole"
        assert res["status"] == "complete", case
        assert res["privacy"]["replays"]["charged_again"] == 0 and res["privacy"]["replays"]["free"] >= 1, case
        assert res["privacy"]["epsilon_spent"] == ref["privacy"]["epsilon_spent"], case
        for cid in range(4):
            keys = [(e["mechanism"], e["key"], e["epoch"]) for e in read_client_releases(out, cid)]
            assert len(keys) == len(set(keys)) and all(e == 0 for _, _, e in keys), (case, keys)  # no double charge
            assert sorted(keys) == sorted(  # no gap
                (e["mechanism"], e["key"], e["epoch"]) for e in read_client_releases(full, cid)
            ), case
        a = torch.load(full / "hypernetwork.pt", weights_only=True)
        b = torch.load(out / "hypernetwork.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), case
