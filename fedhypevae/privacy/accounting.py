"""Privacy accounting: composed epsilon, budget planning and the budget guard.

Everything a client releases is one of three Gaussian mechanisms on the same private
records, and all of them are composed in ONE accountant history (docs/DESIGN.md §2, §3):

* ``dp-sgd``         : Poisson-subsampled Gaussian, (sigma, q, T) — one entry per step;
* ``class-stats``    : the class statistics for the meta-code, (sigma_s, q=1, steps=1);
* ``mmd-embeddings`` : the DP random-feature mean embeddings (DP-MERF), (sigma_m, 1, 1).

``epsilon_of`` composes such a history with Opacus' RDP or PRV analysis,
``plan_budget`` calibrates the noise multipliers from the target (epsilon, delta) BEFORE
training, and ``history_fits`` is the budget guard's test. What a client actually released
is recorded in the privacy ledger (``ledger.py``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields

from ..errors import PrivacyError

DP_SGD = "dp-sgd"
CLASS_STATS = "class-stats"
MMD_EMBEDDINGS = "mmd-embeddings"
MECHANISM_NAMES = (DP_SGD, CLASS_STATS, MMD_EMBEDDINGS)
ONE_SHOT = (CLASS_STATS, MMD_EMBEDDINGS)

#: largest noise multiplier the planner will consider; beyond it the run would be pure noise
MAX_SIGMA = 1e4
#: relative tolerance of the calibration: planned_epsilon in [target*(1-rtol), target]
CALIBRATION_RTOL = 1e-3


# --------------------------------------------------------------------------- mechanisms


@dataclass(frozen=True)
class Mechanism:
    """``steps`` compositions of a (Poisson-subsampled) Gaussian mechanism.

    ``noise_multiplier`` is the noise std divided by the L2 sensitivity of the release;
    ``sample_rate`` is the Poisson rate (1.0 for a one-shot release on the whole data).
    """

    name: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    # () for the Gaussian; (A, dim) for DP-SGD on the integer path of secure aggregation (privacy/integer.py): Skellam
    # noise of variance sigma^2 (A + sqrt(dim))^2 on the rounded aggregate, A its un-rounded sensitivity in grid units
    integer: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "integer", tuple(float(x) for x in self.integer))

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.integer:
            del d["integer"]  # the Gaussian's record as before
        else:
            d["integer"] = list(self.integer)
        return d


def validate_mechanism(m: Mechanism) -> None:
    """Reject values no accountant can interpret, with a message a user can act on."""
    if not (m.noise_multiplier >= 0 and math.isfinite(m.noise_multiplier)):
        raise PrivacyError(f"{m.name}: noise multiplier must be a finite number >= 0; got {m.noise_multiplier}")
    if not (0 < m.sample_rate <= 1):
        raise PrivacyError(f"{m.name}: sample rate must be in (0, 1]; got {m.sample_rate}")
    if int(m.steps) != m.steps or m.steps < 0:
        raise PrivacyError(f"{m.name}: steps must be an integer >= 0; got {m.steps}")
    if m.integer and not (
        len(m.integer) == 2 and m.integer[0] > 0 and m.integer[1] >= 1 and all(map(math.isfinite, m.integer))
    ):
        raise PrivacyError(f"{m.name}: the integer path's parameters must be (A > 0, dim >= 1); got {m.integer}")


# --------------------------------------------------------------------------- accountants

# Opacus' default orders stop at 63. A single release at small epsilon (large sigma) is
# optimal near alpha ~ sigma*sqrt(2 log(1/delta)), i.e. in the hundreds or thousands, so
# the RDP bound would be loose without the larger orders below.
_EXTRA_ORDERS = [64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 10000]


# Opacus' RDPAccountant.DEFAULT_ALPHAS (tests/test_privacy_accounting.py compares them), written here because importing
# `opacus.accountants` costs ~3 s (below)
_OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _rdp_orders() -> list:
    return _OPACUS_ORDERS + _EXTRA_ORDERS


@functools.lru_cache(maxsize=1)
def opacus_rdp():
    """Opacus' RDP analysis, the module `opacus.accountants.analysis.rdp` (compute_rdp, get_privacy_spent).

    Imported through its package, it runs `opacus/__init__`, which imports the privacy engine, its optimizers
    (torch.distributed.tensor, sympy) and every accountant (scipy.stats): ~3 s of every rank's start on a 2-core
    machine, for a module that itself needs only numpy and scipy.special. So unless opacus is imported already, the
    module's own file is executed by itself: the same file, the same functions (tests/test_privacy_accounting.py
    compares them with the package's). Should that file be missing or fail, the package import is used."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "opacus.accountants.analysis.rdp"
    if name not in sys.modules:
        spec = importlib.util.find_spec("opacus")  # finds the package without importing it
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / "accountants" / "analysis" / "rdp.py"
            file_spec = importlib.util.spec_from_file_location("fedhypevae._opacus_rdp", path)
            if path.is_file() and file_spec is not None and file_spec.loader is not None:
                module = importlib.util.module_from_spec(file_spec)
                try:
                    file_spec.loader.exec_module(module)
                    return module
                except Exception:  # noqa: BLE001 - any failure: the regular import below
                    pass
    from opacus.accountants.analysis import rdp

    return rdp


