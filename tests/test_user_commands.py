"""The commands a new user reaches for: --version, python -m fedhypevae, help on every flag, config show,
train twice into the same directory, generate, the run's log file, the Python API."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedhypevae.cli import _Formatter, build_parser

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "fedhypevae", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def _parsers(parser, name="fedhypevae"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_version_and_python_m():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fedhypevae {metadata.version('fedhypevae-hpc')}", r
    h = _cli("--help")
    assert h.returncode == 0 and "generate" in h.stdout and "config" in h.stdout and "Exit statuses" in h.stdout


def test_every_flag_has_help_and_shows_its_default():
    checked = 0
    for name, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            assert action.help and len(action.help) > 8, f"{name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, [], argparse.SUPPRESS):
                shown = f"(default: {action.default})"
                assert shown in text, f"{name} {action.option_strings[0]}: {shown} missing from its help"
                checked += 1
    assert checked >= 20, checked
    assert "(default: None)" not in " ".join(
        _Formatter("x")._get_help_string(a) for _, p in _parsers(build_parser()) for a in p._actions
    )


def test_usage_errors_are_one_line_naming_the_flag():
    r = _cli("data", "partition", "digits", "--clients", "zero", "--out", "x")
    assert r.returncode == 2
    first = r.stderr.splitlines()[0]
    assert first.startswith("fedhypevae data partition: error: argument --clients: must be an integer; got 'zero'")


def test_config_show_prints_the_plan_train_uses_and_writes_nothing(tmp_path):
    from fedhypevae.config import load_config
    from fedhypevae.trainer import make_plan

    r = _cli("config", "show", "--config", "tiny", "--set", "privacy.target_epsilon=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []
    plan = make_plan(load_config("tiny", ["privacy.target_epsilon=3"]), use_mmd=True)
    sigma = float(re.search(r"DP-SGD\s+: sigma ([0-9.]+)", r.stdout).group(1))
    assert sigma == pytest.approx(plan.sigma, abs=1e-4)
    assert "target_epsilon: 3.0" in r.stdout and "6 steps (3 rounds x 2 local steps)" in r.stdout
    shares = re.findall(r"^\s+(dp-sgd|class-stats|mmd-embeddings)\s+(\d+) %", r.stdout, re.M)
    assert dict(shares) == {"dp-sgd": "80", "class-stats": "10", "mmd-embeddings": "10"}
    assert "64 features" in r.stdout  # the data was loaded and checked


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run, trained through the command line."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = _cli("train", "--config", "tiny", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_train_twice_prints_the_finished_run_and_never_trains_again(finished):
    before = _snapshot(finished)
    r = _cli("train", "--config", "tiny", "--out", str(finished), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "FedHypeVAE run finished" in r.stdout and "epsilon spent" in r.stdout
    assert "already holds this finished run" in r.stdout and "choose another --out" in r.stdout
    assert _snapshot(finished) == before  # nothing trained, nothing released, nothing rewritten
    other = _cli("train", "--config", "tiny", "--set", "privacy.target_epsilon=4", "--out", str(finished))
    assert other.returncode == 2
    assert re.search(
        r"--out .* holds a finished run with other settings: privacy\.target_epsilon \(2\.0 -> 4\.0\)",
        other.stderr.splitlines()[0],
    ), other.stderr
    assert _snapshot(finished) == before


def test_makefile_run_is_the_train_command():
    text = (REPO / "Makefile").read_text()
    assert re.search(
        r"^run: setup\n\t\.venv/bin/fedhypevae train --config configs/default\.yaml --out \$\(OUT\)", text, re.M
    ), text


@pytest.mark.slow
def test_run_log_records_the_run(finished):
    log = (finished / "run.log").read_text()
    assert re.search(r"INFO fedhypevae\.run: started .*4 clients on 1 rank", log), log
    assert re.search(r"round 3: ", log) and "class statistics released" in log and "run complete" in log


@pytest.mark.slow
def test_generator_json_holds_public_metadata_only(finished):
    meta = json.loads((finished / "generator.json").read_text())
    assert set(meta) == {
        "format",
        "dim",
        "num_classes",
        "model",
        "transform",
        "value_range",
        "value_range_is",
        "class_balance",
        "dp_class_counts",
        "output_noise",
        "meta_code_fitted",
        "files",
    }
    assert meta["value_range"] == [0.0, 16.0]  # what the digits format declares, not what the data holds
    assert meta["dp_class_counts"] is None  # balanced classes: no released count is needed
    res = json.loads((finished / "results.json").read_text())
    assert res["synthetic"]["in_input_units"] is True and "[0, 16]" in res["synthetic"]["units"]


@pytest.mark.slow
@pytest.mark.parametrize("ext", [".npz", ".csv", ".parquet"])
def test_generate_writes_every_format(finished, tmp_path, ext):
    out = tmp_path / f"more{ext}"
    r = _cli("generate", "--run", str(finished), "--samples", "25", "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "input data's units" in r.stdout and "no epsilon spent" in r.stdout
    if ext == ".npz":
        with np.load(out) as z:
            x, y = z["x"], z["y"]
    else:
        df = pd.read_csv(out) if ext == ".csv" else pd.read_parquet(out)
        assert list(df.columns) == [f"x{i}" for i in range(64)] + ["label"]
        x, y = df.drop(columns="label").to_numpy(), df["label"].to_numpy()
    assert x.shape == (25, 64) and np.isfinite(x).all()
    assert np.bincount(y, minlength=10).tolist() == [3] * 5 + [2] * 5  # 25 over 10 classes
    assert not [p for p in tmp_path.iterdir() if p.name != out.name]  # no temporary file left


@pytest.mark.slow
def test_generate_is_the_runs_generator(finished):
    """The rebuilt Phi draws what the run itself would: same meta-code, same model, same draws for one seed."""
    import torch

    from fedhypevae import generate
    from fedhypevae.config import load_config
    from fedhypevae.data import invert_transform
    from fedhypevae.metacode import generate as draw
    from fedhypevae.model import HyperNetwork
    from fedhypevae.rng import SeedTag, public_generator

    x, y, info = generate(finished, 20, seed=5)
    x2, y2, _ = generate(finished, 20, seed=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    cfg = load_config(str(finished / "config.yaml"))
    hyper = HyperNetwork.from_config(64, 10, cfg.model)
    hyper.load_state_dict(torch.load(finished / "hypernetwork.pt", weights_only=True))
    mc = torch.load(finished / "meta_codes.pt", weights_only=True)
    xr, yr = draw(
        hyper, mc["codes"], mc["weights"], [2] * 10, output_noise=False, generator=public_generator(5, SeedTag.GENERATE)
    )
    assert np.allclose(x, invert_transform(xr.numpy(), "range", (0.0, 16.0)), atol=1e-5)
    assert np.array_equal(y, yr.numpy())
    x3, _, _ = generate(finished, 20, seed=6)
    assert not np.allclose(x, x3)


@pytest.mark.slow
def test_l2_runs_say_their_output_is_in_model_units(tmp_path):
    out = tmp_path / "l2"
    r = _cli(
        "train",
        "--config",
        "tiny",
        "--set",
        "data.transform=l2",
        "--set",
        "train.rounds=1",
        "--out",
        str(out),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["synthetic"]["in_input_units"] is False and "model units" in res["synthetic"]["units"]
    assert "model units" in r.stdout
    g = _cli("generate", "--run", str(out), "--samples", "10", "--out", str(tmp_path / "s.npz"))
    assert g.returncode == 0 and "model units" in g.stdout, g.stderr


@pytest.mark.slow
def test_python_api(finished, tmp_path):
    import fedhypevae

    cfg = fedhypevae.load_config("tiny", ["train.rounds=1"])
    assert cfg.train.rounds == 1
    res = fedhypevae.train(cfg, out=tmp_path / "api", progress=False)
    assert res["status"] == "complete" and (tmp_path / "api" / "synthetic.npz").is_file()
    again = fedhypevae.train(cfg, out=tmp_path / "api", progress=False)  # finished: returned, not trained again
    assert again["privacy"]["epsilon_spent"] == res["privacy"]["epsilon_spent"]
    x, y, info = fedhypevae.generate(tmp_path / "api", 12, out=tmp_path / "s.parquet")
    assert x.shape == (12, 64) and Path(info["path"]).is_file()
    scores = fedhypevae.evaluate(finished, protocol="local", quality=False, json_path=tmp_path / "e.json")
    assert 0 <= scores["summary"]["balanced_accuracy"]["mean"] <= 1 and (tmp_path / "e.json").is_file()
    from fedhypevae.errors import FedHypeVAEError

    with pytest.raises(FedHypeVAEError, match="privacy.noise_seed must be an integer or null; got True"):
        fedhypevae.load_config("tiny", ["privacy.noise_seed=true"])


def test_table_text_one_seed_has_no_plus_minus_and_verdicts_read_as_sentences():
    from fedhypevae.table import TableConfig, aggregate, markdown

    tc = TableConfig(name="t", partitions=["iid"], seeds=[0], methods=["local", "fedavg-dp", "fedhypevae-strict"])

    def cell(m, a):
        rows = [{"accuracy": a, "balanced_accuracy": a}]
        c = {"method": m, "partition": "iid", "seed": 0, "epsilon_spent": None if m == "local" else 1.0}
        return {**c, "scores": {p: rows for p in tc.protocols}} if m.startswith("fedhypevae") else {**c, "rows": rows}

    cells = [cell(m, a) for m, a in (("local", 0.90), ("fedavg-dp", 0.70), ("fedhypevae-strict", 0.876))]
    md = markdown(tc, aggregate(cells), "cmd")
    assert "- IID, augment: FedHypeVAE (strict) is 17.60" in md and "- IID, λ-mix: FedHypeVAE (strict) is 17.60" in md
    assert "±" not in md.split("Command:")[0].replace("Mean ± std", "")
    assert "| 90.00 |" in md and "no spread over seeds" in md
    assert "is 17.60 points above FedAvg (DP-SGD) (same ε)" in md
    assert "is 2.40 points BELOW local-only training" in md and "NOT beat" not in md
    tc.seeds = [0, 1]
    md2 = markdown(tc, aggregate(cells + [dict(c, seed=1) for c in cells]), "cmd")
    assert "90.00 ± 0.00" in md2


def test_summaries_say_what_the_numbers_mean():
    from fedhypevae.commands import evaluation_hints, format_summary

    res = {
        "summary": {"balanced_accuracy": {"mean": 0.818}},
        "reference_local": {"summary": {"balanced_accuracy": {"mean": 0.953}}},
        "quality": {"c2st": {"accuracy": 0.99}},
    }
    hints = evaluation_hints(res)
    assert "WORSE" in hints[0] and "-13.50 points" in hints[0] and "far from the real distribution" in hints[1]
    assert "privacy budget" in hints[0]
    assert "without privacy" in evaluation_hints({**res, "run": {"enabled": False}})[0]  # not blamed on a budget
    res["summary"]["balanced_accuracy"]["mean"] = 0.97
    assert "improves" in evaluation_hints(res)[0]
    results = {
        "privacy": {"enabled": False, "clip_norm": 1.0},
        "training": {
            "rounds": 3,
            "stopped_early": None,
            "final": {"diagnostics/clip_fraction": 1.0, "diagnostics/loss": 2.0},
        },
        "synthetic": {"samples": 10, "path": "/r/synthetic.npz", "units": "model units"},
    }
    text = format_summary(results, 1.0)
    assert "clip_fraction=1.000: every per-record gradient was clipped" in text
    assert "fedhypevae evaluate --run /r" in text and "units        : model units" in text


def test_per_client_plot_has_a_legend_labels_every_panel_and_draws_each_client_once(tmp_path):
    from fedhypevae.table import TableConfig, plot

    tc = TableConfig(name="t", seeds=[0], methods=["local", "fedhypevae-strict", "fedhypevae-paper"])
    rng = np.random.default_rng(0)

    def rows():
        return [{"balanced_accuracy": float(v)} for v in np.r_[rng.uniform(0.6, 0.7, 9), 0.05]]  # one far outlier

    cells = [
        {"method": m, "partition": p, "seed": 0, "rows": rows()}
        if m == "local"
        else {"method": m, "partition": p, "seed": 0, "scores": {proto: rows() for proto in tc.protocols}}
        for m in tc.methods
        for p in tc.partitions
    ]
    drawn = plot(tc, cells, tmp_path / "p.png")
    # one row per method, and per protocol for a generative one, in the table's order (top to bottom)
    assert drawn["row_labels"] == ["Local only"] + [
        f"{lab} · {p}" for lab in ("FedHypeVAE (strict)", "FedHypeVAE (paper mode*)") for p in ("augment", "λ-mix")
    ]
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert {
        "median",
        "mean",
        "private (DP, formal guarantee)",
        "non-private",
        "paper mode (DP on Phi only, not formal)",
    } <= set(drawn["legend"])
    assert drawn["y_tick_labels"] == [True, True]
    assert drawn["outlier_markers"] == 0  # outliers are the clients' own dots, not a second marker


def test_sweep_plot_titles_use_words():
    from fedhypevae.slurm.collect import partition_words

    assert partition_words("iid") == "IID"
    assert partition_words("dirichlet0.3") == "Dirichlet α = 0.3 (label skew)"
