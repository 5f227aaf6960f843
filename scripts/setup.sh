#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test and MPI extras.
# torch is installed first as the pinned CPU wheel: a plain `torch` requirement would pull a
# multi-GB CUDA build. On a GPU node set TORCH_SPEC (e.g. TORCH_SPEC="torch") before running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.fedhypevae-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0  # already installed for this pyproject.toml
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test,mpi]"
touch "$stamp"
echo "environment ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
