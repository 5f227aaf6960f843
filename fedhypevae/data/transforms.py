"""Per-record, data-independent input transforms.

Nothing here is fitted on the data (no mean, no std, no observed min/max): a fitted statistic
would be a non-private release. ``range`` uses the range the file format declares; ``l2`` puts
every record on the unit sphere; ``none`` leaves records as they are.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

TRANSFORMS = ("auto", "none", "range", "l2")


def resolve_transform(kind: str, value_range: tuple | None) -> str:
    """Turn ``auto`` into a concrete transform: ``range`` when the format declares one, else ``none``."""
    if kind not in TRANSFORMS:
        raise DataError(f"data.transform must be one of {', '.join(TRANSFORMS)}; got {kind!r}")
    if kind == "auto":
        return "range" if value_range is not None else "none"
    if kind == "range" and value_range is None:
        raise DataError(
            "data.transform=range needs a value range declared by the data format (uint8 images, "
            "pixelNNNN columns, digits) or by data.value_range, and this data declares none; set "
            "data.value_range: [low, high] (a bound you know from the format, never measured on the "
            "data), or data.transform to none or l2"
        )
    return kind


def _bounds(value_range) -> tuple[float, float]:
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise DataError(f"value range {value_range} is empty; it must satisfy low < high")
    return lo, hi


def apply_transform(x: np.ndarray, kind: str, value_range: tuple | None) -> np.ndarray:
    """Map records into the model's input space; float32 out.

    range: [lo, hi] -> [0, 1], clipped so the public bound stays true even for stray values;
    l2: each row divided by its norm (zero rows stay zero); none: identity.
    """
    kind = resolve_transform(kind, value_range)
    x = np.asarray(x, dtype=np.float32)
    if kind == "range":
        lo, hi = _bounds(value_range)
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if kind == "l2":
        # x / ||x|| = (x / s) / ||x / s|| with s the row's largest magnitude: squares of large features
        # (1e30) overflow float32 and squares of tiny ones (1e-30) underflow, which would make rows zero
        scale = np.abs(x).max(axis=1, keepdims=True) if x.shape[1] else np.zeros((len(x), 1), np.float32)
        scaled = np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)
        norms = np.linalg.norm(scaled, axis=1, keepdims=True)
        return np.divide(scaled, norms, out=np.zeros_like(x), where=norms > 0).astype(np.float32)
    return x.copy()


def is_invertible(kind: str) -> bool:
    """Whether model outputs can be mapped back to the input data's units: range is an affine map; l2 drops
    each record's norm (not recoverable) and none changes nothing (outputs are already in the data's units,
    which are the model's)."""
    return kind in ("range", "none")


def output_units(kind: str, value_range: tuple | None) -> str:
    """What the numbers of a synthetic set mean, in words (results.json, generate's summary)."""
    if kind == "range":
        lo, hi = _bounds(value_range)
        return f"the input data's units (the declared range [{lo:g}, {hi:g}] mapped back from [0, 1])"
    if kind == "l2":
        return (
            "model units: unit-norm records (data.transform=l2 divides each record by its norm, which cannot "
            "be recovered); compare them with L2-normalized real records"
        )
    return "the input data's units (data.transform=none: the model works on the records as they are)"


def invert_transform(x: np.ndarray, kind: str, value_range: tuple | None) -> np.ndarray:
    """Map model outputs back to the data's units (range only; l2 and none are returned unchanged: see
    `output_units` for what that means)."""
    kind = resolve_transform(kind, value_range)
    x = np.asarray(x, dtype=np.float32)
    if kind == "range":
        lo, hi = _bounds(value_range)
        return (x * (hi - lo) + lo).astype(np.float32)
    return x.copy()
