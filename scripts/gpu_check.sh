#!/usr/bin/env bash
# GPU check in one command, for a machine that already has JAX with CUDA (Python 3.12,
# CUDA 13) and no network: installs nothing it can do without, runs the GPU-relevant tests
# and both speed benchmarks, and prints their tables. About 5 minutes on an H100/H200.
#
#   bash scripts/gpu_check.sh             # from the repository root or anywhere
#
# grain and ml-collections are often missing on such images: put their wheels in .whl/
# (see benchmarks/README.md) and they are installed into a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cers_site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/cers_site"
fi
python3 - <<'PY'
import importlib, sys
missing = [m for m in ('jax', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'chex',
                       'ml_collections', 'absl', 'transformers', 'safetensors', 'pytest')
           if importlib.util.find_spec(m) is None]
if missing:
  sys.exit(f'missing packages: {missing}; bring their wheels in .whl/ (benchmarks/README.md)')
import jax
print('devices:', jax.devices())
PY
echo '== GPU-relevant tests (steps, retrieval, mixed precision) =='
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_knowledge_pool.py \
  tests/test_train_step.py -k 'not four_devices' || echo 'tests FAILED or timed out'
echo '== retrieval benchmark =='
timeout 120 python3 benchmarks/retrieval.py --n=1000,3700,16000,100000 --repeats=50 \
  --budget-s=2 || echo 'retrieval benchmark FAILED or timed out'
echo '== train-step benchmark (full CERS, B=16, 224x224) =='
timeout 180 python3 benchmarks/train_step.py --steps=10 || echo 'train-step benchmark FAILED'
