"""A block of clients of one rank: their private state stacked, each client's own tensors views of the stacks.

The DP step (`dp_step.DPStep`) runs on a block: every stage works on all of its clients at once. A block
holds M >= 1 clients (the trainer makes one block of every client of a rank under `grad` aggregation, one
block per client where each client steps its own copy of Phi; `Client.step` runs a block of one).

* **Data.** One tensor of all clients' training records (`X`, `Y`, client-major); each client's `x` / `y`
  become views of it (no copy kept).
* **Private state.** Each encoder parameter, the codes and both Adam states are stacked as (M, ...) tensors;
  the clients' parameters and their optimizers' state become views of the stacks. `Client.state_dict`
  copies, so a checkpoint never carries another client's state. Torch's own Adam (functional form,
  single-tensor path: what each client's `torch.optim.Adam` runs) on the stacks is elementwise the same
  as one Adam per client (tests/test_engine_oracle.py).
* **Public constants.** `expected[i]` = q * declared size of client i: the only normalizer any DP
  computation uses (never a realized batch size or a true client size).

A block notices when something replaced a client's tensors (an optimizer's `load_state_dict`, a client
given new data) and re-stacks before the next step (`ensure_bound`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.optim.adam import adam

from .config import Config
from .model import Encoder
from .rng import STREAM_STEP


class ClientBlock:
    """The stacked private state and data of `clients` (all of one rank, or a subset of them)."""

    def __init__(self, clients: list, cfg: Config, *, device: torch.device | str = "cpu"):
        if not clients:
            raise ValueError("a client block needs at least one client")
        self.clients = list(clients)
        self.cfg = cfg
        self.device = torch.device(device)
        self.M = len(self.clients)
        self.K = self.clients[0].num_classes
        self.ids = [c.id for c in self.clients]
        q = cfg.privacy.sample_rate
        self.expected = torch.tensor([q * c.declared_size for c in self.clients], dtype=torch.float64)  # public
        self._bound: Optional[list] = None
        self.bind()

    # ------------------------------------------------------------------ the clients' generators
    def generators(self, round_: int, step: int, epoch: int = 0) -> list:
        """Each client's private generator for this step (coins, reparameterization noise, DP noise, synthetic
        noise, in that order). Keyed by (noise seed, client, round, step, epoch), never by the rank."""
        return [c.rng.generator(STREAM_STEP, round_, step, epoch) for c in self.clients]

    @property
    def encoder(self) -> Encoder:
        """A client's encoder module: the activations the model's math runs between the stacked layers."""
        return self.clients[0].encoder

    # ------------------------------------------------------------------ binding
    def bind(self) -> None:
        """Stack every client's data, encoder, code and Adam state; the clients' tensors become views."""
        cs = self.clients
        self._bind_data()
        self.enc_names = [n for n, _ in cs[0].encoder.named_parameters()]
        M = self.M
        self.enc_params, self.enc_m, self.enc_v = [], [], []  # (M, *shape) per encoder parameter
        self.enc_steps = torch.zeros(M, len(self.enc_names), dtype=torch.float32)
        self.code_steps = torch.zeros(M, 1, dtype=torch.float32)
        self.enc_hp = self._adam_hparams([c.enc_opt for c in cs])
        self.code_hp = self._adam_hparams([c.code_opt for c in cs])
        per_client = [list(c.encoder.parameters()) for c in cs]
        for k in range(len(self.enc_names)):
            ps = [pc[k] for pc in per_client]
            self.enc_params.append(torch.stack([p.detach() for p in ps]).to(self.device))
            m, v, st = self._stack_state([c.enc_opt for c in cs], ps)
            self.enc_m.append(m)
            self.enc_v.append(v)
            self.enc_steps[:, k] = st
        # the encoder's (weight, bias) pairs in layer order, as stacks (the model's math takes them as `layers`)
        pos = {id(p): k for k, p in enumerate(per_client[0])}
        linears = [m for m in cs[0].encoder.modules() if isinstance(m, torch.nn.Linear)]
        in_linears = {id(t) for m in linears for t in (m.weight, m.bias) if t is not None}
        if set(pos) != in_linears:  # a private parameter of another module would be client 0's for every client
            raise ValueError("the DP step stacks encoders made of nn.Linear layers and parameter-free activations "
                             "only; this encoder has other parameters")
        self.enc_layers = [(self.enc_params[pos[id(m.weight)]],
                            None if m.bias is None else self.enc_params[pos[id(m.bias)]]) for m in linears]
        self.codes = torch.stack([c.code.detach() for c in cs]).to(self.device)
        self.code_m, self.code_v, self.code_steps[:, 0] = self._stack_state([c.code_opt for c in cs], [c.code for c in cs])
        for i, c in enumerate(cs):  # the clients' tensors become views of the stacks
            for k, p in enumerate(per_client[i]):
                p.data = self.enc_params[k][i]
                c.enc_opt.state[p] = {"step": self.enc_steps[i, k], "exp_avg": self.enc_m[k][i],
                                      "exp_avg_sq": self.enc_v[k][i]}
            c.code.data = self.codes[i]
            c.code_opt.state[c.code] = {"step": self.code_steps[i, 0], "exp_avg": self.code_m[i],
                                        "exp_avg_sq": self.code_v[i]}
        if all(c.mmd_target is not None for c in cs):
            self.mmd_target = torch.stack([c.mmd_target for c in cs]).to(self.device)
            self.mmd_weights = torch.stack([c.mmd_weights for c in cs]).to(self.device)
        else:
            self.mmd_target = self.mmd_weights = None
        self._bound = [self._fingerprint(c, per_client[i][0]) for i, c in enumerate(cs)]

    def _bind_data(self) -> None:
        self.sizes = [len(c.y) for c in self.clients]
        self.X = torch.cat([c.x for c in self.clients]).to(self.device)
        self.Y = torch.cat([c.y for c in self.clients]).to(self.device)
        off, self.offsets = 0, []
        for c, n in zip(self.clients, self.sizes):
            self.offsets.append(off)
            c.x, c.y = self.X[off:off + n], self.Y[off:off + n]
            off += n
        self.offsets_t = torch.tensor(self.offsets, dtype=torch.long)

    @staticmethod
    def _fingerprint(c, first_param) -> tuple:
        return (c.code.data_ptr(), c.enc_opt.state.get(first_param, {}).get("exp_avg"),
                c.code_opt.state.get(c.code, {}).get("exp_avg"), c.mmd_target, c.x, c.y)

    def is_bound(self) -> bool:
        """Whether every client's tensors are still the views of this block's stacks."""
        for c, old in zip(self.clients, self._bound):
            now = self._fingerprint(c, next(iter(c.encoder.parameters())))
            if now[0] != old[0] or any(a is not b for a, b in zip(now[1:], old[1:])):
                return False
        return True

    def ensure_bound(self) -> None:
        if not self.is_bound():
            self.bind()

    @staticmethod
    def _adam_hparams(opts: list) -> dict:
        hp = None
        for opt in opts:
            if not isinstance(opt, torch.optim.Adam) or len(opt.param_groups) != 1:
                raise ValueError("the DP step expects one torch.optim.Adam param group per client optimizer")
            g = opt.param_groups[0]
            if g.get("weight_decay", 0) or g.get("amsgrad") or g.get("maximize"):
                raise ValueError("the DP step implements plain Adam (no weight decay, amsgrad or maximize)")
            mine = {"lr": float(g["lr"]), "betas": tuple(float(b) for b in g["betas"]), "eps": float(g["eps"])}
            if hp is not None and mine != hp:
                raise ValueError("the clients of one block need the same Adam settings")
            hp = mine
        return hp

    def _stack_state(self, opts, params):
        ms, vs, steps = [], [], []
        for opt, p in zip(opts, params):
            st = opt.state.get(p, {})
            if st:
                ms.append(st["exp_avg"].detach())
                vs.append(st["exp_avg_sq"].detach())
                steps.append(float(st["step"]))
            else:  # Adam creates its state lazily at the first step: zeros and step 0
                ms.append(torch.zeros_like(p.detach()))
                vs.append(torch.zeros_like(p.detach()))
                steps.append(0.0)
        return (torch.stack(ms).to(self.device), torch.stack(vs).to(self.device),
                torch.tensor(steps, dtype=torch.float32))

    # ------------------------------------------------------------------ the local optimizer
    @staticmethod
    def adam(params, grads, ms, vs, steps, hp) -> None:
        """torch's own Adam (its functional form, single-tensor path: what each client's torch.optim.Adam runs on
        the CPU) on the (M, ...) stacks: elementwise the same as one Adam per client. Every client steps at every
        step, so the step counts agree and one call per stack suffices; otherwise one call per client."""
        b1, b2 = hp["betas"]
        kw = dict(foreach=False, amsgrad=False, beta1=b1, beta2=b2, lr=hp["lr"], weight_decay=0.0, eps=hp["eps"],
                  maximize=False)
        for k, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):
            col = steps[:, k]
            if bool((col == col[0]).all()):
                adam([p], [g], [m], [v], [], [col[0].clone()], **kw)
                col += 1  # in place: the clients' step tensors are views
                continue
            for i in range(len(col)):
                adam([p[i]], [g[i]], [m[i]], [v[i]], [], [steps[i, k]], **kw)

    def refresh_hparams(self) -> None:
        """Re-read the learning rates (a resume may change them) from the clients' optimizers."""
        self.enc_hp = self._adam_hparams([c.enc_opt for c in self.clients])
        self.code_hp = self._adam_hparams([c.code_opt for c in self.clients])
