"""FedHypeVAE-HPC: differentially private, hypernetwork-generated conditional VAEs, federated.

Subcommands: train, account, audit, data (inspect, partition), evaluate, table, embed. Errors a user can
fix print one line (`fedhypevae: error: ...`) and exit with status 2; `train` exits with 3 when the run is
partial (no statistics release or meta-code fit: results.json says what is missing) and with 128 + N when
signal N stopped it (it checkpointed first; --resume continues).
"""
from __future__ import annotations

import argparse
import sys

from .config import shipped_configs
from .errors import FedHypeVAEError


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train FedHypeVAE and write the synthetic set",
                       description="Train FedHypeVAE. Shipped configs (use the name or a path): "
                                   + ", ".join(shipped_configs()) + ".",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML config file, or the name of a shipped config (default: default; with --resume: the run's own config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set privacy.target_epsilon=4 (repeatable)")
    p.add_argument("--out", required=True, help="run directory (config.yaml, results.json, metrics, checkpoints, outputs)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest complete checkpoint")
    p.add_argument("--backend", default="auto", choices=["auto", "local", "mpi", "torch"],
                   help="auto reads the launcher's environment: none -> local, mpiexec/srun -> mpi, torchrun -> torch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda:LOCAL_RANK when CUDA is present, else cpu; torch.distributed uses NCCL on cuda, "
                        "gloo on cpu (the CUDA path is untested: the development machine has no GPU)")
    p.add_argument("--timeout", type=float, default=600.0, help="collective timeout in seconds (torch back-end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no summary")


def _add_account(sub) -> None:
    p = sub.add_parser("account", help="turn (epsilon, delta, q, steps) into sigma, or (sigma, q, steps, delta) into epsilon",
                       description="Privacy accounting with Opacus' accountants. Give --epsilon to calibrate sigma, "
                                   "--sigma to compute epsilon, or --run DIR to print a run's privacy ledger.")
    p.add_argument("--epsilon", type=float, help="target epsilon (calibrates sigma)")
    p.add_argument("--sigma", type=float, help="noise multiplier (computes epsilon)")
    p.add_argument("--delta", type=float, default=1e-4)
    p.add_argument("--sample-rate", "-q", type=float, help="Poisson sampling rate q")
    p.add_argument("--steps", type=int, help="number of DP-SGD steps")
    p.add_argument("--accountant", default="both", choices=["rdp", "prv", "both"])
    p.add_argument("--run", help="a run directory: print its privacy ledger (every rank's file, any world size)")
    p.add_argument("--client", type=int, help="with --run: one client's full history, release by release")
    p.add_argument("--json", dest="json_path", help="also write the numbers to this JSON file")


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="one-run privacy audit: an empirical lower bound on epsilon beside the claimed one",
                       description="One-run privacy audit (Steinke, Nasr & Jagielski 2023): M canaries, each included "
                                   "with probability 1/2, one training run, guesses on the top/bottom scores, and a "
                                   "95%-confidence lower bound on epsilon printed beside the claimed epsilon "
                                   "(privacy.target_epsilon). white-box: gradient canaries through the client's real "
                                   "clip-and-noise step; black-box: canary records scored by the final model's ELBO "
                                   "(weaker; expect a bound near 0). Exit status 1 when the audit's expectation fails: a "
                                   "violation without --sabotage, or a sabotage that went undetected. Shipped configs: "
                                   + ", ".join(shipped_configs()) + ".",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="audit", help="YAML config file, or the name of a shipped config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--mode", default="white-box", choices=["white-box", "black-box"])
    p.add_argument("--canaries", type=int, help="number of canaries M (default 1000 white-box, 200 black-box)")
    p.add_argument("--guesses", type=int, help="guesses per side: 'in' for the K highest scores, 'out' for the K lowest "
                                               "(default M/10)")
    p.add_argument("--sabotage", default="none", choices=["none", "no-clip", "no-noise", "no-shares", "share-over-m"],
                   help="white-box only: break the DP step on purpose (the audit must catch it): no-clip, no-noise, "
                        "no-shares (no Phi noise from any source: clients' shares or the aggregator's draw), "
                        "share-over-m (every Phi noise source at sigma C / M)")
    p.add_argument("--seed", type=int, help="seed of the canary coins and layout (default: derived from the config's seed)")
    p.add_argument("--client", type=int, default=0, help="the audited client")
    p.add_argument("--out", help="output directory (results.json, the audit's training run); default runs/audit-MODE-SABOTAGE")
    p.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no summary")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="inspect or partition a dataset")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("path", help="a file (.npz .npy .pt .csv .parquet) or a built-in name (digits, breast_cancer)")
    common.add_argument("--label-column")
    common.add_argument("--group-column")
    common.add_argument("--site-column")
    common.add_argument("--metadata", dest="metadata_path", help="row-aligned metadata table holding group/site columns")
    i = dsub.add_parser("inspect", parents=[common], help="describe a dataset")
    i.add_argument("--json", dest="json_path")
    q = dsub.add_parser("partition", parents=[common], help="write one shard file per client and a manifest")
    q.add_argument("--clients", type=int, required=True)
    q.add_argument("--alpha", type=float, default=0.3)
    q.add_argument("--kind", default="dirichlet", choices=["iid", "dirichlet", "site"])
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--min-client-size", type=int, default=10)
    q.add_argument("--test-fraction", type=float, default=0.2)
    q.add_argument("--transform", default="auto", choices=["auto", "none", "range", "l2"])
    q.add_argument("--out", required=True)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a run's synthetic set with per-client linear classifiers",
                       description="For each client, a linear classifier trained on its real training split plus the "
                                   "global synthetic set (protocol augment), scored on its own test split.")
    p.add_argument("--run", required=True, help="a training run directory (config.yaml + synthetic.npz)")
    p.add_argument("--protocol", default="augment", choices=["augment", "local", "synthetic-only", "lambda-mix"])
    p.add_argument("--synthetic", help="another synthetic .npz (x, y in the data's units) instead of RUN/synthetic.npz")
    p.add_argument("--seed", type=int, help="classifier seed (default: the run's seed)")
    p.add_argument("--no-quality", action="store_true", help="skip MMD, classifier two-sample test and coverage")
    p.add_argument("--data-path", help="where the run's data lives now, if it moved")
    p.add_argument("--json", dest="json_path", help="where to write the results (default RUN/evaluation.json)")


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="embeddings from an image folder or a MedMNIST npz with a frozen DINOv2",
                       description="Extract frozen foundation-model embeddings (x, y, split) into an .npz that "
                                   "`fedhypevae train --set data.path=...` reads.")
    p.add_argument("input", help="an image folder (one subfolder per class) or a MedMNIST .npz")
    p.add_argument("output", help="the .npz to write")
    p.add_argument("--model", default="dinov2_vits14", help="dinov2_vits14 (torch hub), a timm name, an org/name (Hugging Face) or a file")
    p.add_argument("--source", default="auto", choices=["auto", "hub", "timm", "hf", "local"])
    p.add_argument("--weights", help="local weights (offline machines)")
    p.add_argument("--hub-repo", default="facebookresearch/dinov2", help="torch hub repo, or a local clone of it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize", type=int, help="shorter side before the centre crop (default image-size x 256/224)")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", dest="json_path", help="also write the summary here")


def _add_table(sub) -> None:
    p = sub.add_parser("table", help="reproduce the paper's Table 1 layout (methods x partitions x seeds)",
                       description="Runs every method of a table config on identical splits; finished cells are "
                                   "kept under OUT/cells and skipped when the command is run again.")
    p.add_argument("--config", required=True, help="a table config, e.g. configs/table1_digits.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", help="comma-separated seeds instead of the config's")
    p.add_argument("--methods", help="comma-separated methods instead of the config's")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedhypevae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    _add_account(sub)
    _add_audit(sub)
    _add_data(sub)
    _add_evaluate(sub)
    _add_embed(sub)
    _add_table(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from . import commands  # imported here so that --help stays fast

        return getattr(commands, f"cmd_{args.cmd}")(args)
    except FedHypeVAEError as exc:
        print(f"fedhypevae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = (f"; `fedhypevae train --resume --out {out}` continues from the last checkpoint"
                if args.cmd == "train" and out else "")
        print(f"fedhypevae: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
