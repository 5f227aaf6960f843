"""The cost of secure aggregation per step, against the plain floating-point all-reduce it replaces.

    mpiexec -n R python -m benchmarks.secagg [--dims 17728] [--reps 50] [--json OUT.json]
    python -m benchmarks.secagg --plans tiny,default,paper     # sigma and epsilon: integer path against Gaussian

On every rank of a real job: (a) the simulated path's collective, one float64 all-reduce of the step's buffer;
(b) the secure path's whole reduce: encode (round to the grid), this rank's Skellam share (2 d Poisson draws),
the pairwise ChaCha20 masks (R - 1 keystreams of d words), the int64 all-reduce, decode. Medians over --reps
repetitions of the slowest rank, per step. Both are per rank and independent of the number of clients it hosts (a
rank draws one share for all of them), so the figures hold at 1,000 and at 100,000 clients; a round is 5 steps in
the scale setting. Also the key agreement at start-up. Nothing is asserted.

With --plans (no launcher needed): per config, with privacy.trust_model distributed, the Gaussian plan's DP-SGD
sigma, the epsilon the integer path's mechanisms spend at those sigmas, and the integer path's own sigma for the
target (a markdown table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _slowest(comm, fn, reps: int) -> float:
    """Median over `reps` of the slowest rank's time of fn(), in ms."""
    times = []
    for _ in range(reps):
        comm.barrier()
        t0 = time.perf_counter()
        fn()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        times.append(comm.allreduce(dt, op="max").item())
    return 1e3 * statistics.median(times)


def measure(comm, agg, d: int, reps: int) -> dict:
    from fedhypevae.privacy.integer import make_encoding, skellam

    enc = make_encoding(sensitivity=1e-6, dim=d, bits=64)
    g = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(d, dtype=torch.float64, generator=g) * 1e-3
    var = (1.5 * enc.l2) ** 2 / comm.world_size  # sigma 1.5: this rank's part of the unknown variance
    k = iter(range(10**9))

    def secure():
        z = enc.encode(x) + skellam(var, d, g)
        enc.decode(agg.sum(z, tag=("bench", d, next(k))))

    return {
        "dim": d,
        "plain_allreduce_ms": _slowest(comm, lambda: comm.allreduce(x.clone()), reps),
        "secure_reduce_ms": _slowest(comm, secure, reps),
        "encode_ms": _slowest(comm, lambda: enc.encode(x), reps),
        "skellam_ms": _slowest(comm, lambda: skellam(var, d, g), reps),
        "masks_ms": _slowest(comm, lambda: agg.mask(d, ("m", d, next(k))), reps),
    }


def plans(names: list) -> str:
    from fedhypevae.config import load_config
    from fedhypevae.plan import _check_data, _integer
    from fedhypevae.privacy.accounting import Mechanism, epsilon_of
    from fedhypevae.trainer import make_plan

    lines = [
        "| config | Phi size d | q | steps | target epsilon | Gaussian sigma | epsilon of the integer mechanism at "
        "that sigma | integer sigma for the target | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        cfg = load_config(name, ["privacy.trust_model=distributed", "privacy.secure_aggregation=true"])
        use_mmd = cfg.model.lambda_mmd > 0 and cfg.model.mmd_kind == "merf"
        integer = _integer(cfg, _check_data(cfg))
        g = make_plan(cfg, use_mmd=use_mmd)
        i = make_plan(cfg, use_mmd=use_mmd, integer=integer)
        p = cfg.privacy
        at_g = [
            Mechanism(m.name, m.noise_multiplier, m.sample_rate, m.steps, integer.get(m.name, ())) for m in g.mechanisms
        ]
        eps = epsilon_of(at_g, delta=p.accounting_delta, accountant=p.accountant)
        lines.append(
            f"| {name} | {int(integer['dp-sgd'][1]):,} | {p.sample_rate:g} | {g.steps:,} | {p.target_epsilon:g} | "
            f"{g.sigma:.4f} | {eps:.4f} | {i.sigma:.4f} | {i.sigma / g.sigma:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    from fedhypevae.hpc.backend import make_communicator
    from fedhypevae.hpc.secagg import SecureAggregator

    ap = argparse.ArgumentParser(prog="python -m benchmarks.secagg", description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="17728", help="buffer sizes d, comma-separated (17,728: Phi, scale setting)")
    ap.add_argument("--reps", type=int, default=50, help="repetitions per measurement (median)")
    ap.add_argument("--json", default=None, help="write the figures here (rank 0)")
    ap.add_argument("--plans", default=None, help="configs (comma-separated): compare the plans, no timing")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.plans:
        print(plans(args.plans.split(",")))
        return 0
    torch.set_num_threads(1)
    comm = make_communicator("auto", timeout_s=120)
    t = time.perf_counter()
    agg = SecureAggregator(comm, bits=64)
    agree = comm.allreduce(torch.tensor([time.perf_counter() - t], dtype=torch.float64), op="max").item()
    rows = [measure(comm, agg, int(d), args.reps) for d in args.dims.split(",")]
    res = {"ranks": comm.world_size, "backend": comm.backend, "key_agreement_s": agree, "reps": args.reps, "rows": rows}
    if comm.rank == 0:
        print(json.dumps(res, indent=2))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=2)
    comm.barrier()
    comm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
