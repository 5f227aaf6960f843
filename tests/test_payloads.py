"""Every payload that crosses a rank boundary is a declared noisy release, a public count, a budget
flag, the spent epsilon or a checksum of the public Phi — and no private value ever appears in one.

A RecordingCommunicator keeps every buffer handed to a collective. With privacy.noise_seed set, an
independent replay recomputes what each buffer must be from the DECLARED releases — each client's
`Client.step` output (the reference DP step) and its DP class statistics, recomputed from the same
generator streams — weighted by public weights computed here, plus public counts. Then every recorded
buffer is searched for exact float matches of private values: encoder weights, codes v_i, raw data
rows, per-client sizes (uniform weights), and the un-noised clipped sums. Negative controls: a client
that releases its un-noised sum, and a trainer that sends a private code along, must fail.
"""

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch
from fedhypevae.hpc import LocalCommunicator
from helpers import trace_step

from fedhypevae.block import ClientBlock
from fedhypevae.client import DIAG_KEYS
from fedhypevae.config import TrainConfig, load_config
from fedhypevae.dp_step import PER_SAMPLE, DPStep
from fedhypevae.metacode import ClassMoments
from fedhypevae.privacy import (
    CLASS_STATS,
    DP_SGD,
    MMD_EMBEDDINGS,
    Mechanism,
    epsilon_of,
    finalize_class_stats,
    release_class_stats,
)
from fedhypevae.rng import STREAM_STATS_RELEASE, STREAM_STEP
from fedhypevae.run import _flatten, _unflatten, anchor_means, run_training, stats_clip_norm
from fedhypevae.trainer import Trainer

HAS_ENGINE = any(f.name == "engine" for f in dataclasses.fields(TrainConfig))
D = len(DIAG_KEYS)


class RecordingCommunicator(LocalCommunicator):
    """A LocalCommunicator that keeps a copy of every buffer handed to a collective. With world_size=2
    it plays rank 0 of two ranks whose other rank contributes nothing (what leaves rank 0 is its own)."""

    def __init__(self, world_size: int = 1, rank: int = 0):
        self.world_size, self.rank = world_size, rank
        self.calls = []

    def allreduce(self, buf, op="sum"):
        self.calls.append(("allreduce", op, buf.detach().clone()))
        return super().allreduce(buf, op)

    def broadcast(self, buf, root=0):
        self.calls.append(("broadcast", root, buf.detach().clone()))
        return super().broadcast(buf, root)


def config(*overrides, engine: str | None = None):
    extra = [f"train.engine={engine}"] if (engine and HAS_ENGINE) else []
    return load_config(
        "tiny",
        [
            "train.rounds=2",
            "privacy.noise_seed=5",
            "privacy.diagnostics=false",
            "train.checkpoint_every=0",
            *extra,
            *overrides,
        ],
    )


# ------------------------------------------------------------------------------------------ replay


@dataclass
class Expect:
    kind: str  # plan | flag | grad | diag | delta | checksum | epsilon | stats
    op: str
    value: torch.Tensor


def _phi_vector(hyper, grads) -> torch.Tensor:
    return torch.cat([grads[n].detach().reshape(-1).double().cpu() for n, _ in hyper.named_parameters()])


def _public_diag(n_clients: int) -> torch.Tensor:
    d = torch.zeros(D, dtype=torch.float64)
    d[DIAG_KEYS.index("clients")] = float(n_clients)
    return d


