"""FedHypeVAE's networks: client encoder, shared hypernetwork Phi, and the client view.

The hypernetwork Phi = (Phi_theta, Phi_omega) holds
  * the shared decoder base weights W_l, b_l, modulated per client by row scales and bias
    shifts (Eq. 3): W_l(v) = diag(d_l(v)) W_l, b_l(v) = b_l + db_l(v), with (d_l, db_l) = h_theta(v);
  * the class-prior generator (Eq. 4): (mu_{v,y}, log sigma_{v,y}) = g_omega(h_omega(v), e(y)),
    with e(y) a learned label embedding;
  * a per-dimension output log-scale of the Gaussian decoder p_theta(x | z, y).

Because diag(d) W h = d * (W h), a client's decoder is one matmul with the shared base weights
followed by a per-row scale: clients never materialize their own weight matrices.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LOG2PI = math.log(2 * math.pi)
ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}
PRIORS = ("learned", "standard")  # p_omega(z | y) from the code (Eq. 4), or N(0, I) for every class
# activations applied elementwise (what the batched engine may carry a per-row gradient through)
ELEMENTWISE = (nn.SiLU, nn.Tanh, nn.GELU, nn.ReLU, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.Softplus)


def mlp(sizes: list[int], act="silu") -> nn.Sequential:
    """Linear layers of the given sizes with `act` (a name in ACTIVATIONS, or a module class) between them."""
    act = ACTIVATIONS[act] if isinstance(act, str) else act
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def one_hot(y: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """One-hot without F.one_hot's data-dependent range check, which vmap cannot trace."""
    return (y.unsqueeze(-1) == torch.arange(num_classes, device=y.device)).to(dtype)


def soft_clamp(t: torch.Tensor, bound: float) -> torch.Tensor:
    """Keeps log-scales in (-bound, bound) smoothly so exp() never overflows under DP noise."""
    return bound * torch.tanh(t / bound)


