"""Randomness: public seeds for data and initialization, private generators for DP.

A client's Poisson coins and noise come from the client's own generator, never from the rank. Every
release has its own generator, keyed by (key, method, client, stream, round, step, epoch):
  * secure (default): the key is a secret drawn from the operating system's entropy pool when the
    generators are made and never written anywhere, so that nobody (the operator included) can replay
    who was sampled or which noise was added;
  * reproducible (privacy.noise_seed set): the key is the noise seed, so that 1 rank and 4 ranks draw
    the same numbers. Not for release.
The key is mixed with the rest by a SplitMix64 chain (`client_seeds`), vectorized over clients: one
numpy call gives the seeds of a whole block of clients (NumPy's SeedSequence, used for the public
seeds, costs ~10-100 us per call: 5 s a round at 50,000 clients).

Every method has its own stream namespace (METHOD_STREAMS): FedHypeVAE and the DP baselines given the
same noise_seed never share a draw. The epoch counts the releases made under one key: a re-release
that is not bit-identical to an earlier one (a resume that computed a different value) is drawn
under a fresh epoch, never under the noise of the release it differs from.

Public randomness (initialization, the DP-MERF features, the meta-code fit, synthetic draws, the audit's
canaries) is derived from the public seed and one tag of the table `SeedTag`: every public use has its
own tag, so that no two uses share numbers. A tag's value is part of every result: never change one.
"""

from __future__ import annotations

import enum
import secrets

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys with NumPy's SeedSequence (well mixed, order-sensitive)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# SplitMix64's finalizer: (shift, then multiplier) three times, the last without a multiplier
_MIX_STEPS = (
    (np.uint64(30), np.uint64(0xBF58476D1CE4E5B9)),
    (np.uint64(27), np.uint64(0x94D049BB133111EB)),
    (np.uint64(31), None),
)


