"""The launch bootstrap (fedhypevae.hpc.launch.Launch) that `fedhypevae train` and a sweep point's job share.

Unit tests drive it with a stand-in communicator that plays rank 1 of 2 and records what the bootstrap asks
of it (abort, close); the mpi tests start real ranks and check that one rank's exception ends the others.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fedhypevae.hpc import launch as launch_mod
from fedhypevae.hpc.backend import BACKENDS, BackendError
from fedhypevae.hpc.comm import LocalCommunicator
from fedhypevae.hpc.launch import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_USER_ERROR, Launch
from fedhypevae.hpc.launcher import MPI_FLAVOURS, LaunchInfo, mpi_flavour, srun_mpi_hint
from helpers import launcher_free_env

from fedhypevae import cli
from fedhypevae.errors import ConfigError, DataError, FedHypeVAEError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
ONE = LaunchInfo("none", 0, 1, 0)


class Aborted(BaseException):
    """What the stand-in raises where a real abort would end the process."""


class FakeRank(LocalCommunicator):
    """Rank `rank` of a `world_size`-rank job: records abort (which must not return) and close."""

    backend = "fake"

    def __init__(self, rank: int = 1, world_size: int = 2):
        self.rank, self.world_size = rank, world_size
        self.aborted: list[int] = []
        self.closed = 0

    def abort(self, code: int = 1) -> None:
        self.aborted.append(code)
        raise Aborted(code)

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def fake(monkeypatch):
    """make_communicator returns a FakeRank; sys.excepthook is put back after the test."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    comm = FakeRank()
    seen = {}

    def make(name, info, *, device, timeout_s):
        seen.update(name=name, info=info, device=device, timeout_s=timeout_s)
        return comm

    monkeypatch.setattr(launch_mod, "make_communicator", make)
    comm.seen = seen
    return comm


def _launch(**kw) -> Launch:
    kw.setdefault("prog", "prog")
    kw.setdefault("device", "cpu")
    kw.setdefault("info", LaunchInfo("mpich", 1, 2, 0))
    return Launch(**kw)


# ------------------------------------------------------------------------------- entry and a normal exit
@pytest.mark.timeout(30)
def test_a_normal_exit_closes_the_communicator_and_restores_the_excepthook(fake):
    before = sys.excepthook
    with _launch(backend="mpi", timeout_s=12.5) as ranks:
        assert ranks.comm is fake and ranks.device == torch.device("cpu")
        assert fake.seen == {"name": "mpi", "info": ranks.info, "device": ranks.device, "timeout_s": 12.5}
        assert sys.excepthook is not before  # an uncaught exception on this rank would end every rank
    assert fake.closed == 1 and fake.aborted == []
    assert sys.excepthook is before
    assert ranks.exit_status is None


@pytest.mark.timeout(30)
def test_the_launcher_is_detected_when_not_given(fake, monkeypatch):
    monkeypatch.setattr(launch_mod, "detect_launcher", lambda: LaunchInfo("srun", 1, 2, 1))
    with Launch(prog="prog", device="cpu") as ranks:
        assert ranks.info == LaunchInfo("srun", 1, 2, 1) and fake.seen["info"] is ranks.info


# ------------------------------------------------------------------------------- start-up failures
@pytest.mark.timeout(30)
def test_a_backend_that_cannot_start_is_the_callers_one_line_error(monkeypatch):
    def refuse(name, info, **kw):
        raise BackendError("--backend mpi needs mpi4py")

    monkeypatch.setattr(launch_mod, "make_communicator", refuse)
    with pytest.raises(ConfigError, match="^--backend mpi needs mpi4py$"):
        with _launch(setup_error=ConfigError):
            pytest.fail("the body ran without a communicator")


@pytest.mark.timeout(30)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: --device cuda is valid here")
def test_cuda_asked_for_without_cuda_is_a_one_line_error():
    with pytest.raises(ConfigError, match="torch.cuda.is_available"):
        with Launch(prog="prog", device="cuda", setup_error=ConfigError, info=ONE):
            pytest.fail("ran on a device that is not there")


