"""The integer path of the aggregate: fixed-point encoding, Skellam noise shares and their accounting.

Secure aggregation (`fedhypevae.hpc.secagg`) sums integers modulo 2**bits, so what a rank contributes to the Phi
aggregate is an integer vector:

* **Encoding.** The rank's pre-noise partial sum P_r = sum_{i on r} a_i * (client i's clipped Phi sum) is divided
  by the grid gamma and rounded to the nearest integer (deterministic, `torch.round`). One record of client i moves
  P_r by at most a_i C in L2 norm, so its rounded value by at most a_i C / gamma + sqrt(d) (every coordinate's
  rounding can flip by one): the integer L2 sensitivity Delta2 = A + sqrt(d), A = max_i a_i C / gamma, and the L1
  sensitivity Delta1 = Delta2 * min(sqrt(d), Delta2) (an integer vector's |x|_1 <= |x|_2^2 and <= sqrt(d) |x|_2).
  The rank hosts its clients, so rounding their sum (not each client's) gives the same sensitivity and costs no
  per-client Phi vectors; the sum then depends on the placement only through the roundings (<= gamma/2 per
  coordinate and rank).
* **Skellam shares.** Every rank adds an integer share Sk(v_r/2, v_r/2) = Poisson(v_r/2) - Poisson(v_r/2) per
  coordinate (variance v_r). Skellam is closed under sums, so the shares of any set of ranks sum to a Skellam of the
  summed variance: the shares unknown to the trust model's coalition carry mu = sigma^2 * Delta2^2, the Gaussian
  rule of `DistributedTrust` in grid units. A rank's share is the sum of its clients' shares in distribution, drawn
  once per rank (the rank holds its clients' data anyway): 2 d Poisson draws a step per rank, not per client.
* **Accounting** (`integer_rdp`). The Skellam mechanism's RDP (Agarwal, Kairouz and Liu 2021, Thm 3.5), for integer
  order alpha > 1 and per-coordinate variance mu:
      eps(alpha) <= alpha Delta2^2 / (2 mu) + min(((2 alpha - 1) Delta2^2 + 6 Delta1) / (4 mu^2), 3 Delta1 / (2 mu)).
  In strict mode the same record also moves the client's own psi_i, v_i (Gaussian at sigma, jointly clipped to C
  with its Phi part); the joint step's leading term is alpha f / (2 sigma^2) with f >= 1 the largest over the split
  of C between the two parts (`rounding_excess`: the sqrt(d) of the rounding does not shrink with the Phi part's
  share). Poisson subsampling at rate q (`subsampled_rdp`): for integer alpha, the "add" direction is exactly
      E_Q[(1 - q + q L)^alpha] = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k-1) D_k(P||Q)),   L = dP/dQ,
  bounded term by term with eps(k); the "remove" direction E_Q[(1 - q + q L)^(1-alpha)] is never larger because the
  pair is SYMMETRIC (`symmetric_dominates`): the noise (Skellam, Gaussian) is symmetric, so the reflection about the
  midpoint of the two means swaps P and Q and turns L into 1/L. The law of log L under Q is then a mixture of
  two-point laws {+a with mass 1/(1+e^a), -a with mass e^a/(1+e^a)} (and an atom at 0), both directions are linear
  in it, and for one such pair, with u = 1 + q(e^a - 1) and w = 1 - q(1 - e^-a),
      add    (1 + e^a) E = u^alpha + e^a w^alpha,       remove (1 + e^a) E = u^(1-alpha) + e^a w^(1-alpha),
  and add - remove = (u - 1)(h(u) - h(1/w)) with h(t) = (t^alpha - t^(1-alpha)) / (t - 1) = sum_{|j| < alpha} t^j,
  which increases on [1, inf), h(w) = h(1/w), and u w = 1 + q (1-q) (e^a - 1)(1 - e^-a) >= 1. This is the formula
  Mironov, Talwar and Zhang (2019) give for the Gaussian, here for any symmetric pair; with eps(k) = k/(2 sigma^2)
  it reproduces Opacus' sampled-Gaussian RDP (tests/test_integer.py). The general bound of Zhu and Wang (2019,
  Thm 6), with weight 3 on the terms k >= 3, needs no symmetry (`symmetric=False`). Never above the unsubsampled
  curve. Fractional orders take the curve at ceil(alpha) (RDP is non-decreasing in alpha), so the curve composes
  with the Gaussian ones on the accountant's orders.
* **Overflow** (`overflow_probability`, `check_bits`). The true sum is lifted from modulo 2**bits correctly while
  every coordinate stays within 2**(bits-1): the signal is at most sum_i a_i n_i C / gamma + ranks/2 (every record
  of every client in the batch, clipped), the noise a Skellam of the total variance with Bennett's tail
  (P(|Sk| >= t) <= 2 exp(-V h(t/V)), h(u) = (1+u) log(1+u) - u). The probability that any coordinate of any step
  wraps must be at most OVERFLOW_SHARE * delta; the accountant then uses delta * (1 - OVERFLOW_SHARE), so the run's
  (epsilon, delta) holds with the overflow inside delta.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

#: the part of delta given to the event that a coordinate of the integer sum wraps around
OVERFLOW_SHARE = 1e-6
#: default grid: the rounding adds at most 1 / GRID_RATIO to the sensitivity (A = GRID_RATIO * sqrt(d))
GRID_RATIO = 100.0
#: torch.poisson draws in float64: its rate must keep every value exactly representable
MAX_POISSON_RATE = 2.0**48
#: orders above this take the unsubsampled curve (as the Gaussian accountant does above Opacus' orders)
SUBSAMPLED_UP_TO = 256


# --------------------------------------------------------------------------- accounting


def rounding_excess(A: float, r: float) -> float:
    """max over c in [0, 1] of (1 - c^2) + (A c + r)^2 / (A + r)^2: the strict step's leading RDP factor when one
    record's clipped gradient puts c of C on Phi (rounded to the grid, sensitivity A c + r) and the rest on the own
    block (Gaussian). 1 when r = 0."""
    if r <= 0:
        return 1.0
    B = A + r
    u = A * A / (2 * A + r)  # the stationary point of the concave quadratic in u = A c
    return max(1.0, 1.0 - (u / A) ** 2 + ((u + r) / B) ** 2)


def skellam_rdp(alpha: np.ndarray, *, l2: float, l1: float, mu: float) -> np.ndarray:
    """Agarwal et al. (2021) Thm 3.5: RDP at integer orders `alpha` of adding Sk(mu/2, mu/2) per coordinate to an
    integer function of L2/L1 sensitivity l2/l1."""
    a = np.asarray(alpha, dtype=float)
    extra = np.minimum(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))
    return a * l2 * l2 / (2 * mu) + extra


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def symmetric_dominates(a: float, q: float, alpha: float) -> tuple:
    """(log add, log remove): the logs of E_Q[(1-q+qL)^alpha] and E_Q[(1-q+qL)^(1-alpha)] for the two-point
    symmetric privacy loss +-a (module docstring); remove <= add is the lemma the symmetric bound rests on (checked
    by the tests)."""
    lu = math.log1p(q * math.expm1(a))  # log u, u = 1 + q (e^a - 1)
    lw = math.log1p(-q * -math.expm1(-a))  # log w, w = 1 - q (1 - e^-a)
    norm = math.log1p(math.exp(a)) if a < 700 else a
    add = float(np.logaddexp(alpha * lu, a + alpha * lw)) - norm
    remove = float(np.logaddexp((1 - alpha) * lu, a + (1 - alpha) * lw)) - norm
    return add, remove


def subsampled_rdp(alpha: int, q: float, eps: np.ndarray, *, symmetric: bool = True) -> float:
    """An upper bound on the RDP at integer order `alpha` >= 2 of the Poisson-subsampled (rate q) mechanism whose RDP
    at orders 2..alpha is eps[2..alpha] (eps indexed by order), never above eps[alpha]. `symmetric`: the mechanism's
    neighbouring pairs are symmetric (module docstring): the add direction's exact expansion bounds both directions.
    Otherwise Zhu and Wang (2019), Thm 6 (weight 3 on the terms of order >= 3)."""
    from scipy.special import logsumexp

    if q >= 1.0:
        return float(eps[alpha])
    if alpha < 2:
        raise ValueError(f"order must be an integer >= 2; got {alpha}")
    lq, l1q = math.log(q), math.log1p(-q)
    ls = np.arange(2, alpha + 1, dtype=float)
    terms = _log_comb(alpha, ls) + ls * lq + (alpha - ls) * l1q + (ls - 1) * eps[2 : alpha + 1]
    weights = np.ones_like(ls) if symmetric else np.where(ls == 2, 1.0, 3.0)
    terms = np.concatenate([[(alpha - 1) * l1q + math.log(alpha * q - q + 1)], terms])
    weights = np.concatenate([[1.0], weights])
    bound = float(logsumexp(terms, b=weights)) / (alpha - 1)
    return min(bound, float(eps[alpha]))


@functools.lru_cache(maxsize=64)
def integer_rdp(q: float, sigma: float, A: float, dim: int, orders: tuple) -> np.ndarray:
    """One step's RDP curve on the integer path at the accountant's `orders` (fractional orders at their ceiling):
    Skellam of variance sigma^2 Delta2^2 on the rounded Phi aggregate (Delta2 = A + sqrt(dim)), the own block's
    Gaussian folded in through `rounding_excess`, Poisson-subsampled at q (a symmetric pair: Skellam and Gaussian
    noise, a shift between neighbours). Read-only array."""
    r = math.sqrt(dim)
    l2 = A + r
    l1 = l2 * min(r, l2)
    mu = sigma * sigma * l2 * l2
    f = rounding_excess(A, r)
    top = int(math.ceil(max(orders)))
    ints = np.arange(top + 1, dtype=float)
    eps = skellam_rdp(ints, l2=l2, l1=l1, mu=mu) + ints * (f - 1.0) / (2 * sigma * sigma)
    eps[:2] = 0.0  # unused (orders start at 2)
    cache: dict = {}
    out = []
    for a in orders:
        k = max(2, int(math.ceil(a)))
        if k not in cache:  # above SUBSAMPLED_UP_TO the unsubsampled curve (a valid bound; only q = 1 needs them)
            cache[k] = subsampled_rdp(k, q, eps) if k <= SUBSAMPLED_UP_TO else float(eps[k])
        out.append(cache[k])
    curve = np.asarray(out, dtype=float)
    curve.setflags(write=False)
    return curve


def integer_params(*, phi_dim: int, stats_dim: int, grid_ratio: float) -> dict:
    """{mechanism: Mechanism.integer (A, dim)} of a run's releases on the integer path: the DP-SGD steps (Phi's size)
    and the class statistics (one meta-code domain's flat vector; every component divided by its sensitivity). The
    grid is set by the ratio, so A = ratio * sqrt(dim) whatever the sensitivity."""
    from .accounting import CLASS_STATS, DP_SGD

    return {
        DP_SGD: (grid_ratio * math.sqrt(phi_dim), float(phi_dim)),
        CLASS_STATS: (grid_ratio * math.sqrt(stats_dim), float(stats_dim)),
    }


# --------------------------------------------------------------------------- encoding, noise, overflow


@dataclass(frozen=True)
class IntegerEncoding:
    """The grid and modulus of the Phi aggregate: gamma (the grid), bits (the modulus 2**bits), dim (Phi's size) and
    A = delta_max * C / gamma (the un-rounded sensitivity in grid units)."""

    grid: float
    bits: int
    dim: int
    A: float

    @property
    def l2(self) -> float:
        """Delta2: the integer L2 sensitivity of a rank's rounded partial sum."""
        return self.A + math.sqrt(self.dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """round(x / gamma) as int64 (x: the rank's float64 partial sum)."""
        return torch.round(x.double() / self.grid).to(torch.int64)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.double() * self.grid

    def grid_variance(self, float_variance: float) -> float:
        """The Skellam variance, in grid units, of a share whose Gaussian counterpart (the simulation's rule) has
        `float_variance`, scaled by (Delta2 / A)^2 for the rounding's part of the sensitivity."""
        return float_variance / self.grid**2 * (self.l2 / self.A) ** 2

    def describe(self) -> dict:
        return {"grid": self.grid, "bits": self.bits, "dim": self.dim, "l2_sensitivity": self.l2, "A": self.A}


def make_encoding(*, sensitivity: float, dim: int, bits: int, grid_ratio: float = GRID_RATIO) -> IntegerEncoding:
    """The encoding of a release of `dim` coordinates whose L2 sensitivity (before rounding) is `sensitivity`: the
    grid sensitivity / (ratio sqrt(dim)), so that A = ratio sqrt(dim) and the rounding adds 1/ratio to it (the Phi
    aggregate: max_i a_i C; the class statistics, each component over its own: sqrt(m))."""
    grid = sensitivity / (grid_ratio * math.sqrt(dim))
    if not (grid > 0 and math.isfinite(grid)):
        raise ConfigError(f"secure aggregation: the grid must be a positive number; got {grid}")
    return IntegerEncoding(float(grid), int(bits), int(dim), sensitivity / float(grid))


def skellam(variance: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of Sk(variance/2, variance/2) as int64, from `generator` (two float64 Poisson vectors)."""
    lam = variance / 2.0
    if not 0 <= lam <= MAX_POISSON_RATE:
        raise ConfigError(
            f"a Skellam share of variance {variance:.4g} (grid units) is beyond the exact range of the Poisson "
            "sampler: the grid is too fine for this noise; lower privacy.secure_grid_ratio"
        )
    if lam == 0:
        return torch.zeros(n, dtype=torch.int64)
    rates = torch.full((n,), lam, dtype=torch.float64)
    a = torch.poisson(rates, generator=generator)
    b = torch.poisson(rates, generator=generator)
    return (a - b).to(torch.int64)


def _bennett_log_tail(V: float, t: float) -> float:
    """log of Bennett's bound on P(Sk >= t) for a Skellam of variance V (one side)."""
    if V <= 0:
        return 0.0 if t <= 0 else -math.inf
    u = t / V
    return -V * ((1 + u) * math.log1p(u) - u)


def overflow_probability(
    enc: IntegerEncoding, *, signal: float, ranks: int, variance: float, releases: int, headroom: int = 0
) -> float:
    """An upper bound on the probability that some coordinate of some of `releases` integer sums leaves
    [-2**(bits-1-headroom), 2**(bits-1-headroom)): the signal bound `signal` (float units) over the grid plus the
    roundings, and the total Skellam noise of `variance` (grid units). `headroom` 1: the noise gets half the range
    (the signal is checked against the other half at every step)."""
    half = 2.0 ** (enc.bits - 1 - headroom)
    t = half - 1 - (signal / enc.grid + ranks / 2.0)
    if t <= 0:
        return 1.0
    per_coord = 2.0 * math.exp(_bennett_log_tail(variance, t))
    return min(1.0, per_coord * enc.dim * releases)


def check_bits(
    enc: IntegerEncoding, *, signal: float, ranks: int, variance: float, releases: int, delta: float, headroom: int = 0
) -> float:
    """ConfigError unless the probability of a wrap-around over the run is at most OVERFLOW_SHARE * delta; returns
    that probability's bound."""
    kw = dict(signal=signal, ranks=ranks, variance=variance, releases=releases, headroom=headroom)
    p = overflow_probability(enc, **kw)
    if p > OVERFLOW_SHARE * delta:
        need = enc.bits
        while need < 64 and overflow_probability(IntegerEncoding(enc.grid, need, enc.dim, enc.A), **kw) > (
            OVERFLOW_SHARE * delta
        ):
            need += 1
        ok64 = overflow_probability(IntegerEncoding(enc.grid, 64, enc.dim, enc.A), **kw) <= OVERFLOW_SHARE * delta
        hint = f"at least {need} bits" if ok64 else "a coarser grid (a lower privacy.secure_grid_ratio)"
        raise ConfigError(
            f"privacy.secure_bits={enc.bits}: the integer sum could wrap around (probability bound "
            f"{p:.3g} over {releases} releases, allowed {OVERFLOW_SHARE * delta:.3g} = {OVERFLOW_SHARE:g} x delta) "
            f"with grid {enc.grid:.4g}; use {hint}"
        )
    return p
