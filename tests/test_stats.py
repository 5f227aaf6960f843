"""DP class statistics, random features and the multi-kernel MMD."""

import math

import numpy as np
import pytest
import torch

from fedhypevae.errors import PrivacyError
from fedhypevae.privacy import (
    RandomFeatures,
    finalize_class_stats,
    gaussian_kernel_mmd2,
    mean_embedding_mmd2,
    release_class_stats,
    release_mean_embeddings,
)


def _data(n=60, d=5, k=3, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * scale
    y = torch.arange(n) % k
    return x, y


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _clip_np(x, c):
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, c / np.maximum(norms, 1e-12))


@pytest.mark.parametrize("covariance", ["full", "diag", "none"])
def test_sigma_zero_gives_exact_clipped_moments(covariance):
    x, y = _data()
    c = 3.0
    rel = release_class_stats(
        x, y, num_classes=3, clip_norm=c, noise_multiplier=0.0, covariance=covariance, generator=_gen()
    )
    assert rel["sum"].dtype == torch.float64 and rel["count"].dtype == torch.float64
    out = finalize_class_stats(rel, covariance=covariance)
    xc = _clip_np(x.double().numpy(), c)
    for k in range(3):
        rows = xc[y.numpy() == k]
        np.testing.assert_allclose(out["means"][k].numpy(), rows.mean(0), atol=1e-10)
        assert out["counts"][k].item() == len(rows)
        if covariance == "full":
            np.testing.assert_allclose(out["covariances"][k].numpy(), np.cov(rows.T, bias=True), atol=1e-9)
        elif covariance == "diag":
            np.testing.assert_allclose(out["variances"][k].numpy(), rows.var(0), atol=1e-9)
    assert ("second_moment" in rel) == (covariance != "none")


@pytest.mark.parametrize("covariance", ["full", "diag", "none"])
def test_a_public_center_is_clipped_around_and_added_back(covariance):
    """privacy.stats_center: the rows are clipped as x - center (one record still moves the sums by <= C) and the
    released means are those of the clipped centred rows plus the center; covariances are the centred rows'. Without
    clipping the center changes nothing (the moments are shift-invariant); with it, rows near the center keep more
    of themselves than they would around 0."""
    from fedhypevae.privacy import class_stat_sums

    x, y = _data(scale=0.5)
    x = x + 3.0  # records far from 0, near the center
    c, center = 2.0, 3.0
    kw = dict(num_classes=3, clip_norm=c, covariance=covariance)
    sums = class_stat_sums(x, y, center=center, **kw)
    out = finalize_class_stats(sums, covariance=covariance, center=center)
    xc = _clip_np(x.double().numpy() - center, c)
    for k in range(3):
        rows = xc[y.numpy() == k]
        np.testing.assert_allclose(out["means"][k].numpy(), rows.mean(0) + center, atol=1e-10)
        if covariance == "full":
            np.testing.assert_allclose(out["covariances"][k].numpy(), np.cov(rows.T, bias=True), atol=1e-9)
        elif covariance == "diag":
            np.testing.assert_allclose(out["variances"][k].numpy(), rows.var(0), atol=1e-9)
    assert (sums["sum"] - class_stat_sums(x[1:], y[1:], center=center, **kw)["sum"]).norm() <= c + 1e-9
    # no clipping in effect: the same means with and without the center
    big = dict(kw, clip_norm=1e6)
    a = finalize_class_stats(class_stat_sums(x, y, center=center, **big), covariance=covariance, center=center)
    b = finalize_class_stats(class_stat_sums(x, y, **big), covariance=covariance)
    np.testing.assert_allclose(a["means"].numpy(), b["means"].numpy(), atol=1e-9)
    # clipped around 0 the means shrink towards 0 (norms ~6.7 > C); around the center they stay near the data
    truth = np.stack([x.double().numpy()[y.numpy() == k].mean(0) for k in range(3)])
    around0 = finalize_class_stats(class_stat_sums(x, y, **kw), covariance=covariance)["means"].numpy()
    assert np.abs(out["means"].numpy() - truth).max() < 0.2 < np.abs(around0 - truth).max()


