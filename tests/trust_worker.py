"""Runs the trainer's real DP steps under each trust model on every rank of a job and records, per step, what the
noise checks of tests/test_trust_models.py and the central payload check of tests/test_payloads.py need.

    python tests/trust_worker.py OUT SCENARIO [SCENARIO ...]                 # one process (local back-end)
    mpiexec -n 3 python tests/trust_worker.py OUT SCENARIO [SCENARIO ...]    # MPI back-end
    python tests/trust_worker.py --report OUT          # the measured noise variances against the claims
    python tests/trust_worker.py --sensitivity OUT     # the sensitivity check per trust model (a table)

A scenario is NAME=TRUST[,key=value...]: TRUST is local, distributed or central; keys: party, collusion,
weights (declared|uniform), secure (1: privacy.secure_aggregation),
sabotage (skip-share: client 0 adds no Phi noise, its own block; no-draw: the central
aggregator adds nothing; allreduce: central's sums by an all-reduce instead of a gather; nomask: secure aggregation
without its masks), payload (1: run the whole
pipeline, statistics included, recording every collective).

Each rank writes OUT/NAME/rank_R.pt: the public facts (placement, declared sizes, weights, sigma, C), and per
DP-SGD step (the steps of the run, each its own noise draw from privacy.noise_seed): `unnoised`, this rank's
pre-noise contribution to the step's buffer (recorded by a step class that notes the block's pre-noise Phi sum at
the noise stage, then noises as the trainer asks); `sent`, the rank's buffer handed to the trust model's reduce;
`applied`, what the reduce returned (what the replica applies). With payload=1, `calls`: every collective of the
rank as (name, its other arguments, buffer handed in, buffer received back). Nothing is checked here: the tests read
the files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedhypevae.hpc.backend import install_failfast, make_communicator  # noqa: E402
from fedhypevae.hpc.launcher import detect_launcher  # noqa: E402

from fedhypevae.config import load_config  # noqa: E402
from fedhypevae.dp_step import DPStep, noise_blocks  # noqa: E402

# 7 clients (uneven blocks on 2 and 3 ranks), 30 steps each its own draw, no MMD term (no post-noise Phi terms)
BASE = [
    "partition.clients=7",
    "partition.min_client_size=10",
    "privacy.noise_seed=11",
    "privacy.target_epsilon=.inf",
    "privacy.noise_multiplier=1.3",
    "model.lambda_mmd=0",
    "privacy.diagnostics=false",
    "train.rounds=15",
    "train.local_steps=2",
    "train.checkpoint_every=0",
    "threads=1",
]
NOTES: list = []  # per step: this rank's pre-noise contributions (one per block)


class RecordingStep(DPStep):
    """The step, noting each block's pre-noise contribution to the step's buffer before the noise stage."""

    def add_noise(self, sums, *, sigma, gens):
        NOTES[-1].append(sums.phi.clone() / self.phi_divisor)
        return super().add_noise(sums, sigma=sigma, gens=gens)


class SkipShareStep(RecordingStep):
    """SABOTAGE: this client adds no noise to its Phi part (its share), while the ledger charges the plan."""

    def add_noise(self, sums, *, sigma, gens):
        blocks = dict(noise_blocks(sigma))
        blocks["phi"] = 0.0
        return super().add_noise(sums, sigma=blocks, gens=gens)


def scenario(spec: str) -> tuple[str, str, dict]:
    name, rest = spec.split("=", 1)
    trust, *kv = rest.split(",")
    return name, trust, dict(item.split("=", 1) for item in kv)


def recording(comm, calls: list):
    """Wrap the communicator's collectives on this instance: every call recorded as (name, in, out)."""

    def wrap(name):
        inner = getattr(comm, name)

        def call(buf, *args, **kw):
            before = buf.detach().clone()
            out = inner(buf, *args, **kw)
            calls.append(
                (name, tuple(args) + tuple(sorted(kw.items())), before, None if out is None else out.detach().clone())
            )
            return out

        return call

    for name in ("allreduce", "allreduce_int64", "reduce", "allgather", "gather", "broadcast"):
        setattr(comm, name, wrap(name))


