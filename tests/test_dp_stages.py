"""The DP step object (`dp_step.DPStep`): one step whose stages are overridable methods.

A stage override on a client's `step_type` is honoured by Client.step (what leaves the client), by the
trainer on either form of the per-sample stage (the client gets a block of its own) and by the sensitivity
check, which drives the trainer's own step objects rather than a copy of the step.
"""

import copy
import dataclasses

import pytest
import torch
from helpers import trace_step

from fedhypevae.client import Client
from fedhypevae.config import TrainConfig, load_config
from fedhypevae.dp_step import DPStep, noise_blocks, per_sample_grads
from fedhypevae.privacy.sensitivity import SensitivityProbe, check_sensitivity, probe
from fedhypevae.rng import STREAM_STEP
from fedhypevae.trainer import Trainer

HAS_ENGINE = any(f.name == "engine" for f in dataclasses.fields(TrainConfig))


class NoNoise(DPStep):
    def add_noise(self, sums, *, sigma, gens):
        return sums


class Unclipped(DPStep):
    def clip_and_accumulate(self, rows):
        norms = rows.norms(self.cfg.privacy.mode == "strict")
        return self.accumulate(rows, torch.ones_like(norms)), norms


def make_client(step_type):
    class C(Client):
        pass

    C.step_type = step_type
    return C


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # no MMD term: then nothing is added to Phi after the noise, and phi_grad is the scaled noisy sum
    cfg = load_config(
        "tiny",
        ["train.rounds=1", "privacy.noise_seed=3", "model.lambda_mmd=0"]
        + (["train.engine=reference"] if HAS_ENGINE else []),
    )
    tr = Trainer(cfg, tmp_path_factory.mktemp("stages") / "run", progress=False)
    tr.setup()
    return tr


def twin(tr, cls=Client, i=0, cfg=None):
    """A client of class `cls` in exactly the state (and on the generator streams) of tr.clients[i] (under `cfg`)."""
    c = tr.clients[i]
    t = cls(
        tr.fed.client(c.id),
        cfg=cfg or tr.cfg,
        num_classes=tr.fed.num_classes,
        dim=tr.fed.dim,
        declared_size=c.declared_size,
    )
    t.load_state_dict(copy.deepcopy(c.state_dict()))
    return t


def test_a_client_runs_its_own_step_object_and_a_copy_gets_its_own(setup):
    c = twin(setup)
    assert type(c.dp_step) is DPStep and c.dp_step.block is c.block and c.block.M == 1 and c.dp_step is c.dp_step
    d = copy.deepcopy(c)
    assert d.dp_step.block is d.block and d.block is not c.block
    assert type(twin(setup, make_client(NoNoise)).dp_step) is NoNoise


def test_an_add_noise_override_makes_the_release_the_scaled_clipped_sum(setup):
    tr = setup
    plain, quiet = twin(tr), twin(tr, make_client(NoNoise))
    h1, h2 = copy.deepcopy(tr.hyper), copy.deepcopy(tr.hyper)
    pa, pb = plain.prepare_step(h1, 0, 0), quiet.prepare_step(h2, 0, 0)
    for a, b in zip(pa.payload(), pb.payload()):
        assert torch.equal(a, b)  # the same coins, the same clipped sum: only the noise stage differs
    assert len(pb.idx) > 0
    a = plain.release_step(pa, sigma=tr.sigma, features=tr.features)
    b = quiet.release_step(pb, sigma=tr.sigma, features=tr.features)
    assert tr.sigma > 0
    for n in b.phi_grad:
        # the scale stage divides Phi's sum (fp64, the precision of what leaves a block) by q * n_declared
        assert torch.equal(b.phi_grad[n], (pb.summed["hyper." + n].double() / pb.expected).float()), n
    assert any(not torch.equal(a.phi_grad[n], b.phi_grad[n]) for n in a.phi_grad)  # the default step adds noise


def test_a_clip_override_changes_the_payload(setup):
    tr = setup
    plain, raw = twin(tr), twin(tr, make_client(Unclipped))
    pa = plain.prepare_step(copy.deepcopy(tr.hyper), 0, 1)
    pb = raw.prepare_step(copy.deepcopy(tr.hyper), 0, 1)
    assert torch.equal(pa.idx, pb.idx) and len(pa.idx) > 0
    names = sorted(pb.summed)
    grads, _ = per_sample_grads(pb.view, names, pb.batch, pb.syn)
    for n in names:  # the override's payload is the unclipped sum ...
        torch.testing.assert_close(pb.summed[n], grads[n].sum(0), rtol=1e-5, atol=1e-6)
    assert pa.diag[3] > 0  # ... which differs, since some records were clipped by the default stage
    diff = torch.cat([(pa.summed[n] - pb.summed[n]).reshape(-1) for n in names]).norm()
    assert diff > 1e-3


def test_the_sensitivity_trace_is_client_step_through_the_same_step_class(setup):
    """trace_step on the client's own generator stream releases exactly what Client.step releases,
    and it runs the client's own step class (with the probe's stages mixed in)."""
    tr = setup
    for cls in (Client, make_client(NoNoise)):
        c, t = twin(tr, cls), twin(tr, cls)
        hc, ht = copy.deepcopy(tr.hyper), copy.deepcopy(tr.hyper)
        step = probe(t.dp_step)
        assert isinstance(step, type(t.dp_step)) and isinstance(step, SensitivityProbe) and step.block is t.block
        for s in range(2):
            out = c.step(hc, 0, s, sigma=tr.sigma, features=tr.features)
            trace = trace_step(t, ht, t.rng.generator(STREAM_STEP, 0, s), sigma=tr.sigma, features=tr.features)
            assert trace.phi.keys() == out.phi_grad.keys()
            for n in out.phi_grad:
                assert torch.equal(trace.phi[n], out.phi_grad[n]), n
            if cls is not Client:  # the class's override shows in the trace: released = payload / (q n)
                for n in trace.released:
                    assert torch.equal(trace.released[n], trace.payload[n] / trace.expected_batch)
        assert torch.equal(c.code, t.code)
        for a, b in zip(c.encoder.parameters(), t.encoder.parameters()):
            assert torch.equal(a, b)


