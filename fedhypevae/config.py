"""Run configuration: one small dataclass per component, YAML files, dotted overrides.

    cfg = load_config("configs/default.yaml", overrides=["privacy.target_epsilon=4"])

Every field carries a one-line docstring (the comment above it). Validation happens in
``__post_init__`` with messages a user can act on; unknown keys are rejected with the list
of valid ones. The resolved config is saved with every run and checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout (a source tree; in a wheel: site-packages)
# shipped configs: fedhypevae/configs/ in an installed wheel (package data), configs/ in a checkout
_INSTALLED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _INSTALLED_CONFIGS if _INSTALLED_CONFIGS.is_dir() else REPO_ROOT / "configs"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


TRANSFORMS = ("auto", "none", "range", "l2")  # data.transform (and `fedhypevae data partition --transform`)
PARTITION_KINDS = ("iid", "dirichlet", "site")  # partition.kind (and `fedhypevae data partition --kind`)
HOLDOUTS = ("test", "validation")  # data.holdout
# `fedhypevae audit`: its modes, and each sabotage with what it breaks (for --help and the audit's outputs)
AUDIT_MODES = ("white-box", "black-box")
AUDIT_SABOTAGE = {
    "none": "nothing",
    "no-clip": "clipping skipped",
    "no-noise": "no noise added",
    "no-shares": "no Phi noise from any source (clients' shares, or the aggregator's draw)",
    "share-over-m": "every Phi noise source at sigma C / M (M clients) instead of its calibrated share",
}


def _one_of(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML's true/false are ints to Python


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_list(name: str, values: Any, *, minimum: int, what: str) -> None:
    """A non-empty list of integers >= minimum, naming the first element that is not one."""
    _check(isinstance(values, list) and len(values) >= 1, f"{name} must be a non-empty list of {what}; got {values!r}")
    for v in values:
        _check(_is_int(v), f"{name} must be a list of {what}; {v!r} in {values!r} is not an integer")
        _check(v >= minimum, f"{name} must be a list of {what} (>= {minimum}); got {v!r} in {values!r}")


def _number_list(name: str, values: Any, *, what: str) -> None:
    """A non-empty list of positive finite numbers, naming the first element that is not one."""
    _check(isinstance(values, list) and len(values) >= 1, f"{name} must be a non-empty list of {what}; got {values!r}")
    for v in values:
        _check(_is_number(v), f"{name} must be a list of {what}; {v!r} in {values!r} is not a number")
        _check(math.isfinite(v) and v > 0, f"{name} must be a list of {what} (> 0); got {v!r} in {values!r}")


@dataclass
class DataConfig:
    # a file (.npz .npy .pt .csv .parquet), a shard directory from `fedhypevae data partition`,
    # or a built-in name: digits, breast_cancer
    path: str = "digits"
    # label column for .csv/.parquet files (default: "label", else "y")
    label_column: str | None = None
    # column whose value must never be on both sides of a client's train/test split (e.g. lesion_id)
    group_column: str | None = None
    # column naming each record's site, for partition.kind=site
    site_column: str | None = None
    # optional row-aligned metadata table (.csv/.parquet) holding group/site columns
    metadata_path: str | None = None
    # per-record transform, public and fixed: auto (range when the format or data.value_range declares a range,
    # none for float arrays; a plain numeric table declares nothing and must choose), none, range, l2
    transform: str = "auto"
    # [low, high]: a range every feature lies in, declared from what you know about the format (e.g. [0, 255]
    # for 8-bit pixels), never measured on the private data; used by data.transform=range
    value_range: list | None = None
    # fraction of each client's records held out as its test split
    test_fraction: float = 0.2
    # which held-out split every score is on: test (each client's test split), or validation (for choosing
    # settings: each client's train split is split again, stratified with the same test_fraction, into a smaller
    # train split and a validation split that takes the test split's place everywhere; test records are never used)
    holdout: str = "test"

    def __post_init__(self):
        _check(
            isinstance(self.path, str) and self.path.strip() != "",
            f"data.path must not be empty: give a data file, a shard directory or a built-in name "
            f"(digits, breast_cancer); got {self.path!r}",
        )
        _one_of("data.transform", self.transform, TRANSFORMS)
        if self.value_range is not None:
            vr = self.value_range
            _check(
                isinstance(vr, list)
                and len(vr) == 2
                and all(_is_number(v) and math.isfinite(v) for v in vr)
                and vr[0] < vr[1],
                f"data.value_range must be [low, high] with low < high (two finite numbers); got {vr!r}",
            )
        # existing paths are stored absolute, so a saved config.yaml works from any directory
        for name in ("path", "metadata_path"):
            value = getattr(self, name)
            if isinstance(value, str) and value and Path(value).exists() and not Path(value).is_absolute():
                setattr(self, name, str(Path(value).resolve()))
        _check(0.0 < self.test_fraction < 1.0, f"data.test_fraction must be in (0, 1); got {self.test_fraction}")
        _check(
            self.holdout in HOLDOUTS,
            f"data.holdout must be test (score on each client's test split) or validation (score on a validation "
            f"split carved from each client's train split, for choosing settings); got {self.holdout!r}",
        )


@dataclass
class PartitionConfig:
    # iid, dirichlet (label skew) or site (one client per value of data.site_column)
    kind: str = "dirichlet"
    # Dirichlet concentration; smaller is more skewed
    alpha: float = 0.3
    # number of federated clients
    clients: int = 10
    # smallest allowed client (records before the train/test split)
    min_client_size: int = 10

    def __post_init__(self):
        _one_of("partition.kind", self.kind, PARTITION_KINDS)
        _check(self.alpha > 0, f"partition.alpha must be > 0; got {self.alpha}")
        _check(self.clients >= 1, f"partition.clients must be >= 1; got {self.clients}")
        _check(
            self.min_client_size >= 2,
            f"partition.min_client_size must be >= 2 (a train and a test record); got {self.min_client_size}",
        )


@dataclass
class ModelConfig:
    # latent dimension d_z
    latent_dim: int = 16
    # client code dimension d_v
    code_dim: int = 8
    # norm bound r on client codes (projection after every step)
    code_radius: float = 3.0
    # hidden widths of the client encoder and the shared decoder
    hidden: list = field(default_factory=lambda: [128, 128])
    # hidden width of the hypernetwork heads h_theta and h_omega
    hyper_hidden: int = 64
    # linear layers in each of h_theta, h_omega and g_omega (2: one hidden layer)
    hyper_layers: int = 2
    # activation between the linear layers of every network: silu, tanh, gelu or relu
    activation: str = "silu"
    # true: h_theta modulates the shared decoder per client (Eq. 3); false: one shared decoder, no h_theta (a
    # plain federated conditional VAE, e.g. the DP-CVAE baseline on this engine)
    modulation: bool = True
    # the latent prior: learned (p_omega(z | y) from the code, Eq. 4) or standard (N(0, I) for every class)
    prior: str = "learned"
    # true: the decoder's mean is a_y + its output, a_y the pooled class means of the DP class-statistics release,
    # which then happens BEFORE training (post-processing of that release: no budget of its own); DP-SGD learns
    # the variation around the class means instead of the means themselves
    class_anchor: bool = False
    # label embedding size for the prior generator g_omega
    label_embed_dim: int = 16
    # spectral-norm bound (Lipschitz constant) per hypernetwork layer; null disables the projection
    lipschitz: float | None = 1.0
    # the decoder's output scale sigma (p_theta(x | z, y) = N(mean, sigma^2), per dimension, in the transformed
    # data's units): null learns it (Phi's x_logstd); a number fixes it (a learned scale can grow to explain the
    # data as noise, and the latent then carries nothing: posterior collapse)
    output_std: float | None = None
    # lambda_v: weight of ||v||^2
    lambda_v: float = 1e-3
    # lambda_MMD: weight of the MMD alignment term; 0 disables it
    lambda_mmd: float = 1.0
    # merf: DP random-feature mean embeddings (post-processing; default); literal: per-sample cross term
    mmd_kind: str = "merf"
    # Gaussian kernel bandwidths of the multi-kernel MMD, in units of sqrt(d_x)
    mmd_bandwidths: list = field(default_factory=lambda: [0.25, 0.5, 1.0])
    # random Fourier features per bandwidth for merf
    mmd_features: int = 128
    # synthetic samples per class drawn for the MMD term at every step
    mmd_synthetic_per_class: int = 8

    def __post_init__(self):
        for name in (
            "latent_dim",
            "code_dim",
            "hyper_hidden",
            "hyper_layers",
            "label_embed_dim",
            "mmd_features",
            "mmd_synthetic_per_class",
        ):
            _check(int(getattr(self, name)) >= 1, f"model.{name} must be >= 1; got {getattr(self, name)}")
        _int_list("model.hidden", self.hidden, minimum=1, what="positive integer widths")
        _check(self.code_radius > 0, f"model.code_radius must be > 0; got {self.code_radius}")
        _check(
            self.output_std is None
            or (_is_number(self.output_std) and math.isfinite(self.output_std) and 0.0 < self.output_std < 100.0),
            f"model.output_std must be null (learned) or a fixed decoder scale in (0, 100); got {self.output_std!r}",
        )
        _check(
            self.lipschitz is None or self.lipschitz > 0, f"model.lipschitz must be > 0 or null; got {self.lipschitz}"
        )
        _check(self.lambda_v >= 0 and self.lambda_mmd >= 0, "model.lambda_v and model.lambda_mmd must be >= 0")
        _one_of("model.mmd_kind", self.mmd_kind, ("merf", "literal"))
        _one_of("model.activation", self.activation, ("silu", "tanh", "gelu", "relu"))
        _check(isinstance(self.modulation, bool), f"model.modulation must be true or false; got {self.modulation!r}")
        _one_of("model.prior", self.prior, ("learned", "standard"))
        _check(
            isinstance(self.class_anchor, bool), f"model.class_anchor must be true or false; got {self.class_anchor!r}"
        )
        _check(self.mmd_features % 2 == 0, f"model.mmd_features must be even (cos/sin pairs); got {self.mmd_features}")
        _number_list("model.mmd_bandwidths", self.mmd_bandwidths, what="positive bandwidths")

    @property
    def uses_code(self) -> bool:
        """Whether a client code changes what the model generates (it feeds h_theta or h_omega): without either,
        the class statistics and the meta-code fit serve nothing."""
        return self.modulation or self.prior == "learned"

    @property
    def releases_stats(self) -> bool:
        """Whether a run releases class statistics: for the meta-code fit (`uses_code`) or the anchor."""
        return self.uses_code or self.class_anchor


@dataclass
class TrainConfig:
    # communication rounds
    rounds: int = 30
    # local DP-SGD steps per round (each one Poisson batch per client)
    local_steps: int = 5
    # optimizer for the shared hypernetwork Phi: sgd or adam
    optimizer: str = "adam"
    # learning rate for Phi
    lr: float = 1e-3
    # learning rate for the client encoders psi_i
    encoder_lr: float = 1e-3
    # learning rate for the client codes v_i
    code_lr: float = 1e-2
    # learning rate of each client's private copy of Phi in delta mode (plain SGD)
    local_lr: float = 1e-2
    # write a checkpoint every this many rounds (0: only at the end)
    checkpoint_every: int = 5
    # keep this many complete checkpoints
    keep_checkpoints: int = 2
    # compare the replicas of Phi across ranks (a cheap checksum reduce) every this many steps; 0: never
    replica_check_every: int = 10
    # the per-sample stage of the DP step (which runs every client of a rank in one computation either way):
    # batched: ghost-norm clipping (fedhypevae/engine.py); reference: torch.func per-sample gradients. Same
    # release up to float rounding; the literal MMD term always uses torch.func
    engine: str = "batched"
    # a rank's clients are stepped in chunks of at most this many (the working set of a step is one chunk's:
    # its noise, sums and activations); 0: the whole block at once
    chunk_clients: int = 1024
    # seconds a rank of a run of several ranks may go without progress (a DP step, the collective after it, a
    # checkpoint write) before it ends itself with status 124, which ends the job: a peer that vanished from the
    # network leaves the others waiting in a collective for ever otherwise. Also the torch back-end's collective
    # timeout during training. Longer than any rank's slowest step or checkpoint write; 0: no watchdog
    step_timeout_s: float = 600.0
    # record each round's wall time per phase of the step (sample, forward, backward, norms, clip, noise, post,
    # optimizer) and of the trainer (guard, ledger, all_reduce, phi_update) in the metrics, as time/phase/NAME(s):
    # rank 0's, and only where the diagnostics are sent (timings depend on batch sizes). On CUDA each phase then
    # synchronizes the device: off by default
    time_phases: bool = False

    def __post_init__(self):
        _check(self.rounds >= 1, f"train.rounds must be >= 1; got {self.rounds}")
        _check(self.local_steps >= 1, f"train.local_steps must be >= 1; got {self.local_steps}")
        _one_of("train.optimizer", self.optimizer, ("sgd", "adam"))
        for name in ("lr", "encoder_lr", "code_lr", "local_lr"):
            _check(getattr(self, name) > 0, f"train.{name} must be > 0; got {getattr(self, name)}")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.replica_check_every >= 0, "train.replica_check_every must be >= 0")
        _check(self.chunk_clients >= 0, f"train.chunk_clients must be >= 0 (0: no chunks); got {self.chunk_clients}")
        _check(
            self.step_timeout_s >= 0,
            f"train.step_timeout_s must be > 0 seconds (0: no step watchdog); got {self.step_timeout_s}",
        )
        _check(
            self.engine in ("batched", "reference"),
            f"train.engine must be batched (ghost-norm per-sample clipping) or reference "
            f"(torch.func per-sample gradients); got {self.engine!r}",
        )


@dataclass
class FederationConfig:
    # grad: all-reduce noisy gradients every step (Eq. 10); delta: local steps on a private copy, mean of deltas
    aggregation: str = "grad"
    # declared: w_i proportional to declared (public) sizes; uniform: w_i = 1/m
    weights: str = "declared"
    # public declared sizes, one per client; null: the sizes fixed when the partition is made (the true
    # training sizes, public by assumption). Every DP normalizer, weight and output uses these
    declared_sizes: list | None = None
    # none: declare the sizes as they are; pow2: round each declared size to the nearest power of two, so
    # that what is published about a client's size is only its order of magnitude
    declared_size_rounding: str = "none"
    # server learning rate applied to the weighted mean delta (delta mode)
    server_lr: float = 1.0

    def __post_init__(self):
        from .aggregation import AGGREGATIONS  # the registry of rules (a new rule registers itself there)

        _one_of("federation.aggregation", self.aggregation, tuple(AGGREGATIONS))
        if self.declared_sizes is not None:
            _int_list("federation.declared_sizes", self.declared_sizes, minimum=1, what="positive integer sizes")
        _one_of("federation.weights", self.weights, ("declared", "uniform"))
        _one_of("federation.declared_size_rounding", self.declared_size_rounding, ("none", "pow2"))
        _check(self.server_lr > 0, "federation.server_lr must be > 0")


@dataclass
class PrivacyConfig:
    # false: the explicit non-private mode (baselines, references); no noise, no clipping, no budget
    enabled: bool = True
    # strict: one clipped, noised gradient over (psi_i, v_i, Phi); paper: only Phi privatized (not a formal guarantee)
    mode: str = "strict"
    # target epsilon for the whole run (training and released statistics together)
    target_epsilon: float = 1.0
    # target delta
    delta: float = 1e-4
    # per-sample clipping norm C
    clip_norm: float = 1.0
    # Poisson sampling rate q, the same for every client
    sample_rate: float = 0.1
    # rdp or prv (Opacus accountants)
    accountant: str = "rdp"
    # null: noise and sampling from securely seeded generators; an integer: reproducible (not for release)
    noise_seed: int | None = None
    # false: no training diagnostics (losses, clip fractions) leave the clients
    diagnostics: bool = True
    # share of the target epsilon spent on the class statistics for the meta-code (Eq. 11)
    stats_epsilon_fraction: float = 0.1
    # share of the target epsilon spent on the DP random-feature embeddings for the MMD term (merf)
    mmd_epsilon_fraction: float = 0.1
    # L2 clip for embeddings in the statistics releases; null: sqrt(d_x) for range data, 1 for l2 data
    stats_clip_norm: float | None = None
    # a public point subtracted from every record (each coordinate, in the transformed data's units) before the
    # statistics release clips it, and added back to the released means: records centred near it have smaller
    # norms, so a smaller stats_clip_norm clips little of them and the noise (proportional to the clip) is smaller
    stats_center: float = 0.0
    # how the class-statistics release's budget is shared between its components (sums, counts[, second moments]):
    # component k gets noise std sigma * Delta_k / sqrt(share_k); null: equal shares (std sigma * sqrt(m) * Delta_k)
    stats_split: list | None = None
    # a fixed noise multiplier instead of calibrating one from target_epsilon (the budget guard still applies)
    noise_multiplier: float | None = None
    # where the noise is added, hence whom the guarantee protects against (docs/PRIVACY.md): local (every client
    # noises what it sends), distributed (secure-aggregation model, simulated: noise shares summing to the
    # noise), central (a trusted aggregator on rank 0 adds one draw)
    trust_model: str = "local"
    # distributed: how many parties may pool their own noise shares (and the public aggregate)
    collusion: int = 1
    # distributed: a party is a client, or a rank (sites that each run one rank)
    party: str = "client"
    # distributed: real secure aggregation between ranks instead of the floating-point simulation: every rank rounds
    # its partial Phi sum to a grid, adds an integer Skellam share and sends it masked (pairwise X25519 keys,
    # ChaCha20 masks) modulo 2**secure_bits; accounted as the Skellam mechanism (docs/PRIVACY.md section 11)
    secure_aggregation: bool = False
    # secure aggregation: the modulus 2**bits of the masked sums (8..64), checked against wrap-around
    secure_bits: int = 64
    # secure aggregation: the grid as a ratio: the rounding adds at most 1/ratio to the sensitivity
    secure_grid_ratio: float = 100.0

    def __post_init__(self):
        _one_of("privacy.mode", self.mode, ("strict", "paper"))
        _one_of("privacy.accountant", self.accountant, ("rdp", "prv"))
        _check(self.target_epsilon > 0, f"privacy.target_epsilon must be > 0; got {self.target_epsilon}")
        _check(0 < self.delta < 1, f"privacy.delta must be in (0, 1); got {self.delta}")
        _check(self.clip_norm > 0, f"privacy.clip_norm must be > 0; got {self.clip_norm}")
        _check(0 < self.sample_rate <= 1, f"privacy.sample_rate must be in (0, 1]; got {self.sample_rate}")
        _check(
            0 <= self.stats_epsilon_fraction < 1
            and 0 <= self.mmd_epsilon_fraction < 1
            and self.stats_epsilon_fraction + self.mmd_epsilon_fraction < 1,
            "privacy.stats_epsilon_fraction + privacy.mmd_epsilon_fraction must be < 1 (DP-SGD needs a share)",
        )
        _check(self.stats_clip_norm is None or self.stats_clip_norm > 0, "privacy.stats_clip_norm must be > 0 or null")
        _check(
            _is_number(self.stats_center) and math.isfinite(self.stats_center),
            f"privacy.stats_center must be a finite number; got {self.stats_center!r}",
        )
        _check(
            self.noise_multiplier is None or self.noise_multiplier >= 0, "privacy.noise_multiplier must be >= 0 or null"
        )
        _check(
            self.noise_seed is None or _is_int(self.noise_seed),
            f"privacy.noise_seed must be null or an integer; got {self.noise_seed!r}",
        )
        _check(
            self.noise_seed is None or self.noise_seed >= 0, f"privacy.noise_seed must be >= 0; got {self.noise_seed}"
        )
        from .privacy.trust import check_trust_settings

        check_trust_settings(trust_model=self.trust_model, collusion=self.collusion, party=self.party)
        _check(
            _is_int(self.secure_bits) and 8 <= self.secure_bits <= 64,
            f"privacy.secure_bits must be an integer in [8, 64]; got {self.secure_bits!r}",
        )
        _check(
            self.secure_grid_ratio > 0 and math.isfinite(self.secure_grid_ratio),
            f"privacy.secure_grid_ratio must be a positive number; got {self.secure_grid_ratio!r}",
        )
        if self.secure_aggregation and self.enabled:
            _check(
                self.trust_model == "distributed",
                "privacy.secure_aggregation makes the distributed trust model real: it needs "
                f"privacy.trust_model=distributed (got {self.trust_model})",
            )
            _check(
                self.accountant == "rdp",
                "privacy.secure_aggregation is accounted as the Skellam mechanism under RDP: set "
                f"privacy.accountant=rdp (got {self.accountant})",
            )

    @property
    def accounting_delta(self) -> float:
        """The delta the accountant composes at: delta itself, or with secure aggregation delta less the share
        given to a wrap-around of the integer sum (privacy/integer.py), so that the run's delta holds it."""
        if self.enabled and self.secure_aggregation:
            from .privacy.integer import OVERFLOW_SHARE

            return self.delta * (1.0 - OVERFLOW_SHARE)
        return self.delta