@pytest.mark.timeout(30)
def test_a_world_other_than_the_one_asked_for_is_refused_naming_the_srun_plugins(fake):
    with pytest.raises(FedHypeVAEError) as err:
        with _launch(ranks=4, setup_error=lambda m: ConfigError(f"point p: {m}")):
            pytest.fail("ran on the wrong world")
    text = str(err.value)
    assert text.startswith("point p: asked for 4 ranks but this task sees a world of 2 (launcher mpich)")
    assert all(f"--mpi={f.srun_plugin}" in text for f in MPI_FLAVOURS.values()) and "mpiexec" in text
    assert fake.closed == 0 and fake.aborted == []


# ------------------------------------------------------------------------------- errors inside the block
@pytest.mark.timeout(30)
def test_a_user_error_on_one_rank_is_one_line_and_aborts_every_rank_with_2(fake, capsys):
    with pytest.raises(Aborted):
        with _launch(prog="fedhypevae", user_errors=(FedHypeVAEError,)):
            raise DataError("shard client_3.npz is truncated")
    assert fake.aborted == [EXIT_USER_ERROR] == [2]
    err = capsys.readouterr().err
    assert err == "fedhypevae: error: [rank 1/2] shard client_3.npz is truncated\n"
    assert fake.closed == 0


@pytest.mark.timeout(30)
def test_an_unexpected_exception_on_one_rank_aborts_every_rank_with_its_traceback(fake, capsys):
    with pytest.raises(Aborted):
        with _launch(user_errors=(FedHypeVAEError,)):
            raise ZeroDivisionError("boom")
    assert fake.aborted == [EXIT_FATAL] == [1]
    err = capsys.readouterr().err
    assert "[rank 1/2] fatal ZeroDivisionError: boom; aborting all ranks" in err and "Traceback" in err


