"""Baselines on the federation's own splits: local-only, FedAvg/FedProx (non-private and DP-SGD),
DP-CVAE and the pooled upper bound."""

import numpy as np
import pytest
import torch

from fedhypevae.baselines import (
    BASELINES,
    DPSpec,
    fit_federated_linear,
    get_baseline,
    run_baseline,
    train_dpcvae,
)
from fedhypevae.baselines.linear import steps_per_epoch
from fedhypevae.config import DataConfig, PartitionConfig
from fedhypevae.data import build_federation
from fedhypevae.errors import ConfigError
from fedhypevae.evaluation import balanced_accuracy

EPS, DELTA = 1.0, 1e-4
FAST = {
    "local": {},
    "pooled": {},
    "fedavg": {"rounds": 5},
    "fedprox": {"rounds": 5},
    "fedavg-dp": {"rounds": 3, "sample_rate": 0.2},
    "fedprox-dp": {"rounds": 3, "sample_rate": 0.2},
    "dpcvae-loop": {"rounds": 2, "local_steps": 3, "hidden": 32, "latent_dim": 8, "samples_per_class": 4},
    "gaussian": {"samples_per_class": 20},
    "gaussian-distributed": {"samples_per_class": 20},
    "gaussian-central": {"samples_per_class": 20},
}


@pytest.fixture(scope="module")
def fed():
    return build_federation(
        DataConfig(path="digits"), PartitionConfig(kind="iid", clients=3, min_client_size=20), seed=0
    )


@pytest.fixture(scope="module")
def results(fed):
    return {name: run_baseline(name, fed, seed=0, epsilon=EPS, delta=DELTA, **FAST[name]) for name in BASELINES}


def test_registry_names():
    assert set(BASELINES) == {
        "local",
        "fedavg",
        "fedprox",
        "fedavg-dp",
        "fedprox-dp",
        "dpcvae-loop",
        "pooled",
        "gaussian",
        "gaussian-distributed",
        "gaussian-central",
    }
    assert set(FAST) == set(BASELINES)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_returns_per_client_rows(results, fed, name):
    res = results[name]
    assert res["baseline"] == name
    rows = res["clients"]
    assert [r["client"] for r in rows] == [c.client_id for c in fed.clients]
    for r, c in zip(rows, fed.clients):
        assert r["n_test"] == len(c.y_test)
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["balanced_accuracy"] <= 1.0
    s = res["summary"]
    assert s["clients"] == len(fed.clients)
    assert s["balanced_accuracy_mean"] == pytest.approx(np.mean([r["balanced_accuracy"] for r in rows]))
    assert res["private"] == (name.endswith("-dp") or name == "dpcvae-loop" or name.startswith("gaussian"))
    assert (res["privacy"] is None) == (not res["private"])


def test_pooled_upper_bound_beats_chance(results):
    assert results["pooled"]["summary"]["balanced_accuracy_mean"] > 0.8


def test_fedavg_non_private_learns(results):
    assert results["fedavg"]["summary"]["balanced_accuracy_mean"] > 0.6


@pytest.mark.parametrize("name", ["fedavg-dp", "fedprox-dp", "dpcvae-loop"])
def test_dp_variants_report_their_budget(results, fed, name):
    p = results[name]["privacy"]
    assert p["epsilon_spent"] <= EPS * (1 + 1e-9)
    assert p["epsilon_spent"] > 0.9 * EPS  # calibrated, not wildly over-noised
    assert p["sigma"] > 0 and p["delta"] == DELTA and p["accountant"] == "rdp"
    assert p["steps"] == p["planned_steps"]
    if name != "dpcvae-loop":
        q = FAST[name]["sample_rate"]
        assert p["sample_rate"] == q
        assert p["steps"] == FAST[name]["rounds"] * 1 * steps_per_epoch(q)
    assert p["noise"] == "secure" and p["formal_guarantee"]


def test_dpcvae_synthetic_set_and_steps(results, fed):
    res = results["dpcvae-loop"]
    n, K = FAST["dpcvae-loop"]["samples_per_class"], fed.num_classes
    x, y = res["x_syn"], res["y_syn"]
    assert x.shape == (n * K, fed.dim) and np.isfinite(x).all()
    assert np.bincount(y, minlength=K).tolist() == [n] * K
    assert res["privacy"]["steps"] == FAST["dpcvae-loop"]["rounds"] * FAST["dpcvae-loop"]["local_steps"]