def replay(cfg, hosted: list, scratch, world_size: int):
    """What every collective of `run_training` must carry, from the declared releases alone.
    Returns (expected collectives, private values seen along the way)."""
    ref = copy.deepcopy(cfg)
    if HAS_ENGINE:
        ref.train.engine = "reference"
    tr = Trainer(ref, scratch, progress=False)  # public initialization (seeded) and the clients' MMD releases
    tr.setup()
    clients = [c.standalone() for c in tr.clients if c.id in hosted]  # each with a block of its own: Client.step
    hyper, plan, p = tr.hyper, tr.plan, cfg.privacy
    declared = tr.fed.declared_sizes
    m = tr.fed.num_clients
    w = {i: (declared[i] / sum(declared) if cfg.federation.weights == "declared" else 1.0 / m) for i in range(m)}
    opt = (torch.optim.Adam if cfg.train.optimizer == "adam" else torch.optim.SGD)(hyper.parameters(), lr=cfg.train.lr)
    P = sum(t.numel() for t in hyper.parameters())
    delta_mode = cfg.federation.aggregation == "delta"
    out, private = [], []
    if world_size > 1:  # rank 0's calibrated noise multipliers (public: a function of the config), first of all
        sig = [plan.noise_multiplier(n) for n in (DP_SGD, CLASS_STATS, MMD_EMBEDDINGS)]
        out.append(
            Expect("plan", "broadcast", torch.tensor([-1.0 if v is None else v for v in sig], dtype=torch.float64))
        )
    one_shot = (
        [Mechanism(MMD_EMBEDDINGS, plan.noise_multiplier(MMD_EMBEDDINGS), 1.0, 1)]
        if plan.noise_multiplier(MMD_EMBEDDINGS) is not None
        else []
    )
    if one_shot:  # the release guard's bits (budget, stop signal) before the MMD embeddings' release
        out.append(Expect("flag", "max", torch.zeros(2, dtype=torch.float64)))
    steps = 0

    def project(h):
        if cfg.model.lipschitz is not None:
            h.project_spectral(cfg.model.lipschitz)

    def flat(ts):
        return torch.cat([t.detach().reshape(-1).double().cpu() for t in ts])

    def stats_release() -> None:
        """The guard's bits, then the sum of the hosted clients' DP class statistics."""
        out.append(Expect("flag", "max", torch.zeros(2, dtype=torch.float64)))
        clip = stats_clip_norm(cfg, tr.fed.transform, tr.fed.dim)
        sbuf, layout = None, None
        for c in clients:
            rel = release_class_stats(
                c.x,
                c.y,
                num_classes=tr.fed.num_classes,
                clip_norm=clip,
                noise_multiplier=plan.noise_multiplier(CLASS_STATS),
                covariance=cfg.stats.covariance,
                generator=c.rng.generator(STREAM_STATS_RELEASE),
            )
            vec, layout = _flatten(rel)
            sbuf = vec.clone() if sbuf is None else sbuf + vec
        out.append(Expect("stats", "sum", sbuf))
        return sbuf, layout

    stats_mech = [Mechanism("class-stats", plan.noise_multiplier(CLASS_STATS), 1.0, 1)]
    anchored = cfg.model.class_anchor
    if anchored:  # released before training; the decoder's anchor is their pooled means (post-processing)
        sbuf, layout = stats_release()
        fin = finalize_class_stats(_unflatten(sbuf, layout), covariance=cfg.stats.covariance, rank=cfg.stats.rank)
        with torch.no_grad():
            hyper.class_anchor.copy_(anchor_means(ClassMoments(means=fin["means"], counts=fin["counts"])).float())
        one_shot = one_shot + stats_mech
    for c in clients:
        private += [c.x.reshape(-1), c.code.detach().reshape(-1), flat(c.encoder.parameters())]
        if cfg.federation.weights == "uniform":  # then sizes and size-proportional weights are private
            private += [torch.tensor([float(len(c.y)), len(c.y) / float(sum(len(k.y) for k in tr.clients))])]
    for r in range(cfg.train.rounds):
        if delta_mode:
            start = torch.cat([t.detach().reshape(-1).double() for t in hyper.parameters()])
            local = {c.id: copy.deepcopy(hyper) for c in clients}
        for s in range(cfg.train.local_steps):
            out.append(Expect("flag", "max", torch.zeros(2, dtype=torch.float64)))  # the release guard's bits
            buf = torch.zeros(P + D, dtype=torch.float64)
            unnoised = torch.zeros(P, dtype=torch.float64)
            if not delta_mode:  # the un-noised release of the rank's block, in the block step's own arithmetic
                quiet = DPStep(
                    ClientBlock.copy_of(clients),
                    weights=[w[c.id] for c in clients],
                    per_sample=PER_SAMPLE[cfg.train.engine],
                )
                private.append(quiet.step(copy.deepcopy(hyper), r, s, sigma=0.0, features=tr.features).phi)
            for c in clients:
                h = local[c.id] if delta_mode else hyper

                def g(c=c, r=r, s=s):
                    return c.rng.generator(STREAM_STEP, r, s)

                # private: the state before the step and the un-noised clipped sum (also as sigma = 0 would send it)
                private += [c.code.detach().reshape(-1), flat(c.encoder.parameters())]
                pre = trace_step(copy.deepcopy(c), copy.deepcopy(h), g(), sigma=plan.sigma, features=tr.features)
                zero = trace_step(copy.deepcopy(c), copy.deepcopy(h), g(), sigma=0.0, features=tr.features)
                names = sorted(pre.payload)
                private += [
                    flat(pre.payload[n] for n in names),
                    flat(pre.payload[n] / pre.expected_batch for n in names),
                ]
                private.append(_phi_vector(h, zero.phi))
                unnoised += w[c.id] * _phi_vector(h, zero.phi)
                rel = c.step(h, r, s, sigma=plan.sigma, features=tr.features)  # the declared release
                if delta_mode:
                    with torch.no_grad():
                        for n, t in h.named_parameters():
                            t.sub_(cfg.train.local_lr * rel.phi_grad[n])
                    project(h)
                else:
                    buf[:P] += w[c.id] * _phi_vector(h, rel.phi_grad)
                buf[P:] += _public_diag(1)
            private.append(unnoised)
            steps += 1
            if delta_mode:
                out.append(Expect("diag", "sum", buf[P:].clone()))
            else:
                out.append(Expect("grad", "sum", buf.clone()))
                off = 0
                for t in hyper.parameters():
                    t.grad = buf[off : off + t.numel()].view_as(t).float().clone()
                    off += t.numel()
                opt.step()
                opt.zero_grad(set_to_none=True)
                project(hyper)
            every = cfg.train.replica_check_every
            if world_size > 1 and every and steps % every == 0:
                v = torch.cat([t.detach().reshape(-1).double() for t in hyper.parameters()])
                wt = torch.arange(1, v.numel() + 1, dtype=torch.float64) / v.numel()
                cs = torch.stack([v.sum(), (v * wt).sum()])
                out += [Expect("checksum", "max", cs), Expect("checksum", "max", -cs)]
        if delta_mode:
            dbuf = torch.zeros(P, dtype=torch.float64)
            for c in clients:
                dbuf += w[c.id] * (
                    torch.cat([t.detach().reshape(-1).double() for t in local[c.id].parameters()]) - start
                )
            out.append(Expect("delta", "sum", dbuf))
            torch.nn.utils.vector_to_parameters((start + cfg.federation.server_lr * dbuf).float(), hyper.parameters())
            project(hyper)
        eps = epsilon_of(
            [Mechanism(DP_SGD, plan.sigma, p.sample_rate, steps)] + one_shot, delta=p.delta, accountant=p.accountant
        )
        out.append(Expect("epsilon", "max", torch.tensor([eps], dtype=torch.float64)))
    # the DP class statistics for the meta-code (after the release guard's bits), then the final epsilon; with the
    # anchor nothing is released (the meta-code fit reuses the statistics released before training)
    if not anchored:
        stats_release()
        one_shot = one_shot + stats_mech
    eps = epsilon_of(
        [Mechanism(DP_SGD, plan.sigma, p.sample_rate, steps)] + one_shot,
        delta=p.delta,
        accountant=p.accountant,
    )
    out.append(Expect("epsilon", "max", torch.tensor([eps], dtype=torch.float64)))
    return out, private


