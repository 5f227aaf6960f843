"""Trust models (privacy.trust_model: local | distributed | central; fedhypevae/privacy/trust.py).

* the noise actually in the aggregate every replica applies has the variance each model claims, measured over the
  trainer's own steps (30 draws of ~6.9k coordinates, privacy.noise_seed) on 1 process and on real `mpiexec -n 2`
  and `-n 3` jobs with uneven placement (7 clients); a client that skips its share, and a central aggregator that
  skips its draw, are caught at M = 7;
* distributed: the shares unknown to the worst coalition of t parties (ranks) carry sigma at the largest
  per-record sensitivity; central: no client adds Phi noise, the aggregator's draw is the only aggregate noise
  (regenerated from its key) and every replica applies the same value;
* the ledger charges the plan's sigma in every model, and less when the placed noise gives less;
* the refusals: delta aggregation, a coalition that leaves fewer than one unknown share, party = rank on one rank;
* the class statistics follow the model; the DP-MERF embeddings keep full local noise in every model; paper mode
  is never a formal guarantee; results.json states the guarantee per model;
* the sensitivity check and the white-box audit (scored on the aggregate in distributed and central, sabotages
  no-shares and share-over-m) in each model.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import MPIEXEC, launch_trust_worker, trust_ranks

from fedhypevae.audit import run_audit
from fedhypevae.config import load_config
from fedhypevae.errors import ConfigError
from fedhypevae.privacy.sensitivity import Unclipped, check_sensitivity
from fedhypevae.privacy.trust import AGGREGATOR_ID, Federation, make_trust_model
from fedhypevae.rng import STREAM_STEP, ClientRNG
from fedhypevae.run import run_training
from fedhypevae.trainer import Trainer

LOCAL_STEPS = 2  # the worker's train.local_steps
TOL = 0.03  # relative tolerance of a measured variance: ~10 standard errors at 30 x 6864 draws; a skipped share is 1/7


# ------------------------------------------------------------------------------------------ what each model claims


def coefs(rec) -> list:
    """a_i = w_i / (q n~_i): each client's coefficient in the aggregate, from the public facts the run recorded."""
    n, q = rec["declared"], rec["sample_rate"]
    w = [ni / sum(n) if rec["weights"] == "declared" else 1.0 / len(n) for ni in n]
    return [wi / (q * ni) for wi, ni in zip(w, n)]


def claimed(rec, trust: str) -> dict:
    """The issue's formulas, written out here independently of fedhypevae/privacy/trust.py: the variance per
    coordinate of the aggregate's noise, and what the adversary must face (sigma at the largest sensitivity)."""
    a, sigma, C = coefs(rec), rec["sigma"], rec["clip"]
    a2 = [x * x for x in a]
    # secure aggregation: sensitivity and noise both (Delta2 / A)^2 times the Gaussian's (the rounding's sqrt(d))
    need = (sigma * max(a) * C) ** 2 * rec.get("secure_scale", 1.0)
    if trust == "local":
        return {"total": sigma**2 * C**2 * sum(a2), "need": need}
    if trust == "central":
        return {"total": need, "need": need}
    parties = [[i] for i in range(len(a))] if rec["party"] == "client" else rec["placement"]
    known = sum(sorted((sum(a2[i] for i in p) for p in parties), reverse=True)[: rec["collusion"]])
    share2 = sigma**2 * max(a2) / (sum(a2) - known)  # s^2: the unknown shares sum to exactly `need`
    return {"total": share2 * C**2 * sum(a2) * rec.get("secure_scale", 1.0), "need": need, "share2": share2}