def _rdp_of(m: Mechanism, orders: list):
    """RDP curve of one mechanism at ``orders`` (numpy array): ``steps`` times the curve of one step
    (`_rdp_per_step`, cached: a run asks for the same (q, sigma) every round).

    Opacus' exact subsampled-Gaussian RDP at orders in the thousands costs ~0.1 s per call,
    which would make calibration slow. For q < 1 and the extra (> 63) orders we use the
    RDP of the *un*-subsampled Gaussian, steps*alpha/(2 sigma^2): Poisson subsampling never
    increases Renyi divergence (joint quasi-convexity), so this is a valid upper bound, and
    those orders are only optimal for few, very noisy releases where q = 1 anyway.
    """
    if m.integer:
        from .integer import integer_rdp

        A, dim = m.integer
        return integer_rdp(float(m.sample_rate), float(m.noise_multiplier), A, int(dim), tuple(orders)) * m.steps
    return _rdp_per_step(float(m.sample_rate), float(m.noise_multiplier), tuple(orders)) * m.steps


@functools.lru_cache(maxsize=256)
def _rdp_per_step(q: float, sigma: float, orders: tuple):
    """One step's RDP curve; Opacus' `compute_rdp(steps=s)` is this curve times s (so the cache changes no
    number). Read-only: callers multiply, which makes a new array."""
    import numpy as np

    rdp_analysis = opacus_rdp()
    orders = list(orders)
    n_default = len(orders) - len(_EXTRA_ORDERS)
    if q >= 1.0:
        curve = np.asarray(rdp_analysis.compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=orders), dtype=float)
    else:
        low = sampled_gaussian_rdp(q, sigma, orders[:n_default])
        if low is None:  # outside what the vectorized form handles exactly: Opacus' own loop
            low = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders[:n_default])
        high = np.asarray(orders[n_default:], dtype=float) / (2 * sigma**2)
        curve = np.concatenate([np.asarray(low, dtype=float), high])
    curve.setflags(write=False)
    return curve


#: series terms of the fractional orders evaluated per block (`sampled_gaussian_rdp`)
_TERMS_BLOCK = 64
_TERMS_MAX = 1 << 16