def _mix_inplace(z: np.ndarray) -> np.ndarray:
    """`_mix` in place on an array (one scratch array instead of a temporary per operation: the private generators'
    624 words a seed)."""
    t = np.empty_like(z)
    with np.errstate(over="ignore"):
        for shift, mul in _MIX_STEPS:
            np.right_shift(z, shift, out=t)
            z ^= t
            if mul is not None:
                z *= mul
    return z


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele, Lea & Flood 2014), elementwise on uint64 (wrapping arithmetic); a new value
    (scalars stay scalars: cheaper than arrays for the keys of one client)."""
    with np.errstate(over="ignore"):
        for shift, mul in _MIX_STEPS:
            z = z ^ (z >> shift)
            if mul is not None:
                z = z * mul
    return z


def client_seeds(key: int, namespace: int, clients, *keys: int) -> np.ndarray:
    """One 63-bit seed per client (int64 array) from (key, namespace, client, *keys), order-sensitive: a chain of
    SplitMix64 steps, each absorbing one key. Vectorized over `clients` (an int sequence or array)."""
    ids = np.asarray(clients, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(np.uint64(int(key) & 0xFFFFFFFFFFFFFFFF) + _GOLDEN)
        h = _mix(h ^ (np.uint64(int(namespace) & 0xFFFFFFFFFFFFFFFF) + _GOLDEN * np.uint64(2)))
        h = _mix(h ^ (ids + _GOLDEN * np.uint64(3)))
        for n, k in enumerate(keys):
            h = _mix(h ^ (np.uint64(int(k) & 0xFFFFFFFFFFFFFFFF) + _GOLDEN * np.uint64(4 + n)))
    return (h >> np.uint64(1)).astype(np.int64)


def generators(seeds) -> list:
    """A CPU generator per seed (mt19937, what torch's CPU sampling functions draw from), for PUBLIC uses (the
    clients' initial weights). torch seeds mt19937 from the seed's low 32 bits only: seeds that differ above them give
    the same numbers. The private generators are `secret_generators`."""
    return [torch.Generator().manual_seed(int(s)) for s in np.asarray(seeds).tolist()]


# torch's CPU generator state (CPUGeneratorImplState, 5,056 bytes): the initial seed (uint64) at 0, `left` and
# `seeded` (int32) at 8 and 12, `next` (uint64) at 16, mt19937's 624 words (one uint64 slot each) from 24, then the
# cached normal samples, which a fresh generator has not (zeros)
_MT_WORDS, _MT_STATE_BYTES, _MT_WORDS_AT = 624, 5056, 24


_SPLITMIX_STEPS = np.arange(1, _MT_WORDS // 2 + 1, dtype=np.uint64) * _GOLDEN  # SplitMix64's counter: seed + k * golden
_STATE_CHUNK = 64  # seeds whose words are mixed at once (64 x 312 words: 160 KB, in cache)


def secret_generators(seeds) -> list:
    """A CPU generator per 63-bit seed whose whole mt19937 state (624 words) is derived from every bit of the seed: the
    words are the SplitMix64 sequence started at the seed (each output split into two words), set with `set_state`,
    `left = 1` as after seeding (the first draw twists the state). `manual_seed` would use the seed's low 32 bits
    only: among the ~10^9 private generators of a 100,000-client run, ~100 pairs would share their noise (two
    releases of the same noise leak the difference of their values), and the noise of a release could be found by
    trying the 2^32 seeds. `initial_seed()` returns the seed.

    The words of `_STATE_CHUNK` seeds are mixed at once; each generator's state is then written into one reused
    state tensor (`set_state` copies it) instead of a fresh tensor per generator: 4.6 us a generator (2.5 of it
    `torch.Generator()` itself) against 3.8 for `manual_seed` and 9.0 with a state tensor per generator."""
    s = np.asarray(seeds, dtype=np.int64).reshape(-1).astype(np.uint64)
    buf = torch.zeros(_MT_STATE_BYTES, dtype=torch.uint8)
    raw = buf.numpy()  # the same memory
    raw[8:16].view(np.int32)[:] = 1  # left = 1, seeded = 1; next = 0; no cached normal samples
    slots = raw[: _MT_WORDS_AT + 8 * _MT_WORDS].view(np.uint64)
    seed_slot, word_slots = slots[:1], slots[_MT_WORDS_AT // 8 :]
    out = []
    for lo in range(0, len(s), _STATE_CHUNK):
        chunk = s[lo : lo + _STATE_CHUNK]
        with np.errstate(over="ignore"):
            words = _mix_inplace(chunk[:, None] + _SPLITMIX_STEPS[None, :]).view(np.uint32)
        for seed, w in zip(chunk, words):
            seed_slot[0] = seed
            word_slots[:] = w  # each 32-bit half widened into its own slot
            g = torch.Generator()
            g.set_state(buf)
            out.append(g)
    return out


def secret_key() -> int:
    """A fresh 63-bit key from the operating system's entropy pool (secure noise: never stored)."""
    return secrets.randbits(63)


# stream ids so that different uses of one (client, round, step) never share numbers
STREAM_STEP, STREAM_MMD_RELEASE, STREAM_STATS_RELEASE = 1, 2, 3

# one namespace per method that draws private noise from privacy.noise_seed
METHOD_STREAMS = {"fedhypevae": 0xFE0, "fedavg": 0xFA1, "fedprox": 0xF9A, "dpcvae": 0xDC1, "gaussian": 0x6A5}


class ClientRNG:
    """The private generators of one client: one per release key (see the module docstring)."""

    def __init__(self, client_id: int, noise_seed: int | None, *, method: str = "fedhypevae", key: int | None = None):
        if method not in METHOD_STREAMS:
            raise ValueError(f"no noise stream namespace for method {method!r}; known: {', '.join(METHOD_STREAMS)}")
        self.client_id = client_id
        self.noise_seed = noise_seed
        self.namespace = METHOD_STREAMS[method]
        # reproducible: the noise seed; secure: a secret (a given one: the client's block's, shared by its rows)
        self.key = noise_seed if noise_seed is not None else (key if key is not None else secret_key())

    @property
    def reproducible(self) -> bool:
        return self.noise_seed is not None

    def generator(self, stream: int, round_: int = 0, step: int = 0, epoch: int = 0) -> torch.Generator:
        """The generator of one release; `epoch` > 0 for a re-release that is not an identical replay."""
        seeds = client_seeds(self.key, self.namespace, [self.client_id], stream, round_, step, epoch)
        return secret_generators(seeds)[0]


@enum.unique
class SeedTag(enum.IntEnum):
    """The public seed tags: the key that follows the public seed in `derive_seed` / `public_generator` (or
    the namespace of `client_seeds` under the public seed), one per public use. `SeedTag.X.meaning` says
    what it seeds. The values are those every earlier run used: changing one changes every result."""

    meaning: str

    def __new__(cls, value: int, meaning: str):
        tag = int.__new__(cls, value)
        tag._value_ = value
        tag.meaning = meaning
        return tag

    MODEL_INIT = 4, "initial weights: every client's encoder and code (client_seeds namespace), the DP-CVAE's models"
    BASELINE_SHUFFLE = 101, "the minibatch order of the linear baselines' shuffle sampling (per client, round, epoch)"
    DPCVAE_SYNTH = 202, "the DP-CVAE baseline's synthetic draw (post-processing)"
    GAUSSIAN_SYNTH = 0x6A55, "the DP Gaussian sampler baseline's synthetic draw (post-processing)"
    PHI_INIT = 0xF1, "the hypernetwork Phi's initial weights (the same on every rank)"
    MERF_FEATURES = 0xFEA7, "the DP-MERF random features (public, the same for every client)"
    METACODE_FIT = 0x3E7A, "the meta-code fit's samples (post-processing of Phi and the released statistics)"
    SYNTH_DRAW = 0x5A7, "the synthetic records a training run writes (synthetic.npz)"
    GENERATE = 0x6E7, "the records `fedhypevae generate` draws (with its --seed)"
    EVAL_CLIENT = 0xE7A1, "a client's evaluation classifiers (per client)"
    SENSITIVITY_PROBE = 0x5E45, "the sensitivity probe's sampling coins and noise (per step, client)"
    AUDIT = 0xA0D1, "the privacy audit's seed when none is given (from the run's seed)"
    AUDIT_COINS = 0xC0, "the audit's in/out coin of every canary (under the audit seed)"
    AUDIT_LAYOUT = 0xC1, "the audit's canaries: coordinates and signs (white-box), records (black-box)"
    AUDIT_SAMPLE = 0xC2, "the audit's canary Poisson sampling per (round, step) (under the audit seed)"
    AUDIT_SCORE = 0xC3, "the reparameterization noise of the black-box audit's ELBO scores"


def public_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator derived from a public seed and keys (the first one a `SeedTag`)."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
