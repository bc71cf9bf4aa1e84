# Sourced by scripts/gpu_run.sh, gpu_check.sh and gpu_brisc.sh, from the repository root: the
# environment of a GPU machine that has JAX with CUDA but no network.
#
#   source scripts/_gpu_env.sh && gpu_env [MODULE ...]
#
# Puts the repository on PYTHONPATH, installs the wheels found in $CERS_WHEELS (default .whl;
# scripts/gpu_wheels.txt lists them, scripts/gpu_wheels.sh fetches them) into $CERS_SITE
# (default /tmp/cers_site), then runs scripts/gpu_env_check.py: the stack's versions first
# (also into $OUT/env.json), the imports of the libraries, the project's entry points and each
# MODULE given, and the backend (it stops unless JAX runs on $CERS_EXPECT_BACKEND, default
# gpu). A failure returns non-zero, so a caller under `set -e` stops in seconds.

gpu_env() {
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
  local wheels=${CERS_WHEELS:-.whl} site=${CERS_SITE:-/tmp/cers_site}
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$wheels"/*.whl || return
    export PYTHONPATH="$PYTHONPATH:$site"
  fi
  python3 scripts/gpu_env_check.py "$@"
}
