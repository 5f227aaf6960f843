"""The integer path of secure aggregation (privacy/integer.py): the Skellam accounting against reference
computations, the subsampling bound, the encoding's sensitivity, the Skellam sampler, the overflow check, and the
integer mechanism in the accountant and the ledger."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import skellam as sk

from fedhypevae.errors import ConfigError, PrivacyError
from fedhypevae.privacy import PrivacyLedger
from fedhypevae.privacy.accounting import Mechanism, _rdp_orders, epsilon_of
from fedhypevae.privacy.integer import (
    GRID_RATIO,
    IntegerEncoding,
    check_bits,
    make_encoding,
    overflow_probability,
    rounding_excess,
    skellam,
    skellam_rdp,
    subsampled_rdp,
    symmetric_dominates,
)


def _logpmf(mu: float, delta: int):
    """log pmf of Sk(mu/2, mu/2) (variance mu) on a grid wide enough for the divergences below, and its shift."""
    half = int(40 * math.sqrt(mu)) + 4 * delta + 50
    k = np.arange(-half, half + 1)
    return sk.logpmf(k, mu / 2, mu / 2), sk.logpmf(k - delta, mu / 2, mu / 2)


def exact_renyi(alpha: int, mu: float, delta: int) -> float:
    """D_alpha(Sk + delta || Sk), summed numerically: the reference the bound must stay above."""
    lq, lp = _logpmf(mu, delta)
    ok = np.isfinite(lq) & np.isfinite(lp)
    return float(logsumexp(alpha * lp[ok] + (1 - alpha) * lq[ok])) / (alpha - 1)


def exact_subsampled(alpha: int, mu: float, delta: int, q: float) -> float:
    """max over both directions of D_alpha between (1-q) Sk + q (Sk + delta) and Sk, summed numerically."""
    lq, lp = _logpmf(mu, delta)
    ok = np.isfinite(lq) & np.isfinite(lp)
    lq, lp = lq[ok], lp[ok]
    lmix = np.logaddexp(math.log1p(-q) + lq, math.log(q) + lp)
    a = float(logsumexp(alpha * lmix + (1 - alpha) * lq)) / (alpha - 1)
    b = float(logsumexp(alpha * lq + (1 - alpha) * lmix)) / (alpha - 1)
    return max(a, b)


@pytest.mark.parametrize("mu,delta", [(50.0, 1), (400.0, 3), (5000.0, 10)])
def test_the_skellam_bound_holds_against_the_exact_divergence_and_is_close_to_it(mu, delta):
    for alpha in (2, 4, 8, 16):
        bound = float(skellam_rdp(np.array([alpha]), l2=delta, l1=delta, mu=mu)[0])
        exact = exact_renyi(alpha, mu, delta)
        assert exact <= bound * (1 + 1e-9), (alpha, exact, bound)
        gauss = alpha * delta**2 / (2 * mu)
        assert bound <= gauss * 1.2 + 1e-12  # at these variances the integer noise costs little over the Gaussian
        assert exact >= 0.8 * gauss  # and the reference really is near it (the test can tell a wrong formula)


@pytest.mark.parametrize("mu,delta,q", [(20.0, 2, 0.2), (100.0, 5, 0.05), (10.0, 1, 0.5)])
def test_the_subsampling_bound_holds_against_the_exact_mixture_divergence(mu, delta, q):
    orders = np.arange(0, 13)
    eps = skellam_rdp(orders.astype(float), l2=delta, l1=delta, mu=mu)
    eps[:2] = 0.0
    for alpha in range(2, 13):
        bound = subsampled_rdp(alpha, q, eps)  # the symmetric pair's bound (the one the accountant uses)
        general = subsampled_rdp(alpha, q, eps, symmetric=False)  # Zhu and Wang's, for any mechanism
        exact = exact_subsampled(alpha, mu, delta, q)
        assert exact <= bound * (1 + 1e-9) and bound <= general + 1e-12, (alpha, exact, bound, general)
        assert bound <= eps[alpha] + 1e-12  # never above the unsubsampled curve
    assert subsampled_rdp(5, 1.0, eps) == eps[5]


def test_the_symmetric_bound_is_opacus_sampled_gaussian_on_the_gaussian_curve():
    """The reference computation: with the Gaussian's eps(k) = k / (2 sigma^2) the symmetric bound is the
    sampled-Gaussian RDP of Mironov, Talwar and Zhang (Opacus' compute_rdp) at integer orders."""
    from opacus.accountants.analysis.rdp import compute_rdp

    for q, sigma in [(0.25, 1.1), (0.01, 2.0), (0.5, 5.0)]:
        ks = np.arange(0, 41, dtype=float)
        eps = ks / (2 * sigma**2)
        orders = [2, 3, 5, 8, 13, 21, 34, 40]
        ours = [subsampled_rdp(a, q, eps) for a in orders]
        ref = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
        assert np.allclose(ours, ref, rtol=1e-9, atol=1e-12), (q, sigma, ours, list(ref))


def test_the_remove_direction_never_exceeds_the_add_direction_for_a_symmetric_pair():
    """The lemma the symmetric bound rests on (privacy/integer.py), on a grid of two-point privacy losses +-a."""
    worst = 0.0
    for a in np.concatenate([np.linspace(1e-3, 2, 40), np.linspace(2, 30, 40)]):
        for q in (1e-3, 0.01, 0.1, 0.25, 0.5, 0.9, 0.999):
            for alpha in (2, 3, 4, 7, 16, 64, 200):
                add, remove = symmetric_dominates(float(a), q, alpha)  # logs
                assert remove <= add + 1e-12 * max(1.0, abs(add)), (a, q, alpha, add, remove)
                worst = max(worst, remove - add)
    assert worst <= 1e-9
    # without the symmetry it fails: L in {1.5, 0.01} under Q (E_Q[L] = 1), q = 0.9, alpha = 10
    L = np.array([1.5, 0.01])
    w = np.array([(1 - L[1]) / (L[0] - L[1]), 0.0])
    w[1] = 1 - w[0]
    add = float((w * (1 - 0.9 + 0.9 * L) ** 10).sum())
    remove = float((w * (1 - 0.9 + 0.9 * L) ** -9).sum())
    assert remove > add


def test_rounding_excess_is_the_largest_split():
    A, r = 1000.0, 30.0
    cs = np.linspace(0, 1, 100001)
    brute = float(np.max((1 - cs**2) + ((A * cs + r) / (A + r)) ** 2))
    assert rounding_excess(A, r) == pytest.approx(brute, rel=1e-9)
    assert rounding_excess(A, 0.0) == 1.0 and rounding_excess(A, r) > 1.0


def test_integer_epsilon_beside_the_gaussian():
    """At the default grid the integer mechanism costs what the Gaussian does: within 1 % unsubsampled (q = 1) and
    subsampled (the symmetric bound), and never less at these settings."""
    d = 6864
    integer = (GRID_RATIO * math.sqrt(d), d)
    one = epsilon_of([Mechanism("dp-sgd", 5.0, 1.0, 1, integer)], delta=1e-5, accountant="rdp")
    ref = epsilon_of([Mechanism("dp-sgd", 5.0, 1.0, 1)], delta=1e-5, accountant="rdp")
    assert ref <= one <= ref * 1.01
    sub = epsilon_of([Mechanism("dp-sgd", 2.0, 0.2, 30, integer)], delta=1e-5, accountant="rdp")
    gsub = epsilon_of([Mechanism("dp-sgd", 2.0, 0.2, 30)], delta=1e-5, accountant="rdp")
    assert gsub <= sub <= gsub * 1.01
    with pytest.raises(PrivacyError, match="prv accountant cannot account the integer"):
        epsilon_of([Mechanism("dp-sgd", 2.0, 0.2, 30, integer)], delta=1e-5, accountant="prv")


def test_encoding_sensitivity_is_a_plus_sqrt_d():
    g = torch.Generator().manual_seed(0)
    enc = make_encoding(sensitivity=0.01, dim=500, bits=64)
    assert enc.A == pytest.approx(GRID_RATIO * math.sqrt(500))
    worst = 0.0
    for _ in range(200):
        x = torch.randn(500, generator=g, dtype=torch.float64) * 0.3
        step = torch.randn(500, generator=g, dtype=torch.float64)
        y = x + step / step.norm() * 0.01  # one record's largest move: delta_max * C in L2
        diff = (enc.encode(y) - enc.encode(x)).double().norm().item()
        worst = max(worst, diff)
    assert worst <= enc.l2 and worst > enc.A * 0.99
    z = enc.encode(torch.tensor([0.1234567, -2.0], dtype=torch.float64))
    assert torch.allclose(enc.decode(z), torch.tensor([0.1234567, -2.0], dtype=torch.float64), atol=enc.grid / 2)


def test_skellam_shares_have_their_variance_and_are_keyed():
    g = torch.Generator().manual_seed(3)
    a = skellam(50.0, 200_000, g)
    assert a.dtype == torch.int64
    assert abs(float(a.double().mean())) < 0.1 and float(a.double().var()) == pytest.approx(50.0, rel=0.02)
    b = skellam(50.0, 200_000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(skellam(0.0, 4, g), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ConfigError, match="grid is too fine"):
        skellam(2.0**60, 4, g)


def test_the_overflow_check_refuses_a_bit_width_that_is_too_small():
    enc = IntegerEncoding(grid=1e-6, bits=24, dim=10_000, A=1e4)
    with pytest.raises(ConfigError, match=r"privacy.secure_bits=24.*use at least \d+ bits"):
        check_bits(enc, signal=1.0, ranks=2, variance=1e12, releases=1000, delta=1e-5)
    wide = IntegerEncoding(grid=1e-6, bits=64, dim=10_000, A=1e4)
    p = check_bits(wide, signal=1.0, ranks=2, variance=1e12, releases=1000, delta=1e-5)
    assert p <= 1e-11
    assert overflow_probability(enc, signal=1e12, ranks=2, variance=1.0, releases=1) == 1.0


def test_the_ledger_keeps_the_integer_mechanism_apart(tmp_path):
    integer = (8000.0, 6400.0)
    led = PrivacyLedger([0, 1], run_dir=tmp_path, rank=0, world_size=1, fsync=False)
    led.charge("dp-sgd", 1.5, 0.2, "round=0/step=0", integer=integer)
    led.charge("dp-sgd", 1.5, 0.2, "round=0/step=1")
    led.close()
    again = PrivacyLedger([0, 1], run_dir=tmp_path, rank=0, world_size=1, fsync=False)
    hist = again.history(0)
    assert sorted(m.integer for m in hist) == [(), integer]
    assert again.epsilon(delta=1e-5, accountant="rdp") == pytest.approx(epsilon_of(hist, delta=1e-5, accountant="rdp"))
    rec = [r for r in again.client_records(0) if r.integer][0]
    assert rec.public()["integer"] == list(integer)
    m = Mechanism("dp-sgd", 1.5, 0.2, 3, integer)
    assert Mechanism(**m.to_dict()) == m and "integer" not in Mechanism("dp-sgd", 1.5, 0.2, 3).to_dict()
    orders = _rdp_orders()
    assert len(orders) > 60
