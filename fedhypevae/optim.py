"""Phi's optimizer (and the meta-code fit's): torch's Adam or SGD, run through their functional kernels.

``torch.optim.Adam`` and ``SGD`` import ``torch._dynamo`` the first time any of their methods runs (the constructor's
``add_param_group``, ``step``, ``zero_grad``, ``state_dict`` are wrapped to disable the compiler): 1.5 s of a
rank's start on this machine, paid by every rank of every run. :class:`Optimizer` calls the same functional
``torch.optim.adam.adam`` / ``torch.optim.sgd.sgd`` that their ``step`` calls, with the same arguments and the
state initialized as theirs, so its updates are theirs bit for bit, and it reads and writes their ``state_dict``
format: a checkpoint written by either is resumed by either (``tests/test_optim.py``).

Supported: one parameter group, Adam without amsgrad and SGD without momentum (the settings ``train.optimizer``
and the meta-code fit use); anything else is refused rather than approximated.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch.optim.adam import adam as _adam
from torch.optim.sgd import sgd as _sgd

KINDS = ("adam", "sgd")
_TORCH = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def _defaults(kind: str) -> dict:
    """The param-group defaults torch's optimizer of this kind would store (from its constructor's signature)."""
    sig = inspect.signature(_TORCH[kind].__init__)
    return {k: p.default for k, p in sig.parameters.items() if k not in ("self", "params")}


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer:
    """``torch.optim.Adam(params, lr=lr, foreach=foreach)`` or ``torch.optim.SGD(...)`` with their defaults otherwise:
    ``step`` (every parameter that has a ``.grad``), ``zero_grad``, ``state_dict``/``load_state_dict`` in torch's
    format, ``param_groups`` (one group: its ``lr`` may be changed between steps)."""

    def __init__(self, params, *, kind: str = "adam", lr: float, foreach: bool | None = None):
        if kind not in KINDS:
            raise ValueError(f"optimizer kind must be one of {KINDS}; got {kind!r}")
        if not (lr >= 0 and math.isfinite(lr)):  # torch refuses a negative one; NaN and inf too, here
            raise ValueError(f"invalid learning rate: {lr}")
        self.kind = kind
        self.params = list(params)
        group = _defaults(kind)
        group.update(lr=lr, foreach=foreach)
        group["params"] = self.params
        self.param_groups = [group]
        self.state: dict[int, dict] = {}  # by the parameter's index, as in a state_dict

    # ------------------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in idx]
        grads = [p.grad for p in params]
        if self.kind == "sgd":
            _sgd(
                params,
                grads,
                [None] * len(params),
                weight_decay=g["weight_decay"],
                momentum=g["momentum"],
                lr=g["lr"],
                dampening=g["dampening"],
                nesterov=g["nesterov"],
                maximize=g["maximize"],
                has_sparse_grad=False,
                foreach=g["foreach"],
                fused=g["fused"],
                grad_scale=None,
                found_inf=None,
            )
            return
        for i, p in zip(idx, params):
            if i not in self.state:  # lazy, as torch.optim.Adam._init_group
                self.state[i] = {
                    "step": torch.tensor(0.0, dtype=_scalar_dtype()),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        st = [self.state[i] for i in idx]
        beta1, beta2 = g["betas"]
        _adam(
            params,
            grads,
            [s["exp_avg"] for s in st],
            [s["exp_avg_sq"] for s in st],
            [],
            [s["step"] for s in st],
            amsgrad=False,
            has_complex=any(torch.is_complex(p) for p in params),
            beta1=beta1,
            beta2=beta2,
            lr=g["lr"],
            weight_decay=g["weight_decay"],
            eps=g["eps"],
            maximize=g["maximize"],
            foreach=g["foreach"],
            capturable=False,
            differentiable=False,
            fused=g["fused"],
            grad_scale=None,
            found_inf=None,
            decoupled_weight_decay=g.get("decoupled_weight_decay", False),
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # ------------------------------------------------------------------------------------------ torch's format
    def state_dict(self) -> dict:
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        return {"state": {i: dict(s) for i, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, sd: dict) -> None:
        """A state dict of this class or of torch's optimizer of the same kind (one group, the same parameters)."""
        groups = sd["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state for {sum(len(g['params']) for g in groups)} parameters in {len(groups)} group(s); "
                f"this optimizer has {len(self.params)} in 1"
            )
        saved = groups[0]
        unsupported = {
            k: saved[k] for k in ("amsgrad", "momentum", "nesterov", "capturable", "differentiable") if saved.get(k)
        }
        if unsupported:
            raise ValueError(f"optimizer state saved with {unsupported}: not supported by fedhypevae.optim.Optimizer")
        order = {pid: i for i, pid in enumerate(saved["params"])}
        self.param_groups[0].update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for pid, s in sd["state"].items():
            i = order[pid]
            p = self.params[i]
            # as torch's load_state_dict: moments to the parameter's dtype and device, the step count as saved
            self.state[i] = {
                k: (v if torch.is_tensor(v) else torch.tensor(float(v), dtype=_scalar_dtype()))  # an old float step
                if k == "step"
                else v.to(dtype=p.dtype, device=p.device)
                for k, v in s.items()
                if v is not None
            }
        if self.kind == "adam":
            for i, s in self.state.items():
                if set(s) != {"step", "exp_avg", "exp_avg_sq"}:
                    raise ValueError(f"Adam state of parameter {i} has {sorted(s)}; expected step, exp_avg, exp_avg_sq")
