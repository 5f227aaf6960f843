"""Throughput of the DP step: the batched engine against the same engine without DP, an Opacus client
loop, peer frameworks, many clients per rank, several MPI ranks, and the sigma calibration.

    python -m benchmarks.throughput --out runs/bench-throughput             # full: ~10 min on 2 shared cores
    python -m benchmarks.throughput --out /tmp/t --quick                    # < 2 min
    python -m benchmarks.throughput --out /tmp/t --device cuda              # GPU node (UNTESTED: no GPU here)

Parts (each measured side by side in ONE run; the machine may be shared, so read ratios, not absolutes):
 1. engine   FedHypeVAE's trainer with train.engine=batched, DP (strict) and the same engine with
             privacy.enabled=false (the non-DP reference), rounds interleaved, for d_x in --dims.
             10 clients x 1000 records, Poisson rate q=0.256 (expected batch 256 per client), Adam,
             one local step per round. Model sized like the DP-CVAE below: encoder d_x+K -> 256 -> 256
             -> 256 -> 2x100, mirrored decoder. Per step: median time, samples/s and the breakdown
             (engine phases; the trainer's ledger and budget guard, all-reduce, Phi update).
             The step time excludes the once-per-round epsilon accounting (reported apart).
 2. opacus   The DP-CVAE of Di Salvo et al. (fedhypevae/baselines/dpcvae.py CVAE) in a plain per-client
             loop: one opacus GradSampleModule (hooks) + DPOptimizer(Adam) per client, Poisson batches
             of expected size 256, decoders averaged after every round; and the same loop without DP.
 3. peers    pfl-research and Flower DP-FedAvg simulations on the same MLP and data, when importable
             (by this interpreter or --peers-python); otherwise "not installed" / the error.
 4. clients  Clients per rank from 10 to 1000 at a fixed total of 10,000 records, d_x = 64, the default
             config's model and local_steps (5): round time, and the per-client overhead
             (round(1000) - round(10)) / 990 with the share that is noise generation.
 5. ranks    The engine config of part 1 at d_x = 768 under `mpiexec -n R` (the venv's MPICH), R in --ranks.
 6. sigma    Calibrating sigma for 50,000 steps (privacy.plan_budget), RDP and PRV.

Writes OUT/throughput.{json,csv,md,png}; prints progress to stderr and the Markdown to stdout.
--device cuda puts every process on cuda:LOCAL_RANK (hpc/device.py); it is untested (the development
machine has no GPU), coins and noise are still drawn on the CPU from the clients' generators.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from fedhypevae.hpc.launcher import venv_tool

from fedhypevae.checkpoint import dumps_json

REPO = Path(__file__).resolve().parents[1]
K = 10  # classes
MATCHED = ["model.hidden=[256,256,256]", "model.latent_dim=100"]  # the DP-CVAE's widths
DEFAULT_MODEL = []  # configs/default.yaml's model section is applied by loading that file
PHASE_KEYS = (
    "sample",
    "forward",
    "backward",
    "norms",
    "clip",
    "noise",
    "post",
    "optimizer",
    "ledger",
    "guard",
    "all_reduce",
    "phi_update",
    "other",
)


def log(msg: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ data/config
def _write_data(path: Path, d: int, n: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    means = rng.normal(size=(K, d)).astype(np.float32)
    x = (means[y] + rng.normal(size=(n, d)).astype(np.float32)).astype(np.float32)
    np.savez(path, x=x, y=y)


def make_data(path: Path, d: int, train_total: int, clients: int, seed: int = 0) -> Path:
    """Gaussian class clusters in R^d (an .npz), sized so that the clients' TRAINING splits (after the
    per-client 80/20 split of an iid partition) hold train_total records in all (to about 0.5 %)."""
    from fedhypevae.data import build_federation

    n = int(math.ceil(train_total / 0.8))
    for _ in range(4):
        _write_data(path, d, n, seed)
        cfg = make_config(path, clients=clients, enabled=False, rounds=1, local_steps=1, model=[])
        got = sum(len(c.y_train) for c in build_federation(cfg.data, cfg.partition, cfg.seed).clients)
        if abs(got - train_total) <= 0.005 * train_total:
            break
        n = max(2 * clients, int(round(n * train_total / got)))
    return path


def make_config(
    data: Path,
    *,
    clients: int,
    enabled: bool,
    rounds: int,
    local_steps: int,
    model: list,
    base: str | None = None,
    q: float = 0.256,
    extra: list | None = None,
):
    from fedhypevae.config import load_config

    # stats_clip_norm: a run must say how the statistics release would clip (checked before training),
    # although the benchmark times training steps only
    return load_config(
        base,
        [
            f"data.path={data}",
            "data.transform=none",
            "privacy.stats_clip_norm=1.0",
            "data.test_fraction=0.2",
            "partition.kind=iid",
            f"partition.clients={clients}",
            "partition.min_client_size=2",
            "model.lambda_mmd=0",
            *model,
            f"train.rounds={rounds}",
            f"train.local_steps={local_steps}",
            "train.checkpoint_every=0",
            "train.keep_checkpoints=1",
            f"privacy.sample_rate={q}",
            f"privacy.enabled={'true' if enabled else 'false'}",
            "privacy.target_epsilon=8",
            "privacy.mode=strict",
            *(extra or []),
        ],
    )


class Timers:
    """Exclusive wall time per phase, fed by the trainer's phase timers (Trainer.hooks.add_timer): the
    trainer times its own phases (guard, ledger, all_reduce, phi_update, engine, accounting), and a phase
    timed inside another is not counted in the outer one."""

    def __init__(self):
        self.t: dict = {}

    def __call__(self, name: str, seconds: float) -> None:
        self.t[name] = self.t.get(name, 0.0) + seconds

    def snapshot(self) -> dict:
        return dict(self.t)


def instrument(tr) -> Timers:
    """Register a Timers on the trainer's hooks (the DP steps then record their own phases too)."""
    tm = Timers()
    tr.hooks.add_timer(tm)
    return tm