def noise_problems(recs: list, trust: str, tol: float = TOL) -> list:
    """What is wrong with the noise in the aggregate of this run (empty: each model's claim holds as measured)."""
    problems = []
    applied = recs[0]["applied"]
    for r in recs[1:]:
        if not torch.equal(r["applied"], applied):
            problems.append(f"rank {r['rank']} applied another aggregate than rank 0")
    noise = applied - sum(r["unnoised"] for r in recs)  # what the replicas applied minus the un-noised sum
    want = claimed(recs[0], trust)
    got = float(noise.pow(2).mean())
    if abs(got / want["total"] - 1) > tol:
        problems.append(
            f"aggregate noise variance {got:.4g}, claimed {want['total']:.4g} (ratio {got / want['total']:.4f})"
        )
    partial = [r["sent"] - r["unnoised"] for r in recs]  # each rank's own noise in what it sent
    a = coefs(recs[0])
    sigma, C = recs[0]["sigma"], recs[0]["clip"]
    if trust == "local":  # every client's release carries sigma at its own sensitivity
        for r, p in zip(recs, partial):
            mine = sigma**2 * C**2 * sum(a[i] ** 2 for i in r["placement"][r["rank"]])
            if abs(float(p.pow(2).mean()) / mine - 1) > tol:
                problems.append(
                    f"rank {r['rank']}: its clients' releases carry {float(p.pow(2).mean()):.4g}, not {mine:.4g}"
                )
    if trust == "distributed" and recs[0]["party"] == "rank":  # the worst coalition of t ranks pools its shares
        worst = sorted(range(len(recs)), key=lambda k: -float(partial[k].pow(2).mean()))[: recs[0]["collusion"]]
        unknown = noise - sum(partial[k] for k in worst)
        if float(unknown.pow(2).mean()) < want["need"] * (1 - tol):
            problems.append(
                f"the shares unknown to ranks {worst} carry {float(unknown.pow(2).mean()):.4g} < "
                f"{want['need']:.4g} (sigma at the largest sensitivity)"
            )
    if trust == "central":
        for r, p in zip(recs, partial):
            if float(p.abs().max()) != 0.0:
                problems.append(f"rank {r['rank']} sent Phi noise (central: the aggregator's draw is the only one)")
        rng = ClientRNG(AGGREGATOR_ID, recs[0]["noise_seed"])
        draws = torch.stack(
            [
                torch.randn(
                    noise.shape[1], generator=rng.generator(STREAM_STEP, *divmod(k, LOCAL_STEPS)), dtype=torch.float64
                )
                for k in range(noise.shape[0])
            ]
        )
        draws *= sigma * max(a) * C
        if not torch.allclose(noise, draws, rtol=0, atol=1e-9):
            problems.append("the aggregate's noise is not the aggregator's draw from its key")
    return problems


# ------------------------------------------------------------------------------------------ 1, 2 and 3 ranks

SCENARIOS = {
    1: [
        "local=local",
        "distributed=distributed",
        "distributed-uniform=distributed,weights=uniform",
        "central=central",
        "local-skip=local,sabotage=skip-share",
        "distributed-skip=distributed,sabotage=skip-share",
        "distributed-secure=distributed,secure=1",
    ],
    2: [
        "local=local",
        "distributed=distributed",
        "distributed-rank=distributed,party=rank",
        "central=central",
        "distributed-secure=distributed,secure=1",
    ],
    3: [
        "local=local",
        "distributed=distributed",
        "distributed-rank=distributed,party=rank",
        "distributed-uniform=distributed,weights=uniform",
        "central=central",
        "local-skip=local,sabotage=skip-share",
        "distributed-skip=distributed,sabotage=skip-share",
        "distributed-rank-skip=distributed,party=rank,sabotage=skip-share",
        "central-nodraw=central,sabotage=no-draw",
        "distributed-secure=distributed,secure=1",
        "distributed-rank-secure=distributed,party=rank,secure=1",
    ],
}


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["1rank", "mpi2", "mpi3"])
def job(request, tmp_path_factory):
    n = request.param
    if n > 1 and not MPIEXEC.is_file():
        pytest.skip(f"needs {MPIEXEC} (pip install -e '.[mpi]')")
    out = tmp_path_factory.mktemp(f"trust{n}")
    launch_trust_worker(out, n, SCENARIOS[n])
    JOBS[n] = out
    return n, out


JOBS: dict = {}  # world size -> the worker's output (the 1-process job is the reference of the others)


