#!/usr/bin/env bash
# benchmarks/train_step.py on a GPU: images/s and the fraction of the card's float32/bfloat16 peaks.
#
# Usage: benchmarks/gpu.sh [more train_step.py flags, e.g. --repeats 50]
#
# Needs a CUDA build of jax (pip install -U "jax[cuda12]"); torch is timed on the GPU when a CUDA
# build of torch is installed, else skipped (the pinned bench extra, torch==2.13.0, is CPU-only).
# Prints the card, then train_step.py's report: peaks measured with 8192^3 matmuls (float32 at
# full precision, i.e. no TF32, and bfloat16), the card's datasheet peaks where this script knows
# them (dense, no sparsity), and for each of the train step and the ADDA cycle the images/s and
# the fractions of those peaks. Then one step of 4 seeds by jax.vmap and unrolled against 4 single
# steps (benchmarks/seeds.py --per_step, 128x128), which says whether vmap, the default off CPU,
# is the right one on this card. Runs from any directory; exits 1 with a one-line error when there
# is no GPU or jax cannot use it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) \
    || [[ -z "$card" ]]; then
  echo "error: no NVIDIA GPU found (nvidia-smi failed)" >&2
  exit 1
fi
backend=$(python -c 'import jax; print(jax.default_backend())')
if [[ "$backend" != "gpu" ]]; then
  echo "error: jax runs on '$backend', not the GPU: install a CUDA jax (pip install -U 'jax[cuda12]')" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

# Datasheet dense peaks in TFLOP/s (NVIDIA product pages): float32 (no tensor cores) and bfloat16.
case "$card" in
  *H200*) datasheet="float32=67,bfloat16=989" ;;
  *H100*PCIe*) datasheet="float32=51,bfloat16=756" ;;
  *H100*) datasheet="float32=67,bfloat16=989" ;;
  *A100*) datasheet="float32=19.5,bfloat16=312" ;;
  *L4*) datasheet="float32=30.3,bfloat16=121" ;;
  *) datasheet="" ;;
esac

torch_flags=(--skip_torch)
if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  torch_flags=(--torch_device=cuda)
fi

python benchmarks/train_step.py \
  --matmul_size 8192 --bf16_peak --repeats 20 --warmup 3 \
  --datasheet_tflops "$datasheet" "${torch_flags[@]}" "$@"

python benchmarks/seeds.py --per_step --image_size 128
