#!/usr/bin/env bash
# One prepared check for a node with one GPU, about 5 minutes; it writes its figures under OUT as it goes.
#
#   bash benchmarks/gpu_check.sh [OUT]        (OUT: default ./gpu_check; run from the repository, installed or not)
#
# What it runs, each step under its own time limit, on to the next step whatever happens:
#   0. env.json     the interpreter, torch and its CUDA, the device, and which packages are missing (a GPU node may
#                   have another Python: opacus is needed to train, mpi4py/submitit only for MPI and sweeps)
#   1. equal.json   the engine on the GPU against the same run on this node's CPU: `tiny`, privacy.noise_seed 7,
#                   the hypernetworks' largest relative difference (target <= 1e-5)
#   2. default/     the shipped default config on the GPU (train.rounds cut to GPU_CHECK_ROUNDS, default 5): wall time
#   3. scale/       benchmarks.scale at GPU_CHECK_CLIENTS clients (default 10,000) on one rank, MMD off, 2 rounds
#   4. throughput/  benchmarks.throughput --quick on the GPU: samples/s with and without DP
#   summary.txt     one line per step: ok / FAILED (exit status) / skipped, and the step's seconds
#
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (how the test suite exercises this script where there is no
# GPU); GPU_CHECK_SKIP="3 4" skips steps. PYTHON picks the interpreter (default: python3).
set -u
OUT=${1:-gpu_check}
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
ROUNDS=${GPU_CHECK_ROUNDS:-5}
CLIENTS=${GPU_CHECK_CLIENTS:-10000}
SKIP=" ${GPU_CHECK_SKIP:-} "
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
cd "$HERE"
: >"$OUT/summary.txt"

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt" >&2; }

step() { # step N LIMIT_S NAME COMMAND...: run, time, record
    local n=$1 limit=$2 name=$3
    shift 3
    if [[ "$SKIP" == *" $n "* ]]; then
        echo "$n $name: skipped" >>"$OUT/summary.txt"
        return
    fi
    log "step $n: $name (at most ${limit} s)"
    local t0=$SECONDS rc=0
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$OUT/log.txt" 2>&1 || rc=$?
    local dt=$((SECONDS - t0))
    if ((rc == 0)); then
        echo "$n $name: ok (${dt} s)" >>"$OUT/summary.txt"
    else
        echo "$n $name: FAILED (exit $rc$( ((rc == 124)) && echo ", over ${limit} s"), ${dt} s; see log.txt)" >>"$OUT/summary.txt"
    fi
    log "step $n: exit $rc after ${dt} s"
}

# 0. what this node has
if ! "$PY" - "$OUT/env.json" "$DEVICE" <<'EOF'; then
import importlib.util, json, platform, sys
out, device = sys.argv[1], sys.argv[2]
env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
need = ["torch", "numpy", "yaml", "opacus", "tqdm", "tensorboard", "matplotlib", "mpi4py", "submitit"]
env["missing"] = [m for m in need if importlib.util.find_spec(m) is None]
if "torch" not in env["missing"]:
    import torch
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["device_name"], env["device_memory_gb"] = p.name, round(p.total_memory / 2**30, 1)
json.dump(env, open(out, "w"), indent=2)
print(json.dumps(env, indent=2), file=sys.stderr)
if env["missing"]:
    hint = "pip install torch numpy pyyaml opacus tqdm tensorboard matplotlib mpi4py submitit (or: pip install .)"
    print(f"gpu_check: missing on this node: {', '.join(env['missing'])}; {hint}", file=sys.stderr)
if "torch" in env["missing"] or "opacus" in env["missing"] or "yaml" in env["missing"]:
    sys.exit(2)
if device.startswith("cuda") and not env.get("cuda_available"):
    print("gpu_check: torch sees no CUDA device here (GPU_CHECK_DEVICE=cpu runs the same steps on the CPU)",
          file=sys.stderr)
    sys.exit(3)
EOF
    log "this node cannot run the check (env.json says why)"
    echo "0 env: FAILED (see env.json and log.txt)" >>"$OUT/summary.txt"
    exit 2
fi
echo "0 env: ok" >>"$OUT/summary.txt"
TRAIN=("$PY" -m fedhypevae train --no-progress)

# 1. the engine on the device = the engine on the CPU, with reproducible noise
cat >"$OUT/equal.py" <<'EOF'
import json, subprocess, sys, torch
py, out, device = sys.argv[1], sys.argv[2], sys.argv[3]
for name, dev in (("equal_dev", device), ("equal_cpu", "cpu")):
    cmd = [py, "-m", "fedhypevae", "train", "--no-progress", "--config", "tiny", "--set", "privacy.noise_seed=7"]
    subprocess.run([*cmd, "--set", "train.rounds=2", "--device", dev, "--out", f"{out}/{name}"], check=True)
a = torch.load(f"{out}/equal_dev/hypernetwork.pt", map_location="cpu")
b = torch.load(f"{out}/equal_cpu/hypernetwork.pt", map_location="cpu")
rel = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)
res = {"device": device, "max_relative_difference": rel, "target": 1e-5, "equal": rel <= 1e-5}
json.dump(res, open(f"{out}/equal.json", "w"), indent=2)
print(json.dumps(res), file=sys.stderr)
sys.exit(0 if res["equal"] else 1)
EOF
rm -rf "$OUT/equal_dev" "$OUT/equal_cpu"
step 1 90 "engine on $DEVICE = engine on cpu (noise_seed 7, 1e-5)" "$PY" "$OUT/equal.py" "$PY" "$OUT" "$DEVICE"

# 2. the default config on the device
step 2 120 "default config, $ROUNDS rounds, on $DEVICE" "${TRAIN[@]}" --config default --set train.rounds="$ROUNDS" \
    --device "$DEVICE" --out "$OUT/default"

# 3. many clients on the device (benchmarks.scale trains with --device auto: the GPU where there is one)
step 3 150 "$CLIENTS clients on one rank (benchmarks.scale)" "$PY" -m benchmarks.scale --out "$OUT/scale" \
    --clients "$CLIENTS" --ranks 1 --mmd off --rounds 2 --no-resume --timeout 140

# 4. samples/s with and without DP on the device
step 4 150 "samples/s with and without DP on $DEVICE (benchmarks.throughput --quick)" "$PY" -m benchmarks.throughput \
    --out "$OUT/throughput" --quick --device "$DEVICE" --ranks none --opacus-rounds 0 --peers off \
    --calibration-steps 0 --clients-sweep 10

log "done: $OUT/summary.txt"
cat "$OUT/summary.txt"
! grep -q FAILED "$OUT/summary.txt"