def sampled_gaussian_rdp(q: float, sigma: float, orders: list):
    """Opacus' `compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)` for 0 < q < 1, sigma > 0, evaluated
    with numpy over every order at once: the same series (Mironov, Talwar and Zhang 2019, Sec. 3.3), the same
    terms (scipy's `binom`, `log_ndtr`), the same stopping rule for the fractional orders (the first term whose two
    parts are both below e^-30 is the last), summed in log space with a log-sum-exp instead of Opacus' running
    log-add, so equal to its result up to floating-point rounding (tests/test_privacy_accounting.py: 1e-11 over a
    grid). Opacus' loop costs ~75 ms a curve, mostly the fractional orders' Python series; this ~7 ms: the noise
    calibration of every run's start evaluates ~20 curves. None where a sum is not positive and finite (Opacus'
    log-subtraction would raise there): the caller then asks Opacus."""
    import numpy as np
    from scipy import special

    a = np.asarray(orders, dtype=float)
    out = np.empty(len(a))
    is_int = a == np.round(a)
    s2 = 2.0 * sigma**2
    lq, l1q = math.log(q), math.log(1 - q)
    # integer orders: log A_alpha = logsumexp_i [log C(alpha, i) + i log q + (alpha - i) log(1 - q) + (i^2 - i)/(2 s^2)]
    if is_int.any():
        ai = a[is_int]
        i = np.arange(int(ai.max()) + 1, dtype=float)[None, :]
        with np.errstate(divide="ignore"):
            t = np.log(special.binom(ai[:, None], i)) + i * lq + (ai[:, None] - i) * l1q + (i * i - i) / s2
        t = np.where(i <= ai[:, None], t, -np.inf)
        m = t.max(1)
        out[is_int] = (m + np.log(np.exp(t - m[:, None]).sum(1))) / (ai - 1)
    if (~is_int).any():  # the two integrals over (-inf, z0] and [z0, inf), each a signed series in i
        af = a[~is_int][:, None]
        z0 = sigma**2 * math.log(1 / q - 1) + 0.5
        parts, n = [], 0
        while True:
            i = np.arange(n, n + _TERMS_BLOCK, dtype=float)[None, :]
            coef = special.binom(af, i)
            lc, j = np.log(np.abs(coef)), af - i
            # Opacus' log(0.5) + log(erfc(x)) with log(erfc(x)) = log(2) + log_ndtr(-x sqrt(2)): the logs cancel
            e0 = special.log_ndtr(-((i - z0) / (math.sqrt(2) * sigma)) * 2**0.5)
            e1 = special.log_ndtr(-((z0 - j) / (math.sqrt(2) * sigma)) * 2**0.5)
            s0 = lc + i * lq + j * l1q + (i * i - i) / s2 + e0
            s1 = lc + j * lq + i * l1q + (j * j - j) / s2 + e1
            parts.append((np.sign(coef), s0, s1))
            n += _TERMS_BLOCK
            small = np.maximum(s0, s1) < -30
            if small.any(1).all() or n >= _TERMS_MAX:
                break
        sign, s0, s1 = (np.concatenate(x, axis=1) for x in zip(*parts))
        if not (np.maximum(s0, s1) < -30).any(1).all():
            return None
        last = np.argmax(np.maximum(s0, s1) < -30, axis=1)  # Opacus adds that term, then stops
        keep = np.arange(s0.shape[1])[None, :] <= last[:, None]

        def signed_logsumexp(x):
            x = np.where(keep, x, -np.inf)
            m = x.max(1)
            total = (sign * np.exp(x - m[:, None])).sum(1)
            return m + np.log(total) if (total > 0).all() else None

        la0, la1 = signed_logsumexp(s0), signed_logsumexp(s1)
        if la0 is None or la1 is None:
            return None
        out[~is_int] = np.logaddexp(la0, la1) / (a[~is_int] - 1)
    return out if np.isfinite(out).all() else None


def _rdp_epsilon(mechanisms: list, delta: float) -> float:
    """Composed epsilon under RDP: sum of RDP curves, Opacus' RDP -> (eps, delta) conversion."""
    rdp_analysis = opacus_rdp()
    orders = _rdp_orders()
    rdp = sum(_rdp_of(m, orders) for m in mechanisms)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _prv_epsilon(mechanisms: list, delta: float) -> float:
    """Composed epsilon under PRV (Gopi et al.): Opacus' upper bound.

    Opacus' default ``eps_error`` is 0.01 absolute, which is 10-20% of a small one-shot
    budget; below epsilon 0.5 we refine it (finer mesh, slower, but those histories are
    narrow) so calibrated small releases are not overcharged. Where Opacus cannot
    discretize the history (tiny sigma) the result is ``inf`` (conservative).
    """
    from opacus.accountants import PRVAccountant

    if any(m.integer for m in mechanisms):
        raise PrivacyError(
            "the prv accountant cannot account the integer (Skellam) mechanism of secure aggregation: use "
            "privacy.accountant=rdp"
        )
    acc = PRVAccountant()
    acc.history = [(m.noise_multiplier, m.sample_rate, int(m.steps)) for m in mechanisms]
    try:
        eps = float(acc.get_epsilon(delta))
        if eps < 0.5:
            eps = float(acc.get_epsilon(delta, eps_error=max(1e-3, 0.02 * eps)))
    except RuntimeError:  # Opacus' discretization fails for extreme (tiny-sigma) histories
        return math.inf  # no bound known: conservative
    return eps


