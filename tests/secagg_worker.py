"""Secure aggregation on every rank of a real job (mpiexec or torchrun): run by tests/test_secagg.py.

Checks, each on every rank: the masked sum equals the unmasked integer sum exactly (64 bits with wrap-around
values; 32 and 16 bits lifted to signed); what a rank sends is uniform modulo 2**bits (a chi-square test on its
bytes); the same data under two tags is sent differently; the sum of every rank's contribution but one is uniform
(the masks do not cancel without it); a tag used twice is refused. Prints "secagg ok rank R/N backend B checks K"
and exits 0 on every rank, or prints "FAIL rank R: ..." and exits 1. SECAGG_WORKER_SABOTAGE=1 makes rank 0 flip
the sign of one pair's mask (the masks no longer cancel): the exactness checks must then fail.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

N = 1 << 15  # words per uniformity test: 262,144 bytes


def chi2_bytes_uniform(words: torch.Tensor) -> tuple[bool, float]:
    """Whether the bytes of int64 `words` look uniform: chi-square over the 256 byte values below the 1e-4 upper
    quantile (df 255: 338.6)."""
    b = np.frombuffer(words.numpy().astype("<i8").tobytes(), dtype=np.uint8)
    counts = np.bincount(b, minlength=256).astype(float)
    exp = len(b) / 256
    stat = float(((counts - exp) ** 2 / exp).sum())
    return stat < 338.6, stat


def values(rank: int, n: int, bits: int) -> torch.Tensor:
    """Rank r's test integers: seeded, in range so that the sum over <= 8 ranks fits 2**(bits-1) (bits < 64), or
    with wrap-around values (bits 64)."""
    g = torch.Generator().manual_seed(1000 + rank)
    if bits == 64:
        v = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64)
        v[:3] = torch.tensor([2**63 - 1, -(2**63), 7 * (rank + 1)])
        return v
    hi = 2 ** (bits - 1) // 8
    return torch.randint(-hi, hi, (n,), generator=g, dtype=torch.int64)


def run_checks(comm) -> tuple[list, int]:
    from fedhypevae.hpc.secagg import SecureAggregator, lift

    fails, count = [], 0
    r, w = comm.rank, comm.world_size

    def check(what: str, ok: bool, detail: str = "") -> None:
        nonlocal count
        count += 1
        if not ok:
            fails.append(f"{what}{': ' + detail if detail else ''}")

    for bits in (64, 32, 16):
        agg = SecureAggregator(comm, bits=bits)
        if os.environ.get("SECAGG_WORKER_SABOTAGE") and r == 0 and agg.pair_keys:
            j = min(agg.pair_keys)  # rank 0's mask for pair (0, j) with the wrong sign: no longer cancels
            agg.pair_keys[j] = bytes(32)
        n = 4096
        x = values(r, n, bits)
        got = agg.sum(x, tag=("exact", bits))
        everyone = comm.allgather(x)  # the test's own view of every rank's plain values (a test: nothing private)
        want = lift(everyone.sum(0), bits)  # int64 sums wrap modulo 2**64 as the masked path does
        check(f"exact sum bits={bits}", torch.equal(got, want), f"{int((got != want).sum())} of {n} words differ")
        check(f"same result on every rank bits={bits}", bool((comm.allgather(got) == got).all()))
        try:
            agg.sum(x, tag=("exact", bits))
            check(f"a reused tag is refused bits={bits}", False, "no error")
        except ValueError as e:
            check(f"a reused tag is refused bits={bits}", "used before" in str(e), str(e))
        if bits == 64 and w > 1:
            sent = agg.masked(torch.zeros(N, dtype=torch.int64), tag=("uniform", 0))
            ok, stat = chi2_bytes_uniform(sent)
            check("a rank's contribution is uniform (chi2 of its bytes)", ok, f"chi2 {stat:.1f}")
            again = agg.masked(torch.zeros(N, dtype=torch.int64), tag=("uniform", 1))
            check("the same data under another tag is sent differently", not torch.equal(sent, again))
            rows = comm.allgather(sent)
            partial = rows[1:].sum(0)  # every contribution but rank 0's: its masks do not cancel
            ok, stat = chi2_bytes_uniform(partial)
            check("the sum without rank 0 is uniform", ok, f"chi2 {stat:.1f}")
            total = rows.sum(0)
            check("the sum of every rank's zeros is zero", bool((total == 0).all()))
        if bits == 64 and w == 1:
            sent = agg.masked(torch.arange(5, dtype=torch.int64), tag=("one", 0))
            check("one rank: nothing is masked", torch.equal(sent, torch.arange(5, dtype=torch.int64)))
    return fails, count


def main() -> int:
    from fedhypevae.hpc.backend import install_failfast, make_communicator

    torch.set_num_threads(1)
    comm = make_communicator("auto", timeout_s=60)
    install_failfast(comm)
    from collectives_worker import report  # tests/ is the script's directory

    return report(comm, *run_checks(comm), "secagg")


if __name__ == "__main__":
    sys.exit(main())
