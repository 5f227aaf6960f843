# The two commands: `make run` (set up, then the main job) and `make test` (set up, then the suite).
.PHONY: setup run test quick-test
OUT ?= runs/default

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/fedhypevae train --config configs/default.yaml --out $(OUT)

test: setup
	.venv/bin/python -m pytest -q

quick-test: setup
	.venv/bin/python -m pytest -q -m "not slow"