def _trust(name: str) -> str:
    return name.split("-")[0]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_noise_in_the_aggregate_has_the_claimed_variance(job):
    n, out = job
    for spec in SCENARIOS[n]:
        name = spec.split("=")[0]
        if "skip" in name or "nodraw" in name:
            continue
        recs = trust_ranks(out, name)
        assert recs[0]["world_size"] == n
        if n > 1:  # uneven placement: the ranks host different numbers of clients
            assert len({len(p) for p in recs[0]["placement"]}) > 1, recs[0]["placement"]
        assert noise_problems(recs, _trust(name)) == [], name
        # the ledger charged the plan's sigma: the aggregate's mechanism is the same sampled Gaussian
        assert recs[0]["charged"] == [recs[0]["sigma"]], name


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_skipped_share_or_draw_is_caught(job):
    n, out = job
    sabotaged = [s.split("=")[0] for s in SCENARIOS[n] if "skip" in s or "nodraw" in s]
    if not sabotaged:
        pytest.skip("no sabotage scenario at this world size")
    for name in sabotaged:
        recs = trust_ranks(out, name)
        assert len(recs[0]["declared"]) <= 10
        problems = noise_problems(recs, _trust(name))
        assert any("aggregate noise variance" in p for p in problems), (name, problems)
        # the sabotage is in the noise stage only: the ledger was charged the plan all the same
        assert recs[0]["charged"] == [recs[0]["sigma"]], name


# ------------------------------------------------------------------------------------------ the model's arithmetic


def test_shares_are_calibrated_to_the_unknown_clients_and_charged_as_sigma():
    a = 0.01
    fed = Federation(coefs=(a,) * 7, placement=((0, 1, 2), (3, 4), (5, 6)))
    d = make_trust_model("distributed").bind(fed, world_size=3)
    assert d.noise_multipliers(2.0) == {"private": 2.0, "phi": pytest.approx(2.0 / math.sqrt(6))}
    assert d.charged_multiplier(d.noise_multipliers(2.0), 2.0, strict=True) == 2.0
    # a smaller share is charged for what it gives: sigma / 2 on Phi
    assert d.charged_multiplier({"private": 2.0, "phi": 1.0 / math.sqrt(6)}, 2.0, strict=True) == pytest.approx(1.0)
    r = make_trust_model("distributed", party="rank", collusion=2).bind(fed, world_size=3)
    assert r.coalition_clients == 5 and r.noise_multipliers(1.0)["phi"] == pytest.approx(1 / math.sqrt(2))
    c = make_trust_model("central").bind(fed, world_size=3)
    assert c.noise_multipliers(2.0) == {"private": 2.0, "phi": 0.0} and c.aggregate_multiplier(2.0) == 2.0
    assert c.charged_multiplier(c.noise_multipliers(2.0), 2.0, strict=True) == 2.0
    loc = make_trust_model("local").bind(fed, world_size=3)
    assert loc.aggregate_std(1.0, 1.0) == pytest.approx(a * math.sqrt(7))
    # uniform weights: coefficients differ; the unknown shares (worst client known) carry sigma at the largest
    u = make_trust_model("distributed").bind(Federation(coefs=(1.0, 2.0, 4.0), placement=((0, 1, 2),)), world_size=1)
    s = u.noise_multipliers(1.0)["phi"]
    assert s**2 * (1 + 4) == pytest.approx(16.0)  # the client with a = 4 known: 1^2 + 2^2 unknown


def test_the_statistics_shares_follow_each_domain():
    fed = Federation(coefs=(1.0,) * 6, placement=((0, 1, 2, 3, 4, 5),), codes=2)  # domains {0,1,2}, {3,4,5}
    d = make_trust_model("distributed").bind(fed, world_size=1)
    assert [d.stats_multiplier(3.0, i) for i in range(6)] == [pytest.approx(3.0 / math.sqrt(2))] * 6
    assert make_trust_model("central").bind(fed, world_size=1).stats_multiplier(3.0, 0) == 0.0
    assert make_trust_model("local").bind(fed, world_size=1).stats_multiplier(3.0, 0) == 3.0


# ------------------------------------------------------------------------------------------ refusals


