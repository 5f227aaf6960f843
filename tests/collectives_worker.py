"""Checks every Communicator collective with exact expected values; run on every rank of a job.

    mpiexec -n 2 python tests/collectives_worker.py            # MPI back-end (auto)
    torchrun --nproc_per_node 2 tests/collectives_worker.py    # torch.distributed, gloo

`run_checks(comm)` issues the same collectives in the same order on every rank whatever the
results, and returns this rank's failures as strings (so a wrong result never leaves a peer waiting
in a collective). As a script it prints one `collectives ok rank R/N backend B checks C` line per
rank, or `FAIL rank R: ...` lines, and exits 1 on every rank if any rank failed. Also usable in
process with a LocalCommunicator (world size 1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def wrap64(x: int) -> int:
    """Python int -> its two's-complement int64 value (the sum modulo 2**64)."""
    return (x + 2**63) % 2**64 - 2**63


def int64_values(rank: int) -> list[int]:
    """This rank's int64 test vector: sums near and across both ends of the int64 range."""
    return [
        I64_MAX if rank == 0 else 5 if rank == 1 else 0,  # 2 ranks: wraps to -(2**63) + 4
        -7 if rank % 2 == 0 else 3 * 10**18,  # negative + positive mix
        I64_MIN,  # 2 ranks: -2**64 wraps to 0
        -(10**18) * (rank + 1),  # all negative, no wrap on small worlds
        rank + 1,  # plain small values
        I64_MIN + rank if rank % 2 else I64_MAX - rank,  # extremes of both signs
    ]


def float_values(rank: int) -> list[float]:
    return [0.5 + rank, -1.25 * (rank + 1), 1e300 if rank == 0 else -1e300, 2.0**-40 * (rank + 3)]


class Checker:
    def __init__(self):
        self.failures: list[str] = []
        self.count = 0

    def eq(self, what: str, got, want) -> None:
        """Exact equality of tensors (dtype and shape included) or of plain values."""
        self.count += 1
        if isinstance(want, torch.Tensor):
            ok = (
                isinstance(got, torch.Tensor)
                and got.dtype == want.dtype
                and got.shape == want.shape
                and torch.equal(got, want)
            )
        else:
            ok = got == want
        if not ok:
            self.failures.append(f"{what}: got {got!r}, want {want!r}")

    def raises(self, what: str, fn, *needles: str) -> None:
        self.count += 1
        try:
            fn()
        except ValueError as exc:
            missing = [n for n in needles if n not in str(exc)]
            if missing:
                self.failures.append(f"{what}: ValueError {exc!s} does not name {missing}")
        except Exception as exc:  # noqa: BLE001 - any other type is a failure to report
            self.failures.append(f"{what}: {type(exc).__name__} {exc!s} instead of ValueError")
        else:
            self.failures.append(f"{what}: no ValueError")


