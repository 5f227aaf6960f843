"""End to end on one process: outputs, privacy accounting, the budget guard, resume, modes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import interrupt_after

from fedhypevae.config import load_config
from fedhypevae.errors import CheckpointError, ConfigError
from fedhypevae.model import HyperNetwork
from fedhypevae.privacy import PrivacyLedger
from fedhypevae.run import run_training
from fedhypevae.trainer import Trainer


def tiny(*overrides):
    return load_config("tiny", ["train.checkpoint_every=1", *overrides])


def phi(run: Path) -> torch.Tensor:
    sd = torch.load(run / "hypernetwork.pt", weights_only=True)
    return torch.cat([v.reshape(-1).double() for v in sd.values()])


def test_tiny_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    res = run_training(tiny(), out, progress=False)
    for name in ("config.yaml", "results.json", "metrics.jsonl", "hypernetwork.pt", "synthetic.npz", "meta_codes.pt"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert list((out / "checkpoints").glob("round_*/COMPLETE"))
    on_disk = json.loads((out / "results.json").read_text())
    p = on_disk["privacy"]
    assert p["mode"] == "strict" and p["formal_guarantee"] is True
    assert 0.95 * 2.0 <= p["epsilon_spent"] <= 2.0  # tiny.yaml: epsilon 2, the plan spends it
    assert p["steps"] == p["planned_steps"] == 6 and p["noise_multiplier"] > 0 and p["sample_rate"] == 0.2
    assert {m["mechanism"] for m in p["ledger"]} == {"dp-sgd", "class-stats", "mmd-embeddings"}
    assert p["reproducible_noise"] is False and "secure" in p["noise"] and "drawn as their sum" in p["noise"]
    prov = on_disk["provenance"]
    assert prov["backend"] == "local" and prov["world_size"] == 1 and len(prov["config_hash"]) == 16
    syn = np.load(out / "synthetic.npz")
    assert syn["x"].shape == (100, 64) and np.isfinite(syn["x"]).all()  # 10 classes x synth.samples_per_class=10
    assert sorted(np.unique(syn["y"])) == list(range(10)) and (np.bincount(syn["y"]) == 10).all()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and all("privacy/epsilon" in r for r in rows)
    eps = [r["privacy/epsilon"] for r in rows]
    assert eps == sorted(eps)  # epsilon only grows
    sd = torch.load(out / "hypernetwork.pt", weights_only=True)
    h = HyperNetwork(64, 10, latent_dim=4, code_dim=4, hidden=[32], hyper_hidden=16, label_embed_dim=4)
    h.load_state_dict(sd)  # the saved state dict is a real HyperNetwork's
    assert res["privacy"]["epsilon_spent"] == p["epsilon_spent"]


def test_sigma_zero_with_huge_clip_equals_non_private(tmp_path):
    common = ["privacy.noise_seed=7", "train.rounds=2"]
    run_training(tiny(*common, "privacy.enabled=false"), tmp_path / "np", progress=False)
    run_training(
        tiny(*common, "privacy.target_epsilon=.inf", "privacy.noise_multiplier=0.0", "privacy.clip_norm=1e9"),
        tmp_path / "dp0",
        progress=False,
    )
    a, b = phi(tmp_path / "np"), phi(tmp_path / "dp0")
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # and real noise really changes the result
    run_training(tiny(*common), tmp_path / "dp", progress=False)
    assert not torch.allclose(phi(tmp_path / "dp"), a, rtol=1e-3, atol=1e-4)


def test_budget_guard_stops_training_before_the_budget_is_exceeded(tmp_path):
    cfg = tiny()
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.setup()
    for i in range(3):  # three steps already spent elsewhere (e.g. re-released after a crash), by every client
        tr.ledger.charge("dp-sgd", tr.plan.sigma, cfg.privacy.sample_rate, f"earlier/{i}")
    tr.train()
    assert tr.state.stopped and "budget guard" in tr.state.stopped
    assert tr.state.steps == 6 - 3
    assert tr.epsilon_spent() <= cfg.privacy.target_epsilon + 1e-9


def test_resume_with_reproducible_noise_matches_an_uninterrupted_run(tmp_path):
    cfg = tiny("privacy.noise_seed=11")
    full = run_training(cfg, tmp_path / "full", progress=False)
    interrupt_after(tiny("privacy.noise_seed=11"), tmp_path / "cut", rounds=1, extra_steps=1)
    resumed = run_training(tiny("privacy.noise_seed=11"), tmp_path / "cut", resume=True, progress=False)
    torch.testing.assert_close(phi(tmp_path / "cut"), phi(tmp_path / "full"), rtol=1e-5, atol=1e-7)
    assert resumed["privacy"]["epsilon_spent"] == pytest.approx(full["privacy"]["epsilon_spent"], rel=1e-9)
    assert resumed["privacy"]["steps"] == 6


def test_resume_with_secure_noise_keeps_the_replayed_steps_charged(tmp_path):
    out = tmp_path / "cut"
    interrupt_after(tiny(), out, rounds=1, extra_steps=1)  # step (round 1, step 0) released, not checkpointed
    res = run_training(tiny(), out, resume=True, progress=False)
    led = PrivacyLedger(None, run_dir=out)
    assert led.steps() == 6  # the plan's 6 steps are all charged ...
    assert res["privacy"]["steps"] == 5  # ... but only 5 reached Phi: the lost one is not refunded
    assert res["training"]["stopped_early"]
    assert res["privacy"]["epsilon_spent"] <= 2.0 + 1e-9


def test_resume_refuses_changed_privacy_settings(tmp_path):
    interrupt_after(tiny(), tmp_path / "run", rounds=1)
    with pytest.raises(CheckpointError, match="privacy.target_epsilon"):
        run_training(tiny("privacy.target_epsilon=4"), tmp_path / "run", resume=True, progress=False)
    assert load_config(str(tmp_path / "run" / "config.yaml")).privacy.target_epsilon == 2.0  # left as it was


def test_resume_without_config_uses_the_runs_own(tmp_path, capsys):
    from fedhypevae.cli import main

    interrupt_after(tiny("train.rounds=2"), tmp_path / "run", rounds=1)
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--no-progress", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["training"]["rounds"] == 2


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    run_training(tiny("train.rounds=1"), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        run_training(tiny("train.rounds=1"), tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    "overrides",
    [
        ["federation.aggregation=delta"],
        ["privacy.mode=paper"],
        ["meta.codes=2", "stats.covariance=full", "synth.class_balance=proportional"],
        ["model.mmd_kind=literal", "privacy.mmd_epsilon_fraction=0.0", "federation.weights=uniform"],
        ["privacy.accountant=prv", "train.optimizer=sgd"],
    ],
)
def test_variants_run_and_report(tmp_path, overrides):
    res = run_training(tiny("train.rounds=2", *overrides), tmp_path / "run", progress=False)
    p = res["privacy"]
    assert p["epsilon_spent"] <= 2.0 + 1e-9
    if "privacy.mode=paper" in overrides:
        assert p["formal_guarantee"] is False and "NOT a formal guarantee" in p["guarantee"]
    assert np.isfinite(np.load(tmp_path / "run" / "synthetic.npz")["x"]).all()


def test_training_reads_a_shard_directory(tmp_path):
    from fedhypevae.cli import main

    assert (
        main(
            [
                "data",
                "partition",
                "digits",
                "--clients",
                "4",
                "--alpha",
                "0.5",
                "--min-client-size",
                "20",
                "--out",
                str(tmp_path / "shards"),
            ]
        )
        == 0
    )
    res = run_training(tiny("train.rounds=1", f"data.path={tmp_path / 'shards'}"), tmp_path / "run", progress=False)
    assert res["data"]["clients"] == 4


def test_resuming_a_finished_run_releases_nothing_more(tmp_path):
    res = run_training(tiny("train.rounds=1"), tmp_path / "run", progress=False)
    ledger = (tmp_path / "run" / "ledger" / "rank_00000.jsonl").read_text()
    again = run_training(tiny("train.rounds=1"), tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "ledger" / "rank_00000.jsonl").read_text() == ledger
    assert again["privacy"]["epsilon_spent"] == res["privacy"]["epsilon_spent"]


class _TwoRankView:
    """Stands in for a 2-rank communicator whose other rank holds a different Phi (perturb > 0)."""

    world_size, rank, backend, is_root = 2, 0, "fake", True

    def __init__(self, perturb: float):
        self.perturb = perturb

    def allreduce(self, buf, op="sum"):
        if op == "max":
            buf += self.perturb  # what the maximum over a diverged replica would look like
        return buf


def test_replica_checksum_detects_divergence(tmp_path):
    from fedhypevae.trainer import ReplicaDivergence

    tr = Trainer(tiny("train.rounds=1"), tmp_path / "run", progress=False)
    tr.setup()
    tr.comm = _TwoRankView(0.0)
    tr.check_replicas()  # identical replicas pass
    tr.comm = _TwoRankView(1e-3)
    with pytest.raises(ReplicaDivergence, match="diverged"):
        tr.check_replicas()


def test_resume_after_a_crash_late_in_training_replays_without_stopping(tmp_path):
    """Reproducible noise, crash after every planned step was charged but before the last checkpoint:
    the replayed steps are already in the ledger, cost nothing, and must not trip the budget guard."""
    cfg = tiny("privacy.noise_seed=13")
    full = run_training(tiny("privacy.noise_seed=13"), tmp_path / "full", progress=False)
    tr = Trainer(cfg, tmp_path / "cut", progress=False)
    tr.setup()
    for r in range(3):
        tr.run_round(r)
        tr.state.round = r + 1
        if r < 2:
            tr.save_checkpoint()  # round 3 ran (all 6 steps charged) but was never checkpointed
    res = run_training(tiny("privacy.noise_seed=13"), tmp_path / "cut", resume=True, progress=False)
    assert res["training"]["stopped_early"] is None and res["privacy"]["steps"] == 6
    torch.testing.assert_close(phi(tmp_path / "cut"), phi(tmp_path / "full"), rtol=1e-5, atol=1e-7)
    assert res["privacy"]["epsilon_spent"] == pytest.approx(full["privacy"]["epsilon_spent"], rel=1e-9)


@pytest.mark.parametrize("diagnostics", [True, False])
def test_train_time_phases_puts_each_rounds_phase_times_in_the_metrics_only_with_the_diagnostics(tmp_path, diagnostics):
    """train.time_phases: every round's metrics carry time/phase/NAME(s) for the step's phases and the trainer's,
    adding up to no more than the round; without privacy.diagnostics no timing leaves the rank at all."""
    cfg = load_config(
        "tiny", ["train.rounds=2", "train.time_phases=true", f"privacy.diagnostics={str(diagnostics).lower()}"]
    )
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.setup()
    m = tr.run_round(0)
    phases = {k: v for k, v in m.items() if k.startswith("time/phase/")}
    if not diagnostics:
        assert not phases and "time/round(s)" not in m
        return
    want = {"sample", "forward", "backward", "norms", "clip", "noise", "post", "optimizer", "ledger", "phi_update"}
    assert want <= {k[len("time/phase/") : -len("(s)")] for k in phases}
    assert all(v >= 0 for v in phases.values())
    assert 0 < sum(phases.values()) <= m["time/round(s)"]
    off = Trainer(load_config("tiny", ["train.rounds=1"]), tmp_path / "off", progress=False)
    off.setup()
    assert not any(k.startswith("time/phase/") for k in off.run_round(0))
