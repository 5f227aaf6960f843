"""The aggregation rule is an object chosen by name (fedhypevae/aggregation.py), and the trainer's hooks
(Trainer.hooks) let an observer follow the loop and time its phases without patching the trainer."""

import pytest
import torch

from fedhypevae.aggregation import AGGREGATIONS, DeltaAggregation, GradAggregation, register_aggregation
from fedhypevae.config import load_config
from fedhypevae.errors import ConfigError
from fedhypevae.trainer import TIMED_PHASES, Trainer


def tiny(*overrides):
    return load_config(
        "tiny",
        [
            "train.checkpoint_every=0",
            "privacy.noise_seed=5",
            "train.optimizer=sgd",
            "model.lambda_mmd=0",
            "train.rounds=2",
            "threads=1",
            *overrides,
        ],
    )


def trained(cfg, out) -> Trainer:
    tr = Trainer(cfg, out, progress=False)
    tr.setup()
    tr.train()
    tr.ledger.close()
    tr.writer.close()
    return tr


@pytest.fixture
def doubled():
    """A new rule, defined and registered here only: grad aggregation whose server step is doubled."""

    @register_aggregation("test-grad-x2")
    class DoubledGrad(GradAggregation):
        def apply_step(self, reduced):
            super().apply_step(2.0 * reduced)

    yield DoubledGrad
    AGGREGATIONS.pop("test-grad-x2")


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_a_rule_registered_outside_the_trainer_is_the_one_it_uses(tmp_path, doubled, engine):
    tr = trained(
        tiny("train.lr=0.01", f"train.engine={engine}", "federation.aggregation=test-grad-x2"), tmp_path / "x2"
    )
    assert isinstance(tr.aggregation, doubled)
    assert tr.engine == engine
    # SGD: a doubled gradient is a doubled learning rate, bit for bit (scaling by 2 is exact)
    twice_lr = trained(tiny("train.lr=0.02", f"train.engine={engine}"), tmp_path / "lr2")
    once = trained(tiny("train.lr=0.01", f"train.engine={engine}"), tmp_path / "lr1")
    assert type(twice_lr.aggregation) is GradAggregation
    torch.testing.assert_close(tr.flat_phi(tr.hyper), twice_lr.flat_phi(twice_lr.hyper), rtol=1e-6, atol=1e-8)
    assert not torch.allclose(tr.flat_phi(tr.hyper), once.flat_phi(once.hyper), rtol=1e-4, atol=1e-6)


def test_an_unknown_rule_and_a_rule_whose_clients_step_their_own_phi(tmp_path):
    cfg = tiny()
    cfg.federation.aggregation = "no-such-rule"
    with pytest.raises(ConfigError, match="no-such-rule"):
        Trainer(cfg, tmp_path / "a", progress=False)

    @register_aggregation("test-delta-copy")
    class DeltaCopy(DeltaAggregation):  # a per-client-Phi rule defined outside the package
        pass

    try:
        cfg = tiny("train.engine=batched", "train.rounds=1")
        cfg.federation.aggregation = "test-delta-copy"
        tr = trained(cfg, tmp_path / "b")
        # its blocks (one per client, each on its own copy of Phi) run the ghost-norm rows like every rule
        assert tr.engine == "batched" and tr.engine_note is None
        assert [st.block.ids for st in tr.steps] == [[c.id] for c in tr.clients]
        ref = trained(tiny("federation.aggregation=delta", "train.rounds=1"), tmp_path / "c")
        assert torch.equal(tr.flat_phi(tr.hyper), ref.flat_phi(ref.hyper))
    finally:
        AGGREGATIONS.pop("test-delta-copy")


@pytest.fixture
def per_block():
    """A rule that puts twice the noise on the client's own coordinates, or half on Phi's."""
    made = []

    def make(private: float, phi: float) -> str:
        name = f"test-blocks-{private}-{phi}"

        @register_aggregation(name)
        class Blocks(GradAggregation):
            def noise_multipliers(self, sigma):
                return {"private": private * sigma, "phi": phi * sigma}

        made.append(name)
        return name

    yield make
    for name in made:
        AGGREGATIONS.pop(name)


def state_vector(tr) -> torch.Tensor:
    """Phi and every client's private state (encoder, code), flat."""
    own = [p.detach().reshape(-1).double() for c in tr.clients for p in (*c.encoder.parameters(), c.code)]
    return torch.cat([tr.flat_phi(tr.hyper), *own])


def dp_sgd_sigmas(tr) -> set:
    return {m.noise_multiplier for _, hist in tr.ledger.histories() for m in hist if m.name == "dp-sgd"}