# ------------------------------------------------------------------------------------------ the checker


def check_payloads(calls: list, expected: list, private: list, *, rtol: float = 1e-5, atol: float = 1e-7) -> list:
    """Problems found (empty: every buffer is a declared quantity and no private value appears)."""
    problems = []
    if len(calls) != len(expected):
        problems.append(f"{len(calls)} collectives recorded, {len(expected)} declared")
    for i, (call, exp) in enumerate(zip(calls, expected)):
        kind, op, buf = call
        if exp.kind == "plan":  # a broadcast from rank 0 of public numbers: exactly those
            if kind != "broadcast" or not torch.equal(buf, exp.value):
                problems.append(f"collective {i}: {kind} {buf.tolist()} where the plan's broadcast was declared")
            continue
        if kind != "allreduce" or op != exp.op or buf.shape != exp.value.shape:
            problems.append(
                f"collective {i}: {kind}/{op} of shape {tuple(buf.shape)} where a {exp.kind} "
                f"({exp.op}, {tuple(exp.value.shape)}) was declared"
            )
            continue
        if exp.kind in ("flag", "epsilon"):
            ok = (
                torch.equal(buf, exp.value) if exp.kind == "flag" else torch.allclose(buf, exp.value, rtol=1e-9, atol=0)
            )
        elif exp.kind == "grad":
            # the batched step sums Phi's noise over 64 clients at a time in fp32 (DPStep._noise: rounding ~1e-7 of
            # the summands' scale, which near-cancelling sums keep); the replay adds the declared releases one by one
            scale = float(exp.value.abs().max())
            ok = torch.allclose(buf, exp.value, rtol=rtol, atol=max(atol, 1e-6 * scale))
        else:
            ok = torch.allclose(buf, exp.value, rtol=rtol, atol=atol)
        if not ok:
            problems.append(
                f"collective {i} ({exp.kind}) differs from the declared release by "
                f"{(buf - exp.value).abs().max().item():.3g}"
            )
    # a private tensor "appears" in a buffer when most of its distinctive values are found there exactly
    # (single coincidences between two large sets of float32-valued numbers do happen and mean nothing)
    public = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    for i, (kind, op, buf) in enumerate(calls):
        b = buf.detach().double().cpu()
        for t in private:
            u = t.detach().reshape(-1).double().cpu().unique()
            u = u[~torch.isin(u, public)]
            if u.numel() == 0 or u.numel() > 2 * b.numel():  # cannot be half present
                continue
            if torch.isin(u, b).double().mean() >= 0.5:
                problems.append(
                    f"collective {i} ({kind}/{op}) carries a private tensor of {u.numel()} value(s) "
                    f"exactly, e.g. {u[:3].tolist()}"
                )
                break
    return problems


