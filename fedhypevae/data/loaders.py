"""Load a labelled embedding/image table into one validated in-memory ``Dataset``.

Every loader ends in ``_finish`` so that all formats get the same checks (shape, finite
values, integer labels, row alignment) and the same error messages. ``value_range`` is the
range the *format* declares (uint8 images, pixel columns, the digits data set); it is never
computed from the data, because a data-derived bound would itself leak private information.
"""

from __future__ import annotations

import csv
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..memory import check_fits

BUILTINS = ("digits", "breast_cancer")
_PIXEL_COLUMN = re.compile(r"^pixel\d+$")
_MEDMNIST_SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """A whole data set before partitioning: features, labels and optional grouping keys."""

    x: np.ndarray  # float32 (n, d), images flattened
    y: np.ndarray  # int64 (n,), labels 0..K-1
    num_classes: int
    groups: np.ndarray | None  # (n,) grouping key (e.g. lesion_id) or None
    sites: np.ndarray | None  # (n,) site key or None
    value_range: tuple | None  # public range declared by the format; None if unknown
    name: str
    source: str  # path or builtin name
    # a plain numeric table (.csv/.parquet without pixelNNN columns): it declares no value range, and its
    # features may be on any scale, so data.transform=auto refuses to guess for it
    plain_table: bool = False

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_dataset(
    path,
    *,
    label_column: str | None = None,
    group_column: str | None = None,
    site_column: str | None = None,
    metadata_path=None,
) -> Dataset:
    """Load ``path`` (a built-in name or a .npz/.npy/.pt/.csv/.parquet file) and validate it.

    group_column / site_column are read from ``metadata_path`` when given (a row-aligned
    .csv/.parquet table), else from the data table itself (.csv/.parquet only).
    """
    spec = str(path)
    if spec in BUILTINS:
        ds_parts = _load_builtin(spec)
        table = None
    else:
        p = _check_file(Path(spec), what="data file")
        ext = p.suffix.lower()
        if ext in TABLE_EXTENSIONS:
            table = _read_table(p)
            ds_parts = _from_table(table, p, label_column, group_column, site_column)
        else:
            table = None
            ds_parts = ARRAY_LOADERS[ext](p)
    x, y, value_range, name, source = ds_parts[:5]
    groups, sites = _keys(table, group_column, site_column, metadata_path, len(x) if hasattr(x, "__len__") else None)
    ds = _finish(x, y, groups, sites, value_range, name, source)
    ds.plain_table = bool(len(ds_parts) > 5 and ds_parts[5])
    return ds


# --------------------------------------------------------------------------- files


def _check_file(p: Path, what: str) -> Path:
    """Fail early, with the supported formats listed, before any parser sees the file."""
    if p.is_dir():
        raise DataError(
            f"{what} {p} is a directory; give a file ({', '.join(EXTENSIONS)}), a shard "
            f"directory containing manifest.json, or a built-in name ({', '.join(BUILTINS)})"
        )
    if not p.exists():
        raise DataError(f"{what} {p} does not exist; check the path (built-in data sets: {', '.join(BUILTINS)})")
    if p.suffix.lower() not in EXTENSIONS:
        raise DataError(
            f"{what} {p} has unsupported extension {p.suffix!r}; supported: {', '.join(EXTENSIONS)} "
            f"or a built-in name ({', '.join(BUILTINS)})"
        )
    if not os.access(p, os.R_OK):
        raise DataError(f"{what} {p}: permission denied; make it readable for this user (chmod u+r) or copy it")
    if p.stat().st_size == 0:
        raise DataError(f"{what} {p} is empty (0 bytes); re-create or re-download it")
    return p


def _corrupt(p: Path, exc: BaseException) -> DataError:
    """The cause of a failed read, in words: a damaged file is only one of them."""
    if isinstance(exc, PermissionError):
        return DataError(f"cannot read {p}: permission denied; make it readable for this user (chmod u+r)")
    if isinstance(exc, UnicodeDecodeError):
        return _not_utf8(p, exc)
    if isinstance(exc, MemoryError):
        return DataError(
            f"cannot read {p}: not enough memory to load it; use a machine with more memory or a smaller file"
        )
    if isinstance(exc, ValueError) and ("allow_pickle" in str(exc) or "Object arrays" in str(exc)):
        return _object_arrays(p)
    return DataError(
        f"cannot read {p}: the file is truncated or corrupt ({type(exc).__name__}: {exc}); re-create or re-download it"
    )


