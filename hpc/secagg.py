"""Secure aggregation between ranks: masked integer contributions whose masks cancel only in the complete sum.

What it is (docs/PRIVACY.md §11 says what it protects and what not):

* **Key agreement at start-up.** Every rank makes an *ephemeral* X25519 key pair (`cryptography`), the public keys
  are all-gathered over the Communicator (32 bytes each, sent as 4 int64), and every pair of ranks (r, j) derives
  a 32-byte pair key: HKDF-SHA256 of their X25519 shared secret, bound to the two ranks. The keys live in this
  process only: a resumed or restarted job agrees on new ones, so a replayed (round, step) never reuses a mask.
* **Masks from a cryptographic PRG.** For every collective the caller names a *tag* (round, step, buffer id,
  epoch, ...); the mask of pair (r, j) for that tag is the ChaCha20 keystream under the pair key, its nonce
  derived from the tag (BLAKE2b). A tag is used once per key (`SecureAggregator` refuses a repeated tag): two
  masked values under one mask would reveal their difference. Rank r adds +m_rj for every j > r and -m_jr for
  every j < r, so the masks cancel in the sum over all ranks and in no partial sum.
* **Integers modulo 2**bits.** A contribution is an int64 tensor (the caller's encoded values: see
  `fedhypevae.privacy.integer`); with its masks it is taken modulo 2**bits, which makes it uniform on
  [0, 2**bits) to anyone without the pair keys. The sum is the Communicator's `allreduce_int64` (modulo 2**64 on
  every back-end; 2**bits divides 2**64), taken modulo 2**bits and lifted to (-2**(bits-1), 2**(bits-1)]. It equals
  the true integer sum exactly when the true sum lies in that range: the caller's overflow check
  (`fedhypevae.privacy.integer.check_bits`) rules wrap-around out.

It gives no integrity (a rank that sends garbage is not detected: the key exchange is not authenticated either, so
a rank could also impersonate another in it) and no recovery from a rank that drops out (the collective fails and
the step aborts, as every collective does). With one rank it is a no-op.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .comm import Communicator

INFO = b"fedhypevae secure aggregation v1"
MIN_BITS, MAX_BITS = 8, 64


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}]; got {bits!r}")
    return bits


def reduce_mod(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x modulo 2**bits as int64 in [0, 2**bits) (bits < 64); with bits = 64, x itself (int64 wraps modulo 2**64)."""
    if bits == 64:
        return x
    return torch.bitwise_and(x, (1 << bits) - 1)


def lift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The representative of x modulo 2**bits in [-2**(bits-1), 2**(bits-1)): the signed value of a sum."""
    if bits == 64:
        return x
    x = reduce_mod(x, bits)
    return torch.where(x >= (1 << (bits - 1)), x - (1 << bits), x)


def tag_nonce(tag: tuple) -> bytes:
    """The 16-byte ChaCha20 nonce of a collective's tag: a zero 32-bit block counter, then 96 bits of
    BLAKE2b(tag)."""
    text = repr(tuple(tag)).encode()
    return b"\0\0\0\0" + hashlib.blake2b(text, digest_size=12, person=b"fedhypevae-tag").digest()


def keystream_int64(key: bytes, tag: tuple, n: int) -> torch.Tensor:
    """n int64 words of the ChaCha20 keystream under `key` with the tag's nonce."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    enc = Cipher(algorithms.ChaCha20(key, tag_nonce(tag)), mode=None).encryptor()
    words = np.frombuffer(enc.update(bytes(8 * n)), dtype="<i8")
    return torch.from_numpy(words.astype(np.int64, copy=True))


class SecureAggregator:
    """Pairwise-masked integer sums over a Communicator (module docstring). Construct it on every rank at the same
    point (the key agreement is a collective)."""

    def __init__(self, comm: Communicator, *, bits: int = 64):
        self.comm, self.bits = comm, _check_bits(bits)
        self.rank, self.world_size = comm.rank, comm.world_size
        self._used: set = set()
        self.pair_keys: dict[int, bytes] = {}
        if self.world_size > 1:
            self._agree()

    def _agree(self) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        own = X25519PrivateKey.generate()
        raw = own.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        mine = torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))
        pubs = self.comm.allgather(mine)  # (world_size, 4)
        for j in range(self.world_size):
            if j == self.rank:
                continue
            theirs = pubs[j].numpy().astype("<i8").tobytes()
            secret = own.exchange(X25519PublicKey.from_public_bytes(theirs))
            lo, hi = min(self.rank, j), max(self.rank, j)
            info = INFO + b" pair " + lo.to_bytes(4, "little") + hi.to_bytes(4, "little")
            self.pair_keys[j] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)

    def mask(self, n: int, tag: tuple) -> torch.Tensor:
        """This rank's total mask for a collective of n words under `tag`: sum over j != rank of +m_rj (j > rank)
        or -m_jr (j < rank), int64 modulo 2**64."""
        total = torch.zeros(n, dtype=torch.int64)
        for j, key in sorted(self.pair_keys.items()):
            m = keystream_int64(key, tag, n)
            total = total + m if j > self.rank else total - m
        return total

    def masked(self, x: torch.Tensor, tag: tuple) -> torch.Tensor:
        """What this rank sends for `tag`: (x + its masks) modulo 2**bits, a new flat int64 tensor. ValueError for a
        tag used before (a reused mask would reveal the difference of two contributions)."""
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
            raise ValueError(f"secure aggregation sums int64 tensors; got {getattr(x, 'dtype', type(x).__name__)}")
        tag = tuple(tag)
        if tag in self._used:
            raise ValueError(f"secure aggregation: tag {tag} was used before; every collective needs a fresh tag")
        self._used.add(tag)
        flat = x.detach().reshape(-1).to("cpu")
        if self.world_size == 1:
            return reduce_mod(flat.clone(), self.bits)
        return reduce_mod(flat + self.mask(flat.numel(), tag), self.bits)

    def sum(self, x: torch.Tensor, tag: tuple) -> torch.Tensor:
        """The exact integer sum over ranks of every rank's `x` (same shape everywhere), modulo 2**bits and lifted to
        [-2**(bits-1), 2**(bits-1)): every rank gets it; no rank sees another's unmasked x."""
        shape, device = x.shape, x.device
        out = self.comm.allreduce_int64(self.masked(x, tag))
        return lift(out, self.bits).reshape(shape).to(device)

    def describe(self) -> dict:
        return {
            "bits": self.bits,
            "ranks": self.world_size,
            "key_agreement": "X25519 (ephemeral, per process start) + HKDF-SHA256" if self.world_size > 1 else None,
            "prg": "ChaCha20, nonce from BLAKE2b of (round, step, buffer, epoch)" if self.world_size > 1 else None,
        }