ACCOUNTANTS: dict = {"rdp": _rdp_epsilon, "prv": _prv_epsilon}


def _accountant(name: str) -> Callable:
    try:
        return ACCOUNTANTS[name]
    except KeyError:
        raise PrivacyError(f"unknown accountant {name!r}; valid accountants: {', '.join(ACCOUNTANTS)}") from None


def epsilon_of(mechanisms: Iterable[Mechanism], *, delta: float, accountant: str) -> float:
    """Epsilon of the composition of ``mechanisms`` at ``delta``.

    Mechanisms with zero steps contribute nothing; any mechanism with steps and noise
    multiplier 0 (no noise) makes the result ``inf``. Opacus' warnings about the optimal
    order lying at the edge of the list and log(0) in the PRV domain are expected here
    and silenced locally.
    """
    fn = _accountant(accountant)
    if not (0 < delta < 1):
        raise PrivacyError(f"delta must be in (0, 1); got {delta}")
    mechs = list(mechanisms)
    for m in mechs:
        validate_mechanism(m)
    mechs = [m for m in mechs if m.steps > 0]
    if not mechs:
        return 0.0
    if any(m.noise_multiplier == 0 for m in mechs):
        return math.inf
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]ptimal order.*")
        warnings.filterwarnings("ignore", message=".*divide by zero.*")
        warnings.filterwarnings("ignore", message=".*overflow.*")
        warnings.filterwarnings("ignore", message=".*invalid value.*")
        with _numpy_quiet():
            eps = fn(mechs, delta)
    return math.inf if eps != eps else eps  # NaN from a degenerate history: treat as unbounded


class _numpy_quiet:
    """np.errstate(divide/over/invalid='ignore') without importing numpy at module load."""

    def __enter__(self):
        import numpy as np

        self._ctx = np.errstate(divide="ignore", over="ignore", invalid="ignore")
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------- calibration


def _solve_sigma(
    eps_fn: Callable[[float], float],
    target: float,
    *,
    lo: float,
    hi: float,
    rtol: float = CALIBRATION_RTOL,
    max_iter: int = 100,
) -> float:
    """Smallest-noise sigma in [lo, hi] with target*(1-rtol) <= eps_fn(sigma) <= target.

    eps_fn decreases in sigma. Requires eps_fn(hi) <= target. Works on log sigma /
    log eps (close to linear there) with Illinois regula falsi, falling back to bisection
    where eps is infinite; always returns a point from below (eps <= target).
    If even ``lo`` spends less than the target, ``lo`` is returned.
    """

    def f(s: float) -> float:
        e = eps_fn(s)
        return math.log(e) - math.log(target) if e > 0 else -math.inf

    x_lo, x_hi = math.log(lo), math.log(hi)
    f_lo, f_hi = f(lo), f(hi)
    if f_lo <= 0:
        return lo
    low_ok = math.log1p(-rtol)
    side = 0
    for _ in range(max_iter):
        if low_ok <= f_hi <= 0 or x_hi - x_lo < 1e-12:
            break
        if math.isfinite(f_lo) and math.isfinite(f_hi) and f_lo != f_hi:
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
            width = x_hi - x_lo
            x = min(max(x, x_lo + 1e-3 * width), x_hi - 1e-3 * width)  # stay strictly inside
        else:
            x = 0.5 * (x_lo + x_hi)
        fx = f(math.exp(x))
        if fx > 0:
            x_lo, f_lo = x, fx
            if side == -1 and math.isfinite(f_hi):
                f_hi /= 2  # Illinois: halve the stale end so the bracket shrinks from both sides
            side = -1
        else:
            x_hi, f_hi = x, fx
            if side == 1 and math.isfinite(f_lo):
                f_lo /= 2
            side = 1
    return math.exp(x_hi)


