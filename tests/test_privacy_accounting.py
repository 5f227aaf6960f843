"""Accounting, budget planning and the privacy ledger."""

import json
import math
import time

import pytest

from fedhypevae.errors import PrivacyError
from fedhypevae.privacy import (
    CLASS_STATS,
    DP_SGD,
    MMD_EMBEDDINGS,
    BudgetShare,
    Mechanism,
    PrivacyLedger,
    calibrate_one_shot,
    epsilon_of,
    history_fits,
    plan_budget,
    plan_mechanisms,
    privacy_plan,
)

DELTA = 1e-4


def _plan(**kw):
    args = dict(
        target_epsilon=1.0,
        delta=DELTA,
        sample_rate=0.05,
        steps=200,
        accountant="rdp",
        stats_fraction=0.1,
        mmd_fraction=0.1,
        use_stats=True,
        use_mmd=True,
    )
    args.update(kw)
    return plan_budget(**args)


# ----------------------------------------------------------------------------- epsilon_of


def test_epsilon_matches_opacus_pinned():
    from opacus.accountants import PRVAccountant, RDPAccountant

    m = [Mechanism(DP_SGD, 1.0, 0.01, 1000)]
    rdp = epsilon_of(m, delta=DELTA, accountant="rdp")
    acc = RDPAccountant()
    acc.history = [(1.0, 0.01, 1000)]
    assert rdp == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert rdp == pytest.approx(1.7550571595045694, rel=1e-6)  # pinned, opacus 1.6

    prv = epsilon_of(m, delta=DELTA, accountant="prv")
    acc = PRVAccountant()
    acc.history = [(1.0, 0.01, 1000)]
    assert prv == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert prv == pytest.approx(1.5228412597506693, rel=1e-4)
    assert prv < rdp