@dataclass
class StatsConfig:
    # covariance released for the meta-code: full, diag or none (means only)
    covariance: str = "diag"
    # keep the top-k eigencomponents of the noisy full covariance (0: all); post-processing
    rank: int = 0

    def __post_init__(self):
        _one_of("stats.covariance", self.covariance, ("full", "diag", "none"))
        _check(self.rank >= 0, "stats.rank must be >= 0")


@dataclass
class MetaConfig:
    # number of meta-codes K (Eq. 13); 1 is the neutral meta-code of Eq. 11
    codes: int = 1
    # beta: weight of the covariance term in Eq. 11
    beta: float = 0.1
    # optimizer steps for the meta-code fit
    steps: int = 300
    # learning rate of the meta-code fit
    lr: float = 0.05
    # Monte-Carlo samples per class for the moments in Eq. 11
    samples_per_class: int = 256

    def __post_init__(self):
        _check(self.codes >= 1, "meta.codes must be >= 1")
        _check(
            self.steps >= 0 and self.lr > 0 and self.samples_per_class >= 2,
            "meta.steps >= 0, meta.lr > 0, meta.samples_per_class >= 2",
        )


@dataclass
class SynthConfig:
    # synthetic samples per class (balanced)
    samples_per_class: int = 200
    # balanced, or proportional to the DP class counts
    class_balance: str = "balanced"
    # true: draw x from p_theta(x|z,y) (Eq. 12 literally); false: release its mean E[x|z,y], z ~ p_omega(z|y).
    # Under DP the learned output variance is large and sampled noise swamps the class signal
    # (digits, epsilon=1: balanced accuracy 61.6 % with it, 74.9 % without, augment protocol)
    output_noise: bool = False

    def __post_init__(self):
        _check(self.samples_per_class >= 1, "synth.samples_per_class must be >= 1")
        _one_of("synth.class_balance", self.class_balance, ("balanced", "proportional"))