def _not_utf8(p: Path, exc: UnicodeDecodeError) -> DataError:
    bad = exc.object[exc.start : exc.start + 1]
    return DataError(
        f"{p} is not UTF-8 text (byte {bad!r} at offset {exc.start}); re-save it as UTF-8 "
        "(e.g. `iconv -f latin1 -t utf-8`)"
    )


def _object_arrays(p: Path) -> DataError:
    return DataError(
        f"{p} holds object arrays (pickled Python objects), which are not loaded: unpickling can run "
        "code. Save numeric arrays instead (np.savez(path, x=x.astype('float32'), y=y.astype('int64')))"
    )


def _npy_header(f, p: Path, key: str):
    """(shape, dtype) from an .npy stream's header, before any data is read."""
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npformat.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = npformat.read_array_header_2_0(f)
        else:
            return None
    except (ValueError, EOFError, OSError):
        return None  # the load itself reports a damaged file
    if dtype.hasobject:
        raise _object_arrays(p)
    return tuple(int(s) for s in shape), dtype


def _check_declared_size(p: Path, key: str, header, *, copy_itemsize: int = 4) -> None:
    """Refuse, before the load, an array whose declared shape needs more memory than is available
    (a compressed .npz can declare far more than the file's size). `copy_itemsize`: the copy the loader
    makes (float32 features, int64 labels)."""
    if header is None:
        return
    shape, dtype = header
    n = int(np.prod(shape, dtype=np.float64)) if shape else 1
    need = n * (dtype.itemsize + copy_itemsize)
    check_fits(
        need,
        f"{p}: array {key!r} of shape {shape} ({dtype})",
        error=DataError,
        advice="use a machine with more memory, or a file with fewer records or features",
    )


def npz_precheck(p: Path, keys) -> None:
    """Object arrays and declared sizes of the members `keys` of an .npz, checked before they are loaded."""
    try:
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
            for key in keys:
                if key + ".npy" in names:
                    with zf.open(key + ".npy") as f:
                        _check_declared_size(
                            p,
                            key,
                            _npy_header(f, p, key),
                            copy_itemsize=8 if key == "y" or key.endswith("labels") else 4,
                        )
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # np.load reports it with its cause


# --------------------------------------------------------------------------- formats


# the two data sets as scikit-learn ships them (digits: 64 pixel columns and the label; breast cancer: a header line,
# 30 features and the label) with the shapes `load_digits` / `load_breast_cancer` return
_BUILTIN_FILES = {"digits": ("digits.csv.gz", 0, (1797, 65)), "breast_cancer": ("breast_cancer.csv", 1, (569, 31))}


def _builtin_file(name: str) -> np.ndarray | None:
    """The built-in data set read from scikit-learn's own file, without importing scikit-learn (whose import,
    with SciPy's, is ~1.5 s of every rank's start); None when the file is not where scikit-learn keeps it or not
    as expected (the caller then asks scikit-learn). tests/test_data.py checks it equals scikit-learn's loader."""
    import importlib.util

    fname, skip, shape = _BUILTIN_FILES[name]
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / fname
    try:
        arr = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64)
    except (OSError, ValueError):
        return None
    return arr if arr.shape == shape else None


def _load_builtin(name: str):
    """scikit-learn ships these two, so demos and tests need no download."""
    arr = _builtin_file(name)
    if arr is not None:
        x, y = arr[:, :-1], arr[:, -1].astype(int)
    else:
        from sklearn import datasets

        b = datasets.load_digits() if name == "digits" else datasets.load_breast_cancer()
        x, y = b.data, b.target
    if name == "digits":
        return x, y, (0.0, 16.0), "digits", "digits"
    return x, y, None, "breast_cancer", "breast_cancer"


def _uint8_range(arr) -> tuple | None:
    """uint8 storage is a declaration that values are 0..255 (images)."""
    return (0.0, 255.0) if np.asarray(arr).dtype == np.uint8 else None


