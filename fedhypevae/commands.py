"""Implementations of the CLI subcommands (kept apart so `fedhypevae --help` imports nothing heavy)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .config import load_config
from .errors import ConfigError, FedHypeVAEError

EXIT_PARTIAL = 3  # fedhypevae.run.EXIT_PARTIAL (not imported here: `--help` stays fast)


def _check_json(path: str | None) -> None:
    """--json: a file that can be written (checked before any work)."""
    if path is not None:
        from .validate import check_output_path

        check_output_path(path, "--json", directory=False)


def _write_json(path: str | None, obj: dict) -> None:
    if path:
        from .atomic import atomic_write_text
        from .checkpoint import dumps_json

        atomic_write_text(Path(path), dumps_json(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from .validate import check_output_dir

    check_output_dir(args.out)  # an empty --out, a file in the way: before the config is even read
    config = args.config
    if config is None:
        own = Path(args.out) / "config.yaml"
        config = str(own) if args.resume and own.is_file() else "default"
    if args.resume and not Path(args.out).is_dir():
        raise ConfigError(
            f"--resume: --out {args.out} does not exist, so there is no run to continue; start one without --resume"
        )
    cfg = load_config(config, args.overrides)
    _console_logging(args)
    if not args.resume:
        from .run import check_run_dir, finished_run

        done = finished_run(Path(args.out), cfg)
        if done is not None:
            if not args.quiet:
                print(format_summary(done, (done.get("training") or {}).get("wall_time_s")))
            other = Path(args.out).with_name(Path(args.out).name + "-2")
            print(
                f"\n{args.out} already holds this finished run (summary above); it is not trained again: a second "
                "run on the same data is a second release and spends epsilon again. To start a new run, choose "
                f"another --out (e.g. --out {other}); more records from this one: fedhypevae generate --run "
                f"{args.out} --samples N --out FILE"
            )
            return 0
        check_run_dir(Path(args.out), resume=False)
    from fedhypevae.hpc.launch import Launch

    from .run import run_training

    aborted = (  # a second stop signal: abort at once, every rank
        f"aborted by a second interrupt; `fedhypevae train --resume --out {args.out}` continues from the last "
        "complete checkpoint (the ledger keeps every charge)"
    )
    ranks = Launch(
        backend=args.backend,
        device=args.device,
        timeout_s=args.timeout,
        prog="fedhypevae",
        user_errors=(FedHypeVAEError,),  # one rank's error ends every rank, not leave them in a collective
        setup_error=ConfigError,
        interrupt_message=aborted,
    )
    with ranks:
        t0 = time.perf_counter()
        results = run_training(
            cfg,
            Path(args.out),
            ranks.comm,
            resume=args.resume,
            progress=not args.no_progress,
            launcher=ranks.info.launcher,
            device=str(ranks.device),
            catch_signals=True,
            log_level=args.log_level,
            second_interrupt=aborted,
        )
    if ranks.exit_status is not None:
        return ranks.exit_status
    comm = ranks.comm
    if results.get("interrupted"):
        if comm.is_root:
            where = f"round {results['round']}" + (f", step {results['step']}" if results.get("step") else "")
            print(
                f"fedhypevae: stopped by signal {results['signal']} at {where}; checkpoint {results['checkpoint']}; "
                f"epsilon spent so far {results['epsilon_spent']:.4f}. Continue with: "
                f"fedhypevae train --resume --out {args.out}",
                file=sys.stderr,
            )
        return 128 + int(results["signal"])
    if comm.is_root and not args.quiet:
        print(format_summary(results, time.perf_counter() - t0))
    if results.get("status") == "partial":
        if comm.is_root:
            print("fedhypevae: the run is PARTIAL: " + "; ".join(results.get("missing", [])), file=sys.stderr)
        return EXIT_PARTIAL
    return 0


def _console_logging(args) -> None:
    """Warnings and errors of the `fedhypevae` loggers on stderr (info too with --verbose); the run's own
    log file (RUN/run.log) is attached by run_training."""
    import logging

    root = logging.getLogger("fedhypevae")
    if not any(getattr(h, "_fedhypevae_console", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._fedhypevae_console = True
        h.setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
        h.setFormatter(logging.Formatter("fedhypevae: %(levelname)s: %(message)s"))
        h.addFilter(lambda record: getattr(record, "console", True))
        root.addHandler(h)
        root.setLevel(logging.DEBUG)
        root.propagate = False


def _fmt(v) -> str:
    return "unused" if v is None else f"{v:.4f}"


def _eps(v) -> str:
    return "unbounded (no noise)" if v is None else f"{v:.4f}"


def format_summary(results: dict, wall: float) -> str:
    p, t = results["privacy"], results["training"]
    partial = results.get("status") == "partial"
    lines = ["", "FedHypeVAE run PARTIAL (see 'missing')" if partial else "FedHypeVAE run finished"]
    if p["enabled"]:
        target = "infinity" if p["target_epsilon"] is None else p["target_epsilon"]
        lines.append(
            f"  privacy      : {p['mode']} mode, epsilon spent {_eps(p['epsilon_spent'])} of {target} "
            f"(delta={p['delta']}, accountant={p['accountant']}) - "
            + ("formal guarantee" if p["formal_guarantee"] else "NO formal guarantee: " + p["guarantee"])
        )
        sigmas = (p["plan"] or {}).get("noise_multipliers", {})
        lines.append(
            f"  noise        : sigma={p['noise_multiplier']:.4f}, q={p['sample_rate']}, C={p['clip_norm']}, "
            f"steps={p['steps']}/{p['planned_steps']}; class-statistics sigma={_fmt(sigmas.get('class-stats'))}, "
            f"mmd-embedding sigma={_fmt(sigmas.get('mmd-embeddings'))}"
        )
        lines.append(f"  noise source : {p['noise']}")
        tm = p.get("trust_model")
        if tm:  # whom the guarantee protects, as results.json's privacy.trust_model says
            lines.append(
                f"  trust model  : {tm['name']}"
                + (" (SIMULATED secure aggregation: ranks see partial sums)" if tm["simulated"] else "")
                + f"; protected against {tm['protected_against']}; NOT against {tm['not_protected_against']}"
            )
    else:
        lines.append("  privacy      : DISABLED (privacy.enabled=false): no guarantee")
    wall_text = "not recorded (privacy.diagnostics is false)" if wall is None else f"{wall:.1f} s"
    lines.append(
        f"  training     : {t['rounds']} rounds, wall time {wall_text}"
        + (f"; stopped early: {t['stopped_early']}" if t["stopped_early"] else "")
    )
    if t.get("ranks"):
        rk = t["ranks"]
        lines.append(
            f"  per rank     : peak memory {max(r['peak_rss_mb'] for r in rk) / 1024:.2f} GB (private state "
            f"{max(r['state_mb'] for r in rk):.1f} MB), setup {max(r['setup_s'] for r in rk):.1f} s, "
            f"checkpoint {max(r['checkpoint_s'] for r in rk):.2f} s (the slowest of {len(rk)} rank(s))"
        )
    res = results.get("resume")
    if res:
        where = f"round {res.get('round', 0)}" + (f", step {res['step']}" if res.get("step") else "")
        reps = p.get("replays") or {}
        lines.append(
            f"  resumed      : from {where}; replayed releases: {reps.get('free', 0)} identical (free), "
            f"{reps.get('charged_again', 0)} charged again"
            + (f"; cut logged rounds {res['cut_rounds']}" if res.get("cut_rounds") else "")
        )
        for k, (old, new) in (res.get("changed") or {}).items():
            lines.append(f"  changed      : {k} {old!r} -> {new!r} (applied from the resume on)")
    for m in results.get("missing") or []:
        lines.append(f"  MISSING      : {m}")
    final = t.get("final") or {}
    if final:
        lines.append(
            "  final losses : "
            + ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in final.items() if v is not None)
            + "  (diagnostics, outside the guarantee)"
        )
    clipped = final.get("diagnostics/clip_fraction")
    if clipped is not None and clipped >= 0.99:
        lines.append(
            f"  note         : clip_fraction={clipped:.3f}: every per-record gradient was clipped to "
            f"C={p.get('clip_norm')}, so each update carries its direction, not its size. Usual under DP-SGD; "
            "if the losses stall, compare another privacy.clip_norm at the same epsilon"
        )
    syn = results.get("synthetic")
    if syn:
        lines.append(f"  synthetic    : {syn['samples']} samples -> {syn['path']}")
        if syn.get("units"):
            lines.append(f"  units        : {syn['units']}")
    if syn and not partial:
        lines.append(
            f"  next         : fedhypevae evaluate --run {Path(syn['path']).parent} says whether this synthetic "
            "set helps per-client classifiers (it can make them worse: docs/RESULTS.md)"
        )
    out = results.get("outputs", {})
    if out:
        lines.append(
            f"  outputs      : {Path(out['results.json']).parent}/ (results.json, metrics.jsonl, events.jsonl, tb/, "
            "hypernetwork.pt, generator.json, synthetic.npz, checkpoints/, ledger/, run.log)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- account
def cmd_account(args) -> int:
    from .privacy import Mechanism, epsilon_of, plan_dp_sgd

    _check_json(args.json_path)
    if args.run:
        return _account_run(args)
    if args.client is not None:
        raise ConfigError("--client names a client of a run: give the run with --run DIR")
    if args.sample_rate is None or args.steps is None:
        raise ConfigError("account needs --sample-rate and --steps (with --epsilon or --sigma), or --run DIR")
    if (args.epsilon is None) == (args.sigma is None):
        raise ConfigError("give exactly one of --epsilon (to calibrate sigma) or --sigma (to compute epsilon)")
    accountants = ["rdp", "prv"] if args.accountant == "both" else [args.accountant]
    rows = []
    for acc in accountants:
        t = time.perf_counter()
        if args.epsilon is not None:
            plan = plan_dp_sgd(
                target_epsilon=args.epsilon,
                delta=args.delta,
                sample_rate=args.sample_rate,
                steps=args.steps,
                accountant=acc,
            )
            rows.append(
                {
                    "accountant": acc,
                    "epsilon": plan.planned_epsilon,
                    "target_epsilon": args.epsilon,
                    "sigma": plan.sigma,
                    "delta": args.delta,
                    "sample_rate": args.sample_rate,
                    "steps": args.steps,
                    "seconds": time.perf_counter() - t,
                }
            )
        else:
            eps = epsilon_of(
                [Mechanism("dp-sgd", args.sigma, args.sample_rate, args.steps)], delta=args.delta, accountant=acc
            )
            rows.append(
                {
                    "accountant": acc,
                    "epsilon": eps,
                    "sigma": args.sigma,
                    "delta": args.delta,
                    "sample_rate": args.sample_rate,
                    "steps": args.steps,
                    "seconds": time.perf_counter() - t,
                }
            )
    for r in rows:
        if args.epsilon is not None:
            print(
                f"{r['accountant']}: sigma = {r['sigma']:.6f} gives epsilon = {r['epsilon']:.6f} "
                f"(target {r['target_epsilon']}, delta={r['delta']}, q={r['sample_rate']}, steps={r['steps']})"
            )
        else:
            print(
                f"{r['accountant']}: epsilon = {r['epsilon']:.6f} for sigma={r['sigma']}, q={r['sample_rate']}, "
                f"steps={r['steps']}, delta={r['delta']}"
            )
    _write_json(args.json_path, {"results": rows})
    return 0


def _run_plan(run: Path):
    """The run's privacy plan (from results.json, else from the newest checkpoint), or None."""
    res = run / "results.json"
    if res.is_file():
        try:
            return (json.loads(res.read_text()).get("privacy") or {}).get("plan")
        except json.JSONDecodeError:
            pass
    from . import checkpoint as ckpt

    last = ckpt.latest_complete(run)
    if last is not None and (last / "shared.pt").is_file():
        return ckpt.load(last / "shared.pt", "shared checkpoint").get("plan")
    return None