@dataclass
class Config:
    # public seed: fixes data partition and initialization (never the DP noise)
    seed: int = 0
    # torch threads per process; 0 leaves torch's default
    threads: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)

    def __post_init__(self):
        _check(
            _is_int(self.seed) and 0 <= self.seed < 2**63, f"seed must be an integer in [0, 2^63); got {self.seed!r}"
        )
        _check(
            _is_int(self.threads) and self.threads >= 0,
            f"threads must be >= 0 (0 leaves torch's default); got {self.threads!r}",
        )
        # a trust model other than local needs a rule whose release is one Gaussian mechanism per step
        from .aggregation import trust_refusal

        why = trust_refusal(self.federation.aggregation, self.privacy.trust_model) if self.privacy.enabled else None
        _check(why is None, why or "")
        _check(
            self.model.releases_stats or not self.privacy.enabled or self.privacy.stats_epsilon_fraction == 0,
            "privacy.stats_epsilon_fraction must be 0 when model.modulation is false and model.prior is standard: "
            "the model has no heads, so the class statistics would spend budget on a meta-code that changes nothing",
        )
        split = self.privacy.stats_split
        if split is not None:
            from .privacy.stats import stats_components

            m = stats_components(self.stats.covariance)
            _check(
                isinstance(split, list)
                and len(split) == m
                and all(_is_number(v) and v > 0 for v in split)
                and abs(sum(split) - 1.0) <= 1e-6,
                f"privacy.stats_split must be {m} positive shares adding up to 1 (sums, counts"
                f"{', second moments' if m == 3 else ''}: stats.covariance is {self.stats.covariance}); got {split!r}",
            )
        _check(
            not (self.model.class_anchor and self.privacy.enabled and self.privacy.stats_epsilon_fraction == 0),
            "model.class_anchor needs the class-statistics release: set privacy.stats_epsilon_fraction > 0",
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


_SECTIONS = {f.name: f for f in fields(Config)}


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'the config'} must be a mapping (key: value lines); "
            f"got {type(values).__name__} {values!r}"
        )
    valid = {f.name: f for f in fields(cls)}
    unknown = sorted(set(map(str, values)) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys here: {', '.join(prefix + k for k in valid)}"
        )
    kwargs = {}
    for name, value in values.items():
        f = valid[name]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kwargs[name] = _build(f.default_factory, {} if value is None else value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(prefix + name, value, f)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the unknown-key check
        raise ConfigError(str(exc)) from None


# keys whose value may be infinite (.inf in YAML): an infinite target epsilon means "no budget"
_INFINITE_OK = ("privacy.target_epsilon",)


def _field_type(f: dataclasses.Field) -> tuple[str, bool]:
    """('int' | 'float' | 'bool' | 'str' | 'list', optional) from the annotation (a string here)."""
    parts = str(f.type).replace(" ", "").split("|")  # "float" or "float|None"
    kinds = [p for p in parts if p != "None"]
    return "|".join(kinds), len(kinds) < len(parts)


_WHAT = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "list": "a list"}


