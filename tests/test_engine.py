"""The DP step's ghost-norm rows (train.engine=batched) against the torch.func reference: per-sample norms,
clipped sums, noise, training.

The reference is `dp_step.per_sample_grads` + `clip_and_sum` on one client's `ClientView`, and training with
train.engine=reference (the same DP step with torch.func per-sample gradients).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clip_between, clipped_sums

from fedhypevae.block import ClientBlock
from fedhypevae.config import load_config
from fedhypevae.data import ClientData
from fedhypevae.dp_step import DPStep, clip_and_sum, per_sample_grads
from fedhypevae.engine import ghost_refusal
from fedhypevae.errors import ConfigError
from fedhypevae.model import ClientView, HyperNetwork
from fedhypevae.rng import STREAM_STEP, secret_generators
from fedhypevae.run import run_training
from fedhypevae.trainer import Trainer

REL = 1e-5


def make(sizes, *, hidden=(8,), dim=6, K=3, seed=0, overrides=()):
    """Clients of the given sizes with random data and a randomized (non-trivial) hypernetwork."""
    cfg = load_config(
        "tiny",
        [
            f"model.hidden={list(hidden)}",
            "model.latent_dim=3",
            "model.code_dim=4",
            "model.hyper_hidden=5",
            "model.label_embed_dim=2",
            "model.lambda_mmd=0",
            "privacy.noise_seed=1",
            *overrides,
        ],
    )
    g = torch.Generator().manual_seed(seed)
    datas = []
    for i, n in enumerate(sizes):
        x = (torch.randn(n, dim, generator=g) * 2).numpy()
        y = torch.randint(0, K, (n,), generator=g).numpy()
        datas.append(ClientData(i, x, y, x[:1], y[:1], declared_size=max(n, 1)))
    block = ClientBlock.from_data(datas, cfg, num_classes=K, dim=dim)
    clients = [block.client(i) for i in range(block.M)]  # views of the block's rows
    torch.manual_seed(seed + 100)
    m = cfg.model
    hyper = HyperNetwork(
        dim,
        K,
        latent_dim=m.latent_dim,
        code_dim=m.code_dim,
        hidden=m.hidden,
        hyper_hidden=m.hyper_hidden,
        label_embed_dim=m.label_embed_dim,
    )
    with torch.no_grad():  # away from the identity modulation (d = 1, db = 0) and from zero x_logstd
        torch.nn.init.normal_(hyper.h_theta[-1].weight, std=0.4)
        torch.nn.init.normal_(hyper.h_theta[-1].bias, std=0.2)
        hyper.x_logstd.normal_(std=0.5)
        for c in clients:
            c.code.normal_()
    return cfg, clients, hyper


def batches(clients, counts, latent, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs, ys, es = [], [], []
    for c, n in zip(clients, counts):
        idx = torch.randint(0, len(c.y), (n,), generator=g)
        xs.append(c.x[idx])
        ys.append(c.y[idx])
        es.append(torch.randn(n, latent, generator=g))
    return xs, ys, es


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference(client, hyper, x, y, eps, mode, C):
    view = ClientView(client.encoder, client.code, hyper)
    names = [n for n, _ in view.named_parameters()]
    if mode == "paper":
        names = [n for n in names if n.startswith("hyper.")]
    grads, _ = per_sample_grads(view, names, (x, y, eps))
    return clip_and_sum(grads, C)


CASES = {  # sizes of the clients' data, realized batch per client, hidden widths
    "strict-one-hidden": ("strict", [30, 30, 30], [7, 5, 9], (8,)),
    "strict-deep-unequal-with-empty": ("strict", [60, 12, 40, 25], [21, 0, 3, 11], (16, 12)),
    "paper-unequal-with-empty": ("paper", [50, 20, 35], [0, 6, 13], (10,)),
    "strict-single-sample-clients": ("strict", [5, 5], [1, 1], (8, 8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_norms_and_clipped_sums_match_the_torch_func_reference(case):
    mode, sizes, counts, hidden = CASES[case]
    cfg, clients, hyper = make(sizes, hidden=hidden, seed=len(case))
    xs, ys, es = batches(clients, counts, cfg.model.latent_dim)
    # C: the median per-sample norm, so that some samples are clipped and some are not
    _, norms = clipped_sums(clients, cfg, hyper, xs, ys, es, mode=mode, clip_norm=1.0)
    C = clip_between(torch.cat(norms))  # some samples clipped, some not
    sums, norms = clipped_sums(clients, cfg, hyper, xs, ys, es, mode=mode, clip_norm=C)
    clipped = unclipped = 0
    for i, c in enumerate(clients):
        if counts[i] == 0:  # an empty batch: zero sums over every privatized parameter
            assert norms[i].numel() == 0 and all(float(t.abs().max()) == 0 for t in sums[i].values())
            continue
        ref_sum, ref_norms = reference(c, hyper, xs[i], ys[i], es[i], mode, C)
        assert rel(norms[i], ref_norms) <= REL, (i, norms[i], ref_norms)
        assert set(sums[i]) == set(ref_sum)
        for name, want in ref_sum.items():
            assert rel(sums[i][name], want) <= REL, (i, name, rel(sums[i][name], want))
        clipped += int((ref_norms > C).sum())
        unclipped += int((ref_norms < C).sum())
    assert clipped > 0 and unclipped > 0
    expected = {"strict": {"code"} | {"encoder." + n for n, _ in clients[0].encoder.named_parameters()}, "paper": set()}
    assert set(sums[0]) == expected[mode] | {"hyper." + n for n, _ in hyper.named_parameters()}


@pytest.mark.parametrize("threads", [1, 2])
def test_the_noise_of_a_client_is_one_flat_draw_from_its_own_generator(threads):
    """Noise format 2: client i's noise is ONE normal_ call over its row (its code, its encoder's parameters in
    sorted-name order, then Phi in parameter order) from its own generator, whatever the number of threads; the
    Phi part enters the block's sum with the client's coefficient."""
    cfg, clients, hyper = make([10, 10, 10], seed=3)
    st = DPStep(clients[0].block, weights=[1.0, 1.0, 1.0])
    st.draws.noise_threads = threads
    layout = tuple((n, tuple(p.shape)) for n, p in hyper.named_parameters())
    gens = [c.rng.generator(STREAM_STEP, 2, 1) for c in clients]
    enc, code, phi = st._noise(gens, True, True, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), layout)
    block = clients[0].block
    sizes = [block.codes.shape[1]] + [int(np.prod(s)) for _, s in sorted(zip(block.enc_names, block.enc_shapes))]
    P = sum(p.numel() for p in hyper.parameters())
    row = torch.empty(sum(sizes) + P).normal_(generator=clients[1].rng.generator(STREAM_STEP, 2, 1))
    parts = list(row.split(sizes + [P]))
    assert torch.equal(code[1], parts[0])
    by_name = dict(zip(sorted(block.enc_names), parts[1:-1]))
    for n, e in zip(block.enc_names, enc):
        assert torch.equal(e[1].reshape(-1), by_name[n]), n
    assert torch.equal(phi.float(), parts[-1])


def test_secure_local_noise_draws_phis_noise_once_per_block_with_the_summed_variance():
    """Local trust with secure noise: the block's Phi noise is ONE draw of N(0, sum_i c_i^2) (only the weighted sum
    leaves the block), from a generator of its own, independent of the clients' rows, which hold their own
    coordinates only (one normal_ each from their generator). The variance is checked over many coordinates and
    releases: a draw scaled by sum_i c_i (or the mean c, or one client's) fails it, and a summed draw seeded like the
    first client's generator would repeat that client's own noise."""
    cfg, clients, hyper = make([10, 10, 10], seed=3, overrides=["privacy.noise_seed=null"])
    st = DPStep(clients[0].block, weights=[1.0, 1.0, 1.0])
    assert st.phi_noise_summed
    layout = tuple((n, tuple(p.shape)) for n, p in hyper.named_parameters())
    block = clients[0].block
    sizes = [block.codes.shape[1]] + [int(np.prod(s)) for _, s in sorted(zip(block.enc_names, block.enc_shapes))]
    coef = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    totals, corr = [], []
    for step in range(40):
        gens = [c.rng.generator(STREAM_STEP, 2, step) for c in clients]
        seeds = [g.initial_seed() for g in gens]
        enc, code, phi = st._noise(gens, True, True, coef, layout)
        for i in range(3):  # each client's own row: its own generator's first draws
            row = torch.empty(sum(sizes)).normal_(generator=secret_generators([seeds[i]])[0])
            assert torch.equal(code[i], row[: sizes[0]])
        first = torch.empty(phi.numel()).normal_(generator=secret_generators([seeds[0]])[0])
        corr.append(float(torch.corrcoef(torch.stack([phi.float(), first]))[0, 1]))
        totals.append(phi)
    t = torch.cat(totals)
    want = float(coef.pow(2).sum().sqrt())  # 2.29; sum 3.5, mean 1.17
    assert t.numel() > 5000
    assert abs(float(t.std()) / want - 1) < 0.05 and abs(float(t.mean())) < 0.05 * want
    assert max(abs(c) for c in corr) < 0.2
    # reproducible noise, another trust model or a block of one client: a draw per client, as before
    for over, sizes_ in ((["privacy.noise_seed=4"], [10, 10]), (["privacy.noise_seed=null"], [10])):
        _, cl, _ = make(sizes_, seed=3, overrides=over)
        assert not DPStep(cl[0].block, weights=[1.0] * len(sizes_)).phi_noise_summed
    _, cl, _ = make([10, 10], seed=3, overrides=["privacy.noise_seed=null", "privacy.trust_model=distributed"])
    assert not DPStep(cl[0].block, weights=[1.0, 1.0]).phi_noise_summed


@pytest.mark.parametrize("noise", ["reproducible", "secure"])
def test_every_client_releases_calibrated_noise_when_all_batches_are_empty(noise):
    over = ["privacy.sample_rate=1e-6"] + (["privacy.noise_seed=null"] if noise == "secure" else [])
    cfg, clients, hyper = make([20, 40, 30], dim=40, hidden=(32,), overrides=over, seed=5)
    w = [0.2, 0.5, 0.3]
    st = DPStep(clients[0].block, weights=w)
    before = [p.detach().clone() for p in clients[2].encoder.parameters()]
    sigma = 1.5
    rel = st.step(hyper, 0, 0, sigma=sigma, features=None)
    phi, diag = rel.phi, rel.diag
    assert diag[2] == 0  # no sample in any batch
    # every Phi coordinate carries sum_i w_i N(0, (sigma C)^2) / (q n_i): that variance, not zero
    C, q = cfg.privacy.clip_norm, cfg.privacy.sample_rate
    std = sigma * C * np.sqrt(sum((wi / (q * len(c.y))) ** 2 for wi, c in zip(w, clients)))
    assert phi.numel() > 1000 and abs(float(phi.std()) / std - 1) < 0.1 and abs(float(phi.mean())) < 0.1 * std
    # and every encoder took a (noisy) Adam step
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, clients[2].encoder.parameters()))


def test_client_state_dicts_are_per_client_copies_of_the_block_rows():
    cfg, clients, hyper = make([15, 15, 15], seed=7)
    st = DPStep(clients[0].block, weights=[1 / 3] * 3)
    st.step(hyper, 0, 0, sigma=1.0, features=None)
    sd = clients[1].state_dict()
    tensors = [
        sd["code"],
        *sd["encoder"].values(),
        *sd["enc_adam"]["m"].values(),
        *sd["enc_adam"]["v"].values(),
        sd["enc_adam"]["steps"],
        sd["code_adam"]["m"],
        sd["code_adam"]["v"],
        sd["code_adam"]["steps"],
    ]
    assert sd["enc_adam"]["steps"].tolist() == [1.0] * len(sd["encoder"]) and float(sd["code_adam"]["steps"]) == 1.0
    for t in tensors:  # own storage: a copy never carries another client's state
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    torch.testing.assert_close(sd["code"], st.block.codes[1])
    # a client view reads and writes its block's row
    assert clients[1].code.data_ptr() == st.block.codes[1].data_ptr()
    clients[0].load_state_dict(sd)
    torch.testing.assert_close(st.block.codes[0], st.block.codes[1], rtol=0, atol=0)
    for stack in st.block.enc_params:
        assert torch.equal(stack[0], stack[1])


def phi_of(run: Path) -> torch.Tensor:
    sd = torch.load(run / "hypernetwork.pt", weights_only=True)
    return torch.cat([v.reshape(-1).double() for v in sd.values()])


def client_state(run: Path, cid: int) -> torch.Tensor:
    from fedhypevae.checkpoint import client_state as saved

    last = sorted((run / "checkpoints").glob("round_*"))[-1]
    names = sorted(torch.load(last / "rank_00000.pt", weights_only=True)["blocks"][0]["state"])
    enc = [n[len("enc.") :] for n in names if n.startswith("enc.")]
    sd = saved(last, cid, enc)
    return torch.cat([sd["code"].reshape(-1)] + [sd["encoder"][n].reshape(-1) for n in enc]).double()


@pytest.mark.parametrize(
    "extra",
    [
        ["privacy.mode=strict"],
        ["privacy.mode=paper", "model.lambda_mmd=0"],
        ["privacy.enabled=false"],
        ["privacy.sample_rate=0.02", "model.hidden=[16,8]"],  # many empty Poisson batches
    ],
    ids=["strict-merf", "paper", "non-private", "empty-batches"],
)
def test_training_with_the_batched_engine_equals_the_reference(tmp_path, extra):
    common = ["privacy.noise_seed=4", "train.rounds=2", *extra]
    got = run_training(load_config("tiny", [*common, "train.engine=batched"]), tmp_path / "b", progress=False)
    want = run_training(load_config("tiny", [*common, "train.engine=reference"]), tmp_path / "r", progress=False)
    assert got["training"]["engine"] == "batched" and want["training"]["engine"] == "reference"
    a, b = phi_of(tmp_path / "b"), phi_of(tmp_path / "r")
    assert rel(a, b) <= REL
    for cid in range(4):  # the private states too
        assert rel(client_state(tmp_path / "b", cid), client_state(tmp_path / "r", cid)) <= REL
    assert got["privacy"]["epsilon_spent"] == want["privacy"]["epsilon_spent"]
    for k, v in want["training"]["final"].items():
        assert got["training"]["final"][k] == pytest.approx(v, rel=1e-4), k


def test_resume_with_the_other_engine_matches_an_uninterrupted_run(tmp_path):
    """Checkpoints stay per client: a run checkpointed by the reference resumes under the batched engine."""
    common = ["privacy.noise_seed=9", "train.checkpoint_every=1"]
    run_training(load_config("tiny", [*common, "train.engine=batched"]), tmp_path / "full", progress=False)
    cfg = load_config("tiny", [*common, "train.engine=reference"])
    tr = Trainer(cfg, tmp_path / "cut", progress=False)
    tr.setup()
    tr.run_round(0)
    tr.state.round = 1
    tr.save_checkpoint()
    res = run_training(
        load_config("tiny", [*common, "train.engine=batched"]), tmp_path / "cut", resume=True, progress=False
    )
    assert res["training"]["engine"] == "batched"
    assert rel(phi_of(tmp_path / "cut"), phi_of(tmp_path / "full")) <= REL


def test_engine_setting_is_validated_and_only_a_coupled_loss_needs_torch_func(tmp_path):
    """Every rule runs on the ghost-norm rows (delta too: one block per client on its own Phi); only a per-sample
    loss that couples rows (the literal MMD cross term) makes the step materialize its rows, and says so."""
    with pytest.raises(ConfigError, match="train.engine must be batched .* or reference"):
        load_config("tiny", ["train.engine=fast"])
    assert ghost_refusal(load_config("tiny")) is None
    assert ghost_refusal(load_config("tiny", ["federation.aggregation=delta"])) is None
    assert "literal" in ghost_refusal(load_config("tiny", ["model.mmd_kind=literal"]))
    tr = Trainer(
        load_config("tiny", ["federation.aggregation=delta", "train.rounds=1"]), tmp_path / "delta", progress=False
    )
    tr.setup()
    assert tr.engine == "batched" and tr.engine_note is None
    assert [st.block.M for st in tr.steps] == [1] * len(tr.clients)  # each client steps its own copy of Phi
    tr.ledger.close()
    tr.writer.close()
    cfg = load_config("tiny", ["model.mmd_kind=literal", "train.rounds=1"])
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.setup()
    assert tr.engine == "reference" and "torch.func" in tr.engine_note and "literal" in tr.engine_note
    res = tr.finish({})
    assert json.loads((tmp_path / "run" / "results.json").read_text())["training"]["engine"] == "reference"
    assert res["training"]["engine_note"].startswith(
        "train.engine=batched computes per-sample gradients with torch.func"
    )


def test_the_noise_threads_follow_torchs_thread_count():
    """A process told to use one thread (the `threads` setting, a table's --jobs) draws its noise in that thread:
    ranks sharing a node's cores do not each start a thread per core."""
    from fedhypevae.dp_step import NoiseDraws

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert NoiseDraws().noise_threads == 1
        torch.set_num_threads(2)
        assert NoiseDraws().noise_threads == min(2, len(os.sched_getaffinity(0)))
        assert NoiseDraws(threads=3).noise_threads == 3
    finally:
        torch.set_num_threads(n)