def _too_small(what: str, target: float) -> PrivacyError:
    return PrivacyError(
        f"{what}: target epsilon {target:g} would need a noise multiplier above {MAX_SIGMA:g}; "
        "raise privacy.target_epsilon, lower privacy.sample_rate or the number of steps "
        "(train.rounds x train.local_steps), or give this release a larger epsilon fraction"
    )


def _calibrate(history: Callable[[float], list], target: float, *, delta: float, accountant: str, what: str) -> float:
    """Sigma such that the composed epsilon of ``history(sigma)`` is the target, from below.

    RDP: search [0.05, MAX_SIGMA] directly (an evaluation costs ~10 ms, whatever the steps).
    PRV: an evaluation costs up to seconds for long runs and fails for tiny sigma, so the
    search is bracketed around the RDP solution (PRV is tighter: sigma_prv <= sigma_rdp).
    """
    eps = lambda s, acc=accountant: epsilon_of(history(s), delta=delta, accountant=acc)  # noqa: E731
    if eps(MAX_SIGMA) > target:
        raise _too_small(what, target)
    if accountant != "prv":
        return _solve_sigma(eps, target, lo=0.05, hi=MAX_SIGMA)
    rdp = lambda s: eps(s, "rdp")  # noqa: E731
    hi = _solve_sigma(rdp, target, lo=0.05, hi=MAX_SIGMA, rtol=1e-2) if rdp(MAX_SIGMA) <= target else MAX_SIGMA
    while eps(hi) > target and hi < MAX_SIGMA:  # defensive: PRV looser than RDP here
        hi = min(2 * hi, MAX_SIGMA)
    lo = hi / 2
    while lo > 0.05 and eps(lo) <= target:
        lo = max(lo / 2, 0.05)
    return _solve_sigma(eps, target, lo=lo, hi=hi)


def calibrate_one_shot(
    *, epsilon: float, delta: float, accountant: str, name: str = CLASS_STATS, integer: tuple = ()
) -> float:
    """Noise multiplier of a single full-data release (q=1, steps=1; Gaussian, or Skellam with `integer`) spending
    ``epsilon`` alone."""
    if not epsilon > 0:
        raise PrivacyError(f"{name}: its epsilon share must be > 0 when it is released; got {epsilon}")
    return _calibrate(
        lambda s: [Mechanism(name, s, 1.0, 1, integer)], epsilon, delta=delta, accountant=accountant, what=name
    )


@dataclass
class PrivacyPlan:
    """The planned history of one client, fixed before training.

    ``planned_epsilon`` is the composed epsilon of ``mechanisms`` (<= ``target_epsilon``).
    Every client shares the same plan because q is the same for all (docs/DESIGN.md §1).
    """

    sigma: float  # DP-SGD's noise multiplier (the first mechanism's)
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    target_epsilon: float
    planned_epsilon: float
    mechanisms: list = field(default_factory=list)

    def one_shot(self) -> list:
        """The planned one-shot releases (class statistics, mean embeddings)."""
        return [m for m in self.mechanisms if m.name != DP_SGD]

    def noise_multiplier(self, name: str) -> float | None:
        """The planned noise multiplier of mechanism `name`, or None if the plan releases nothing of it."""
        for m in self.mechanisms:
            if m.name == name:
                return m.noise_multiplier
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mechanisms"] = [m.to_dict() if isinstance(m, Mechanism) else dict(m) for m in self.mechanisms]
        d["noise_multipliers"] = {m["name"]: m["noise_multiplier"] for m in d["mechanisms"]}  # derived, for readers
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PrivacyPlan:
        d = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}  # derived or older keys dropped
        d["mechanisms"] = [Mechanism(**m) for m in d.get("mechanisms", [])]
        return cls(**d)