def build_trainer(cfg, out: Path, device: str, comm=None):
    from fedhypevae.trainer import Trainer

    tr = Trainer(cfg, out, comm, progress=False, device=device)
    tr.setup()
    return tr, instrument(tr)


def step_timings(tr) -> dict:
    """The DP steps' own phase timings (sample, forward, backward, norms, clip, noise, post, optimizer), summed
    over the rank's blocks."""
    out: dict = {}
    for st in tr.steps:
        for k, v in st.timings.items():
            out[k] = out.get(k, 0.0) + v
    return out


def timed_round(tr, tm: Timers, r: int) -> dict:
    """One round; its wall time, the time outside epsilon accounting, samples, and the breakdown."""
    before, eng_before = tm.snapshot(), step_timings(tr)
    t0 = time.perf_counter()
    metrics = tr.run_round(r)
    wall = time.perf_counter() - t0
    after = tm.snapshot()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    parts = {k: 0.0 for k in PHASE_KEYS}
    for k, v in step_timings(tr).items():
        parts[k] = v - eng_before.get(k, 0.0)
    for k in ("ledger", "guard", "all_reduce", "phi_update"):
        parts[k] = delta.get(k, 0.0)
    steps_time = wall - delta.get("accounting", 0.0)
    engine_other = delta.get("engine", 0.0) - sum(
        parts[k] for k in ("sample", "forward", "backward", "norms", "clip", "noise", "post", "optimizer")
    )
    parts["other"] = max(0.0, steps_time - sum(v for k, v in parts.items() if k != "other"))
    batch = metrics.get("diagnostics/batch_size", float("nan")) * tr.fed.num_clients
    return {
        "wall_s": wall,
        "steps_s": steps_time,
        "accounting_s": delta.get("accounting", 0.0),
        "samples": batch,
        "engine_unattributed_s": engine_other,
        "parts": parts,
    }


def summarize(rows: list, local_steps: int) -> dict:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    step = med([r["steps_s"] for r in rows]) / local_steps
    samples = sum(r["samples"] for r in rows) / len(rows) / local_steps
    return {
        "rounds": len(rows),
        "step_s": step,
        "step_s_all": [r["steps_s"] / local_steps for r in rows],
        "round_s": med([r["wall_s"] for r in rows]),
        "accounting_s": med([r["accounting_s"] for r in rows]),
        "samples_per_step": samples,
        "samples_per_s": samples / step,
        "breakdown_s": {k: med([r["parts"][k] for r in rows]) / local_steps for k in PHASE_KEYS},
    }


# ------------------------------------------------------------------------------------------ part 1
def part_engine(
    d: int, *, reps: int, warmup: int, clients: int, per_client: int, model: list, device: str, tmp: Path
) -> dict:
    data = make_data(tmp / f"engine_{d}.npz", d, clients * per_client, clients)
    rounds = reps + warmup
    trs = {}
    for name, enabled in (("dp", True), ("nonprivate", False)):
        cfg = make_config(data, clients=clients, enabled=enabled, rounds=rounds, local_steps=1, model=model)
        trs[name] = build_trainer(cfg, tmp / f"engine_{d}_{name}", device)
    rows = {k: [] for k in trs}
    for r in range(rounds):  # interleaved, so that both see the same machine
        for name, (tr, tm) in trs.items():
            row = timed_round(tr, tm, r)
            if r >= warmup:
                rows[name].append(row)
    res = {
        "d_x": d,
        "clients": clients,
        "per_client": per_client,
        "sigma": trs["dp"][0].sigma,
        "phi_params": trs["dp"][0].phi_numel,
        "encoder_params": sum(p.numel() for p in trs["dp"][0].clients[0].encoder.parameters()),
    }
    for name in trs:
        res[name] = summarize(rows[name], 1)
    res["dp_over_nonprivate"] = res["dp"]["step_s"] / res["nonprivate"]["step_s"]
    return res


# ------------------------------------------------------------------------------------------ part 2
def part_opacus(d: int, *, rounds: int, clients: int, per_client: int, sigma: float, device: str, dp: bool) -> dict:
    """Per-client loop: every client one Poisson step of expected size 256 per round, decoders FedAvg'd."""
    import warnings

    import torch

    from fedhypevae.baselines.dpcvae import CVAE, decoder_names

    warnings.filterwarnings("ignore")
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    q = min(1.0, 256 / per_client)
    models, opts, data, plain = [], [], [], []  # plain: the CVAEs themselves (opacus wraps them, same parameters)
    for i in range(clients):
        torch.manual_seed(i)
        m = CVAE(d, K).to(dev)
        plain.append(m)
        x = torch.randn(per_client, d, generator=g).to(dev)
        y = torch.randint(0, K, (per_client,), generator=g).to(dev)
        if dp:
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            m = GradSampleModule(m, batch_first=True, loss_reduction="sum")
            opt = DPOptimizer(
                torch.optim.Adam(m.parameters(), lr=1e-3),
                noise_multiplier=sigma,
                max_grad_norm=1.0,
                expected_batch_size=256,
                loss_reduction="sum",
            )
        else:
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        models.append(m)
        opts.append(opt)
        data.append((x, y))
    dec = decoder_names(CVAE(d, K))

    def client_step(i):
        x, y = data[i]
        idx = torch.nonzero(torch.rand(per_client, generator=g) < q).flatten().to(dev)
        eps = torch.randn(len(idx), 100, generator=g).to(dev)
        loss, _ = models[i](x[idx], y[idx], eps)
        loss.sum().backward()
        opts[i].step()
        opts[i].zero_grad(set_to_none=True)
        return len(idx)

    client_step(0)  # warm-up (hooks, allocator)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    samples, t0, per_round = 0, time.perf_counter(), []
    for _ in range(rounds):
        tr = time.perf_counter()
        for i in range(clients):
            samples += client_step(i)
        with torch.no_grad():  # FedAvg of the decoders (equal weights)
            params = [dict(m.named_parameters()) for m in plain]
            avg = {n: sum(p[n] for p in params) / clients for n in dec}
            for p in params:
                for n in dec:
                    p[n].copy_(avg[n])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        per_round.append(time.perf_counter() - tr)
    wall = time.perf_counter() - t0
    return {
        "d_x": d,
        "dp": dp,
        "clients": clients,
        "rounds": rounds,
        "samples": samples,
        "wall_s": wall,
        "samples_per_s": samples / wall,
        "round_s": statistics.median(per_round),
        "step_s": wall / (rounds * clients),
    }