def test_opacus_rdp_read_without_its_package_is_opacus_rdp():
    """The accountant executes Opacus' RDP module file by itself (importing the package costs ~3 s of every rank's
    start): its orders and functions must be Opacus' own, and a fresh process must not import the package."""
    import subprocess
    import sys

    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as package_rdp

    from fedhypevae.privacy import accounting

    assert accounting._OPACUS_ORDERS == list(RDPAccountant.DEFAULT_ALPHAS)
    code = (
        "import sys; from fedhypevae.privacy.accounting import opacus_rdp, epsilon_of, Mechanism, DP_SGD; "
        "m = opacus_rdp(); e = epsilon_of([Mechanism(DP_SGD, 1.0, 0.01, 1000)], delta=1e-4, accountant='rdp'); "
        "print(m.__name__, 'opacus' in sys.modules, repr(e))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["fedhypevae._opacus_rdp", "False"], out
    assert float(out[2]) == pytest.approx(1.7550571595045694, rel=1e-6)  # pinned, as above
    accounting.opacus_rdp.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delitem(sys.modules, "opacus.accountants.analysis.rdp")
            standalone = accounting.opacus_rdp()
        assert standalone is not package_rdp and standalone.__file__ == package_rdp.__file__
        orders = accounting._rdp_orders()[:150]
        for q, sigma in [(0.01, 1.0), (0.25, 3.6), (1.0, 14.9)]:
            a = standalone.compute_rdp(q=q, noise_multiplier=sigma, steps=7, orders=orders)
            b = package_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=7, orders=orders)
            assert np.array_equal(a, b)
            assert standalone.get_privacy_spent(orders=orders, rdp=a, delta=DELTA) == package_rdp.get_privacy_spent(
                orders=orders, rdp=b, delta=DELTA
            )
    finally:
        accounting.opacus_rdp.cache_clear()


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_the_vectorized_sampled_gaussian_rdp_is_opacus_compute_rdp():
    """`sampled_gaussian_rdp` (every order at once, numpy) against Opacus' loop, over q in [1e-4, 0.999] and sigma in
    [0.05, 5000]: the curves to 1e-11 (absolute, or relative where above 1), the epsilon they give at 1 to 10,000 steps
    to 1e-9, and the calibrated sigma to 1e-12. Where it cannot follow Opacus' arithmetic it says so (None) and the
    accountant asks Opacus."""
    import numpy as np

    from fedhypevae.privacy import accounting

    rdp, orders = accounting.opacus_rdp(), accounting._OPACUS_ORDERS
    fell_back = []
    for q in [1e-4, 1e-3, 0.01, 0.1, 0.25, 0.5, 0.9, 0.999]:
        for sigma in [0.05, 0.3, 0.7, 1.0, 2.5, 3.6493, 10.0, 28.58, 500.0, 5000.0]:
            ref = np.asarray(rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders))
            got = accounting.sampled_gaussian_rdp(q, sigma, orders)
            if got is None:
                fell_back.append((q, sigma))
                continue
            assert np.array_equal(np.isfinite(got), np.isfinite(ref)), (q, sigma)
            ok = np.isfinite(ref)
            assert np.all(np.abs(got[ok] - ref[ok]) <= 1e-11 * np.maximum(np.abs(ref[ok]), 1.0)), (q, sigma)
            for steps in (1, 100, 10_000):
                a = rdp.get_privacy_spent(orders=orders, rdp=ref * steps, delta=DELTA)[0]
                b = rdp.get_privacy_spent(orders=orders, rdp=got * steps, delta=DELTA)[0]
                assert b == pytest.approx(a, rel=1e-9, abs=1e-12), (q, sigma, steps)
    assert len(fell_back) <= 2, fell_back  # only the extreme corner (sigma 5000: terms cancel to rounding)

    def sigma(q, steps, target):
        accounting._rdp_per_step.cache_clear()
        history = lambda s: [Mechanism(DP_SGD, s, q, steps)]  # noqa: E731
        return accounting._calibrate(history, target, delta=DELTA, accountant="rdp", what="test")

    for q, steps, target in [(0.2, 6, 2.0), (0.25, 1000, 1.0), (0.01, 3000, 0.5)]:
        fast = sigma(q, steps, target)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(accounting, "sampled_gaussian_rdp", lambda *a: None)
            slow = sigma(q, steps, target)
        assert fast == pytest.approx(slow, rel=1e-12), (q, steps, target)
    accounting._rdp_per_step.cache_clear()


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_extended_orders_tighten_one_shot_release():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(40.0, 1.0, 1)]
    default = acc.get_epsilon(DELTA)
    ours = epsilon_of([Mechanism(CLASS_STATS, 40.0, 1.0, 1)], delta=DELTA, accountant="rdp")
    assert ours < 0.9 * default
    # never below the (near-exact) PRV value, and below the classic Gaussian-mechanism bound
    prv = epsilon_of([Mechanism(CLASS_STATS, 40.0, 1.0, 1)], delta=DELTA, accountant="prv")
    assert prv <= ours <= math.sqrt(2 * math.log(1.25 / DELTA)) / 40.0


def test_epsilon_edge_cases():
    assert epsilon_of([], delta=DELTA, accountant="rdp") == 0.0
    assert epsilon_of([Mechanism(DP_SGD, 1.0, 0.1, 0)], delta=DELTA, accountant="rdp") == 0.0
    assert epsilon_of([Mechanism(DP_SGD, 0.0, 0.1, 5)], delta=DELTA, accountant="rdp") == math.inf
    with pytest.raises(PrivacyError, match="rdp, prv"):
        epsilon_of([Mechanism(DP_SGD, 1.0, 0.1, 5)], delta=DELTA, accountant="gdp")
    with pytest.raises(PrivacyError, match="sample rate"):
        epsilon_of([Mechanism(DP_SGD, 1.0, 1.5, 5)], delta=DELTA, accountant="rdp")


def test_epsilon_composition_is_monotone():
    a = epsilon_of([Mechanism(DP_SGD, 1.0, 0.05, 100)], delta=DELTA, accountant="rdp")
    b = epsilon_of(
        [Mechanism(DP_SGD, 1.0, 0.05, 100), Mechanism(CLASS_STATS, 20.0, 1.0, 1)], delta=DELTA, accountant="rdp"
    )
    c = epsilon_of([Mechanism(DP_SGD, 1.0, 0.05, 200)], delta=DELTA, accountant="rdp")
    assert a < b and a < c