def run_checks(comm) -> tuple[list[str], int]:
    """(failures, number of checks) on this rank; every rank makes the same collective calls."""
    c = Checker()
    n, r = comm.world_size, comm.rank
    i64 = lambda rows: torch.tensor(rows, dtype=torch.int64)  # noqa: E731
    f64 = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    int_sums = i64([wrap64(sum(int64_values(q)[k] for q in range(n))) for k in range(len(int64_values(0)))])
    int_maxes = i64([max(int64_values(q)[k] for q in range(n)) for k in range(len(int64_values(0)))])
    float_sums = f64([sum(float_values(q)[k] for q in range(n)) for k in range(len(float_values(0)))])
    float_maxes = f64([max(float_values(q)[k] for q in range(n)) for k in range(len(float_values(0)))])
    all_int = i64([int64_values(q) for q in range(n)])
    all_float = f64([float_values(q) for q in range(n)])

    # --- allreduce_int64: wrap-around modulo 2**64
    buf = i64(int64_values(r))
    out = comm.allreduce_int64(buf)
    c.eq("allreduce_int64 returns buf", out is buf, True)
    c.eq("allreduce_int64", buf, int_sums)
    if n == 2:  # the cases spelled out
        c.eq("allreduce_int64 (2**63-1)+5", int(buf[0]), -(2**63) + 4)
        c.eq("allreduce_int64 -7+3e18", int(buf[1]), 3 * 10**18 - 7)
        c.eq("allreduce_int64 2*(-2**63)", int(buf[2]), 0)
    # a non-contiguous view: the result must land in the caller's tensor
    grid = torch.zeros(len(int64_values(r)), 3, dtype=torch.int64)
    grid[:, 1] = i64(int64_values(r))
    comm.allreduce_int64(grid[:, 1])
    c.eq("allreduce_int64 non-contiguous", grid[:, 1].contiguous(), int_sums)
    c.eq("allreduce_int64 non-contiguous leaves the rest", grid[:, [0, 2]].abs().sum().item(), 0)
    # 2-D, and an empty tensor
    sq = i64(int64_values(r)).reshape(2, 3)
    comm.allreduce_int64(sq)
    c.eq("allreduce_int64 2-D", sq, int_sums.reshape(2, 3))
    c.eq(
        "allreduce_int64 empty",
        comm.allreduce_int64(torch.zeros(0, dtype=torch.int64)),
        torch.zeros(0, dtype=torch.int64),
    )

    # --- reduce to a root: float64 and int64, sum and max, root 0 and the last rank
    for root in sorted({0, n - 1}):
        for op, fwant, iwant in (("sum", float_sums, int_sums), ("max", float_maxes, int_maxes)):
            fb, ib = f64(float_values(r)), i64(int64_values(r))
            comm.reduce(fb, root=root, op=op)
            comm.reduce(ib, root=root, op=op)
            c.eq(f"reduce float64 {op} root {root}", fb, fwant if r == root else f64(float_values(r)))
            c.eq(f"reduce int64 {op} root {root}", ib, iwant if r == root else i64(int64_values(r)))

    # --- allgather: (world_size, *shape) in rank order; the input is left alone
    fb, ib = f64(float_values(r)), i64(int64_values(r))
    c.eq("allgather float64", comm.allgather(fb), all_float)
    c.eq("allgather int64", comm.allgather(ib), all_int)
    c.eq("allgather leaves buf", ib, i64(int64_values(r)))
    c.eq("allgather 2-D int64", comm.allgather(ib.reshape(3, 2)), all_int.reshape(n, 3, 2))
    c.eq("allgather 0-d float64", comm.allgather(f64(float(r) - 0.5)), f64([q - 0.5 for q in range(n)]))

    # --- gather to root 0 and to the last rank: the stack on root, None elsewhere
    for root in sorted({0, n - 1}):
        got_f = comm.gather(f64(float_values(r)), root=root)
        got_i = comm.gather(i64(int64_values(r)).reshape(2, 3), root=root)
        c.eq(f"gather float64 root {root}", got_f, all_float if r == root else None)
        c.eq(f"gather int64 2-D root {root}", got_i, all_int.reshape(n, 2, 3) if r == root else None)

    # --- broadcast float64 and int64 (int64 extremes: a detour through float64 would round them)
    root = n - 1
    fb, ib = f64(float_values(r)), i64(int64_values(r))
    comm.broadcast(fb, root=root)
    comm.broadcast(ib, root=root)
    c.eq("broadcast float64", fb, f64(float_values(root)))
    c.eq("broadcast int64", ib, i64(int64_values(root)))

    # --- the existing float64 allreduce is unchanged
    fb = f64(float_values(r))
    comm.allreduce(fb, op="sum")
    c.eq("allreduce float64 sum", fb, float_sums)
    fb = f64(float_values(r))
    comm.allreduce(fb, op="max")
    c.eq("allreduce float64 max", fb, float_maxes)

    # --- argument errors: raised before any communication, on every rank
    c.raises("allreduce_int64 float64", lambda: comm.allreduce_int64(f64([1.0])), "buf", "torch.int64", "torch.float64")
    c.raises(
        "allreduce_int64 int32", lambda: comm.allreduce_int64(torch.ones(2, dtype=torch.int32)), "buf", "torch.int32"
    )
    c.raises("reduce op", lambda: comm.reduce(f64([1.0]), op="min"), "op", "'min'")
    c.raises("reduce dtype", lambda: comm.reduce(torch.ones(2, dtype=torch.float32)), "buf", "torch.float32")
    c.raises("reduce root", lambda: comm.reduce(f64([1.0]), root=n), "root", str(n))
    c.raises("allgather dtype", lambda: comm.allgather(torch.ones(2, dtype=torch.float32)), "buf", "torch.float32")
    c.raises("gather root", lambda: comm.gather(f64([1.0]), root=-1), "root", "-1")
    c.raises("gather not a tensor", lambda: comm.gather([1.0, 2.0]), "buf", "list")
    return c.failures, c.count


def main() -> int:
    from fedhypevae.hpc.backend import install_failfast, make_communicator

    torch.set_num_threads(1)
    comm = make_communicator("auto", timeout_s=60)
    install_failfast(comm)  # an unexpected exception on one rank ends them all
    if os.environ.get("COLLECTIVES_WORKER_SABOTAGE"):  # the test that these checks can fail:
        # a naive int64 sum through float64, as a back-end without an exact integer path would do
        def lossy(buf):
            buf.copy_(comm.allreduce(buf.to(torch.float64)).to(torch.int64))
            return buf

        comm.allreduce_int64 = lossy
    return report(comm, *run_checks(comm), "collectives")


def report(comm, failures: list, count: int, label: str) -> int:
    """Every rank prints its failures ("FAIL rank R: ..."), or, when no rank failed, "LABEL ok rank R/N backend B
    checks K"; closes the communicator and returns the exit status (0 only when no rank failed)."""
    say = lambda line: (sys.stdout.write(line + "\n"), sys.stdout.flush())  # noqa: E731 - one write per line
    for f in failures:
        say(f"FAIL rank {comm.rank}: {f}")
    total = comm.allreduce(torch.tensor([float(len(failures))], dtype=torch.float64))
    if total.item() == 0:
        say(f"{label} ok rank {comm.rank}/{comm.world_size} backend {comm.backend} checks {count}")
    comm.barrier()
    comm.close()
    return 0 if total.item() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
