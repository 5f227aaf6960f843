"""The privacy review's defects, each with the test that would have caught it, and the resume rules.

1. the declared size is the only size any DP computation uses (federation.declared_sizes reaches the
   normalizer; pow2 rounding);
2. a replay is free only if bit-identical: otherwise charged under a fresh noise key; settings that
   cannot change mid-run are refused, those that can are applied and reported;
3. every release, the one-shot MMD embeddings included, goes through the budget guard;
4. no noise means no guarantee, said plainly; every JSON output is strict;
5. shared outputs hold nothing outside the guarantee when privacy.diagnostics is false;
and: different methods never share noise streams; a failed run says what it spent and how to go on.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fedhypevae.hpc import LocalCommunicator
from helpers import interrupt_after

import fedhypevae.run as run_mod
from fedhypevae.cli import main
from fedhypevae.config import load_config
from fedhypevae.errors import CheckpointError, FedHypeVAEError, PrivacyError
from fedhypevae.privacy import PrivacyLedger, epsilon_of
from fedhypevae.privacy.ledger import read_client_releases
from fedhypevae.rng import STREAM_STEP, ClientRNG
from fedhypevae.run import run_training
from fedhypevae.trainer import Trainer


class Recorder(LocalCommunicator):
    """A LocalCommunicator that keeps a copy of every all-reduced buffer."""

    def __init__(self):
        self.calls = []

    def allreduce(self, buf, op="sum"):
        self.calls.append((op, buf.detach().clone()))
        return super().allreduce(buf, op)


def tiny(*overrides):
    return load_config("tiny", ["train.checkpoint_every=1", *overrides])


def strict_load(path: Path):
    """json.loads that rejects Infinity/NaN (what most JSON parsers do)."""

    def bad(token):
        raise ValueError(f"{path}: non-standard JSON token {token}")

    return json.loads(Path(path).read_text(), parse_constant=bad)


def grad_buffers(comm: Recorder, phi_numel: int) -> list:
    """The per-step gradient all-reduces (the only sums of length > the guard's 2 bits that carry Phi)."""
    return [b for op, b in comm.calls if op == "sum" and b.numel() > phi_numel]


# ------------------------------------------------------------------------------- 1. declared sizes
@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_declared_sizes_are_the_dp_normalizer(tmp_path, engine):
    """One client whose true size is 1438-ish: with federation.declared_sizes=[1000] and [2000] the released
    gradient buffers must differ by exactly 2x (normalizer q * declared); with the true size in the
    normalizer (the defect) they would be equal."""
    bufs = {}
    for declared in (1000, 2000):
        comm = Recorder()
        cfg = tiny(
            "partition.clients=1",
            "partition.kind=iid",
            f"federation.declared_sizes=[{declared}]",
            "model.lambda_mmd=0",
            "privacy.noise_seed=3",
            "train.rounds=1",
            f"train.engine={engine}",
        )
        tr = Trainer(cfg, tmp_path / f"d{declared}", comm, progress=False)
        tr.setup()
        true_size = len(tr.clients[0].y)
        assert true_size not in (1000, 2000)
        assert tr.clients[0].declared_size == declared
        assert tr.engine == engine
        assert [st.block.expected.tolist() for st in tr.steps] == [[cfg.privacy.sample_rate * declared]]
        tr.train()
        bufs[declared] = grad_buffers(comm, tr.phi_numel)
    P = tr.phi_numel
    assert len(bufs[1000]) == len(bufs[2000]) == 2
    # the first step: the same coins, clipped sums and noise; only the public normalizer differs
    torch.testing.assert_close(bufs[1000][0][:P], 2.0 * bufs[2000][0][:P], rtol=1e-6, atol=0)


def test_declared_sizes_rounded_to_powers_of_two(tmp_path):
    res = run_training(
        tiny("train.rounds=1", "federation.declared_size_rounding=pow2", "model.lambda_mmd=0"),
        tmp_path / "run",
        progress=False,
    )
    sizes = res["data"]["declared_sizes"]
    assert all(s & (s - 1) == 0 for s in sizes), sizes  # powers of two
    assert "powers of two" in res["privacy"]["declared_sizes"]
    tr = Trainer(tiny("train.rounds=1", "federation.declared_size_rounding=pow2"), tmp_path / "t", progress=False)
    tr.setup()
    for c in tr.clients:
        true = len(c.y)
        assert c.declared_size == sizes[c.id] and abs(math.log2(c.declared_size) - math.log2(true)) <= 0.5 + 1e-9
    assert [st.block.expected.tolist() for st in tr.steps] == [[0.2 * s for s in sizes]]


# ------------------------------------------------------------------------------- 2. replays
def test_identical_replay_is_free_and_bit_identical(tmp_path):
    """Reproducible noise, a crash one step after the last checkpoint: the resumed step computes the same
    pre-noise payload (same digest), re-releases exactly the same buffer and costs nothing."""
    cut = Recorder()
    tr = interrupt_after(tiny("privacy.noise_seed=11"), tmp_path / "cut", rounds=1, extra_steps=1, comm=cut)
    before = read_client_releases(tmp_path / "cut", 0)
    again = Recorder()
    res = run_training(tiny("privacy.noise_seed=11"), tmp_path / "cut", again, resume=True, progress=False)
    assert res["privacy"]["replays"] == {"free": 1, "charged_again": 0}
    after = read_client_releases(tmp_path / "cut", 0)
    assert after[: len(before)] == before and [e["key"] for e in after].count("round=1/step=0") == 1
    old, new = grad_buffers(cut, tr.phi_numel)[-1], grad_buffers(again, tr.phi_numel)[0]
    assert torch.equal(old, new)  # the same released value, bit for bit


@pytest.mark.parametrize("key,value", [("train.encoder_lr", 0.05), ("train.code_lr", 0.2)])
def test_a_changed_learning_rate_is_applied_and_the_different_replay_is_charged_under_fresh_noise(tmp_path, key, value):
    cut = Recorder()
    tr = interrupt_after(tiny("privacy.noise_seed=11"), tmp_path / "cut", rounds=1, extra_steps=2, comm=cut)
    again = Recorder()
    res = run_training(
        tiny("privacy.noise_seed=11", f"{key}={value}"), tmp_path / "cut", again, resume=True, progress=False
    )
    assert res["resume"]["changed"] == {key: [tiny().to_dict()["train"][key.split(".")[1]], value]}
    # step 0 after the checkpoint precedes any update with the new rate: identical, free. Step 1 follows
    # one: a different payload, so charged again under a fresh epoch, never released under the old noise
    assert res["privacy"]["replays"] == {"free": 1, "charged_again": 1}
    recs = [e for e in read_client_releases(tmp_path / "cut", 0) if e["key"] == "round=1/step=1"]
    assert [e["epoch"] for e in recs] == [0, 1]
    old, new = grad_buffers(cut, tr.phi_numel)[-1], grad_buffers(again, tr.phi_numel)[1]
    assert not torch.allclose(old, new)
    # fresh noise: the two releases of round=1/step=1 do not share their noise
    g0 = ClientRNG(0, 11).generator(STREAM_STEP, 1, 1, 0)
    g1 = ClientRNG(0, 11).generator(STREAM_STEP, 1, 1, 1)
    assert not torch.equal(torch.randn(100, generator=g0), torch.randn(100, generator=g1))
    # the changed rate really is in the clients' optimizers, and the run stayed within its budget
    assert res["privacy"]["epsilon_spent"] <= 2.0 + 1e-9 and res["training"]["stopped_early"]


def test_a_changed_local_lr_in_delta_mode_is_charged_not_replayed_free(tmp_path):
    """The review's case: train.local_lr changed between a crash and the resume in delta aggregation."""
    base = ["privacy.noise_seed=4", "federation.aggregation=delta"]
    interrupt_after(tiny(*base), tmp_path / "cut", rounds=1, extra_steps=2)
    res = run_training(tiny(*base, "train.local_lr=0.5"), tmp_path / "cut", resume=True, progress=False)
    assert res["privacy"]["replays"]["charged_again"] >= 1
    keys = [(e["key"], e["epoch"]) for e in read_client_releases(tmp_path / "cut", 0)]
    assert len(keys) == len(set(keys))  # no (key, epoch) released twice
    assert ("round=1/step=1", 1) in keys


def test_locked_settings_are_refused_with_their_values(tmp_path):
    interrupt_after(tiny("privacy.noise_seed=11"), tmp_path / "run", rounds=1, extra_steps=1)
    before = (tmp_path / "run" / "ledger" / "rank_00000.jsonl").read_bytes()
    for override, name in [
        ("stats.covariance=full", "stats.covariance"),
        ("privacy.target_epsilon=4", "privacy.target_epsilon"),
        ("model.hidden=[16]", "model.hidden"),
        ("federation.declared_sizes=[50,50,50,50]", "federation.declared_sizes"),
    ]:
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as exc:
            run_training(tiny("privacy.noise_seed=11", override), tmp_path / "run", resume=True, progress=False)
        assert "->" in str(exc.value)
    assert (tmp_path / "run" / "ledger" / "rank_00000.jsonl").read_bytes() == before  # nothing charged


def test_a_run_saved_before_a_key_existed_resumes_with_that_keys_default(tmp_path):
    """A config.yaml written before a setting existed (here model.hyper_layers and model.activation, whose
    defaults are the model it was trained with) resumes; a locked setting that really differs is still refused."""
    import yaml

    out = tmp_path / "run"
    interrupt_after(tiny("train.rounds=2", "model.lambda_mmd=0"), out, rounds=1)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["model"]["hyper_layers"], saved["model"]["activation"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(CheckpointError, match=r"model.activation \('silu' -> 'tanh'\)"):
        Trainer(
            tiny("train.rounds=2", "model.lambda_mmd=0", "model.activation=tanh"), out, resume=True, progress=False
        ).setup()
    res = run_training(tiny("train.rounds=2", "model.lambda_mmd=0"), out, resume=True, progress=False)
    assert res["status"] == "complete" and res["training"]["rounds"] == 2 and res["resume"]["changed"] == {}


def test_a_changed_optimizer_is_applied_not_a_crash(tmp_path, capsys):
    interrupt_after(tiny(), tmp_path / "run", rounds=1)
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                "--set",
                "train.checkpoint_every=1",
                "--set",
                "train.optimizer=sgd",
                "--set",
                "train.lr=0.05",
                "--resume",
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "changed      : train.optimizer 'adam' -> 'sgd' (applied from the resume on)" in out
    assert "changed      : train.lr 0.001 -> 0.05" in out
    ev = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert ev[-2]["event"] == "resumed" and ev[-2]["changed"]["train.optimizer"] == ["adam", "sgd"]


# ------------------------------------------------------------------------------- 3. the MMD release
def test_the_mmd_release_goes_through_the_budget_guard(tmp_path, monkeypatch):
    """A crash after the MMD embeddings' release but before the round-0 checkpoint, four times, with secure
    noise: each re-release is charged and checked; epsilon never exceeds the target (it reached 2.224 of
    2.0 before), and once no re-release fits the run says so instead of spending more."""
    cfg = ["privacy.mmd_epsilon_fraction=0.5", "train.rounds=2"]  # 3 releases fit in epsilon 2, not 4
    out = tmp_path / "run"

    def crash(self):
        raise RuntimeError("killed before the first checkpoint")

    monkeypatch.setattr(Trainer, "save_checkpoint", crash)
    with pytest.raises(RuntimeError):
        run_training(tiny(*cfg), out, progress=False)
    refused = None
    for attempt in range(5):
        try:
            run_training(tiny(*cfg), out, resume=True, progress=False)
        except RuntimeError:
            pass
        except PrivacyError as exc:
            refused = str(exc)
            break
        led = PrivacyLedger(None, run_dir=out)
        assert led.epsilon(delta=1e-4, accountant="rdp") <= 2.0 + 1e-9, attempt
    assert refused is not None and "cannot be released again within the budget" in refused
    assert "another --out" in refused
    led = PrivacyLedger(None, run_dir=out)
    mmd = [r for r in led.records if r.mechanism == "mmd-embeddings"]
    assert len(mmd) >= 2 and [r.epoch for r in mmd] == list(range(len(mmd)))
    assert led.epsilon(delta=1e-4, accountant="rdp") <= 2.0 + 1e-9


def test_an_identical_mmd_replay_is_free(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = Trainer.save_checkpoint
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        run_training(tiny("privacy.noise_seed=2", "train.rounds=1"), out, progress=False)
    monkeypatch.setattr(Trainer, "save_checkpoint", real)
    res = run_training(tiny("privacy.noise_seed=2", "train.rounds=1"), out, resume=True, progress=False)
    assert res["privacy"]["replays"]["free"] == 1
    assert [e["mechanism"] for e in read_client_releases(out, 0)].count("mmd-embeddings") == 1


# ------------------------------------------------------------------------------- 4. no noise, strict JSON
def test_no_noise_is_no_guarantee_and_results_are_strict_json(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                "--set",
                "train.rounds=1",
                "--set",
                "privacy.target_epsilon=.inf",
                "--out",
                str(tmp_path / "zero"),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "formal guarantee" not in out.replace("NO formal guarantee", "")
    assert "NO formal guarantee: none: no noise is added" in out
    res = strict_load(tmp_path / "zero" / "results.json")  # no Infinity token
    p = res["privacy"]
    assert p["formal_guarantee"] is False and p["guarantee"].startswith("none: no noise")
    assert p["epsilon_spent"] is None and p["target_epsilon"] is None
    for line in (tmp_path / "zero" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda t: (_ for _ in ()).throw(ValueError(t)))
    js = tmp_path / "acc.json"
    assert main(["account", "--run", str(tmp_path / "zero"), "--json", str(js)]) == 0
    strict_load(js)


def test_a_fixed_noise_with_infinite_target_reports_its_finite_epsilon(tmp_path):
    res = run_training(
        tiny("train.rounds=1", "privacy.target_epsilon=.inf", "privacy.noise_multiplier=2.0"),
        tmp_path / "run",
        progress=False,
    )
    p = strict_load(tmp_path / "run" / "results.json")["privacy"]
    mechs = [m for m in res["privacy"]["plan"]["mechanisms"]]
    assert all(m["noise_multiplier"] == 2.0 for m in mechs)
    assert math.isfinite(p["epsilon_spent"]) and p["epsilon_spent"] > 0
    want = epsilon_of(PrivacyLedger(None, run_dir=tmp_path / "run").histories()[0][1], delta=1e-4, accountant="rdp")
    assert p["epsilon_spent"] == pytest.approx(want, rel=1e-12)
    assert (
        p["formal_guarantee"] is True and "infinite: the epsilon below is what the fixed noise gives" in p["guarantee"]
    )


# ------------------------------------------------------------------------------- 5. shared outputs
@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_shared_outputs_hold_nothing_outside_the_guarantee_without_diagnostics(tmp_path, engine):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    res = run_training(
        tiny("train.rounds=2", "privacy.diagnostics=false", f"train.engine={engine}"), out, progress=False
    )
    allowed_metrics = {"round", "privacy/epsilon", "train/steps"}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == allowed_metrics
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == allowed_metrics - {"round"}
    for ck in (out / "checkpoints").glob("round_*"):
        shared = torch.load(ck / "shared.pt", weights_only=False)
        assert set(shared) == {"hyper", "opt", "optimizer", "round", "step", "steps", "stopped", "config", "plan"}
    text = (out / "results.json").read_text()
    assert "diagnostics/" not in text and "wall_time_s" not in text and "batch_size" not in text
    assert res["training"]["final"] == {}
    # with diagnostics on they are there, labelled, and still not in shared.pt
    out2 = tmp_path / "diag"
    run_training(tiny("train.rounds=1", f"train.engine={engine}"), out2, progress=False)
    assert "diagnostics/batch_size" in (out2 / "metrics.jsonl").read_text()
    shared = torch.load(next((out2 / "checkpoints").glob("round_*")) / "shared.pt", weights_only=False)
    assert "history" not in shared


# ------------------------------------------------------------------------------- streams, failures
def test_methods_never_share_noise_streams():
    """The same noise_seed, client and key in FedHypeVAE and in the DP baselines: different draws."""
    draws = {}
    for method in ("fedhypevae", "fedavg", "fedprox", "dpcvae"):
        g = ClientRNG(0, 7, method=method).generator(STREAM_STEP, 0, 0)
        draws[method] = torch.randn(64, generator=g)
    names = list(draws)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not torch.equal(draws[names[i]], draws[names[j]]), (names[i], names[j])
    with pytest.raises(ValueError, match="namespace"):
        ClientRNG(0, 7, method="unknown")


def test_a_baseline_and_fedhypevae_with_one_noise_seed_draw_different_coins():
    """End to end: DP-FedAvg's first Poisson coins of client 0 differ from FedHypeVAE's for the same seed."""
    from fedhypevae.baselines import linear

    seen = []
    real = linear.poisson_sample

    def spy(n, rate, gen):
        twin = torch.Generator()
        twin.set_state(gen.get_state())
        seen.append(torch.rand(8, generator=twin))  # the coins this call is about to draw
        return real(n, rate, gen)

    fed_rng = ClientRNG(0, 9).generator(STREAM_STEP, 0, 0)
    mine = torch.rand(8, generator=fed_rng)
    from fedhypevae.data import build_federation

    cfg = tiny("partition.clients=2", "partition.kind=iid")
    fed = build_federation(cfg.data, cfg.partition, cfg.seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linear, "poisson_sample", spy)
        linear.federated_linear(fed, private=True, epsilon=1.0, rounds=1, sample_rate=0.5, noise_seed=9)
    assert seen and not torch.equal(seen[0], mine)


def test_validation_happens_before_anything_is_written_or_released(tmp_path, capsys):
    """privacy.stats_clip_norm missing for untransformed data used to fail after the MMD release was charged
    and the directory written, so the corrected retry was refused. Now nothing is written, and the
    corrected command runs in the same --out."""
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                "--set",
                "data.transform=none",
                "--set",
                "train.rounds=1",
                "--out",
                str(out),
                "--no-progress",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "privacy.stats_clip_norm must be set" in err and "Traceback" not in err
    assert not out.exists()
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                "--set",
                "data.transform=none",
                "--set",
                "privacy.stats_clip_norm=40",
                "--set",
                "train.rounds=1",
                "--out",
                str(out),
                "--no-progress",
                "--quiet",
            ]
        )
        == 0
    )


def test_memory_a_later_stage_needs_is_checked_first(tmp_path, capsys):
    rng = np.random.default_rng(0)
    d = 20000
    np.savez(tmp_path / "wide.npz", x=rng.normal(size=(240, d)).astype(np.float32), y=np.repeat(np.arange(4), 60))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                "--set",
                f"data.path={tmp_path / 'wide.npz'}",
                "--set",
                "data.transform=l2",
                "--set",
                "stats.covariance=full",
                "--out",
                str(out),
                "--no-progress",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "stats.covariance=full" in err and "GB" in err and "before training spends any privacy budget" in err
    assert not out.exists()


def test_a_failure_after_a_release_says_what_was_spent_and_how_to_continue(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = run_mod.synthesize

    def broken(tr, moments):
        raise FedHypeVAEError("the meta-code fit ran out of memory")

    monkeypatch.setattr(run_mod, "synthesize", broken)
    args = [
        "train",
        "--config",
        "tiny",
        "--set",
        "train.rounds=1",
        "--set",
        "privacy.noise_seed=5",
        "--out",
        str(out),
        "--no-progress",
        "--quiet",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ran out of memory" in err[0]
    assert "already spent epsilon" in err[0] and f"fedhypevae train --resume --out {out}" in err[0]
    monkeypatch.setattr(run_mod, "synthesize", real)
    before = len(PrivacyLedger(None, run_dir=out).records)
    assert main([*args, "--resume"]) == 0  # the same directory continues; the replayed statistics are free
    assert len(PrivacyLedger(None, run_dir=out).records) == before
    assert strict_load(out / "results.json")["status"] == "complete"


def test_a_crash_after_the_statistics_release_with_secure_noise_resumes_without_paying_again(
    tmp_path, capsys, monkeypatch
):
    # with secure noise a second release of the statistics would be charged anew, and the plan leaves no room for
    # it: the released statistics are kept in OUT/class_stats.pt at once and read back on resume
    out = tmp_path / "run"
    real = run_mod.synthesize

    def broken(tr, moments):
        raise FedHypeVAEError("the node went down")

    monkeypatch.setattr(run_mod, "synthesize", broken)
    args = ["train", "--config", "tiny", "--set", "train.rounds=1", "--out", str(out), "--no-progress", "--quiet"]
    assert main(args) == 2
    assert (out / "class_stats.pt").is_file()
    capsys.readouterr()
    monkeypatch.setattr(run_mod, "synthesize", real)
    before = PrivacyLedger(None, run_dir=out).records
    assert sum(1 for r in before if r.mechanism == "class-stats") > 0
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert PrivacyLedger(None, run_dir=out).records == before  # nothing charged again
    assert strict_load(out / "results.json")["status"] == "complete"


def test_a_run_without_its_statistics_is_partial_and_exits_3(tmp_path, capsys, monkeypatch):
    """Secure noise, a crash after the statistics were released and before they were kept (OUT/class_stats.pt):
    the resume cannot release them again within the budget, so the run is partial (exit 3), says what is
    missing, and spends nothing more."""
    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--set", "train.rounds=1", "--out", str(out), "--no-progress", "--quiet"]
    real = run_mod.release_statistics

    def released_then_killed(tr, clip):
        real(tr, clip)
        raise RuntimeError("killed")

    monkeypatch.setattr(run_mod, "release_statistics", released_then_killed)
    with pytest.raises(RuntimeError):
        main(args)
    monkeypatch.undo()
    assert not (out / "class_stats.pt").exists()
    eps = PrivacyLedger(None, run_dir=out).epsilon(delta=1e-4, accountant="rdp")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 3
    err = capsys.readouterr().err
    assert "PARTIAL" in err and "class statistics" in err
    res = strict_load(out / "results.json")
    assert res["status"] == "partial" and any("meta-code" in m for m in res["missing"])
    assert PrivacyLedger(None, run_dir=out).epsilon(delta=1e-4, accountant="rdp") == eps


# ------------------------------------------------------------------------------- every key
# a valid value different from tiny's for EVERY config key (a new key must be added here)
ALTERNATIVES = {
    "seed": "1",
    "threads": "1",
    "data.path": "breast_cancer",
    "data.label_column": "label",
    "data.group_column": "g",
    "data.site_column": "s",
    "data.metadata_path": "/nonexistent/meta.csv",
    "data.transform": "l2",
    "data.value_range": "[0,32]",
    "data.test_fraction": "0.3",
    "data.holdout": "validation",
    "partition.kind": "iid",
    "partition.alpha": "1.0",
    "partition.clients": "3",
    "partition.min_client_size": "10",
    "model.latent_dim": "5",
    "model.code_dim": "3",
    "model.code_radius": "2.0",
    "model.hidden": "[16]",
    "model.hyper_hidden": "8",
    "model.hyper_layers": "3",
    "model.activation": "tanh",
    "model.modulation": "false",
    "model.prior": "standard",
    "model.class_anchor": "true",
    "model.output_std": "0.2",
    "model.label_embed_dim": "3",
    "model.lipschitz": "null",
    "model.lambda_v": "0.01",
    "model.lambda_mmd": "0.0",
    "model.mmd_kind": "literal",
    "model.mmd_bandwidths": "[0.5]",
    "model.mmd_features": "8",
    "model.mmd_synthetic_per_class": "3",
    "train.rounds": "4",
    "train.local_steps": "3",
    "train.optimizer": "sgd",
    "train.lr": "0.01",
    "train.encoder_lr": "0.01",
    "train.code_lr": "0.05",
    "train.local_lr": "0.1",
    "train.checkpoint_every": "2",
    "train.keep_checkpoints": "3",
    "train.replica_check_every": "1",
    "train.engine": "reference",
    "train.chunk_clients": "1",
    "train.step_timeout_s": "30",
    "train.time_phases": "true",
    "federation.aggregation": "delta",
    "federation.weights": "uniform",
    "federation.declared_sizes": "[100,100,100,100]",
    "federation.declared_size_rounding": "pow2",
    "federation.server_lr": "0.5",
    "privacy.enabled": "false",
    "privacy.mode": "paper",
    "privacy.target_epsilon": "4.0",
    "privacy.delta": "1e-5",
    "privacy.clip_norm": "2.0",
    "privacy.sample_rate": "0.3",
    "privacy.accountant": "prv",
    "privacy.noise_seed": "12",
    "privacy.diagnostics": "false",
    "privacy.stats_epsilon_fraction": "0.2",
    "privacy.mmd_epsilon_fraction": "0.2",
    "privacy.secure_aggregation": "true",
    "privacy.secure_bits": "32",
    "privacy.secure_grid_ratio": "50",
    "privacy.stats_clip_norm": "3.0",
    "privacy.stats_center": "0.3",
    "privacy.stats_split": "[0.5,0.3,0.2]",
    "privacy.noise_multiplier": "5.0",
    "privacy.trust_model": "central",
    "privacy.collusion": "2",
    "privacy.party": "rank",
    "stats.covariance": "none",
    "stats.rank": "2",
    "meta.codes": "2",
    "meta.beta": "0.2",
    "meta.steps": "10",
    "meta.lr": "0.1",
    "meta.samples_per_class": "8",
    "synth.samples_per_class": "5",
    "synth.class_balance": "proportional",
    "synth.output_noise": "true",
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_config_key_changed_on_resume_refuses_replays_identically_or_charges(tmp_path):
    """Crash-resume with privacy.noise_seed after changing one key, for every key: the resume either
    refuses with a message naming the key (nothing charged), or each replayed step is a free replay of
    the bit-identical release, or it is charged again under a fresh epoch. Never a free replay of a
    different value, never a traceback; a change that is applied is reported."""
    import shutil

    from fedhypevae.trainer import flatten_config, may_change_on_resume

    base = ["privacy.noise_seed=11"]  # tiny: 3 rounds x 2 steps, room for two charged replays
    assert set(ALTERNATIVES) == set(flatten_config(tiny(*base).to_dict())), "ALTERNATIVES must cover every key"
    template = tmp_path / "template"
    cut = Recorder()
    tr = interrupt_after(tiny(*base), template, rounds=1, extra_steps=2, comm=cut)  # 2 steps lost in round 1
    P = tr.phi_numel
    lost = dict(zip(["round=1/step=0", "round=1/step=1"], grad_buffers(cut, P)[-2:]))
    ledger_before = (template / "ledger" / "rank_00000.jsonl").read_bytes()
    outcomes = {}
    for key, value in ALTERNATIVES.items():
        d = tmp_path / key
        shutil.copytree(template, d)
        comm = Recorder()
        try:
            cfg = tiny(*base, f"{key}={value}")
            res = run_training(cfg, d, comm, resume=True, progress=False)
        except FedHypeVAEError as exc:
            assert not may_change_on_resume(key), f"{key}: a setting that may change was refused: {exc}"
            assert key in str(exc), f"{key}: the refusal does not name the key: {exc}"
            assert (d / "ledger" / "rank_00000.jsonl").read_bytes() == ledger_before, f"{key}: charged, then refused"
            outcomes[key] = "refused"
            continue
        assert may_change_on_resume(key), f"{key}: a locked setting was accepted on resume"
        assert res["resume"]["changed"] == {key: [flatten_config(tiny(*base).to_dict())[key], cfg_value(cfg, key)]}
        recs = read_client_releases(d, 0)
        resumed = grad_buffers(comm, P)
        kinds = []
        for i, step in enumerate(["round=1/step=0", "round=1/step=1"]):
            epochs = [e["epoch"] for e in recs if e["key"] == step]
            if i >= len(resumed):  # not released again: the budget guard stopped the run before it
                assert epochs == [0] and res["training"]["stopped_early"], f"{key}: {step} {epochs}"
                kinds.append("stopped")
            elif epochs == [0]:  # free: the re-release must be the identical value
                assert torch.equal(resumed[i][:P], lost[step][:P]), f"{key}: {step} replayed free with another value"
                kinds.append("free")
            else:
                assert epochs == [0, 1], f"{key}: {step} has epochs {epochs}"
                kinds.append("charged")
        outcomes[key] = "/".join(kinds)
    print(outcomes)
    assert outcomes["privacy.target_epsilon"] == "refused" and outcomes["train.encoder_lr"] == "free/charged"
    assert outcomes["meta.steps"] == "free/free" and outcomes["train.engine"] == "charged/charged"


def cfg_value(cfg, key):
    from fedhypevae.trainer import flatten_config

    return flatten_config(cfg.to_dict())[key]