# ----------------------------------------------------------------------------- planning


# plan_budget before it became a wrapper of the list form (same arguments as _plan, stats 0.1, mmd 0.2):
# (sigma, sigma_stats, sigma_mmd, planned_epsilon), rdp
PINNED = {
    (True, None): (2.774476456226581, 27.879934378153585, 14.935999551066981, 0.9998666149541875),
    (False, None): (2.70638443313287, 27.879934378153585, None, 0.9999134089575601),
    (True, 50.0): (50.0, 27.879934378153585, 14.935999551066981, 0.23452539064376585),
}


@pytest.mark.parametrize("use_mmd,noise_multiplier", list(PINNED))
def test_the_list_form_gives_plan_budgets_plan(use_mmd, noise_multiplier):
    old = _plan(mmd_fraction=0.2, use_mmd=use_mmd, noise_multiplier=noise_multiplier)
    shares = [BudgetShare(DP_SGD, 0.05, 200, 0.7 if use_mmd else 0.9), BudgetShare(CLASS_STATS, 1.0, 1, 0.1)]
    if use_mmd:
        shares.append(BudgetShare(MMD_EMBEDDINGS, 1.0, 1, 0.2))
    joint = plan_mechanisms(
        shares, target_epsilon=1.0, delta=DELTA, accountant="rdp", noise_multiplier=noise_multiplier
    )
    assert joint.mechanisms == old.mechanisms and joint.planned_epsilon == old.planned_epsilon
    assert joint.noise_multipliers == {m.name: m.noise_multiplier for m in old.mechanisms}
    new = privacy_plan(shares, target_epsilon=1.0, delta=DELTA, accountant="rdp", noise_multiplier=noise_multiplier)
    assert new.to_dict() == old.to_dict()
    got = (old.sigma, old.noise_multiplier(CLASS_STATS), old.noise_multiplier(MMD_EMBEDDINGS), old.planned_epsilon)
    for a, b in zip(got, PINNED[use_mmd, noise_multiplier]):
        assert a == b or a == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize("overrides", [[], ["model.lambda_mmd=0.5", "privacy.mmd_epsilon_fraction=0.1"]])
def test_a_plan_from_another_ranks_noise_multipliers_is_that_plan(overrides, monkeypatch):
    """Trainer._agreed_plan: the ranks other than 0 build the plan from rank 0's noise multipliers without
    calibrating; the plan is the same object field for field, its epsilon recomputed and checked; a multiplier too
    small for the target, or a missing one, is refused."""
    from fedhypevae.config import load_config
    from fedhypevae.privacy import accounting
    from fedhypevae.trainer import make_plan

    cfg = load_config("tiny", overrides)
    use_mmd = cfg.model.lambda_mmd > 0
    root = make_plan(cfg, use_mmd=use_mmd)
    sigmas = {m.name: m.noise_multiplier for m in root.mechanisms}

    def no_calibration(*a, **k):
        raise AssertionError("calibrated although the noise multipliers were given")

    monkeypatch.setattr(accounting, "_calibrate", no_calibration)
    monkeypatch.setattr(accounting, "calibrate_one_shot", no_calibration)
    other = make_plan(cfg, use_mmd=use_mmd, calibrated=sigmas)
    assert other.to_dict() == root.to_dict()
    with pytest.raises(PrivacyError, match="above the target"):
        make_plan(cfg, use_mmd=use_mmd, calibrated={**sigmas, DP_SGD: 0.5 * sigmas[DP_SGD]})
    with pytest.raises(PrivacyError, match="calibrated noise multipliers for"):
        make_plan(cfg, use_mmd=use_mmd, calibrated={DP_SGD: sigmas[DP_SGD]})


