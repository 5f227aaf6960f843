"""The CLI: help, and every bad input gets a one-line message and a non-zero exit, no traceback."""

import subprocess
import sys

import numpy as np
import pytest

from fedhypevae.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_commands_and_shipped_configs():
    r = subprocess.run([sys.executable, "-m", "fedhypevae.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "account" in r.stdout and "data" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fedhypevae.cli", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "default" in r.stdout and "tiny" in r.stdout and "--set" in r.stdout


def _npz(tmp_path, name, **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return str(p)


def _bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=200)
    x_nan = x.copy()
    x_nan[3, 1] = np.nan
    x_inf = x.copy()
    x_inf[7, 0] = np.inf
    trunc = tmp_path / "trunc.npz"
    np.savez(trunc, x=x, y=y)
    trunc.write_bytes(trunc.read_bytes()[:300])
    (tmp_path / "empty.csv").write_text("")
    return {
        "missing file": (["--set", f"data.path={tmp_path / 'nope.npz'}"], "does not exist"),
        "NaN": (["--set", f"data.path={_npz(tmp_path, 'nan.npz', x=x_nan, y=y)}"], "nan"),
        "inf": (["--set", f"data.path={_npz(tmp_path, 'inf.npz', x=x_inf, y=y)}"], "inf"),
        "negative label": (
            ["--set", f"data.path={_npz(tmp_path, 'neg.npz', x=x, y=np.where(y == 0, -1, y))}"],
            "label",
        ),
        "non-integer label": (["--set", f"data.path={_npz(tmp_path, 'frac.npz', x=x, y=y + 0.5)}"], "label"),
        "mismatched lengths": (["--set", f"data.path={_npz(tmp_path, 'len.npz', x=x, y=y[:-3])}"], "197 labels"),
        "wrong dims": (["--set", f"data.path={_npz(tmp_path, 'dims.npz', x=x[:, 0], y=y)}"], "dim"),
        "truncated": (["--set", f"data.path={trunc}"], "trunc"),
        "empty": (["--set", f"data.path={tmp_path / 'empty.csv'}"], "empty"),
        "fewer samples than clients": (
            [
                "--set",
                f"data.path={_npz(tmp_path, 'few.npz', x=x[:6], y=np.arange(6) % 3)}",
                "--set",
                "partition.clients=4",
            ],
            "client",
        ),
        "unknown key": (["--set", "privacy.epsilon=3"], "unknown config key"),
        "bad mode": (["--set", "privacy.mode=loose"], "privacy.mode"),
        "bad sample rate": (["--set", "privacy.sample_rate=1.5"], "sample_rate"),
        "impossible epsilon": (["--set", "privacy.target_epsilon=1e-7"], "raise privacy.target_epsilon"),
        "too many ranks' worth of clients": (["--set", "partition.clients=0"], "partition.clients"),
    }


BAD_CASES = [
    "missing file",
    "NaN",
    "inf",
    "negative label",
    "non-integer label",
    "mismatched lengths",
    "wrong dims",
    "truncated",
    "empty",
    "fewer samples than clients",
    "unknown key",
    "bad mode",
    "bad sample rate",
    "impossible epsilon",
    "too many ranks' worth of clients",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_a_clear_error(tmp_path, capsys, case):
    extra, needle = _bad_inputs(tmp_path)[case]
    code, out, err = run_cli(
        capsys, "train", "--config", "tiny", "--out", str(tmp_path / "run"), "--no-progress", *extra
    )
    assert code == 2, (case, out, err)
    assert err.startswith("fedhypevae: error:"), err
    assert needle.lower() in err.lower(), (case, err)
    assert "Traceback" not in err


def test_bad_input_exit_code_through_the_console_script(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedhypevae.cli",
            "train",
            "--config",
            "tiny",
            "--out",
            str(tmp_path / "r"),
            "--set",
            f"data.path={tmp_path / 'missing.csv'}",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr.lower()


def test_unknown_config_name_lists_shipped_configs(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", "nonexistent", "--out", str(tmp_path / "r"))
    assert code == 2 and "tiny" in err and "default" in err


AUDIT_BAD = {
    "one canary": (["--canaries", "1"], "--canaries must be >= 2"),
    "sabotage without privacy": (["--sabotage", "no-clip", "--set", "privacy.enabled=false"], "nothing to sabotage"),
    "privacy disabled": (["--set", "privacy.enabled=false"], "no privacy claim"),
    "infinite target": (["--set", "privacy.target_epsilon=.inf"], "infinite"),
    "black-box sabotage": (["--mode", "black-box", "--sabotage", "no-noise"], "white-box"),
    "too many guesses": (["--canaries", "100", "--guesses", "60"], "guesses"),
    "unknown key": (["--set", "privacy.epsilon=2"], "unknown config key"),
    "no such client": (["--client", "7"], "not in the federation"),
}


@pytest.mark.parametrize("case", sorted(AUDIT_BAD))
def test_audit_bad_input_gets_a_clear_error(tmp_path, capsys, case):
    extra, needle = AUDIT_BAD[case]
    code, out, err = run_cli(capsys, "audit", "--out", str(tmp_path / "a"), "--no-progress", *extra)
    assert code == 2, (case, out, err)
    assert err.startswith("fedhypevae: error:") and needle.lower() in err.lower() and "Traceback" not in err, err
    assert not (tmp_path / "a" / "run").exists()  # refused before anything ran


def test_audit_help_names_the_method_and_its_options():
    r = subprocess.run([sys.executable, "-m", "fedhypevae.cli", "audit", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for needle in ("Steinke", "--canaries", "--sabotage", "--mode", "white-box", "black-box", "--json"):
        assert needle in r.stdout, needle