@dataclass(frozen=True)
class BudgetShare:
    """One entry of a budget plan: ``releases`` compositions of a Gaussian mechanism at Poisson rate
    ``sample_rate``, given ``proportion`` of the target epsilon (the proportions of a plan sum to 1)."""

    name: str
    sample_rate: float
    releases: int
    proportion: float
    integer: tuple = ()  # Mechanism.integer of the entry (DP-SGD on the integer path)


@dataclass
class JointPlan:
    """What ``plan_mechanisms`` calibrated: a noise multiplier per mechanism and the composed history."""

    noise_multipliers: dict  # {mechanism name: noise multiplier}
    mechanisms: list  # [Mechanism], in the order of the shares
    planned_epsilon: float  # the composed epsilon of ``mechanisms`` (<= the target)


#: how far the proportions of a plan may be from summing to 1 (float rounding of 1 - a - b + a + b)
PROPORTION_ATOL = 1e-9


def _check_shares(shares: list) -> None:
    if not shares:
        raise PrivacyError("a budget plan needs at least one mechanism")
    names = [s.name for s in shares]
    if len(set(names)) != len(names):
        raise PrivacyError(f"a budget plan names each mechanism once; got {names}")
    for s in shares:
        if not (isinstance(s.proportion, (int, float)) and math.isfinite(s.proportion) and s.proportion >= 0):
            raise PrivacyError(
                f"{s.name}: its budget proportion must be a number >= 0 (a share of the target "
                f"epsilon); got {s.proportion!r}"
            )
        if not (0 < s.sample_rate <= 1):
            raise PrivacyError(f"{s.name}: sample rate q must be in (0, 1]; got {s.sample_rate}")
        if int(s.releases) != s.releases or s.releases < 1:
            raise PrivacyError(
                f"{s.name}: the number of releases must be an integer >= 1; got {s.releases} "
                "(leave a mechanism that releases nothing out of the plan)"
            )
    total = sum(s.proportion for s in shares)
    if abs(total - 1.0) > PROPORTION_ATOL:
        raise PrivacyError(
            "the budget proportions must sum to 1; got "
            + " + ".join(f"{s.proportion:g} ({s.name})" for s in shares)
            + f" = {total:.12g}"
        )


