"""An independent oracle for the batched engine, over model shapes the engine was never edited for.

The oracle is a `torch.func` per-sample-gradient loop over clients built from the model's own forward
(`ClientView`, one client at a time, `vmap(grad(.))` over its samples) — not from the engine's batched
evaluation and not from `dp_step`. The model is parametrized (encoder/decoder depth 1-3, head depth 1-3,
several widths, three activations): engine == oracle for every shape is the executable form of "a model
change touches model.py alone". A mutation check breaks the ghost norm of one layer type at a time and
the comparison must catch it; a source check keeps parameter names out of the engine.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from helpers import clip_between, clipped_sums
from torch.func import functional_call, grad, vmap

from fedhypevae import engine as engine_mod
from fedhypevae.block import ClientBlock
from fedhypevae.config import load_config
from fedhypevae.data import ClientData
from fedhypevae.engine import LAYER_TYPES, RecordingOps
from fedhypevae.model import ClientView, HyperNetwork

REL = 2e-5
# (encoder/decoder hidden widths, layers per hypernetwork head, activation)
SHAPES = {
    "depth1-silu-heads1": ((8,), 1, "silu"),
    "depth2-tanh-heads2": ((12, 7), 2, "tanh"),
    "depth3-gelu-heads3": ((6, 9, 5), 3, "gelu"),
    "depth3-tanh-heads3-wide": ((24, 16, 24), 3, "tanh"),
    "depth1-silu-heads3-narrow": ((3,), 3, "silu"),
}


def build(hidden, hyper_layers, activation, *, sizes=(25, 9, 17), dim=5, K=3, seed=0, extra=()):
    cfg = load_config(
        "tiny",
        [
            f"model.hidden={list(hidden)}",
            f"model.hyper_layers={hyper_layers}",
            f"model.activation={activation}",
            "model.latent_dim=3",
            "model.code_dim=4",
            "model.hyper_hidden=6",
            "model.label_embed_dim=2",
            "model.lambda_mmd=0",
            "privacy.noise_seed=1",
            *extra,
        ],
    )
    g = torch.Generator().manual_seed(seed)
    datas = []
    for i, n in enumerate(sizes):
        x = (torch.randn(n, dim, generator=g) * 2).numpy()
        y = torch.randint(0, K, (n,), generator=g).numpy()
        datas.append(ClientData(i, x, y, x[:1], y[:1], declared_size=n))
    block = ClientBlock.from_data(datas, cfg, num_classes=K, dim=dim)
    clients = [block.client(i) for i in range(block.M)]
    torch.manual_seed(seed + 7)
    hyper = HyperNetwork.from_config(dim, K, cfg.model)
    with torch.no_grad():  # away from the identity modulation and a zero output scale
        for p in hyper.parameters():
            p.add_(0.3 * torch.randn(p.shape))
        for c in clients:
            c.code.normal_()
        if hyper.class_anchor is not None:  # model.class_anchor: a released a_y per class (a buffer)
            hyper.class_anchor.copy_(torch.randn(hyper.class_anchor.shape))
    return cfg, clients, hyper


def draws(clients, counts, latent, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, n in zip(clients, counts):
        idx = torch.randint(0, len(c.y), (n,), generator=g)
        out.append((c.x[idx], c.y[idx], torch.randn(n, latent, generator=g)))
    return out


def oracle(client, hyper, x, y, eps, mode: str, C: float):
    """torch.func per-sample gradients of one client's loss; clipped jointly to C and summed."""
    view = ClientView(client.encoder, client.code, hyper)
    params = {n: p.detach() for n, p in view.named_parameters()}
    names = [n for n in params if mode == "strict" or n.startswith("hyper.")]

    def loss(tp, xj, yj, ej):
        out, _ = functional_call(view, {**params, **tp}, (xj[None], yj[None], ej[None]))
        return out.sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0, 0))({n: params[n] for n in names}, x, y, eps)
    norms = sum(t.reshape(len(x), -1).pow(2).sum(1) for t in g.values()).sqrt()
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factor, t) for n, t in g.items()}, norms


