"""The DP step's stages: per-sample gradients, clipping, noise, normalization."""

import torch

from fedhypevae.dp_step import (
    NoiseSpec,
    add_noise_and_scale,
    clip_and_sum,
    per_sample_grads,
    poisson_sample,
    sample_norms,
)
from fedhypevae.model import ClientView, Encoder, HyperNetwork


def _view(seed=0):
    torch.manual_seed(seed)
    h = HyperNetwork(6, 3, latent_dim=4, code_dim=3, hidden=[8], hyper_hidden=5, label_embed_dim=2)
    torch.nn.init.normal_(h.h_theta[-1].weight, std=0.3)
    return ClientView(Encoder(6, 3, 4, [8]), torch.nn.Parameter(torch.randn(3)), h)


def _batch(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) * 3, torch.randint(0, 3, (n,), generator=g), torch.randn(n, 4, generator=g)


def test_per_sample_grads_equal_a_loop_of_single_backward_passes():
    view = _view()
    x, y, eps = _batch()
    names = [n for n, _ in view.named_parameters()]
    grads, (nll, kl) = per_sample_grads(view, names, (x, y, eps))
    params = dict(view.named_parameters())
    for j in range(len(x)):
        loss, _ = view(x[j : j + 1], y[j : j + 1], eps[j : j + 1])
        ref = torch.autograd.grad(loss.sum(), [params[n] for n in names])
        for n, r in zip(names, ref):
            torch.testing.assert_close(grads[n][j], r, rtol=1e-4, atol=1e-5)
    assert nll.shape == (len(x),)


def test_clipping_leaves_small_gradients_and_bounds_large_ones():
    view = _view()
    x, y, eps = _batch(n=9)
    names = [n for n, _ in view.named_parameters()]
    grads, _ = per_sample_grads(view, names, (x, y, eps))
    norms = sample_norms(grads)
    C = float(norms.median())  # half the samples below, half above
    small, large = norms < C, norms > C
    assert small.any() and large.any()
    for j in range(len(x)):
        one = {n: g[j : j + 1] for n, g in grads.items()}
        clipped, _ = clip_and_sum(one, C)
        cn = sample_norms({n: c.unsqueeze(0) for n, c in clipped.items()})[0]
        if small[j]:
            for n in names:  # below C: unchanged
                torch.testing.assert_close(clipped[n], grads[n][j], rtol=1e-5, atol=1e-7)
        else:
            assert cn <= C * (1 + 1e-5)
            torch.testing.assert_close(cn, torch.tensor(C, dtype=cn.dtype), rtol=1e-4, atol=1e-6)


def test_clipped_sum_changes_by_at_most_C_when_one_record_is_removed():
    view = _view()
    x, y, eps = _batch(n=8)
    names = [n for n, _ in view.named_parameters()]
    C = 0.5
    full, _ = clip_and_sum(per_sample_grads(view, names, (x, y, eps))[0], C)
    minus, _ = clip_and_sum(per_sample_grads(view, names, (x[1:], y[1:], eps[1:]))[0], C)
    diff = torch.sqrt(sum((full[n] - minus[n]).pow(2).sum() for n in names))
    assert diff <= C * (1 + 1e-5)


def test_noise_has_the_calibrated_scale_and_divides_by_the_expected_batch():
    summed = {"a": torch.zeros(20000), "b": torch.zeros(50, 40)}
    spec = NoiseSpec(noise_multiplier=2.0, clip_norm=0.5, expected_batch=4.0)
    out = add_noise_and_scale(summed, spec=spec, generator=torch.Generator().manual_seed(0))
    allv = torch.cat([v.reshape(-1) for v in out.values()])
    # std of (N(0, (sigma C)^2)) / (q n) = 2 * 0.5 / 4
    assert abs(float(allv.std()) - 0.25) < 0.01
    assert abs(float(allv.mean())) < 0.01


def test_noise_is_reproducible_from_the_same_generator_seed_and_differs_otherwise():
    summed = {"a": torch.ones(10)}
    spec = NoiseSpec(1.0, 1.0, 1.0)
    a = add_noise_and_scale(summed, spec=spec, generator=torch.Generator().manual_seed(5))["a"]
    b = add_noise_and_scale(summed, spec=spec, generator=torch.Generator().manual_seed(5))["a"]
    c = add_noise_and_scale(summed, spec=spec, generator=torch.Generator().manual_seed(6))["a"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_poisson_sampling_rate():
    idx = poisson_sample(100000, 0.1, torch.Generator().manual_seed(0))
    assert abs(len(idx) / 100000 - 0.1) < 0.005
    assert len(poisson_sample(50, 0.0, torch.Generator().manual_seed(0))) == 0


def test_add_noise_then_scale_is_add_noise_and_scale_bit_for_bit():
    """The step object's noise and scale stages, run one after the other, are the combined function."""
    from fedhypevae.dp_step import add_noise, scale

    summed = {"b": torch.randn(5, 3), "a": torch.randn(7)}
    spec = NoiseSpec(1.3, 0.7, 2.5)
    both = add_noise_and_scale(summed, spec=spec, generator=torch.Generator().manual_seed(9))
    staged = scale(add_noise(summed, std=1.3 * 0.7, generator=torch.Generator().manual_seed(9)), 2.5)
    assert both.keys() == staged.keys()
    for n in both:
        assert torch.equal(both[n], staged[n])
    assert not torch.equal(staged["a"], summed["a"] / 2.5)  # noise was added
    quiet = add_noise(summed, std=0.0, generator=torch.Generator().manual_seed(9))
    assert all(quiet[n] is summed[n] for n in summed)  # std 0: nothing drawn, nothing changed