@pytest.mark.parametrize("covariance,split", [("none", [0.85, 0.15]), ("diag", [0.6, 0.3, 0.1])])
def test_a_budget_split_keeps_the_joint_sensitivity_and_moves_the_noise(covariance, split):
    """privacy.stats_split: in the units Delta_k / sqrt(m w_k) removing one record moves the joint vector by at most
    sqrt(m) (nearly attained), as with equal shares, and the noise of component k has std sigma Delta_k / sqrt(w_k)."""
    from fedhypevae.privacy import class_stat_sums
    from fedhypevae.privacy.stats import component_units, noise_class_stats

    m, c = len(split), 1.5
    unit = component_units(c, covariance, split)
    assert component_units(c, covariance, None) == {k: v for k, v in zip(unit, (c, 1.0, c * c))}  # equal: Delta_k
    x, y = _data(n=25, d=4, scale=5.0)
    kw = dict(num_classes=3, clip_norm=c, covariance=covariance)

    def scaled(s):
        return torch.cat([s[k].flatten() / unit[k] for k in unit])

    full = scaled(class_stat_sums(x, y, **kw))
    moves = [(full - scaled(class_stat_sums(x[keep], y[keep], **kw))).norm().item() for keep in _leave_one_out(25)]
    assert max(moves) <= math.sqrt(m) + 1e-9 and max(moves) > 0.9 * math.sqrt(m if covariance == "none" else 1.5)
    sigma, zero = 2.0, {k: torch.zeros(20000, 4) if k != "count" else torch.zeros(20000) for k in unit}
    noisy = noise_class_stats(
        zero, clip_norm=c, noise_multiplier=sigma, covariance=covariance, generator=_gen(), split=split
    )
    delta = {"sum": c, "count": 1.0, "second_moment": c * c}
    for k, w in zip(unit, split):
        assert noisy[k].std().item() == pytest.approx(sigma * delta[k] / math.sqrt(w), rel=0.03), k


def _leave_one_out(n):
    return [torch.arange(n) != i for i in range(n)]


def test_noisy_full_covariance_is_psd_and_rank_option():
    x, y = _data(n=30, d=8)
    rel = release_class_stats(
        x, y, num_classes=3, clip_norm=1.0, noise_multiplier=2.0, covariance="full", generator=_gen()
    )
    q = rel["second_moment"]
    assert torch.equal(q, q.transpose(1, 2))
    out = finalize_class_stats(rel, covariance="full")
    evals = torch.linalg.eigvalsh(out["covariances"])
    assert evals.min() >= -1e-10
    low = finalize_class_stats(rel, covariance="full", rank=2)
    evals = torch.linalg.eigvalsh(low["covariances"])
    assert evals.min() >= -1e-10
    assert ((evals > 1e-9).sum(-1) <= 2).all()
    diag = finalize_class_stats(
        release_class_stats(
            x, y, num_classes=3, clip_norm=1.0, noise_multiplier=2.0, covariance="diag", generator=_gen()
        ),
        covariance="diag",
    )
    assert (diag["variances"] > 0).all() and (diag["counts"] >= 0).all()


def _scaled_joint(rel, c, covariance):
    parts = [rel["sum"].flatten() / c, rel["count"].flatten()]
    if covariance == "full":
        parts.append(torch.triu(rel["second_moment"]).flatten() / c**2)
    elif covariance == "diag":
        parts.append(rel["second_moment"].flatten() / c**2)
    return torch.cat(parts)


@pytest.mark.parametrize("covariance,m", [("full", 3), ("diag", 3), ("none", 2)])
def test_joint_sensitivity_removing_one_row(covariance, m):
    x, y = _data(n=25, d=4, scale=5.0)  # most rows clipped
    c = 1.5
    kw = dict(num_classes=3, clip_norm=c, noise_multiplier=0.0, covariance=covariance, generator=_gen())
    full = _scaled_joint(release_class_stats(x, y, **kw), c, covariance)
    worst = 0.0
    for i in range(len(x)):
        keep = torch.arange(len(x)) != i
        delta = (full - _scaled_joint(release_class_stats(x[keep], y[keep], **kw), c, covariance)).norm().item()
        assert delta <= math.sqrt(m) + 1e-9
        worst = max(worst, delta)
    assert worst > 0.9 * math.sqrt(m) if covariance == "none" else worst > 1.0  # the bound is nearly attained


def test_noise_scale_matches_documented_std():
    x = torch.zeros(0, 4)
    y = torch.zeros(0, dtype=torch.long)
    sigma, c = 0.7, 2.0
    rel = release_class_stats(
        x, y, num_classes=2000, clip_norm=c, noise_multiplier=sigma, covariance="diag", generator=_gen()
    )
    assert rel["sum"].std().item() == pytest.approx(sigma * math.sqrt(3) * c, rel=0.05)
    assert rel["count"].std().item() == pytest.approx(sigma * math.sqrt(3), rel=0.05)
    assert rel["second_moment"].std().item() == pytest.approx(sigma * math.sqrt(3) * c**2, rel=0.05)