def _coerce(name: str, value: Any, f: dataclasses.Field):
    """Check a value against the field's declared type. YAML gives ints where floats are meant (1 vs 1.0):
    those are accepted; true/false are never taken for numbers (Python counts bool as an int)."""
    kind, optional = _field_type(f)
    what = _WHAT.get(kind, kind)
    if value is None:
        _check(optional, f"{name} must be {what}; got nothing (null or an empty value)")
        return None
    if isinstance(value, str) and kind == "float":
        try:  # YAML 1.1 reads 1e-7 (no dot) as a string
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number; got {value!r}") from None
    null = " or null" if optional else ""
    if kind == "bool":
        _check(isinstance(value, bool), f"{name} must be true or false; got {value!r}")
    elif kind == "float":
        _check(_is_number(value), f"{name} must be a number{null}; got {value!r}")
        value = float(value)
        _check(
            math.isfinite(value) or (name in _INFINITE_OK and value == math.inf),
            f"{name} must be a finite number; got {value!r}",
        )
    elif kind == "int":
        _check(_is_int(value), f"{name} must be an integer{null}; got {value!r}")
    elif kind == "str":
        _check(isinstance(value, str), f"{name} must be a string{null}; got {value!r}")
    elif kind == "list":
        _check(isinstance(value, list), f"{name} must be a list{null}; got {value!r}")
    return value