def _load_npz(p: Path):
    """Plain ``x``/``y`` archives, or MedMNIST archives whose splits are concatenated."""
    npz_precheck(p, ["x", "y"] + [f"{s}_{k}" for s in _MEDMNIST_SPLITS for k in ("images", "labels")])
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if {"x", "y"} <= keys:
                x, y = z["x"], z["y"]
            else:
                splits = [s for s in _MEDMNIST_SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]
                if not splits:
                    raise DataError(
                        f"{p}: expected keys 'x' and 'y', or MedMNIST keys train_images/train_labels "
                        f"(and val_*, test_*); found {sorted(keys)}"
                    )
                xs = [z[f"{s}_images"] for s in splits]
                ys = [_as_label_vector(z[f"{s}_labels"], p, f"{s}_labels") for s in splits]
                for s, xi, yi in zip(splits, xs, ys):
                    if len(xi) != len(yi):
                        raise DataError(
                            f"{p}: {s}_images has {len(xi)} rows but {s}_labels has {len(yi)}; "
                            "every image needs exactly one label"
                        )
                if len({xi.shape[1:] for xi in xs}) > 1:
                    raise DataError(f"{p}: image shapes differ across splits {[xi.shape for xi in xs]}")
                x, y = np.concatenate(xs), np.concatenate(ys)
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise _corrupt(p, exc) from None
    except Exception as exc:  # zlib.error and friends from a damaged member
        raise _corrupt(p, exc) from None
    return x, y, _uint8_range(x), p.stem, str(p)


def _load_npy(p: Path):
    """A 2-D numeric array whose LAST column is the label (no pickled objects are accepted)."""
    try:
        with open(p, "rb") as f:
            _check_declared_size(p, "x", _npy_header(f, p, "x"))
    except PermissionError as exc:
        raise _corrupt(p, exc) from None
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(
                f"{p}: object/pickled arrays are not accepted (unsafe); save a 2-D numeric array "
                "whose last column is the label, or use .npz with keys 'x' and 'y'"
            ) from None
        raise _corrupt(p, exc) from None
    except Exception as exc:
        raise _corrupt(p, exc) from None
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DataError(
            f"{p}: a .npy file must be a 2-D array (records x (features + label)) whose last column "
            f"is the label; got shape {arr.shape}. For images use .npz with keys 'x' and 'y'"
        )
    return arr[:, :-1], arr[:, -1], _uint8_range(arr), p.stem, str(p)


def _load_pt(p: Path):
    """A dict with tensors ``x`` and ``y`` or a tuple ``(x, y)``; loaded with weights_only=True (no code runs)."""
    import torch

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Unsupported global" in str(exc):  # a pickled Python object (not random bytes: "Unsupported operand")
            raise DataError(
                f"{p} holds Python objects other than tensors, which are not loaded (unpickling can run "
                "code); save a dict of tensors: torch.save({'x': x, 'y': y}, path)"
            ) from None
        raise _corrupt(p, exc) from None
    if isinstance(obj, dict) and "x" in obj and "y" in obj:
        x, y = obj["x"], obj["y"]
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{p}: expected a dict with tensors 'x' and 'y' or a tuple (x, y); found {found}")
    x, y = (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in (x, y))
    return x, y, _uint8_range(x), p.stem, str(p)


# A new file format: its loader above, `(path) -> (x, y, value_range, name, source)`, and its row here.
ARRAY_LOADERS = {".npz": _load_npz, ".npy": _load_npy, ".pt": _load_pt}
TABLE_EXTENSIONS = (".csv", ".parquet")  # columns by name (label, group and site columns), through _read_table
EXTENSIONS = (*ARRAY_LOADERS, *TABLE_EXTENSIONS)


def _read_table(p: Path):
    """Read a .csv/.parquet table; parser failures become DataError rather than tracebacks."""
    import pandas as pd

    _check_column_names(p)
    try:
        if p.suffix.lower() == ".csv":
            df = pd.read_csv(p, encoding="utf-8")
        else:
            df = pd.read_parquet(p)
    except pd.errors.EmptyDataError:
        raise DataError(f"{p} has no columns or rows; it is empty") from None
    except Exception as exc:
        raise _corrupt(p, exc) from None
    if len(df) == 0:
        raise DataError(f"{p} has a header but no records")
    return df


