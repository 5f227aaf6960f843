"""How the hosted clients' DP releases become the update of the replicated hypernetwork Phi.

One object per rule (``federation.aggregation``), built by the trainer from the registry::

    grad   every step: w_i * (noisy Phi gradient of client i) summed into ONE flat buffer with the
           diagnostics, one all-reduce, then the identical optimizer step + spectral projection on
           every rank's replica of Phi (Eq. 10).
    delta  every hosted client runs its local steps on a private copy of Phi (a plain SGD step of
           train.local_lr + projection per released step); at the round's end the weighted deltas
           are all-reduced once and Phi moves by federation.server_lr times their sum.

A rule owns: how the rank's clients are grouped into the blocks the DP step runs on (``blocks``) and each
client's weight in its block's release (``release_weight``), the round's start (``begin_round``), which Phi a
block's step is computed on (``step_hyper``), what a block's release contributes (``add_release``), the
step's reduce over the Communicator (``reduce_step``), applying the result to Phi (``apply_step`` after every
step, ``end_round`` at the round's end), what a checkpoint taken inside a round must hold (``client_state``)
and its restore (``restore``), and the noise seam (``noise_multipliers``).

A new rule is one class and one registry line::

    @register_aggregation("grad-x2")
    class DoubledGrad(GradAggregation):
        def apply_step(self, reduced):
            super().apply_step(2.0 * reduced)

(``federation.aggregation`` is validated against this registry, so the new name works in config files
once the module defining the rule is imported.)

Every collective a rule issues goes through ``Trainer.allreduce`` (timed, counted in comm_seconds) and is
issued by every rank in the same order: the rules see only public values (weights, released noisy
vectors, diagnostics the run may send).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .block import ClientBlock
    from .client import Client
    from .model import HyperNetwork
    from .trainer import Trainer

AGGREGATIONS: dict = {}


def register_aggregation(name: str) -> Callable[[type], type]:
    """Class decorator: make the rule available as ``federation.aggregation: <name>``."""

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Aggregation)):
            raise TypeError(f"register_aggregation({name!r}): {cls!r} is not an Aggregation subclass")
        cls.name = name
        AGGREGATIONS[name] = cls
        return cls

    return deco


def trust_refusal(name: str, trust_model: str) -> str | None:
    """Why rule `name` cannot run under `trust_model` (None if it can, or if the rule is unknown: that is refused
    by its own check)."""
    cls = AGGREGATIONS.get(name)
    if cls is None or trust_model in cls.trust_models:
        return None
    return (
        f"privacy.trust_model={trust_model} needs federation.aggregation=grad (or a rule that supports it); "
        f"{name!r} supports {', '.join(cls.trust_models)}: {cls.trust_reason}"
    )


def make_aggregation(name: str, trainer: Trainer) -> Aggregation:
    try:
        cls = AGGREGATIONS[name]
    except KeyError:
        raise ConfigError(
            f"federation.aggregation={name!r} is not a known rule; known: {', '.join(sorted(AGGREGATIONS))}"
        ) from None
    return cls(trainer)


def flat_phi(hyper: HyperNetwork) -> torch.Tensor:
    """Phi's parameters as one float64 host vector (parameter order)."""
    return torch.cat([p.detach().reshape(-1).double() for p in hyper.parameters()]).cpu()


