"""SLURM launch material. `templates/` holds plain sbatch scripts for one multi-rank training run
(MPICH with `srun --mpi=pmi2`, Open MPI with `srun --mpi=pmix`)."""