def _record(cfg, out, world_size=1, step_type=None):
    comm = RecordingCommunicator(world_size=world_size)
    if step_type is None:
        run_training(cfg, out, comm, progress=False)
    else:
        import fedhypevae.trainer as trainer_mod

        with pytest.MonkeyPatch.context() as mp:  # the deliberately leaking variant of the step, for every client
            mp.setattr(trainer_mod, "DPStep", step_type)
            run_training(cfg, out, comm, progress=False)
    return comm


def _hosted(cfg, world_size):
    from fedhypevae.hpc import place_clients

    from fedhypevae.data import build_federation

    fed = build_federation(cfg.data, cfg.partition, cfg.seed)
    return place_clients(fed.declared_sizes, world_size)[0]


@pytest.mark.parametrize(
    "world_size,overrides,engine",
    [
        (1, ["federation.weights=uniform"], None),  # the default engine
        (2, ["train.replica_check_every=2"], "reference"),
        (1, ["federation.aggregation=delta", "federation.weights=uniform"], None),  # delta: always the reference step
        (1, ["model.class_anchor=true"], None),  # the statistics released before training, nothing after it
    ],
    ids=["1rank-uniform-default-engine", "rank0of2-declared-reference", "1rank-delta", "1rank-class-anchor"],
)
def test_every_buffer_is_a_declared_release_and_carries_no_private_value(tmp_path, world_size, overrides, engine):
    cfg = config(*overrides, engine=engine)
    comm = _record(cfg, tmp_path / "run", world_size)
    expected, private = replay(cfg, _hosted(cfg, world_size), tmp_path / "replay", world_size)
    assert len(comm.calls) > 10 and {e.kind for e in expected} >= {"flag", "epsilon", "stats"}
    assert check_payloads(comm.calls, expected, private) == []


