"""The one-run privacy audit (Steinke, Nasr & Jagielski 2023): the bound, its power, and the audit of
the real DP step — a correct run stays below the claimed epsilon, a sabotaged one is caught."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from fedhypevae.audit import (
    CANARY_STEPS,
    AuditSetup,
    Canaries,
    CanaryStep,
    NoClipCanaryStep,
    NoNoiseCanaryStep,
    audit_p_value,
    audit_white_box,
    canary_length,
    closed_form_max,
    epsilon_lower_bound,
    guess,
    max_epsilon_lower_bound,
    run_audit,
    score_guesses,
)
from fedhypevae.cli import main
from fedhypevae.config import load_config
from fedhypevae.dp_step import DPStep, per_sample_grads
from fedhypevae.errors import ConfigError
from fedhypevae.trainer import Trainer, make_plan

# ------------------------------------------------------------------------------------------ the bound


def test_p_value_is_the_binomial_tail_by_hand():
    # epsilon = 0: every guess is a fair coin. P[Bin(4, 1/2) >= 3] = 5/16, P[Bin(2, 1/2) >= 2] = 1/4
    assert audit_p_value(10, 4, 3, 0.0, 0.0) == pytest.approx(5 / 16)
    assert audit_p_value(10, 2, 2, 0.0, 0.0) == pytest.approx(1 / 4)
    # epsilon = ln 3: q = 3/4; P[Bin(2, 3/4) >= 2] = 9/16
    assert audit_p_value(10, 2, 2, math.log(3), 0.0) == pytest.approx(9 / 16)
    # the delta term: v = r = 1, eps = 0: P[B >= 1] = 1/2, plus 2 m delta * P[B = 0] / 1 = 2*10*0.01*0.5
    assert audit_p_value(10, 1, 1, 0.0, 0.01) == pytest.approx(0.5 + 0.1)


@pytest.mark.parametrize("r", [10, 50, 200])
def test_all_guesses_right_gives_the_closed_form(r):
    """v = r, delta = 0: the p-value is q^r, so the bound is logit(0.05^(1/r)) exactly."""
    assert epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(closed_form_max(r), abs=1e-6)
    # by hand for r = 10: 0.05^0.1 = 0.74113, logit = ln(0.74113 / 0.25887) = 1.0519
    if r == 10:
        assert closed_form_max(10) == pytest.approx(1.0519, abs=1e-3)
    # the delta term can only lower it; the bound is the largest eps with p-value < 0.05
    lb = epsilon_lower_bound(1000, r, r, 1e-5)
    assert lb <= closed_form_max(r) and audit_p_value(1000, r, r, lb, 1e-5) < 0.05
    assert audit_p_value(1000, r, r, lb + 1e-6, 1e-5) >= 0.05


def test_chance_level_gives_zero_and_the_bound_grows_with_correct_guesses():
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # r/2 right: chance
    assert epsilon_lower_bound(1000, 100, 58, 1e-5) == 0.0  # P[Bin(100, .5) >= 58] = 0.067 > 0.05
    assert epsilon_lower_bound(1000, 100, 60, 1e-5) > 0.0  # 0.028 < 0.05
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in range(60, 101, 5)]
    assert bounds == sorted(bounds) and bounds[-1] == pytest.approx(max_epsilon_lower_bound(1000, 100, 1e-5))
    with pytest.raises(ConfigError):
        epsilon_lower_bound(10, 20, 5, 1e-5)  # more guesses than canaries


def test_guesses_are_top_and_bottom_scores():
    scores = np.array([0.1, 5.0, -3.0, 2.0, -1.0, 0.0])
    assert guess(scores, 2, 1).tolist() == [0, 1, -1, 1, 0, 0]
    res = score_guesses(scores, np.array([0, 1, 0, 0, 1, 1], bool), 2, 2)
    assert res == {"guesses": 4, "correct": 2, "correct_in": 1, "correct_out": 1}


# ------------------------------------------------------------------------------------------ the audit config


def test_audit_config_has_the_power_to_refute_its_claim():
    cfg = load_config("audit")
    claimed = cfg.privacy.target_epsilon
    assert claimed <= 2.0 and cfg.privacy.noise_seed is not None  # docs/PRIVACY.md: claimed eps <= 2, fixed seeds
    m, r = 1000, 200  # the defaults: 1000 canaries, 100 'in' + 100 'out' guesses
    assert max_epsilon_lower_bound(m, r, cfg.privacy.delta) > claimed + 1.5  # 4.17: sabotage can be caught
    # an included canary is in some batch with near certainty: 1 - (1 - q)^T
    steps = cfg.train.rounds * cfg.train.local_steps
    assert (1 - cfg.privacy.sample_rate) ** steps < 1e-4


def _twin(tr, step_type=DPStep):
    """A client with a block of its own in the state (and on the generator streams) of the trainer's first
    client, stepping with `step_type`."""
    c = tr.clients[0].standalone()
    c.step_type = step_type
    return c


def _armed_twin(tr, sabotage, included):
    """Such a client whose step is the audit's canary step (its sabotaged variant), armed with canaries on the
    first coordinates of Phi, sign +1."""
    twin = _twin(tr, CANARY_STEPS[sabotage])
    m = len(included)
    twin.dp_step.canaries = Canaries(
        coords=torch.arange(m),
        signs=torch.ones(m),
        included=included,
        seed=0,
        scale=canary_length(sabotage, tr.cfg.privacy.clip_norm),
        phi_numel=tr.phi_numel,
        sample_rate=tr.cfg.privacy.sample_rate,
    )
    return twin


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_canary_client_without_canaries_is_client_step(tmp_path, engine):
    """The audited client is the real client: with no canary in the batch it releases exactly what
    Client.step releases (either form of the per-sample stage)."""
    cfg = load_config("audit", ["train.rounds=1", f"train.engine={engine}"])
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.setup()
    c = _twin(tr)
    twin = _armed_twin(tr, "none", torch.zeros(10, dtype=torch.bool))
    h2 = copy.deepcopy(tr.hyper)
    a = c.step(tr.hyper, 0, 0, sigma=tr.sigma, features=tr.features)
    b = twin.step(h2, 0, 0, sigma=tr.sigma, features=tr.features)
    for n in a.phi_grad:
        torch.testing.assert_close(b.phi_grad[n], a.phi_grad[n], rtol=1e-6, atol=1e-7)
    assert twin.dp_step.canaries.appearances.sum() == 0


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_canaries_and_sabotages_are_stage_overrides_of_the_step_object(tmp_path, engine):
    """Unarmed, a canary step is the plain step; armed, its per-sample stage adds the canaries (on either form of
    that stage), and each sabotage overrides one more stage."""
    cfg = load_config("audit", ["train.rounds=1", f"train.engine={engine}"])
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.setup()
    assert _twin(tr, CanaryStep).dp_step.canaries is None  # unarmed
    kinds = {
        s: type(_armed_twin(tr, s, torch.zeros(4, dtype=torch.bool)).dp_step) for s in ("none", "no-clip", "no-noise")
    }
    assert kinds == {"none": CanaryStep, "no-clip": NoClipCanaryStep, "no-noise": NoNoiseCanaryStep}
    assert (
        NoClipCanaryStep.add_noise is DPStep.add_noise
        and NoNoiseCanaryStep.clip_and_accumulate is DPStep.clip_and_accumulate
    )

    # every canary included: the sampled ones enter the clipped sum, each one clipped to exactly C
    full = _armed_twin(tr, "none", torch.ones(200, dtype=torch.bool))
    none = _armed_twin(tr, "none", torch.zeros(200, dtype=torch.bool))
    pf, pn = full.prepare_step(copy.deepcopy(tr.hyper), 0, 0), none.prepare_step(copy.deepcopy(tr.hyper), 0, 0)
    k = int(full.dp_step.canaries.appearances.sum())
    assert k > 10 and none.dp_step.canaries.appearances.sum() == 0
    offsets, off = {}, 0
    for n, p in tr.hyper.named_parameters():
        offsets[n] = (off, off + p.numel())
        off += p.numel()
    for n in pn.summed:
        want = pn.summed[n].clone()
        if n.startswith("hyper."):
            a, b = offsets[n[len("hyper.") :]]
            flat = want.view(-1)
            for j in full.dp_step.canaries.appearances.nonzero().flatten().tolist():  # canary j on coordinate j
                if a <= j < b:
                    flat[j - a] += cfg.privacy.clip_norm * 2.0 / (2.0 + 1e-6)  # 2C long, clipped to C
        torch.testing.assert_close(pf.summed[n], want, rtol=1e-5, atol=1e-5)

    # no-noise: the release is the scaled sum plus the post-noise terms, as a step without noise stage
    quiet = _armed_twin(tr, "no-noise", torch.zeros(4, dtype=torch.bool))

    class Quiet(DPStep):
        def add_noise(self, sums, *, sigma, gens):
            return sums

    ref = _twin(tr, Quiet)
    a = quiet.step(copy.deepcopy(tr.hyper), 0, 1, sigma=tr.sigma, features=tr.features)
    b = ref.step(copy.deepcopy(tr.hyper), 0, 1, sigma=tr.sigma, features=tr.features)
    for n in a.phi_grad:
        assert torch.equal(a.phi_grad[n], b.phi_grad[n]), n

    # no-clip: the clip stage sums the per-sample gradients unclipped
    raw = _armed_twin(tr, "no-clip", torch.zeros(4, dtype=torch.bool))
    pr = raw.prepare_step(copy.deepcopy(tr.hyper), 0, 2)
    grads, _ = per_sample_grads(pr.view, sorted(pr.summed), pr.batch, pr.syn)
    for n in pr.summed:
        torch.testing.assert_close(pr.summed[n], grads[n].sum(0), rtol=1e-5, atol=1e-6)


def test_the_white_box_audit_builds_the_canary_step_through_the_trainer(tmp_path, monkeypatch):
    """No client or step is swapped after setup: the trainer's step_type seam gives the audited client the
    canary step, in a block of its own (every other client the plain step), and that very step is armed and
    trained."""
    seen = {}
    orig = Trainer.train

    def train(self):
        seen["steps"] = list(self.steps)
        return orig(self)

    monkeypatch.setattr(Trainer, "train", train)
    cfg = load_config("audit", ["train.rounds=1"])
    setup = AuditSetup(canaries=50, k_in=5, k_out=5, seed=3, client=1, sabotage="none", mode="white-box")
    raw = audit_white_box(cfg, tmp_path / "run", setup, progress=False)
    types = {tuple(st.block.ids): type(st) for st in seen["steps"]}
    assert types == {(0,): DPStep, (1,): CanaryStep}
    cs = next(st for st in seen["steps"] if st.block.ids == [1])
    assert cs.canaries.appearances.sum() > 0
    assert raw["steps"] == 2 and torch.equal(torch.as_tensor(raw["scores"]), cs.canaries.scores)


# ------------------------------------------------------------------------------------------ white-box


def _audit(tmp_path, sabotage, engine="batched"):
    a = run_audit(
        load_config("audit", [f"train.engine={engine}"]), tmp_path / sabotage, sabotage=sabotage, progress=False
    )["audit"]
    assert a["engine"].startswith(engine)  # the audited step ran on this form of the per-sample stage
    return a


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_white_box_audit_of_the_correct_step_stays_below_the_claim(tmp_path, engine):
    a = _audit(tmp_path, "none", engine)
    cfg = load_config("audit")
    plan = make_plan(cfg, use_mmd=False)
    # the audited mechanism is the real one: the sigma planned for the config's (eps, delta, q, steps)
    assert (
        a["planned_noise_multiplier"] == pytest.approx(plan.sigma, rel=1e-12)
        and a["noise_multiplier"] == a["planned_noise_multiplier"]
    )
    assert a["steps"] == 50 and a["sample_rate"] == 0.2 and a["clip_norm"] == 1.0
    assert a["ledger_epsilon"] <= a["claimed_epsilon"] + 1e-9
    assert 8 < a["canary"]["mean_appearances_included"] < 12  # q T = 10: the canaries went through the step
    assert a["guesses"] == 200 and a["power_ok"]
    assert a["epsilon_lower_bound"] <= a["claimed_epsilon"] and not a["violation"]
    assert a["epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(1000, 200, a["correct"], a["delta"]))
    res = json.loads((tmp_path / "none" / "results.json").read_text())
    assert res["provenance"]["config_hash"] and res["audit"]["seeds"]["noise_seed"] == 1234


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_white_box_audit_catches_a_step_without_clipping(tmp_path, engine):
    a = _audit(tmp_path, "no-clip", engine)
    assert a["claimed_epsilon"] <= 2.0 and a["max_epsilon_lower_bound"] > a["claimed_epsilon"]  # power check
    assert a["epsilon_lower_bound"] > a["claimed_epsilon"] and a["violation"]


def test_white_box_audit_catches_a_step_without_noise_through_the_cli(tmp_path, capsys):
    js = tmp_path / "audit.json"
    code = main(
        [
            "audit",
            "--config",
            "audit",
            "--sabotage",
            "no-noise",
            "--out",
            str(tmp_path / "nn"),
            "--json",
            str(js),
            "--no-progress",
        ]
    )
    assert code == 0  # the sabotage was caught: the audit did what it must
    out = capsys.readouterr().out
    assert "VIOLATION" in out and "largest bound these settings can give" in out
    a = json.loads(js.read_text())["audit"]
    assert a == json.loads((tmp_path / "nn" / "results.json").read_text())["audit"]
    assert a["noise_multiplier"] == 0.0 and a["max_epsilon_lower_bound"] > a["claimed_epsilon"]
    assert a["epsilon_lower_bound"] > a["claimed_epsilon"]


# ------------------------------------------------------------------------------------------ black-box


def test_black_box_audit_runs_the_real_pipeline_and_stays_below_the_claim(tmp_path):
    res = run_audit(
        load_config("audit", ["train.rounds=10"]), tmp_path / "bb", mode="black-box", canaries=100, progress=False
    )
    a = res["audit"]
    assert a["mode"] == "black-box" and a["canaries"] == 100 and a["guesses"] == 20
    assert a["epsilon_lower_bound"] <= a["claimed_epsilon"]
    assert (tmp_path / "bb" / "run" / "synthetic.npz").is_file()  # the whole run_training pipeline ran
    manifest = json.loads((tmp_path / "bb" / "data" / "manifest.json").read_text())
    assert manifest["declared_sizes"][0] == manifest["train_sizes"][0] + 50  # public: M/2, not the coins' count


def test_an_audit_without_the_power_to_refute_the_claim_says_so(tmp_path, capsys):
    """100 canaries, 20 guesses: at most 1.82 can be shown, so a claim of 5 can be neither refuted nor
    supported; the verdict and the exit status say so instead of reporting 'consistent'."""
    code = main(
        [
            "audit",
            "--set",
            "privacy.target_epsilon=5",
            "--set",
            "train.rounds=2",
            "--canaries",
            "100",
            "--sabotage",
            "no-noise",
            "--out",
            str(tmp_path / "a"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    a = json.loads((tmp_path / "a" / "results.json").read_text())["audit"]
    assert a["max_epsilon_lower_bound"] == pytest.approx(max_epsilon_lower_bound(100, 20, 1e-5))
    assert a["max_epsilon_lower_bound"] < 5
    assert not a["power_ok"] and a["verdict"].startswith("INCONCLUSIVE") and "cannot refute" in out
    assert code == 1  # a sabotage that could not be detected: the audit's expectation failed
