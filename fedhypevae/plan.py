"""What a run would do, without doing it: `fedhypevae config show`.

The privacy plan depends only on public settings (target epsilon and delta, the sampling rate, the number
of steps, the budget split), so it is computed exactly as `train` computes it before its first release. With
`check_data`, the data is loaded and every check `train` makes before writing anything runs too (the data's
shape, the partition, the statistics clip norm, the memory of the later stages); nothing is written and
nothing is released.
"""

from __future__ import annotations

from .config import Config
from .errors import ConfigError


def resolve_plan(cfg: Config, *, check_data: bool = True) -> dict:
    """{"plan": PrivacyPlan or None, "data": public facts or None, "lines": what to print}."""
    from .privacy import CLASS_STATS, DP_SGD, MMD_EMBEDDINGS, epsilon_of
    from .trainer import make_plan, planned_steps

    p = cfg.privacy
    use_mmd = cfg.model.lambda_mmd > 0 and cfg.model.mmd_kind == "merf"
    secure = p.enabled and p.secure_aggregation
    data = _check_data(cfg) if check_data else None
    if secure and data is None:
        raise ConfigError(
            "privacy.secure_aggregation: the plan depends on the model's size (the integer path's sensitivity in "
            "grid units), which needs the data's shape: run without --no-data"
        )
    plan = make_plan(cfg, use_mmd=use_mmd, integer=_integer(cfg, data) if secure else None)
    lines = []
    if plan is None:
        lines.append("privacy      : DISABLED (privacy.enabled=false): no clipping, no noise, no guarantee")
    else:
        target = "infinite (no budget)" if plan.target_epsilon == float("inf") else f"{plan.target_epsilon:g}"
        planned = plan.planned_epsilon
        lines.append(
            f"privacy      : {p.mode} mode, target epsilon {target}, delta {p.delta:g}, accountant "
            f"{p.accountant}; planned epsilon {planned:.4f} (all mechanisms composed)"
        )
        lines.append(
            f"DP-SGD       : sigma {plan.sigma:.4f}, clip norm C {p.clip_norm:g}, sample rate q "
            f"{plan.sample_rate:g}, {plan.steps} steps ({cfg.train.rounds} rounds x "
            f"{cfg.train.local_steps} local steps)"
        )
        # the budget split: each one-shot release is calibrated alone to its share of the target; DP-SGD's sigma
        # is then chosen so that the whole composed history meets the target (composition is sub-additive, so
        # the epsilons below do not add up to it)
        shares = {
            DP_SGD: 1.0 - p.stats_epsilon_fraction - (p.mmd_epsilon_fraction if use_mmd else 0.0),
            CLASS_STATS: p.stats_epsilon_fraction,
            MMD_EMBEDDINGS: p.mmd_epsilon_fraction,
        }
        lines.append(
            "epsilon split: share of the target per mechanism (privacy.stats_epsilon_fraction, "
            "privacy.mmd_epsilon_fraction; DP-SGD the rest), and the epsilon each spends alone"
        )
        for m in plan.mechanisms:
            alone = epsilon_of([m], delta=p.delta, accountant=p.accountant) if m.noise_multiplier > 0 else float("inf")
            lines.append(
                f"  {m.name:<15} {100 * shares.get(m.name, 0.0):>3.0f} %  sigma {m.noise_multiplier:.4f}, "
                f"q {m.sample_rate:g}, {m.steps} release(s), epsilon alone {alone:.4f}"
            )
        if p.noise_seed is not None:
            lines.append("noise        : reproducible from privacy.noise_seed: NOT suitable for a real release")
        if p.mode == "paper":
            lines.append("guarantee    : NOT formal (paper mode: the encoder and client code train without noise)")
        assert plan.steps == planned_steps(cfg)
    if secure:
        lines.append(
            f"secure agg.  : masked integer sums modulo 2**{p.secure_bits} between ranks, Skellam noise; DP-SGD and "
            f"the class statistics accounted as the Skellam mechanism (grid ratio {p.secure_grid_ratio:g})"
        )
    if data is not None:
        lines.append(
            f"data         : {data['source']}: {data['clients']} clients, {data['classes']} classes, "
            f"{data['dim']} features, transform {data['transform']}; statistics clip norm C_x "
            f"{data['stats_clip_norm']:g}; memory of the later stages checked"
        )
    elif check_data is False:
        lines.append("data         : not loaded (--no-data)")
    return {"plan": plan, "data": data, "lines": lines}


def _integer(cfg: Config, data: dict) -> dict:
    """The integer path's accounting parameters from the data's shape: Phi's size and the statistics' length."""
    from .model import HyperNetwork
    from .privacy.integer import integer_params
    from .privacy.stats import stats_flat_size

    hyper = HyperNetwork.from_config(data["dim"], data["classes"], cfg.model)
    phi = sum(q.numel() for q in hyper.parameters())
    stats = stats_flat_size(data["classes"], data["dim"], cfg.stats.covariance)
    return integer_params(phi_dim=phi, stats_dim=stats, grid_ratio=cfg.privacy.secure_grid_ratio)


def _check_data(cfg: Config) -> dict:
    """The checks `train` makes on the data before its first write (public facts only are returned)."""
    from .data import build_federation
    from .validate import validate_run

    fed = build_federation(cfg.data, cfg.partition, cfg.seed)
    ds = cfg.federation.declared_sizes
    if ds is not None and len(ds) != fed.num_clients:
        raise ConfigError(f"federation.declared_sizes must list {fed.num_clients} positive integers; got {ds}")
    clip = validate_run(
        cfg, transform=fed.transform, classes=fed.num_classes, dim=fed.dim, clients_here=fed.num_clients
    )
    return {
        "source": fed.source,
        "clients": fed.num_clients,
        "classes": fed.num_classes,
        "dim": fed.dim,
        "transform": fed.transform,
        "stats_clip_norm": float(clip),
    }
