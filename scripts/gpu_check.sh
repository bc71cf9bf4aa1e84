#!/usr/bin/env bash
# The GPU check alone: scripts/gpu_run.sh's first three stages (the train-step benchmark of
# the full CERS, the GPU-relevant tests, the retrieval benchmark), each under its time limit,
# results in $OUT (default runs/gpu_out). gpu_run.sh's header gives the stages and limits;
# benchmarks/README.md "The device call" the plan.
#
#   bash scripts/gpu_check.sh             # on the GPU machine, with .whl carried
#   bash scripts/gpu_check.sh --quick     # tiny sizes: checks the script itself, anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${1:-}" ] && [ "$1" != "--quick" ]; then
  echo "usage: bash scripts/gpu_check.sh [--quick]" >&2; exit 2
fi
GPU_STAGES=${GPU_STAGES:-train_step tests retrieval} exec bash scripts/gpu_run.sh "$@"
