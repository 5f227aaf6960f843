"""Randomness: public seeds for data and initialization, private generators for DP.

A client's Poisson coins and noise come from the client's own generator, never from the rank:
  * secure (default): seeded once per client from the operating system's entropy pool, so that
    nobody (the operator included) can replay who was sampled or which noise was added;
  * reproducible (privacy.noise_seed set): derived from (noise_seed, method, client, stream, round,
    step, epoch), so that 1 rank and 4 ranks draw the same numbers. Not for release.

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


# stream ids so that different uses of one (client, round, step) never share numbers
STREAM_STEP, STREAM_MMD_RELEASE, STREAM_STATS_RELEASE, STREAM_INIT = 1, 2, 3, 4

# one namespace per method that draws private noise from privacy.noise_seed
METHOD_STREAMS = {"fedhypevae": 0xFE0, "fedavg": 0xFA1, "fedprox": 0xF9A, "dpcvae": 0xDC1}


class ClientRNG:
    """The private generator of one client."""

    def __init__(self, client_id: int, noise_seed: int | None, *, method: str = "fedhypevae"):
        if method not in METHOD_STREAMS:
            raise ValueError(f"no noise stream namespace for method {method!r}; known: {', '.join(METHOD_STREAMS)}")
        self.client_id = client_id
        self.noise_seed = noise_seed
        self.namespace = METHOD_STREAMS[method]
        self._secure = None if noise_seed is not None else torch.Generator().manual_seed(secrets.randbits(63))

    @property
    def reproducible(self) -> bool:
        return self.noise_seed is not None

    def generator(self, stream: int, round_: int = 0, step: int = 0, epoch: int = 0) -> torch.Generator:
        """The generator of one release. Secure: the client's one generator (every draw is fresh).
        Reproducible: derived from the key; `epoch` > 0 for a re-release that is not an identical replay."""
        if self._secure is not None:
            return self._secure
        return torch.Generator().manual_seed(derive_seed(self.noise_seed, self.namespace, self.client_id, stream,
                                                         round_, step, epoch))


def public_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
