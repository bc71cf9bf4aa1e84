#!/usr/bin/env bash
# The device call in one command (benchmarks/README.md "The device call" is its plan): the
# stack's versions and the backend check first, then each stage under its own time limit,
# every result written to $OUT as soon as it exists. A failed or timed-out stage is reported
# and the next one runs; the exit status is 0 only when every stage passed.
#
#   bash scripts/gpu_run.sh [--quick] [PACK_DIR]       # PACK_DIR: default .brisc_pack
#   GPU_STAGES="brisc" bash scripts/gpu_run.sh          # some stages only (a second call)
#   GPU_BRISC_LIMIT_S=300 ...                           # BRISC's training limit (default 200)
#
# Stages, in order, with their limits in seconds (real / --quick):
#   train_step  benchmarks/train_step.py, full CERS, B=16, 224 px, bfloat16 then float32,
#               the semi-supervised step first                            150 / 150
#   tests       tests/test_knowledge_pool.py and tests/test_train_step.py   60 / 90
#   retrieval   benchmarks/retrieval.py, pools of 1k to 100k rows           30 / 60
#   brisc       scripts/gpu_brisc.sh: training stopped by SIGTERM at 200 s (+20 s to save),
#               then its summary                                          230 / 270
# The real stages add up to 470 s, which leaves 130 s of the device's 600 s command limit for
# the wheels, the imports and the copies. --quick runs the same stages at tiny sizes on any
# machine (scripts/gpu_preflight.py runs it in a simulated GPU image on the CPU).
#
# $OUT (default runs/gpu_out; at most 8 files come back from a device call): gpu_run.log,
# env.json, train_step.json, retrieval.json, brisc_summary.txt, brisc_run.tar.gz.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
if [ "${1:-}" = "--quick" ]; then
  quick=(--quick)
  shift
fi
pack=${1:-.brisc_pack}
if [ $# -gt 1 ] || [ "${pack#-}" != "$pack" ]; then
  echo "usage: bash scripts/gpu_run.sh [--quick] [PACK_DIR]" >&2; exit 2
fi
export OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1

if [ ${#quick[@]} -eq 0 ]; then
  limits=(150 60 30 200)
  train_step_args=(--dtypes=bfloat16,float32 --steps=10)
  test_args=(-k 'not four_devices')
  retrieval_args=(--n=1000,3700,16000,100000 --repeats=20 --budget-s=1)
else
  limits=(150 90 60 240)
  # One dtype: compiling dominates a CPU dry run, and both share every line of code.
  train_step_args=(--size=tiny --image=32 --batch=2 --steps=2 --pool=16 --dtypes=bfloat16)
  test_args=(-k 'fixture or numpy_reference')
  retrieval_args=(--n=1000 --repeats=3 --budget-s=0.5)
fi
limits[3]=${GPU_BRISC_LIMIT_S:-${limits[3]}}  # A second call may give BRISC longer.
stages=${GPU_STAGES:-train_step tests retrieval brisc}

echo "== gpu_run.sh ${quick[*]} $(date -u +%FT%TZ): stages '$stages', results in $OUT =="
source scripts/_gpu_env.sh
gpu_env pytest

failed=()
stage() {  # NAME LIMIT COMMAND...: runs COMMAND under LIMIT seconds and says how it ended.
  local name=$1 limit=$2 start=$SECONDS rc=0
  shift 2
  echo "== $name: limit ${limit} s =="
  timeout -k 10 "$limit" "$@" || rc=$?
  local how="exit $rc"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then how="stopped at its ${limit} s limit"; fi
  echo "== $name: $how after $((SECONDS - start)) s =="
  if [ "$rc" != 0 ]; then failed+=("$name"); fi
}

for name in $stages; do
  case $name in
    train_step)
      stage train_step "${limits[0]}" python3 benchmarks/train_step.py "${train_step_args[@]}" \
        --json="$OUT/train_step.json";;
    tests)
      stage tests "${limits[1]}" python3 -m pytest -q -p no:cacheprovider -rf \
        tests/test_knowledge_pool.py tests/test_train_step.py "${test_args[@]}";;
    retrieval)
      stage retrieval "${limits[2]}" python3 benchmarks/retrieval.py "${retrieval_args[@]}" \
        --json="$OUT/retrieval.json";;
    brisc)
      # gpu_brisc.sh stops training itself at GPU_BRISC_LIMIT_S (SIGTERM, then a checkpoint
      # and the summary); the stage's own limit only catches a hang after that.
      stage brisc "$((limits[3] + 30))" env GPU_BRISC_LIMIT_S="${limits[3]}" \
        GPU_BRISC_GRACE_S=20 bash scripts/gpu_brisc.sh "${quick[@]}" "$pack";;
    *)
      echo "error: unknown stage '$name' in GPU_STAGES; the stages are train_step tests" \
           "retrieval brisc" >&2
      exit 2;;
  esac
done
echo "== gpu_run.sh done after $SECONDS s; failed stages: ${failed[*]:-none} =="
[ ${#failed[@]} -eq 0 ]
