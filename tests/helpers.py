"""Helpers several test modules share (pytest puts tests/ on sys.path: `from helpers import ...`)."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedhypevae.dp_step import Sums

# variables a surrounding launcher (a CI job under srun, a debugging mpiexec) would leak into a test's processes
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "TORCHELASTIC_", "HYDRA_", "MPIR_", "MPICH_")
LAUNCHER_NAMES = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
}


def launcher_free_env(bin_dir: Path | None = None, **extra: str) -> dict:
    """This process's environment without any launcher's variables, one thread per process, unbuffered
    output, `bin_dir` first on PATH; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_NAMES}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def sh(cmd, env: dict, timeout: float = 120, check: bool = True, cwd: Path | None = None):
    """Run `cmd` (captured, text); with `check`, an AssertionError carrying its output when it fails."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def wait_for(pred, timeout: float, what: str, on_fail=lambda: "", poll_s: float = 0.25) -> float:
    """Seconds until `pred()` held; an AssertionError (with `on_fail()`'s text) after `timeout` seconds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return time.time() - t0
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{on_fail()}")


def process_running(pid: int | str) -> bool:
    """The process exists and is not a zombie (the state after the last ')' of /proc/PID/stat: comm may hold one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def metric_rows(out: Path) -> int:
    """Rounds a run has logged so far (lines of OUT/metrics.jsonl)."""
    m = Path(out) / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.is_file() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupt_after(cfg, out: Path, rounds: int, extra_steps: int = 0, comm=None):
    """Run `rounds` rounds with a checkpoint after each, then `extra_steps` more steps of the next round that
    are released but never checkpointed (a crash). Returns the Trainer."""
    from fedhypevae.trainer import Trainer

    tr = Trainer(cfg, out, comm, progress=False)
    tr.setup()
    for r in range(rounds):
        tr.run_round(r)
        tr.state.round = r + 1
        tr.save_checkpoint()
    if extra_steps:
        saved = cfg.train.local_steps
        cfg.train.local_steps = extra_steps  # a partial round, then the "crash"
        tr.run_round(rounds)
        cfg.train.local_steps = saved
    tr.ledger.close()
    return tr


def load_phi(out: Path) -> dict:
    return torch.load(Path(out) / "hypernetwork.pt", map_location="cpu", weights_only=True)


def rel_diff(a: dict, b: dict) -> float:
    """max over tensors of max|a-b| / max|a| (how hypernetworks of two runs are compared)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        assert x.shape == y.shape, k
        worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)))
    return worst


def clipped_sums(clients, cfg, hyper, xs, ys, es, *, mode: str, clip_norm: float, per_sample: str = "ghost"):
    """Per client: the clipped, pre-noise sums {ClientView name: tensor} of the privatized parameters (strict:
    encoder, code and Phi; paper: Phi) of the given rows, and the per-sample norms, from the DP step's rows
    (`per_sample`: ghost or materialized) on the block of `clients` (views of the rows of one block)."""
    from fedhypevae.dp_step import clip_factor
    from fedhypevae.engine import GhostRows
    from fedhypevae.model import CODE_NAME, ENCODER_PREFIX, PHI_PREFIX
    from fedhypevae.rows import Batch, MaterializedRows, NoRows

    block = clients[0].block
    assert all(c.block is block for c in clients) and block.M == len(clients)
    counts = [len(y) for y in ys]
    b = Batch.build(torch.cat(xs), torch.cat(ys), torch.cat(es), counts, block.device)
    if sum(counts) == 0:
        rows = NoRows(block, hyper)
    else:
        rows = GhostRows(block, hyper, b) if per_sample == "ghost" else MaterializedRows(block, hyper, b)
    strict = mode == "strict"
    norms = rows.norms(strict)
    c = clip_factor(norms, clip_norm)
    enc, code = rows.private_sums(c) if strict else (None, None)
    res, per_norms = [], []
    names = [n for n, _ in hyper.named_parameters()]
    for i in range(block.M):
        flat = rows.phi_sum(c * (b.cidx == i).to(c.dtype))
        d, off = {}, 0
        for n, p in hyper.named_parameters():
            d[PHI_PREFIX + n] = flat[off : off + p.numel()].view_as(p)
            off += p.numel()
        assert list(d) == [PHI_PREFIX + n for n in names]
        if strict:
            d.update({ENCODER_PREFIX + n: t[i] for n, t in zip(block.enc_names, enc)})
            d[CODE_NAME] = code[i]
        res.append(d)
        per_norms.append(norms[b.cidx == i])
    return res, per_norms