def test_the_sensitivity_check_sees_a_stage_override_of_the_client(setup, tmp_path):
    """The check runs the trainer's own step objects, so a client whose clip stage does not clip is reported,
    and the same client with the plain step is not."""
    removals = [0, 3, 7, 11, 19]
    kw = {"remove": removals, "steps": 3, "seed": 2}
    ok = check_sensitivity(setup, setup.clients[0].id, **kw)
    assert ok.ok and any(r.in_batch for r in ok.rows)
    raw = Trainer(setup.cfg, tmp_path / "unclipped", progress=False, step_type=Unclipped)
    raw.setup()
    assert type(raw.steps[0]) is Unclipped
    bad = check_sensitivity(raw, raw.clients[0].id, **kw)
    assert not bad.ok and bad.max_payload_diff > setup.cfg.privacy.clip_norm * 1.01
    raw.ledger.close()
    raw.writer.close()


def test_an_empty_poisson_batch_releases_only_noise(setup):
    tr = setup
    cfg = copy.deepcopy(tr.cfg)
    cfg.privacy.sample_rate = 1e-6
    c = twin(tr, cfg=cfg)
    quiet = twin(tr, make_client(NoNoise), cfg=cfg)
    p, pq = c.prepare_step(copy.deepcopy(tr.hyper), 0, 0), quiet.prepare_step(copy.deepcopy(tr.hyper), 0, 0)
    assert len(p.idx) == 0 and all(torch.count_nonzero(t) == 0 for t in p.payload())
    out = c.release_step(p, sigma=tr.sigma, features=tr.features)
    assert all(torch.count_nonzero(v) > 0 for v in out.phi_grad.values())  # noise on every coordinate
    silent = quiet.release_step(pq, sigma=tr.sigma, features=tr.features)
    assert all(torch.count_nonzero(v) == 0 for v in silent.phi_grad.values())


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_a_client_with_its_own_step_gets_a_block_of_its_own_and_its_override_is_honoured(tmp_path, engine):
    """Either form of the per-sample stage runs the client's own step class: nothing is bypassed."""

    class Louder(DPStep):
        def add_noise(self, sums, *, sigma, gens):
            return super().add_noise(sums, sigma={k: 2 * v for k, v in noise_blocks(sigma).items()}, gens=gens)

    cfg = load_config(
        "tiny", ["train.rounds=1", "model.lambda_mmd=0", f"train.engine={engine}", "privacy.noise_seed=2"]
    )
    loud = Trainer(cfg, tmp_path / "loud", progress=False, step_type=lambda cid: Louder if cid == 1 else DPStep)
    plain = Trainer(cfg, tmp_path / "plain", progress=False)
    for t in (loud, plain):
        t.setup()
    assert loud.engine == plain.engine == engine and loud.engine_note is None
    assert [type(st) for st in loud.steps] == [DPStep, Louder] and loud.steps[1].block.ids == [1]
    sigma, _ = plain.step_noise()
    st = loud.steps[1]
    pend = st.prepare(loud.hyper, 0, 0)  # the noise a release adds: release minus scaled payload (no MMD term)
    payload = pend.sums.phi.clone()  # (a release consumes its pending sums)
    twice = st.release(pend, sigma=sigma).phi - payload / st.phi_divisor
    ref = DPStep(st.block, weights=st.weights.tolist(), per_sample=st.per_sample_kind)  # the same block: same state
    pend = ref.prepare(plain.hyper, 0, 0)
    payload = pend.sums.phi.clone()
    once = ref.release(pend, sigma=sigma).phi - payload / ref.phi_divisor
    torch.testing.assert_close(twice, 2 * once, rtol=1e-6, atol=1e-9)
    for t in (loud, plain):
        t.ledger.close()
        t.writer.close()


@pytest.mark.parametrize("kind", ["merf", "literal"])
@pytest.mark.parametrize("zero_weight", [False, True], ids=["weights", "a-zero-weight"])
def test_the_post_noise_term_in_groups_of_clients_is_the_term_over_the_whole_block(
    tmp_path, monkeypatch, kind, zero_weight
):
    """post_noise runs `_POST_GROUP` clients at a time (bounded working set): groups of 2 and of 3 give the codes'
    gradients, Phi's summed gradient and the MMD sum of one pass over all 7 clients, with the same synthetic draws."""
    import fedhypevae.dp_step as dp_step

    cfg = load_config("tiny", ["partition.clients=7", "partition.min_client_size=2", f"model.mmd_kind={kind}"])
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.setup()
    st = tr.steps[0]
    assert st.block.M == 7 and cfg.model.lambda_mmd > 0
    if zero_weight:
        st.weights[2] = 0.0
    hyper = tr.aggregation.step_hyper(st.block)
    out = {}
    for group in (1000, 3, 2):
        monkeypatch.setattr(dp_step, "_POST_GROUP", group)
        out[group] = st.post_noise(hyper, st.block.generators(0, 0), tr.features)
    (gv, gphi, mmd) = out[1000]
    assert gv.shape == st.block.codes.shape and gphi.dtype == torch.float64 and mmd > 0
    for group in (3, 2):
        g_v, g_phi, m = out[group]
        torch.testing.assert_close(g_v, gv, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_phi, gphi, rtol=1e-5, atol=1e-7)
        assert m == pytest.approx(mmd, rel=1e-5)
