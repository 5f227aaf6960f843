"""fedhypevae.optim.Optimizer is torch.optim.Adam / SGD bit for bit, reads and writes their state_dict format, and
spares a training process the import of torch._dynamo."""

import subprocess
import sys

import pytest
import torch

from fedhypevae.optim import Optimizer


def _params(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((7, 5), (5,), (3, 4, 2))]


def _grads(params, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(opt, params, steps: range, lr_at: dict) -> None:
    for s in steps:
        if s in lr_at:
            for grp in opt.param_groups:
                grp["lr"] = lr_at[s]
        for p, g in zip(params, _grads(params, 100 + s)):
            p.grad = g
        if s % 4 == 3:
            params[1].grad = None  # a parameter without a gradient is skipped, as torch does
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind,foreach", [("adam", True), ("adam", None), ("sgd", True), ("sgd", None)])
def test_the_same_updates_and_state_as_torch(kind, foreach):
    ours, theirs = _params(0), _params(0)
    cls = torch.optim.Adam if kind == "adam" else torch.optim.SGD
    a = Optimizer(ours, kind=kind, lr=0.01, foreach=foreach)
    b = cls(theirs, lr=0.01, foreach=foreach)
    _run(a, ours, range(12), {6: 0.003})
    _run(b, theirs, range(12), {6: 0.003})
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sb["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k in sb["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)
            assert sa["state"][i][k].dtype == sb["state"][i][k].dtype


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_a_state_dict_of_either_resumes_in_the_other(kind):
    """A checkpoint written with torch's optimizer resumes with ours, and the other way round: the continued runs
    agree bit for bit with one that never stopped."""
    cls = torch.optim.Adam if kind == "adam" else torch.optim.SGD
    ref = _params(1)
    r = cls(ref, lr=0.02, foreach=True)
    _run(r, ref, range(10), {})

    for first, second in ((cls, Optimizer), (Optimizer, cls)):
        ps = _params(1)
        make = (lambda c: lambda p: c(p, lr=0.02, foreach=True) if c is cls else Optimizer(p, kind=kind, lr=0.02))(
            first
        )
        o1 = make(ps)
        _run(o1, ps, range(5), {})
        sd = o1.state_dict()
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        o2 = second(qs, lr=0.02, foreach=True) if second is cls else Optimizer(qs, kind=kind, lr=0.02, foreach=True)
        o2.load_state_dict(sd)
        _run(o2, qs, range(5, 10), {})
        for p, q in zip(qs, ref):
            assert torch.equal(p, q), (first.__name__, second.__name__)


def test_a_state_dict_for_other_parameters_is_refused():
    a = Optimizer(_params(0), kind="adam", lr=0.1)
    b = torch.optim.Adam(_params(0)[:2], lr=0.1)
    with pytest.raises(ValueError, match="3 in 1"):
        a.load_state_dict(b.state_dict())
    with pytest.raises(ValueError, match="kind"):
        Optimizer(_params(0), kind="adagrad", lr=0.1)


def test_a_training_run_does_not_import_torch_dynamo(tmp_path):
    """What the class is for: torch.optim's methods import torch._dynamo (1.5 s at every rank's start)."""
    code = (
        "import sys\n"
        "from fedhypevae.cli import main\n"
        f"rc = main(['train', '--config', 'tiny', '--out', {str(tmp_path / 'run')!r}, '--no-progress',"
        " '--set', 'partition.clients=3', '--set', 'train.rounds=1'])\n"
        "print('DYNAMO', 'torch._dynamo' in sys.modules)\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DYNAMO False" in out.stdout, out.stdout[-500:]