@pytest.mark.timeout(30)
def test_on_one_process_errors_propagate_to_the_caller(monkeypatch, capsys):
    monkeypatch.setattr(launch_mod, "make_communicator", lambda *a, **k: FakeRank(0, 1))
    for exc in (DataError("bad shard"), ZeroDivisionError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with Launch(prog="prog", device="cpu", user_errors=(FedHypeVAEError,), info=ONE):
                raise exc
    assert capsys.readouterr().err == ""  # the caller prints (one line, status 2)


# ------------------------------------------------------------------------------- a second Ctrl-C
@pytest.mark.timeout(30)
def test_a_second_interrupt_on_one_process_gives_130_and_rank_0_says_how_to_resume(monkeypatch, capsys):
    before = sys.excepthook
    monkeypatch.setattr(launch_mod, "make_communicator", lambda *a, **k: FakeRank(0, 1))
    with Launch(prog="fedhypevae", device="cpu", interrupt_message="aborted; --resume continues", info=ONE) as r:
        raise KeyboardInterrupt
    assert r.exit_status == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "fedhypevae: aborted; --resume continues\n"
    assert sys.excepthook is before


@pytest.mark.timeout(30)
def test_a_second_interrupt_on_several_ranks_aborts_them_with_130_and_only_rank_0_speaks(fake, capsys):
    with pytest.raises(Aborted):
        with _launch(interrupt_message="aborted"):
            raise KeyboardInterrupt
    assert fake.aborted == [130]
    assert capsys.readouterr().err == ""  # the fake is rank 1
    fake.rank, fake.aborted = 0, []
    with pytest.raises(Aborted):
        with _launch(interrupt_message="aborted"):
            raise KeyboardInterrupt
    assert fake.aborted == [130] and capsys.readouterr().err == "prog: aborted\n"


@pytest.mark.timeout(30)
def test_without_an_interrupt_message_ctrl_c_on_several_ranks_is_fatal(fake, capsys):
    with pytest.raises(Aborted):
        with _launch():
            raise KeyboardInterrupt
    assert fake.aborted == [1] and "fatal KeyboardInterrupt" in capsys.readouterr().err


# ------------------------------------------------------------------------------- both entry points use it
@pytest.fixture
def entered(monkeypatch):
    """Every Launch entered in this test, with its settings."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    for k in list(__import__("os").environ):
        if k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA_", "TORCHELASTIC_")):
            monkeypatch.delenv(k)
    seen = []
    enter = Launch.__enter__

    def spy(self):
        seen.append(self)
        return enter(self)

    monkeypatch.setattr(Launch, "__enter__", spy)
    return seen


@pytest.mark.timeout(120)
def test_fedhypevae_train_launches_through_the_bootstrap(tmp_path, monkeypatch, entered):
    import fedhypevae.run

    got = {}

    def trained(cfg, out, comm, **kw):
        got.update(comm=comm, **kw)
        return {"status": "complete"}

    monkeypatch.setattr(fedhypevae.run, "run_training", trained)
    out = tmp_path / "run"
    argv = ["train", "--config", "tiny", "--out", str(out), "--quiet", "--no-progress", "--device", "cpu"]
    assert cli.main([*argv, "--backend", "local", "--timeout", "7"]) == 0
    (ranks,) = entered
    assert ranks.prog == "fedhypevae" and ranks.backend == "local" and ranks.timeout_s == 7.0
    assert ranks.requested_device == "cpu" and ranks.interrupt_message and str(out) in ranks.interrupt_message
    assert got["comm"] is ranks.comm and got["launcher"] == "none" and got["device"] == "cpu"


@pytest.mark.timeout(120)
def test_a_sweep_points_job_launches_through_the_bootstrap(tmp_path, monkeypatch, entered, capsys):
    from fedhypevae.slurm import job

    import fedhypevae.run

    got = {}

    def trained(cfg, out, comm, **kw):
        got.update(comm=comm, **kw)
        return {
            "status": "partial",
            "missing": ["statistics: no budget left"],
            "training": {"rounds": 1},
            "provenance": {},
            "privacy": {"epsilon_spent": 1.0, "formal_guarantee": True},
        }

    monkeypatch.setattr(fedhypevae.run, "run_training", trained)
    point = tmp_path / "points" / "p"
    point.mkdir(parents=True)
    spec = {
        "id": "p",
        "method": "fedhypevae-strict",
        "partition": "iid",
        "epsilon": 1.0,
        "seed": 0,
        "ranks": 1,
        "config": str(REPO / "configs" / "tiny.yaml"),
        "overrides": ["partition.kind=iid"],
        "protocol": "augment",
        "comm_timeout_s": 9.0,
        "device": "cpu",
        "baseline_settings": {},
    }
    job.write_json(point / "spec.json", spec)
    assert job.main([str(point)]) == job.EXIT_PARTIAL
    (ranks,) = entered
    assert ranks.prog == "fedhypevae.slurm.job" and ranks.backend == "auto" and ranks.ranks == 1
    assert ranks.timeout_s == 9.0 and ranks.requested_device == "cpu"
    assert got["comm"] is ranks.comm and got["launcher"] == "none" and got["device"] == "cpu"

    # a point that asks for more ranks than the task sees: one line naming the point, status 2, nothing run
    entered.clear()
    (point / "result.json").unlink()
    job.write_json(point / "spec.json", {**spec, "ranks": 3})
    got.clear()
    assert job.main([str(point)]) == 2
    err = capsys.readouterr().err
    assert "fedhypevae.slurm.job: error: point p: asked for 3 ranks but this task sees a world of 1" in err
    assert len(entered) == 1 and got == {}


# ------------------------------------------------------------------------------- one table, one list
def test_the_flavour_table_and_the_backend_list_are_the_ones_the_commands_offer():
    from fedhypevae.slurm import sweep

    assert mpi_flavour("openmpi").srun_plugin == "pmix" and mpi_flavour("mpich").srun_plugin == "pmi2"
    with pytest.raises(ValueError, match="mpich, openmpi"):
        mpi_flavour("mvapich")
    assert (
        srun_mpi_hint() == "with MPICH srun --mpi=pmi2, with Open MPI srun --mpi=pmix, or start the ranks with mpiexec"
    )
    for name in BACKENDS:  # every back-end hpc.backend knows is a choice of `fedhypevae train --backend`
        assert cli.build_parser().parse_args(["train", "--out", "x", "--backend", name]).backend == name
    for name in MPI_FLAVOURS:  # every flavour of the table is a choice of the sweep's --mpi
        assert sweep.build_parser().parse_args(["--out", "x", "--mpi", name]).mpi == name
    for parser, argv in ((cli.build_parser(), ["train", "--out", "x", "--backend"]), (sweep.build_parser(), ["--mpi"])):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "nccl"])


@pytest.mark.timeout(30)
def test_data_partition_defaults_are_the_configs(tmp_path):
    from fedhypevae.config import DataConfig, PartitionConfig

    args = cli.build_parser().parse_args(["data", "partition", "digits", "--clients", "3", "--out", str(tmp_path)])
    part, data = PartitionConfig(), DataConfig()
    assert (args.kind, args.alpha, args.min_client_size) == (part.kind, part.alpha, part.min_client_size)
    assert (args.transform, args.test_fraction) == (data.transform, data.test_fraction)


@pytest.mark.timeout(60)
def test_the_command_lines_help_does_not_import_torch():
    code = "import sys; from fedhypevae import cli; cli.build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# ------------------------------------------------------------------------------- real ranks
WORKER = """
import sys, time
from fedhypevae.hpc.launch import Launch
with Launch(prog="worker", device="cpu", timeout_s=60) as ranks:
    if ranks.comm.rank == 1:
        time.sleep(0.5)
        raise ZeroDivisionError("rank 1 fails")
    ranks.comm.barrier()  # rank 0 waits here for a rank that never comes
print("rank", ranks.comm.rank, "left the barrier", flush=True)
"""


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_an_exception_on_one_real_rank_ends_the_other_one(tmp_path):
    if not MPIEXEC.is_file():
        pytest.skip(f"no mpiexec in {BIN} (pip install mpich)")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    t0 = time.monotonic()
    r = subprocess.run(
        [str(MPIEXEC), "-n", "2", sys.executable, str(script)],
        env=launcher_free_env(BIN),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert r.returncode != 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 60
    assert "[rank 1/2] fatal ZeroDivisionError: rank 1 fails; aborting all ranks" in r.stderr, r.stderr
    assert "left the barrier" not in r.stdout


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_a_corrupt_shard_on_one_rank_of_a_sweep_point_ends_the_job_with_one_line(tmp_path):
    """The job's entry point: rank 1's user error is one line naming the rank, and rank 0 does not wait."""
    import json

    from fedhypevae.hpc.placement import place_clients
    from fedhypevae.slurm import job

    if not MPIEXEC.is_file():
        pytest.skip(f"no mpiexec in {BIN} (pip install mpich)")
    env = launcher_free_env(BIN)
    shards = tmp_path / "shards"
    cmd = [str(BIN / "fedhypevae"), "data", "partition", "digits", "--clients", "4", "--alpha", "0.5"]
    cmd += ["--min-client-size", "20", "--clients-per-file", "1"]  # a file per client: one only rank 1 reads
    r = subprocess.run([*cmd, "--out", str(shards)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((shards / "manifest.json").read_text())
    shard = shards / manifest["files"][place_clients(manifest["declared_sizes"], 2)[1][0]]  # only rank 1 reads it
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    point = tmp_path / "points" / "p"
    point.mkdir(parents=True)
    spec = {
        "id": "p",
        "method": "fedhypevae-strict",
        "partition": "dirichlet0.5",
        "epsilon": 1.0,
        "seed": 0,
        "ranks": 2,
        "config": str(REPO / "configs" / "tiny.yaml"),
        "overrides": [f"data.path={shards}", "privacy.mode=strict"],
        "protocol": "augment",
        "comm_timeout_s": 60.0,
        "device": "cpu",
        "baseline_settings": {},
    }
    job.write_json(point / "spec.json", spec)
    t0 = time.monotonic()
    r = subprocess.run(
        [str(MPIEXEC), "-n", "2", sys.executable, "-m", "fedhypevae.slurm.job", str(point)],
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert r.returncode != 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 120
    assert "fedhypevae.slurm.job: error: [rank 1/2]" in r.stderr and shard.name in r.stderr, r.stderr
    assert "rank 0/2" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (point / "result.json").exists()