def test_dpcvae_reproducible_with_noise_seed_and_non_private_mode(fed):
    # a fixed sigma is only checked against the budget (no calibration: fast)
    kw = dict(rounds=1, local_steps=2, hidden=16, latent_dim=4, samples_per_class=2, noise_seed=7, noise_multiplier=5.0)
    a = train_dpcvae(fed, seed=0, **kw)
    b = train_dpcvae(fed, seed=0, **kw)
    np.testing.assert_array_equal(a["x_syn"], b["x_syn"])
    assert a["privacy"]["noise"].startswith("reproducible")
    c = train_dpcvae(fed, seed=0, private=False, **kw)
    assert c["privacy"] is None and np.isfinite(c["x_syn"]).all()


def test_dp_fedavg_without_noise_or_clipping_equals_non_private(fed):
    """sigma = 0 and a huge C: DP-SGD is exactly the non-private Poisson-sampled run (same coins)."""
    common = dict(rounds=2, local_epochs=1, lr=0.5, sample_rate=0.25, seed=0, noise_seed=11)
    dp = fit_federated_linear(fed, dp=DPSpec(noise_multiplier=0.0, clip_norm=1e9, sample_rate=0.25), **common)
    plain = fit_federated_linear(fed, sampling="poisson", **common)
    for k in ("weight", "bias"):
        torch.testing.assert_close(dp[k], plain[k], rtol=1e-5, atol=1e-6)
    assert dp["weight"].abs().sum() > 0
    # with noise the result differs
    noisy = fit_federated_linear(fed, dp=DPSpec(noise_multiplier=1.0, clip_norm=1e9, sample_rate=0.25), **common)
    assert not torch.allclose(noisy["weight"], plain["weight"])


@pytest.mark.parametrize("private", [False, True])
def test_fedprox_with_mu_zero_equals_fedavg(fed, private):
    suffix = "-dp" if private else ""
    kw = dict(rounds=2, sample_rate=0.25, noise_seed=3) if private else dict(rounds=2)
    prox0 = run_baseline("fedprox" + suffix, fed, mu=0.0, **kw)
    avg = run_baseline("fedavg" + suffix, fed, **kw)
    for k in ("weight", "bias"):
        np.testing.assert_array_equal(prox0["model"][k], avg["model"][k])
    prox = run_baseline("fedprox" + suffix, fed, **kw)  # registered with mu = 0.05
    assert prox["settings"]["mu"] == 0.05
    assert not np.array_equal(prox["model"]["weight"], avg["model"]["weight"])


def test_unknown_names_and_settings_are_refused(fed):
    with pytest.raises(ConfigError) as err:
        get_baseline("fedsgd")
    for name in BASELINES:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="rounds"):
        run_baseline("fedavg", fed, roundz=3)


def test_balanced_accuracy_uses_classes_present_in_truth():
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx((2 / 3 + 1) / 2)
    assert balanced_accuracy([2, 2], [2, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):  # the package's one treatment of empty input (fedhypevae.evaluation.metrics)
        balanced_accuracy([], [])


@pytest.mark.parametrize("clip", [0.05, 1.0, 100.0])
def test_closed_form_clipped_linear_sums_equal_per_sample_gradients(fed, clip):
    """The DP linear baselines' clipped sums in closed form equal torch.func's per-sample gradients, clipped."""
    from fedhypevae.baselines.linear import PARAM_NAMES, LinearCE, clipped_linear_sums
    from fedhypevae.dp_step import clip_and_sum, per_sample_grads

    torch.manual_seed(0)
    model = LinearCE(fed.dim, fed.num_classes)
    c = fed.clients[0]
    x = torch.as_tensor(np.asarray(c.x_train[:40], np.float32))
    y = torch.as_tensor(np.asarray(c.y_train[:40], np.int64)).reshape(-1)
    want, _ = clip_and_sum(per_sample_grads(model, PARAM_NAMES, (x, y))[0], clip)
    got = clipped_linear_sums(model, x, y, clip)
    for n in PARAM_NAMES:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
    # unclipped: the gradient of the summed loss, as autograd gives it
    loss, _ = model(x, y)
    auto = dict(
        zip(PARAM_NAMES, torch.autograd.grad(loss.sum(), [dict(model.named_parameters())[n] for n in PARAM_NAMES]))
    )
    for n, t in clipped_linear_sums(model, x, y, None).items():
        torch.testing.assert_close(t, auto[n], rtol=1e-5, atol=1e-6)
