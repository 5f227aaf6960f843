"""More synthetic records from a finished run: rebuild Phi and draw from the fitted meta-code(s).

    fedhypevae generate --run runs/default --samples 5000 --out more.parquet

A finished run holds `hypernetwork.pt` (Phi's state dict), `meta_codes.pt` (the meta-code(s) and their
mixture weights) and `generator.json`, the public metadata needed to rebuild Phi: the data's shape
(dimension, number of classes), the model section of the config, the transform and the value range the
data format (or `data.value_range`) declares, how records are spread over classes and, for
`synth.class_balance: proportional`, the DP class counts the run already released. Nothing in it is a
statistic of the private data (no observed minimum, maximum or mean): drawing more records is
post-processing of the run's DP releases and spends no budget.

Records come out in the input data's units where the transform can be inverted (`range`: the declared
range mapped back from [0, 1]; `none`: the data's own units). For `l2` each record's norm was divided
out and cannot be recovered: the output is in model units (unit-norm records), and the summary says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_path, atomic_savez
from .errors import DataError, FedHypeVAEError

GENERATOR_FILE = "generator.json"
GENERATOR_FORMAT = 1
OUTPUT_FORMATS = (".npz", ".csv", ".parquet")


def generator_metadata(
    cfg, *, dim: int, num_classes: int, transform: str, value_range, dp_class_counts=None, fitted: bool = True
) -> dict:
    """The public description `generate` rebuilds Phi from (written by `train` as RUN/generator.json)."""
    from dataclasses import asdict

    counts = None
    if cfg.synth.class_balance == "proportional" and dp_class_counts is not None:
        counts = [float(v) for v in np.asarray(dp_class_counts, dtype=np.float64).reshape(-1)]
    return {
        "format": GENERATOR_FORMAT,
        "dim": int(dim),
        "num_classes": int(num_classes),
        "model": asdict(cfg.model),
        "transform": transform,
        "value_range": None if value_range is None else [float(value_range[0]), float(value_range[1])],
        "value_range_is": "declared by the data format or data.value_range (public), never measured on the data",
        "class_balance": cfg.synth.class_balance,
        "dp_class_counts": counts,
        "output_noise": bool(cfg.synth.output_noise),
        "meta_code_fitted": bool(fitted),
        "files": {"hypernetwork": "hypernetwork.pt", "meta_codes": "meta_codes.pt"},
    }


def _run_file(run: Path, name: str, what: str) -> Path:
    p = run / name
    if not p.is_file():
        raise FedHypeVAEError(
            f"{run} has no {name} ({what}); `fedhypevae generate` needs a finished run of "
            "`fedhypevae train` (an interrupted run finishes with --resume)"
        )
    return p


def load_generator(run_dir):
    """(Phi, codes, weights, metadata) of a finished run, on the CPU."""
    import torch

    from .config import ModelConfig
    from .model import HyperNetwork

    run = Path(str(run_dir))
    if not run.is_dir():
        raise FedHypeVAEError(f"--run {run} is not a directory; give the --out directory of `fedhypevae train`")
    if not (run / "config.yaml").is_file() and not (run / GENERATOR_FILE).is_file():
        raise FedHypeVAEError(f"--run {run} is not a training run (no config.yaml, no {GENERATOR_FILE})")
    meta_path = _run_file(
        run,
        GENERATOR_FILE,
        "the public metadata that rebuilds the hypernetwork; runs made before it existed cannot be rebuilt",
    )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        model_cfg = ModelConfig(**meta["model"])
        dim, classes, fmt = int(meta["dim"]), int(meta["num_classes"]), int(meta["format"])
    except FedHypeVAEError as exc:
        raise FedHypeVAEError(f"{meta_path}: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise FedHypeVAEError(f"{meta_path} is damaged ({type(exc).__name__}: {exc})") from None
    if fmt > GENERATOR_FORMAT:
        raise FedHypeVAEError(f"{meta_path} has format {fmt}; this version reads format {GENERATOR_FORMAT} (upgrade)")
    if not meta.get("meta_code_fitted", True):
        raise FedHypeVAEError(
            f"{run} is a PARTIAL run: its meta-code was never fitted (no class statistics were "
            "released), so it has nothing to generate from"
        )
    phi_path = _run_file(run, "hypernetwork.pt", "Phi's state dict")
    codes_path = _run_file(run, "meta_codes.pt", "the fitted meta-code(s)")
    hyper = HyperNetwork.from_config(dim, classes, model_cfg)
    try:
        state = torch.load(phi_path, map_location="cpu", weights_only=True)
        hyper.load_state_dict(state)
        mc = torch.load(codes_path, map_location="cpu", weights_only=True)
        codes, weights = mc["codes"].float(), mc["weights"]
    except Exception as exc:  # noqa: BLE001 - a damaged or mismatched file, named with its cause
        raise FedHypeVAEError(
            f"{run}: hypernetwork.pt / meta_codes.pt cannot be loaded into the model "
            f"{GENERATOR_FILE} describes ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    hyper.eval()
    return hyper, codes, weights, meta


def class_split(samples: int, num_classes: int, weights: list | None = None) -> list[int]:
    """`samples` records over the classes: equal shares (the remainder to the first classes), or proportional
    to `weights` (largest remainders), summing to `samples` exactly."""
    if weights is None:
        base, extra = divmod(samples, num_classes)
        return [base + (1 if k < extra else 0) for k in range(num_classes)]
    w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    w = w / w.sum() if w.sum() > 0 else np.full(num_classes, 1.0 / num_classes)
    raw = w * samples
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts))[: samples - int(counts.sum())]:
        counts[k] += 1
    return [int(c) for c in counts]


def generate_from_run(run_dir, samples: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(x, y, info): `samples` synthetic records of a finished run (x in the input data's units where the
    transform can be inverted; `info["units"]` says which)."""
    import torch

    from .data import invert_transform, is_invertible, output_units
    from .memory import check_fits
    from .metacode import generate
    from .rng import SeedTag, public_generator

    if samples < 1:
        raise FedHypeVAEError(f"--samples must be >= 1; got {samples}")
    hyper, codes, weights, meta = load_generator(run_dir)
    dim, classes = int(meta["dim"]), int(meta["num_classes"])
    check_fits(
        samples * dim * 4 * 6,
        f"--samples {samples} ({dim} features each)",
        error=FedHypeVAEError,
        advice="generate fewer records per call (the calls with different --seed values are independent)",
    )
    weights_by_class = meta.get("dp_class_counts") if meta.get("class_balance") == "proportional" else None
    counts = class_split(samples, classes, weights_by_class)
    with torch.no_grad():
        x, y = generate(
            hyper,
            codes,
            weights,
            counts,
            output_noise=bool(meta.get("output_noise")),
            generator=public_generator(int(seed), SeedTag.GENERATE),
        )
    vr = meta.get("value_range")
    transform = meta["transform"]
    x_out = invert_transform(x.cpu().numpy(), transform, None if vr is None else tuple(vr)).astype(np.float32)
    info = {
        "samples": int(samples),
        "per_class": counts,
        "dim": dim,
        "transform": transform,
        "units": output_units(transform, None if vr is None else tuple(vr)),
        "in_input_units": is_invertible(transform),
        "seed": int(seed),
    }
    return x_out, y.cpu().numpy().astype(np.int64), info


def check_output_file(out) -> Path:
    """--out of generate: a new file with a supported extension, in a directory that can be written."""
    from .validate import check_output_path

    p = check_output_path(out, "--out", directory=False)
    if p.suffix.lower() not in OUTPUT_FORMATS:
        raise FedHypeVAEError(f"--out {p}: unsupported extension {p.suffix!r}; write {', '.join(OUTPUT_FORMATS)}")
    if p.exists():
        raise FedHypeVAEError(f"--out {p} already exists; choose a new file name (nothing is overwritten)")
    return p


def write_samples(out, x: np.ndarray, y: np.ndarray) -> Path:
    """x, y as .npz (arrays x, y), .csv or .parquet (columns x0..x{d-1}, label), written atomically: the file
    appears complete or not at all."""
    p = Path(str(out))
    ext = p.suffix.lower()
    if ext not in OUTPUT_FORMATS:
        raise DataError(f"{p}: unsupported extension {p.suffix!r}; write {', '.join(OUTPUT_FORMATS)}")
    if ext == ".npz":
        return atomic_savez(p, {"x": x, "y": y}, owner_only=True)
    import pandas as pd

    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])])
    df["label"] = y
    with atomic_path(p, owner_only=True) as tmp:
        if ext == ".csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
    return p
