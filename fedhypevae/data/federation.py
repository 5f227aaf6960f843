"""Build the simulated federation (partition, per-client split, transform) and persist it as shards.

A shard directory (format 2) holds one ``clients_BBBBB.npz`` per block of ``clients_per_file`` clients (their
records concatenated in client order, with offsets) plus ``manifest.json`` with the public description (sizes,
transform, seed) and a sha256 per file: 98 files for 100,000 clients at the default 1,024. A rank reads only the
files that hold its clients; checksums catch truncated copies early. Format 1 (one ``client_NNNNN.npz`` per
client) is still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_savez, atomic_write_bytes
from ..errors import ConfigError, DataError
from .loaders import Dataset, load_dataset
from .partition import partition_indices, split_client
from .transforms import apply_transform, resolve_transform

MANIFEST = "manifest.json"
SHARD_FORMAT = 2  # one file per block of clients (`clients_per_file`); 1: one file per client (still read)
CLIENTS_PER_FILE = 1024
_SHARD_KEYS = ("x_train", "y_train", "x_test", "y_test", "declared_size")
# a block file: the clients' records concatenated in client order, each client's rows [offsets[j], offsets[j + 1])
_BLOCK_KEYS = ("client_ids", "declared_size", "train_offsets", "test_offsets", "x_train", "y_train", "x_test", "y_test")


@dataclass
class ClientData:
    """One client's private records (already transformed) and its public declared size."""

    client_id: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    declared_size: int  # public; fixed when the partition is made (= len(x_train) then)


@dataclass
class Federation:
    """All clients (or the subset this process hosts) and the public facts about the federation."""

    clients: list  # list[ClientData]; may be a subset of the federation
    num_clients: int
    num_classes: int
    dim: int
    declared_sizes: list  # for ALL clients (public)
    transform: str  # resolved transform already applied to x
    value_range: tuple | None  # the raw data's declared range (for invert_transform)
    source: str
    manifest: dict = field(default_factory=dict)

    def client(self, client_id: int) -> ClientData:
        for c in self.clients:
            if c.client_id == client_id:
                return c
        raise DataError(f"client {client_id} is not loaded here; loaded: {[c.client_id for c in self.clients]}")


def shard_name(client_id: int) -> str:
    """A client's file in a shard directory of format 1."""
    return f"client_{client_id:05d}.npz"


def block_name(block: int) -> str:
    """The file of the block of clients `block` in a shard directory of format 2."""
    return f"clients_{block:05d}.npz"