@pytest.mark.parametrize("private,phi", [(2.0, 1.0), (1.0, 0.5)], ids=["private-x2", "phi-half"])
def test_per_block_noise_is_placed_by_the_rule_on_both_engines_and_the_smaller_multiplier_is_charged(
    tmp_path, per_block, private, phi
):
    name = per_block(private, phi)
    fixed = ("privacy.target_epsilon=.inf", "privacy.noise_multiplier=1.5")  # no budget: every step runs
    plain = {e: trained(tiny(*fixed, f"train.engine={e}"), tmp_path / f"plain-{e}") for e in ("batched", "reference")}
    runs = {
        e: trained(tiny(*fixed, f"train.engine={e}", f"federation.aggregation={name}"), tmp_path / f"{name}-{e}")
        for e in ("batched", "reference")
    }
    sigma = plain["batched"].sigma
    for e, tr in runs.items():
        assert tr.engine == e
        assert tr.state.steps == plain[e].state.steps > 0
        assert dp_sgd_sigmas(tr) == {min(private, phi) * sigma}, e  # the ledger charges the smaller multiplier
        assert dp_sgd_sigmas(plain[e]) == {sigma}
        # the noise moved: the trained state differs from the same run with one multiplier everywhere
        assert not torch.allclose(state_vector(tr), state_vector(plain[e]), rtol=1e-4, atol=1e-6)
    # the engine places it exactly like the reference step (same generator draws, block by block)
    torch.testing.assert_close(state_vector(runs["batched"]), state_vector(runs["reference"]), rtol=1e-4, atol=1e-5)


def test_a_rule_without_noise_on_a_privatized_block_is_stopped_by_the_budget(tmp_path, per_block):
    name = per_block(0.0, 1.0)  # the client's own coordinates un-noised: the charge is sigma 0, epsilon infinite
    tr = trained(tiny(f"federation.aggregation={name}"), tmp_path / "run")
    assert tr.state.steps == 0 and "budget guard" in tr.state.stopped
    assert dp_sgd_sigmas(tr) == set()


@pytest.mark.parametrize("aggregation", ["grad", "delta"])
def test_hooks_fire_in_order_and_the_timers_see_every_phase(tmp_path, aggregation):
    cfg = tiny(f"federation.aggregation={aggregation}", "model.lambda_mmd=0")
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.setup()
    events, seconds = [], {}
    for name in ("round_begin", "step_begin", "step_end"):
        tr.hooks.on(name, lambda *a, name=name: events.append((name, *a)))
    tr.hooks.on("round_end", lambda r, metrics: events.append(("round_end", r, metrics["train/steps"])))
    tr.hooks.add_timer(lambda phase, dt: seconds.__setitem__(phase, seconds.get(phase, 0.0) + dt))
    tr.train()
    expected = []
    for r in range(2):
        expected.append(("round_begin", r))
        for s in range(2):
            expected += [("step_begin", r, s), ("step_end", r, s)]
        expected.append(("round_end", r, 2.0 * (r + 1)))
    assert events == expected
    phases = {"guard", "ledger", "all_reduce", "phi_update", "accounting", "engine"}
    assert tr.engine == "batched"  # tiny's default engine, under either rule
    assert phases <= set(seconds) <= set(TIMED_PHASES)
    assert all(seconds[k] > 0 for k in phases), seconds
    for st in tr.steps:  # the DP step's own phases, while timed
        assert st.profile and st.timings["forward"] > 0 and st.timings["noise"] > 0
    with pytest.raises(ValueError, match="step_begin"):
        tr.hooks.on("step_start", print)


def test_a_step_the_budget_guard_stops_begins_and_never_ends(tmp_path):
    cfg = tiny("train.rounds=3")
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.setup()
    for i in range(3):  # three steps spent elsewhere: three of the six planned steps remain
        tr.ledger.charge("dp-sgd", tr.plan.sigma, cfg.privacy.sample_rate, f"earlier/{i}")
    events = []
    tr.hooks.on("step_begin", lambda r, s: events.append(("begin", r, s)))
    tr.hooks.on("step_end", lambda r, s: events.append(("end", r, s)))
    tr.train()
    assert tr.state.stopped and tr.state.steps == 3
    assert events == [
        ("begin", 0, 0),
        ("end", 0, 0),
        ("begin", 0, 1),
        ("end", 0, 1),
        ("begin", 1, 0),
        ("end", 1, 0),
        ("begin", 1, 1),
    ]


def test_no_timer_no_cost():
    from fedhypevae.trainer import TrainerHooks

    h = TrainerHooks()
    assert h.timed("guard") is h.timed("ledger")  # one shared no-op context while nothing times
    assert not h.timing


def test_delta_is_refused_beyond_its_size_with_the_memory_it_would_take(tmp_path, monkeypatch):
    # delta copies Phi per client every round: for small federations (the limit, lowered here to 3 clients)
    monkeypatch.setattr(DeltaAggregation, "max_clients_per_rank", 3)
    cfg = load_config("tiny", ["federation.aggregation=delta", "partition.clients=5", "threads=1"])
    with pytest.raises(ConfigError, match=r"delta keeps a private copy of Phi .* \(5 clients on this rank: .* MB"):
        Trainer(cfg, tmp_path / "d", progress=False).setup()
    cfg = load_config("tiny", ["federation.aggregation=delta", "partition.clients=3", "threads=1"])
    Trainer(cfg, tmp_path / "ok", progress=False).setup()  # at the limit: built