def broadcast_shape(s: tuple, t: tuple) -> tuple:
    """numpy's broadcasting of two shapes, in plain Python (torch.broadcast_shapes imports sympy at its first call,
    a third of a second at every rank's start, and is slower per call on the hot path)."""
    n = max(len(s), len(t))
    s, t = (1,) * (n - len(s)) + tuple(s), (1,) * (n - len(t)) + tuple(t)
    out = []
    for x, y in zip(s, t):
        if x != y and 1 not in (x, y):
            raise RuntimeError(f"shapes {tuple(s)} and {tuple(t)} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(out)


def cat_last(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dimension, broadcasting the leading ones (a client's value against its rows)."""
    lead = broadcast_shape(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*lead, a.shape[-1]), b.expand(*lead, b.shape[-1])], dim=-1)


def _clamp5(t: torch.Tensor) -> torch.Tensor:
    return soft_clamp(t, 5.0)


class FixedLogstd:
    """An elementwise function of x_logstd that ignores it: the decoder's output log-scale fixed at log(std).
    x_logstd still enters the math through `per_row` (its gradient is then zero), so every form of the DP step
    sees the same parameters."""

    def __init__(self, std: float):
        self.logstd = math.log(float(std))

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t * 0.0 + self.logstd


def _row_scale(t: torch.Tensor) -> torch.Tensor:
    return 1.0 + torch.tanh(t)


# ------------------------------------------------------------------------------------------ layer types
class Ops:
    """How the model's math is evaluated: one method per layer type.

    The networks below are written ONCE, against these methods. This class evaluates them plainly
    (one client: what `torch.func` differentiates in the reference DP step and the tests' oracle).
    The batched engine (`engine.RecordingOps`) evaluates the same math for every client of a rank at
    once and records, per layer type, what its per-sample gradient norms and clipped sums need:

    * `private_linear`: a layer of a client's own network (the encoder psi_i), per-sample inputs;
    * `head_linear` / `head_activation` / `to_rows`: the hypernetwork heads, whose input is a
      client-level value (the code v_i) shared by all of the client's samples; `to_rows` hands the
      head's output to the per-sample rows, optionally in pieces through elementwise functions
      (computed once per client, not per row);
    * `shared_linear` / `add_bias`: a layer of Phi applied to per-sample inputs;
    * `embed`: rows of an embedding table picked by a per-sample index;
    * `per_row`: a Phi vector (through an elementwise function) used by every sample (the decoder's
      output log-scale).
    Anything else (activations after per-sample layers, losses) is plain torch. Each parameter enters
    the math through exactly one of these calls per step; head activations and `per_row`'s function are
    elementwise (the engine checks what it can and refuses the rest).
    """

    def private_input(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def private_linear(self, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(a, w, b)

    def private_output(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def head_linear(self, s: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(s, w, b)

    def head_activation(self, act: nn.Module, u: torch.Tensor) -> torch.Tensor:
        return act(u)

    def to_rows(self, o: torch.Tensor, parts=None):
        """A head's client-level output, handed to the rows: `o` itself, or with `parts` = [(width, f)] the
        list of its consecutive pieces, each through its elementwise f (None: as is)."""
        if parts is None:
            return o
        pieces = o.split([w for w, _ in parts], dim=-1)
        return [t if f is None else f(t) for t, (_, f) in zip(pieces, parts)]

    def shared_linear(self, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(a, w, b)

    def add_bias(self, t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return t + b

    def embed(self, idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, table)

    def per_row(self, p: torch.Tensor, f=None) -> torch.Tensor:
        """f(p) for every row; f is elementwise (None: the identity)."""
        return p if f is None else f(p)


PLAIN = Ops()


def run_private(ops: Ops, seq: nn.Sequential, h: torch.Tensor, layers=None) -> torch.Tensor:
    """A client's own MLP on per-sample rows. `layers` replaces the modules' (weight, bias) pairs
    (the engine's stacks over clients); activations are the modules of `seq`."""
    h = ops.private_input(h)
    k = 0
    for m in seq:
        if isinstance(m, nn.Linear):
            w, b = layers[k] if layers is not None else (m.weight, m.bias)
            h = ops.private_linear(h, w, b)
            k += 1
        else:
            h = m(h)
    return ops.private_output(h)


def run_head(ops: Ops, seq: nn.Sequential, v: torch.Tensor, parts=None):
    """A hypernetwork head on client-level inputs (one code, or one per client), handed to the rows
    (whole, or in `parts`: see `Ops.to_rows`)."""
    s = v
    for m in seq:
        s = ops.head_linear(s, m.weight, m.bias) if isinstance(m, nn.Linear) else ops.head_activation(m, s)
    return ops.to_rows(s, parts)


def run_shared(ops: Ops, seq: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """A Phi MLP on per-sample rows."""
    for m in seq:
        h = ops.shared_linear(h, m.weight, m.bias) if isinstance(m, nn.Linear) else m(h)
    return h


class Encoder(nn.Module):
    """q_psi(z | x, y): client-local MLP on [x, onehot(y)] -> (mu, log var). Never leaves the client."""

    def __init__(self, dim: int, num_classes: int, latent_dim: int, hidden: list[int], activation: str = "silu"):
        super().__init__()
        self.num_classes = num_classes
        self.net = mlp([dim + num_classes] + list(hidden) + [2 * latent_dim], activation)

    @classmethod
    def from_config(cls, dim: int, num_classes: int, m) -> Encoder:
        return cls(dim, num_classes, m.latent_dim, m.hidden, m.activation)

    def forward(self, x: torch.Tensor, y_onehot: torch.Tensor, ops: Ops = PLAIN, layers=None):
        mu, logvar = run_private(ops, self.net, torch.cat([x, y_onehot], dim=-1), layers).chunk(2, dim=-1)
        return mu, soft_clamp(logvar, 8.0)


class HyperNetwork(nn.Module):
    """Phi: shared decoder base, h_theta (row scales + bias shifts), h_omega, e(y), g_omega."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        latent_dim: int,
        code_dim: int,
        hidden: list[int],
        hyper_hidden: int,
        label_embed_dim: int,
        hyper_layers: int = 2,
        activation: str = "silu",
        output_std: float | None = None,
        modulation: bool = True,
        prior: str = "learned",
        class_anchor: bool = False,
    ):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}; got {prior!r}")
        self.modulation, self.prior_kind = bool(modulation), prior
        # None: the output log-scale is learned (soft-clamped to (-5, 5)); a number: fixed at log(output_std)
        self._logstd_fn = _clamp5 if output_std is None else FixedLogstd(output_std)
        self.dim, self.num_classes, self.latent_dim, self.code_dim = dim, num_classes, latent_dim, code_dim
        sizes = [latent_dim + num_classes] + list(reversed(hidden)) + [dim]
        self.out_sizes = sizes[1:]
        self.base_weight = nn.ParameterList()
        self.base_bias = nn.ParameterList()
        for i in range(len(sizes) - 1):
            lin = nn.Linear(sizes[i], sizes[i + 1])  # PyTorch's default init for the base layer
            self.base_weight.append(nn.Parameter(lin.weight.detach().clone()))
            self.base_bias.append(nn.Parameter(lin.bias.detach().clone()))
        self.act = ACTIVATIONS[activation]()  # between the decoder's layers
        mid = [hyper_hidden] * (hyper_layers - 1)
        # h_theta: v -> (d_l, db_l) for every layer. The last layer starts at zero so that every
        # client begins with the shared decoder (d = 1, db = 0).
        # Without modulation (a plain conditional VAE's decoder, shared by every client) there is no h_theta.
        self.h_theta = None
        if self.modulation:
            self.h_theta = mlp([code_dim, *mid, 2 * sum(self.out_sizes)], activation)
            nn.init.zeros_(self.h_theta[-1].weight)
            nn.init.zeros_(self.h_theta[-1].bias)
        # The standard prior N(0, I) for every class (a plain conditional VAE's) has no h_omega, e(y), g_omega.
        self.h_omega = self.label_embed = self.g_omega = None
        if prior == "learned":
            self.h_omega = mlp([code_dim, *mid, hyper_hidden], activation)
            self.label_embed = nn.Embedding(num_classes, label_embed_dim)
            self.g_omega = mlp([hyper_hidden + label_embed_dim, *mid, 2 * latent_dim], activation)
        self.x_logstd = nn.Parameter(torch.zeros(dim))
        # a_y (K, d_x), added to the decoder's mean: public (released class means), not trained, saved with Phi
        # (a None buffer without the anchor: absent from the state dict)
        self.register_buffer("class_anchor", torch.zeros(num_classes, dim) if class_anchor else None)

    @classmethod
    def from_config(cls, dim: int, num_classes: int, m) -> HyperNetwork:
        return cls(
            dim,
            num_classes,
            latent_dim=m.latent_dim,
            code_dim=m.code_dim,
            hidden=m.hidden,
            hyper_hidden=m.hyper_hidden,
            label_embed_dim=m.label_embed_dim,
            hyper_layers=m.hyper_layers,
            activation=m.activation,
            output_std=m.output_std,
            modulation=m.modulation,
            prior=m.prior,
            class_anchor=m.class_anchor,
        )

    # -- Eq. 3 -------------------------------------------------------------------------------
    def decoder_modulation(self, v: torch.Tensor, ops: Ops = PLAIN) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(d_l(v), db_l(v)) per layer from h_theta's output; v is (d_v,), or (M, d_v) for one code per client
        or row. d_l = 1 + tanh(.) keeps scales in (0, 2). Without modulation: (None, None) per layer (no change)."""
        if self.h_theta is None:
            return [(None, None)] * len(self.out_sizes)
        parts = [(r, f) for r in self.out_sizes for f in (_row_scale, None)]
        out = run_head(ops, self.h_theta, v, parts)
        return [(out[2 * i], out[2 * i + 1]) for i in range(len(self.out_sizes))]

    def decode(self, mods, z: torch.Tensor, y_onehot: torch.Tensor, ops: Ops = PLAIN) -> torch.Tensor:
        """Mean of p_theta(x | z, y) for the client whose modulation is `mods`."""
        h = cat_last(z, y_onehot)
        n = len(self.base_weight)
        for i, (w, b, (d, db)) in enumerate(zip(self.base_weight, self.base_bias, mods)):
            t = ops.shared_linear(h, w)
            h = ops.add_bias(t if d is None else t * d, b)  # diag(d) W h + b + db, without building diag(d) W
            if db is not None:
                h = h + db
            if i < n - 1:
                h = self.act(h)
        if self.class_anchor is not None:  # a_y: a constant per class (no parameter, so no gradient to clip)
            h = h + y_onehot @ self.class_anchor.to(h.dtype)
        return h

    def output_logstd(self, ops: Ops = PLAIN) -> torch.Tensor:
        return ops.per_row(self.x_logstd, self._logstd_fn)

    # -- Eq. 4 -------------------------------------------------------------------------------
    def prior_features(self, v: torch.Tensor, ops: Ops = PLAIN) -> torch.Tensor | None:
        """h_omega(v); None with the standard prior (it does not depend on the code)."""
        return None if self.h_omega is None else run_head(ops, self.h_omega, v)

    def prior(self, hw: torch.Tensor | None, y: torch.Tensor, ops: Ops = PLAIN):
        """(mu, log sigma) of p_omega(z | y) given h_omega(v) (broadcast over the batch); the standard prior:
        zeros (N(0, I) for every class and client)."""
        if self.g_omega is None:
            zero = torch.zeros((), dtype=self.x_logstd.dtype, device=y.device)
            return zero, zero
        mu, logstd = run_shared(ops, self.g_omega, cat_last(hw, ops.embed(y, self.label_embed.weight))).chunk(2, dim=-1)
        return mu, soft_clamp(logstd, 5.0)

    def spectral_layers(self) -> list[nn.Linear]:
        """The layers of h_theta, h_omega and g_omega whose spectral norms are bounded (Eq. 5)."""
        heads = [h for h in (self.h_theta, self.h_omega, self.g_omega) if h is not None]
        return [m for h in heads for m in h if isinstance(m, nn.Linear)]

    @torch.no_grad()
    def project_spectral(self, bound: float) -> None:
        """Lipschitz control as a projection after each optimizer step (post-processing, free of
        privacy cost; a parametrization would mutate buffers inside per-sample computations)."""
        for lin in self.spectral_layers():
            s = spectral_norm(lin.weight)
            if s > bound:
                lin.weight.mul_(bound / s)


def spectral_norm(w: torch.Tensor) -> float:
    """The largest singular value of a matrix: the square root of the largest eigenvalue of its smaller Gram matrix,
    formed and decomposed in fp64 (relative error ~1e-15 against the fp32 SVD's ~1e-7; a (1152, 64) head layer
    costs one 64 x 64 eigendecomposition instead of a 1152 x 64 SVD, done after every step of Phi)."""
    w = w.detach().double()
    g = w.t() @ w if w.shape[0] >= w.shape[1] else w @ w.t()
    return float(torch.linalg.eigvalsh(g)[-1].clamp(min=0).sqrt())


# a ClientView's parameter names: its encoder's under ENCODER_PREFIX, its code, Phi's under PHI_PREFIX
ENCODER_PREFIX, CODE_NAME, PHI_PREFIX = "encoder.", "code", "hyper."


class ClientView(nn.Module):
    """One client's full model: its private encoder psi_i and code v_i, and the shared Phi.

    `torch.func.functional_call` on this module gives the per-sample loss as a pure function of
    (psi_i, v_i, Phi) so that per-sample gradients can be taken jointly (strict mode).
    With `literal_mmd` set, each sample's loss also carries its share of the MMD cross term
    (Eq. 6) against a synthetic batch drawn from this client's decoder: -2 mean_j k(x, x_hat_j).
    """

    def __init__(
        self,
        encoder: Encoder,
        code: nn.Parameter,
        hyper: HyperNetwork,
        *,
        literal_mmd: tuple[float, list[float]] | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.code = code
        self.hyper = hyper
        self.literal_mmd = literal_mmd  # (lambda_mmd, bandwidths) or None

    def forward(self, x, y, eps, syn_y=None, syn_z=None, syn_x=None):
        nll, kl = elbo_terms(self.encoder, self.code, self.hyper, x, y, eps)
        loss = nll + kl
        if self.literal_mmd is not None and syn_y is not None:
            lam, bandwidths = self.literal_mmd
            mods = self.hyper.decoder_modulation(self.code)
            hw = self.hyper.prior_features(self.code)
            x_hat = sample_synthetic(self.hyper, mods, hw, syn_y, syn_z, syn_x)
            loss = loss - 2.0 * lam * multi_kernel(x, x_hat, bandwidths).mean(-1)
        return loss, (nll, kl)


def multi_kernel(a: torch.Tensor, b: torch.Tensor, bandwidths: list[float]) -> torch.Tensor:
    """sum_h exp(-||a_i - b_j||^2 / (2 h^2)) for all pairs: (len(a), len(b))."""
    d2 = (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)
    return sum(torch.exp(-d2 / (2.0 * h * h)) for h in bandwidths)


def kl_diag_gaussians(mu_q, logvar_q, mu_p, logstd_p) -> torch.Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(2 logstd_p))), summed over the last dim."""
    var_q = logvar_q.exp()
    var_p = (2 * logstd_p).exp()
    return 0.5 * ((var_q + (mu_q - mu_p) ** 2) / var_p - 1.0 + 2 * logstd_p - logvar_q).sum(-1)


def gaussian_nll(x, mean, logstd) -> torch.Tensor:
    """-log N(x; mean, exp(2 logstd)), summed over the last dim (few full-size operations: `logstd` may be
    one vector per row)."""
    r = (x - mean) / torch.exp(logstd)
    return 0.5 * r.pow(2).sum(-1) + logstd.expand_as(r).sum(-1) + 0.5 * LOG2PI * x.shape[-1]


def elbo_terms(
    encoder: Encoder, code: torch.Tensor, hyper: HyperNetwork, x, y, eps, ops: Ops = PLAIN, encoder_layers=None
):
    """Per-sample reconstruction NLL and KL(q || p_omega). `eps` is the reparameterization noise,
    drawn outside so that the loss is a deterministic function (vmap-able, reproducible).
    The one spelling of the model's loss: the batched engine evaluates it with its own `ops`
    (every client of a rank at once, `code` then holds one code per client)."""
    y1h = one_hot(y, hyper.num_classes, x.dtype)
    mu_q, logvar_q = encoder(x, y1h, ops, encoder_layers)
    z = mu_q + (0.5 * logvar_q).exp() * eps
    mean = hyper.decode(hyper.decoder_modulation(code, ops), z, y1h, ops)
    nll = gaussian_nll(x, mean, hyper.output_logstd(ops))
    mu_p, logstd_p = hyper.prior(hyper.prior_features(code, ops), y, ops)
    kl = kl_diag_gaussians(mu_q, logvar_q, mu_p, logstd_p)
    return nll, kl


def generator_params(hyper: HyperNetwork, codes: torch.Tensor, weights: torch.Tensor | None = None):
    """(theta, omega) outputs for one code, or the pi-weighted mixture of K codes (Eq. 13):
    theta_mix = sum_k pi_k h_theta(v_k), omega_mix = sum_k pi_k h_omega(v_k)."""
    codes = codes.reshape(-1, hyper.code_dim)
    if weights is None:
        weights = torch.full((codes.shape[0],), 1.0 / codes.shape[0], dtype=codes.dtype, device=codes.device)
    per_code = hyper.decoder_modulation(codes)  # [(d_l (K, r_l), db_l (K, r_l))] per layer
    w = weights[:, None]
    mods = [(None, None) if d is None else ((w * d).sum(0), (w * db).sum(0)) for d, db in per_code]  # mixed
    feats = hyper.prior_features(codes)
    hw = None if feats is None else (w * feats).sum(0)
    return mods, hw


def sample_synthetic(
    hyper: HyperNetwork, mods, hw, y: torch.Tensor, z_noise: torch.Tensor, x_noise: torch.Tensor | None
) -> torch.Tensor:
    """Eq. 12 with z ~ p_omega(z | y) (the class prior, not N(0, I)): x = mean(z, y) [+ scale * noise].
    Noise is passed in so that callers control the generator (reproducible or differentiable).
    Batched over clients when `mods` and `hw` carry a client dimension in front of a row dimension
    of 1 ((M, 1, r)) and the noise is (M, n, .)."""
    mu_p, logstd_p = hyper.prior(hw, y)
    z = mu_p + logstd_p.exp() * z_noise
    y1h = one_hot(y, hyper.num_classes, z.dtype)
    mean = hyper.decode(mods, z, y1h)
    if x_noise is None:
        return mean
    return mean + hyper.output_logstd().exp() * x_noise


def mmd_bandwidths(m, dim: int) -> list[float]:
    """The MMD kernel bandwidths in data units: model.mmd_bandwidths are in units of sqrt(d_x)."""
    return [b * math.sqrt(dim) for b in m.mmd_bandwidths]


def merf_mmd(features, x_hat: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The DP-MERF MMD^2 estimate between synthetic samples and released mean embeddings.
    x_hat: (..., K, n_per_class, d_x); target: (..., K, F); weights: (..., K). Returns (...)."""
    phi = features.mean(x_hat)
    # kernel_scale turns feature inner products back into kernel values: the term is an MMD^2 estimate
    return features.kernel_scale * (weights * (phi - target).pow(2).sum(-1)).sum(-1)


def project_codes(codes: torch.Tensor, radius: float) -> None:
    """In place: every code (the last dimension) onto the ball of the given radius."""
    with torch.no_grad():
        n = codes.norm(dim=-1, keepdim=True)
        codes.mul_(torch.where(n > radius, radius / n, torch.ones_like(n)))