class LeakyStep(DPStep):
    """Releases the un-noised clipped sum (sigma = 0) while the ledger is charged for sigma."""

    def add_noise(self, sums, *, sigma, gens):
        return super().add_noise(sums, sigma=0.0, gens=gens)


def test_a_client_releasing_its_unnoised_sum_fails_the_checker(tmp_path):
    cfg = config("federation.weights=uniform", engine="reference")
    comm = _record(cfg, tmp_path / "run", step_type=LeakyStep)
    expected, private = replay(cfg, _hosted(cfg, 1), tmp_path / "replay", 1)
    problems = check_payloads(comm.calls, expected, private)
    assert any("differs from the declared release" in p for p in problems), problems
    assert any("private tensor" in p for p in problems), problems  # the un-noised buffer itself is found


def test_a_trainer_sending_private_state_fails_the_checker(tmp_path):
    cfg = config()

    class Chatty(Trainer):
        def epsilon_spent(self):  # a "harmless" extra collective that carries a client's code
            self.allreduce(self.clients[0].code.detach().double().clone())
            return super().epsilon_spent()

    import fedhypevae.run as run_mod

    comm = RecordingCommunicator()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "Trainer", Chatty)
        run_training(cfg, tmp_path / "run", comm, progress=False)
    expected, private = replay(cfg, _hosted(cfg, 1), tmp_path / "replay", 1)
    problems = check_payloads(comm.calls, expected, private)
    assert any("collectives recorded" in p for p in problems), problems
    assert any("private tensor" in p for p in problems), problems


# ------------------------------------------------------------------------------ central: what non-root ranks see