def test_make_plan_builds_the_list_for_the_runs_config():
    from fedhypevae.config import load_config
    from fedhypevae.trainer import make_plan, planned_steps

    for use_mmd in (True, False):
        cfg = load_config("tiny", ["privacy.mmd_epsilon_fraction=0.15"])
        p = cfg.privacy
        old = plan_budget(
            target_epsilon=p.target_epsilon,
            delta=p.delta,
            sample_rate=p.sample_rate,
            steps=planned_steps(cfg),
            accountant=p.accountant,
            stats_fraction=p.stats_epsilon_fraction,
            mmd_fraction=p.mmd_epsilon_fraction,
            use_stats=True,
            use_mmd=use_mmd,
            noise_multiplier=p.noise_multiplier,
        )
        assert make_plan(cfg, use_mmd=use_mmd).to_dict() == old.to_dict()
        # an infinite target plans the same list of mechanisms, each at the fixed noise multiplier
        free = load_config("tiny", ["privacy.target_epsilon=.inf", "privacy.noise_multiplier=1.5"])
        plan = make_plan(free, use_mmd=use_mmd)
        assert [(m.name, m.sample_rate, m.steps) for m in plan.mechanisms] == [
            (m.name, m.sample_rate, m.steps) for m in make_plan(load_config("tiny"), use_mmd=use_mmd).mechanisms
        ]
        assert {m.noise_multiplier for m in plan.mechanisms} == {1.5} and plan.sigma == 1.5
        assert plan.planned_epsilon == epsilon_of(plan.mechanisms, delta=p.delta, accountant=p.accountant)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_three_mechanism_plan_spends_at_most_the_target(accountant):
    shares = [
        BudgetShare(DP_SGD, 0.05, 100, 0.6),
        BudgetShare(CLASS_STATS, 1.0, 1, 0.1),
        BudgetShare("extra-sgd", 0.1, 20, 0.3),
    ]  # a second subsampled mechanism with many releases
    joint = plan_mechanisms(shares, target_epsilon=1.0, delta=DELTA, accountant=accountant)
    assert [m.name for m in joint.mechanisms] == [DP_SGD, CLASS_STATS, "extra-sgd"]
    assert [(m.sample_rate, m.steps) for m in joint.mechanisms] == [(0.05, 100), (1.0, 1), (0.1, 20)]
    eps = epsilon_of(joint.mechanisms, delta=DELTA, accountant=accountant)
    assert eps == pytest.approx(joint.planned_epsilon, rel=1e-9)
    assert 1.0 * (1 - 2e-3) <= eps <= 1.0
    for m, share in zip(joint.mechanisms[1:], (0.1, 0.3)):  # each calibrated alone to its share, from below
        alone = epsilon_of([m], delta=DELTA, accountant=accountant)
        assert share * (1 - 2e-2) <= alone <= share
    # the first entry takes what is left of the composition: more noise than with the whole budget alone
    alone = plan_mechanisms(
        [BudgetShare(DP_SGD, 0.05, 100, 1.0)], target_epsilon=1.0, delta=DELTA, accountant=accountant
    )
    assert joint.noise_multipliers[DP_SGD] > alone.noise_multipliers[DP_SGD]


def test_budget_proportions_are_checked():
    def plan(*proportions):
        names = [DP_SGD, CLASS_STATS, MMD_EMBEDDINGS]
        return plan_mechanisms(
            [
                BudgetShare(n, 0.05 if n == DP_SGD else 1.0, 100 if n == DP_SGD else 1, p)
                for n, p in zip(names, proportions)
            ],
            target_epsilon=1.0,
            delta=DELTA,
            accountant="rdp",
        )

    with pytest.raises(PrivacyError, match="must sum to 1"):
        plan(0.6, 0.1, 0.2)
    with pytest.raises(PrivacyError, match="must sum to 1"):
        plan(0.9, 0.1, 0.2)
    with pytest.raises(PrivacyError, match=r"class-stats: its budget proportion must be a number >= 0"):
        plan(0.9, -0.1, 0.2)
    with pytest.raises(PrivacyError, match="share must be > 0"):
        plan(0.8, 0.0, 0.2)
    with pytest.raises(PrivacyError, match="first mechanism"):
        plan(0.0, 0.5, 0.5)
    with pytest.raises(PrivacyError, match="once"):
        plan_mechanisms([BudgetShare(DP_SGD, 0.05, 100, 0.5)] * 2, target_epsilon=1.0, delta=DELTA, accountant="rdp")
    with pytest.raises(PrivacyError, match="releases"):
        plan_mechanisms([BudgetShare(DP_SGD, 0.05, 0, 1.0)], target_epsilon=1.0, delta=DELTA, accountant="rdp")
    with pytest.raises(PrivacyError, match="starts with"):
        privacy_plan([BudgetShare(CLASS_STATS, 1.0, 1, 1.0)], target_epsilon=1.0, delta=DELTA, accountant="rdp")