def clip_between(norms) -> float:
    """A clip norm strictly between the two middle per-sample norms, so that about half the samples are clipped
    and none sits exactly at C (where float rounding in one computation or another decides)."""
    s = torch.sort(torch.as_tensor(norms).flatten()).values
    k = max(1, len(s) // 2)
    return float(0.5 * (s[k - 1] + s[k])) if len(s) > 1 else float(s[0])


REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"


@dataclass
class StepTrace:
    """What one client's DP step computed: the batch, the pre-noise payload and what was released."""

    idx: torch.Tensor  # indices (into the client's data) of the realized Poisson batch, after any drop
    payload: dict  # clipped pre-noise sum over the privatized parameters (ClientView names; Phi's in fp64)
    released: dict  # (payload + noise) / (q n_declared): the noisy release, the same names
    phi: dict  # what Client.step returns as phi_grad: released Phi part + post-noise terms (HyperNetwork names)
    expected_batch: float  # q * n_declared (public)
    history: Sums  # the release the step continued from (pass it as `released=` to replay it)


def _client_dict(sums: Sums, pos: int, strict: bool, enc_names: list) -> dict:
    """One client's sums by ClientView name: its own coordinates (strict) and Phi's (fp64, the block's Phi
    sum: with one client, that client's)."""
    from fedhypevae.model import CODE_NAME, ENCODER_PREFIX, PHI_PREFIX

    out = {}
    if strict:
        out.update({ENCODER_PREFIX + n: t[pos] for n, t in zip(enc_names, sums.enc)})
        out[CODE_NAME] = sums.code[pos]
    off = 0
    for n, shape in sums.layout:
        k = math.prod(shape)
        out[PHI_PREFIX + n] = sums.phi[off : off + k].view(shape)
        off += k
    return out


def trace_step(
    client,
    hyper,
    generator: torch.Generator,
    *,
    sigma,
    features=None,
    drop: int | None = None,
    released: Sums | None = None,
    control: type | None = None,
    update: bool = True,
) -> StepTrace:
    """One DP step of `client` (its own step class, on a block of one) on `hyper` with the probe's stages and
    the given generator.

    drop:      a record index of the client's data left out of the realized batch (the same coins as on D,
               minus that record: D minus one record).
    released:  a released history entry (a previous trace's ``released``) to continue from instead of this
               step's own noisy values; the noise is still drawn so the generator stays in step.
    update:    apply the local update of psi_i and v_i (as Client.step does).
    With the client's own step generator and none of these, it releases exactly what Client.step does.
    """
    from fedhypevae.dp_step import Sums
    from fedhypevae.errors import PrivacyError
    from fedhypevae.model import PHI_PREFIX
    from fedhypevae.privacy.sensitivity import probe

    if not client.cfg.privacy.enabled:
        raise PrivacyError("the sensitivity check needs privacy.enabled: true (there is no clipped payload otherwise)")
    own = client.dp_step
    step = probe(own, drop=None if drop is None else (0, drop), released=released, update=update, control=control)
    pending = step.prepare(hyper, 0, 0, gens=[generator])
    names = own.block.enc_names
    payload = _client_dict(pending.sums.clone(), 0, pending.strict, names)
    out = step.release(pending, sigma=sigma, features=features)
    history = step.own if released is None else released
    phi = {
        n[len(PHI_PREFIX) :]: t.float()
        for n, t in _client_dict(Sums([], None, out.phi, pending.sums.layout), 0, False, []).items()
    }
    return StepTrace(
        idx=pending.draws[0].idx,
        payload=payload,
        released=_client_dict(history, 0, pending.strict, names),
        phi=phi,
        expected_batch=float(own.block.expected[0]),
        history=history,
    )


def run_job(cmd: list, timeout: float, env: dict) -> tuple[int, str, str]:
    """Run a job (a launcher and its ranks) in its own session from the repository root; on timeout kill the whole
    job and fail the test with its output."""
    import pytest

    proc = subprocess.Popen(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{cmd} did not exit within {timeout} s\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


def launch_trust_worker(out: Path, n: int, scenarios: list, timeout: float = 420) -> None:
    """tests/trust_worker.py on one process (n = 1) or under `mpiexec -n n`; fails the test with its output."""
    cmd = [sys.executable, str(REPO / "tests" / "trust_worker.py"), str(out), *scenarios]
    if n > 1:
        cmd = [str(MPIEXEC), "-n", str(n), *cmd]
    rc, so, se = run_job(cmd, timeout, launcher_free_env(Path(sys.executable).parent))
    assert rc == 0 and "trust worker ok" in so, f"{cmd}\n{so[-3000:]}\n{se[-5000:]}"


def trust_ranks(out: Path, name: str) -> list:
    """Every rank's record of one trust_worker scenario, in rank order."""
    files = sorted((out / name).glob("rank_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    recs = [torch.load(f, weights_only=False) for f in files]
    assert recs and len(recs) == recs[0]["world_size"], f"{out / name}: {len(recs)} rank files"
    return recs