def shard_file(manifest: dict, client_id: int) -> str:
    """The name of the file that holds a client's records (either shard format)."""
    if int(manifest.get("format", 1)) == 1:
        return manifest["files"][client_id]
    return manifest["files"][client_id // int(manifest["clients_per_file"])]


def is_shard_dir(path) -> bool:
    p = Path(str(path))
    return p.is_dir() and (p / MANIFEST).is_file()


def _client_seed(seed: int, client_id: int) -> int:
    """Independent but reproducible per-client split seeds derived from the public seed."""
    return int(np.random.SeedSequence([int(seed) % (2**63), int(client_id)]).generate_state(1)[0])


def _validation_seed(seed: int, client_id: int) -> int:
    """The seed of a client's train/validation split (data.holdout=validation), derived from its split seed."""
    return int(np.random.SeedSequence([_client_seed(seed, client_id), 1]).generate_state(1)[0])


def _check_ids(client_ids: Sequence[int] | None, num_clients: int) -> list[int]:
    if client_ids is None:
        return list(range(num_clients))
    ids = [int(i) for i in client_ids]
    bad = [i for i in ids if not 0 <= i < num_clients]
    if bad:
        raise DataError(f"client ids {bad} are out of range; the federation has clients 0..{num_clients - 1}")
    if len(set(ids)) != len(ids):
        raise DataError(f"client ids {ids} contain duplicates")
    return ids


def build_federation(data_cfg, partition_cfg, seed: int, client_ids=None) -> Federation:
    """From a shard directory (reads only ``client_ids``' files) or a raw data set (partition, split, transform).
    ``client_ids``: the clients to build (default all), or, for a raw data set, a function of the public declared
    sizes returning them (a rank's placement: the other clients' records are never copied or transformed)."""
    path = Path(str(data_cfg.path))
    if path.is_dir():
        if not is_shard_dir(path):
            raise DataError(
                f"{path} is a directory without {MANIFEST}; give a data file, a built-in name, or a shard "
                "directory made by `fedhypevae data partition`"
            )
        if getattr(data_cfg, "holdout", "test") != "test":
            raise ConfigError(
                f"data.holdout={data_cfg.holdout} is not supported with a shard directory ({path}): its shards hold "
                "the test splits already; give the raw data set as data.path (digits, a file) to score on "
                "validation splits, or set data.holdout: test"
            )
        fed = load_shards(path, client_ids)
        if partition_cfg.clients != fed.num_clients:
            raise DataError(
                f"partition.clients={partition_cfg.clients} but the shard directory {path} holds "
                f"{fed.num_clients} clients; set partition.clients={fed.num_clients}"
            )
        if data_cfg.transform not in ("auto", fed.transform):
            raise DataError(
                f"data.transform={data_cfg.transform} but the shards in {path} were written with "
                f"transform {fed.transform}; set data.transform to auto or {fed.transform}"
            )
        return fed
    ds = load_dataset(
        data_cfg.path,
        label_column=data_cfg.label_column,
        group_column=data_cfg.group_column,
        site_column=data_cfg.site_column,
        metadata_path=data_cfg.metadata_path,
    )
    return federation_from_dataset(ds, data_cfg, partition_cfg, seed, client_ids)


def federation_from_dataset(ds: Dataset, data_cfg, partition_cfg, seed: int, client_ids=None) -> Federation:
    """Partition an already loaded data set; every client is split so that declared sizes cover all clients, and
    the clients in ``client_ids`` (a list, or a function of the declared sizes returning one; default all) are
    built: their records selected and transformed."""
    declared = getattr(data_cfg, "value_range", None)
    value_range = (float(declared[0]), float(declared[1])) if declared is not None else ds.value_range
    if data_cfg.transform == "auto" and value_range is None and ds.plain_table:
        raise DataError(
            f"{ds.source}: a plain numeric table declares no value range, so data.transform=auto cannot "
            "choose a transform for features on an unknown scale. Set data.transform: l2 (unit-norm "
            "records), or range with data.value_range: [low, high] (a bound you know from the format, "
            "e.g. [0, 255] for 8-bit pixels; never measured on the data), or none (records as they are; "
            "then choose privacy.clip_norm and privacy.stats_clip_norm for their scale)"
        )
    transform = resolve_transform(data_cfg.transform, value_range)
    if not callable(client_ids):
        ids = _check_ids(client_ids, partition_cfg.clients)
    parts = partition_indices(
        ds.y,
        kind=partition_cfg.kind,
        clients=partition_cfg.clients,
        alpha=partition_cfg.alpha,
        seed=seed,
        min_client_size=partition_cfg.min_client_size,
        sites=ds.sites,
    )
    splits = [
        split_client(p, ds.y, ds.groups, test_fraction=data_cfg.test_fraction, seed=_client_seed(seed, i), client_id=i)
        for i, p in enumerate(parts)
    ]
    holdout = getattr(data_cfg, "holdout", "test")
    if holdout == "validation":
        # the test splits are dropped here, before any record is selected or transformed: each train split is
        # split again (same stratified rule and fraction, its own seed) and the validation side takes the test
        # split's place
        splits = [
            split_client(
                tr,
                ds.y,
                ds.groups,
                test_fraction=data_cfg.test_fraction,
                seed=_validation_seed(seed, i),
                client_id=i,
            )
            for i, (tr, _) in enumerate(splits)
        ]
    declared_sizes = [int(len(tr)) for tr, _ in splits]
    if callable(client_ids):
        ids = _check_ids(client_ids(list(declared_sizes)), partition_cfg.clients)
    # per record transforms: only the built clients' records are transformed (one pass over their rows)
    rows = np.concatenate([np.concatenate([splits[i][0], splits[i][1]]) for i in ids]) if ids else np.zeros(0, int)
    xt = apply_transform(ds.x[rows], transform, value_range)
    clients, off = [], 0
    for i in ids:
        tr_, te_ = splits[i]
        a, b = off, off + len(tr_)
        off = b + len(te_)
        clients.append(
            ClientData(
                client_id=i,
                x_train=xt[a:b],
                y_train=ds.y[tr_],
                x_test=xt[b:off],
                y_test=ds.y[te_],
                declared_size=declared_sizes[i],
            )
        )
    manifest = {
        "kind": partition_cfg.kind,
        "alpha": float(partition_cfg.alpha),
        "seed": int(seed),
        "clients": int(partition_cfg.clients),
        "min_client_size": int(partition_cfg.min_client_size),
        "test_fraction": float(data_cfg.test_fraction),
        # which split x_test/y_test hold: the clients' test splits, or validation splits carved from their train
        # splits (then no test record is in this federation)
        "holdout": holdout,
        "group_column": data_cfg.group_column,
        "site_column": data_cfg.site_column,
        "name": ds.name,
        "train_sizes": declared_sizes,
        "test_sizes": [int(len(te)) for _, te in splits],
    }
    return Federation(
        clients=clients,
        num_clients=int(partition_cfg.clients),
        num_classes=ds.num_classes,
        dim=int(ds.x.shape[1]),
        declared_sizes=declared_sizes,
        transform=transform,
        value_range=value_range,
        source=ds.source,
        manifest=manifest,
    )


# --------------------------------------------------------------------------- shards


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shards(fed: Federation, out_dir, *, clients_per_file: int = CLIENTS_PER_FILE) -> Path:
    """One npz per block of `clients_per_file` clients (in client order) plus manifest.json, which indexes them: at
    100,000 clients 98 files rather than 100,000. Everything is written into a staging directory beside `out_dir`,
    which is renamed to `out_dir` at the end: a failure (a full disk) leaves nothing behind, and `out_dir` must not
    exist or be empty (stale shards of another partition would sit beside the manifest)."""
    if int(clients_per_file) < 1:
        raise DataError(f"clients_per_file must be >= 1; got {clients_per_file}")
    out = Path(str(out_dir))
    if len(fed.clients) != fed.num_clients:
        raise DataError(f"write_shards needs every client; only {len(fed.clients)} of {fed.num_clients} are loaded")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out} already exists and is not empty; shards go to a new or empty directory")
    created = [q for q in [out.parent, *out.parent.parents] if not q.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        _write_shard_files(fed, stage, int(clients_per_file))
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(stage, out)
    except BaseException:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        for q in created:  # the parents made for it, innermost first
            try:
                q.rmdir()
            except OSError:
                break
        raise
    return out


def _write_shard_files(fed: Federation, out: Path, per_file: int) -> None:
    files, digests = [], {}
    clients = sorted(fed.clients, key=lambda c: c.client_id)
    for k in range(0, len(clients), per_file):
        group = clients[k : k + per_file]
        name = block_name(k // per_file)
        arrays = dict(
            client_ids=np.array([c.client_id for c in group], np.int64),
            declared_size=np.array([c.declared_size for c in group], np.int64),
            train_offsets=np.cumsum([0] + [len(c.y_train) for c in group]).astype(np.int64),
            test_offsets=np.cumsum([0] + [len(c.y_test) for c in group]).astype(np.int64),
            x_train=np.concatenate([np.asarray(c.x_train, np.float32).reshape(-1, fed.dim) for c in group]),
            y_train=np.concatenate([np.asarray(c.y_train, np.int64).reshape(-1) for c in group]),
            x_test=np.concatenate([np.asarray(c.x_test, np.float32).reshape(-1, fed.dim) for c in group]),
            y_test=np.concatenate([np.asarray(c.y_test, np.int64).reshape(-1) for c in group]),
        )
        atomic_savez(out / name, arrays, fsync=True, owner_only=True)
        files.append(name)
        digests[name] = _sha256(out / name)
    manifest = dict(fed.manifest)
    manifest.update(
        {
            "format": SHARD_FORMAT,
            "clients_per_file": per_file,
            "clients": int(fed.num_clients),
            "num_classes": int(fed.num_classes),
            "dim": int(fed.dim),
            "declared_sizes": [int(s) for s in fed.declared_sizes],
            "transform": fed.transform,
            "value_range": None if fed.value_range is None else [float(v) for v in fed.value_range],
            "source": str(fed.source),
            "files": files,
            "sha256": digests,
        }
    )
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    atomic_write_bytes(out / MANIFEST, text, fsync=True, owner_only=True)


def read_manifest(shard_dir) -> dict:
    """The public description of a shard directory, validated."""
    d = Path(str(shard_dir))
    mp = d / MANIFEST
    if not mp.is_file():
        raise DataError(
            f"{d} is not a shard directory: {MANIFEST} is missing; create one with `fedhypevae data partition`"
        )
    try:
        m = json.loads(mp.read_text(encoding="utf-8"))
    except PermissionError:
        raise DataError(f"{mp}: permission denied; make the shard directory readable for this user") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{mp} is corrupt ({exc}); re-create the shards with `fedhypevae data partition`") from None
    if not isinstance(m, dict):
        raise DataError(
            f"{mp} is not a JSON object (its top level is a {type(m).__name__}); re-create the shards "
            "with `fedhypevae data partition`"
        )
    need = ("clients", "num_classes", "dim", "declared_sizes", "transform", "files", "sha256")
    missing = [k for k in need if k not in m]
    if missing:
        raise DataError(f"{mp} lacks keys {missing}; re-create the shards with `fedhypevae data partition`")
    kinds = {
        "clients": int,
        "num_classes": int,
        "dim": int,
        "declared_sizes": list,
        "transform": str,
        "files": list,
        "sha256": dict,
    }
    wrong = [
        f"{k} ({type(m[k]).__name__})"
        for k, kind in kinds.items()
        if not isinstance(m[k], kind) or isinstance(m[k], bool)
    ]
    if wrong:
        raise DataError(f"{mp} has values of the wrong type: {', '.join(wrong)}; re-create the shards")
    fmt = m.get("format", 1)
    if fmt not in (1, 2) or isinstance(fmt, bool):
        raise DataError(f"{mp} has shard format {fmt!r}; this version reads formats 1 and 2: re-create the shards")
    per_file = 1 if fmt == 1 else m.get("clients_per_file")
    if not isinstance(per_file, int) or isinstance(per_file, bool) or per_file < 1:
        raise DataError(f"{mp}: clients_per_file is {per_file!r}, not a positive integer; re-create the shards")
    want_files = -(-m["clients"] // per_file)
    if len(m["files"]) != want_files or len(m["declared_sizes"]) != m["clients"]:
        raise DataError(
            f"{mp} is inconsistent: {m['clients']} clients ({per_file} a file) but {len(m['files'])} files and "
            f"{len(m['declared_sizes'])} declared sizes; re-create the shards"
        )
    return m


def load_shards(shard_dir, client_ids: Sequence[int] | None = None) -> Federation:
    """Read the requested clients' shard files, verifying each one's sha256 against the manifest."""
    d = Path(str(shard_dir))
    m = read_manifest(d)
    ids = _check_ids(client_ids, int(m["clients"]))
    if int(m.get("format", 1)) == 1:
        clients = [_load_shard(d, m, i) for i in ids]
    else:  # each block file that holds a requested client, read once
        per_file, got, by_file = int(m["clients_per_file"]), {}, {}
        for i in ids:
            by_file.setdefault(i // per_file, []).append(i)
        for k in sorted(by_file):
            got.update(_load_block(d, m, k, by_file[k]))
        clients = [got[i] for i in ids]
    vr = m.get("value_range")
    public = {k: v for k, v in m.items() if k not in ("files", "sha256")}
    return Federation(
        clients=clients,
        num_clients=int(m["clients"]),
        num_classes=int(m["num_classes"]),
        dim=int(m["dim"]),
        declared_sizes=[int(s) for s in m["declared_sizes"]],
        transform=str(m["transform"]),
        value_range=None if vr is None else (float(vr[0]), float(vr[1])),
        source=str(m.get("source", d)),
        manifest=public,
    )


_REDO = "re-create the shards with `fedhypevae data partition` or copy the file again"


def _read_verified(d: Path, m: dict, name: str, who: str, keys: tuple) -> dict:
    """The arrays `keys` of shard file `name`, after its sha256 matched the manifest's (DataError naming the file,
    `who` it holds and the cause otherwise)."""
    p = d / name
    if not p.is_file():
        raise DataError(f"shard {p} for {who} is missing; {_REDO}")
    if _sha256(p) != m["sha256"].get(name):
        raise DataError(f"shard {p} for {who} is truncated or corrupt (sha256 does not match the manifest); {_REDO}")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"shard {p} lacks arrays {missing}; {_REDO}")
            return {k: z[k] for k in keys}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"shard {p} for {who} cannot be read ({type(exc).__name__}: {exc}); {_REDO}") from None


def _load_shard(d: Path, m: dict, client_id: int) -> ClientData:
    """One client from its own file (shard format 1)."""
    p = d / m["files"][client_id]
    arr = _read_verified(d, m, m["files"][client_id], f"client {client_id}", _SHARD_KEYS)
    c = ClientData(
        client_id=client_id,
        x_train=arr["x_train"].astype(np.float32),
        y_train=arr["y_train"].astype(np.int64),
        x_test=arr["x_test"].astype(np.float32),
        y_test=arr["y_test"].astype(np.int64),
        declared_size=int(arr["declared_size"]),
    )
    if c.x_train.shape[1:] != (m["dim"],) or c.x_test.shape[1:] != (m["dim"],):
        raise DataError(f"shard {p}: feature dimension {c.x_train.shape[1:]} does not match the manifest's {m['dim']}")
    return c


def _load_block(d: Path, m: dict, k: int, ids: list) -> dict:
    """{client id: ClientData} for `ids` from block file k (shard format 2), verified against the manifest."""
    name, per_file = m["files"][k], int(m["clients_per_file"])
    p = d / name
    arr = _read_verified(d, m, name, f"clients {ids[0]}..{ids[-1]}", _BLOCK_KEYS)
    first, n = k * per_file, len(arr["client_ids"])
    tr, te = arr["train_offsets"], arr["test_offsets"]
    if (
        arr["client_ids"].tolist() != list(range(first, min(first + per_file, int(m["clients"]))))
        or len(tr) != n + 1
        or len(te) != n + 1
        or tr[0] != 0
        or te[0] != 0
        or np.any(np.diff(tr) < 0)
        or np.any(np.diff(te) < 0)
        or tr[-1] != len(arr["y_train"])
        or len(arr["x_train"]) != len(arr["y_train"])
        or te[-1] != len(arr["y_test"])
        or len(arr["x_test"]) != len(arr["y_test"])
    ):
        raise DataError(f"shard {p}: its client ids or offsets do not match the manifest; {_REDO}")
    if arr["x_train"].shape[1:] != (m["dim"],) or arr["x_test"].shape[1:] != (m["dim"],):
        raise DataError(
            f"shard {p}: feature dimension {arr['x_train'].shape[1:]} does not match the manifest's {m['dim']}"
        )
    out = {}
    for i in ids:
        j = i - first
        out[i] = ClientData(
            client_id=i,
            x_train=arr["x_train"][tr[j] : tr[j + 1]].astype(np.float32),
            y_train=arr["y_train"][tr[j] : tr[j + 1]].astype(np.int64),
            x_test=arr["x_test"][te[j] : te[j + 1]].astype(np.float32),
            y_test=arr["y_test"][te[j] : te[j + 1]].astype(np.int64),
            declared_size=int(arr["declared_size"][j]),
        )
    return out


def describe_shards(shard_dir) -> dict:
    """The public description of a shard directory (its manifest), for `fedhypevae data inspect`."""
    m = read_manifest(shard_dir)
    vr = m.get("value_range")
    return {
        "shard directory": str(shard_dir),
        "format": int(m.get("format", 1)),
        "files": len(m["files"]),
        "source": m.get("source"),
        "name": m.get("name"),
        "clients": int(m["clients"]),
        "classes": int(m["num_classes"]),
        "dim": int(m["dim"]),
        "transform": m["transform"],
        "value_range": vr,
        "partition": m.get("kind"),
        "alpha": m.get("alpha"),
        "seed": m.get("seed"),
        "test_fraction": m.get("test_fraction"),
        "declared_sizes": [int(s) for s in m["declared_sizes"]],
        "test_sizes": m.get("test_sizes"),
    }


def describe_dataset(ds: Dataset) -> dict:
    """A summary for the CLI (`fedhypevae data describe`); local only, it is not a private release."""
    counts = np.bincount(ds.y, minlength=ds.num_classes)
    return {
        "name": ds.name,
        "source": ds.source,
        "n": int(len(ds.x)),
        "dim": int(ds.x.shape[1]),
        "classes": int(ds.num_classes),
        "class_counts": [int(c) for c in counts],
        "value_range": None if ds.value_range is None else list(ds.value_range),
        "has_groups": ds.groups is not None,
        "groups": None if ds.groups is None else int(len(np.unique(ds.groups))),
        "has_sites": ds.sites is not None,
        "sites": None if ds.sites is None else int(len(np.unique(ds.sites))),
        "x_min": float(ds.x.min()),
        "x_max": float(ds.x.max()),
        "x_mean": float(ds.x.mean()),
        "nan_count": int(np.isnan(ds.x).sum()),
    }