def central_payload_problems(recs: list, local_steps: int = 2) -> list:
    """What a non-root rank received that it must not (empty: nothing). `recs`: every rank's trust_worker record of
    a central run of the whole pipeline (run_training, diagnostics off), every collective recorded as
    (name, arguments, buffer handed in, buffer received back).

    * every sum goes to rank 0 by gather: no rank is handed a sum by an all-reduce (the all-reduces carry only
      0/1 budget and stop bits, the spent epsilon and Phi checksums, reduced by max), and a non-root rank's gather
      returns nothing;
    * a non-root rank hands the broadcast nothing of its own (zeros) and receives rank 0's noisy value, the same
      on every rank;
    * each received step aggregate is the sum of the ranks' gathered buffers plus exactly the aggregator's draw
      (regenerated from its key, std sigma * Delta): the root's draw is the only Phi noise (every rank sent its
      un-noised clipped sum: `sent` == `unnoised`), and the class statistics differ from their un-noised sum in
      every coordinate;
    * no un-noised gathered buffer (a rank's, or their sum) appears, even half, among the values a non-root rank
      received."""
    from fedhypevae.privacy.trust import AGGREGATOR_ID
    from fedhypevae.rng import STREAM_STEP, ClientRNG

    problems = []
    root = recs[0]
    gathers = [c for c in root["calls"] if c[0] == "gather"]
    W = root["unnoised"].shape[1]
    n_steps = root["sent"].shape[0]
    # the un-noised step sums (each rank's pre-noise contribution, as its step class noted it) and the
    # statistics' un-noised sum (as rank 0 gathered the ranks' buffers)
    unnoised = list(sum(r["unnoised"] for r in recs)) + [c[3].sum(0) for c in gathers[n_steps:]]
    rows = [row for r in recs for row in r["unnoised"]] + [row for c in gathers[n_steps:] for row in c[3]]
    a = max(
        w / (root["sample_rate"] * n)
        for w, n in zip(
            [
                n / sum(root["declared"]) if root["weights"] == "declared" else 1 / len(root["declared"])
                for n in root["declared"]
            ],
            root["declared"],
        )
    )
    rng = ClientRNG(AGGREGATOR_ID, root["noise_seed"])
    for r in recs:
        if not torch.equal(r["sent"], r["unnoised"]):
            problems.append(f"rank {r['rank']} sent Phi noise: the aggregator's draw must be the only Phi noise")
        if not torch.equal(r["applied"], root["applied"]):
            problems.append(f"rank {r['rank']} applied another aggregate than rank 0")
        bcasts = [c for c in r["calls"] if c[0] == "broadcast"]
        if len(bcasts) != len(gathers) or len(gathers) != n_steps + 1:
            problems.append(
                f"rank {r['rank']}: {len(gathers)} gathers and {len(bcasts)} broadcasts for {n_steps} "
                "steps and one statistics release"
            )
        for name, args, _sent, _got in r["calls"]:
            if name in ("allreduce", "reduce", "allgather", "allreduce_int64"):
                op = dict(a for a in args if isinstance(a, tuple)).get("op", args[0] if args else "sum")
                if name != "allreduce" or op != "max":
                    problems.append(f"rank {r['rank']}: a {name} ({op}) hands every rank a sum")
        if r["rank"] == 0:
            continue
        for k, (_name, _args, sent, got) in enumerate(bcasts):
            if float(sent.abs().max()) != 0.0:
                problems.append(f"rank {r['rank']} handed broadcast {k} a buffer of its own")
            if not torch.equal(got, [c for c in root["calls"] if c[0] == "broadcast"][k][3]):
                problems.append(f"rank {r['rank']} received another broadcast {k} than rank 0 sent")
            if k >= len(unnoised):
                continue
            if k < n_steps:
                draw = torch.randn(
                    W, generator=rng.generator(STREAM_STEP, *divmod(k, local_steps)), dtype=torch.float64
                )
                draw *= root["sigma"] * a * root["clip"]
                if not torch.allclose(got[:W] - unnoised[k][:W], draw, rtol=0, atol=1e-9):
                    problems.append(
                        f"step {k}: the aggregate rank {r['rank']} received is not the un-noised sum plus "
                        "the aggregator's draw"
                    )
            elif bool((got == unnoised[k]).any()):
                problems.append(f"rank {r['rank']}: statistics coordinates without noise in broadcast {k}")
        for name, _args, _sent, got in r["calls"]:
            if name == "gather" and got is not None:
                problems.append(f"rank {r['rank']} received the gathered buffers")
            if got is None:
                continue
            b = got.detach().double().reshape(-1)
            for t in unnoised + rows:
                u = t.reshape(-1).unique()
                u = u[~torch.isin(u, torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64))]
                if u.numel() and u.numel() <= 2 * b.numel() and torch.isin(u, b).double().mean() >= 0.5:
                    problems.append(f"rank {r['rank']} received an un-noised buffer in a {name}")
                    break
    return problems