def shipped_configs() -> list[str]:
    """Training configs shipped in configs/ (table configs, table1_*.yaml, are for `fedhypevae table`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("table"))


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_dir():
        raise ConfigError(
            f"config {name_or_path} is a directory; give a YAML file or the name of a shipped config "
            f"({', '.join(shipped_configs())})"
        )
    if p.is_file():
        return p
    q = CONFIG_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if q.is_file():
        return q
    raise ConfigError(f"config file {name_or_path!r} not found; shipped configs: {', '.join(shipped_configs())}")


def read_yaml(p: Path, what: str = "config file"):
    """The YAML document in p; unreadable files, other encodings and syntax errors as one-line ConfigErrors."""
    try:
        text = Path(p).read_text(encoding="utf-8")
    except PermissionError:
        raise ConfigError(f"{what} {p}: permission denied; make it readable (chmod u+r) or copy it") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {p} is not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at offset "
            f"{exc.start}); is it a YAML file?"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{what} {p} cannot be read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} {p} is not valid YAML{at}: {problem}") from None


def apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value, e.g. privacy.target_epsilon=4")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: cannot parse the value: {exc}") from None
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        if part not in _SECTIONS and node is tree:
            sections = [s for s, f in _SECTIONS.items() if dataclasses.is_dataclass(f.default_factory)]
            raise ConfigError(
                f"unknown config section {part!r} in override {override!r}; sections: {', '.join(sections)}"
            )
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = value


def config_from_dict(tree: dict) -> Config:
    return _build(Config, tree or {}, "")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """The resolved, validated config: a YAML file (or a shipped config's name), then the dotted overrides.
    An error in the file names the file; an error an override brought in names the key."""
    tree: dict = {}
    p = None
    if path is not None:
        p = resolve_config_path(path)
        tree = read_yaml(p)
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(
                f"config file {p} must be a mapping (key: value lines, one section per component); "
                f"its top level is a {type(tree).__name__}"
            )
    merged = copy.deepcopy(tree)
    for ov in overrides or []:
        apply_override(merged, ov)
    try:
        return config_from_dict(merged)
    except ConfigError as exc:
        if p is None or not overrides:
            raise _in_file(exc, p) from None
        try:  # was it the file or an override?
            config_from_dict(tree)
        except ConfigError as in_file:
            if str(in_file) == str(exc):
                raise _in_file(exc, p) from None
        raise


def _in_file(exc: ConfigError, p: Path | None) -> ConfigError:
    return ConfigError(f"config file {p}: {exc}") if p is not None else exc


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