# ------------------------------------------------------------------------------------------ part 4
def part_clients(m: int, *, total: int, reps: int, warmup: int, device: str, tmp: Path) -> dict:
    data = make_data(tmp / f"clients_{m}.npz", 64, total, m)
    from fedhypevae.config import load_config

    steps = load_config("default").train.local_steps
    cfg = make_config(
        data,
        clients=m,
        enabled=True,
        rounds=reps + warmup,
        local_steps=steps,
        model=[],
        base="default",
        extra=["model.lambda_mmd=0"],
    )
    tr, tm = build_trainer(cfg, tmp / f"clients_{m}", device)
    rows = []
    for r in range(reps + warmup):
        row = timed_round(tr, tm, r)
        if r >= warmup:
            rows.append(row)
    med = lambda k: statistics.median([r[k] for r in rows])  # noqa: E731
    return {
        "clients": m,
        "d_x": 64,
        "local_steps": steps,
        "records": sum(len(c.y) for c in tr.clients),
        "round_s": med("wall_s"),
        "steps_s": med("steps_s"),
        "accounting_s": med("accounting_s"),
        "samples_per_round": statistics.mean(r["samples"] for r in rows),
        "breakdown_s": {k: statistics.median([r["parts"][k] for r in rows]) for k in PHASE_KEYS},
        "phi_params": tr.phi_numel,
        "rounds": len(rows),
    }


