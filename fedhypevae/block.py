"""A block of clients of one rank: their data and private state, stacked. The block OWNS the state.

The DP step (`dp_step.DPStep`) runs on a block: every stage works on all of its clients at once. A rank's
clients are grouped into blocks by the aggregation rule (one block of every client under `grad`, one per
client where each steps its own copy of Phi, a block of its own for a client with its own step class), and
a block is processed in chunks (`rows(lo, hi)`: a view of some of its rows, sharing the storage) so that
the working set of a step stays bounded however many clients a rank hosts. Nothing here is per client in
Python: a block of 50,000 clients is a few dozen tensors.

* **Data.** One tensor of all clients' training records (`X`, `Y`, client-major) with per-client offsets.
* **Private state.** Each encoder parameter, the codes and both Adam states are (M, ...) tensors; torch's
  own Adam (torch's fused kernel: what each client's `torch.optim.Adam(fused=True)` would run) on the
  stacks is elementwise one Adam per client (tests/test_engine_oracle.py). Initialization is public and per
  client: client c's encoder and code are drawn, in nn.Linear's order, from a generator keyed by (seed, c),
  so every world size builds the same state.
* **Public constants.** `expected[i]` = q * declared size of client i: the only normalizer any DP
  computation uses (never a realized batch size or a true client size).
* **Generators.** Every release of every client has its own generator keyed by (key, method, client,
  stream, round, step, epoch) (`rng.client_seeds`, one vectorized call for the block): the key is
  `privacy.noise_seed` (reproducible) or a secret drawn from the operating system when the block is made
  and never stored (secure).
* **Per-client views.** `client(i)` is a `client.Client` looking at row i (its data, its state as views of
  the stacks): for code that works one client at a time (the statistics release, tests, tools).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.optim.adam import adam

from .config import Config
from .model import Encoder, project_codes
from .rng import METHOD_STREAMS, STREAM_STEP, SeedTag, client_seeds, generators, secret_generators, secret_key

# the stacks of a block's private state, in the order a checkpoint shard stores them
STATE_KEYS = ("codes", "code_m", "code_v", "code_steps", "enc_steps")  # + enc_params/enc_m/enc_v per parameter
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults: what every client's optimizer runs


_ROWS_AT_ONCE = 4096  # a resume copies a stack's rows this many at a time


class ClientBlock:
    """The data and stacked private state of the clients `ids` (their training records `X`, `Y` client-major,
    `sizes` records each, `declared` public sizes). Build one with `from_data`; `rows(lo, hi)` is a view."""

    def __init__(
        self,
        cfg: Config,
        ids: Sequence[int],
        X: torch.Tensor,
        Y: torch.Tensor,
        sizes: Sequence[int],
        declared: Sequence[int],
        *,
        num_classes: int,
        dim: int,
        device: torch.device | str = "cpu",
        key: int | None = None,
        init: bool = True,
    ):
        if not len(ids):
            raise ValueError("a client block needs at least one client")
        self.cfg = cfg
        self.device = torch.device(device)
        self.ids = [int(i) for i in ids]
        self.ids_np = np.asarray(self.ids, dtype=np.int64)
        self.M, self.K, self.dim = len(self.ids), int(num_classes), int(dim)
        self.declared = [int(d) for d in declared]
        q = cfg.privacy.sample_rate
        self.expected = torch.tensor([q * d for d in self.declared], dtype=torch.float64)  # public
        p = cfg.privacy
        self.key = p.noise_seed if p.noise_seed is not None else (key if key is not None else secret_key())
        self.namespace = METHOD_STREAMS["fedhypevae"]
        self._set_data(X, Y, sizes)
        # the encoder's structure (its activations run between the stacked layers); its own parameters are unused
        with torch.random.fork_rng(devices=[]):
            self.encoder = Encoder.from_config(self.dim, self.K, cfg.model).to(self.device)
        for prm in self.encoder.parameters():
            prm.requires_grad_(False)
        self.enc_names = [n for n, _ in self.encoder.named_parameters()]
        self.enc_shapes = [tuple(t.shape) for _, t in self.encoder.named_parameters()]
        self.enc_hp = {"lr": float(cfg.train.encoder_lr), "betas": ADAM_BETAS, "eps": ADAM_EPS}
        self.code_hp = {"lr": float(cfg.train.code_lr), "betas": ADAM_BETAS, "eps": ADAM_EPS}
        self.mmd_target: torch.Tensor | None = None  # (M, K, F): the DP-MERF mean embeddings, once released
        self.mmd_weights: torch.Tensor | None = None  # (M, K)
        if init:
            self._init_state()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_data(
        cls,
        datas: list,
        cfg: Config,
        *,
        num_classes: int,
        dim: int,
        declared: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        key: int | None = None,
    ) -> ClientBlock:
        """A block of the clients in `datas` (`data.ClientData`, their training splits), freshly initialized."""
        xs = [np.asarray(d.x_train, dtype=np.float32).reshape(len(d.y_train), -1) for d in datas]
        ys = [np.asarray(d.y_train, dtype=np.int64).reshape(-1) for d in datas]
        X = torch.from_numpy(np.concatenate(xs) if xs else np.zeros((0, dim), np.float32)).to(device)
        Y = torch.from_numpy(np.concatenate(ys) if ys else np.zeros(0, np.int64)).to(device)
        dec = list(declared) if declared is not None else [int(d.declared_size) for d in datas]
        return cls(
            cfg,
            [d.client_id for d in datas],
            X,
            Y,
            [len(y) for y in ys],
            dec,
            num_classes=num_classes,
            dim=dim,
            device=device,
            key=key,
        )

    @classmethod
    def copy_of(cls, clients: list) -> ClientBlock:
        """A new block holding copies of `clients`' data and private state, in this order (the first client's
        generator key: with `privacy.noise_seed`, every client's)."""
        b0 = clients[0].block
        block = cls(
            b0.cfg,
            [c.id for c in clients],
            torch.cat([c.x for c in clients]),
            torch.cat([c.y for c in clients]),
            [len(c.y) for c in clients],
            [c.declared_size for c in clients],
            num_classes=b0.K,
            dim=b0.dim,
            device=b0.device,
            key=b0.key,
        )
        for k, c in enumerate(clients):
            block.client(k).load_state_dict(c.state_dict())
        return block

    def _set_data(self, X: torch.Tensor, Y: torch.Tensor, sizes: Sequence[int]) -> None:
        self.X, self.Y = X.to(self.device), Y.to(self.device)
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64).tolist()
        self.offsets_t = torch.tensor(self.offsets, dtype=torch.long)

    def _init_state(self) -> None:
        """Every client's encoder and code, drawn as `nn.Linear` initializes them (kaiming-uniform weight, then
        the bias) and then v_i ~ N(0, I), from the client's public generator (seed, client); Adam at step 0."""
        m, M, dev = self.cfg.model, self.M, self.device
        self.enc_params = [torch.zeros((M, *s)) for s in self.enc_shapes]
        codes = torch.zeros(M, m.code_dim)
        by_name = dict(zip(self.enc_names, self.enc_params))
        linears = [(n, mod) for n, mod in self.encoder.named_modules() if isinstance(mod, torch.nn.Linear)]
        pairs = [(by_name[f"{n}.weight"], by_name.get(f"{n}.bias"), mod.in_features) for n, mod in linears]
        gens = generators(client_seeds(self.cfg.seed, SeedTag.MODEL_INIT, self.ids))
        for i, g in enumerate(gens):
            for w, b, fan_in in pairs:
                torch.nn.init.kaiming_uniform_(w[i], a=math.sqrt(5), generator=g)
                if b is not None:
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    torch.nn.init.uniform_(b[i], -bound, bound, generator=g)
            codes[i] = torch.randn(m.code_dim, generator=g)
        project_codes(codes, m.code_radius)
        self.enc_params = [t.to(dev) for t in self.enc_params]
        self.codes = codes.to(dev)
        self.enc_m = [torch.zeros_like(t) for t in self.enc_params]
        self.enc_v = [torch.zeros_like(t) for t in self.enc_params]
        self.enc_steps = torch.zeros(M, len(self.enc_names), dtype=torch.float32)
        self.code_m, self.code_v = torch.zeros_like(self.codes), torch.zeros_like(self.codes)
        self.code_steps = torch.zeros(M, 1, dtype=torch.float32)
        self._layers()

    def _layers(self) -> None:
        """The encoder's (weight, bias) stacks in layer order (the model's math takes them as `layers`)."""
        by_name = dict(zip(self.enc_names, self.enc_params))
        self.enc_layers = [
            (by_name[f"{n}.weight"], by_name.get(f"{n}.bias"))
            for n, mod in self.encoder.named_modules()
            if isinstance(mod, torch.nn.Linear)
        ]

    # ------------------------------------------------------------------ views
    def rows(self, lo: int, hi: int) -> ClientBlock:
        """Clients lo..hi-1 as a block that shares this one's storage (a chunk: what one pass of a step holds)."""
        if lo == 0 and hi == self.M:
            return self
        sub = object.__new__(ClientBlock)
        sub.cfg, sub.device, sub.K, sub.dim = self.cfg, self.device, self.K, self.dim
        sub.ids, sub.ids_np, sub.M = self.ids[lo:hi], self.ids_np[lo:hi], hi - lo
        sub.declared, sub.expected = self.declared[lo:hi], self.expected[lo:hi]
        sub.key, sub.namespace = self.key, self.namespace
        a, b = self.offsets[lo], (self.offsets[hi] if hi < self.M else len(self.Y))
        sub.X, sub.Y = self.X[a:b], self.Y[a:b]
        sub.sizes = self.sizes[lo:hi]
        sub.offsets = [o - a for o in self.offsets[lo:hi]]
        sub.offsets_t = torch.tensor(sub.offsets, dtype=torch.long)
        sub.encoder, sub.enc_names, sub.enc_shapes = self.encoder, self.enc_names, self.enc_shapes
        sub.enc_hp, sub.code_hp = self.enc_hp, self.code_hp  # shared: a learning-rate change reaches every chunk
        for k in ("enc_params", "enc_m", "enc_v"):
            setattr(sub, k, [t[lo:hi] for t in getattr(self, k)])
        for k in ("codes", "code_m", "code_v", "code_steps", "enc_steps"):
            setattr(sub, k, getattr(self, k)[lo:hi])
        sub.mmd_target = None if self.mmd_target is None else self.mmd_target[lo:hi]
        sub.mmd_weights = None if self.mmd_weights is None else self.mmd_weights[lo:hi]
        sub._layers()
        return sub

    def chunks(self, size: int) -> list:
        """The block in consecutive views of at most `size` clients."""
        size = max(1, int(size))
        return [self.rows(lo, min(self.M, lo + size)) for lo in range(0, self.M, size)]

    def client(self, i: int):
        """Client i of the block as a `client.Client` (a view of its row)."""
        from .client import Client

        return Client.view(self, i)

    def position(self, client_id: int) -> int:
        try:
            return self.ids.index(int(client_id))
        except ValueError:
            raise KeyError(f"client {client_id} is not in this block (clients {self.ids[:8]}...)") from None

    def client_rows(self, i: int) -> slice:
        """Client i's records in X / Y."""
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    # ------------------------------------------------------------------ randomness
    def generators(
        self, round_: int, step: int, epoch: int = 0, *, stream: int = STREAM_STEP, rows: slice = slice(None)
    ) -> list:
        """Each client's private generator for this release (coins, reparameterization noise, DP noise, synthetic
        noise, in that order), keyed by (key, client, stream, round, step, epoch), never by the rank; `rows`: only
        those clients'."""
        ids = self.ids_np[rows]
        return secret_generators(client_seeds(self.key, self.namespace, ids, stream, round_, step, epoch))

    # ------------------------------------------------------------------ the local optimizer
    @staticmethod
    def adam(params, grads, ms, vs, steps, hp) -> None:
        """torch's own Adam (its functional form, fused kernel: what each client's torch.optim.Adam(fused=True) runs)
        on the (M, ...) stacks: elementwise the same as one Adam per client. Every client steps at every step, so the
        step counts agree and one call per stack suffices; otherwise one call per client. The fused kernel reads and
        writes each stack once (1.1 against 4.7 ns an element for the single-tensor path on this machine's CPU); its
        moments are bit-identical to the single-tensor path's, its parameters within an ulp of them."""
        b1, b2 = hp["betas"]
        kw = dict(
            foreach=False,
            fused=True,
            amsgrad=False,
            beta1=b1,
            beta2=b2,
            lr=hp["lr"],
            weight_decay=0.0,
            eps=hp["eps"],
            maximize=False,
        )
        for k, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):
            g = g.contiguous()  # the fused kernel reads a non-contiguous tensor as if it were contiguous (wrongly)
            if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
                raise RuntimeError("ClientBlock.adam updates contiguous stacks in place; got a non-contiguous one")
            col = steps[:, k]
            if bool((col == col[0]).all()):
                adam([p], [g], [m], [v], [], [col[0].clone()], **kw)
                col += 1  # in place: a chunk's step counts are views of the block's
                continue
            for i in range(len(col)):
                adam([p[i]], [g[i]], [m[i]], [v[i]], [], [steps[i, k]], **kw)

    def set_lr(self, *, encoder: float | None = None, code: float | None = None) -> None:
        """Change the clients' local learning rates (a resume may; chunks share these settings)."""
        if encoder is not None:
            self.enc_hp["lr"] = float(encoder)
        if code is not None:
            self.code_hp["lr"] = float(code)

    # ------------------------------------------------------------------ state (checkpoints)
    def state(self) -> dict:
        """The block's private state as named stacks (no copy: what a checkpoint shard writes)."""
        out = {k: getattr(self, k) for k in STATE_KEYS}
        for n, p, m, v in zip(self.enc_names, self.enc_params, self.enc_m, self.enc_v):
            out[f"enc.{n}"], out[f"enc_m.{n}"], out[f"enc_v.{n}"] = p, m, v
        if self.mmd_target is not None:
            out["mmd_target"], out["mmd_weights"] = self.mmd_target, self.mmd_weights
        return out

    def load_rows(self, positions: Sequence[int], state: dict, rows: Sequence[int], *, done=None) -> None:
        """Copy rows `rows` of the named stacks `state` (as `state()` names them) into this block's rows
        `positions` (a resume, possibly onto another placement of clients). `done(t)` is called on the span of source
        rows of each piece copied (a resume hands back a memory-mapped shard's pages: checkpoint.release_pages)."""
        pos = torch.as_tensor(list(positions), dtype=torch.long)
        src = torch.as_tensor(list(rows), dtype=torch.long)
        done = done or (lambda t: None)
        mine = self.state()
        for name, dst in mine.items():
            if name not in state:
                raise KeyError(name)
            for k in range(0, len(src), _ROWS_AT_ONCE):  # a bounded temporary, not a copy of every row at once
                rows_k = src[k : k + _ROWS_AT_ONCE]
                part = state[name].index_select(0, rows_k).to(dst.device, dst.dtype)
                dst.index_copy_(0, pos[k : k + _ROWS_AT_ONCE].to(dst.device), part)
                done(state[name][int(rows_k.min()) : int(rows_k.max()) + 1])  # the source rows just copied
        if "mmd_target" in state and self.mmd_target is None:
            t, w = state["mmd_target"], state["mmd_weights"]
            self.mmd_target = torch.zeros((self.M, *t.shape[1:]), dtype=t.dtype, device=self.device)
            self.mmd_weights = torch.zeros((self.M, *w.shape[1:]), dtype=w.dtype, device=self.device)
            self.mmd_target.index_copy_(0, pos, t.index_select(0, src).to(self.device))
            self.mmd_weights.index_copy_(0, pos, w.index_select(0, src).to(self.device))
            done(t)
            done(w)

    def state_bytes(self) -> int:
        """Bytes of private state the block holds (parameters, Adam moments and counts, codes, embeddings)."""
        return sum(t.numel() * t.element_size() for t in self.state().values())