def run(comm, out: Path, spec: str) -> None:
    from fedhypevae.audit import SabotagedAggregator
    from fedhypevae.run import run_training
    from fedhypevae.trainer import Trainer

    name, trust, opts = scenario(spec)
    overrides = BASE + [f"privacy.trust_model={trust}", f"federation.weights={opts.get('weights', 'declared')}"]
    if "party" in opts:
        overrides.append(f"privacy.party={opts['party']}")
    if "collusion" in opts:
        overrides.append(f"privacy.collusion={opts['collusion']}")
    if opts.get("secure") == "1":  # secure aggregation: the integer path (rounded sums, Skellam shares, masks)
        overrides.append("privacy.secure_aggregation=true")
    cfg = load_config("tiny", overrides)
    sabotage = opts.get("sabotage")

    def step_type(cid: int):
        return SkipShareStep if sabotage == "skip-share" and cid == 0 else RecordingStep

    NOTES.clear()
    calls: list = []
    sent, applied = [], []
    tr = Trainer(cfg, out / name / "run", comm, progress=False, step_type=step_type)
    tr.hooks.on("step_begin", lambda r, s: NOTES.append([]))
    orig = tr.setup

    def setup():
        orig()
        if sabotage == "no-draw":  # the aggregator adds nothing; the ledger still charges the plan
            sab = SabotagedAggregator(noise_seed=cfg.privacy.noise_seed, backend=comm.backend)
            sab.factor = 0.0
            tr.trust = sab.bind(tr.trust.fed, world_size=comm.world_size)
        if sabotage == "nomask":  # secure aggregation without its masks: every rank sends its plain integers
            tr.trust.secagg.pair_keys = {}
        if sabotage == "allreduce":  # central's sums by an all-reduce: every rank receives the un-noised sum
            tr.trust._gather_sum = lambda tr_, buf: (lambda tot: tot if tr_.comm.is_root else None)(
                tr_.allreduce(buf.clone())
            )
        rule = tr.aggregation
        reduce = rule.reduce_step

        def observed(buf):
            sent.append(buf[: rule.step_width].clone())
            res = reduce(buf)
            applied.append(res[: rule.step_width].clone())
            return res

        rule.reduce_step = observed
        if opts.get("payload") == "1":
            recording(comm, calls)

    tr.setup = setup
    if opts.get("payload") == "1":
        import fedhypevae.run as run_mod

        made = run_mod.Trainer
        run_mod.Trainer = lambda *a, **k: tr  # the pipeline runs this trainer (its setup records from here on)
        try:
            run_training(cfg, out / name / "run", comm, progress=False)
        finally:
            run_mod.Trainer = made
    else:
        tr.setup()
        tr.train()
        tr.ledger.close()
        tr.writer.close()
    unnoised = [torch.stack(n).sum(0) for n in NOTES[: len(sent)]]
    torch.save(
        {
            "spec": spec,
            "rank": comm.rank,
            "world_size": comm.world_size,
            "backend": comm.backend,
            "placement": tr.placement,
            "declared": list(tr.declared),
            "weights": cfg.federation.weights,
            "sample_rate": cfg.privacy.sample_rate,
            "sigma": tr.sigma,
            "clip": cfg.privacy.clip_norm,
            "collusion": cfg.privacy.collusion,
            "party": cfg.privacy.party,
            "noise_seed": cfg.privacy.noise_seed,
            "charged": sorted({m.noise_multiplier for _, h in tr.ledger.histories() for m in h if m.name == "dp-sgd"}),
            # the integer path: its noise and sensitivity are the Gaussian's times (Delta2 / A) (rounding's part)
            "secure_scale": (tr.trust.enc.l2 / tr.trust.enc.A) ** 2 if cfg.privacy.secure_aggregation else 1.0,
            "unnoised": torch.stack(unnoised),
            "sent": torch.stack(sent),
            "applied": torch.stack(applied),
            "calls": calls,
        },
        out / name / f"rank_{comm.rank}.pt",
    )
    comm.barrier()