@pytest.mark.parametrize(
    "accountant,q,steps,target",
    [
        ("rdp", 0.1, 150, 1.0),
        ("rdp", 0.01, 2000, 1.0),
        ("rdp", 0.2, 30, 0.5),
        ("rdp", 0.01, 500, 8.0),
        ("prv", 0.1, 100, 1.0),
        ("prv", 0.02, 300, 2.0),
    ],
)
def test_calibrated_sigma_reaches_target(accountant, q, steps, target):
    plan = _plan(
        target_epsilon=target, sample_rate=q, steps=steps, accountant=accountant, use_stats=False, use_mmd=False
    )
    eps = epsilon_of([Mechanism(DP_SGD, plan.sigma, q, steps)], delta=DELTA, accountant=accountant)
    assert eps == pytest.approx(plan.planned_epsilon, rel=1e-9)
    assert target * (1 - 2e-3) <= eps <= target
    assert plan.noise_multiplier(CLASS_STATS) is None and plan.noise_multiplier(MMD_EMBEDDINGS) is None
    assert len(plan.mechanisms) == 1


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_composed_plan_meets_target_and_split(accountant):
    plan = _plan(accountant=accountant, stats_fraction=0.1, mmd_fraction=0.2, steps=100)
    eps = epsilon_of(plan.mechanisms, delta=DELTA, accountant=accountant)
    assert 1.0 * (1 - 2e-3) <= eps <= 1.0
    assert {m.name for m in plan.mechanisms} == {DP_SGD, CLASS_STATS, MMD_EMBEDDINGS}
    alone_stats = epsilon_of(
        [Mechanism(CLASS_STATS, plan.noise_multiplier(CLASS_STATS), 1.0, 1)], delta=DELTA, accountant=accountant
    )
    alone_mmd = epsilon_of(
        [Mechanism(MMD_EMBEDDINGS, plan.noise_multiplier(MMD_EMBEDDINGS), 1.0, 1)], delta=DELTA, accountant=accountant
    )
    assert alone_stats == pytest.approx(0.1, rel=2e-2) and alone_stats <= 0.1
    assert alone_mmd == pytest.approx(0.2, rel=2e-2) and alone_mmd <= 0.2
    assert plan.noise_multiplier(MMD_EMBEDDINGS) < plan.noise_multiplier(CLASS_STATS)
    # the one-shot releases cost DP-SGD noise: its sigma is larger than with the whole budget
    alone = _plan(accountant=accountant, steps=100, use_stats=False, use_mmd=False)
    assert plan.sigma > alone.sigma
    d = plan.to_dict()
    assert json.loads(json.dumps(d))["mechanisms"][0]["name"] == DP_SGD


def test_calibration_50000_steps_is_fast():
    epsilon_of([Mechanism(DP_SGD, 1.0, 0.1, 1)], delta=DELTA, accountant="rdp")  # import opacus first
    t0 = time.perf_counter()
    plan = _plan(sample_rate=0.01, steps=50_000)
    dt = time.perf_counter() - t0
    print(f"calibration of 50,000 steps (rdp, with stats+mmd): {dt:.3f} s")
    assert dt < 10.0
    assert plan.planned_epsilon <= 1.0


