"""The DP Gaussian sampler baseline: one release of per-class statistics at the whole epsilon, noise where the
trust model puts it, and a synthetic set drawn from the released means and spread."""

import math

import numpy as np
import pytest

from fedhypevae.baselines.gaussian import BUDGET_SPLIT, dp_gaussian_sampler
from fedhypevae.config import DataConfig, PartitionConfig
from fedhypevae.data import build_federation
from fedhypevae.errors import ConfigError
from fedhypevae.methods import METHODS, run_baseline
from fedhypevae.privacy import calibrate_one_shot
from fedhypevae.privacy.stats import clip_rows


@pytest.fixture(scope="module")
def fed():
    return build_federation(
        DataConfig(path="digits"), PartitionConfig(kind="dirichlet", alpha=0.5, clients=8, min_client_size=20), seed=0
    )


def clean_release(fed, clip, center=0.0):
    """The per-class sums of clipped rows (of x - center), counts and squared norms over every client's train split."""
    import torch

    x = torch.as_tensor(np.concatenate([c.x_train for c in fed.clients]), dtype=torch.float64) - center
    y = np.concatenate([np.asarray(c.y_train).reshape(-1) for c in fed.clients])
    xc = clip_rows(x, clip).numpy()
    K, d = fed.num_classes, fed.dim
    out = np.zeros((K, d + 2))
    for k in range(K):
        out[k, :d] = xc[y == k].sum(0)
        out[k, d] = (y == k).sum()
        out[k, d + 1] = (xc[y == k] ** 2).sum()
    return out


@pytest.mark.parametrize("trust, draws", [("local", "M"), ("distributed", "M/(M-1)"), ("central", "1")])
def test_noise_of_each_component_is_what_the_trust_model_and_split_say(fed, trust, draws):
    eps, delta, clip = 1.0, 1e-4, 2.0
    res = dp_gaussian_sampler(fed, epsilon=eps, delta=delta, clip_norm=clip, trust_model=trust, noise_seed=3)
    noise = res["release"] - clean_release(fed, clip)
    sigma = calibrate_one_shot(epsilon=eps, delta=delta, accountant="rdp")
    M = len(fed.clients)
    factor = {"M": M, "M/(M-1)": M / (M - 1), "1": 1.0}[draws]
    d = fed.dim
    sums = noise[:, :d].ravel()  # K * d = 640 draws: the std is known to a few per cent
    expected = sigma * clip / math.sqrt(BUDGET_SPLIT[0]) * math.sqrt(factor)
    assert np.std(sums) == pytest.approx(expected, rel=0.12)
    assert abs(np.mean(sums)) < 4 * expected / math.sqrt(len(sums))
    # the counts and squared norms: K = 10 draws each, only their order of magnitude is testable
    for col, delta_k, share in ((d, 1.0, BUDGET_SPLIT[1]), (d + 1, clip**2, BUDGET_SPLIT[2])):
        rms = np.sqrt(np.mean(noise[:, col] ** 2))
        assert 0.4 < rms / (sigma * delta_k / math.sqrt(share) * math.sqrt(factor)) < 1.8
    p = res["privacy"]
    assert p["epsilon_spent"] <= eps * (1 + 1e-9) and p["epsilon_spent"] > 0.95 * eps
    assert p["trust_model"] == trust and p["simulated"] == (trust == "distributed")
    assert p["budget_split"] == {"sums": 0.8, "counts": 0.15, "squared_norms": 0.05}


def test_a_center_is_clipped_around_and_given_back_to_the_means(fed):
    """center: the release is of the clipped x - center (its sums differ from the uncentred release's by exactly the
    shift where nothing is clipped), and the means and the spread it gives are the data's, not shifted."""
    clip, c = 1e6, 0.3  # nothing clipped: the release is the clean one, shifted
    res = dp_gaussian_sampler(fed, private=False, samples_per_class=4000, center=c, clip_norm=clip)
    ref = dp_gaussian_sampler(fed, private=False, samples_per_class=4000)
    d = fed.dim
    counts = ref["release"][:, d]
    np.testing.assert_allclose(res["release"][:, :d], ref["release"][:, :d] - c * counts[:, None], atol=1e-9)
    np.testing.assert_allclose(res["x_syn"].mean(0), ref["x_syn"].mean(0), atol=0.02)
    private = dp_gaussian_sampler(fed, epsilon=1.0, clip_norm=2.0, center=c, noise_seed=3)
    assert private["privacy"]["center"] == c and private["settings"]["center"] == c
    noise = private["release"] - clean_release(fed, 2.0, center=c)
    sigma = calibrate_one_shot(epsilon=1.0, delta=1e-4, accountant="rdp")
    expected = sigma * 2.0 / math.sqrt(BUDGET_SPLIT[0]) * math.sqrt(len(fed.clients))
    assert np.std(noise[:, :d]) == pytest.approx(expected, rel=0.12)  # the clip of the centred rows: 2


def test_without_privacy_the_means_and_spread_are_the_data_s(fed):
    res = dp_gaussian_sampler(fed, private=False, samples_per_class=4000)
    assert res["privacy"] is None
    x = np.concatenate([c.x_train for c in fed.clients])
    y = np.concatenate([np.asarray(c.y_train).reshape(-1) for c in fed.clients])
    for k in range(fed.num_classes):
        syn = res["x_syn"][res["y_syn"] == k]
        # the draws are clipped to [0, 1]: compare where the class mean is inside, away from the edges
        inside = (x[y == k].mean(0) > 0.2) & (x[y == k].mean(0) < 0.8)
        assert np.abs(syn.mean(0)[inside] - x[y == k].mean(0)[inside]).max() < 0.05
    resid = sum(((x[y == k] - x[y == k].mean(0)) ** 2).sum() for k in range(fed.num_classes))
    assert res["diagnostics"]["pooled_variance"] == pytest.approx(resid / (len(x) * fed.dim), rel=1e-6)


def test_registered_and_scored_like_every_generative_baseline(fed):
    for name, trust in (
        ("gaussian", "local"),
        ("gaussian-distributed", "distributed"),
        ("gaussian-central", "central"),
    ):
        m = METHODS[name]
        assert m.output == "synthetic" and m.privacy == "dp" and m.uses_epsilon and m.fixed["trust_model"] == trust
    res = run_baseline("gaussian-central", fed, seed=0, protocol="synthetic-only", noise_seed=1)
    assert len(res["clients"]) == len(fed.clients) and res["protocol"] == "synthetic-only"
    assert res["summary"]["balanced_accuracy_mean"] > 0.3  # central noise at epsilon = 1 keeps the class means


def test_bad_settings_are_refused_with_the_culprit(fed):
    with pytest.raises(ConfigError, match="budget_split"):
        dp_gaussian_sampler(fed, budget_split=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="trust_model"):
        dp_gaussian_sampler(fed, trust_model="shuffle")
    with pytest.raises(ConfigError, match="collusion"):
        dp_gaussian_sampler(fed, trust_model="distributed", collusion=len(fed.clients))
    with pytest.raises(ConfigError, match="trust_model"):
        run_baseline("gaussian", fed, trust_model="central")  # fixed by the registry entry, not a setting