def _check_column_names(p: Path) -> None:
    """Duplicate column names are refused: pandas would rename the second `label` to `label.1` and use it as a
    feature (or the first as the label), silently."""
    try:
        if p.suffix.lower() == ".csv":
            with open(p, encoding="utf-8", newline="") as fh:
                names = next(csv.reader(fh), [])
        else:
            import pyarrow.parquet as pq

            names = pq.read_schema(p).names
    except UnicodeDecodeError as exc:
        raise _not_utf8(p, exc) from None
    except PermissionError as exc:
        raise _corrupt(p, exc) from None
    except Exception:  # noqa: BLE001 - the table reader reports a damaged file with its cause
        return
    seen: dict = {}
    for i, n in enumerate(names):
        seen.setdefault(n.strip(), []).append(i + 1)
    dups = {n: pos for n, pos in seen.items() if len(pos) > 1}
    if dups:
        said = "; ".join(f"{n!r} (columns {', '.join(map(str, pos))})" for n, pos in list(dups.items())[:5])
        raise DataError(
            f"{p}: duplicate column name(s) {said}; every column needs its own name, or one of them "
            "would be read as another (rename or drop the duplicates)"
        )


def _from_table(df, p: Path, label_column, group_column, site_column):
    """Label column ``label_column`` (default "label", then "y"); all other numeric columns are features."""
    import pandas as pd

    cols = [str(c) for c in df.columns]
    if label_column is None:
        label_column = next((c for c in ("label", "y") if c in df.columns), None)
        if label_column is None:
            raise DataError(
                f"{p}: no label column; looked for 'label' and 'y' among columns {_cols(cols)}. Set data.label_column"
            )
    elif label_column not in df.columns:
        raise DataError(f"{p}: label column {label_column!r} not found; columns are {_cols(cols)}")
    drop = {label_column} | {c for c in (group_column, site_column) if c is not None}
    feats = [c for c in df.columns if c not in drop]
    if not feats:
        raise DataError(f"{p}: no feature columns besides the label; columns are {_cols(cols)}")
    bad = [
        str(c) for c in feats if not (pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]))
    ]
    if bad:
        raise DataError(
            f"{p}: feature columns must be numeric, but {_cols(bad)} are not; drop them, or name them "
            "as data.group_column / data.site_column / data.label_column"
        )
    y = df[label_column].to_numpy()
    if not pd.api.types.is_numeric_dtype(df[label_column]):
        raise DataError(
            f"{p}: label column {label_column!r} is not numeric (e.g. {y[0]!r}); labels must be "
            "integers 0..K-1, so map class names to integers first"
        )
    holes = [str(c) for c in feats if df[c].isna().any()]
    if holes:
        rows = int(df[feats].isna().any(axis=1).sum())
        raise DataError(
            f"{p}: column(s) {_cols(holes)} have empty or NaN cells ({rows} of {len(df)} rows); drop or "
            "impute those rows first"
        )
    x = df[feats].to_numpy(dtype=np.float64, na_value=np.nan)
    pixels = all(_PIXEL_COLUMN.match(str(c)) for c in feats)
    return x, y, ((0.0, 255.0) if pixels else None), p.stem, str(p), not pixels


def _cols(cols, limit: int = 20) -> str:
    cols = list(map(str, cols))
    more = f" ... (+{len(cols) - limit} more)" if len(cols) > limit else ""
    return "[" + ", ".join(cols[:limit]) + "]" + more


def _keys(table, group_column, site_column, metadata_path, n):
    """Group/site keys come from the metadata table when given, else the data table."""
    if group_column is None and site_column is None:
        return None, None
    source = table
    where = "the data table"
    if metadata_path is not None:
        mp = _check_file(Path(str(metadata_path)), what="metadata file")
        if mp.suffix.lower() not in (".csv", ".parquet"):
            raise DataError(f"metadata file {mp} must be .csv or .parquet")
        source = _read_table(mp)
        where = str(mp)
        if n is not None and len(source) != n:
            raise DataError(
                f"metadata file {mp} has {len(source)} rows but the data has {n} records; "
                "the metadata must be row-aligned with the data (same rows, same order)"
            )
    elif table is None:
        raise DataError(
            "data.group_column / data.site_column need a table: set data.metadata_path to a row-aligned "
            ".csv/.parquet file, or use a .csv/.parquet data file that holds those columns"
        )
    out = []
    for col, what in ((group_column, "group_column"), (site_column, "site_column")):
        if col is None:
            out.append(None)
            continue
        if col not in source.columns:
            raise DataError(f"data.{what} {col!r} not found in {where}; columns are {_cols(source.columns)}")
        out.append(source[col].astype(str).to_numpy())
    return out[0], out[1]


# --------------------------------------------------------------------------- validation