# ------------------------------------------------------------------------------------------ part 5
def worker(spec_path: str) -> int:
    """One rank of an MPI job: the engine config on this rank's clients; rank 0 writes the result."""
    import torch
    from fedhypevae.hpc.launch import Launch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    # the one launch bootstrap: device per local rank, communicator, fail-fast; it closes the back-end
    with Launch(backend="mpi", device=spec["device"], timeout_s=600, prog="benchmarks.throughput") as ranks:
        comm, device = ranks.comm, str(ranks.device)
        cfg = make_config(
            Path(spec["data"]),
            clients=spec["clients"],
            enabled=True,
            rounds=spec["reps"] + spec["warmup"],
            local_steps=1,
            model=spec["model"],
        )
        tr, tm = build_trainer(cfg, Path(spec["out"]), device, comm)
        rows = []
        for r in range(spec["reps"] + spec["warmup"]):
            comm.barrier()
            row = timed_round(tr, tm, r)
            if r >= spec["warmup"]:
                rows.append(row)
        if comm.is_root:
            s = summarize(rows, 1)
            s.update(
                {
                    "ranks": comm.world_size,
                    "threads_per_rank": spec["threads"],
                    "device": device,
                    "clients_on_rank0": len(tr.clients),
                }
            )
            Path(spec["result"]).write_text(json.dumps(s) + "\n")
        comm.barrier()
    return 0


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def part_ranks(
    ranks: int,
    *,
    reps: int,
    warmup: int,
    clients: int,
    per_client: int,
    d: int,
    model: list,
    device: str,
    tmp: Path,
    threads: int | None = None,
) -> dict:
    data = tmp / f"ranks_{d}.npz"
    if not data.exists():
        make_data(data, d, clients * per_client, clients)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(threads or cores, cores // ranks))
    spec = {
        "data": str(data),
        "clients": clients,
        "reps": reps,
        "warmup": warmup,
        "model": model,
        "threads": threads,
        "device": device,
        "out": str(tmp / f"ranks_{ranks}"),
        "result": str(tmp / f"ranks_{ranks}.json"),
    }
    spec_path = tmp / f"ranks_{ranks}_spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [
        venv_tool("mpiexec") or "mpiexec",
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        "benchmarks.throughput",
        "--worker",
        str(spec_path),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(threads), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    res = json.loads(Path(spec["result"]).read_text())
    res.update(
        {
            "command": " ".join(cmd).replace(str(REPO) + "/", "").replace(str(tmp), "TMP"),
            "launch_wall_s": time.perf_counter() - t0,
            "d_x": d,
            "clients": clients,
        }
    )
    return res


# ------------------------------------------------------------------------------------------ part 6
def part_sigma(steps: int, accountants: list, q: float) -> dict:
    from fedhypevae.privacy import plan_budget

    out = {"steps": steps, "sample_rate": q, "target_epsilon": 1.0, "delta": 1e-5, "with_stats_release": True}
    for acc in accountants:
        t0 = time.perf_counter()
        plan = plan_budget(
            target_epsilon=1.0,
            delta=1e-5,
            sample_rate=q,
            steps=steps,
            accountant=acc,
            stats_fraction=0.1,
            mmd_fraction=0.0,
            use_stats=True,
            use_mmd=False,
        )
        out[acc] = {"seconds": time.perf_counter() - t0, "sigma": plan.sigma, "epsilon": plan.planned_epsilon}
    return out


# ------------------------------------------------------------------------------------------ part 3: peers
def peer_worker(name: str, spec_path: str) -> int:
    """Runs ONE peer framework's DP-FedAvg simulation (in a subprocess, maybe another interpreter)."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        res = {"pfl": run_pfl, "flower": run_flower}[name](spec)
    except Exception as exc:  # reported, never fatal
        res = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    Path(spec["result"]).write_text(json.dumps(res, default=str) + "\n")
    return 0


def _peer_data(spec):
    import torch

    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(spec["per_client"], spec["d"], generator=g),
            torch.randint(0, K, (spec["per_client"],), generator=g),
        )
        for _ in range(spec["clients"])
    ]


def run_pfl(spec: dict) -> dict:
    """pfl-research: FederatedAveraging with central DP (user-level clipping + Gaussian noise) on the DP-CVAE."""
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism

    from fedhypevae.baselines.dpcvae import CVAE

    class Net(CVAE):
        def loss(self, x, y, eval=False):  # noqa: A002 - pfl's signature
            eps = torch.randn(len(x), 100)
            return self(x, y, eps)[0].mean()

        def metrics(self, x, y, eval=False):  # noqa: A002
            from pfl.metrics import Weighted

            with torch.no_grad():
                loss = self(x, y, torch.randn(len(x), 100))[0]
            return {"loss": Weighted(float(loss.sum()), len(x))}

    data = _peer_data(spec)
    users = {str(i): (x, y) for i, (x, y) in enumerate(data)}
    sampler = get_user_sampler("minimize_reuse", list(users))
    fed = FederatedDataset(lambda uid: Dataset(raw_data=list(users[uid]), user_id=uid), sampler)
    net = Net(spec["d"], K)
    model = PyTorchModel(
        net, local_optimizer_create=torch.optim.Adam, central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0)
    )
    mech = CentrallyAppliedPrivacyMechanism(
        GaussianMechanism.construct_single_iteration(clipping_bound=1.0, epsilon=2.0, delta=1e-5)
    )
    backend = SimulatedBackend(training_data=fed, val_data=None, postprocessors=[mech])
    params = NNAlgorithmParams(
        central_num_iterations=spec["rounds"],
        evaluation_frequency=10**9,
        train_cohort_size=spec["clients"],
        val_cohort_size=0,
    )
    train = NNTrainHyperParams(local_learning_rate=1e-3, local_num_epochs=1, local_batch_size=256)
    t0 = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=params,
        backend=backend,
        model=model,
        model_train_params=train,
        model_eval_params=NNEvalHyperParams(local_batch_size=256),
        callbacks=[],
    )
    wall = time.perf_counter() - t0
    samples = spec["rounds"] * spec["clients"] * spec["per_client"]
    return {
        "status": "ok",
        "version": md.version("pfl"),
        "wall_s": wall,
        "samples": samples,
        "samples_per_s": samples / wall,
        "round_s": wall / spec["rounds"],
        "per_client_round_ms": 1e3 * wall / (spec["rounds"] * spec["clients"]),
        "dp": "user-level: update clipped to 1, central Gaussian noise (pfl GaussianMechanism)",
    }


def run_flower(spec: dict) -> dict:
    """Flower simulation (Ray backend): FedAvg with DifferentialPrivacyServerSideFixedClipping on the DP-CVAE."""
    import flwr
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    from flwr.simulation import run_simulation

    from fedhypevae.baselines.dpcvae import CVAE

    data = _peer_data(spec)

    def get(net):
        return [p.detach().numpy().copy() for p in net.parameters()]

    def put(net, arrays):
        with torch.no_grad():
            for p, a in zip(net.parameters(), arrays):
                p.copy_(torch.as_tensor(a))

    class Client(NumPyClient):
        def __init__(self, cid):
            self.x, self.y = data[cid]
            self.net = CVAE(spec["d"], K)

        def fit(self, parameters, config):
            put(self.net, parameters)
            opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
            perm = torch.randperm(len(self.y))
            for s in range(0, len(perm), 256):
                idx = perm[s : s + 256]
                loss, _ = self.net(self.x[idx], self.y[idx], torch.randn(len(idx), 100))
                opt.zero_grad()
                loss.mean().backward()
                opt.step()
            return get(self.net), len(self.y), {}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    init = ndarrays_to_parameters(get(CVAE(spec["d"], K)))

    def server_fn(context: Context):
        base = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=spec["clients"],
            min_available_clients=spec["clients"],
            initial_parameters=init,
        )
        strategy = DifferentialPrivacyServerSideFixedClipping(
            base, noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=spec["clients"]
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=spec["rounds"]))

    t0 = time.perf_counter()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=spec["clients"],
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - t0
    samples = spec["rounds"] * spec["clients"] * spec["per_client"]
    return {
        "status": "ok",
        "version": flwr.__version__,
        "wall_s": wall,
        "samples": samples,
        "samples_per_s": samples / wall,
        "round_s": wall / spec["rounds"],
        "per_client_round_ms": 1e3 * wall / (spec["rounds"] * spec["clients"]),
        "dp": "user-level: server-side fixed clipping to 1, noise multiplier 1 (Flower)",
        "note": "wall time includes starting the Ray simulation",
    }


def part_peer(
    name: str,
    module: str,
    *,
    python: str,
    d: int,
    clients: int,
    per_client: int,
    rounds: int,
    tmp: Path,
    timeout: float,
) -> dict:
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, env=child_env(2))
    if probe.returncode != 0:
        return {
            "status": "not installed",
            "python": python,
            "d_x": d,
            "clients": clients,
            "per_client": per_client,
            "error": (probe.stderr.strip().splitlines() or ["import failed"])[-1],
        }
    spec = {
        "d": d,
        "clients": clients,
        "per_client": per_client,
        "rounds": rounds,
        "result": str(tmp / f"peer_{name}_{clients}.json"),
    }
    spec_path = tmp / f"peer_{name}_{clients}_spec.json"
    spec_path.write_text(json.dumps(spec))
    try:
        proc = subprocess.run(
            [python, "-m", "benchmarks.throughput", "--peer", name, str(spec_path)],
            cwd=REPO,
            env=child_env(2),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    if not Path(spec["result"]).exists():
        return {"status": "error", "error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    res = json.loads(Path(spec["result"]).read_text())
    res.update({"python": python, "d_x": d, "clients": clients, "per_client": per_client, "rounds": rounds})
    return res


# ------------------------------------------------------------------------------------------ report
def machine_info(device: str) -> dict:
    import torch

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    info = {
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": ver("torch"),
        "opacus": ver("opacus"),
        "mpi4py": ver("mpi4py"),
        "mpich": ver("mpich"),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def headline(res: dict) -> dict:
    out = {}
    eng = {r["d_x"]: r for r in res["engine"]}
    opa = {(r["d_x"], r["dp"]): r for r in res["opacus"]}
    ref_d = 768 if 768 in eng else (max(eng) if eng else None)
    if ref_d is not None:
        out["reference_d_x"] = ref_d
        out["dp_over_nonprivate_step_time"] = eng[ref_d]["dp_over_nonprivate"]
        if (ref_d, True) in opa:
            out["speedup_vs_opacus_loop"] = eng[ref_d]["dp"]["samples_per_s"] / opa[(ref_d, True)]["samples_per_s"]
    cl = {r["clients"]: r for r in res["clients"]}
    if len(cl) >= 2:
        lo, hi = min(cl), max(cl)
        a, b = cl[lo], cl[hi]
        out["per_client_overhead_ms"] = 1e3 * (b["round_s"] - a["round_s"]) / (hi - lo)
        out["per_client_overhead_noise_ms"] = 1e3 * (b["breakdown_s"]["noise"] - a["breakdown_s"]["noise"]) / (hi - lo)
        out["per_client_overhead_clients"] = [lo, hi]
        out["per_client_overhead_breakdown_ms"] = {
            k: 1e3 * (b["breakdown_s"][k] - a["breakdown_s"][k]) / (hi - lo) for k in PHASE_KEYS
        }
        out["per_client_overhead_breakdown_ms"]["accounting"] = (
            1e3 * (b["accounting_s"] - a["accounting_s"]) / (hi - lo)
        )
    sig = res.get("sigma") or {}
    if "rdp" in sig:
        out["sigma_calibration_s"] = sig["rdp"]["seconds"]
    if "prv" in sig:
        out["sigma_calibration_prv_s"] = sig["prv"]["seconds"]
    targets = {
        "dp_over_nonprivate_step_time": ("<=", 1.5),
        "speedup_vs_opacus_loop": (">=", 30.0),
        "per_client_overhead_ms": ("<=", 1.0),
        "sigma_calibration_s": ("<=", 2.0),
    }
    out["targets"] = {
        k: {"value": out[k], "target": f"{op} {v:g}", "met": (out[k] <= v if op == "<=" else out[k] >= v)}
        for k, (op, v) in targets.items()
        if k in out
    }
    return out


def fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def markdown(res: dict) -> str:
    m, h = res["machine"], res["headline"]
    out = [
        "# Throughput benchmark",
        "",
        f"{m['usable_cores']} usable cores ({m['platform']}), Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), opacus {m['opacus']}, device {m['device']}; load average "
        f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end. "
        f"{'Quick mode. ' if res['quick'] else ''}Total wall time {res['wall_s']:.0f} s. "
        "All figures from this one run; medians over rounds.",
        "",
        "## Targets",
        "",
        "| figure | measured | target | met |",
        "|---|---|---|---|",
    ]
    for k, t in h.get("targets", {}).items():
        out.append(f"| {k} | {fmt(t['value'])} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
    if "per_client_overhead_noise_ms" in h:
        out += [
            "",
            f"Per-client overhead ({h['per_client_overhead_clients'][1]} vs {h['per_client_overhead_clients'][0]} "
            f"clients, ms per client per round): "
            + ", ".join(f"{k} {v:.3f}" for k, v in h["per_client_overhead_breakdown_ms"].items() if abs(v) >= 0.0005),
        ]
    out += [
        "",
        "## 1. Batched engine: DP (strict) vs the same engine without DP",
        "",
        "Per step (10 clients, all on one process): median step time, samples/s, and the DP step's breakdown (ms). "
        "`other` = step time not attributed to a phase (Python, the step buffer, diagnostics).",
        "",
        "| d_x | Phi params | DP step (s) | non-DP step (s) | DP / non-DP | DP samples/s | non-DP samples/s | "
        + " | ".join(PHASE_KEYS)
        + " |",
        "|" + "---|" * (7 + len(PHASE_KEYS)),
    ]
    for r in res["engine"]:
        dp, np_ = r["dp"], r["nonprivate"]
        out.append(
            f"| {r['d_x']} | {r['phi_params']:,} | {dp['step_s']:.3f} | {np_['step_s']:.3f} | "
            f"{r['dp_over_nonprivate']:.2f} | {dp['samples_per_s']:,.0f} | {np_['samples_per_s']:,.0f} | "
            + " | ".join(f"{1e3 * dp['breakdown_s'][k]:.1f}" for k in PHASE_KEYS)
            + " |"
        )
    if res["engine"]:
        out += [
            "",
            "Non-DP breakdown (ms): "
            + "; ".join(
                f"d_x={r['d_x']}: "
                + ", ".join(
                    f"{k} {1e3 * r['nonprivate']['breakdown_s'][k]:.1f}"
                    for k in PHASE_KEYS
                    if r["nonprivate"]["breakdown_s"][k] > 0.0005
                )
                for r in res["engine"]
            ),
        ]
        out += [
            "",
            "epsilon accounting once per round (not in the step time), DP: "
            + ", ".join(f"d_x={r['d_x']} {1e3 * r['dp']['accounting_s']:.0f} ms" for r in res["engine"]),
        ]
    out += [
        "",
        "## 2. Opacus client loop (DP-CVAE, hooks, Adam, expected batch 256) and the same loop without DP",
        "",
        "| d_x | DP samples/s | plain samples/s | engine DP samples/s | engine DP / Opacus DP |",
        "|---|---|---|---|---|",
    ]
    eng = {r["d_x"]: r for r in res["engine"]}
    for d in sorted({r["d_x"] for r in res["opacus"]}):
        dp = next((r for r in res["opacus"] if r["d_x"] == d and r["dp"]), None)
        pl = next((r for r in res["opacus"] if r["d_x"] == d and not r["dp"]), None)
        e = eng.get(d)
        out.append(
            f"| {d} | {fmt(dp and dp['samples_per_s'])} | {fmt(pl and pl['samples_per_s'])} | "
            f"{fmt(e and e['dp']['samples_per_s'])} | "
            f"{fmt(e['dp']['samples_per_s'] / dp['samples_per_s'] if (e and dp) else None)} |"
        )
    out += [
        "",
        "## 3. Peer frameworks (DP-FedAvg, user-level DP, same MLP and data)",
        "",
        "| framework | clients x records | status | samples/s | round (s) | ms per client per round |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in res["peers"].items():
        for p in rows:
            size = f"{p.get('clients', '-')} x {p.get('per_client', '-')}"
            if p.get("status") == "ok":
                out.append(
                    f"| {name} {p.get('version', '')} | {size} | ok | {p['samples_per_s']:,.0f} | "
                    f"{p['round_s']:.2f} | {p['per_client_round_ms']:.1f} |"
                )
            else:
                out.append(f"| {name} | {size} | {p.get('status')}: {str(p.get('error', ''))[:160]} | | | |")
    out += [
        "",
        "## 4. Clients per rank at 10,000 records in total (d_x = 64, default model, DP strict, one process)",
        "",
        "| clients | records | round (s) | per-step samples | accounting (ms/round) | " + " | ".join(PHASE_KEYS) + " |",
        "|" + "---|" * (5 + len(PHASE_KEYS)),
    ]
    for r in res["clients"]:
        out.append(
            f"| {r['clients']} | {r['records']} | {r['round_s']:.3f} | "
            f"{r['samples_per_round'] / r['local_steps']:.0f} | "
            f"{1e3 * r['accounting_s']:.1f} | "
            + " | ".join(f"{1e3 * r['breakdown_s'][k]:.1f}" for k in PHASE_KEYS)
            + " |"
        )
    if res["clients"]:
        out += ["", f"Breakdown in ms per round ({res['clients'][0]['local_steps']} local steps)."]
    out += [
        "",
        "## 5. MPI ranks (engine config of part 1 at d_x = 768, DP strict, mpiexec)",
        "",
        "| ranks | threads/rank | step (s) | samples/s | all-reduce (ms/step) | noise (ms/step) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["ranks"]:
        if "error" in r:
            out.append(f"| {r['ranks']} | FAILED: {r['error'].splitlines()[0][:150]} | | | | |")
            continue
        out.append(
            f"| {r['ranks']} | {r['threads_per_rank']} | {r['step_s']:.3f} | {r['samples_per_s']:,.0f} | "
            f"{1e3 * r['breakdown_s']['all_reduce']:.1f} | {1e3 * r['breakdown_s']['noise']:.1f} |"
        )
    sig = res.get("sigma") or {}
    out += ["", "## 6. sigma calibration", ""]
    if sig:
        out.append(
            f"plan_budget for {sig['steps']:,} steps at q = {sig['sample_rate']}, epsilon = 1, delta = 1e-5 "
            "(with the class-statistics release): "
            + "; ".join(
                f"{a.upper()} {sig[a]['seconds']:.2f} s (sigma {sig[a]['sigma']:.3f})"
                for a in ("rdp", "prv")
                if a in sig
            )
        )
    out += ["", "## Command", "", "```", f"python -m benchmarks.throughput {' '.join(res['argv'])}"]
    out += [r["command"] for r in res["ranks"] if "command" in r]
    out += ["```", "", "TMP is a scratch folder. Nothing here asserts anything about speed."]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13.5, 8.5))
    a = ax[0][0]
    eng = sorted(res["engine"], key=lambda r: r["d_x"])
    if eng:
        xs = [r["d_x"] for r in eng]
        a.plot(xs, [r["dp"]["samples_per_s"] for r in eng], "o-", label="engine, DP (strict)")
        a.plot(xs, [r["nonprivate"]["samples_per_s"] for r in eng], "s--", label="engine, no DP")
    for dp, style, lab in ((True, "^-", "Opacus loop, DP"), (False, "v--", "plain loop, no DP")):
        rows = sorted((r for r in res["opacus"] if r["dp"] == dp), key=lambda r: r["d_x"])
        if rows:
            a.plot([r["d_x"] for r in rows], [r["samples_per_s"] for r in rows], style, label=lab)
    a.set(yscale="log", xlabel="d_x", ylabel="samples / s", title="Throughput (10 clients x 1000, batch 256)")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    b = ax[0][1]
    if eng:
        bottom = [0.0] * len(eng)
        colors = plt.get_cmap("tab20").colors
        for n, k in enumerate(PHASE_KEYS):
            vals = [1e3 * r["dp"]["breakdown_s"][k] for r in eng]
            b.bar([str(r["d_x"]) for r in eng], vals, bottom=bottom, label=k, color=colors[n % len(colors)])
            bottom = [u + v for u, v in zip(bottom, vals)]
        b.plot(
            [str(r["d_x"]) for r in eng],
            [1e3 * r["nonprivate"]["step_s"] for r in eng],
            "k*",
            ms=12,
            label="no-DP step",
        )
    b.set(xlabel="d_x", ylabel="ms per step", title="DP step breakdown")
    # beside the bars, never over them
    b.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="phase", title_fontsize=7)
    c = ax[1][0]
    cl = sorted(res["clients"], key=lambda r: r["clients"])
    if cl:
        c.plot([r["clients"] for r in cl], [r["round_s"] for r in cl], "o-", label="round")
        c.plot([r["clients"] for r in cl], [r["breakdown_s"]["noise"] for r in cl], "s--", label="noise generation")
    c.set(
        xscale="log",
        xlabel="clients on the rank (10,000 records in total)",
        ylabel="seconds per round",
        title="Clients per rank (d_x = 64, DP)",
    )
    c.grid(True, which="both", alpha=0.3)
    c.legend(fontsize=8)
    e = ax[1][1]
    rk = [r for r in res["ranks"] if "error" not in r]
    if rk:
        e.bar([str(r["ranks"]) for r in rk], [r["samples_per_s"] for r in rk])
    e.set(xlabel="MPI ranks (shared cores)", ylabel="samples / s", title="mpiexec, d_x = 768, DP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(res: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(dumps_json(res, indent=2) + "\n")
    with open(out / "throughput.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["part", "variant", "d_x", "clients", "ranks", "metric", "value"])
        for r in res["engine"]:
            for v in ("dp", "nonprivate"):
                w.writerow(["engine", v, r["d_x"], r["clients"], 1, "step_s", r[v]["step_s"]])
                w.writerow(["engine", v, r["d_x"], r["clients"], 1, "samples_per_s", r[v]["samples_per_s"]])
                for k in PHASE_KEYS:
                    w.writerow(["engine", v, r["d_x"], r["clients"], 1, f"{k}_s", r[v]["breakdown_s"][k]])
        for r in res["opacus"]:
            w.writerow(
                ["opacus", "dp" if r["dp"] else "plain", r["d_x"], r["clients"], 1, "samples_per_s", r["samples_per_s"]]
            )
        for name, rows in res["peers"].items():
            for p in rows:
                if p.get("status") == "ok":
                    w.writerow(["peers", name, p["d_x"], p["clients"], 1, "samples_per_s", p["samples_per_s"]])
                    w.writerow(
                        ["peers", name, p["d_x"], p["clients"], 1, "per_client_round_ms", p["per_client_round_ms"]]
                    )
        for r in res["clients"]:
            w.writerow(["clients", "dp", r["d_x"], r["clients"], 1, "round_s", r["round_s"]])
            w.writerow(["clients", "dp", r["d_x"], r["clients"], 1, "noise_s", r["breakdown_s"]["noise"]])
        for r in res["ranks"]:
            if "error" not in r:
                w.writerow(["ranks", "dp", r["d_x"], r["clients"], r["ranks"], "samples_per_s", r["samples_per_s"]])
        for k, v in res["headline"].items():
            if isinstance(v, (int, float)):
                w.writerow(["headline", "", "", "", "", k, v])
    plot(res, out / "throughput.png")
    text = markdown(res)
    (out / "throughput.md").write_text(text)
    return text


def parse_ints(text: str) -> list:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    if argv[:1] == ["--peer"]:
        return peer_worker(argv[1], argv[2])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for throughput.{json,csv,md,png}")
    ap.add_argument(
        "--quick", action="store_true", help="d_x 64,768; 10 and 1000 clients; 1-2 ranks; fewer rounds (< 2 min)"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: cuda:LOCAL_RANK (UNTESTED here)")
    ap.add_argument("--dims", help="d_x values for parts 1-2 (default 64,384,768,1024; --quick 64,768)")
    ap.add_argument("--clients", type=int, default=10, help="clients in parts 1, 2, 5 (default 10)")
    ap.add_argument("--per-client", type=int, default=1000, help="records per client in parts 1, 2, 5 (default 1000)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden width of the matched model (default 256)")
    ap.add_argument("--latent", type=int, default=100, help="latent size of the matched model (default 100)")
    ap.add_argument("--reps", type=int, help="timed rounds per configuration (default 8; --quick 3)")
    ap.add_argument("--clients-sweep", help="clients per rank in part 4 (default 10,100,1000; --quick 10,1000)")
    ap.add_argument("--sweep-records", type=int, default=10000, help="total records in part 4 (default 10000)")
    ap.add_argument("--ranks", help="MPI ranks in part 5 (default 1,2,4; --quick 1,2; 'none' skips)")
    ap.add_argument("--opacus-rounds", type=int, help="rounds of the Opacus loop (default 2; --quick 1; 0 skips)")
    ap.add_argument("--opacus-dims", help="d_x values for part 2 (default: --dims; --quick 768)")
    ap.add_argument("--peers", default="auto", choices=["auto", "off"], help="part 3 (default auto)")
    ap.add_argument(
        "--peers-python",
        default=os.environ.get("FEDHYPEVAE_PEERS_PYTHON", sys.executable),
        help="interpreter that has pfl / flwr installed (default: this one, or $FEDHYPEVAE_PEERS_PYTHON)",
    )
    ap.add_argument("--calibration-steps", type=int, default=50000, help="part 6 steps (default 50000; 0 skips)")
    ap.add_argument("--threads", type=int, help="torch threads in this process (default: torch's)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        from fedhypevae.hpc.device import choose_device

        device = str(choose_device(0, "cuda"))
    else:
        device = "cpu"
    q = args.quick
    dims = parse_ints(args.dims or ("64,768" if q else "64,384,768,1024"))
    reps = args.reps or (3 if q else 8)
    warmup = 1 if q else 2
    sweep = parse_ints(args.clients_sweep or ("10,1000" if q else "10,100,1000"))
    ranks = [] if args.ranks == "none" else parse_ints(args.ranks or ("1,2" if q else "1,2,4"))
    opacus_rounds = args.opacus_rounds if args.opacus_rounds is not None else (1 if q else 2)
    opacus_dims = parse_ints(args.opacus_dims) if args.opacus_dims else ([768] if q and 768 in dims else dims)
    model = [f"model.hidden=[{args.hidden},{args.hidden},{args.hidden}]", f"model.latent_dim={args.latent}"]

    t0 = time.perf_counter()
    res = {
        "argv": argv,
        "quick": q,
        "machine": machine_info(device),
        "engine": [],
        "opacus": [],
        "peers": {},
        "clients": [],
        "ranks": [],
        "sigma": None,
        "settings": {
            "clients": args.clients,
            "per_client": args.per_client,
            "sample_rate": 0.256,
            "model": model,
            "reps": reps,
            "warmup_rounds": warmup,
            "privacy_mode": "strict",
            "step_time": "median over rounds of (round wall time - epsilon accounting) / local_steps",
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmpd:
        tmp = Path(tmpd)
        for d in dims:
            log(f"part 1: engine d_x={d} ({args.clients} clients x {args.per_client}, {reps} rounds DP and non-DP)")
            res["engine"].append(
                part_engine(
                    d,
                    reps=reps,
                    warmup=warmup,
                    clients=args.clients,
                    per_client=args.per_client,
                    model=model,
                    device=device,
                    tmp=tmp,
                )
            )
            r = res["engine"][-1]
            log(
                f"  DP {r['dp']['step_s']:.3f} s/step ({r['dp']['samples_per_s']:,.0f} samples/s), non-DP "
                f"{r['nonprivate']['step_s']:.3f} s/step: ratio {r['dp_over_nonprivate']:.2f}"
            )
        sigma = res["engine"][0]["sigma"] if res["engine"] else 1.0
        for d in opacus_dims if opacus_rounds > 0 else []:
            for dp in (True, False):
                log(f"part 2: {'Opacus' if dp else 'plain'} client loop d_x={d}, {opacus_rounds} round(s)")
                res["opacus"].append(
                    part_opacus(
                        d,
                        rounds=opacus_rounds if dp else max(3, opacus_rounds),
                        clients=args.clients,
                        per_client=args.per_client,
                        sigma=sigma,
                        device=device,
                        dp=dp,
                    )
                )
                log(f"  {res['opacus'][-1]['samples_per_s']:,.0f} samples/s")
        if args.peers != "off":
            peer_d = 768 if 768 in dims else dims[-1]
            for name, module in (("pfl", "pfl"), ("flower", "flwr.simulation")):
                res["peers"][name] = []
                sizes = [(args.clients, args.per_client, peer_d, 1 if q else 2)]
                if not q:  # per-client overhead: 10x100 vs 100x10 records at d_x = 64
                    sizes += [(10, 100, 64, 2), (100, 10, 64, 2)]
                for clients, per, d, rounds in sizes:
                    log(f"part 3: {name} DP-FedAvg {clients} clients x {per}, d_x={d}")
                    p = part_peer(
                        name,
                        module,
                        python=args.peers_python,
                        d=d,
                        clients=clients,
                        per_client=per,
                        rounds=rounds,
                        tmp=tmp,
                        timeout=300,
                    )
                    res["peers"][name].append(p)
                    log(
                        f"  {p.get('status')}"
                        + (
                            f": {p['samples_per_s']:,.0f} samples/s"
                            if p.get("status") == "ok"
                            else f" ({str(p.get('error', ''))[:200]})"
                        )
                    )
                    if p.get("status") != "ok":
                        break
        for m in sweep:
            log(f"part 4: {m} clients on one rank, {args.sweep_records} records, d_x=64")
            res["clients"].append(
                part_clients(m, total=args.sweep_records, reps=max(2, reps // 2), warmup=1, device=device, tmp=tmp)
            )
            log(f"  {res['clients'][-1]['round_s']:.3f} s/round")
        for r in ranks:
            d = 768 if 768 in dims else dims[-1]
            log(f"part 5: mpiexec -n {r}, d_x={d}")
            try:
                res["ranks"].append(
                    part_ranks(
                        r,
                        reps=max(2, reps // 2),
                        warmup=1,
                        clients=args.clients,
                        per_client=args.per_client,
                        d=d,
                        model=model,
                        device=device,
                        tmp=tmp,
                        threads=args.threads,
                    )
                )
                log(f"  {res['ranks'][-1]['samples_per_s']:,.0f} samples/s")
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                res["ranks"].append({"ranks": r, "error": str(exc)})
                log(f"  FAILED: {str(exc).splitlines()[0]}")
        if args.calibration_steps > 0:
            accs = ["rdp"] if q else ["rdp", "prv"]
            log(f"part 6: sigma calibration for {args.calibration_steps} steps ({', '.join(accs)})")
            res["sigma"] = part_sigma(args.calibration_steps, accs, 0.01)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - t0
    res["headline"] = headline(res)
    res.update({k: v for k, v in res["headline"].items() if k != "targets"})
    print(write_outputs(res, Path(args.out)), end="")
    failed = [r for r in res["ranks"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
