"""A real process killed with SIGKILL at a random point resumes without losing work or refunding epsilon."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedhypevae.privacy.ledger import read_client_releases

BIN = Path(sys.executable).parent
ARGS = ["--config", "tiny", "--no-progress", "--quiet", "--set", "train.rounds=10", "--set", "train.checkpoint_every=2"]


def train(out, *extra, **kw):
    return subprocess.Popen(
        [str(BIN / "fedhypevae"), "train", "--out", str(out), *ARGS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def rounds_logged(out: Path) -> int:
    m = out / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.exists() else 0


def kill_at(out: Path, extra, at_round: int) -> None:
    p = train(out, *extra)
    deadline = time.time() + 120
    while rounds_logged(out) < at_round and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.random() * 0.3)  # somewhere inside the next round (or a checkpoint write)
    p.send_signal(signal.SIGKILL)
    p.wait(30)


def phi(out: Path) -> torch.Tensor:
    sd = torch.load(out / "hypernetwork.pt", weights_only=True)
    return torch.cat([v.reshape(-1).double() for v in sd.values()])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_then_resume_matches_uninterrupted_run_with_reproducible_noise(tmp_path):
    extra = ["--set", "privacy.noise_seed=21"]
    full = train(tmp_path / "full", *extra)
    assert full.wait(180) == 0, full.stderr.read()
    at = random.Random().randint(1, 8)
    print(f"killing after round {at}")
    kill_at(tmp_path / "cut", extra, at)
    r = train(tmp_path / "cut", "--resume", *extra)
    assert r.wait(180) == 0, r.stderr.read()
    torch.testing.assert_close(phi(tmp_path / "cut"), phi(tmp_path / "full"), rtol=1e-5, atol=1e-7)
    a = json.loads((tmp_path / "full" / "results.json").read_text())["privacy"]
    b = json.loads((tmp_path / "cut" / "results.json").read_text())["privacy"]
    assert b["epsilon_spent"] == pytest.approx(a["epsilon_spent"], rel=1e-9)
    assert b["steps"] == a["steps"] == 20


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_then_resume_with_secure_noise_never_refunds(tmp_path):
    kill_at(tmp_path / "cut", [], random.Random().randint(1, 6))
    before = read_client_releases(tmp_path / "cut", 0)
    r = train(tmp_path / "cut", "--resume")
    assert r.wait(180) == 0, r.stderr.read()
    after = read_client_releases(tmp_path / "cut", 0)
    assert after[: len(before)] == before  # the ledger only grows
    res = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert res["privacy"]["epsilon_spent"] <= 2.0 + 1e-9
    steps_charged = sum(1 for e in after if e.get("mechanism") == "dp-sgd")
    assert steps_charged == 20  # every planned step is paid for exactly once in the ledger ...
    assert res["privacy"]["steps"] <= 20  # ... and the ones lost in the crash are not run again for free


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_class_anchored_run_killed_and_resumed_releases_its_statistics_once(tmp_path):
    # model.class_anchor releases the class statistics before training: a resume reads them back
    # (OUT/class_stats.pt) and reaches the uninterrupted run's Phi and anchor, never charging them twice
    extra = ["--set", "privacy.noise_seed=21", "--set", "model.class_anchor=true"]
    full = train(tmp_path / "full", *extra)
    assert full.wait(180) == 0, full.stderr.read()
    kill_at(tmp_path / "cut", extra, random.Random().randint(1, 8))
    r = train(tmp_path / "cut", "--resume", *extra)
    assert r.wait(180) == 0, r.stderr.read()
    torch.testing.assert_close(phi(tmp_path / "cut"), phi(tmp_path / "full"), rtol=1e-5, atol=1e-7)
    anchor = torch.load(tmp_path / "cut" / "hypernetwork.pt", weights_only=True)["class_anchor"]
    assert float(anchor.abs().sum()) > 0  # the released means, not the zeros the model starts from
    for run in ("full", "cut"):
        releases = read_client_releases(tmp_path / run, 0)
        assert sum(1 for e in releases if e.get("mechanism") == "class-stats") == 1, run
    a = json.loads((tmp_path / "full" / "results.json").read_text())["privacy"]
    b = json.loads((tmp_path / "cut" / "results.json").read_text())["privacy"]
    assert b["epsilon_spent"] == pytest.approx(a["epsilon_spent"], rel=1e-9)
