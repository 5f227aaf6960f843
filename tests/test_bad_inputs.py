"""The bad-input corpus: one row per malformed input, each run through the real command line.

Every row runs `python -m fedhypevae.cli ...` in a fresh working directory, under a 2 GB address-space
limit (a blow-up in memory fails the row instead of swapping the machine), and asserts:

  * the exact exit status;
  * that the FIRST line of stderr matches the row's pattern, which names the culprit (the file, key
    or flag) and the cause; some rows also list words that must not be in it (a wrong cause);
  * no `Traceback` anywhere in stderr;
  * for a refusal: the working directory and the data files are exactly as before (no run directory,
    no `.tmp` file, nothing overwritten or deleted);
  * for the silently-wrong cases that are fixed by doing the right thing: the right result itself.

The module imports nothing from fedhypevae, so the same rows can be run against another version of the
package (PYTHONPATH) to count how many of them it passes.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ADDRESS_SPACE = 2 * 1024**3  # bytes: RLIMIT_AS of every row's process
TINY = ["--config", "tiny", "--no-progress"]
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>


@dataclass
class Row:
    id: str
    argv: list  # "{d}" is the shared data directory, "{w}" the row's working directory
    code: int
    pattern: str | None  # regex, searched in the first line of stderr (case-insensitive)
    forbid: str | None = None  # regex that must NOT match that line (a wrong cause)
    setup: Callable[[Path, Path], None] | None = None  # (work dir, data dir) before the run
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None  # extra asserts
    created: tuple = ()  # paths (relative to the work dir) a successful row may create
    fsize: int | None = None  # RLIMIT_FSIZE in bytes: a full disk (writes fail with EFBIG)
    unprivileged: bool = False  # without root's right to read every file (a permission error even when run as root)
    marks: tuple = ()


# ----------------------------------------------------------------------------------------- data files
def _rng():
    return np.random.default_rng(0)


def _xy(n=240, d=6, k=3):
    rng = _rng()
    return rng.normal(size=(n, d)).astype(np.float32), np.arange(n) % k


def _csv(path: Path, header: list, rows) -> None:
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _npy_header(shape, dtype="<f4") -> bytes:
    """An .npy header declaring `shape` (the data itself is not written: a check of the declared size
    must come before any allocation or read)."""
    d = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    pad = 64 - (10 + len(d) + 1) % 64
    h = (d + " " * pad + "\n").encode()
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h


def make_data(d: Path) -> None:
    x, y = _xy()
    np.savez(d / "good.npz", x=x, y=y)
    np.savez(d / "nan.npz", x=np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), y=y)
    np.savez(d / "inf.npz", x=np.where(np.arange(x.size).reshape(x.shape) == 7, np.inf, x), y=y)
    np.savez(d / "neg.npz", x=x, y=np.where(y == 0, -1, y))
    np.savez(d / "frac.npz", x=x, y=y + 0.5)
    np.savez(d / "len.npz", x=x, y=y[:-3])
    np.savez(d / "onedim.npz", x=x[:, 0], y=y)
    np.savez(d / "nofeat.npz", x=np.zeros((len(y), 0), np.float32), y=y)
    np.savez(d / "oneclass.npz", x=x, y=np.zeros_like(y))
    np.savez(d / "keys.npz", a=x, b=y)
    np.savez(d / "gaps.npz", x=x, y=np.where(y == 2, 50, y))  # classes 0, 1, 50: ids 2-49 have no record
    np.savez(d / "biglabel.npz", x=x, y=np.where(y == 2, 10**9, y))
    np.savez(d / "hugefloatlabel.npz", x=x, y=np.where(y == 2, 1e20, y).astype(np.float64))
    np.savez(d / "f64big.npz", x=x.astype(np.float64) * 1e200, y=y)
    big = x.astype(np.float64) * 1e30
    np.savez(d / "large.npz", x=big.astype(np.float32), y=y)
    np.savez(d / "obj.npz", x=np.array([object()] * 3, dtype=object), y=np.arange(3))
    np.savez(d / "medmnist_len.npz", train_images=np.zeros((10, 4, 4), np.uint8), train_labels=np.zeros((9, 1)))
    np.save(d / "vec.npy", np.arange(10.0))
    np.save(d / "objarr.npy", np.array([object(), object()], dtype=object), allow_pickle=True)
    trunc = d / "trunc.npz"
    np.savez(trunc, x=x, y=y)
    trunc.write_bytes(trunc.read_bytes()[:300])
    (d / "empty.npz").write_bytes(b"")
    (d / "notes.txt").write_text("hello\n")
    (d / "random.pt").write_bytes(bytes(range(256)) * 4)
    # a zip whose x.npy declares 400 GB (header only) and a .npy that declares 40 GB
    with zipfile.ZipFile(d / "bomb.npz", "w") as z:
        z.writestr("x.npy", _npy_header((1_000_000, 100_000)))
        z.writestr("y.npy", _npy_header((1_000_000,), "<i8"))
    (d / "bomb.npy").write_bytes(_npy_header((100_000, 100_001)))
    import torch

    torch.save({"a": torch.zeros(4, 2)}, d / "nokeys.pt")
    import datetime

    # tensors and a Python object that weights-only loading refuses to unpickle
    torch.save({"x": torch.zeros(4, 2), "y": torch.zeros(4), "made": datetime.date(2024, 1, 1)}, d / "pickled.pt")
    # tables
    xi = (np.abs(x) * 40).astype(int) % 256
    _csv(d / "dup_label.csv", ["label", "f0", "f1", "label"], [[b, *r[:2], a] for r, a, b in zip(xi, y, y[::-1])])
    _csv(d / "dup_feat.csv", ["f0", "f1", "f1", "label"], [[*r[:3], a] for r, a in zip(xi, y)])
    _csv(d / "nolabel.csv", ["f0", "f1"], [r[:2] for r in xi])
    _csv(d / "strfeat.csv", ["f0", "colour", "label"], [[r[0], "red", a] for r, a in zip(xi, y)])
    _csv(d / "strlabel.csv", ["f0", "f1", "label"], [[*r[:2], f"class{a}"] for r, a in zip(xi, y)])
    _csv(
        d / "holes.csv",
        ["f0", "f1", "label"],
        [[r[0], "" if i == 5 else r[1], a] for i, (r, a) in enumerate(zip(xi, y))],
    )
    _csv(d / "plain.csv", [f"f{i}" for i in range(6)] + ["label"], [[*r, a] for r, a in zip(xi, y)])
    _csv(d / "pixels.csv", [f"pixel{i:04d}" for i in range(6)] + ["label"], [[*r, a] for r, a in zip(xi, y)])
    (d / "header_only.csv").write_text("f0,f1,label\n")
    (d / "latin1.csv").write_bytes("caf\xe9,f1,label\n1,2,0\n3,4,1\n".encode("latin-1"))
    _csv(d / "meta_short.csv", ["lesion"], [[i] for i in range(10)])
    _csv(d / "group.csv", ["f0", "f1", "label", "lesion"], [[*r[:2], a, i // 3] for i, (r, a) in enumerate(zip(xi, y))])
    # configs
    (d / "bad.yaml").write_text("privacy: {target_epsilon: 1\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "scalar_section.yaml").write_text("privacy: 3\n")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (d / "confdir").mkdir()
    # shard directories
    shards = d / "shards_list"
    shards.mkdir()
    (shards / "manifest.json").write_text("[1, 2, 3]\n")
    shards = d / "shards_keys"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"clients": 2}))
    (d / "plaindir").mkdir()
    (d / "plaindir" / "a.txt").write_text("x")
    # a table config (the cached-cells row)
    (d / "table_a.yaml").write_text(
        "name: t\ntrain_config: tiny\ndata: {path: digits}\npartitions: [iid]\n"
        "clients: 4\nmin_client_size: 20\nseeds: [0]\nmethods: [local]\n"
    )
    (d / "table_b.yaml").write_text((d / "table_a.yaml").read_text().replace("clients: 4", "clients: 5"))


# ------------------------------------------------------------------------------- helpers for rows
def _ledger_dir(w: Path, d: Path) -> None:
    (w / "run" / "ledger").mkdir(parents=True)
    (w / "run" / "ledger" / "rank_00000.jsonl").write_text("")
    (w / "run" / "config.yaml").write_text("seed: 0\n")


def _file(name: str, text: str = "keep me\n"):
    def setup(w: Path, d: Path) -> None:
        (w / name).write_text(text)

    return setup


def _dir_with(*names: str):
    def setup(w: Path, d: Path) -> None:
        for n in names:
            p = w / n
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x\n")

    return setup


def _unreadable(name: str, text: str):
    def setup(w: Path, d: Path) -> None:
        p = w / name
        p.write_text(text)
        p.chmod(0)

    return setup


def _copy_run(w: Path, d: Path) -> None:
    """The finished tiny run (built once per module) copied to w/trained."""
    import shutil

    shutil.copytree(d / "trained", w / "trained")


def _copy_run_without(*names: str):
    def setup(w: Path, d: Path) -> None:
        _copy_run(w, d)
        for n in names:
            (w / "trained" / n).unlink()

    return setup


def _garbage_run_config(w: Path, d: Path) -> None:
    _copy_run(w, d)
    (w / "trained" / "config.yaml").write_text("privacy: [unclosed\n")


def _unit_norm_shards(w: Path, proc) -> None:
    m = json.loads((w / "shards" / "manifest.json").read_text())
    assert m["transform"] == "l2"
    for f in m["files"]:
        with np.load(w / "shards" / f) as z:
            norms = np.linalg.norm(z["x_train"].astype(np.float64), axis=1)
        assert np.allclose(norms, 1.0, atol=1e-5), norms[:5]


def _describes_shards(w: Path, proc) -> None:
    assert re.search(r"clients\s*:\s*3", proc.stdout), proc.stdout
    assert re.search(r"transform\s*:\s*range", proc.stdout), proc.stdout


def _partition_shards(w: Path, d: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedhypevae.cli",
            "data",
            "partition",
            "digits",
            "--clients",
            "3",
            "--kind",
            "iid",
            "--out",
            str(w / "shards"),
        ],
        check=True,
        capture_output=True,
        env=_env(),
    )


def _first_table(w: Path, d: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedhypevae.cli",
            "table",
            "--config",
            str(d / "table_a.yaml"),
            "--out",
            str(w / "tab"),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
        env=_env(),
        cwd=w,
    )


def _nothing_written(w: Path, proc) -> None:
    assert proc.stdout.strip(), "config show printed nothing"
    assert "sigma" in proc.stdout.lower() and "epsilon" in proc.stdout.lower(), proc.stdout


def _generated(name: str, n: int):
    def check(w: Path, proc) -> None:
        p = w / name
        assert p.is_file(), proc.stdout

    return check


# ------------------------------------------------------------------------------------------- the rows
D = "{d}"
TRAIN = ["train", *TINY, "--out", "run"]


def data_rows() -> list[Row]:
    def train_on(name, *extra):
        return [*TRAIN, "--set", f"data.path={D}/{name}", *extra]

    return [
        Row("data: missing file", ["data", "inspect", f"{D}/nope.npz"], 2, r"nope\.npz.*does not exist"),
        Row(
            "data: unsupported extension",
            ["data", "inspect", f"{D}/notes.txt"],
            2,
            r"notes\.txt.*unsupported extension",
        ),
        Row("data: empty file", ["data", "inspect", f"{D}/empty.npz"], 2, r"empty\.npz.*empty"),
        Row("data: truncated npz", ["data", "inspect", f"{D}/trunc.npz"], 2, r"trunc\.npz.*(truncated|corrupt)"),
        Row("data: npz without x/y", ["data", "inspect", f"{D}/keys.npz"], 2, r"keys\.npz.*expected keys"),
        Row(
            "data: object-dtype npz",
            ["data", "inspect", f"{D}/obj.npz"],
            2,
            r"obj\.npz.*object",
            forbid=r"truncated|re-download",
        ),
        Row("data: 1-D npy", ["data", "inspect", f"{D}/vec.npy"], 2, r"vec\.npy.*2-D"),
        Row(
            "data: object npy",
            ["data", "inspect", f"{D}/objarr.npy"],
            2,
            r"objarr\.npy.*(object|pickle)",
            forbid=r"truncated|re-download",
        ),
        Row(
            "data: .pt holding a Python object",
            ["data", "inspect", f"{D}/pickled.pt"],
            2,
            r"pickled\.pt.*(python object|tensors)",
            forbid=r"truncated|re-download",
        ),
        Row("data: .pt without x/y", ["data", "inspect", f"{D}/nokeys.pt"], 2, r"nokeys\.pt.*'x' and 'y'"),
        Row("data: corrupt .pt", ["data", "inspect", f"{D}/random.pt"], 2, r"random\.pt.*(truncated|corrupt)"),
        Row(
            "data: non-UTF-8 csv",
            ["data", "inspect", f"{D}/latin1.csv"],
            2,
            r"latin1\.csv.*utf-8",
            forbid=r"truncated|re-download",
        ),
        Row(
            "data: unreadable file (permission)",
            ["data", "inspect", "secret.csv"],
            2,
            r"secret\.csv.*permission denied",
            forbid=r"truncated|re-download",
            setup=_unreadable("secret.csv", "f0,label\n1,0\n2,1\n"),
            unprivileged=True,
        ),
        Row("data: header-only csv", ["data", "inspect", f"{D}/header_only.csv"], 2, r"header_only\.csv.*no records"),
        Row(
            "data: csv without a label column",
            ["data", "inspect", f"{D}/nolabel.csv"],
            2,
            r"nolabel\.csv.*no label column.*label_column",
        ),
        Row(
            "data: duplicate label column (silently wrong)",
            ["data", "inspect", f"{D}/dup_label.csv"],
            2,
            r"dup_label\.csv.*duplicate column.*label",
        ),
        Row(
            "data: duplicate feature names (silently wrong)",
            ["data", "inspect", f"{D}/dup_feat.csv"],
            2,
            r"dup_feat\.csv.*duplicate column.*f1",
        ),
        Row(
            "data: non-numeric feature column",
            ["data", "inspect", f"{D}/strfeat.csv"],
            2,
            r"strfeat\.csv.*(colour.*numeric|numeric.*colour)",
        ),
        Row("data: text labels", ["data", "inspect", f"{D}/strlabel.csv"], 2, r"strlabel\.csv.*label.*not numeric"),
        Row(
            "data: empty cell in a feature column",
            ["data", "inspect", f"{D}/holes.csv"],
            2,
            r"holes\.csv.*f1.*(missing|empty|nan)",
        ),
        Row("data: NaN features", train_on("nan.npz"), 2, r"nan\.npz.*non-finite.*nan"),
        Row("data: infinite features", train_on("inf.npz"), 2, r"inf\.npz.*non-finite.*inf"),
        Row("data: negative labels", train_on("neg.npz"), 2, r"neg\.npz.*negative"),
        Row("data: fractional labels", train_on("frac.npz"), 2, r"frac\.npz.*not integers"),
        Row("data: fewer labels than rows", train_on("len.npz"), 2, r"len\.npz.*240 feature rows but 237 labels"),
        Row("data: 1-D features", train_on("onedim.npz"), 2, r"onedim\.npz.*(2-D|one row per record)"),
        Row("data: no features", train_on("nofeat.npz"), 2, r"nofeat\.npz.*no features"),
        Row("data: a single class", train_on("oneclass.npz"), 2, r"oneclass\.npz.*only one class"),
        Row(
            "data: MedMNIST split lengths differ",
            ["data", "inspect", f"{D}/medmnist_len.npz"],
            2,
            r"medmnist_len\.npz.*train_images has 10 rows but train_labels has 9",
        ),
        Row(
            "data: label ids with gaps (silently wrong)",
            train_on("gaps.npz"),
            2,
            r"gaps\.npz.*label.*(gap|no record).*(2-49|47)",
        ),
        Row(
            "data: label 1e9, inspect (memory)",
            ["data", "inspect", f"{D}/biglabel.npz"],
            2,
            r"biglabel\.npz.*label.*1000000000",
        ),
        Row(
            "data: label 1e20 as a float (overflow)",
            train_on("hugefloatlabel.npz"),
            2,
            r"hugefloatlabel\.npz.*label.*1e\+?20",
        ),
        Row(
            "data: float64 values beyond float32",
            ["data", "inspect", f"{D}/f64big.npz"],
            2,
            r"f64big\.npz.*float32",
            forbid=r"non-finite",
        ),
        Row(
            "data: l2 of very large features (silently wrong)",
            [
                "data",
                "partition",
                f"{D}/large.npz",
                "--clients",
                "2",
                "--kind",
                "iid",
                "--transform",
                "l2",
                "--out",
                "shards",
            ],
            0,
            None,
            check=_unit_norm_shards,
            created=("shards",),
        ),
        Row(
            "data: plain numeric csv without a declared range (silently wrong)",
            train_on("plain.csv"),
            2,
            r"plain\.csv.*no value range.*data\.transform",
        ),
        Row(
            "data: npz declaring 400 GB, inspect (memory)",
            ["data", "inspect", f"{D}/bomb.npz"],
            2,
            r"bomb\.npz.*x.*\d+(\.\d+)? GB.*memory",
            forbid=r"truncated|re-download",
        ),
        Row(
            "data: npy declaring 40 GB, partition (memory)",
            ["data", "partition", f"{D}/bomb.npy", "--clients", "2", "--out", "shards"],
            2,
            r"bomb\.npy.*\d+(\.\d+)? GB.*memory",
            forbid=r"truncated|re-download",
        ),
        Row(
            "data: inspect a shard directory",
            ["data", "inspect", "shards"],
            0,
            None,
            setup=_partition_shards,
            check=_describes_shards,
        ),
        Row("data: a directory without manifest", train_on("plaindir"), 2, r"plaindir.*directory.*manifest\.json"),
        Row("data: shard manifest is a list", train_on("shards_list"), 2, r"manifest\.json.*(object|mapping)"),
        Row("data: shard manifest lacks keys", train_on("shards_keys"), 2, r"manifest\.json.*lacks keys"),
        Row(
            "data: metadata rows differ",
            [
                *TRAIN,
                "--set",
                "data.path=digits",
                "--set",
                f"data.metadata_path={D}/meta_short.csv",
                "--set",
                "data.group_column=lesion",
            ],
            2,
            r"meta_short\.csv.*10 rows.*1797 records",
        ),
        Row(
            "data: group column missing",
            train_on("group.csv", "--set", "data.group_column=patient"),
            2,
            r"data\.group_column.*patient.*not found",
        ),
        Row(
            "data: 100k features (memory before training)",
            train_on(
                "wide.npz",
                "--set",
                "stats.covariance=diag",
                "--set",
                "data.transform=l2",
                "--set",
                "partition.kind=iid",
                "--set",
                "partition.clients=2",
                "--set",
                "partition.min_client_size=10",
            ),
            2,
            r"(meta-code|statistics).*\d+(\.\d+)? GB",
        ),
    ]


def config_rows() -> list[Row]:
    def s(*kv):
        return [*TRAIN, *[a for k in kv for a in ("--set", k)]]

    return [
        Row("config: unknown key", s("privacy.epsilon=3"), 2, r"privacy\.epsilon.*unknown|unknown.*privacy\.epsilon"),
        Row("config: unknown section", s("privcy.delta=0.1"), 2, r"privcy.*unknown|unknown.*privcy"),
        Row("config: override without =", s("privacy.delta"), 2, r"privacy\.delta.*key=value"),
        Row("config: bad choice", s("privacy.mode=loose"), 2, r"privacy\.mode.*one of.*loose"),
        Row("config: sample rate above 1", s("privacy.sample_rate=1.5"), 2, r"privacy\.sample_rate.*\(0, 1\]"),
        Row("config: impossible epsilon", s("privacy.target_epsilon=1e-7"), 2, r"target_epsilon"),
        Row("config: zero clients", s("partition.clients=0"), 2, r"partition\.clients.*>= 1"),
        Row(
            "config: bool as noise seed (silently wrong)",
            s("privacy.noise_seed=true"),
            2,
            r"privacy\.noise_seed.*integer.*true",
        ),
        Row(
            "config: bool as stats clip norm (silently wrong)",
            s("privacy.stats_clip_norm=true"),
            2,
            r"privacy\.stats_clip_norm.*number.*true",
        ),
        Row(
            "config: a stats center that is not a number",
            s("privacy.stats_center=middle"),
            2,
            r"privacy\.stats_center.*number.*middle",
        ),
        Row(
            "config: a stats split that does not add up to 1",
            s("privacy.stats_split=[0.5,0.2]", "stats.covariance=none"),
            2,
            r"privacy\.stats_split.*2 positive shares adding up to 1.*0\.5, 0\.2",
        ),
        Row(
            "config: bool as noise multiplier (silently wrong)",
            s("privacy.noise_multiplier=false"),
            2,
            r"privacy\.noise_multiplier.*number.*false",
        ),
        Row(
            "config: bool in a list of widths (silently wrong)", s("model.hidden=[true,64]"), 2, r"model\.hidden.*true"
        ),
        Row("config: negative threads (silently wrong)", s("threads=-1"), 2, r"threads.*>= 0"),
        Row("config: negative seed", s("seed=-1"), 2, r"seed.*(>= 0|\[0, 2\^63\)).*-1"),
        Row("config: negative noise seed", s("privacy.noise_seed=-5"), 2, r"privacy\.noise_seed.*>= 0"),
        Row("config: text in a list of widths", s("model.hidden=[a,64]"), 2, r"model\.hidden.*'a'"),
        Row("config: text in the bandwidths", s("model.mmd_bandwidths=[wide]"), 2, r"model\.mmd_bandwidths.*'wide'"),
        Row("config: float for an integer key", s("train.rounds=2.5"), 2, r"train\.rounds.*integer.*2\.5"),
        Row("config: delta 0", s("privacy.delta=0"), 2, r"privacy\.delta.*\(0, 1\)"),
        Row("config: negative step timeout", s("train.step_timeout_s=-5"), 2, r"train\.step_timeout_s.*> 0.*-5"),
        Row("config: step timeout text", s("train.step_timeout_s=soon"), 2, r"train\.step_timeout_s.*number.*soon"),
        Row("config: infinite step timeout", s("train.step_timeout_s=.inf"), 2, r"train\.step_timeout_s.*finite"),
        Row("config: empty data path", s("data.path="), 2, r"data\.path.*empty"),
        Row(
            "config: declared sizes of the wrong length",
            s("federation.declared_sizes=[10,20]"),
            2,
            r"federation\.declared_sizes.*4",
        ),
        Row(
            "config: range transform without a declared range",
            s("data.path=breast_cancer", "data.transform=range"),
            2,
            r"data\.transform=range.*(no|declares none)",
        ),
        Row(
            "config: transform none without a stats clip norm",
            s("data.transform=none"),
            2,
            r"privacy\.stats_clip_norm.*must be set",
        ),
        Row("config: test fraction 1", s("data.test_fraction=1"), 2, r"data\.test_fraction.*\(0, 1\)"),
        Row("config: alpha 0", s("partition.alpha=0"), 2, r"partition\.alpha.*> 0"),
        Row("config: invalid YAML file", ["train", "--config", f"{D}/bad.yaml", "--out", "run"], 2, r"bad\.yaml.*yaml"),
        Row("config: a YAML list", ["train", "--config", f"{D}/list.yaml", "--out", "run"], 2, r"list\.yaml.*mapping"),
        Row(
            "config: a section that is a number",
            ["train", "--config", f"{D}/scalar_section.yaml", "--out", "run"],
            2,
            r"scalar_section\.yaml.*privacy.*mapping.*int",
        ),
        Row(
            "config: a binary file",
            ["train", "--config", f"{D}/binary.yaml", "--out", "run"],
            2,
            r"binary\.yaml.*utf-8",
            forbid=r"not found",
        ),
        Row(
            "config: a directory",
            ["train", "--config", f"{D}/confdir", "--out", "run"],
            2,
            r"confdir.*directory",
            forbid=r"not found",
        ),
        Row(
            "config: unreadable file (permission)",
            ["train", "--config", "secret.yaml", "--out", "run"],
            2,
            r"secret\.yaml.*permission denied",
            setup=_unreadable("secret.yaml", "seed: 0\n"),
            unprivileged=True,
        ),
        Row(
            "config: unknown shipped name",
            ["train", "--config", "nosuch", "--out", "run"],
            2,
            r"nosuch.*not found.*default.*tiny",
        ),
        Row(
            "config show: bad override",
            ["config", "show", "--config", "tiny", "--set", "privacy.delta=2"],
            2,
            r"privacy\.delta.*\(0, 1\)",
        ),
        Row(
            "config show: prints the plan, writes nothing",
            ["config", "show", "--config", "tiny", "--set", "privacy.target_epsilon=4"],
            0,
            None,
            check=_nothing_written,
        ),
    ]


def flag_rows() -> list[Row]:
    return [
        Row(
            "flag: --timeout not a number",
            [*TRAIN, "--timeout", "abc"],
            2,
            r"--timeout.*(invalid|must be a number).*abc",
        ),
        Row("flag: --timeout negative", [*TRAIN, "--timeout", "-1"], 2, r"--timeout.*> 0"),
        Row("flag: --backend unknown", [*TRAIN, "--backend", "nccl"], 2, r"--backend.*invalid choice.*nccl"),
        Row("flag: --out missing", ["train", "--config", "tiny"], 2, r"required.*--out"),
        Row("flag: unknown subcommand", ["trian"], 2, r"invalid choice.*trian"),
        Row(
            "flag: table --seeds not integers",
            ["table", "--config", f"{D}/table_a.yaml", "--out", "tab", "--seeds", "0,one"],
            2,
            r"--seeds.*integer.*one",
        ),
        Row(
            "flag: partition --clients 0",
            ["data", "partition", "digits", "--clients", "0", "--out", "shards"],
            2,
            r"--clients.*>= 1",
        ),
        Row(
            "flag: partition --clients-per-file 0",
            ["data", "partition", "digits", "--clients", "3", "--clients-per-file", "0", "--out", "shards"],
            2,
            r"--clients-per-file.*>= 1",
        ),
        Row(
            "flag: partition --alpha negative",
            ["data", "partition", "digits", "--clients", "2", "--alpha", "-1", "--out", "shards"],
            2,
            r"--alpha.*> 0",
        ),
        Row(
            "flag: partition --test-fraction 1.5",
            ["data", "partition", "digits", "--clients", "2", "--test-fraction", "1.5", "--out", "shards"],
            2,
            r"--test-fraction.*\(0, 1\)",
        ),
        Row(
            "flag: account --steps negative",
            ["account", "--epsilon", "1", "--sample-rate", "0.1", "--steps", "-3"],
            2,
            r"--steps.*>= 1",
        ),
        Row(
            "flag: account --sample-rate 2",
            ["account", "--epsilon", "1", "--sample-rate", "2", "--steps", "10"],
            2,
            r"--sample-rate.*\(0, 1\]",
        ),
        Row(
            "flag: account --delta 1",
            ["account", "--epsilon", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1"],
            2,
            r"--delta.*\(0, 1\)",
        ),
        Row(
            "flag: account --epsilon 0",
            ["account", "--epsilon", "0", "--sample-rate", "0.1", "--steps", "10"],
            2,
            r"--epsilon.*> 0",
        ),
        Row(
            "flag: account --sigma negative",
            ["account", "--sigma", "-1", "--sample-rate", "0.1", "--steps", "10"],
            2,
            r"--sigma.*>= 0",
        ),
        Row("flag: audit --canaries 0", ["audit", "--canaries", "0", "--out", "aud"], 2, r"--canaries.*>= 1"),
        Row(
            "flag: generate --samples 0",
            ["generate", "--run", "trained", "--samples", "0", "--out", "s.npz"],
            2,
            r"--samples.*>= 1",
            setup=_copy_run,
            created=(),
        ),
        Row("flag: --set without a value", [*TRAIN, "--set"], 2, r"--set.*expected one argument"),
    ]


def run_dir_rows() -> list[Row]:
    return [
        Row(
            "run: --resume of an empty directory",
            ["train", "--resume", "--out", "empty"],
            2,
            r"empty.*no run.*config\.yaml",
            setup=lambda w, d: (w / "empty").mkdir(),
        ),
        Row(
            "run: --resume of a missing directory",
            ["train", "--resume", "--out", "gone"],
            2,
            r"gone.*(no run|does not exist)",
        ),
        Row(
            "run: an unfinished run without --resume",
            [*TRAIN],
            2,
            r"run.*already holds a run.*--resume",
            setup=_ledger_dir,
        ),
        Row(
            "run: --out a directory holding other files",
            ["train", *TINY, "--out", "photos"],
            2,
            r"photos.*(holds|contains).*(holiday\.jpg|files)",
            setup=_dir_with("photos/holiday.jpg"),
        ),
        Row(
            "run: --resume with a garbled config.yaml",
            ["train", "--resume", "--out", "trained"],
            2,
            r"trained.*config\.yaml.*yaml",
            setup=_garbage_run_config,
        ),
        Row("run: evaluate a missing directory", ["evaluate", "--run", "nope"], 2, r"nope.*not a directory"),
        Row(
            "run: evaluate a directory without config.yaml",
            ["evaluate", "--run", "empty"],
            2,
            r"empty.*no config\.yaml",
            setup=lambda w, d: (w / "empty").mkdir(),
        ),
        Row(
            "run: evaluate a run without synthetic.npz",
            ["evaluate", "--run", "trained"],
            2,
            r"synthetic\.npz",
            setup=_copy_run_without("synthetic.npz"),
        ),
        Row(
            "run: evaluate a synthetic set of the wrong width",
            ["evaluate", "--run", "trained", "--synthetic", f"{D}/good.npz"],
            2,
            r"good\.npz.*\(240, 6\).*64 features",
            setup=_copy_run,
        ),
        Row(
            "run: evaluate a synthetic set declaring 400 GB (memory)",
            ["evaluate", "--run", "trained", "--synthetic", f"{D}/bomb.npz"],
            2,
            r"bomb\.npz.*\d+(\.\d+)? GB.*memory",
            setup=_copy_run,
        ),
        Row(
            "run: evaluate an object-dtype synthetic set",
            ["evaluate", "--run", "trained", "--synthetic", f"{D}/obj.npz"],
            2,
            r"obj\.npz.*object",
            setup=_copy_run,
        ),
        Row(
            "run: account of a directory without a ledger",
            ["account", "--run", "empty"],
            2,
            r"empty.*no privacy ledger",
            setup=lambda w, d: (w / "empty").mkdir(),
        ),
        Row(
            "run: generate from a directory that is not a run",
            ["generate", "--run", "empty", "--samples", "5", "--out", "s.npz"],
            2,
            r"empty.*(not a|no) .*run",
            setup=lambda w, d: (w / "empty").mkdir(),
        ),
        Row(
            "run: generate from a run without hypernetwork.pt",
            ["generate", "--run", "trained", "--samples", "5", "--out", "s.npz"],
            2,
            r"hypernetwork\.pt",
            setup=_copy_run_without("hypernetwork.pt"),
        ),
        Row(
            "run: table cells computed with other settings",
            ["table", "--config", f"{D}/table_b.yaml", "--out", "tab", "--no-progress"],
            2,
            r"tab.*(other|different) settings.*clients",
            setup=_first_table,
            marks=(pytest.mark.slow,),
        ),
    ]


def output_rows() -> list[Row]:
    return [
        Row(
            "out: train --out an existing file",
            ["train", *TINY, "--out", "notes.txt"],
            2,
            r"--out.*notes\.txt.*not a directory",
            setup=_file("notes.txt"),
        ),
        Row(
            "out: train --out below a file",
            ["train", *TINY, "--out", "notes.txt/run"],
            2,
            r"--out.*notes\.txt.*is a file",
            forbid=r"permission",
            setup=_file("notes.txt"),
        ),
        Row("out: train --out empty", ["train", *TINY, "--out", ""], 2, r"--out.*empty"),
        Row(
            "out: partition --out an existing file",
            ["data", "partition", "digits", "--clients", "2", "--out", "notes.txt"],
            2,
            r"--out.*notes\.txt.*not a directory",
            setup=_file("notes.txt"),
        ),
        Row(
            "out: partition --out below a file",
            ["data", "partition", "digits", "--clients", "2", "--out", "notes.txt/shards"],
            2,
            r"--out.*notes\.txt.*is a file",
            setup=_file("notes.txt"),
        ),
        Row(
            "out: partition into an existing shard directory (stale shards)",
            ["data", "partition", "digits", "--clients", "2", "--kind", "iid", "--out", "shards"],
            2,
            r"--out.*shards.*(already|not empty)",
            setup=_partition_shards,
        ),
        Row(
            "out: table --out an existing file",
            ["table", "--config", f"{D}/table_a.yaml", "--out", "notes.txt"],
            2,
            r"--out.*notes\.txt.*not a directory",
            setup=_file("notes.txt"),
        ),
        Row(
            "out: audit --out an existing file",
            ["audit", "--out", "notes.txt", "--canaries", "10"],
            2,
            r"--out.*notes\.txt.*not a directory",
            setup=_file("notes.txt"),
        ),
        Row(
            "out: account --json below a file",
            ["account", "--epsilon", "1", "--sample-rate", "0.1", "--steps", "10", "--json", "notes.txt/a.json"],
            2,
            r"--json.*notes\.txt.*is a file",
            setup=_file("notes.txt"),
        ),
        Row(
            "out: data inspect --json a directory",
            ["data", "inspect", "digits", "--json", "adir"],
            2,
            r"--json.*adir.*directory",
            setup=lambda w, d: (w / "adir").mkdir(),
        ),
        Row(
            "out: evaluate --json below a file",
            ["evaluate", "--run", "trained", "--json", "notes.txt/e.json"],
            2,
            r"--json.*notes\.txt.*is a file",
            setup=lambda w, d: (_copy_run(w, d), _file("notes.txt")(w, d)),
        ),
        Row(
            "out: generate --out an unknown extension",
            ["generate", "--run", "trained", "--samples", "5", "--out", "s.txt"],
            2,
            r"--out.*s\.txt.*\.npz.*\.csv.*\.parquet",
            setup=_copy_run,
        ),
        Row(
            "out: generate --out an existing file",
            ["generate", "--run", "trained", "--samples", "5", "--out", "s.npz"],
            2,
            r"--out.*s\.npz.*exists",
            setup=lambda w, d: (_copy_run(w, d), _file("s.npz")(w, d)),
        ),
        Row(
            "out: generate writes a csv",
            ["generate", "--run", "trained", "--samples", "7", "--out", "s.csv"],
            0,
            None,
            setup=_copy_run,
            created=("s.csv",),
            check=_generated("s.csv", 7),
        ),
        Row(
            "out: full disk while partitioning",
            ["data", "partition", "digits", "--clients", "2", "--out", "shards"],
            1,
            r"(shards|client_).*(file too large|no space)",
            fsize=20_000,
        ),
        Row(
            "out: full disk while training",
            ["train", *TINY, "--out", "run"],
            1,
            r"run.*(file too large|no space)",
            fsize=600,
        ),
        Row(
            "out: full disk while evaluating",
            ["evaluate", "--run", "trained", "--protocol", "local", "--no-quality", "--json", "e.json"],
            1,
            r"e\.json.*(file too large|no space)",
            setup=_copy_run,
            fsize=100,
        ),
    ]


ROWS = data_rows() + config_rows() + flag_rows() + run_dir_rows() + output_rows()


# ------------------------------------------------------------------------------------------- running
def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "TORCHELASTIC_", "HYDRA_", "MPIR_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _limits(fsize: int | None, unprivileged: bool):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if unprivileged and os.geteuid() == 0:
            # root reads every file whatever its mode: drop the two capabilities that allow it (from the
            # bounding set, so the exec'd process never has them) and file permissions apply again
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
                if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed: cannot test a permission error")

    return apply


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        try:
            st = p.lstat()
        except OSError:
            continue
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def data_dir():
    """Shared inputs (read by every row); each row's working directory is a fresh one beside it."""
    d = Path(tempfile.mkdtemp(prefix="fhv-corpus-data-"))
    make_data(d)
    wide = np.random.default_rng(1).normal(size=(40, 100_000)).astype(np.float32)
    np.savez(d / "wide.npz", x=wide, y=np.arange(40) % 2)
    # one finished tiny run for the rows that need a run directory
    r = subprocess.run(
        [sys.executable, "-m", "fedhypevae.cli", "train", *TINY, "--out", str(d / "trained"), "--quiet"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _params():
    return [pytest.param(r, id=r.id, marks=list(r.marks)) for r in ROWS]


def test_the_corpus_is_large_and_its_ids_unique():
    assert len(ROWS) >= 60
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", _params())
def test_bad_input(row: Row, data_dir: Path):
    w = Path(tempfile.mkdtemp(prefix="fhv-corpus-work-"))
    try:
        if row.setup:
            row.setup(w, data_dir)
        before, data_before = _snapshot(w), _snapshot(data_dir)
        argv = [a.replace("{d}", str(data_dir)).replace("{w}", str(w)) for a in row.argv]
        proc = subprocess.run(
            [sys.executable, "-m", "fedhypevae.cli", *argv],
            cwd=w,
            capture_output=True,
            text=True,
            env=_env(),
            preexec_fn=_limits(row.fsize, row.unprivileged),
            timeout=600,
        )
        err = proc.stderr
        first = err.splitlines()[0] if err.strip() else ""
        context = f"exit {proc.returncode}\nstderr:\n{err[-3000:]}\nstdout:\n{proc.stdout[-1500:]}"
        assert "Traceback" not in err, context
        assert proc.returncode == row.code, context
        if row.pattern is not None:
            assert re.search(row.pattern, first, re.IGNORECASE), f"first stderr line: {first!r}\n{context}"
        if row.forbid is not None:
            assert not re.search(row.forbid, first, re.IGNORECASE), f"wrong cause in: {first!r}"
        after = _snapshot(w)
        if row.code != 0:
            assert after == before, (
                "the working directory changed: "
                f"new {sorted(set(after) - set(before))}, gone {sorted(set(before) - set(after))}, "
                f"changed {sorted(k for k in before if k in after and after[k] != before[k])}"
            )
        else:
            new = set(after) - set(before)
            allowed = {n for n in new if any(n == c or n.startswith(c + os.sep) for c in row.created)}
            assert new == allowed, f"unexpected new files {sorted(new - allowed)}"
            assert not [n for n in new if ".tmp" in n], new
        assert _snapshot(data_dir) == data_before, "a shared input changed"
        if row.check:
            row.check(w, proc)
    finally:
        import shutil

        shutil.rmtree(w, ignore_errors=True)