def worst_mismatch(shape, mode: str, per_sample: str = "ghost", extra=()) -> float:
    """max over clients and parameters of the relative difference engine vs oracle (norms and clipped sums)."""
    cfg, clients, hyper = build(*shape, extra=extra)
    batches = draws(clients, [11, 4, 0], cfg.model.latent_dim)
    xs, ys, es = (list(t) for t in zip(*batches))
    _, norms = clipped_sums(clients, cfg, hyper, xs, ys, es, mode=mode, clip_norm=1.0, per_sample=per_sample)
    C = clip_between(torch.cat(norms))  # some samples clipped, some not
    sums, norms = clipped_sums(clients, cfg, hyper, xs, ys, es, mode=mode, clip_norm=C, per_sample=per_sample)
    worst, clipped, unclipped = 0.0, 0, 0
    for i, c in enumerate(clients):
        if len(ys[i]) == 0:
            assert norms[i].numel() == 0 and all(float(t.abs().max()) == 0 for t in sums[i].values())
            continue
        want, want_norms = oracle(c, hyper, xs[i], ys[i], es[i], mode, C)
        clipped, unclipped = clipped + int((want_norms > C).sum()), unclipped + int((want_norms < C).sum())
        assert set(sums[i]) == set(want)
        worst = max(worst, float((norms[i] - want_norms).norm() / want_norms.norm()))
        for n, t in want.items():
            worst = max(worst, float((sums[i][n] - t).norm() / t.norm().clamp_min(1e-30)))
    assert clipped > 0 and unclipped > 0
    return worst