def _as_label_vector(y: Any, p, key: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{p}: {key} must be one label per record (shape (n,) or (n, 1)); got shape {y.shape}")
    return y


def _finish(x, y, groups, sites, value_range, name, source) -> Dataset:
    """The checks every format shares; the messages say what to change."""
    x = np.asarray(x)
    y = _as_label_vector(y, source, "labels")
    if x.ndim < 2:
        raise DataError(
            f"{source}: features must have one row per record (at least 2-D after flattening); got shape {x.shape}"
        )
    if x.shape[0] == 0:
        raise DataError(f"{source}: contains no records")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{source}: features must be numeric; got dtype {x.dtype}")
    x = x.reshape(x.shape[0], -1)
    if x.dtype.itemsize > 4 and x.size and np.issubdtype(x.dtype, np.number):
        big = float(np.finfo(np.float32).max)
        over = int(np.count_nonzero(x > big) + np.count_nonzero(x < -big))
        if over:
            raise DataError(
                f"{source}: {over} feature values lie outside float32's range (magnitude above "
                f"{big:.1e}), in which the model computes; rescale the features first"
            )
    x = x.astype(np.float32)
    if x.shape[1] == 0:
        raise DataError(f"{source}: records have no features (shape {x.shape})")
    if len(y) != len(x):
        raise DataError(f"{source}: {len(x)} feature rows but {len(y)} labels; every record needs exactly one label")
    for key, arr in (("groups", groups), ("sites", sites)):
        if arr is not None and len(arr) != len(x):
            raise DataError(f"{source}: {len(arr)} {key} but {len(x)} records; the metadata must be row-aligned")
    bad_rows = ~np.isfinite(x).all(axis=1)
    if bad_rows.any():
        n_nan = int(np.isnan(x).any(axis=1).sum())
        n_inf = int(np.isinf(x).any(axis=1).sum())
        raise DataError(
            f"{source}: {int(bad_rows.sum())} of {len(x)} rows have non-finite features "
            f"({n_nan} with NaN, {n_inf} with inf); drop or impute those rows first"
        )
    y = _labels(y, source)
    num_classes = int(y.max()) + 1
    if len(np.unique(y)) < 2:
        raise DataError(f"{source}: only one class ({int(y[0])}) present; a conditional generator needs >= 2 classes")
    return Dataset(
        x=x,
        y=y,
        num_classes=num_classes,
        groups=groups,
        sites=sites,
        value_range=None if value_range is None else (float(value_range[0]), float(value_range[1])),
        name=name,
        source=source,
    )


def _labels(y: np.ndarray, source) -> np.ndarray:
    """Labels must be integers 0..K-1; integral floats (2.0) are accepted, 1.5 or -1 are not."""
    if y.dtype == np.bool_:
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(
            f"{source}: labels must be integers 0..K-1; got dtype {y.dtype} (e.g. {y[0]!r}); "
            "map class names to integers first"
        )
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            ex = y[bad][:3].tolist()
            raise DataError(
                f"{source}: {int(bad.sum())} labels are not integers (e.g. {ex}); labels must be "
                "integer class ids 0..K-1"
            )
    if (y < 0).any():
        ex = np.unique(y[y < 0])[:3].tolist()
        raise DataError(
            f"{source}: {int((y < 0).sum())} labels are negative (e.g. {ex}); labels must be class ids 0..K-1"
        )
    top = y.max()
    if top >= len(y):  # K classes with a record each need K <= n records: ids this large leave gaps
        shown = f"{float(top):g}" if np.issubdtype(y.dtype, np.floating) else str(int(top))
        raise DataError(
            f"{source}: label {shown} is larger than any class id can be with {len(y)} records: labels "
            "must be class ids 0..K-1 with every id used (no gaps); renumber the classes"
        )
    y = y.astype(np.int64)
    present = np.unique(y)
    if len(present) != int(y.max()) + 1:
        missing = np.setdiff1d(np.arange(int(y.max()) + 1), present)
        raise DataError(
            f"{source}: label ids have gaps: {_ranges(missing)} ({len(missing)} ids) have no record, "
            f"among ids 0..{int(y.max())} (present: {_ranges(present)}). A class without records "
            "would still get synthetic records; renumber the classes 0..K-1"
        )
    return y


def _ranges(ids, limit: int = 8) -> str:
    """[2, 3, 4, 9] -> '2-4, 9'."""
    ids = [int(i) for i in ids]
    runs, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            runs.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(runs[:limit]) + (f", ... ({len(runs)} runs)" if len(runs) > limit else "")