def tiny(*overrides):
    return load_config(
        "tiny", ["train.checkpoint_every=0", "privacy.noise_seed=5", "train.rounds=2", "threads=1", *overrides]
    )


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (
            ["federation.aggregation=delta", "privacy.trust_model=distributed"],
            ["privacy.trust_model=distributed", "grad", "no longer one Gaussian mechanism"],
        ),
        (["federation.aggregation=delta", "privacy.trust_model=central"], ["privacy.trust_model=central", "delta"]),
        (["privacy.trust_model=local", "privacy.collusion=2"], ["privacy.collusion", "distributed only"]),
        (["privacy.trust_model=central", "privacy.party=rank"], ["privacy.party", "distributed only"]),
        (["privacy.trust_model=distributed", "privacy.collusion=0"], ["privacy.collusion", ">= 1"]),
        (["privacy.trust_model=trusted"], ["privacy.trust_model", "local, distributed, central"]),
        (["privacy.trust_model=distributed", "privacy.party=site"], ["privacy.party", "client, rank"]),
    ],
    ids=[
        "delta-distributed",
        "delta-central",
        "collusion-local",
        "party-central",
        "collusion-0",
        "unknown",
        "party-unknown",
    ],
)
def test_bad_trust_settings_are_refused_with_one_line(overrides, needles):
    with pytest.raises(ConfigError) as exc:
        tiny(*overrides)
    msg = str(exc.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (
            ["privacy.trust_model=distributed", "privacy.collusion=4"],
            ["privacy.collusion=4", "4 of the 4", "fewer than one share unknown"],
        ),
        (["privacy.trust_model=distributed", "privacy.party=rank"], ["privacy.party=rank", "at least 2 ranks"]),
        (
            ["privacy.trust_model=distributed", "meta.codes=4"],
            ["meta.codes=4", "domain 0", "no share would be unknown"],
        ),
    ],
    ids=["collusion-all", "rank-on-one-rank", "one-client-domains"],
)
def test_refusals_that_need_the_placement_come_before_anything_is_written(tmp_path, overrides, needles):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as exc:
        Trainer(tiny(*overrides), out, progress=False).setup()
    msg = str(exc.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert not out.exists() or not any(out.rglob("*.jsonl")), "a refused run must leave no ledger"


def test_the_trainer_refuses_a_rule_changed_after_the_config_was_checked(tmp_path):
    cfg = tiny("privacy.trust_model=central")
    cfg.federation.aggregation = "delta"
    with pytest.raises(ConfigError, match="no longer one Gaussian mechanism"):
        Trainer(cfg, tmp_path / "r", progress=False)


# ------------------------------------------------------------------------------------------ outputs and releases


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny pipeline (7 clients, MMD term on: DP-MERF embeddings released) in each model and both modes."""
    out = {}
    for trust in ("local", "distributed", "central"):
        for mode in ("strict", "paper"):
            cfg = tiny(
                "partition.clients=7",
                "partition.min_client_size=10",
                f"privacy.trust_model={trust}",
                f"privacy.mode={mode}",
                "model.lambda_mmd=1",
                "privacy.mmd_epsilon_fraction=0.1",
            )
            d = tmp_path_factory.mktemp(f"{trust}-{mode}") / "run"
            out[trust, mode] = (run_training(cfg, d, progress=False), cfg, d)
    return out


def test_results_state_each_models_guarantee_and_paper_mode_is_never_formal(trained):
    for (trust, mode), (res, _cfg, _) in trained.items():
        p = res["privacy"]
        tm = p["trust_model"]
        assert tm["name"] == trust and tm["protected_against"] and tm["not_protected_against"]
        assert f"Trust model {trust}" in p["guarantee"]
        assert tm["simulated"] is (trust == "distributed")
        if trust == "distributed":
            assert "SIMULATES secure aggregation" in tm["not_protected_against"] and "SIMULATED" in p["guarantee"]
        if trust == "central":
            assert (
                "rank 0" in tm["not_protected_against"] and tm["aggregator_noise_multiplier"] == p["noise_multiplier"]
            )
        assert p["formal_guarantee"] is (mode == "strict")
        if mode == "paper":
            assert p["guarantee"].startswith("NOT a formal guarantee") and "whatever the trust model" in p["guarantee"]
        # the same epsilon in every model: the aggregate's mechanism is the same sampled Gaussian
        assert p["epsilon_spent"] == trained["local", mode][0]["privacy"]["epsilon_spent"]


def test_the_mmd_embeddings_keep_full_local_noise_in_every_model(trained):
    """Each client's DP-MERF embeddings are released once, to its own loss: the same noisy values (same noise key)
    in every trust model, charged at the plan's sigma."""
    targets = {}
    for trust in ("local", "distributed", "central"):
        _, cfg, d = trained[trust, "strict"]
        tr = Trainer(copy.deepcopy(cfg), d, resume=True, progress=False)
        tr.setup()
        targets[trust] = torch.stack([c.mmd_target for c in tr.clients])
        sig = {m.noise_multiplier for _, h in tr.ledger.histories() for m in h if m.name == "mmd-embeddings"}
        assert sig == {tr.plan.noise_multiplier("mmd-embeddings")}
        tr.ledger.close()
        tr.writer.close()
    assert torch.equal(targets["local"], targets["distributed"]) and torch.equal(targets["local"], targets["central"])


class _StatsRecorder:
    """Records the buffer the class statistics' reduce hands back (what every rank fits the meta-code to)."""

    def __init__(self, trust):
        self.trust, self.out = trust, None

    def __getattr__(self, name):
        return getattr(self.trust, name)

    def reduce_stats(self, tr, buf, noise, *scales):
        res = self.trust.reduce_stats(tr, buf, noise, *scales)
        self.out = res.clone()
        return res


@pytest.mark.parametrize("split", [None, [0.8, 0.2]])
@pytest.mark.parametrize("trust", ["local", "distributed", "central", "secure"])
def test_the_class_statistics_follow_the_trust_model(tmp_path, trust, split):
    """The released per-domain sums minus the un-noised ones: local, each of the 7 clients' full noise (variance
    7 sigma_s^2 per sensitivity unit); distributed, shares of 1/6 of it whose unknown part carries sigma_s^2 (total
    7/6); central, the aggregator's one draw (1); secure (distributed with secure aggregation), the integer shares:
    7/6 times (Delta2/A)^2 = 1.0201 for the rounding. One release of ~650 coordinates: the three are 6x apart.
    With privacy.stats_split (and a stats_center) the unit of component k is Delta_k / sqrt(m w_k) on every path."""
    from fedhypevae.privacy import CLASS_STATS, class_stat_sums
    from fedhypevae.privacy.stats import component_units
    from fedhypevae.run import _flatten, release_statistics

    extra = [] if split is None else [f"privacy.stats_split=[{split[0]},{split[1]}]", "privacy.stats_center=0.3"]
    cfg = tiny(
        "partition.clients=7",
        "partition.min_client_size=10",
        f"privacy.trust_model={'distributed' if trust == 'secure' else trust}",
        f"privacy.secure_aggregation={'true' if trust == 'secure' else 'false'}",
        "model.lambda_mmd=0",
        "stats.covariance=none",
        *extra,
    )
    tr = Trainer(cfg, tmp_path / "r", progress=False)
    tr.setup()
    rec = _StatsRecorder(tr.trust)
    tr.trust = rec
    clip = tr.stats_clip
    release_statistics(tr, clip)
    K = tr.fed.num_classes
    center = cfg.privacy.stats_center
    raw = sum(
        _flatten(class_stat_sums(c.x, c.y, num_classes=K, clip_norm=clip, covariance="none", center=center))[0]
        for c in tr.clients
    )
    noise = (rec.out.view(-1) - raw).clone()
    # in units of each component (equal shares: its sensitivity, "count" 1, "sum" C_x), keys sorted: count, sum
    unit = component_units(clip, "none", split)
    noise[:K] /= unit["count"]
    noise[K:] /= unit["sum"]
    sigma = tr.plan.noise_multiplier(CLASS_STATS) * math.sqrt(2)  # two components: sigma sqrt(m) per unit
    want = {"local": 7.0, "distributed": 7.0 / 6.0, "central": 1.0, "secure": 7.0 / 6.0 * 1.01**2}[trust]
    ratio = float(noise[K:].pow(2).mean()) / sigma**2  # the sums: ~640 coordinates
    assert abs(ratio / want - 1) < 0.25, (trust, ratio)
    counts = float(noise[:K].pow(2).mean()) / sigma**2  # 10 coordinates: the order of magnitude
    assert 0.2 < counts / want < 3.0, (trust, counts)
    tr.ledger.close()
    tr.writer.close()


# ------------------------------------------------------------------------------------------ the checks, per model


@pytest.mark.parametrize("trust", ["local", "distributed", "central"])
def test_the_sensitivity_check_runs_in_each_model(tmp_path, trust):
    cfg = tiny("train.rounds=1", "partition.clients=5", f"privacy.trust_model={trust}")
    run_training(cfg, tmp_path / "run", progress=False)
    tr = Trainer(copy.deepcopy(cfg), tmp_path / "run", resume=True, progress=False)
    tr.setup()
    c = tr.clients[0]
    rep = check_sensitivity(tr, c.id, remove=[0, 7, 42], steps=6, seed=1)
    assert rep.trust_model == trust and rep.ok and rep.others_moved <= rep.others_bound, rep.to_dict()
    assert rep.replay_drift == 0.0  # central: the aggregator's draw is the same in both passes
    assert max(r.payload_diff for r in rep.rows) > 0.5 * cfg.privacy.clip_norm
    bad = check_sensitivity(tr, c.id, remove=[0, 7, 42], steps=6, seed=1, control=Unclipped)
    assert not bad.ok and bad.max_payload_diff > cfg.privacy.clip_norm
    tr.ledger.close()
    tr.writer.close()


AUDIT_CLIENTS = {"local": 10, "distributed": 16, "central": 10, "secure": 16}


def _audit(tmp_path, trust, sabotage):
    model = "distributed" if trust == "secure" else trust
    sets = [f"partition.clients={AUDIT_CLIENTS[trust]}", f"privacy.trust_model={model}"]
    sets += ["privacy.secure_aggregation=true"] if trust == "secure" else []
    return run_audit(load_config("audit", sets), tmp_path / f"{trust}-{sabotage}", sabotage=sabotage, progress=False)[
        "audit"
    ]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("trust", ["distributed", "central", "secure"])
def test_the_white_box_audit_sees_the_aggregates_noise(tmp_path, trust):
    """Scored on the aggregate (minus the colluders' shares): the correct run stays below its claim; no shares at
    all and shares of sigma C / M (the aggregator's draw, in central) are caught."""
    ok = _audit(tmp_path, trust, "none")
    assert ok["trust_model"] == ("distributed" if trust == "secure" else trust)
    assert ok["scored_on"].startswith("the aggregate")
    assert len(ok["colluders"]) == (0 if trust == "central" else 1) and 0 not in ok["colluders"]
    assert ok["power_ok"] and not ok["violation"], ok["verdict"]
    for sabotage in ("no-shares", "share-over-m"):
        a = _audit(tmp_path, trust, sabotage)
        assert a["ledger_epsilon"] <= a["claimed_epsilon"] + 1e-9  # charged as planned: the sabotage is the noise
        assert a["violation"] and a["epsilon_lower_bound"] > a["claimed_epsilon"], (sabotage, a["verdict"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_local_audit_catches_shares_of_sigma_over_m(tmp_path):
    a = _audit(tmp_path, "local", "share-over-m")
    assert a["scored_on"] == "the audited client's own release"
    assert a["violation"], a["verdict"]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_aggregate_does_not_depend_on_the_world_size(job):
    """Noise keyed by (client, round, step) and, central, the aggregator's by (round, step): 2 and 3 ranks apply
    the aggregates 1 process applies, up to float summation order."""
    n, out = job
    if n == 1 or 1 not in JOBS:
        pytest.skip("compared with the 1-process job")
    for name in ("local", "distributed", "central"):
        a, b = trust_ranks(JOBS[1], name)[0]["applied"], trust_ranks(out, name)[0]["applied"]
        assert float((a - b).abs().max() / a.abs().max()) < 1e-5, name