CENTRAL_PAYLOAD = "central-payload=central,payload=1"


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_central_no_buffer_reaching_a_non_root_rank_is_an_unnoised_function_of_the_data(tmp_path):
    from helpers import MPIEXEC, launch_trust_worker, trust_ranks

    if not MPIEXEC.is_file():
        pytest.skip(f"needs {MPIEXEC}")
    launch_trust_worker(
        tmp_path,
        3,
        [
            CENTRAL_PAYLOAD,
            "central-payload-nodraw=central,payload=1,sabotage=no-draw",
            "central-payload-allreduce=central,payload=1,sabotage=allreduce",
        ],
    )
    recs = trust_ranks(tmp_path, "central-payload")
    assert [len(p) for p in recs[0]["placement"]] == [2, 3, 2]  # uneven: rank 1 hosts three clients
    assert central_payload_problems(recs) == []
    # negative controls: an aggregator that skips its draw hands every rank the un-noised sum ...
    bad = central_payload_problems(trust_ranks(tmp_path, "central-payload-nodraw"))
    assert any("un-noised buffer" in p for p in bad) and any("aggregator's draw" in p for p in bad), bad
    # ... and so does summing by an all-reduce instead of a gather, even though the root still adds its draw
    bad = central_payload_problems(trust_ranks(tmp_path, "central-payload-allreduce"))
    assert any("hands every rank a sum" in p for p in bad) and any("un-noised buffer" in p for p in bad), bad


def secure_payload_problems(recs: list) -> list:
    """What a secure-aggregation job let cross a rank boundary that it must not: a masked collective whose bytes are
    not uniform (a chi-square over the 256 byte values far beyond chance: 400 at 255 degrees of freedom, p ~ 1e-8), a
    float all-reduce of Phi's size (the simulated path), or a received float buffer that carries the un-noised sums."""
    import numpy as np

    problems = []
    width = recs[0]["unnoised"].shape[1]
    unnoised = [u for r in recs for u in r["unnoised"]]
    for r in recs:
        masked = [sent for name, _a, sent, _g in r["calls"] if name == "allreduce_int64"]
        if not masked:
            problems.append(f"rank {r['rank']}: no masked collective")
        for k, sent in enumerate(masked):
            b = np.frombuffer(sent.numpy().astype("<i8").tobytes(), dtype=np.uint8)
            counts = np.bincount(b, minlength=256).astype(float)
            stat = float(((counts - len(b) / 256) ** 2 / (len(b) / 256)).sum())
            if stat > 400:
                problems.append(f"rank {r['rank']}: masked collective {k} is not uniform (chi2 {stat:.0f})")
        for name, _args, sent, got in r["calls"]:
            if name == "allreduce" and sent.dtype == torch.float64 and sent.numel() >= width:
                problems.append(f"rank {r['rank']}: a float all-reduce of Phi's size ({sent.numel()})")
            if got is None or got.dtype != torch.float64:
                continue
            g = got.detach().reshape(-1)
            for t in unnoised:
                u = t.reshape(-1).unique()
                u = u[~torch.isin(u, torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64))]
                if u.numel() and torch.isin(u, g).double().mean() >= 0.5:
                    problems.append(f"rank {r['rank']} received an un-noised buffer in a {name}")
                    break
    return problems


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secure_aggregation_sends_only_masked_integers(tmp_path):
    """The whole pipeline (DP-SGD steps and the class statistics) under secure aggregation on 3 ranks: every
    collective that carries Phi or the statistics is a masked int64 sum whose bytes are uniform; no float all-reduce
    of Phi's size; nothing received carries the un-noised sums. Negative control: the same job without masks."""
    from helpers import MPIEXEC, launch_trust_worker, trust_ranks

    if not MPIEXEC.is_file():
        pytest.skip(f"needs {MPIEXEC}")
    launch_trust_worker(
        tmp_path,
        3,
        [
            "secure-payload=distributed,secure=1,payload=1",
            "secure-payload-nomask=distributed,secure=1,payload=1,sabotage=nomask",
        ],
    )
    recs = trust_ranks(tmp_path, "secure-payload")
    assert [len(p) for p in recs[0]["placement"]] == [2, 3, 2]
    assert secure_payload_problems(recs) == []
    n_masked = [sum(1 for c in r["calls"] if c[0] == "allreduce_int64") for r in recs]
    assert len(set(n_masked)) == 1 and n_masked[0] >= 30  # the 30 steps and the statistics, on every rank
    bad = secure_payload_problems(trust_ranks(tmp_path, "secure-payload-nomask"))
    assert any("is not uniform" in p for p in bad), bad
