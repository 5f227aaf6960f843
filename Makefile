# The two commands: `make run` (set up, then the main job) and `make test` (set up, then the suite).
# `make run` a second time prints the finished run's summary (it never trains the same --out again).
# `make test` runs everything, as CI does; as root that includes the SLURM integration tests, which install
# slurm-wlm and munge (apt-get) and start slurmctld/slurmd. `FHV_SLURM=0 make test` skips them, saying why.
.PHONY: setup run test quick-test
OUT ?= runs/default

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/fedhypevae train --config configs/default.yaml --out $(OUT)

test: setup
	@if [ "$${FHV_SLURM:-1}" = "0" ]; then echo "FHV_SLURM=0: the SLURM integration tests are skipped"; \
	elif [ "$$(id -u)" = "0" ]; then echo "as root: the SLURM integration tests install and start SLURM daemons (FHV_SLURM=0 skips them)"; fi
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python -m pytest -q

quick-test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -m "not slow"
