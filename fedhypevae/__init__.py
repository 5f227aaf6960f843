"""FedHypeVAE: differentially private, hypernetwork-generated conditional VAEs, federated.

The Python API, for notebooks and scripts (one process; the command line `fedhypevae` does the same and
runs on many ranks too):

    from fedhypevae import load_config, train, generate, evaluate

    cfg = load_config("tiny", overrides=["privacy.target_epsilon=4"])
    results = train(cfg, out="runs/nb")              # the dict results.json holds
    x, y, info = generate("runs/nb", samples=1000)   # more synthetic records (no epsilon spent)
    scores = evaluate("runs/nb")                     # per-client linear classifiers

Errors a user can fix raise `fedhypevae.errors.FedHypeVAEError` with a one-line message. Importing this
package is cheap: torch and the rest load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "evaluate", "generate", "load_config", "train"]


def load_config(path=None, overrides=None):
    """The resolved, validated Config: a YAML file or a shipped config's name ("default", "tiny", ...), then
    dotted overrides such as "privacy.target_epsilon=4"."""
    from .config import load_config as _load

    return _load(None if path is None else str(path), list(overrides or []))


def train(
    config="default", out=None, *, overrides=None, resume: bool = False, progress: bool = True, log_level: str = "info"
) -> dict:
    """Train in this process and return the results (what RUN/results.json holds; "status" is "complete" or
    "partial"). `config`: a Config, a YAML path or a shipped name. `out` holding a finished run with the same
    settings returns that run's results without training again (it would spend epsilon again on the same
    data); other settings there are refused."""
    from pathlib import Path

    from .config import Config
    from .errors import ConfigError
    from .run import check_run_dir, finished_run, run_training
    from .validate import check_output_dir

    if out is None:
        raise ConfigError("train(out=...) is required: the run directory")
    check_output_dir(out)
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if isinstance(config, Config) and overrides:
        raise ConfigError("give overrides with a config name or path, or apply them with load_config first")
    out = Path(out)
    if not resume:
        done = finished_run(out, cfg)
        if done is not None:
            return done
        check_run_dir(out, resume=False)
    return run_training(cfg, out, resume=resume, progress=progress, log_level=log_level)


def generate(run, samples: int, *, out=None, seed: int = 0):
    """`samples` more synthetic records from a finished run: (x, y, info), x in the input data's units where
    the run's transform can be inverted (info["units"] says which). With `out` (.npz, .csv, .parquet; a new
    file) they are also written there."""
    from .generator import check_output_file, generate_from_run, write_samples

    path = check_output_file(out) if out is not None else None
    x, y, info = generate_from_run(run, int(samples), seed=int(seed))
    if path is not None:
        write_samples(path, x, y)
        info["path"] = str(path)
    return x, y, info


def evaluate(
    run, *, protocol: str = "augment", synthetic=None, seed=None, quality: bool = True, data_path=None, json_path=None
) -> dict:
    """Score a run's synthetic set with per-client linear classifiers (see `fedhypevae evaluate --help`); also
    writes RUN/evaluation.json (or `json_path`)."""
    from .evaluation import evaluate_run

    return evaluate_run(
        run,
        protocol=protocol,
        synthetic_path=synthetic,
        seed=seed,
        quality=quality,
        data_path=data_path,
        json_path=json_path,
    )
