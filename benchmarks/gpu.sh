#!/usr/bin/env bash
# jaxdiff's speed benchmark (benchmarks/speed.py) on a GPU machine, as one prepared command:
#
#   bash benchmarks/gpu.sh [EDM_CHECKOUT [more speed.py flags...]]
#
# Results go to ${OUT:-/tmp/speed}: speed.jsonl (one JSON row per case, written as each finishes),
# speed.md (the table for benchmarks/RESULTS.md), speed.log (everything printed) and machine.txt
# (nvidia-smi, package versions). It needs JAX with CUDA, flax, optax and numpy; ml_collections
# (configs/edm.py) is taken from a wheel when absent: $ML_COLLECTIONS_WHEEL, else the first
# runs/wheels/ml_collections-*.whl. EDM_CHECKOUT is a copy of NVlabs/edm (e.g. `git archive` of it
# unpacked in runs/edm); its code runs under $TORCH_PYTHON (default: $PYTHON, i.e. python3).
#
# Cases, most important first: DDPM++ CIFAR-10 (batch 512) in bfloat16 (train, then the 35-NFE
# sampler and the forward pass), in float32 (train; JAX's default precision, TF32), NVlabs/edm's
# PyTorch on the same network and batch (float16, and float32 with TF32 to match), then ADM
# ImageNet-64 in bfloat16 (batch 128; train and sampler) and EDM on it. No case starts after
# $BUDGET seconds (default 420), a started one is stopped 120 s after that (keeping the figures it
# has), and `timeout` ends the whole run at BUDGET + 150 s: about 9.5 minutes at most.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/speed}
BUDGET=${BUDGET:-420}
PYTHON=${PYTHON:-python3}
EDM_CHECKOUT=${1:-}
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$OUT"

# jaxdiff/__init__.py appends an XLA:CPU flag to XLA_FLAGS that this jaxlib may not know; a GPU run
# needs none of it.
export JAXDIFF_KEEP_XLA_FLAGS=1
# Each case runs alone on the GPU in a process of its own: let XLA take most of the memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

# ml_collections is pure Python: its wheel imports from PYTHONPATH as it is (zipimport), no pip needed.
if ! "$PYTHON" -c 'import ml_collections' 2>/dev/null; then
  wheel=${ML_COLLECTIONS_WHEEL:-$(ls runs/wheels/ml_collections-*.whl 2>/dev/null | head -n 1)}
  [ -n "$wheel" ] && export PYTHONPATH="$(realpath "$wheel")${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c 'import ml_collections' || {
    echo "gpu.sh: configs/edm.py needs ml_collections (and absl-py, PyYAML): set ML_COLLECTIONS_WHEEL" >&2; exit 2; }
fi

{ nvidia-smi
  "$PYTHON" -c 'import importlib.metadata as m
for d in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "numpy", "torch"):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: pass'
} > "$OUT/machine.txt" 2>&1

edm_flags=()
if [ -n "$EDM_CHECKOUT" ]; then
  edm_flags=(--vs-edm "$EDM_CHECKOUT" --torch-python "${TORCH_PYTHON:-$PYTHON}")
fi

# float32 trains only (--sample-dtypes bfloat16): its sampler would cost another compilation.
timeout --kill-after=10 $((BUDGET + 150)) "$PYTHON" benchmarks/speed.py \
  --cases cifar10:bfloat16,cifar10:float32,imagenet64:bfloat16 --sample-dtypes bfloat16 \
  --steps 20 --windows 3 --warmup 3 --sample-windows 3 --time-budget "$BUDGET" \
  --out "$OUT/speed.jsonl" --md "$OUT/speed.md" ${edm_flags[@]+"${edm_flags[@]}"} "$@" 2>&1 | tee "$OUT/speed.log"
status=${PIPESTATUS[0]}
echo "gpu.sh: speed.py exited with $status; rows in $OUT/speed.jsonl, table in $OUT/speed.md"
exit "$status"