def test_impossible_settings_raise():
    with pytest.raises(PrivacyError, match="raise privacy.target_epsilon"):
        _plan(target_epsilon=1e-6, sample_rate=1.0, steps=10_000)
    with pytest.raises(PrivacyError, match="at least one"):
        _plan(steps=0)
    with pytest.raises(PrivacyError, match=r"\(0, 1\]"):
        _plan(sample_rate=0.0)
    with pytest.raises(PrivacyError, match=r"\(0, 1\]"):
        _plan(sample_rate=1.2)
    with pytest.raises(PrivacyError, match="must be < 1"):
        _plan(stats_fraction=0.6, mmd_fraction=0.5)
    with pytest.raises(PrivacyError, match="share must be > 0"):
        _plan(stats_fraction=0.0)
    with pytest.raises(PrivacyError, match="valid accountants"):
        _plan(accountant="moments")


def test_fixed_noise_multiplier_checked():
    ok = _plan(noise_multiplier=50.0)
    assert ok.sigma == 50.0 and ok.planned_epsilon <= 1.0
    with pytest.raises(PrivacyError, match="noise multiplier"):
        _plan(noise_multiplier=0.3)
    with pytest.raises(PrivacyError):
        _plan(noise_multiplier=0.0)


def test_one_shot_calibration_small_epsilon():
    sigma = calibrate_one_shot(epsilon=0.05, delta=1e-5, accountant="rdp")
    eps = epsilon_of([Mechanism(CLASS_STATS, sigma, 1.0, 1)], delta=1e-5, accountant="rdp")
    assert 0.05 * (1 - 2e-3) <= eps <= 0.05


# ----------------------------------------------------------------------------- ledger


def _charge_plan(ledger, plan):
    ledger.charge(CLASS_STATS, plan.noise_multiplier(CLASS_STATS), 1.0, "stats")
    ledger.charge(MMD_EMBEDDINGS, plan.noise_multiplier(MMD_EMBEDDINGS), 1.0, "mmd")
    for t in range(plan.steps):
        ledger.charge(DP_SGD, plan.sigma, plan.sample_rate, f"round={t // 5}/step={t % 5}")


def test_ledger_replay_semantics():
    led = PrivacyLedger([0, 1])
    first = led.charge(DP_SGD, 1.0, 0.1, "round=0/step=0", digest="aa")
    assert led.latest(DP_SGD, "round=0/step=0") == first and first.epoch == 0
    assert led.identical(first, 1.0, 0.1, "aa")  # identical replay: free
    assert not led.identical(first, 1.0, 0.1, "ab")  # another value: never free
    assert not led.identical(first, 1.0, 0.1, None)  # secure noise: every release is new
    assert not led.identical(first, 2.0, 0.1, "aa")  # another mechanism under the same key
    assert led.fresh_epoch(DP_SGD, "round=0/step=0") == 1 and led.fresh_epoch(DP_SGD, "round=0/step=1") == 0
    led.charge(DP_SGD, 1.0, 0.1, "round=0/step=0", epoch=1)  # charged again, under a fresh epoch
    assert len(led.records) == 2 and led.fresh_epoch(DP_SGD, "round=0/step=0") == 2
    led.charge(DP_SGD, 2.0, 0.1, "round=0/step=0", epoch=2)
    ((ids, hist),) = led.histories()
    assert ids.tolist() == [0, 1] and hist == [Mechanism(DP_SGD, 1.0, 0.1, 2), Mechanism(DP_SGD, 2.0, 0.1, 1)]
    with pytest.raises(PrivacyError, match="unknown mechanism"):
        led.charge("laplace", 1.0, 1.0, "x")