def _account_run(args) -> int:
    from .privacy import PrivacyLedger, epsilon_of, has_ledger

    run = Path(args.run)
    if not has_ledger(run):
        raise FedHypeVAEError(
            f"{run} has no privacy ledger (ledger/rank_*.jsonl, or the per-client "
            "clients/client_*/ledger.jsonl of older runs): is it a training run directory?"
        )
    cfg = load_config(str(run / "config.yaml")) if (run / "config.yaml").is_file() else None
    delta = cfg.privacy.delta if cfg else args.delta
    acc = cfg.privacy.accountant if cfg else ("rdp" if args.accountant == "both" else args.accountant)
    plan = _run_plan(run)
    led = PrivacyLedger(None, run_dir=run)  # read only: every file of the run, any world size
    out = {
        "run": str(run),
        "delta": delta,
        "accountant": acc,
        "target_epsilon": cfg.privacy.target_epsilon if cfg else None,
        "plan": plan,
        "groups": [],
    }

    def rows_of(mechs):
        total = epsilon_of(mechs, delta=delta, accountant=acc)
        rows = []
        for i, m in enumerate(mechs):
            rows.append(
                {
                    "mechanism": m.name,
                    "sigma": m.noise_multiplier,
                    "q": m.sample_rate,
                    "steps": m.steps,
                    "epsilon_alone": epsilon_of([m], delta=delta, accountant=acc),
                    # what this mechanism adds to the composition: epsilon minus epsilon without it
                    "epsilon_marginal": total - epsilon_of(mechs[:i] + mechs[i + 1 :], delta=delta, accountant=acc),
                }
            )
        return total, rows

    target = f", target epsilon {out['target_epsilon']:g}" if out["target_epsilon"] is not None else ""
    print(f"privacy ledger of {run} (delta={delta}, accountant={acc}{target})")
    if args.client is not None:
        recs = led.client_records(args.client)
        total, rows = rows_of(led.history(args.client))
        out["client"] = {
            "id": args.client,
            "epsilon": total,
            "mechanisms": rows,
            "releases": [r.public() for r in recs],
        }
        print(f"  client {args.client}: {len(recs)} release(s), epsilon spent = {total:.4f}")
        print(f"    {'#':>5} {'session':>7} {'mechanism':<16} {'sigma':>10} {'q':>8} {'epoch':>5}  key")
        for i, r in enumerate(recs):
            print(f"    {i:>5} {r.session:>7} {r.mechanism:<16} {r.sigma:>10.4f} {r.q:>8g} {r.epoch:>5}  {r.key}")
        groups = [([args.client], led.history(args.client))]
    else:
        groups = led.histories()
    for ids, mechs in groups:
        total, rows = rows_of(mechs)
        ids = [int(i) for i in ids]
        out["groups"].append({"clients": ids, "epsilon": total, "mechanisms": rows})
        print(
            f"  {len(ids)} client(s) [{_client_list(ids)}]: epsilon spent = {total:.4f} "
            "(all mechanisms below, composed)"
        )
        print(f"    {'mechanism':<16} {'sigma':>10} {'q':>8} {'steps':>6} {'eps alone':>10} {'eps added':>10}")
        for m in rows:
            print(
                f"    {m['mechanism']:<16} {m['sigma']:>10.4f} {m['q']:>8g} {m['steps']:>6} "
                f"{m['epsilon_alone']:>10.4f} {m['epsilon_marginal']:>10.4f}"
            )
    if plan:
        spent = {m.name for _, mechs in groups for m in mechs}
        planned = [m for m in plan.get("mechanisms", []) if m["name"] not in spent]
        for m in planned:
            print(
                f"  planned, not released (yet): {m['name']} sigma={m['noise_multiplier']:.4f} q={m['sample_rate']:g} "
                f"steps={m['steps']}"
            )
        pe = plan.get("planned_epsilon")
        pe = "unbounded" if pe is None or pe == float("inf") else f"{pe:.4f}"
        tg = plan.get("target_epsilon")
        print(
            f"  plan: sigma={plan['sigma']:.4f} over {plan['steps']} steps at q={plan['sample_rate']:g}; "
            f"planned epsilon {pe} of target {'infinity' if tg is None else f'{tg:g}'}"
        )
    print(
        "  (eps alone: that mechanism by itself; eps added: the composed epsilon minus the composed epsilon "
        "without it — composition is sub-additive, so these do not sum to the total)"
    )
    _write_json(args.json_path, out)
    return 0


