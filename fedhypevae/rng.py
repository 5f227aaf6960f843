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
"""

from __future__ import annotations

import secrets

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys with NumPy's SeedSequence (well mixed, order-sensitive)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele, Lea & Flood 2014), elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


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
    """A CPU generator per seed (mt19937, what torch's CPU sampling functions draw from)."""
    return [torch.Generator().manual_seed(int(s)) for s in np.asarray(seeds).tolist()]


def secret_key() -> int:
    """A fresh 63-bit key from the operating system's entropy pool (secure noise: never stored)."""
    return secrets.randbits(63)


# stream ids so that different uses of one (client, round, step) never share numbers
STREAM_STEP, STREAM_MMD_RELEASE, STREAM_STATS_RELEASE, STREAM_INIT = 1, 2, 3, 4

# one namespace per method that draws private noise from privacy.noise_seed
METHOD_STREAMS = {"fedhypevae": 0xFE0, "fedavg": 0xFA1, "fedprox": 0xF9A, "dpcvae": 0xDC1}


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
        return generators(client_seeds(self.key, self.namespace, [self.client_id], stream, round_, step, epoch))[0]


def public_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
