"""`fedhypevae account`, `fedhypevae data ...`, and packaging consistency."""

import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml

from fedhypevae.cli import main
from fedhypevae.config import load_config
from fedhypevae.privacy import Mechanism, epsilon_of
from fedhypevae.run import run_training

REPO = Path(__file__).resolve().parents[1]


def test_account_calibrates_sigma_and_inverts(tmp_path, capsys):
    js = tmp_path / "a.json"
    assert (
        main(
            [
                "account",
                "--epsilon",
                "1",
                "--delta",
                "1e-4",
                "--sample-rate",
                "0.1",
                "--steps",
                "200",
                "--json",
                str(js),
            ]
        )
        == 0
    )
    rows = json.loads(js.read_text())["results"]
    assert {r["accountant"] for r in rows} == {"rdp", "prv"}
    for r in rows:
        eps = epsilon_of([Mechanism("dp-sgd", r["sigma"], 0.1, 200)], delta=1e-4, accountant=r["accountant"])
        assert 0.99 <= eps <= 1.0 + 1e-9
    sigma = rows[0]["sigma"]
    js2 = tmp_path / "b.json"
    assert (
        main(
            [
                "account",
                "--sigma",
                str(sigma),
                "--delta",
                "1e-4",
                "--sample-rate",
                "0.1",
                "--steps",
                "200",
                "--accountant",
                "rdp",
                "--json",
                str(js2),
            ]
        )
        == 0
    )
    assert json.loads(js2.read_text())["results"][0]["epsilon"] == pytest.approx(rows[0]["epsilon"], rel=1e-9)
    out = capsys.readouterr().out
    assert "sigma" in out and "epsilon" in out


def test_account_needs_its_arguments(capsys):
    assert main(["account", "--epsilon", "1"]) == 2
    assert "--sample-rate" in capsys.readouterr().err


def test_account_prints_a_runs_ledger(tmp_path, capsys):
    run_training(load_config("tiny", ["train.rounds=1"]), tmp_path / "run", progress=False)
    capsys.readouterr()
    js = tmp_path / "ledger.json"
    assert main(["account", "--run", str(tmp_path / "run"), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    led = json.loads(js.read_text())
    # clients with the same history are one group (here all 4)
    assert sorted(c for g in led["groups"] for c in g["clients"]) == [0, 1, 2, 3]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    plan = {m["name"]: m for m in results["privacy"]["plan"]["mechanisms"]}
    for info in led["groups"]:
        assert info["epsilon"] == pytest.approx(results["privacy"]["epsilon_spent"], rel=1e-9)
        rows = {m["mechanism"]: m for m in info["mechanisms"]}
        # every mechanism: its sigma, q, steps and the epsilon it contributes (alone, and added to the rest)
        assert set(rows) == {"dp-sgd", "class-stats", "mmd-embeddings"}
        for name, m in rows.items():
            assert m["sigma"] == pytest.approx(plan[name]["noise_multiplier"], rel=1e-12)
            assert m["q"] == plan[name]["sample_rate"] and m["steps"] == plan[name]["steps"]
            assert 0 < m["epsilon_marginal"] <= m["epsilon_alone"] + 1e-12
            line = next(line for line in out.splitlines() if line.strip().startswith(name))
            for value in (f"{m['sigma']:.4f}", f"{m['epsilon_alone']:.4f}", f"{m['epsilon_marginal']:.4f}"):
                assert value in line, (value, line)
        alone = sum(m["epsilon_alone"] for m in rows.values())
        added = sum(m["epsilon_marginal"] for m in rows.values())
        assert added <= info["epsilon"] <= alone  # composition is sub-additive
    assert "target epsilon 2" in out and "planned epsilon" in out


def test_account_of_an_interrupted_run_shows_what_is_still_planned(tmp_path, capsys):
    """No results.json yet: the plan comes from the checkpoint, the unreleased statistics are listed."""
    from fedhypevae.trainer import Trainer

    tr = Trainer(load_config("tiny"), tmp_path / "run", progress=False)
    tr.setup()
    tr.run_round(0)
    tr.state.round = 1
    tr.save_checkpoint()
    capsys.readouterr()
    assert main(["account", "--run", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "planned, not released (yet): class-stats" in out
    assert f"sigma={tr.plan.sigma:.4f} over 6 steps" in out
    dp = next(line for line in out.splitlines() if line.strip().startswith("dp-sgd"))
    assert dp.split()[3] == "2"  # 2 of the 6 planned steps were released


def test_data_inspect_and_partition(tmp_path, capsys, shared_data):
    js = tmp_path / "info.json"
    assert main(["data", "inspect", str(shared_data / "medmnist" / "pneumoniamnist.npz"), "--json", str(js)]) == 0
    info = json.loads(js.read_text())
    assert info["dim"] == 784 and info["classes"] == 2
    out = tmp_path / "shards"
    assert (
        main(
            [
                "data",
                "partition",
                str(shared_data / "ham10000" / "hmnist_8_8_L.csv"),
                "--metadata",
                str(shared_data / "ham10000" / "HAM10000_metadata.csv"),
                "--group-column",
                "lesion_id",
                "--clients",
                "5",
                "--alpha",
                "0.3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clients"] == 5 and manifest["files"] == ["clients_00000.npz"]  # one block of clients
    assert [p.name for p in out.glob("*.npz")] == manifest["files"]


def test_data_partition_rejects_too_many_clients(tmp_path, capsys):
    assert main(["data", "partition", "breast_cancer", "--clients", "1000", "--out", str(tmp_path / "s")]) == 2
    assert "client" in capsys.readouterr().err.lower()


def _names(reqs):
    return {re.split(r"[<>=!~ \[]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_environment_yml_is_consistent_with_pyproject():
    py = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    conda = [d for d in env if isinstance(d, str)]
    pip = next(d["pip"] for d in env if isinstance(d, dict))
    conda_names = _names(conda) | _names(p for p in pip if not p.startswith("-e"))
    conda_names = {"torch" if n == "pytorch" else n for n in conda_names}
    wanted = (
        _names(py["dependencies"])
        | _names(py["optional-dependencies"]["test"])
        | _names(py["optional-dependencies"]["mpi"])
    )
    assert wanted <= conda_names, f"missing from environment.yml: {sorted(wanted - conda_names)}"
    assert any(p.startswith("-e") for p in pip), "environment.yml must install the project itself"


def test_console_script_is_declared():
    py = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert py["scripts"]["fedhypevae"] == "fedhypevae.cli:main"


def test_evaluate_command_prints_scores_and_quality(tmp_path, capsys):
    run_training(load_config("tiny", ["train.rounds=1"]), tmp_path / "run", progress=False)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "balanced accuracy" in out and "C2ST" in out and "coverage" in out
    assert (tmp_path / "run" / "evaluation.json").is_file()
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(tmp_path / "run"),
                "--protocol",
                "lambda-mix",
                "--no-quality",
                "--json",
                str(tmp_path / "lm.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "lm.json").read_text())["protocol"] == "lambda-mix"