class Aggregation:
    """The base class: hooks a rule overrides. ``self.tr`` is the trainer (its hyper, optimizer,
    weights, clients and collectives); the rule keeps its own round state."""

    name: str = ""
    # the trust models (privacy.trust_model) this rule's release is valid under, and why not the others
    trust_models: tuple = ("local",)
    trust_reason: str = (
        "a rule must say that each of its steps releases one Gaussian mechanism of the clients' "
        "clipped sums through the trust model's reduce (GradAggregation does)"
    )

    def __init__(self, trainer: Trainer):
        self.tr = trainer

    # ------------------------------------------------------------------ noise
    def noise_multipliers(self, sigma: float) -> dict:
        """WHERE the DP-SGD noise goes and at what scale, per block of the clipped per-step gradient:
        ``"private"``: the client's own coordinates (psi_i, v_i), never sent; ``"phi"``: the Phi
        coordinates, which leave the client. ``sigma`` is the plan's DP-SGD noise multiplier. Both forms of
        the per-sample stage noise each block at its own multiplier. The trust model places them
        (``privacy.trust_model``, fedhypevae/privacy/trust.py): local, sigma on both; distributed, sigma on the
        private block and a share on Phi; central, nothing on Phi (the aggregator adds one draw in the rule's
        reduce). The ledger charges what the placed noise gives against that model's adversary
        (Trainer.step_noise, TrustModel.charged_multiplier), so a rule that overrides this and puts less noise
        somewhere spends more budget, never less than it uses."""
        return self.tr.trust.noise_multipliers(sigma)

    # ------------------------------------------------------------------ one round
    def begin_round(self, r: int) -> None:
        """Called at the start of round r (also when the round resumes mid-way)."""

    def blocks(self, members: list) -> list:
        """The rank's clients grouped into the blocks the DP step runs on: `members` is [(client id, step class)];
        returns [(client ids, step class)]: one block per step class (a client with its own stage overrides, such
        as the audit's canaries, gets its own block), in the clients' order."""
        groups: dict = {}
        for cid, step_type in members:
            groups.setdefault(step_type, []).append(cid)
        return [(ids, t) for t, ids in groups.items()]

    def release_weight(self, client_id: int) -> float:
        """Client i's public weight w_i in its block's release sum_i w_i * (noisy Phi gradient of client i)."""
        return self.tr.weights[client_id]

    def step_hyper(self, block: ClientBlock) -> HyperNetwork:
        """The Phi a block's step is computed on."""
        return self.tr.hyper

    @property
    def step_width(self) -> int:
        """Length of this rule's block at the head of a step's buffer (the diagnostics follow it)."""
        return 0

    def new_step_buffer(self, diag_len: int) -> torch.Tensor:
        return torch.zeros(self.step_width + diag_len, dtype=torch.float64)

    def add_release(self, buf: torch.Tensor, block: ClientBlock, phi: torch.Tensor) -> None:
        """What a block's released step contributes: ``phi`` is sum_i release_weight_i * (noisy Phi gradient of
        client i), flat (fp64, Phi's parameter order)."""
        raise NotImplementedError

    def reduce_step(self, buf: torch.Tensor) -> torch.Tensor:
        """The step's collective (every rank); returns the reduced buffer. A rule that overrides it keeps
        ``trust_models`` to ("local",) unless its reduce goes through the trust model's."""
        return self.tr.allreduce(buf)

    def apply_step(self, reduced: torch.Tensor) -> None:
        """Apply the reduced rule block (``reduced[:step_width]``) to Phi, after every step."""

    def end_round(self, r: int, steps_done: int) -> None:
        """The round's end (also after a budget stop): ``steps_done`` steps of the round were applied."""

    # ------------------------------------------------------------------ checkpoints
    def client_state(self, client: Client, mid_round: bool) -> dict:
        """Extra entries of the client's checkpoint (``mid_round``: a stop between two steps)."""
        return {}

    def restore(self, states: dict, mid_round: bool, where: object) -> None:
        """Restore from the clients' checkpoint states {client id: state} (after Phi was restored)."""


@register_aggregation("grad")
class GradAggregation(Aggregation):
    """Noisy Phi gradients, reduced every step by the trust model (local and distributed: an all-reduce;
    central: a gather to the aggregator, its draw, a broadcast), one optimizer step on every replica."""

    trust_models = ("local", "distributed", "central")

    @property
    def step_width(self) -> int:
        return self.tr.phi_numel

    def reduce_step(self, buf: torch.Tensor) -> torch.Tensor:
        return self.tr.trust.reduce_step(self.tr, buf, self.step_width)

    def add_release(self, buf: torch.Tensor, block: ClientBlock, phi: torch.Tensor) -> None:
        buf[: self.step_width] += phi

    def apply_step(self, reduced: torch.Tensor) -> None:
        self.tr.apply_flat_grad(reduced[: self.step_width])


