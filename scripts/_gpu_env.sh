# Sourced by scripts/gpu_check.sh and scripts/gpu_brisc.sh, from the repository root: the
# environment of a GPU machine that has JAX with CUDA but no network.
#
#   source scripts/_gpu_env.sh && gpu_env [MODULE ...]
#
# Puts the repository on PYTHONPATH, installs the wheels found in .whl/ (grain and
# ml-collections are often missing on such images; benchmarks/README.md "GPU check" says
# which to bring) into a temporary directory, then imports what cers_jax needs plus each
# MODULE given, and stops naming every one that fails; prints the devices.

gpu_env() {
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
      --target /tmp/cers_site .whl/*.whl || return
    export PYTHONPATH="$PYTHONPATH:/tmp/cers_site"
  fi
  python3 - "$@" <<'PY'
import importlib, sys
missing = []
for name in ('jax', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'chex', 'ml_collections',
             'absl', 'transformers', 'safetensors', *sys.argv[1:]):
  try:  # Import, not just find: a wheel whose own requirement is absent fails here.
    importlib.import_module(name)
  except ImportError as error:
    missing.append(f'{name} ({error})')
if missing:
  sys.exit(f'cannot import: {missing}; bring the wheels in .whl/ (benchmarks/README.md)')
import jax
print('devices:', jax.devices(), 'jax', jax.__version__)
PY
}
