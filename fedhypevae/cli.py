"""FedHypeVAE-HPC: differentially private, hypernetwork-generated conditional VAEs, federated.

Subcommands: train, generate, config show, account, audit, data (inspect, partition), evaluate, table, embed.
Exit statuses: 0 done; 1 an I/O failure while writing (a full disk: the message names the path); 2 a bad
input (one line naming the file, key or flag and the cause; checked before anything is written or
released); 3 `train` ended PARTIAL (no statistics release or meta-code fit: results.json says what is
missing); 124 `train` on several ranks: a rank made no progress for train.step_timeout_s (a peer unreachable or
stuck) and ended the job (--resume continues from the last complete checkpoint); 128 + N `train` stopped by
signal N (it checkpointed first; --resume continues).
"""

from __future__ import annotations

import argparse
import math
import sys

from fedhypevae.hpc.backend import BACKENDS
from fedhypevae.hpc.device import DEVICES

from . import __version__
from .config import (
    AUDIT_MODES,
    AUDIT_SABOTAGE,
    PARTITION_KINDS,
    TRANSFORMS,
    DataConfig,
    PartitionConfig,
    shipped_configs,
)
from .errors import FedHypeVAEError
from .methods import PROTOCOLS

EXIT_IO = 1


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show (None, False, [])."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return help
        return help + " (default: %(default)s)"