def test_release_is_reproducible_and_validated():
    x, y = _data()
    kw = dict(num_classes=3, clip_norm=1.0, noise_multiplier=1.0, covariance="diag")
    a = release_class_stats(x, y, generator=_gen(5), **kw)
    b = release_class_stats(x, y, generator=_gen(5), **kw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PrivacyError, match="covariance"):
        release_class_stats(
            x, y, num_classes=3, clip_norm=1.0, noise_multiplier=1.0, covariance="low", generator=_gen()
        )
    with pytest.raises(PrivacyError, match="labels"):
        release_class_stats(
            x, y, num_classes=2, clip_norm=1.0, noise_multiplier=1.0, covariance="diag", generator=_gen()
        )


# ----------------------------------------------------------------------------- DP-MERF


def test_random_features_unit_norm_and_public_seed():
    rf = RandomFeatures(dim=6, bandwidths=[0.5, 1.0, 2.0], features_per_bandwidth=64, seed=3)
    assert rf.num_features == 192
    x = torch.randn(50, 6) * 4
    phi = rf(x.double())
    np.testing.assert_allclose(phi.norm(dim=1).numpy(), 1.0, atol=1e-12)
    rf2 = RandomFeatures(dim=6, bandwidths=[0.5, 1.0, 2.0], features_per_bandwidth=64, seed=3)
    assert torch.equal(rf.omega, rf2.omega)
    with pytest.raises(PrivacyError):
        RandomFeatures(dim=6, bandwidths=[1.0], features_per_bandwidth=7, seed=0)


def test_mean_embedding_mmd_approximates_kernel_mmd():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 3, generator=g, dtype=torch.float64)
    b = torch.randn(200, 3, generator=g, dtype=torch.float64) + torch.tensor([0.8, 0.0, 0.0], dtype=torch.float64)
    bw = [0.5, 1.0, 2.0]
    exact = gaussian_kernel_mmd2(a, b, bw).item()
    rf = RandomFeatures(dim=3, bandwidths=bw, features_per_bandwidth=8192, seed=1)
    sums, counts = release_mean_embeddings(
        a, torch.zeros(200, dtype=torch.long), features=rf, num_classes=1, noise_multiplier=0.0, generator=_gen()
    )
    assert counts.item() == 200
    approx = mean_embedding_mmd2(sums[0] / counts[0], b, rf).item()
    assert exact > 0.05
    assert approx == pytest.approx(exact, rel=0.15, abs=0.01)


def test_mean_embedding_sensitivity_and_noise():
    rf = RandomFeatures(dim=4, bandwidths=[1.0], features_per_bandwidth=16, seed=0)
    x, y = _data(n=20, d=4, k=2)
    kw = dict(features=rf, num_classes=2, noise_multiplier=0.0, generator=_gen())
    s, n = release_mean_embeddings(x, y, **kw)
    s2, n2 = release_mean_embeddings(x[1:], y[1:], **kw)
    joint = torch.cat([(s - s2).flatten(), (n - n2).flatten()]).norm().item()
    assert joint == pytest.approx(math.sqrt(2), abs=1e-9)
    s, n = release_mean_embeddings(
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
        features=rf,
        num_classes=500,
        noise_multiplier=0.5,
        generator=_gen(),
    )
    assert s.dtype == torch.float64 and s.shape == (500, 16)
    assert s.std().item() == pytest.approx(0.5 * math.sqrt(2), rel=0.05)


def _mmd2_bruteforce(x, y, bws):
    def k(a, b):
        return sum(math.exp(-float(np.sum((a - b) ** 2)) / (2 * h * h)) for h in bws)

    kxx = np.mean([[k(a, b) for b in x] for a in x])
    kyy = np.mean([[k(a, b) for b in y] for a in y])
    kxy = np.mean([[k(a, b) for b in y] for a in x])
    return kxx + kyy - 2 * kxy


def test_gaussian_kernel_mmd2_matches_bruteforce_and_is_differentiable():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    y = rng.normal(size=(5, 3)) + 0.5
    bws = [0.3, 1.0, 2.5]
    xt = torch.tensor(x)
    yt = torch.tensor(y, requires_grad=True)
    val = gaussian_kernel_mmd2(xt, yt, bws)
    assert val.item() == pytest.approx(_mmd2_bruteforce(x, y, bws), abs=1e-6)
    val.backward()
    assert torch.isfinite(yt.grad).all() and yt.grad.abs().sum() > 0
    assert gaussian_kernel_mmd2(xt, xt, bws).item() == pytest.approx(0.0, abs=1e-9)
