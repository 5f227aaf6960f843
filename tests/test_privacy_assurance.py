"""Resume never refunds epsilon (the ledger continues), and noise is secure unless a seed is asked for."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import fedhypevae.run as run_mod
from fedhypevae.cli import main
from fedhypevae.config import load_config
from fedhypevae.privacy import PrivacyLedger
from fedhypevae.privacy.ledger import read_client_releases
from fedhypevae.run import run_training
from fedhypevae.trainer import Trainer


def tiny(*overrides):
    return load_config("tiny", ["train.rounds=4", "train.checkpoint_every=1", *overrides])


def ledger(run: Path, cid: int = 0) -> list:
    return read_client_releases(run, cid)


def phi(run: Path) -> torch.Tensor:
    sd = torch.load(run / "hypernetwork.pt", weights_only=True)
    return torch.cat([v.reshape(-1).double() for v in sd.values()])


def stop_after(rounds: int):
    """A Trainer that receives SIGTERM while running round `rounds - 1` (the real signal path of
    run_training(catch_signals=True): finish the round, checkpoint together, return interrupted)."""

    class Stopped(Trainer):
        def run_round(self, r, start_step=0):
            out = super().run_round(r, start_step)
            if r == rounds - 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

    return Stopped


@pytest.mark.parametrize("noise_seed", [17, None], ids=["reproducible", "secure"])
def test_a_stopped_run_resumes_with_a_continuing_ledger(tmp_path, monkeypatch, noise_seed):
    extra = [f"privacy.noise_seed={noise_seed}"] if noise_seed is not None else []
    out = tmp_path / "cut"
    with monkeypatch.context() as mp:
        mp.setattr(run_mod, "Trainer", stop_after(2))
        cut = run_training(tiny(*extra), out, progress=False, catch_signals=True)
    assert cut["interrupted"] and cut["round"] == 2 and cut["signal"] == signal.SIGTERM
    before = ledger(out)
    assert sum(e["mechanism"] == "dp-sgd" for e in before) == 4  # 2 rounds x 2 steps charged
    eps_cut = PrivacyLedger(None, run_dir=out).epsilon(delta=1e-4, accountant="rdp")
    assert eps_cut == pytest.approx(cut["epsilon_spent"], rel=1e-12)

    res = run_training(tiny(*extra), out, resume=True, progress=False)
    after = ledger(out)
    assert after[: len(before)] == before  # a continuation: nothing reset, nothing rewritten
    keys = [e["key"] for e in after if e["mechanism"] == "dp-sgd"]
    assert keys == [f"round={r}/step={s}" for r in range(4) for s in range(2)]  # stopped at a round end: no replay
    assert res["privacy"]["epsilon_spent"] >= cut["epsilon_spent"]
    assert res["privacy"]["steps"] == 8
    if noise_seed is not None:  # the same as a run that was never interrupted
        full = run_training(tiny(*extra), tmp_path / "full", progress=False)
        assert ledger(tmp_path / "full") == after
        assert res["privacy"]["epsilon_spent"] == pytest.approx(full["privacy"]["epsilon_spent"], rel=1e-12)
        torch.testing.assert_close(phi(out), phi(tmp_path / "full"), rtol=1e-5, atol=1e-7)


def test_a_crash_mid_round_with_secure_noise_charges_the_rereleased_steps_again(tmp_path):
    cfg = tiny("train.rounds=2")
    out = tmp_path / "cut"
    tr = Trainer(cfg, out, progress=False)
    tr.setup()
    tr.run_round(0)
    tr.state.round = 1
    tr.save_checkpoint()
    cfg.train.local_steps = 1
    tr.run_round(1)  # round 1, step 0 released, then the "crash": never checkpointed
    before = ledger(out)
    eps_before = tr.epsilon_spent()
    res = run_training(tiny("train.rounds=2"), out, resume=True, progress=False)
    after = ledger(out)
    assert after[: len(before)] == before
    keys = [e["key"] for e in after if e["mechanism"] == "dp-sgd"]
    # the lost step is released again with fresh secure noise and paid for again; the guard then
    # stops one step early so the total stays within the plan
    assert keys == ["round=0/step=0", "round=0/step=1", "round=1/step=0", "round=1/step=0"]
    assert res["privacy"]["epsilon_spent"] >= eps_before and res["privacy"]["epsilon_spent"] <= 2.0 + 1e-9
    assert res["privacy"]["steps"] == 3 and res["training"]["stopped_early"]


def test_noise_is_secure_by_default_and_reproducible_only_when_asked(tmp_path, capsys):
    a = run_training(tiny("train.rounds=1"), tmp_path / "a", progress=False)
    run_training(tiny("train.rounds=1"), tmp_path / "b", progress=False)
    assert a["privacy"]["reproducible_noise"] is False and "secure" in a["privacy"]["noise"]
    assert not torch.allclose(phi(tmp_path / "a"), phi(tmp_path / "b"))  # same config and seed, fresh noise
    for name in ("c", "d"):
        assert (
            main(
                [
                    "train",
                    "--config",
                    "tiny",
                    "--set",
                    "train.rounds=1",
                    "--set",
                    "privacy.noise_seed=4",
                    "--out",
                    str(tmp_path / name),
                    "--no-progress",
                ]
            )
            == 0
        )
    out = capsys.readouterr().out
    assert "noise source : reproducible from privacy.noise_seed: NOT suitable for a real release" in out  # logged
    c = json.loads((tmp_path / "c" / "results.json").read_text())["privacy"]
    assert c["reproducible_noise"] is True and "NOT suitable" in c["noise"]
    assert torch.equal(phi(tmp_path / "c"), phi(tmp_path / "d"))