class _TopFormatter(_Formatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help keeps the module docstring's lines."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line naming the flag and the cause (then a pointer to --help),
    not the usage block first."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------------------- flag types
def _number(kind, *, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a `kind` (int or float) within [low, high] (open ends where asked)."""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}; got {text!r}"
            ) from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
        below = low is not None and (v <= low if low_open else v < low)
        above = high is not None and (v >= high if high_open else v > high)
        if below or above:
            if high is None:
                raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}; got {text}")
            bounds = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
            raise argparse.ArgumentTypeError(f"must be in {bounds}; got {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = _number(int, low=1)
NONNEG_INT = _number(int, low=0)
POSITIVE = _number(float, low=0, low_open=True)
NONNEG = _number(float, low=0)
FRACTION = _number(float, low=0, high=1, low_open=True, high_open=True)  # (0, 1)
RATE = _number(float, low=0, high=1, low_open=True)  # (0, 1]


def _int_list(text):
    """Comma-separated non-negative integers (seeds)."""
    items = [s.strip() for s in text.split(",")]
    bad = [s for s in items if not s.lstrip("-").isdigit()]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers, e.g. 0,1,2; {bad[0] if bad else text!r} is not an integer"
        )
    values = [int(s) for s in items]
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0; got {text}")
    return values


def _names(text):
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"must be comma-separated names; got {text!r}")
    return items


def _value_range(text):
    parts = text.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LOW,HIGH (two numbers), e.g. 0,255; got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"must be LOW,HIGH with LOW < HIGH; got {text!r}")
    return [lo, hi]


def _add_overrides(p) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set privacy.target_epsilon=4 (repeatable; unknown keys are "
        "refused with the valid ones)",
    )


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train FedHypeVAE and write the synthetic set",
        description="Train FedHypeVAE. Shipped configs (use the name or a path): "
        + ", ".join(shipped_configs())
        + ". An --out that holds a finished run with "
        "the same settings is not trained again (that would spend epsilon again on the "
        "same data): its summary is printed.",
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML config file, or the name of a shipped config (when not given: default; with --resume: "
        "the run's own config.yaml)",
    )
    _add_overrides(p)
    p.add_argument(
        "--out",
        required=True,
        help="run directory: new, empty, or a run to --resume (config.yaml, results.json, metrics, "
        "checkpoints, ledger, outputs, run.log)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest complete checkpoint"
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto reads the launcher's environment: none -> local, mpiexec/srun -> mpi, torchrun -> torch",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="auto: cuda:LOCAL_RANK when CUDA is present, else cpu; torch.distributed uses NCCL on cuda, "
        "gloo on cpu (the CUDA path is untested: the development machine has no GPU)",
    )
    p.add_argument(
        "--timeout",
        type=POSITIVE,
        default=600.0,
        help="collective timeout in seconds of the torch back-end outside the training steps (start-up, the wait "
        "while rank 0 fits the meta-code); during training a rank that makes no progress for train.step_timeout_s "
        "ends the job, whatever the back-end",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="level of RUN/run.log (the console shows warnings and errors; --verbose shows info too)",
    )
    p.add_argument("--verbose", action="store_true", help="also print the log's info messages on the console")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no summary")


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="more synthetic records from a finished run",
        description="Draw N synthetic records from a finished run's hypernetwork and meta-code(s) "
        "(post-processing of its DP releases: no privacy budget is spent). The output is in "
        "the input data's units where the run's transform can be inverted (range, none); "
        "for l2 it is in model units (unit-norm records), and the summary says so.",
    )
    p.add_argument(
        "--run",
        required=True,
        help="a finished training run directory (generator.json, hypernetwork.pt, meta_codes.pt)",
    )
    p.add_argument(
        "--samples",
        type=POSITIVE_INT,
        required=True,
        help="number of records, spread over the classes as the run's synth.class_balance says",
    )
    p.add_argument(
        "--out",
        required=True,
        help="the file to write: .npz (x, y), .csv or .parquet (x0..x{d-1}, label); it must not exist",
    )
    p.add_argument(
        "--seed", type=NONNEG_INT, default=0, help="seed of the draws (the same seed gives the same records)"
    )


def _add_config(sub) -> None:
    p = sub.add_parser(
        "config",
        help="show the resolved config and its privacy plan",
        description="Configs: YAML files with one section per component; see `config show`.",
    )
    csub = p.add_subparsers(dest="config_cmd", required=True, parser_class=_Parser)
    s = csub.add_parser(
        "show",
        help="print the resolved, validated config and the privacy plan (writes nothing)",
        description="Resolve --config and --set, validate everything `train` checks before its first "
        "write (the data is loaded to check it: nothing is written or released), and print "
        "the config as YAML and the privacy plan: sigma, steps, the epsilon split.",
    )
    s.add_argument(
        "--config",
        default="default",
        help="YAML config file, or the name of a shipped config (" + ", ".join(shipped_configs()) + ")",
    )
    _add_overrides(s)
    s.add_argument("--no-data", action="store_true", help="skip loading the data (config and privacy plan only)")


def _add_account(sub) -> None:
    p = sub.add_parser(
        "account",
        help="turn (epsilon, delta, q, steps) into sigma, or (sigma, q, steps, delta) into epsilon",
        description="Privacy accounting with Opacus' accountants. Give --epsilon to calibrate sigma, "
        "--sigma to compute epsilon, or --run DIR to print a run's privacy ledger.",
    )
    p.add_argument("--epsilon", type=POSITIVE, help="target epsilon (calibrates sigma)")
    p.add_argument("--sigma", type=NONNEG, help="noise multiplier (computes epsilon)")
    p.add_argument("--delta", type=FRACTION, default=1e-4, help="delta of the (epsilon, delta) guarantee")
    p.add_argument("--sample-rate", "-q", type=RATE, help="Poisson sampling rate q")
    p.add_argument("--steps", type=POSITIVE_INT, help="number of DP-SGD steps")
    p.add_argument("--accountant", default="both", choices=["rdp", "prv", "both"], help="Opacus accountant(s)")
    p.add_argument("--run", help="a run directory: print its privacy ledger (every rank's file, any world size)")
    p.add_argument("--client", type=NONNEG_INT, help="with --run: one client's full history, release by release")
    p.add_argument("--json", dest="json_path", help="also write the numbers to this JSON file")


def _add_audit(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="one-run privacy audit: an empirical lower bound on epsilon beside the claimed one",
        description="One-run privacy audit (Steinke, Nasr & Jagielski 2023): M canaries, each included "
        "with probability 1/2, one training run, guesses on the top/bottom scores, and a "
        "95 %-confidence lower bound on epsilon printed beside the claimed epsilon "
        "(privacy.target_epsilon). white-box: gradient canaries through the client's real "
        "clip-and-noise step; black-box: canary records scored by the final model's ELBO "
        "(weaker; expect a bound near 0). Exit status 1 when the audit's expectation fails: a "
        "violation without --sabotage, or a sabotage that went undetected. Shipped configs: "
        + ", ".join(shipped_configs())
        + ".",
    )
    p.add_argument("--config", default="audit", help="YAML config file, or the name of a shipped config")
    _add_overrides(p)
    p.add_argument("--mode", default="white-box", choices=AUDIT_MODES, help="what the auditor sees")
    p.add_argument("--canaries", type=POSITIVE_INT, help="number of canaries M (default 1000 white-box, 200 black-box)")
    p.add_argument(
        "--guesses",
        type=POSITIVE_INT,
        help="guesses per side: 'in' for the K highest scores, 'out' for the K lowest (default M/10)",
    )
    p.add_argument(
        "--sabotage",
        default="none",
        choices=tuple(AUDIT_SABOTAGE),
        help="white-box only: break the DP step on purpose (the audit must catch it): "
        + "; ".join(f"{k}: {v}" for k, v in AUDIT_SABOTAGE.items() if k != "none"),
    )
    p.add_argument(
        "--seed", type=NONNEG_INT, help="seed of the canary coins and layout (default: derived from the config's seed)"
    )
    p.add_argument("--client", type=NONNEG_INT, default=0, help="the audited client")
    p.add_argument(
        "--out", help="output directory (results.json, the audit's training run); default runs/audit-MODE-SABOTAGE"
    )
    p.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no summary")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="inspect or partition a dataset")
    dsub = p.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument(
        "path",
        help="a file (.npz .npy .pt .csv .parquet), a built-in name (digits, breast_cancer) or, "
        "for inspect, a shard directory",
    )
    common.add_argument("--label-column", help="label column of a .csv/.parquet table (when not given: label, else y)")
    common.add_argument("--group-column", help="column whose value never lands on both sides of a client's split")
    common.add_argument("--site-column", help="column naming each record's site (for --kind site)")
    common.add_argument(
        "--metadata", dest="metadata_path", help="row-aligned metadata table holding group/site columns"
    )
    i = dsub.add_parser(
        "inspect",
        parents=[common],
        help="describe a dataset or a shard directory",
        description="Describe a data set (shape, classes, declared value range) or a shard directory "
        "(its manifest). Printed locally: the description includes statistics of the data "
        "(class counts, min/max), so keep it out of shared outputs.",
    )
    i.add_argument("--json", dest="json_path", help="also write the description to this JSON file")
    q = dsub.add_parser(
        "partition",
        parents=[common],
        help="write the clients' shard files and a manifest",
        description="Partition a data set into clients, split each into train/test, apply the "
        "transform and write one shard file per block of clients (--clients-per-file) plus manifest.json, "
        "which indexes them, into a new (or empty) directory. A rank of a training run reads only the files "
        "that hold its clients.",
    )
    part, data = PartitionConfig(), DataConfig()  # the config's defaults are the command's
    q.add_argument("--clients", type=POSITIVE_INT, required=True, help="number of clients")
    q.add_argument("--alpha", type=POSITIVE, default=part.alpha, help="Dirichlet concentration (--kind dirichlet)")
    q.add_argument("--kind", default=part.kind, choices=PARTITION_KINDS, help="partition kind")
    q.add_argument("--seed", type=NONNEG_INT, default=0, help="public seed of the partition and the splits")
    q.add_argument(
        "--min-client-size", type=_number(int, low=2), default=part.min_client_size, help="smallest client (records)"
    )
    q.add_argument(
        "--test-fraction", type=FRACTION, default=data.test_fraction, help="share of each client's records held out"
    )
    q.add_argument(
        "--transform",
        default=data.transform,
        choices=TRANSFORMS,
        help="per-record transform (auto: range where a value range is declared)",
    )
    q.add_argument(
        "--value-range",
        type=_value_range,
        metavar="LOW,HIGH",
        help="a range every feature lies in, known from the format (not measured on the data), for --transform range",
    )
    q.add_argument(
        "--clients-per-file",
        type=POSITIVE_INT,
        default=1024,
        help="clients in one shard file (default 1024: 98 files for 100,000 clients; 1: a file per client)",
    )
    q.add_argument("--out", required=True, help="the shard directory to create (new or empty)")


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a run's synthetic set with per-client linear classifiers",
        description="For each client, a linear classifier trained on its real training split plus the "
        "global synthetic set (protocol augment), scored on its own test split.",
    )
    p.add_argument("--run", required=True, help="a training run directory (config.yaml + synthetic.npz)")
    p.add_argument(
        "--protocol",
        default="augment",
        choices=PROTOCOLS,
        help="what each client's classifier trains on",
    )
    p.add_argument("--synthetic", help="another synthetic .npz (x, y in the data's units) instead of RUN/synthetic.npz")
    p.add_argument("--seed", type=NONNEG_INT, help="classifier seed (when not given: the run's seed)")
    p.add_argument("--no-quality", action="store_true", help="skip MMD, classifier two-sample test and coverage")
    p.add_argument("--data-path", help="where the run's data lives now, if it moved")
    p.add_argument("--json", dest="json_path", help="where to write the results (when not given: RUN/evaluation.json)")


def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embeddings from an image folder or a MedMNIST npz with a frozen DINOv2",
        description="Extract frozen foundation-model embeddings (x, y, split) into an .npz that "
        "`fedhypevae train --set data.path=...` reads.",
    )
    p.add_argument("input", help="an image folder (one subfolder per class) or a MedMNIST .npz")
    p.add_argument("output", help="the .npz to write")
    p.add_argument(
        "--model",
        default="dinov2_vits14",
        help="dinov2_vits14 (torch hub), a timm name, an org/name (Hugging Face) or a file",
    )
    p.add_argument(
        "--source", default="auto", choices=["auto", "hub", "timm", "hf", "local"], help="where the model comes from"
    )
    p.add_argument("--weights", help="local weights (offline machines)")
    p.add_argument("--hub-repo", default="facebookresearch/dinov2", help="torch hub repo, or a local clone of it")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images per forward pass")
    p.add_argument("--image-size", type=POSITIVE_INT, default=224, help="side of the centre crop")
    p.add_argument(
        "--resize", type=POSITIVE_INT, help="shorter side before the centre crop (when not given: image-size x 256/224)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--limit", type=POSITIVE_INT, help="only the first N images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", dest="json_path", help="also write the summary here")


def _add_table(sub) -> None:
    p = sub.add_parser(
        "table",
        help="reproduce the paper's Table 1 layout (methods x partitions x seeds)",
        description="Runs every method of a table config on identical splits; finished cells are "
        "kept under OUT/cells and skipped when the command is run again with the same "
        "settings (other settings are refused: use another --out).",
    )
    p.add_argument("--config", required=True, help="a table config, e.g. configs/table1_digits.yaml")
    p.add_argument("--out", required=True, help="output directory (table.md, table.csv, table.json, plots, cells/)")
    p.add_argument("--seeds", type=_int_list, help="comma-separated seeds instead of the config's")
    p.add_argument("--methods", type=_names, help="comma-separated methods instead of the config's")
    p.add_argument(
        "--jobs",
        type=POSITIVE_INT,
        default=1,
        help="cells computed at once, each in its own process with (cores / jobs) torch threads, the FedHypeVAE "
        "cells first; the numbers do not depend on it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedhypevae", description=__doc__, formatter_class=_TopFormatter)
    parser.add_argument("--version", action="version", version=f"fedhypevae {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")
    _add_train(sub)
    _add_generate(sub)
    _add_config(sub)
    _add_account(sub)
    _add_audit(sub)
    _add_data(sub)
    _add_evaluate(sub)
    _add_embed(sub)
    _add_table(sub)
    return parser


def _output_of(args) -> str:
    for name, flag in (("out", "--out"), ("json_path", "--json"), ("output", "output")):
        v = getattr(args, name, None)
        if v:
            return f"{flag} {v}"
    return "the output"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from . import commands  # imported here so that --help stays fast

        return getattr(commands, f"cmd_{args.cmd}")(args)
    except FedHypeVAEError as exc:
        print(f"fedhypevae: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a file-size limit, a vanished directory: the environment, not the input
        where = exc.filename or _output_of(args)
        print(
            f"fedhypevae: error: cannot write {where}: {exc.strerror or exc} (errno {exc.errno}); free space or "
            "fix the path, then run the command again (nothing partial was kept)",
            file=sys.stderr,
        )
        return EXIT_IO
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = (
            f"; `fedhypevae train --resume --out {out}` continues from the last checkpoint"
            if args.cmd == "train" and out
            else ""
        )
        print(f"fedhypevae: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