@pytest.mark.parametrize("mode", ["strict", "paper"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_engine_equals_the_torch_func_oracle_for_every_model_shape(shape, mode):
    assert worst_mismatch(SHAPES[shape], mode) <= REL


@pytest.mark.parametrize("per_sample", ["ghost", "materialized"])
@pytest.mark.parametrize("mode", ["strict", "paper"])
def test_a_fixed_decoder_output_scale_equals_the_oracle(mode, per_sample):
    # model.output_std fixes the output log-scale: x_logstd still enters through per_row, with zero gradient
    assert worst_mismatch(SHAPES["depth2-tanh-heads2"], mode, per_sample, extra=["model.output_std=0.2"]) < REL


@pytest.mark.parametrize("per_sample", ["ghost", "materialized"])
@pytest.mark.parametrize("mode", ["strict", "paper"])
def test_a_plain_cvae_without_modulation_or_learned_prior_equals_the_oracle(mode, per_sample):
    # model.modulation false, model.prior standard (the DP-CVAE baseline on this engine): no heads at all, the code
    # gets no gradient; relu between the layers and a fixed output scale, as that baseline has
    extra = ["model.modulation=false", "model.prior=standard", "model.activation=relu", "model.output_std=0.7071"]
    extra += ["privacy.stats_epsilon_fraction=0"]
    assert worst_mismatch(SHAPES["depth2-tanh-heads2"], mode, per_sample, extra=extra) < REL


@pytest.mark.parametrize("per_sample", ["ghost", "materialized"])
@pytest.mark.parametrize("mode", ["strict", "paper"])
def test_a_class_anchored_decoder_equals_the_oracle(mode, per_sample):
    # model.class_anchor: the decoder's mean is a_y + its output (a_y a buffer: it shifts every gradient, it has none)
    extra = ["model.class_anchor=true", "model.output_std=0.5"]
    assert worst_mismatch(SHAPES["depth2-tanh-heads2"], mode, per_sample, extra=extra) < REL
    cfg, clients, hyper = build(*SHAPES["depth2-tanh-heads2"], extra=extra)
    (x, y, e), *_ = draws(clients, [11, 4, 0], cfg.model.latent_dim)
    with_anchor = oracle(clients[0], hyper, x, y, e, mode, 1.0)[1]
    with torch.no_grad():
        hyper.class_anchor.zero_()
    assert not torch.allclose(with_anchor, oracle(clients[0], hyper, x, y, e, mode, 1.0)[1])


@pytest.mark.parametrize("mode", ["strict", "paper"])
def test_the_materialized_rows_equal_the_oracle_too(mode):
    """The DP step's other form of the per-sample stage (train.engine=reference) against the same oracle."""
    assert worst_mismatch(SHAPES["depth3-gelu-heads3"], mode, per_sample="materialized") <= REL


@pytest.mark.parametrize("kind", LAYER_TYPES)
def test_a_broken_ghost_norm_of_any_layer_type_is_caught(kind, monkeypatch):
    """Mutation check: scale one layer type's per-sample squared norms; the oracle comparison must fail."""
    real = RecordingOps.norm2_parts

    def broken(self):
        parts = real(self)
        parts[kind] = parts[kind] * 1.5
        return parts

    monkeypatch.setattr(RecordingOps, "norm2_parts", broken)
    assert worst_mismatch(SHAPES["depth2-tanh-heads2"], "strict") > 10 * REL  # the equality test fails


def _parameter_name_words() -> set:
    _, clients, hyper = build((4, 4), 3, "silu", sizes=(3,))
    view = ClientView(clients[0].encoder, clients[0].code, hyper)
    return {w for n, _ in view.named_parameters() for w in n.split(".") if not w.isdigit()}


def test_the_engine_names_no_parameter():
    """The engine finds the model's parameters through the math it runs, never by name: no string literal in
    engine.py (outside docstrings and messages) is, or has a dotted part that is, a parameter name."""
    tree = ast.parse(Path(engine_mod.__file__).read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    words = _parameter_name_words()
    assert {"weight", "bias", "code", "x_logstd", "h_theta", "base_weight"} <= words
    found = [
        c.value
        for c in ast.walk(tree)
        if isinstance(c, ast.Constant)
        and isinstance(c.value, str)
        and id(c) not in docstrings
        and not re.search(r"\s", c.value)
        and any(part in words for part in c.value.split("."))
    ]
    assert not found, f"parameter names spelled in engine.py: {found}"


@pytest.mark.parametrize("layout", ["contiguous", "view"])
@pytest.mark.parametrize("steps", [[0, 0, 0], [3, 0, 7]], ids=["equal-steps", "unequal-steps"])
def test_stacked_adam_is_each_clients_torch_adam(steps, layout):
    """The block's optimizer on (M, ...) stacks is torch.optim.Adam (fused) per client, also with unequal steps, and
    also when a gradient stack is a non-contiguous view (columns of a wider buffer: torch's fused kernel reads such a
    gradient as if it were contiguous and computes a wrong update)."""
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(3, 40, 50, generator=g)]
    grads = [torch.randn(3, 40, 50, generator=g)]
    if layout == "view":
        wide = torch.randn(3, 40 * 50 + 7, generator=g)
        wide[:, 3 : 3 + 40 * 50] = grads[0].reshape(3, -1)
        grads = [wide[:, 3 : 3 + 40 * 50].view(3, 40, 50)]
        assert not grads[0].is_contiguous()
    ms, vs = [torch.randn(3, 40, 50, generator=g) * 0.1], [torch.rand(3, 40, 50, generator=g) * 0.1]
    counts = torch.tensor(steps, dtype=torch.float32)[:, None].clone()
    want = []
    for i in range(3):
        p = torch.nn.Parameter(params[0][i].clone())
        opt = torch.optim.Adam([p], lr=0.01, betas=(0.8, 0.95), eps=1e-7, fused=True)
        opt.state[p] = {
            "step": torch.tensor(float(steps[i])),
            "exp_avg": ms[0][i].clone(),
            "exp_avg_sq": vs[0][i].clone(),
        }
        p.grad = grads[0][i].contiguous().clone()
        opt.step()
        want.append(p.detach())
    ClientBlock.adam(params, grads, ms, vs, counts, {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-7})
    assert torch.equal(params[0], torch.stack(want))
    assert counts.flatten().tolist() == [s + 1 for s in steps]


def _clipped(shape=((8,), 2, "silu")):
    cfg, clients, hyper = build(*shape)
    xs, ys, es = (list(t) for t in zip(*draws(clients, [5, 3, 2], cfg.model.latent_dim)))
    return clipped_sums(clients, cfg, hyper, xs, ys, es, mode="strict", clip_norm=1.0)


def test_a_parameter_used_twice_is_refused_not_under_clipped(monkeypatch):
    """Per-use ghost norms miss the cross term of a parameter used twice (tied weights): the engine refuses."""
    from fedhypevae import model

    monkeypatch.setattr(
        model.HyperNetwork,
        "output_logstd",
        lambda self, ops=model.PLAIN: (
            0.5 * (ops.per_row(self.x_logstd, model._clamp5) + ops.per_row(self.x_logstd, model._clamp5))
        ),
    )
    with pytest.raises(ValueError, match="x_logstd.*twice"):
        _clipped()


def test_a_parameter_used_outside_the_layer_types_is_refused(monkeypatch):
    """A Phi parameter used in plain torch would get no per-sample gradient in the engine: refused, named."""
    from fedhypevae import model

    monkeypatch.setattr(
        model.HyperNetwork, "output_logstd", lambda self, ops=model.PLAIN: model.soft_clamp(self.x_logstd, 5.0)
    )
    with pytest.raises(ValueError, match="saw no layer using x_logstd"):
        _clipped()


def test_a_non_elementwise_or_doubled_head_activation_is_refused():
    cfg, clients, hyper = build((8,), 2, "silu")
    hyper.h_omega[1] = torch.nn.Softmax(dim=-1)
    xs, ys, es = (list(t) for t in zip(*draws(clients, [5, 3, 2], cfg.model.latent_dim)))
    with pytest.raises(ValueError, match="elementwise"):
        clipped_sums(clients, cfg, hyper, xs, ys, es, mode="strict", clip_norm=1.0)
