"""privacy.secure_aggregation end to end: the distributed trust model made real (docs/PRIVACY.md section 11).

A run on one process and under `mpiexec -n 3` and `torchrun` (gloo): it completes, says what it protects, charges
the integer mechanism (the ledger's records carry it; epsilon stays within the target, calibrated with the Skellam
curve, which needs more noise than the Gaussian's); a resumed run replays an identical step for free (new keys,
same sum); bad settings are refused with one line. The noise the aggregate carries on the integer path is measured
by tests/test_trust_models.py (scenarios *-secure), the collectives' exactness by tests/test_secagg.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, interrupt_after, launcher_free_env, run_job

from fedhypevae.config import load_config
from fedhypevae.errors import ConfigError
from fedhypevae.privacy.accounting import DP_SGD
from fedhypevae.privacy.ledger import read_client_releases
from fedhypevae.run import run_training
from fedhypevae.trainer import make_plan

BIN = Path(sys.executable).parent
MPIEXEC, TORCHRUN = BIN / "mpiexec", BIN / "torchrun"
SECURE = [
    "privacy.trust_model=distributed",
    "privacy.secure_aggregation=true",
    "partition.clients=7",
    "partition.min_client_size=10",
    "privacy.noise_seed=3",
    "threads=1",
]


def tiny(*overrides):
    return load_config("tiny", ["train.checkpoint_every=1", *SECURE, *overrides])


def check_results(out: Path, ranks: int) -> dict:
    res = json.loads((out / "results.json").read_text())
    p = res["privacy"]
    tm = p["trust_model"]
    assert tm["name"] == "distributed" and tm["simulated"] is False
    sa = tm["secure_aggregation"]
    assert sa["bits"] == 64 and sa["ranks"] == ranks and sa["l2_sensitivity"] > sa["A"] > 0
    assert (sa["key_agreement"] is not None) == (ranks > 1)
    assert 0 <= sa["overflow_probability_bound"] <= 1e-6 * p["delta"]
    assert "secure aggregation" in p["guarantee"] and "SIMULATED" not in p["guarantee"]
    assert p["epsilon_spent"] <= p["target_epsilon"] * (1 + 1e-9)
    ledger = [json.loads(line) for f in sorted((out / "ledger").glob("rank_*.jsonl")) for line in f.open()]
    records = [r for r in ledger if "mechanism" in r]
    assert {r["mechanism"] for r in records if "integer" in r} == {DP_SGD, "class-stats"}
    assert all("integer" in r for r in records if r["mechanism"] in (DP_SGD, "class-stats"))
    assert not res.get("missing"), res.get("missing")
    return res


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_secure_run_on_one_process_completes_and_charges_the_integer_mechanism(tmp_path):
    cfg = tiny()
    res = run_training(cfg, tmp_path / "run", progress=False)
    check_results(tmp_path / "run", 1)
    plan = res["privacy"]["plan"]
    gaussian = make_plan(cfg, use_mmd=cfg.model.lambda_mmd > 0 and cfg.model.mmd_kind == "merf")
    # the rounding's sqrt(d) and the Skellam's extra term: a little more noise than the Gaussian for the same target
    assert gaussian.sigma <= plan["sigma"] <= 1.01 * gaussian.sigma
    assert any(m.get("integer") for m in plan["mechanisms"])
    phi = torch.load(tmp_path / "run" / "hypernetwork.pt", weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in phi.values())


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not MPIEXEC.is_file(), reason="needs mpiexec in the venv (pip install mpich)")
def test_a_secure_run_on_three_mpi_ranks(tmp_path):
    args = [a for s in SECURE for a in ("--set", s)]
    cmd = [MPIEXEC, "-n", 3, BIN / "fedhypevae", "train", "--config", "tiny", "--out", tmp_path / "run"]
    rc, out, err = run_job([*cmd, "--no-progress", "--quiet", *args], 240, launcher_free_env(BIN))
    assert rc == 0, f"{out}\n{err}"
    check_results(tmp_path / "run", 3)


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not TORCHRUN.is_file(), reason="needs torchrun in the venv")
def test_a_secure_run_under_torchrun_gloo(tmp_path):
    args = [a for s in SECURE for a in ("--set", s)]
    cmd = [TORCHRUN, "--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", free_port()]
    cmd += [BIN / "fedhypevae", "train", "--config", "tiny", "--out", tmp_path / "run", "--no-progress", "--quiet"]
    rc, out, err = run_job([*cmd, *args], 240, launcher_free_env(BIN))
    assert rc == 0, f"{out}\n{err}"
    res = check_results(tmp_path / "run", 2)
    assert res["provenance"]["backend"] == "torch-gloo"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_identical_replay_after_a_crash_is_free_under_new_keys(tmp_path):
    """A crash one step after the last checkpoint: the replayed step's pre-noise payload and its keyed Skellam share
    are the same, so the release is identical and costs nothing (on one process nothing is masked; under several
    ranks the resumed processes agree on new keys, which changes what each rank sends but not the sum)."""
    interrupt_after(tiny(), tmp_path / "run", rounds=1, extra_steps=1)
    before = read_client_releases(tmp_path / "run", 0)
    res = run_training(tiny(), tmp_path / "run", resume=True, progress=False)
    assert res["privacy"]["replays"] == {"free": 1, "charged_again": 0}
    after = read_client_releases(tmp_path / "run", 0)
    assert after[: len(before)] == before
    assert [e["key"] for e in after].count("round=1/step=0") == 1
    check_results(tmp_path / "run", 1)


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(not MPIEXEC.is_file(), reason="needs mpiexec in the venv (pip install mpich)")
def test_party_rank_resume_on_another_placement_is_refused(tmp_path):
    """With party=rank the ranks are the parties: a resume on 3 ranks of a 2-rank run would move clients' private
    state to another party; it is refused with one line, and the resume on 2 ranks finishes the run."""
    import os
    import signal
    import time

    sets = [*SECURE, "privacy.party=rank", "train.rounds=8", "train.checkpoint_every=1"]
    args = [a for s in sets for a in ("--set", s)]
    out = tmp_path / "run"
    cmd = [MPIEXEC, "-n", "2", BIN / "fedhypevae", "train", "--config", "tiny", "--out", out, "--no-progress"]
    env = launcher_free_env(BIN)
    p = subprocess.Popen(
        [str(c) for c in [*cmd, "--quiet", *args]],
        env=env,
        start_new_session=True,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while p.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            os.kill(p.pid, signal.SIGTERM)  # mpiexec forwards it: the ranks checkpoint at the next step and stop
            break
        time.sleep(0.05)
    p.communicate(timeout=120)
    assert list((out / "checkpoints").glob("round_*")), "no checkpoint was written before the stop"
    more = [MPIEXEC, "-n", 3, BIN / "fedhypevae", "train", "--config", "tiny", "--out", out, "--resume"]
    rc, so, se = run_job([*more, "--no-progress", "--quiet", *args], 240, env)
    assert rc != 0 and "Traceback" not in se, f"{so}\n{se}"
    assert "privacy.party=rank with privacy.secure_aggregation" in se and "another party" in se, se
    same = [MPIEXEC, "-n", 2, BIN / "fedhypevae", "train", "--config", "tiny", "--out", out, "--resume"]
    rc, so, se = run_job([*same, "--no-progress", "--quiet", *args], 240, env)
    assert rc == 0, f"{so}\n{se}"
    check_results(out, 2)


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["privacy.trust_model=local"], ["privacy.secure_aggregation", "privacy.trust_model=distributed"]),
        (["privacy.accountant=prv"], ["privacy.secure_aggregation", "privacy.accountant=rdp"]),
        (["privacy.secure_bits=4"], ["privacy.secure_bits", "[8, 64]"]),
        (["privacy.secure_grid_ratio=0"], ["privacy.secure_grid_ratio", "positive"]),
    ],
    ids=["trust-local", "prv", "bits", "grid"],
)
def test_bad_secure_settings_are_refused(overrides, needles):
    with pytest.raises(ConfigError) as e:
        tiny(*overrides)
    for n in needles:
        assert n in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["privacy.trust_model=central"], ["privacy.secure_aggregation"]),
        # at 16 bits the noise alone could wrap the sum: refused at setup, naming the bits it needs
        (["privacy.secure_bits=16"], ["privacy.secure_bits=16", "could wrap around", "use at least"]),
    ],
    ids=["central", "bits-too-small"],
)
def test_a_refusal_on_the_command_line_is_one_line(tmp_path, extra, needles):
    args = [a for s in SECURE + extra for a in ("--set", s)]
    r = subprocess.run(
        [BIN / "fedhypevae", "train", "--config", "tiny", "--out", tmp_path / "run", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), r.stderr
    assert not (tmp_path / "run" / "ledger").exists() or not any((tmp_path / "run" / "ledger").iterdir())
