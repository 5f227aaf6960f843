"""Trust models (``privacy.trust_model``): where the noise is added decides whom the guarantee protects against.

Every client clips each record's gradient over everything that is trained on it to C (strict mode: psi_i, v_i
and Phi jointly); what differs is where the Gaussian noise goes. With M clients, public weights w_i and public
normalizers q * n~_i, the aggregate the replicas apply is sum_i a_i * (clipped Phi sum of client i) plus noise,
a_i = w_i / (q n~_i) (`Federation.coefs`), so a record of client i moves it by at most a_i C; the largest
per-record sensitivity is Delta = max_i a_i C (declared weights: every a_i = 1 / (q sum n~); uniform weights: the
smallest declared size gives it).

  local        every client adds N(0, sigma^2 C^2) to its whole clipped sum (the paper's Eq. 8-9): each release
               alone is DP, against anyone who sees it. The aggregate carries sqrt(sum a_i^2) sigma C of noise per
               coordinate: sqrt(M) times Delta * sigma with declared weights.
  distributed  the model of secure aggregation: nobody sees less than the full sum. Each client adds to its Phi
               part a Gaussian share of multiplier s (same for every client) such that the shares unknown to any
               coalition of `privacy.collusion` = t parties carry N(0, sigma^2 Delta^2):
               s^2 * (sum_i a_i^2 - K_t) = sigma^2 * max_i a_i^2, K_t the largest sum of a_i^2 over the clients t
               parties hold. With declared weights s = sigma / sqrt(M - m_t), m_t the most clients t parties hold
               (t with party = client). The client's own psi_i, v_i block keeps its full N(0, sigma^2 C^2): its state
               must stay DP, so that the joint release (own block + aggregate) is one Gaussian mechanism of
               sensitivity C with multiplier sigma. Simulated: the all-reduce is plain floating point; with
               privacy.secure_aggregation real (SecureDistributedTrust: rounded rank sums, Skellam shares, pairwise
               masks; accounted as the Skellam mechanism, privacy/integer.py).
  central      a trusted aggregator (rank 0): the clients' clipped Phi sums go to rank 0 by the Communicator's
               gather (point to point on the torch back-end; never an all-reduce, which hands every rank the
               un-noised sum), rank 0 adds ONE draw N(0, sigma^2 Delta^2) from its own generator (securely seeded
               unless privacy.noise_seed is set) and broadcasts the noisy aggregate every replica applies. The own
               psi_i, v_i block keeps its full local noise.

In every model the aggregate's mechanism against that model's adversary is the same subsampled Gaussian with
multiplier sigma at sensitivity Delta (on secure aggregation's integer path, the subsampled Skellam mechanism of the
same variance at the integer sensitivity: Mechanism.integer in the accountant, the budget guard and the ledger).
The DP-MERF mean embeddings keep full local noise in every model (each is consumed by its own client's loss, never
summed); the class statistics for the meta-code follow the model, with shares calibrated to the clients in each
released partial sum (one per meta-code domain).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..rng import ClientRNG

TRUST_MODELS = ("local", "distributed", "central")
PARTIES = ("client", "rank")
AGGREGATOR_ID = -1  # the central aggregator's generator key: no client has this id
ROOT = 0  # the central aggregator's rank


def check_trust_settings(*, trust_model: str, collusion, party: str) -> None:
    """ConfigError for a value of privacy.trust_model / collusion / party that cannot be used (one line each)."""
    if trust_model not in TRUST_MODELS:
        raise ConfigError(f"privacy.trust_model must be one of {', '.join(TRUST_MODELS)}; got {trust_model!r}")
    if party not in PARTIES:
        raise ConfigError(f"privacy.party must be one of {', '.join(PARTIES)}; got {party!r}")
    if isinstance(collusion, bool) or not isinstance(collusion, int) or collusion < 1:
        raise ConfigError(
            f"privacy.collusion must be an integer >= 1 (the number of parties that may pool their "
            f"shares); got {collusion!r}"
        )
    if trust_model != "distributed" and (collusion != 1 or party != "client"):
        key = "privacy.collusion" if collusion != 1 else "privacy.party"
        raise ConfigError(
            f"{key} applies to privacy.trust_model=distributed only (the parties that pool their noise "
            f"shares); it has no meaning with trust_model={trust_model}: remove it"
        )


@dataclass(frozen=True)
class Federation:
    """The public facts a trust model calibrates from: per client id, a_i = w_i / (q n~_i), the coefficient of its
    clipped Phi sum in the aggregate; the clients of every rank; the number of meta-code domains (client i's
    class statistics are summed into domain i * codes // M)."""

    coefs: tuple
    placement: tuple
    codes: int = 1

    @property
    def M(self) -> int:
        return len(self.coefs)

    def domain(self, i: int) -> int:
        return i * self.codes // self.M

    def parties(self, party: str) -> list:
        return [[i] for i in range(self.M)] if party == "client" else [list(p) for p in self.placement]


def coalition(masses: Sequence[float], t: int) -> float:
    """The largest total of `masses` t parties can pool: the sum of the t largest."""
    return float(sum(sorted(masses, reverse=True)[:t]))


class TrustModel:
    """The base class and the `local` model: every client noises everything it sends at sigma."""

    name = "local"
    simulated = False

    def __init__(
        self, *, collusion: int = 1, party: str = "client", noise_seed: int | None = None, backend: str = "local"
    ):
        self.collusion, self.party, self.backend = int(collusion), party, backend
        self.fed: Federation | None = None
        self.world_size = 1
        self._rng = ClientRNG(AGGREGATOR_ID, noise_seed)  # only the central aggregator draws from it
        self._next: tuple | None = None  # the next aggregate release's key (and generator override)

    # ------------------------------------------------------------------ binding and refusals
    def bind(self, fed: Federation, *, world_size: int) -> TrustModel:
        """Fix the public federation (placement, weights, declared sizes); ConfigError for settings this model
        refuses on it. Called by the trainer's setup before anything is written or released."""
        self.fed, self.world_size = fed, int(world_size)
        return self

    @property
    def delta_max(self) -> float:
        """max_i a_i: the largest per-record sensitivity of the aggregate, in units of C."""
        return max(self.fed.coefs)

    # ------------------------------------------------------------------ DP-SGD
    def noise_multipliers(self, sigma: float) -> dict:
        """The noise multiplier each client applies per block of its clipped sum: "private" (its psi_i, v_i) and
        "phi" (its Phi part). Local: sigma on both."""
        return {"private": sigma, "phi": sigma}

    def aggregate_multiplier(self, sigma: float) -> float:
        """The multiplier of the aggregator's one draw (at the largest sensitivity Delta); 0 unless central."""
        return 0.0

    def phi_effective(self, phi: float, sigma: float) -> float:
        """The noise multiplier the aggregate's Phi noise gives against this model's adversary, in units of that
        adversary's largest per-record sensitivity, when every client applies `phi` to its Phi part. Local: the
        adversary sees one client's release, noised at `phi` for that client's sensitivity."""
        return phi

    def charged_multiplier(self, blocks: dict, sigma: float, *, strict: bool) -> float:
        """The multiplier the ledger charges for a step with these per-block multipliers: the smallest over what
        is privatized (strict: the own block and the aggregate's Phi noise against this model's adversary; paper:
        the latter). Jointly clipped to C, a Gaussian release whose parts carry different multipliers is at least
        as private as one with the smallest everywhere, so the ledger never records less than is spent; a rule or
        an override that places less noise is charged for it (and stopped by the budget guard)."""
        eff = self.phi_effective(blocks["phi"], sigma)
        return min(blocks["private"], eff) if strict else eff

    def aggregate_std(self, sigma: float, clip: float) -> float:
        """The standard deviation per coordinate of the Phi noise in the aggregate the replicas apply, as this model
        places it for the plan's sigma (what tests measure)."""
        s = self.noise_multipliers(sigma)["phi"]
        shares = sum(a * a for a in self.fed.coefs) * s * s
        return clip * math.sqrt(shares + (self.aggregate_multiplier(sigma) * self.delta_max) ** 2)

    def begin_release(
        self, stream: int, round_: int, step: int, epoch: int = 0, generator: torch.Generator | None = None
    ) -> None:
        """The key of the next aggregate release (the aggregator's draw, in central): its generator, derived from
        (noise_seed, the aggregator, stream, round, step, epoch) when reproducible (an identical replay draws the
        same noise), else the aggregator's securely seeded one; `generator` overrides it (the sensitivity check)."""
        self._next = (stream, round_, step, epoch, generator)  # the generator is made only where one is drawn

    def _take_release(self, rng: ClientRNG, what: str) -> tuple:
        """(the release's key (stream, round, step, epoch), its generator from `rng` or the override), consumed:
        RuntimeError when begin_release did not set one."""
        key, self._next = self._next, None
        if key is None:
            raise RuntimeError(f"{what} needs its release key first (TrustModel.begin_release, set by the trainer)")
        *k, g = key
        return tuple(k), (g if g is not None else rng.generator(*k))

    def reduce_step(self, tr, buf: torch.Tensor, width: int) -> torch.Tensor:
        """The step's collective over the trainer's Communicator: every rank gets the sum (local: of noisy
        releases)."""
        self._next = None
        return tr.allreduce(buf)

    # ------------------------------------------------------------------ class statistics
    def stats_multiplier(self, sigma: float, client: int) -> float:
        """The noise multiplier client `client` applies to its class statistics. Local: sigma."""
        return sigma

    def reduce_stats(self, tr, buf: torch.Tensor, noise, scales: torch.Tensor | None = None) -> torch.Tensor:
        """Sum the (codes, n) buffer of noisy per-domain statistics over ranks, in place. `noise(k, vec, gen)` adds
        domain k's release noise to a flat un-noised domain sum (the aggregator's draw, central only); `scales`, each
        coordinate's sensitivity (privacy.stats.stats_scales), is what the integer path divides by."""
        self._next = None
        tr.allreduce(buf.view(-1))
        return buf

    # ------------------------------------------------------------------ what it guarantees
    def protected(self) -> str:
        return (
            "anyone who sees any single client's release (the other clients, the other ranks, whoever reads "
            "the all-reduce or the outputs)"
        )

    def not_protected(self) -> str:
        return "the rank hosting the client (it holds the client's data)"

    def where(self) -> str:
        return "every client adds N(0, sigma^2 C^2) to its whole clipped sum (psi_i, v_i and its Phi part)"

    def describe(self, sigma: float, clip: float) -> dict:
        """results.json's privacy.trust_model section."""
        out = {
            "name": self.name,
            "collusion": self.collusion if self.name == "distributed" else None,
            "party": self.party if self.name == "distributed" else None,
            "simulated": self.simulated,
            "noise": self.where(),
            "protected_against": self.protected(),
            "not_protected_against": self.not_protected(),
            "phi_noise_multiplier_per_client": self.noise_multipliers(sigma)["phi"],
            "aggregator_noise_multiplier": self.aggregate_multiplier(sigma),
            "aggregate_noise_std": self.aggregate_std(sigma, clip) if self.fed is not None else None,
            "largest_record_sensitivity": self.delta_max * clip if self.fed is not None else None,
            "mmd_embeddings": "full local noise (each client's embeddings are consumed by its own loss)",
        }
        return out

    def guarantee(self) -> str:
        return f"Trust model local: {self.where()}; the guarantee holds against {self.protected()}."


class DistributedTrust(TrustModel):
    """Secure-aggregation model, simulated in floating point (module docstring)."""

    name = "distributed"
    simulated = True

    def bind(self, fed: Federation, *, world_size: int) -> TrustModel:
        super().bind(fed, world_size=world_size)
        t, party = self.collusion, self.party
        if party == "rank" and world_size < 2:
            raise ConfigError(
                "privacy.party=rank needs at least 2 ranks: the one rank holds every client's share, "
                "so no share would be unknown to it (use privacy.party=client, or launch more ranks)"
            )
        parties = fed.parties(party)
        a2 = [a * a for a in fed.coefs]
        held = coalition([len(p) for p in parties], t)
        self.coalition_clients = int(held)
        self.unknown_mass = sum(a2) - coalition([sum(a2[i] for i in p) for p in parties], t)
        if fed.M - held < 1 or not self.unknown_mass > 0:
            raise ConfigError(
                f"privacy.collusion={t}: {t} {party}(s) can hold {int(held)} of the {fed.M} clients' "
                f"noise shares, which leaves fewer than one share unknown to them; lower "
                f"privacy.collusion below the number of {party}s, or use trust_model=central or local"
            )
        # the class statistics: per meta-code domain, the shares unknown to t parties must carry the full noise
        self.stats_unknown = {}
        for k in range(fed.codes):
            members = [i for i in range(fed.M) if fed.domain(i) == k]
            held_k = coalition([sum(1 for i in p if fed.domain(i) == k) for p in parties], t)
            if len(members) - held_k < 1:
                raise ConfigError(
                    f"privacy.collusion={t} with meta.codes={fed.codes}: meta-code domain {k} sums the "
                    f"class statistics of {len(members)} client(s), and {t} {party}(s) can hold "
                    f"{int(held_k)} of them: no share would be unknown; lower meta.codes or "
                    "privacy.collusion"
                )
            self.stats_unknown[k] = len(members) - held_k
        # the share unit u: share multiplier s = sigma * u gives the unknown shares sigma at the largest sensitivity
        self.unit = self.delta_max / math.sqrt(self.unknown_mass)
        return self

    def noise_multipliers(self, sigma: float) -> dict:
        return {"private": sigma, "phi": sigma * self.unit}

    def phi_effective(self, phi: float, sigma: float) -> float:
        # the unknown shares carry phi * sqrt(unknown mass) * C against a largest sensitivity delta_max * C; the
        # prescribed share for sigma is charged as sigma itself (the same float computation, not its inverse)
        if phi == sigma * self.unit:
            return sigma
        return phi / self.unit

    def stats_multiplier(self, sigma: float, client: int) -> float:
        return sigma / math.sqrt(self.stats_unknown[self.fed.domain(client)])

    def _parties(self, n: int) -> str:
        return f"{n} {self.party}" + ("s" if n != 1 else "")

    def protected(self) -> str:
        return (
            f"any coalition of at most {self._parties(self.collusion)} that sees only the full sum of all "
            "clients' releases and pools its own shares (the secure-aggregation model), and whoever reads the "
            "outputs"
        )

    def not_protected(self) -> str:
        return (
            "anyone who sees a partial sum or a single client's release: THIS RUN SIMULATES secure aggregation, "
            "the sum is a plain floating-point all-reduce, so every rank sees partial sums of the other ranks' "
            "releases (the ranks are one operator's simulation of the parties); a coalition of more than "
            f"{self._parties(self.collusion)}; the rank hosting a client"
        )

    def where(self) -> str:
        return (
            f"every client adds N(0, sigma^2 C^2) to its psi_i, v_i and a Gaussian share of multiplier "
            f"sigma * {self.unit:.6g} to its Phi "
            f"part, so that the shares unknown to any {self._parties(self.collusion)} (holding at most "
            f"{self.coalition_clients} of the {self.fed.M} clients) sum to N(0, sigma^2 Delta^2) at the largest "
            "per-record sensitivity Delta"
        )

    def guarantee(self) -> str:
        return (
            f"Trust model distributed (SIMULATED secure aggregation, floating point): {self.where()}; the "
            f"guarantee holds against {self.protected()}; not against {self.not_protected()}."
        )


_CLASS_STATS = "class-stats"  # accounting.CLASS_STATS (not imported at module level: no cycle)
SECURE_SHARE_ID = -2  # the secure-aggregation shares' generator keys: -2 - (the rank's first client id)
DIAG_SCALE = 2**20  # the diagnostics' fixed point in the masked sum (they are not noised: masked only)


class SecureDistributedTrust(DistributedTrust):
    """`distributed` made real between ranks (`privacy.secure_aggregation`): every rank rounds its partial Phi sum to
    the grid, adds its Skellam share (the sum of its clients' shares in distribution) and sends it masked by
    pairwise masks that cancel only in the complete sum (`fedhypevae.hpc.secagg`, `fedhypevae.privacy.integer`).
    The own psi_i, v_i block keeps its full Gaussian noise, as in the simulation."""

    simulated = False

    def __init__(self, *, bits: int = 64, grid_ratio: float = 100.0, **kw):
        super().__init__(**kw)
        self.bits, self.grid_ratio = int(bits), float(grid_ratio)
        self.enc = None
        self.secagg = None
        self.overflow_p = None
        self.share_factor = 1.0  # the shares' std relative to the rule: 1 (what an audit's sabotage overrides)

    def start(self, tr) -> None:
        """After the model is built (Phi's size) and before anything is released: the encoding, the key agreement
        between ranks (a collective) and this rank's share generator."""
        from ..hpc.secagg import SecureAggregator
        from .integer import make_encoding

        p, fed = tr.cfg.privacy, self.fed
        self.clip = p.clip_norm
        self.enc = make_encoding(
            sensitivity=self.delta_max * p.clip_norm, dim=int(tr.phi_numel), bits=self.bits, grid_ratio=self.grid_ratio
        )
        self.secagg = SecureAggregator(tr.comm, bits=self.bits)
        self.rank = tr.comm.rank
        self.mine = list(fed.placement[self.rank]) if self.world_size > 1 else list(range(fed.M))  # the rank's clients
        self._share_rng = ClientRNG(SECURE_SHARE_ID - (min(self.mine) if self.mine else 0), p.noise_seed)
        # sum of a_i^2 over the rank's clients and over all: fixed for the run (no per-client loop in a step)
        self.rank_mass = sum(fed.coefs[i] ** 2 for i in self.mine)
        self.total_mass = sum(a * a for a in fed.coefs)

    def share_variance(self, sigma: float, mass: float) -> float:
        """The Skellam variance (grid units) of the share of clients whose a_i^2 sum to `mass` (`rank_mass`: this
        rank's; `total_mass`: everyone's): the sum of their Gaussian shares' variances under the simulation's rule,
        (sigma * unit * a_i * C)^2, scaled for the rounding."""
        return self.share_factor**2 * self.enc.grid_variance((sigma * self.unit * self.clip) ** 2 * mass)

    def stats_encoding(self, m: int, n: int):
        """The class statistics' encoding: one domain's n coordinates, each divided by its component's sensitivity
        (m components: L2 sensitivity sqrt(m))."""
        from .integer import make_encoding

        return make_encoding(sensitivity=math.sqrt(m), dim=n, bits=self.bits, grid_ratio=self.grid_ratio)

    def stats_share_variance(self, sigma_s: float, m: int, enc, domain: int, clients) -> float:
        """The Skellam variance (grid units of `enc`) of the statistics share of `clients` in `domain`: each client's
        Gaussian share under the simulation's rule has std sigma_s / sqrt(unknown) * sqrt(m) per scaled coordinate."""
        held = sum(1 for i in clients if self.fed.domain(i) == domain)
        return enc.grid_variance(held * sigma_s**2 * m / self.stats_unknown[domain])

    def check_overflow(self, sigma: float, releases: int, delta: float, stats: tuple | None = None) -> float:
        """The static check: the total Skellam noise stays within half the range with probability >= 1 - overflow
        share of delta over `releases` steps and, with `stats` = (sigma_s, m, n), the one statistics release (the
        signal gets the other half: checked at every release). Returns the bound on the probability of a wrap."""
        from .integer import check_bits

        total = self.share_variance(sigma, self.total_mass)
        p = check_bits(self.enc, signal=0.0, ranks=0, variance=total, releases=releases, delta=delta, headroom=1)
        if stats is not None:
            sigma_s, m, n = stats
            enc = self.stats_encoding(m, n)
            everyone = range(self.fed.M)
            worst = max(self.stats_share_variance(sigma_s, m, enc, d, everyone) for d in range(self.fed.codes))
            p += check_bits(enc, signal=0.0, ranks=0, variance=worst, releases=self.fed.codes, delta=delta, headroom=1)
        self.overflow_p = p
        return p

    def _check_signal(self, z: torch.Tensor, what: str) -> None:
        """The signal's half of the range (module docstring of privacy/integer.py): this rank's encoded partial sum
        within 2**(bits-2) / R, else the run stops here, before anything is sent."""
        limit = 2 ** (self.bits - 2) // max(1, self.world_size)
        top = int(z.abs().max()) if z.numel() else 0
        if top > limit:
            from ..errors import PrivacyError

            raise PrivacyError(
                f"secure aggregation: rank {self.rank}'s encoded {what} exceeds its share of the {self.bits}-bit range "
                f"(|value| {top} > {limit}); the integer sum could wrap around. Raise privacy.secure_bits or lower "
                "privacy.secure_grid_ratio"
            )

    def noise_multipliers(self, sigma: float) -> dict:
        return {"private": sigma, "phi": 0.0}  # Phi's noise: the rank's integer share in reduce_step

    def charged_multiplier(self, blocks: dict, sigma: float, *, strict: bool) -> float:
        # the Skellam shares unknown to the coalition carry sigma at the integer sensitivity (integer_rdp accounts it)
        return min(blocks["private"], sigma) if strict else sigma

    def aggregate_std(self, sigma: float, clip: float) -> float:
        if self.enc is None:
            return super().aggregate_std(sigma, clip)
        return self.enc.grid * math.sqrt(self.share_variance(sigma, self.total_mass))

    def reduce_step(self, tr, buf: torch.Tensor, width: int) -> torch.Tensor:
        from .integer import skellam

        k, gen = self._take_release(self._share_rng, "secure aggregation: the step's share")
        z = self.enc.encode(buf[:width])
        self._check_signal(z, "partial Phi sum")
        z += skellam(self.share_variance(tr.sigma, self.rank_mass), width, gen)
        diag = torch.round(buf[width:] * DIAG_SCALE).to(torch.int64)
        total = self.secagg.sum(torch.cat([z, diag]), tag=("step", *k))
        out = torch.empty_like(buf)
        out[:width] = self.enc.decode(total[:width])
        out[width:] = total[width:].double() / DIAG_SCALE
        return out

    def stats_multiplier(self, sigma: float, client: int) -> float:
        return 0.0  # the clients send un-noised sums to their rank; the rank adds the domain's integer share

    def reduce_stats(self, tr, buf: torch.Tensor, noise, scales: torch.Tensor | None = None) -> torch.Tensor:
        """The (codes, n) per-domain sums of the clipped statistics, each coordinate divided by its component's
        sensitivity (`scales`; m components: joint L2 sensitivity sqrt(m) = `stats_l2`), rounded to the grid
        sqrt(m) / (ratio sqrt(n)); this rank's Skellam share per domain; one masked sum."""
        from .integer import skellam
        from .stats import stats_components

        k, gen = self._take_release(self._share_rng, "secure aggregation: the statistics' share")
        codes, n = buf.shape
        m = stats_components(tr.cfg.stats.covariance)
        enc = self.stats_encoding(m, n)
        z = enc.encode(buf / scales)
        self._check_signal(z, "class statistics")
        sigma = tr.plan.noise_multiplier(_CLASS_STATS)
        for d in range(codes):
            z[d] += skellam(self.stats_share_variance(sigma, m, enc, d, self.mine), n, gen)
        total = self.secagg.sum(z.reshape(-1), tag=("stats", *k)).view(codes, n)
        buf.copy_(enc.decode(total) * scales)
        return buf

    def not_protected(self) -> str:
        return (
            "the rank hosting a client; a coalition of more than "
            f"{self._parties(self.collusion)}; the coalition of all other ranks (they know the total); a rank that "
            "sends garbage (no integrity) or impersonates another in the unauthenticated key exchange; the "
            "diagnostics' sum (masked, not noised: privacy.diagnostics=false keeps them home)"
        )

    def where(self) -> str:
        return (
            "every client adds N(0, sigma^2 C^2) to its psi_i, v_i; every rank rounds its partial Phi sum to the grid "
            "and adds a Skellam share (the sum of its clients' shares), so that the shares unknown to any "
            f"{self._parties(self.collusion)} sum to a Skellam of variance sigma^2 Delta2^2 at the integer "
            "sensitivity Delta2; the ranks' contributions are masked modulo 2**bits (secure aggregation)"
        )

    def guarantee(self) -> str:
        return (
            f"Trust model distributed with secure aggregation (masked integer sums, Skellam noise): {self.where()}; "
            f"the guarantee holds against {self.protected()}; not against {self.not_protected()}."
        )

    def describe(self, sigma: float, clip: float) -> dict:
        out = super().describe(sigma, clip)
        if self.enc is not None:
            out["secure_aggregation"] = {
                **self.enc.describe(),
                **self.secagg.describe(),
                "noise": "Skellam shares, one per rank per step",
                "overflow_probability_bound": self.overflow_p,
            }
        return out


class CentralTrust(TrustModel):
    """A trusted aggregator on rank 0 (module docstring)."""

    name = "central"

    def noise_multipliers(self, sigma: float) -> dict:
        return {"private": sigma, "phi": 0.0}

    def aggregate_multiplier(self, sigma: float) -> float:
        return sigma

    def phi_effective(self, phi: float, sigma: float) -> float:
        # the clients' own Phi noise (none as prescribed) is not counted: a non-root rank knows its clients'
        return self.aggregate_multiplier(sigma)

    def stats_multiplier(self, sigma: float, client: int) -> float:
        return 0.0

    def draw(self, width: int, std: float, generator: torch.Generator) -> torch.Tensor:
        """The aggregator's draw: N(0, std^2) per coordinate (fp64). A stage an audit's sabotage may override."""
        return torch.randn(width, generator=generator, dtype=torch.float64) * std

    def _generator(self) -> torch.Generator:
        return self._take_release(self._rng, "trust_model=central: the aggregator's draw")[1]

    def _gather_sum(self, tr, buf: torch.Tensor) -> torch.Tensor | None:
        """The sum of every rank's `buf`, on the root only (None elsewhere), in rank order: a gather, so that no
        rank but the root receives another rank's buffer or a partial sum."""
        rows = tr.gather(buf.contiguous())
        if rows is None:
            return None
        total = rows[0].clone()
        for r in range(1, rows.shape[0]):
            total += rows[r]
        return total

    def reduce_step(self, tr, buf: torch.Tensor, width: int) -> torch.Tensor:
        g = self._generator()
        total = self._gather_sum(tr, buf)
        if total is not None:
            std = self.aggregate_multiplier(tr.sigma) * self.delta_max * tr.cfg.privacy.clip_norm
            if std > 0:
                total[:width] += self.draw(width, std, g)
            out = total
        else:
            out = torch.zeros_like(buf)  # what a non-root rank hands the broadcast: nothing of its own
        return tr.broadcast(out)

    def reduce_stats(self, tr, buf: torch.Tensor, noise, scales: torch.Tensor | None = None) -> torch.Tensor:
        g = self._generator()
        total = self._gather_sum(tr, buf.view(-1))
        if total is not None:
            total = total.view(buf.shape)
            for k in range(buf.shape[0]):
                total[k] = noise(k, total[k], g)
            out = total.reshape(-1)
        else:
            out = torch.zeros(buf.numel(), dtype=buf.dtype)
        tr.broadcast(out)
        buf.copy_(out.view(buf.shape))
        return buf

    def transport(self) -> str:
        if self.backend == "mpi" and self.world_size >= 3:
            return (
                "MPI_Gather (this MPI library picks the algorithm: MPICH's binomial tree relays ranks' buffers "
                "through intermediate ranks, which then see other ranks' un-noised clipped sums)"
            )
        return "the Communicator's gather to rank 0" + (
            " (gloo: point to point)" if self.backend.startswith("torch") else ""
        )

    def protected(self) -> str:
        relay = (
            " other than the ranks MPI_Gather relays through" if self.backend == "mpi" and self.world_size >= 3 else ""
        )
        return f"everyone but the aggregator (rank 0){relay}: the other ranks, the clients, whoever reads the outputs"

    def not_protected(self) -> str:
        return (
            "the aggregator (rank 0 receives the un-noised sum of the clipped Phi sums and the class statistics) "
            "and the rank hosting each client"
        )

    def where(self) -> str:
        return (
            "every client adds N(0, sigma^2 C^2) to its psi_i, v_i and nothing to its Phi part; the clipped Phi "
            f"sums travel by {self.transport()}; rank 0 adds one draw N(0, sigma^2 Delta^2) at the largest "
            "per-record sensitivity Delta and broadcasts the noisy aggregate every replica applies"
        )

    def guarantee(self) -> str:
        return (
            f"Trust model central (trusted aggregator): {self.where()}; the guarantee holds against "
            f"{self.protected()}; not against {self.not_protected()}."
        )


TRUST = {"local": TrustModel, "distributed": DistributedTrust, "central": CentralTrust}
#: make_trust_model's name of `distributed` with privacy.secure_aggregation (not a privacy.trust_model value)
SECURE = {"secure": SecureDistributedTrust}


def make_trust_model(name: str, **kw) -> TrustModel:
    try:
        return {**TRUST, **SECURE}[name](**kw)
    except KeyError:
        raise ConfigError(f"privacy.trust_model must be one of {', '.join(TRUST_MODELS)}; got {name!r}") from None
