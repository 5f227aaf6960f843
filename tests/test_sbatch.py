"""Golden files for the generated sbatch scripts (plain sbatch, no submitit), and the shipped templates."""

import os
import subprocess
from pathlib import Path

import pytest
from fedhypevae.slurm.sbatch import MPI_FLAVOURS, TEMPLATES, point_script, render, train_template

GOLDEN = Path(__file__).parent / "golden"
PARAMS = {
    "nodes": 2,
    "tasks_per_node": 4,
    "cpus_per_task": 2,
    "timeout_min": 125,
    "gpus_per_node": 4,
    "mem_gb": 32,
    "slurm_partition": "gpu",
    "slurm_account": "proj42",
    "slurm_signal_delay_s": 120,
}


def _point(mpi: str) -> str:
    return point_script(
        Path("/scratch/sweeps/eps/points/fedhypevae-strict__dirichlet0.3__eps1__seed0"),
        python="/opt/venv/bin/python",
        mpi=mpi,
        params=PARAMS,
        job_name="fhv-fedhypevae-strict__dirichlet0.3__eps1__seed0",
    )


@pytest.mark.parametrize("mpi", sorted(MPI_FLAVOURS))
def test_sweep_point_scripts_match_golden_files(mpi):
    golden = GOLDEN / f"point_{mpi}.sbatch"
    assert _point(mpi) == golden.read_text(), f"regenerate {golden} if the change is intended"


@pytest.mark.parametrize("mpi", sorted(MPI_FLAVOURS))
def test_shipped_templates_are_the_generated_ones(mpi):
    shipped = TEMPLATES / f"train_{mpi}.sbatch"
    assert shipped.read_text() == train_template(mpi), "run: python -m fedhypevae.slurm.sbatch --write-templates"
    assert train_template(mpi) == (GOLDEN / f"train_{mpi}.sbatch").read_text()


@pytest.mark.parametrize("mpi", sorted(MPI_FLAVOURS))
def test_generated_scripts_are_valid_bash_and_carry_the_checkpoint_contract(mpi, tmp_path):
    for text in (_point(mpi), train_template(mpi)):
        f = tmp_path / "job.sbatch"
        f.write_text(text)
        assert subprocess.run(["bash", "-n", str(f)]).returncode == 0
        lines = text.splitlines()
        directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
        first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
        assert max(directives) < first_command, "sbatch ignores #SBATCH lines after the first command"
        plugin = MPI_FLAVOURS[mpi][0]
        assert f"srun --mpi={plugin} --kill-on-bad-exit=1" in text
        assert "#SBATCH --requeue" in text and "scontrol requeue" in text
        assert '"$status" = 140' in text and '"$status" = 143' in text


def test_render_rejects_an_unknown_mpi():
    with pytest.raises(ValueError, match="mpich, openmpi"):
        render(command="true", job_name="x", mpi="mvapich")


MULTINODE = {
    # a node range: whole nodes, the ranks counted at every start, requeued on the nodes left after a node failure
    "range_mpich": dict(nodes="2-3", tasks_per_node=2),
    # MPICH's Hydra inside the allocation: USR2 to the batch shell, handed to the ranks as TERM
    "mpiexec_mpich": dict(nodes=3, tasks_per_node=2, launch="mpiexec"),
    # Open MPI's mpirun inside the allocation: USR2 to the batch shell, handed to mpirun, which forwards it
    "mpiexec_openmpi": dict(nodes=3, tasks_per_node=2, launch="mpiexec", mpi="openmpi"),
    # GPU nodes (cannot run here): every rank sees its node's GPUs and takes cuda:LOCAL_RANK; NCCL and gloo on ib0
    "gpu_mpich": dict(nodes=4, tasks_per_node=4, gpus_per_node=4, iface="ib0"),
}


@pytest.mark.parametrize("name", sorted(MULTINODE))
def test_multinode_scripts_match_golden_files(name, tmp_path):
    text = render(command='fedhypevae train --config "$CONFIG" --out "$OUT" $RESUME', job_name="fhv", **MULTINODE[name])
    golden = GOLDEN / f"multinode_{name}.sbatch"
    if os.environ.get("FHV_REGENERATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"regenerate {golden} (FHV_REGENERATE_GOLDEN=1) if the change is intended"
    f = tmp_path / "job.sbatch"
    f.write_text(text)
    assert subprocess.run(["bash", "-n", str(f)]).returncode == 0


def test_render_refuses_a_bad_node_range_and_launch():
    for bad in ("3-2", "0", "two", "2-"):
        with pytest.raises(ValueError, match="nodes must be"):
            render(command="true", job_name="x", nodes=bad)
    with pytest.raises(ValueError, match="launch must be"):
        render(command="true", job_name="x", launch="torchrun")


@pytest.mark.parametrize(
    "env, count, expected",
    [
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "7", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "3"}, 4, 3),
        ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "SLURM_STEP_ID": "0"}, 4, 1),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "2"}, 1, 0),
    ],
)
def test_the_local_rank_chooses_the_gpu(monkeypatch, env, count, expected):
    """SLURM_LOCALID (srun) or MPI_LOCALRANKID (Hydra) -> cuda:LOCAL_RANK, modulo the GPUs the task sees (one, when
    SLURM binds a GPU per task). CUDA is faked: this machine has none."""
    import torch
    from fedhypevae.hpc.device import choose_device
    from fedhypevae.hpc.launcher import detect_launcher

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    dev = choose_device(detect_launcher(env).local_rank)
    assert dev == torch.device("cuda", expected) and chosen == [dev]
