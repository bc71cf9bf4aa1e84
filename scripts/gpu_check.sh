#!/usr/bin/env bash
# GPU check in one command, for a machine that already has JAX with CUDA (Python 3.12,
# CUDA 13) and no network: installs nothing it can do without, runs the GPU-relevant tests
# and both speed benchmarks, and prints their tables. About 5 minutes on an H100/H200
# (never measured yet: no session has had one); at most 10, by the limits below.
#
#   bash scripts/gpu_check.sh             # from the repository root or anywhere
#   bash scripts/gpu_check.sh --quick     # tiny sizes: checks the script itself, on any machine
#
# grain and ml-collections are often missing on such images: put their wheels in .whl/
# (see benchmarks/README.md) and scripts/_gpu_env.sh installs them into a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
tests=(-k 'not four_devices')
retrieval_args=(--n=1000,3700,16000,100000 --repeats=50 --budget-s=2)
train_step_args=(--steps=10)
# Seconds: tests, retrieval, train steps. The full model's six train-step programs took
# about 165 s to compile on a 2-core CPU (benchmarks/README.md); about 5 minutes in all
# is expected.
limits=(150 120 330)
if [ "${1:-}" = "--quick" ]; then
  tests=(-k 'fixture or numpy_reference or no_recompiles or explicit_transfers')
  retrieval_args=(--n=1000,4000 --repeats=5 --budget-s=1)
  train_step_args=(--size=tiny --image=64 --batch=8 --steps=3 --pool=48)
  limits=(600 600 600)
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/gpu_check.sh [--quick]" >&2; exit 2
fi
source scripts/_gpu_env.sh
gpu_env pytest
echo '== GPU-relevant tests (steps, retrieval, mixed precision) =='
timeout "${limits[0]}" python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_knowledge_pool.py tests/test_train_step.py "${tests[@]}" \
  || echo 'tests FAILED or timed out'
echo '== retrieval benchmark =='
timeout "${limits[1]}" python3 benchmarks/retrieval.py "${retrieval_args[@]}" \
  || echo 'retrieval benchmark FAILED or timed out'
echo '== train-step benchmark (full CERS, B=16, 224x224 unless --quick) =='
timeout "${limits[2]}" python3 benchmarks/train_step.py "${train_step_args[@]}" \
  || echo 'train-step benchmark FAILED or timed out'