def _client_list(ids: list) -> str:
    from .privacy.ledger import client_ranges

    parts = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in client_ranges(ids)]
    return ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")


# ---------------------------------------------------------------------------------------- audit
def cmd_audit(args) -> int:
    from .audit import format_audit, run_audit
    from .validate import check_output_dir

    out = Path(args.out) if args.out else Path("runs") / f"audit-{args.mode}-{args.sabotage}"
    check_output_dir(out)
    _check_json(args.json_path)
    cfg = load_config(args.config, args.overrides)
    command = "fedhypevae " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["audit"] else ""
    res = run_audit(
        cfg,
        out,
        mode=args.mode,
        canaries=args.canaries,
        guesses=args.guesses,
        sabotage=args.sabotage,
        seed=args.seed,
        client=args.client,
        progress=not args.no_progress,
        command=command,
    )
    if not args.quiet:
        print(format_audit(res))
        print(f"  results   : {out / 'results.json'}")
    _write_json(args.json_path, res)
    a = res["audit"]
    # exit status 1 when the audit's expectation fails: a violation in an unsabotaged run, or a
    # sabotage that went undetected
    return 1 if (a["violation"] if a["sabotage"] == "none" else not a["violation"]) else 0


# ---------------------------------------------------------------------------------------- data
def cmd_data(args) -> int:
    from .config import DataConfig, PartitionConfig
    from .data import (
        describe_dataset,
        describe_shards,
        federation_from_dataset,
        is_shard_dir,
        load_dataset,
        write_shards,
    )
    from .validate import check_new_output_dir

    if args.data_cmd == "inspect":
        _check_json(args.json_path)
        if is_shard_dir(args.path):
            info = describe_shards(args.path)
        else:
            info = describe_dataset(_load(args, load_dataset))
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}} : {v}")
        _write_json(args.json_path, info)
        return 0
    check_new_output_dir(args.out, what="shard directory")
    ds = _load(args, load_dataset)
    dcfg = DataConfig(
        path=args.path,
        label_column=args.label_column,
        group_column=args.group_column,
        site_column=args.site_column,
        metadata_path=args.metadata_path,
        transform=args.transform,
        test_fraction=args.test_fraction,
        value_range=args.value_range,
    )
    pcfg = PartitionConfig(kind=args.kind, alpha=args.alpha, clients=args.clients, min_client_size=args.min_client_size)
    fed = federation_from_dataset(ds, dcfg, pcfg, args.seed)
    path = write_shards(fed, args.out, clients_per_file=args.clients_per_file)
    files = -(-fed.num_clients // args.clients_per_file)
    print(
        f"wrote {fed.num_clients} clients in {files} shard file{'s' if files > 1 else ''} and "
        f"{path / 'manifest.json'} (transform {fed.transform})"
    )
    if fed.num_clients <= 20:
        for c in fed.clients:
            print(f"  client {c.client_id:>4}: train {len(c.y_train):>6}  test {len(c.y_test):>6}")
    else:
        train = [len(c.y_train) for c in fed.clients]
        test = [len(c.y_test) for c in fed.clients]
        print(f"  train records per client {min(train)}-{max(train)}, test {min(test)}-{max(test)}")
    return 0


def _load(args, load_dataset):
    if Path(args.path).is_dir() and not Path(args.path, "manifest.json").is_file():
        raise ConfigError(
            f"{args.path} is a directory without manifest.json: give a data file, a built-in name, or "
            "(for inspect) a shard directory made by `fedhypevae data partition`"
        )
    if args.data_cmd == "partition" and Path(args.path).is_dir():
        raise ConfigError(
            f"{args.path} is already a shard directory; `data partition` reads a data file or a built-in name"
        )
    return load_dataset(
        args.path,
        label_column=args.label_column,
        group_column=args.group_column,
        site_column=args.site_column,
        metadata_path=args.metadata_path,
    )


# ---------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_run

    _check_json(args.json_path)

    res = evaluate_run(
        args.run,
        protocol=args.protocol,
        synthetic_path=args.synthetic,
        seed=args.seed,
        quality=not args.no_quality,
        data_path=args.data_path,
        json_path=args.json_path,
    )
    s = res["summary"]
    acc, bacc = s["accuracy"], s["balanced_accuracy"]
    n_syn = (res.get("synthetic") or {}).get("samples", 0)
    validation = res["data"].get("holdout") == "validation"
    split = "VALIDATION splits (data.holdout=validation)" if validation else "test splits"
    print(f"protocol {res['protocol']}: {len(res['clients'])} clients, {n_syn} synthetic samples; scored on {split}")
    print(f"  accuracy          {100 * acc['mean']:.2f} +- {100 * acc['std']:.2f} %")
    print(
        f"  balanced accuracy {100 * bacc['mean']:.2f} +- {100 * bacc['std']:.2f} %   "
        "(mean +- population std over clients)"
    )
    ref = res.get("reference_local")
    if ref:
        lb = ref["summary"]["balanced_accuracy"]
        print(
            f"  local only        {100 * lb['mean']:.2f} +- {100 * lb['std']:.2f} %   (balanced accuracy of the same "
            "classifiers without the synthetic set)"
        )
    q = res.get("quality")
    if q:
        print(
            f"  synthetic quality: MMD^2 {q['mmd2']['real_vs_synthetic']:.4f} (real-real floor "
            f"{q['mmd2']['real_vs_real']:.4f}), C2ST accuracy {q['c2st']['accuracy']:.3f} (0.5 = indistinguishable), "
            f"coverage {q['coverage']['overall']:.3f}"
        )
    for line in evaluation_hints(res):
        print(f"  note: {line}")
    print(f"  written to {res['json_path']}")
    return 0


def evaluation_hints(res: dict) -> list[str]:
    """What the numbers mean, in words: whether the synthetic set helped, and how far it is from real data."""
    out = []
    ref = res.get("reference_local")
    if ref:
        diff = 100 * (res["summary"]["balanced_accuracy"]["mean"] - ref["summary"]["balanced_accuracy"]["mean"])
        if diff < -0.5:
            private = ((res.get("run") or {}).get("enabled")) is not False
            why = (
                "at this privacy budget it carries more noise than signal for them"
                if private
                else "without privacy, it is a coarser picture of the data than a client's own records"
            )
            out.append(
                f"the synthetic set makes these classifiers WORSE than training on each client's real data "
                f"alone ({diff:+.2f} points of balanced accuracy): {why}. See docs/RESULTS.md for when it helps"
            )
        elif diff > 0.5:
            out.append(
                f"the synthetic set improves on each client's real data alone by {diff:+.2f} points of balanced "
                "accuracy"
            )
        else:
            out.append(f"the synthetic set changes little against each client's real data alone ({diff:+.2f} points)")
    q = res.get("quality")
    if q and q["c2st"]["accuracy"] >= 0.9:
        out.append(
            f"a classifier tells synthetic from real records apart {100 * q['c2st']['accuracy']:.0f} % of the "
            "time: the synthetic records are far from the real distribution"
        )
    return out


# ---------------------------------------------------------------------------------------- embed
def cmd_embed(args) -> int:
    from .embed import embed
    from .validate import check_output_path

    check_output_path(args.output, "output", directory=False)
    _check_json(args.json_path)

    summary = embed(
        args.input,
        args.output,
        model=args.model,
        source=args.source,
        weights=args.weights,
        batch_size=args.batch_size,
        image_size=args.image_size,
        resize=args.resize,
        device=args.device,
        limit=args.limit,
        hub_repo=args.hub_repo,
        progress=not args.no_progress,
    )
    print(f"wrote {summary.get('n')} embeddings of dimension {summary.get('dim')} to {args.output}")
    _write_json(args.json_path, summary)
    return 0


# ---------------------------------------------------------------------------------------- table
def cmd_table(args) -> int:
    from .table import load_table_config, run_table
    from .validate import check_output_dir

    check_output_dir(args.out)
    tc = load_table_config(args.config)
    if args.seeds:
        tc.seeds = list(args.seeds)
    if args.methods:
        tc.methods = list(args.methods)
        tc.__post_init__()
    command = (
        "fedhypevae table " + " ".join(sys.argv[2:])
        if sys.argv[1:2] == ["table"]
        else f"fedhypevae table --config {args.config} --out {args.out}"
    )
    res = run_table(tc, Path(args.out), command=command, progress=not args.no_progress, jobs=args.jobs)
    print(res["markdown"])
    print(f"written: {args.out}/table.md, table.csv, table.json, per_client_bacc.png")
    return 0


# ---------------------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from .generator import check_output_file, generate_from_run, write_samples

    out = check_output_file(args.out)
    x, y, info = generate_from_run(args.run, args.samples, seed=args.seed)
    write_samples(out, x, y)
    print(f"wrote {info['samples']} synthetic records ({info['dim']} features; per class {info['per_class']}) to {out}")
    print(f"  units: {info['units']}")
    print(
        f"  drawn from {args.run} with --seed {info['seed']}: post-processing of the run's DP releases, no epsilon "
        "spent"
    )
    return 0


# ---------------------------------------------------------------------------------------- config
def cmd_config(args) -> int:
    import yaml

    from .checkpoint import strict_json
    from .plan import resolve_plan

    cfg = load_config(args.config, args.overrides)
    plan = resolve_plan(cfg, check_data=not args.no_data)
    print(
        f"# resolved config ({args.config}{' + ' + ', '.join(args.overrides) if args.overrides else ''}); "
        "validated, nothing written or released"
    )
    print(yaml.safe_dump(strict_json(cfg.to_dict()), sort_keys=False).rstrip())
    print()
    print("# privacy plan")
    for line in plan["lines"]:
        print(line)
    return 0