def test_ledger_file_survives_truncated_last_line(tmp_path):
    led = PrivacyLedger([0, 1, 2], run_dir=tmp_path)
    for t in range(3):
        led.charge(DP_SGD, 1.5, 0.1, f"step={t}")
    led.charge(CLASS_STATS, 30.0, 1.0, "stats")
    led.close()
    path = tmp_path / "ledger" / "rank_00000.jsonl"
    full = path.read_bytes()
    assert full.count(b"\n") == 5  # the block line and four records
    path.write_bytes(full[:-7])  # a write killed mid-line
    back = PrivacyLedger([0, 1, 2], run_dir=tmp_path)
    assert len(back.records) == 3 and back.histories()[0][1] == [Mechanism(DP_SGD, 1.5, 0.1, 3)]
    back.charge(DP_SGD, 1.5, 0.1, "step=3")  # appends cleanly after repair
    back.close()
    again = PrivacyLedger([0, 1, 2], run_dir=tmp_path)
    assert len(again.records) == 4 and again.steps(DP_SGD) == 4
    # a corrupt line in the middle is not silently skipped
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(PrivacyError, match="corrupt"):
        PrivacyLedger([0, 1, 2], run_dir=tmp_path)


def test_ledger_reopened_never_refunds(tmp_path):
    led = PrivacyLedger([0, 1], run_dir=tmp_path)
    for t in range(4):
        led.charge(DP_SGD, 1.0, 0.1, f"s{t}")
    led.close()
    resumed = PrivacyLedger([0, 1], run_dir=tmp_path)  # a resume: the charges are read back, never reset
    assert resumed.steps(DP_SGD) == 4 and resumed.session == 2
    resumed.charge(DP_SGD, 1.0, 0.1, "s4")
    resumed.close()
    assert PrivacyLedger([0, 1], run_dir=tmp_path).steps(DP_SGD) == 5
    assert PrivacyLedger(None, run_dir=tmp_path).steps(DP_SGD) == 5  # read only, every client
    with pytest.raises(PrivacyError, match="read only"):
        PrivacyLedger(None, run_dir=tmp_path).charge(DP_SGD, 1.0, 0.1, "s5")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_epsilon_equals_plan_and_guard(accountant):
    plan = _plan(accountant=accountant, steps=40, sample_rate=0.1)
    led = PrivacyLedger([0])
    assert history_fits([], [Mechanism(DP_SGD, plan.sigma, plan.sample_rate, plan.steps)], plan)
    _charge_plan(led, plan)
    assert led.epsilon(delta=DELTA, accountant=accountant) == pytest.approx(plan.planned_epsilon, rel=1e-9)
    assert not led.fits(DP_SGD, plan.sigma, plan.sample_rate, plan)
    assert history_fits(led.histories()[0][1], [], plan)
    rows = led.summary(delta=DELTA, accountant=accountant)
    assert [r["mechanism"] for r in rows] == [CLASS_STATS, MMD_EMBEDDINGS, DP_SGD]
    assert rows[2]["steps"] == plan.steps and rows[0]["epsilon_alone"] <= 0.1


def test_would_fit_counts_uncharged_one_shot_releases():
    plan = _plan(steps=60, sample_rate=0.1)
    led = PrivacyLedger([0])
    for t in range(plan.steps):
        led.charge(DP_SGD, plan.sigma, plan.sample_rate, f"s{t}")
    # one extra step spent now would leave no room for the statistics still to be released
    assert not led.fits(DP_SGD, plan.sigma, plan.sample_rate, plan)
    # a noisier extra step is judged exactly by the accountant
    assert led.fits(DP_SGD, 1e4, plan.sample_rate, plan) is True
    # re-releasing the statistics twice (secure noise) goes over the plan
    led.charge(CLASS_STATS, plan.noise_multiplier(CLASS_STATS), 1.0, "stats")
    led.charge(MMD_EMBEDDINGS, plan.noise_multiplier(MMD_EMBEDDINGS), 1.0, "mmd")
    assert not led.fits(CLASS_STATS, plan.noise_multiplier(CLASS_STATS), 1.0, plan)


def test_would_fit_fast_path_skips_accountant(monkeypatch):
    import fedhypevae.privacy.accounting as acc

    plan = _plan(steps=50)
    led = PrivacyLedger([0])
    calls = []
    monkeypatch.setattr(acc, "epsilon_of", lambda *a, **k: calls.append(1) or 0.0)
    for t in range(plan.steps):
        assert led.fits(DP_SGD, plan.sigma, plan.sample_rate, plan)
        led.charge(DP_SGD, plan.sigma, plan.sample_rate, f"s{t}")
    assert calls == []
