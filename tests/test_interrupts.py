"""Ctrl-C and stop signals: the first one checkpoints every rank at the next step boundary (plain runs and
mpiexec), a second one aborts at once; a resume then continues without losing work, without charging a
release twice, and metrics.jsonl and TensorBoard continue without duplicated rounds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedhypevae import checkpoint as ckpt
from fedhypevae.config import load_config
from fedhypevae.metrics import read_events
from fedhypevae.privacy.ledger import read_client_releases
from fedhypevae.run import run_training
from fedhypevae.trainer import Trainer

BIN = Path(sys.executable).parent
ARGS = [
    "--config",
    "tiny",
    "--no-progress",
    "--quiet",
    "--set",
    "train.checkpoint_every=0",
    "--set",
    "privacy.noise_seed=3",
]


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MPI_", "HYDRA_", "SLURM_"))}
    e["OMP_NUM_THREADS"] = "1"
    return e


def start(out: Path, *extra, ranks: int = 0):
    cmd = [str(BIN / "fedhypevae"), "train", "--out", str(out), *ARGS, *extra]
    if ranks:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks), *cmd]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True
    )


def wait_rounds(p, out: Path, n: int, timeout: float = 120) -> None:
    t0 = time.time()
    m = out / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if m.exists() and len(m.read_text().splitlines()) >= n:
            return
        if p.poll() is not None:
            raise AssertionError(f"the run ended early ({p.returncode}): {p.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {n} rounds within {timeout} s")


def phi(out: Path) -> torch.Tensor:
    sd = torch.load(out / "hypernetwork.pt", weights_only=True)
    return torch.cat([v.reshape(-1).double() for v in sd.values()])


def dp_keys(out: Path, cid: int = 0) -> list:
    return [(e["key"], e["epoch"]) for e in read_client_releases(out, cid) if e["mechanism"] == "dp-sgd"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = subprocess.run(
        [str(BIN / "fedhypevae"), "train", "--out", str(out), *ARGS, "--set", "train.rounds=40"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("ranks", [0, 2], ids=["plain", "mpiexec2"])
def test_ctrl_c_checkpoints_at_a_step_boundary_and_the_resume_loses_nothing(tmp_path, reference, ranks):
    if ranks and not (BIN / "mpiexec").exists():
        pytest.skip("needs mpiexec (pip install mpich)")
    out = tmp_path / "run"
    p = start(out, "--set", "train.rounds=40", ranks=ranks)
    wait_rounds(p, out, 3)
    os.kill(p.pid, signal.SIGINT)  # the terminal's Ctrl-C (mpiexec forwards it to every rank)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert f"Continue with: fedhypevae train --resume --out {out}" in err  # the real directory, not "DIR"
    last = ckpt.latest_complete(out)
    r, s = ckpt.checkpoint_position(last)
    assert (r, s) > (0, 0), last  # a checkpoint written at the stop, not only the round-0 one
    ev = read_events(out)
    assert ev[-1]["event"] == "interrupted" and ev[-1]["signal"] == 2 and ev[-1]["checkpoint"] == str(last)
    keys = dp_keys(out)
    assert len(keys) == r * 2 + s  # every released step is checkpointed: nothing was lost
    cmd = [str(BIN / "fedhypevae"), "train", "--resume", "--out", str(out), "--no-progress", "--quiet"]
    if ranks:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks), *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((out / "results.json").read_text())
    assert got["status"] == "complete" and got["training"]["rounds"] == 40 and got["privacy"]["steps"] == 80
    assert got["privacy"]["replays"] == {"free": 0, "charged_again": 0}
    assert dp_keys(out) == [(f"round={i}/step={j}", 0) for i in range(40) for j in range(2)]
    want = json.loads((reference / "results.json").read_text())["privacy"]["epsilon_spent"]
    assert got["privacy"]["epsilon_spent"] == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(phi(out), phi(reference), rtol=1e-5, atol=1e-7)
    rows = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 41))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c-again", "then-sigterm"])
def test_a_second_ctrl_c_aborts_at_once_a_sigterm_after_it_does_not(tmp_path, second):
    """Ctrl-C pressed again aborts at once. SLURM's termination sequence (SIGCONT, SIGTERM, SIGKILL after
    KillWait) may follow a Ctrl-C: that TERM changes nothing, the run still checkpoints and exits 130."""
    out = tmp_path / "run"
    # many clients: a step and a checkpoint take long enough for the second signal to arrive first
    p = start(
        out,
        "--set",
        "train.rounds=50",
        "--set",
        "partition.clients=150",
        "--set",
        "partition.kind=iid",
        "--set",
        "partition.min_client_size=4",
    )
    wait_rounds(p, out, 1, timeout=200)
    os.kill(p.pid, signal.SIGINT)
    # the second signal once the first one's handler has run (two signals pending at once are handled once)
    head = []
    while not head or "received" not in head[-1]:
        line = p.stderr.readline()
        assert line, "".join(head)
        head.append(line)
    os.kill(p.pid, second)
    _, err = p.communicate(timeout=120)
    err = "".join(head) + err
    assert p.returncode == 130, err[-3000:]
    assert f"--resume --out {out}" in err and "Traceback" not in err, err[-3000:]
    if second == signal.SIGINT:
        assert "aborted by a second interrupt" in err
        assert ckpt.latest_complete(out) is not None  # the last complete checkpoint is still there to resume from
    else:
        assert "aborted" not in err and "stopped by signal 2" in err, err[-3000:]
        last = ckpt.latest_complete(out)  # train.checkpoint_every=0: besides round 0's, only the stop's
        assert ckpt.checkpoint_position(last) >= (1, 0)
        assert read_events(out)[-1]["event"] == "interrupted" and read_events(out)[-1]["checkpoint"] == str(last)


def test_a_stop_between_two_steps_checkpoints_there_in_delta_mode_too(tmp_path):
    """SIGTERM inside a round (delta aggregation: the clients' private copies of Phi are checkpointed too):
    the resume continues from that step and ends where an uninterrupted run ends."""
    base = [
        "train.rounds=3",
        "train.local_steps=3",
        "federation.aggregation=delta",
        "privacy.noise_seed=6",
        "train.checkpoint_every=0",
    ]
    full = run_training(load_config("tiny", base), tmp_path / "full", progress=False)

    class StopInside(Trainer):
        def _dp_step(self, r, s):
            if (r, s) == (1, 1) and self.stop_signal is None:
                os.kill(os.getpid(), signal.SIGTERM)
            return super()._dp_step(r, s)

    import fedhypevae.run as run_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "Trainer", StopInside)
        cut = run_training(load_config("tiny", base), tmp_path / "cut", progress=False, catch_signals=True)
    assert cut["interrupted"] and (cut["round"], cut["step"]) == (1, 1)
    assert Path(cut["checkpoint"]).name == "round_000001_step_00001"
    shard = torch.load(Path(cut["checkpoint"]) / "rank_00000.pt", weights_only=True)
    assert "delta_local_phi" in shard["extra"]["rule"][0]  # client 0's private copy of Phi, inside the round
    res = run_training(load_config("tiny", base), tmp_path / "cut", resume=True, progress=False)
    assert res["privacy"]["steps"] == full["privacy"]["steps"] == 9
    assert res["privacy"]["epsilon_spent"] == pytest.approx(full["privacy"]["epsilon_spent"], rel=1e-12)
    torch.testing.assert_close(phi(tmp_path / "cut"), phi(tmp_path / "full"), rtol=1e-5, atol=1e-7)
    assert dp_keys(tmp_path / "cut") == dp_keys(tmp_path / "full")


def test_metrics_and_tensorboard_continue_without_duplicates(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    base = ["train.rounds=6", "train.checkpoint_every=2", "privacy.noise_seed=1"]
    real = Trainer.run_round

    def crash_in_round_4(self, r, start_step=0):
        if r == 3:
            self.writer._tb.flush()  # what the crashed attempt had logged reaches the event file
            raise RuntimeError("killed")
        return real(self, r, start_step)

    monkeypatch.setattr(Trainer, "run_round", crash_in_round_4)
    with pytest.raises(RuntimeError):
        run_training(load_config("tiny", base), out, progress=False)
    rows = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]  # round 3 was logged after the last checkpoint (round 2)
    monkeypatch.setattr(Trainer, "run_round", real)
    res = run_training(load_config("tiny", base), out, resume=True, progress=False)
    rows = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]
    resumed = [e for e in read_events(out) if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["cut_rounds"] == [3] and resumed[0]["round"] == 2
    assert res["resume"]["cut_rounds"] == [3]
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("privacy/epsilon")]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # TensorBoard hides the crashed attempt's round 3 (purge_step)