def plan_mechanisms(
    shares: Iterable[BudgetShare],
    *,
    target_epsilon: float,
    delta: float,
    accountant: str,
    noise_multiplier: float | None = None,
    calibrated: Mapping[str, float] | None = None,
) -> JointPlan:
    """Calibrate one noise multiplier per mechanism of ``shares`` so the composed epsilon meets the target.

    Every entry after the first is calibrated ALONE to spend ``proportion * target_epsilon``; then the
    first entry's noise multiplier is solved so that the epsilon of the WHOLE composed history equals
    the target from below. Composition is sub-additive, so the first entry ends up with slightly more
    than its nominal proportion: put the mechanism with many releases (DP-SGD) first. With
    ``noise_multiplier`` given, it is used for the first entry and the plan is only checked.
    Adding a mechanism to a run is one more entry in the list (its proportion taken from the others).
    ``calibrated``: every mechanism's noise multiplier, as this function returned them for the same arguments
    elsewhere (another rank): nothing is calibrated, the composed epsilon is computed and checked against the target
    as always.
    """
    shares = list(shares)
    if calibrated is not None and set(calibrated) != {s.name for s in shares}:
        raise PrivacyError(
            f"calibrated noise multipliers for {sorted(calibrated)}; the plan has {[s.name for s in shares]}"
        )
    _accountant(accountant)
    if not target_epsilon > 0:
        raise PrivacyError(f"target epsilon must be > 0; got {target_epsilon}")
    if not (0 < delta < 1):
        raise PrivacyError(f"delta must be in (0, 1); got {delta}")
    _check_shares(shares)
    first, rest = shares[0], shares[1:]
    if not first.proportion > 0:
        raise PrivacyError(
            f"{first.name}: the first mechanism of a plan needs a share > 0 of the budget; got {first.proportion:g}"
        )
    others = []
    for s in rest:
        if calibrated is not None:
            sigma_s = float(calibrated[s.name])
        elif s.releases == 1 and s.sample_rate >= 1.0:
            sigma_s = calibrate_one_shot(
                epsilon=s.proportion * target_epsilon,
                delta=delta,
                accountant=accountant,
                name=s.name,
                integer=s.integer,
            )
        else:
            if not s.proportion > 0:
                raise PrivacyError(
                    f"{s.name}: its epsilon share must be > 0 when it is released; got {s.proportion * target_epsilon}"
                )
            sigma_s = _calibrate(
                lambda x, s=s: [Mechanism(s.name, x, s.sample_rate, int(s.releases), s.integer)],
                s.proportion * target_epsilon,
                delta=delta,
                accountant=accountant,
                what=s.name,
            )
        others.append(Mechanism(s.name, sigma_s, s.sample_rate, int(s.releases), s.integer))

    steps = int(first.releases)
    history = lambda x: [Mechanism(first.name, x, first.sample_rate, steps, first.integer)] + others  # noqa: E731
    what = "DP-SGD" if first.name == DP_SGD else first.name
    if calibrated is not None:
        sigma = float(calibrated[first.name])
    elif noise_multiplier is None:
        sigma = _calibrate(history, target_epsilon, delta=delta, accountant=accountant, what=what)
    else:
        sigma = float(noise_multiplier)
    eps = epsilon_of(history(sigma), delta=delta, accountant=accountant)
    if eps > target_epsilon:
        raise PrivacyError(
            f"the fixed noise multiplier {sigma:g} spends epsilon {eps:.4g} over {steps} steps at "
            f"q={first.sample_rate:g}, above the target {target_epsilon:g}; raise privacy.noise_multiplier or "
            "privacy.target_epsilon, or lower the sample rate or the number of steps (or set "
            "privacy.noise_multiplier: null to calibrate)"
        )
    mechanisms = history(sigma)
    return JointPlan(
        noise_multipliers={m.name: m.noise_multiplier for m in mechanisms}, mechanisms=mechanisms, planned_epsilon=eps
    )


def privacy_plan(
    shares: Iterable[BudgetShare],
    *,
    target_epsilon: float,
    delta: float,
    accountant: str,
    noise_multiplier: float | None = None,
    calibrated: Mapping[str, float] | None = None,
) -> PrivacyPlan:
    """The run's PrivacyPlan from a list of shares whose first entry is DP-SGD (``plan_mechanisms``)."""
    shares = list(shares)
    if not shares or shares[0].name != DP_SGD:
        raise PrivacyError(f"a run's budget plan starts with its {DP_SGD} entry; got {[s.name for s in shares]}")
    joint = plan_mechanisms(
        shares,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        noise_multiplier=noise_multiplier,
        calibrated=calibrated,
    )
    nm = joint.noise_multipliers
    return PrivacyPlan(
        sigma=nm[DP_SGD],
        sample_rate=shares[0].sample_rate,
        steps=int(shares[0].releases),
        delta=delta,
        accountant=accountant,
        target_epsilon=target_epsilon,
        planned_epsilon=joint.planned_epsilon,
        mechanisms=joint.mechanisms,
    )


def run_shares(*, sample_rate: float, steps: int, one_shot: Iterable[tuple], integer: tuple = ()) -> list:
    """A run's shares: DP-SGD (``steps`` at ``sample_rate``) first, taking what the one-shot releases
    ``[(name, fraction)]`` or ``[(name, fraction, integer)]`` (q = 1, one release each) leave of the budget."""
    if not (0 < sample_rate <= 1):
        raise PrivacyError(f"sample rate q must be in (0, 1]; got {sample_rate}")
    if int(steps) != steps or steps < 1:
        raise PrivacyError(f"the run must have at least one DP-SGD step; got steps={steps}")
    one_shot = [BudgetShare(e[0], 1.0, 1, e[1], tuple(e[2]) if len(e) > 2 else ()) for e in one_shot]
    fractions = sum(s.proportion for s in one_shot)
    if fractions >= 1:
        raise PrivacyError(
            "privacy.stats_epsilon_fraction + privacy.mmd_epsilon_fraction must be < 1 "
            f"(DP-SGD needs a share); got {fractions:g}"
        )
    return [BudgetShare(DP_SGD, sample_rate, int(steps), 1.0 - fractions, tuple(integer))] + one_shot