@register_aggregation("delta")
class DeltaAggregation(Aggregation):
    """Local steps on each hosted client's private copy of Phi; weighted deltas reduced per round."""

    trust_reason = (
        "in delta a client's private copy of Phi is stepped with its own low-noise gradient over several "
        "local steps, so the round's delta is no longer one Gaussian mechanism"
    )

    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        self.local: dict | None = None  # {client id: its private copy of Phi}, inside a round

    def begin_round(self, r: int) -> None:
        if self.local is None:  # else restored from a checkpoint inside the round
            self.local = {c.id: copy.deepcopy(self.tr.hyper) for c in self.tr.clients}

    # a copy of Phi and a step object per hosted client, made every round: for small federations
    max_clients_per_rank = 2000

    def blocks(self, members: list) -> list:
        """One block per client: each client's step runs on its own copy of Phi. Refused beyond
        `max_clients_per_rank` hosted clients (the copies and per-client steps grow with the clients, and the
        round's delta is computed client by client): grad aggregation is the rule that scales."""
        if len(members) > self.max_clients_per_rank:
            mb = len(members) * self.tr.phi_numel * 4 / 2**20
            raise ConfigError(
                f"federation.aggregation=delta keeps a private copy of Phi and a DP step of its own per "
                f"client ({len(members)} clients on this rank: {mb:,.0f} MB of copies, remade every "
                f"round); it is for small federations, at most {self.max_clients_per_rank} clients per "
                f"rank: use federation.aggregation=grad, or more ranks"
            )
        return [([cid], step_type) for cid, step_type in members]

    def release_weight(self, client_id: int) -> float:
        return 1.0  # a block of one releases its client's own noisy gradient; the weights enter the round's delta

    def step_hyper(self, block: ClientBlock) -> HyperNetwork:
        return self.local[block.ids[0]] if self.local is not None else self.tr.hyper

    def add_release(self, buf: torch.Tensor, block: ClientBlock, phi: torch.Tensor) -> None:
        """The client's private copy of Phi takes a plain SGD step of train.local_lr, then the projection."""
        hyper = self.local[block.ids[0]]
        lr = self.tr.cfg.train.local_lr
        with torch.no_grad():
            off = 0
            for p in hyper.parameters():
                n = p.numel()
                p.sub_(lr * phi[off : off + n].view_as(p).to(device=p.device, dtype=p.dtype))
                off += n
        self.tr.project(hyper)

    def end_round(self, r: int, steps_done: int) -> None:
        tr = self.tr
        if steps_done > 0:
            start = flat_phi(tr.hyper)  # Phi does not move inside a delta round
            buf = torch.zeros(tr.phi_numel, dtype=torch.float64)
            for c in tr.clients:
                buf += tr.weights[c.id] * (flat_phi(self.local[c.id]) - start)
            tr.allreduce(buf)
            with tr.hooks.timed("phi_update"):
                new = start + tr.cfg.federation.server_lr * buf
                torch.nn.utils.vector_to_parameters(new.float().to(tr.torch_device), tr.hyper.parameters())
                tr.project(tr.hyper)
        self.local = None

    def client_state(self, client: Client, mid_round: bool) -> dict:
        if self.local is not None and mid_round:  # a stop inside a delta round: the private copy of Phi too
            return {"delta_local_phi": flat_phi(self.local[client.id])}
        return {}

    def restore(self, states: dict, mid_round: bool, where: object) -> None:
        tr = self.tr
        local = {}
        for cid, state in states.items():
            if "delta_local_phi" in state:
                h = copy.deepcopy(tr.hyper)
                torch.nn.utils.vector_to_parameters(
                    state["delta_local_phi"].float().to(tr.torch_device), h.parameters()
                )
                local[cid] = h
        if mid_round:
            if len(local) != len(tr.clients):
                raise CheckpointError(f"{where}: a checkpoint inside a delta round lacks the clients' copies of Phi")
            self.local = local
