"""The package as a user installs it: a wheel built from the checkout, installed (not editable) into a fresh
virtual environment, run from a directory outside the checkout.

The fresh environment gets the project's dependencies from this test environment's site-packages (a path
entry, so nothing is downloaded and torch is not installed twice); the project itself comes only from the
wheel. `pip install` of the wheel resolves its requirements against that path, so a missing or wrong
requirement still fails here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _tracked_tree(dst: Path) -> None:
    """The files git would put in a fresh clone (tracked, plus new files not ignored), copied to dst."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    _tracked_tree(src)
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(dist)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = dist.glob("fedhypevae_hpc-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies: this environment's site-packages as a plain path entry (its .pth files, among them
    # the editable install of this checkout, are not processed from there)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-index", str(wheel)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return env_dir


def test_wheel_installs_one_namespace_with_configs_and_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fedhypevae"}, top  # no top-level hpc, slurm or benchmarks
    for shipped in (REPO / "configs").glob("*.yaml"):
        assert f"fedhypevae/configs/{shipped.name}" in names
    for tpl in (REPO / "slurm" / "templates").glob("*.sbatch"):
        assert f"fedhypevae/slurm/templates/{tpl.name}" in names
    # every package of the source tree is in the wheel (the list in pyproject.toml is explicit)
    for folder, prefix in (("fedhypevae", "fedhypevae"), ("hpc", "fedhypevae/hpc"), ("slurm", "fedhypevae/slurm")):
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.relative_to(REPO / folder).as_posix()
            assert f"{prefix}/{rel}" in names, rel
    assert not [n for n in names if n.startswith("fedhypevae/benchmarks")]


def _run(env_dir: Path, *args, cwd: Path, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OMP_NUM_THREADS="1", PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env, **kw)


def test_installed_package_trains_a_shipped_config_outside_the_checkout(installed, tmp_path):
    py, exe = installed / "bin" / "python", installed / "bin" / "fedhypevae"
    where = _run(
        installed,
        str(py),
        "-c",
        "import fedhypevae, fedhypevae.hpc, fedhypevae.slurm.sweep; "
        "print(fedhypevae.__file__); print(fedhypevae.hpc.__file__)",
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert all(str(installed) in line for line in where.stdout.split()), (
        where.stdout
    )  # from the wheel, not the checkout
    # (opacus itself installs a top-level `benchmarks` package: ours, with its throughput module, must not be there)
    for name in ("hpc", "slurm", "benchmarks.throughput"):
        r = _run(installed, str(py), "-c", f"import {name}", cwd=tmp_path)
        assert r.returncode != 0 and "No module named" in r.stderr, (name, r.stdout, r.stderr)
    v = _run(installed, str(exe), "--version", cwd=tmp_path)
    assert v.returncode == 0 and v.stdout.strip().startswith("fedhypevae "), v
    m = _run(installed, str(py), "-m", "fedhypevae", "train", "--help", cwd=tmp_path)
    assert m.returncode == 0 and "default" in m.stdout and "tiny" in m.stdout, m.stdout  # shipped configs listed
    s = _run(installed, str(py), "-m", "fedhypevae.slurm.sweep", "--help", cwd=tmp_path)
    assert s.returncode == 0, s.stderr
    r = _run(
        installed, str(exe), "train", "--config", "tiny", "--out", "run", "--no-progress", cwd=tmp_path, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "synthetic.npz").is_file() and (tmp_path / "run" / "generator.json").is_file()
    res = (tmp_path / "run" / "results.json").read_text()
    assert '"git_commit": "unknown"' in res  # an installed package does not ask git about some other repository
