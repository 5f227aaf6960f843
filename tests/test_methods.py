"""The method registry (fedhypevae.methods): every entry is accepted by the table config and the sweep, the
entries agree with the baselines and the configs, and a newly registered method runs through the table, the
sweep, the SLURM job and the collector with nothing else changed."""

import csv
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedhypevae.slurm import collect, job, sweep

from fedhypevae import methods
from fedhypevae.baselines import BASELINES
from fedhypevae.config import load_config
from fedhypevae.errors import ConfigError
from fedhypevae.evaluation import score_clients, summarize_clients
from fedhypevae.methods import METHODS, Method
from fedhypevae.table import TableConfig, cell_settings, cell_train_config, run_table

REPO = Path(__file__).resolve().parents[1]


def test_every_registered_method_is_accepted_by_the_table_config_and_the_sweeps_methods(tmp_path):
    names = list(METHODS)
    assert TableConfig(name="all", methods=names).methods == names
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "MPI_", "HYDRA_"))}
    r = subprocess.run(
        [sys.executable, "-m", "fedhypevae.slurm.sweep", "--config", "tiny", "--seeds", "0", "--partitions", "iid"]
        + ["--epsilons", "1,2", "--methods", ",".join(names), "--cluster", "slurm", "--dry-run"]
        + ["--out", str(tmp_path / "s")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    n = sum(2 if m.uses_epsilon else 1 for m in METHODS.values())
    assert f"would submit {n} of {n}" in r.stdout
    for name, m in METHODS.items():
        eps = "eps1" if m.uses_epsilon else "epsnone"
        spec = json.loads((tmp_path / "s" / "points" / f"{name}__iid__{eps}__seed0" / "spec.json").read_text())
        assert spec["method"] == name and spec["ranks"] == 1
        assert all(o in spec["overrides"] for o in m.overrides)
    # the error lists every registered name
    with pytest.raises(ConfigError) as err:
        TableConfig(name="x", methods=["gan"])
    assert all(name in str(err.value) for name in names)


def test_registry_entries_agree_with_the_baselines_and_the_train_config():
    assert list(BASELINES) == methods.baseline_names()
    assert len({m.label for m in METHODS.values()}) == len(METHODS)
    for name, m in METHODS.items():
        assert m.name == name
        if m.trains_fedhypevae:
            cfg = load_config("tiny", list(m.overrides))
            assert cfg.privacy.enabled == (m.privacy != "none")
            if cfg.privacy.enabled:
                assert cfg.privacy.mode == ("strict" if m.privacy == "dp" else "paper")
            assert m.output == "synthetic"
        else:
            assert callable(m.function())
            assert set(m.settings()).isdisjoint({"fed", "seed", "epsilon", "delta", *m.fixed})
            takes = set(inspect.signature(m.function()).parameters)
            assert "seed" in takes and ({"epsilon", "delta"} <= takes if m.uses_epsilon else True)
            with pytest.raises(ConfigError, match="baseline"):
                methods.method_overrides(name)
        assert m.uses_epsilon == m.private  # a private method spends the target epsilon; a non-private one has none
    assert METHODS["fedhypevae-central"].overrides == ("privacy.mode=strict", "privacy.trust_model=central")
    assert not METHODS["fedhypevae-distributed"].in_default_table
    assert "fedhypevae-distributed" not in TableConfig(name="d").methods
    with pytest.raises(ValueError, match="non-private"):
        Method("bad", "Bad", privacy="none", uses_epsilon=True, output="predictions", run="x:y")
    with pytest.raises(ValueError, match="overrides"):
        Method("bad", "Bad", privacy="dp", uses_epsilon=True, output="synthetic")


def test_a_private_baseline_whose_function_takes_no_epsilon_is_refused(monkeypatch):
    m = Method("noeps", "No epsilon", privacy="dp", uses_epsilon=True, output="predictions", run=_majority)
    monkeypatch.setitem(METHODS, m.name, m)
    with pytest.raises(ConfigError, match="takes no epsilon"):
        methods.run_baseline("noeps", None, epsilon=1.0)
    with pytest.raises(ConfigError, match="does not take setting"):
        methods.run_baseline("local", None, max_iter=10)  # one classifier: no per-baseline max_iter
    with pytest.raises(ConfigError, match="FedHypeVAE training"):
        methods.run_baseline("fedhypevae-strict", None)


# a trivial baseline, registered only in the next test: every client predicts its own most frequent train label
def _majority(fed, *, seed: int = 0) -> dict:
    labels = {c.client_id: int(np.bincount(np.asarray(c.y_train)).argmax()) for c in fed.clients}
    rows = score_clients(fed, lambda c, x: np.full(len(x), labels[c.client_id]))
    return {"clients": rows, "summary": summarize_clients(rows), "settings": {"seed": seed}}


def _majority_scores(fed) -> dict:
    out = {}
    for c in fed.clients:
        guess = np.bincount(np.asarray(c.y_train)).argmax()
        y = np.asarray(c.y_test)
        out[c.client_id] = (float(np.mean(y == guess)), float(np.mean([float(k == guess) for k in np.unique(y)])))
    return out


def test_a_registered_method_flows_through_table_sweep_job_and_collect(tmp_path, monkeypatch):
    trivial = Method(
        "majority-test",
        "Majority label (test)",
        privacy="none",
        uses_epsilon=False,
        output="predictions",
        run=_majority,
    )
    monkeypatch.setitem(METHODS, trivial.name, trivial)

    # the table
    tc = TableConfig(
        name="t",
        train_config="tiny",
        partitions=["iid"],
        clients=3,
        min_client_size=20,
        seeds=[0],
        methods=["local", "majority-test"],
    )
    res = run_table(tc, tmp_path / "table", command="test", progress=False)
    assert "| Majority label (test) |" in res["markdown"]
    from fedhypevae.data import build_federation

    cfg = cell_train_config(tc, "iid", 0)
    want = _majority_scores(build_federation(cfg.data, cfg.partition, cfg.seed))
    rows = [r for r in csv.DictReader(open(tmp_path / "table" / "table.csv")) if r["method"] == "majority-test"]
    assert len(rows) == 3
    for r in rows:
        acc, bacc = want[int(r["client"])]
        assert float(r["accuracy"]) == pytest.approx(acc) and float(r["balanced_accuracy"]) == pytest.approx(bacc)
        assert r["epsilon_spent"] == ""

    # the sweep's --methods, its grid, the job and the collector
    out = tmp_path / "sweep"
    args = sweep.build_parser().parse_args(
        ["--config", "tiny", "--seeds", "0", "--partitions", "iid", "--epsilons", "1,2"]
        + ["--methods", "majority-test", "--out", str(out)]
    )
    s = sweep.load_sweep(args)
    points = sweep.build_grid(s)
    assert [(p.id, p.epsilon, p.ranks) for p in points] == [("majority-test__iid__epsnone__seed0", None, 1)]
    sweep.prepare_points(s, points)
    for k in list(os.environ):
        if k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA_", "TORCHELASTIC_")):
            monkeypatch.delenv(k)
    point = out / "points" / points[0].id
    assert job.main([str(point)]) == 0
    result = job.read_json(point / "result.json")
    assert result["status"] == "complete" and result["epsilon_spent"] is None and len(result["rows"]) == 4
    summary = collect.collect(out)
    assert summary["finished"] == 1
    assert "| Majority label (test) | – | 1 |" in (out / "summary.md").read_text()


def test_dpcvae_trains_on_the_engine_strict_and_releases_no_class_statistics(tmp_path):
    """DP-CVAE as FedHypeVAE training without heads: a complete run whose only release is DP-SGD, over every
    parameter it trains; spending budget on class statistics no head would use is refused."""
    from fedhypevae.model import HyperNetwork
    from fedhypevae.run import run_training

    cfg = load_config("tiny", [*METHODS["dpcvae"].overrides, "train.rounds=1", "model.hidden=[16,16,16]"])
    assert not cfg.model.uses_code
    hyper = HyperNetwork.from_config(64, 10, cfg.model)
    assert hyper.h_theta is None and hyper.g_omega is None and hyper.spectral_layers() == []
    res = run_training(cfg, tmp_path / "run", progress=False)
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert out["status"] == "complete" and out["missing"] == []
    assert [m["mechanism"] for m in out["privacy"]["ledger"]] == ["dp-sgd"]
    assert out["privacy"]["mode"] == "strict" and out["privacy"]["formal_guarantee"]
    assert out["stats_release"]["released"] is False and res is not None
    with pytest.raises(ConfigError, match="stats_epsilon_fraction must be 0"):
        load_config("tiny", [*METHODS["dpcvae"].overrides, "privacy.stats_epsilon_fraction=0.1"])


def test_private_overrides_reach_the_private_engine_runs_only():
    """A table's `private_overrides` (the private recipe) apply to FedHypeVAE strict/paper and DP-CVAE, not to the
    non-private ceiling; a method's own settings (DP-CVAE's) still win over them."""
    recipe = ["model.class_anchor=true", "privacy.stats_epsilon_fraction=0.95", "train.lr=0.001"]
    tc = TableConfig(name="p", train_config="paper", private_overrides=recipe)
    strict = cell_train_config(tc, "iid", 0, method="fedhypevae-strict")
    assert strict.model.class_anchor and strict.privacy.stats_epsilon_fraction == 0.95 and strict.train.lr == 0.001
    paper = cell_train_config(tc, "iid", 0, method="fedhypevae-paper")
    assert paper.model.class_anchor and paper.privacy.mode == "paper" and paper.train.lr == 0.001
    ceiling = cell_train_config(tc, "iid", 0, method="fedhypevae-nonprivate")
    assert not ceiling.model.class_anchor and ceiling.train.lr == load_config("paper").train.lr
    cvae = cell_train_config(tc, "iid", 0, method="dpcvae")
    assert not cvae.model.class_anchor and cvae.privacy.stats_epsilon_fraction == 0 and cvae.train.lr == 0.001
    # they are cell settings: a cached table under other private overrides is refused
    assert cell_settings(tc)["private_overrides"] == recipe
