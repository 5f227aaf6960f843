"""Golden files for the generated sbatch scripts (plain sbatch, no submitit), and the shipped templates."""

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