def plan_budget(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    stats_fraction: float,
    mmd_fraction: float,
    use_stats: bool,
    use_mmd: bool,
    noise_multiplier: float | None = None,
) -> PrivacyPlan:
    """Calibrate the noise multipliers of a run so the composed epsilon meets the target.

    Budget split (docs/DESIGN.md §3): each one-shot release is first calibrated ALONE to spend its
    fraction of the target; then the DP-SGD sigma is bisected so the epsilon of the WHOLE
    composed history (DP-SGD steps + the one-shot releases) equals the target from below.
    Composition is sub-additive, so DP-SGD ends up with slightly more than its nominal share.
    With ``noise_multiplier`` given, it is used for DP-SGD and the plan is only checked.
    A thin wrapper of ``privacy_plan`` / ``plan_mechanisms`` for today's two one-shot releases.
    """
    _accountant(accountant)
    if not target_epsilon > 0:
        raise PrivacyError(f"target epsilon must be > 0; got {target_epsilon}")
    if not (0 < delta < 1):
        raise PrivacyError(f"delta must be in (0, 1); got {delta}")
    one_shot = ([(CLASS_STATS, stats_fraction)] if use_stats else []) + (
        [(MMD_EMBEDDINGS, mmd_fraction)] if use_mmd else []
    )
    shares = run_shares(sample_rate=sample_rate, steps=steps, one_shot=one_shot)
    return privacy_plan(
        shares, target_epsilon=target_epsilon, delta=delta, accountant=accountant, noise_multiplier=noise_multiplier
    )


def plan_dp_sgd(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    noise_multiplier: float | None = None,
) -> PrivacyPlan:
    """``plan_budget`` of DP-SGD alone (no one-shot release): the baselines and `fedhypevae privacy plan`."""
    return plan_budget(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        stats_fraction=0.0,
        mmd_fraction=0.0,
        use_stats=False,
        use_mmd=False,
        noise_multiplier=noise_multiplier,
    )


# --------------------------------------------------------------------------- the budget guard


def history_fits(history: list, extra: list, plan: PrivacyPlan) -> bool:
    """Budget guard: True if ``history`` + ``extra`` + the plan's not-yet-released one-shot releases
    stay within ``plan.target_epsilon``.

    Fast path without the accountant: every entry uses the plan's sigma and q and no mechanism has
    more releases than planned — a sub-history of the calibrated plan (epsilon is monotone in steps).
    """
    history = list(history) + [m for m in extra if m.steps > 0]
    remaining = []
    for m in plan.one_shot():
        used = sum(h.steps for h in history if h.name == m.name)
        if m.steps - used > 0:
            remaining.append(Mechanism(m.name, m.noise_multiplier, m.sample_rate, m.steps - used, m.integer))
    if _is_subplan(history, plan):
        return True
    eps = epsilon_of(history + remaining, delta=plan.delta, accountant=plan.accountant)
    return eps <= plan.target_epsilon * (1 + 1e-9)


def _is_subplan(history: list, plan: PrivacyPlan) -> bool:
    """Whether ``history`` is contained in the plan (same sigma/q, no more steps)."""
    planned = {m.name: m for m in plan.mechanisms}
    used: dict = {}
    for h in history:
        p = planned.get(h.name)
        if p is None or not (
            math.isclose(h.noise_multiplier, p.noise_multiplier, rel_tol=1e-12)
            and math.isclose(h.sample_rate, p.sample_rate, rel_tol=1e-12)
            and h.integer == p.integer
        ):
            return False
        used[h.name] = used.get(h.name, 0) + h.steps
        if used[h.name] > p.steps:
            return False
    return True