def report(out: Path) -> None:
    """Print, per scenario recorded in OUT, the measured variance of the aggregate's noise against its claim and
    what tests/test_trust_models.py's checker finds (the numbers in docs/PRIVACY.md)."""
    from helpers import trust_ranks
    from test_trust_models import _trust, claimed, noise_problems

    print("| scenario | ranks | clients per rank | noise variance measured / claimed | checker |")
    print("|---|---|---|---|---|")
    for d in sorted(p for p in out.iterdir() if (p / "rank_0.pt").is_file()):
        recs = trust_ranks(out, d.name)
        noise = recs[0]["applied"] - sum(r["unnoised"] for r in recs)
        ratio = float(noise.pow(2).mean()) / claimed(recs[0], _trust(d.name))["total"]
        problems = noise_problems(recs, _trust(d.name))
        print(
            f"| {d.name} | {len(recs)} | {[len(p) for p in recs[0]['placement']]} | {ratio:.4f} | "
            + ("ok" if not problems else "CAUGHT: " + "; ".join(problems))
            + " |"
        )


def sensitivity(out: Path) -> None:
    """Print the sensitivity check (fedhypevae.privacy.sensitivity.check_sensitivity) per trust model and mode,
    with the negative controls, from the tiny config trained one round (docs/PRIVACY.md 9.1)."""
    import copy

    from fedhypevae.privacy.sensitivity import BatchNormInputs, Unclipped, check_sensitivity
    from fedhypevae.run import run_training
    from fedhypevae.trainer import Trainer

    print(
        "| trust model | mode | control | max payload diff (C) | max buffer / bound | others moved "
        "| replay drift | ok |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for trust in ("local", "distributed", "central"):
        for mode in ("strict", "paper"):
            cfg = load_config(
                "tiny",
                [
                    "train.rounds=1",
                    "privacy.noise_seed=3",
                    "partition.clients=5",
                    f"privacy.trust_model={trust}",
                    f"privacy.mode={mode}",
                    "threads=1",
                ],
            )
            run = out / f"sens-{trust}-{mode}"
            run_training(cfg, run, progress=False)
            for control in (None, Unclipped, BatchNormInputs) if mode == "strict" else (None,):
                tr = Trainer(copy.deepcopy(cfg), run, resume=True, progress=False)
                tr.setup()
                c = tr.clients[0]
                # a record at the edge of the declared range
                c.set_data(torch.cat([c.x, torch.ones(1, c.x.shape[1])]), torch.cat([c.y, torch.tensor([3])]))
                rep = check_sensitivity(tr, c.id, remove=[len(c.y) - 1, 0, 7, 42], steps=8, seed=1, control=control)
                print(
                    f"| {trust} | {mode} | {control.__name__ if control else '-'} | {rep.max_payload_diff:.4f} | "
                    f"{rep.max_buffer_ratio:.4f} | {rep.others_moved:g} | {rep.replay_drift:.3g} | {rep.ok} |"
                )
                tr.ledger.close()
                tr.writer.close()


def main(argv: list[str]) -> int:
    if argv[0] in ("--report", "--sensitivity"):
        (report if argv[0] == "--report" else sensitivity)(Path(argv[1]))
        return 0
    out = Path(argv[0])
    info = detect_launcher()
    comm = make_communicator("auto", info, device=torch.device("cpu"))
    install_failfast(comm)
    torch.set_num_threads(1)
    for spec in argv[1:]:
        (out / scenario(spec)[0]).mkdir(parents=True, exist_ok=True)
        run(comm, out, spec)
    if comm.is_root:
        print(f"trust worker ok: {len(argv) - 1} scenario(s) on {comm.world_size} rank(s)", flush=True)
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
