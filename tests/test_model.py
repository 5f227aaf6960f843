"""The model's pieces against independent references."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fedhypevae.model import (
    ClientView,
    Encoder,
    HyperNetwork,
    broadcast_shape,
    cat_last,
    elbo_terms,
    gaussian_nll,
    generator_params,
    kl_diag_gaussians,
    multi_kernel,
)


def _hyper(dim=6, K=3, **kw):
    torch.manual_seed(0)
    args = dict(latent_dim=4, code_dim=3, hidden=[8, 5], hyper_hidden=7, label_embed_dim=2)
    args.update(kw)
    h = HyperNetwork(dim, K, **args)
    # give h_theta's zero-initialized output layer some weight so modulation is not the identity
    torch.nn.init.normal_(h.h_theta[-1].weight, std=0.5)
    torch.nn.init.normal_(h.h_theta[-1].bias, std=0.5)
    return h


def test_kl_matches_torch_distributions():
    torch.manual_seed(1)
    mu_q, logvar_q, mu_p, logstd_p = (torch.randn(5, 4) for _ in range(4))
    ours = kl_diag_gaussians(mu_q, logvar_q, mu_p, logstd_p)
    ref = kl_divergence(Normal(mu_q, (0.5 * logvar_q).exp()), Normal(mu_p, logstd_p.exp())).sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_gaussian_nll_matches_torch_distributions():
    torch.manual_seed(2)
    x, mean, logstd = torch.randn(5, 6), torch.randn(5, 6), torch.randn(6) * 0.3
    ref = -Normal(mean, logstd.exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian_nll(x, mean, logstd), ref, rtol=1e-5, atol=1e-5)


def test_elbo_terms_match_a_hand_built_elbo():
    """ELBO = E_q[log p(x|z,y)] - KL(q || p_omega(.|y)) with the same reparameterized z."""
    h = _hyper()
    enc = Encoder(6, 3, 4, [8])
    code = torch.randn(3)
    x, y, eps = torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0]), torch.randn(5, 4)
    nll, kl = elbo_terms(enc, code, h, x, y, eps)
    y1h = torch.nn.functional.one_hot(y, 3).float()
    mu_q, logvar_q = enc(x, y1h)
    z = mu_q + (0.5 * logvar_q).exp() * eps
    mean = h.decode(h.decoder_modulation(code), z, y1h)
    ref_nll = -Normal(mean, h.output_logstd().exp()).log_prob(x).sum(-1)
    mu_p, logstd_p = h.prior(h.prior_features(code).unsqueeze(0), y)
    ref_kl = kl_divergence(Normal(mu_q, (0.5 * logvar_q).exp()), Normal(mu_p, logstd_p.exp())).sum(-1)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-5)


def test_row_scaled_decoder_equals_explicit_weights():
    """Eq. 3: decode() must equal a decoder built from W(v) = diag(d(v)) W and b(v) = b + db(v)."""
    h = _hyper()
    v = torch.randn(3)
    z, y1h = torch.randn(7, 4), torch.nn.functional.one_hot(torch.randint(0, 3, (7,)), 3).float()
    mods = h.decoder_modulation(v)
    out = h.decode(mods, z, y1h)
    a = torch.cat([z, y1h], -1)
    for i, (w, b, (d, db)) in enumerate(zip(h.base_weight, h.base_bias, mods)):
        W = torch.diag(d) @ w  # built explicitly
        a = a @ W.t() + (b + db)
        if i < len(h.base_weight) - 1:
            a = torch.nn.functional.silu(a)
    torch.testing.assert_close(out, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mods[0][0], torch.ones_like(mods[0][0]))  # modulation really is active


def test_different_codes_give_different_decoders_and_priors():
    h = _hyper()
    v1, v2 = torch.randn(3), torch.randn(3)
    z, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    y1h = torch.nn.functional.one_hot(y, 3).float()
    assert not torch.allclose(h.decode(h.decoder_modulation(v1), z, y1h), h.decode(h.decoder_modulation(v2), z, y1h))
    p1 = h.prior(h.prior_features(v1).unsqueeze(0), y)[0]
    p2 = h.prior(h.prior_features(v2).unsqueeze(0), y)[0]
    assert not torch.allclose(p1, p2)


def test_mixture_of_one_code_is_that_code():
    h = _hyper()
    v = torch.randn(3)
    mods, hw = generator_params(h, v)
    for (d, db), (d2, db2) in zip(mods, h.decoder_modulation(v)):
        torch.testing.assert_close(d, d2)
        torch.testing.assert_close(db, db2)
    torch.testing.assert_close(hw, h.prior_features(v))


def test_mixture_mixes_generated_parameters():
    """Eq. 13: theta_mix = sum_k pi_k h_theta(v_k)."""
    h = _hyper()
    codes, w = torch.randn(2, 3), torch.tensor([0.25, 0.75])
    mods, hw = generator_params(h, codes, w)
    m0, m1 = h.decoder_modulation(codes[0]), h.decoder_modulation(codes[1])
    torch.testing.assert_close(mods[1][0], 0.25 * m0[1][0] + 0.75 * m1[1][0])
    torch.testing.assert_close(hw, 0.25 * h.prior_features(codes[0]) + 0.75 * h.prior_features(codes[1]))


def test_spectral_projection_bounds_every_hyper_layer():
    h = _hyper()
    for lin in h.spectral_layers():
        with torch.no_grad():
            lin.weight.mul_(10)
    h.project_spectral(1.0)
    for lin in h.spectral_layers():
        assert torch.linalg.matrix_norm(lin.weight, ord=2) <= 1.0 + 1e-5


def test_the_spectral_norm_is_the_largest_singular_value():
    from fedhypevae.model import spectral_norm

    g = torch.Generator().manual_seed(0)
    for shape in [(1152, 64), (64, 8), (8, 64), (32, 64), (1, 5), (7, 1), (64, 64)]:
        w = torch.randn(*shape, generator=g) * 3
        want = float(torch.linalg.matrix_norm(w.double(), ord=2))
        assert abs(spectral_norm(w) / want - 1) < 1e-10, shape
    assert spectral_norm(torch.zeros(4, 3)) == 0.0


def test_multi_kernel_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    bws = [0.5, 2.0]
    ref = np.zeros((5, 4))
    for i in range(5):
        for j in range(4):
            d2 = ((a[i] - b[j]) ** 2).sum()
            ref[i, j] = sum(math.exp(-d2 / (2 * h * h)) for h in bws)
    out = multi_kernel(torch.tensor(a), torch.tensor(b), bws).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-10)


def test_client_view_loss_is_negative_elbo():
    h = _hyper()
    enc = Encoder(6, 3, 4, [8])
    view = ClientView(enc, torch.nn.Parameter(torch.randn(3)), h)
    x, y, eps = torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0]), torch.randn(5, 4)
    loss, (nll, kl) = view(x, y, eps)
    torch.testing.assert_close(loss, nll + kl)


def test_fixed_output_scale():
    """model.output_std fixes the decoder's scale: N(mean, std^2) whatever x_logstd holds, and x_logstd gets no
    gradient; by default the scale is the learned, soft-clamped x_logstd."""
    h = _hyper(output_std=0.1)
    with torch.no_grad():
        h.x_logstd.add_(torch.randn(6))
    torch.testing.assert_close(h.output_logstd(), torch.full((6,), math.log(0.1)))
    enc = Encoder(6, 3, 4, [8])
    x, y, eps = torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0]), torch.randn(5, 4)
    nll, kl = elbo_terms(enc, torch.randn(3), h, x, y, eps)
    (nll + kl).sum().backward()
    assert float(h.x_logstd.grad.abs().max()) == 0.0
    learned = _hyper()
    with torch.no_grad():
        learned.x_logstd.fill_(0.7)
    torch.testing.assert_close(learned.output_logstd(), 5.0 * torch.tanh(torch.full((6,), 0.7) / 5.0))


@pytest.mark.parametrize("output_noise", [False, True])
def test_metacode_moments_var_and_none_agree_with_the_covariance(output_noise):
    from fedhypevae.metacode import model_moments

    torch.manual_seed(0)
    h = HyperNetwork(6, 3, latent_dim=4, code_dim=3, hidden=[8], hyper_hidden=5, label_embed_dim=2)
    code, z = torch.randn(3), torch.randn(3, 50, 4)
    mean, cov = model_moments(h, code, z, output_noise=output_noise, second="cov")
    mean_v, var = model_moments(h, code, z, output_noise=output_noise, second="var")
    mean_n, none = model_moments(h, code, z, output_noise=output_noise, second="none")
    assert none is None and torch.equal(mean, mean_v) and torch.equal(mean, mean_n)
    torch.testing.assert_close(var, cov.diagonal(dim1=-2, dim2=-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "s, t", [((), ()), ((3,), ()), ((1, 4), (5, 1)), ((2, 1, 3), (4, 3)), ((7, 1), (7, 6)), ((0, 1), (1, 5))]
)
def test_broadcast_shape_is_torchs(s, t):
    assert broadcast_shape(s, t) == tuple(torch.broadcast_shapes(s, t)) == broadcast_shape(t, s)


def test_broadcast_shape_refuses_what_does_not_broadcast_and_cat_last_broadcasts():
    with pytest.raises(RuntimeError, match="do not broadcast"):
        broadcast_shape((2, 3), (4, 3))
    a, b = torch.randn(5, 1, 2), torch.randn(3, 4)
    out = cat_last(a, b)
    assert out.shape == (5, 3, 6)
    assert torch.equal(out[2, 1], torch.cat([a[2, 0], b[1]]))
