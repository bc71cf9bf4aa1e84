#!/usr/bin/env bash
# BRISC 2025 with the full-size CERS in one GPU call (configs/brisc_gpu.py: ConvNeXt-T,
# 224x224, bfloat16, protocol `paper`, 25% labeled; 8 warm-up and 4 semi-supervised epochs,
# about 6 minutes with compiling, assumed rather than measured), then its summary: images/s,
# val Dice of D_r and D_s, test Dice and the retrieval report after warm-up.
#
#   python scripts/pack_brisc.py SRC .brisc_pack --csv-dir CSV_DIR   # here, once (~28 MiB)
#   bash scripts/gpu_brisc.sh [--quick] [PACK_DIR]                    # there (default .brisc_pack)
#
# On the device machine: carry .brisc_pack and .whl (grain, ml-collections and their needs,
# see benchmarks/README.md "GPU check"). --quick runs the same pipeline with the small CERS at
# 64x64 and a few steps (configs/brisc_gpu.py:quick), from scratch, on any machine.
# Training is stopped by SIGTERM after $GPU_BRISC_LIMIT_S seconds (default 480, so the call
# ends inside the device's 10 minutes; a checkpoint is saved and the summary says what
# finished); the same command then resumes from runs/brisc_gpu ($WORKDIR) if the machine
# still holds it. Where $OUT is set, the log and the run's small files are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
config=configs/brisc_gpu.py
workdir=${WORKDIR:-runs/brisc_gpu}
limit=${GPU_BRISC_LIMIT_S:-480}
if [ "${1:-}" = "--quick" ]; then
  config=configs/brisc_gpu.py:quick
  workdir=${WORKDIR:-runs/brisc_gpu_quick}
  limit=${GPU_BRISC_LIMIT_S:-1800}
  # A dry run checks the whole pipeline, never a resumed half of it: an earlier dry run's
  # workdir (it holds gpu_brisc.log) is removed.
  if [ -f "$workdir/gpu_brisc.log" ]; then rm -rf "$workdir"; fi
  shift
fi
pack=${1:-.brisc_pack}
if [ $# -gt 1 ] || [ "${pack#-}" != "$pack" ]; then
  echo "usage: bash scripts/gpu_brisc.sh [--quick] [PACK_DIR]" >&2; exit 2
fi
if [ ! -f "$pack/pack.json" ]; then
  echo "error: $pack holds no pack.json: make it with scripts/pack_brisc.py and, on the" \
       "device machine, name it in carry (benchmarks/README.md 'BRISC on the GPU')" >&2
  exit 1
fi
source scripts/_gpu_env.sh
gpu_env PIL tokenizers matplotlib tqdm
mkdir -p "$workdir"
log="$workdir/gpu_brisc.log"
echo "== $config on $pack (its pack.json: $(tr -d ' \n' <"$pack/pack.json" | cut -c1-300))," \
     "workdir $workdir, limit ${limit} s =="
start=$SECONDS
status=0
sampler=''
if command -v nvidia-smi >/dev/null; then
  # GPU utilization once a second: low during training steps means the input pipeline or
  # the host, not the GPU, sets the images/s.
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -l 1 \
    >"$workdir/gpu_utilization.txt" 2>/dev/null &
  sampler=$!
fi
timeout -s TERM -k 60 "$limit" python3 run.py --config="$config" --workdir="$workdir" \
  --config.data.root="$pack" 2>&1 | tee -a "$log" || status=$?
echo "== run.py ended with status $status after $((SECONDS - start)) s" \
     "(143 or 124: stopped at the ${limit} s limit) ==" | tee -a "$log"
if [ -n "$sampler" ]; then
  kill "$sampler" 2>/dev/null || true
  awk '{s += $1; n++} n == 20 {printf " %d", s / n; s = 0; n = 0}
       END {if (n) printf " %d", s / n; print ""}' "$workdir/gpu_utilization.txt" \
    | sed 's/^/== GPU utilization %, mean of each 20 s of the run:/' | tee -a "$log"
fi
python3 scripts/run_summary.py "$workdir" | tee "$workdir/run_summary.txt"
if [ -n "${OUT:-}" ]; then
  cp "$log" "$workdir/run_summary.txt" "$OUT"/
  for f in metrics.jsonl summary.json config.json eval/test_summary.json; do
    [ -f "$workdir/$f" ] && cp "$workdir/$f" "$OUT"/
  done
  for f in report.json report.png; do
    [ -f "$workdir/retrieval/after_warmup/$f" ] \
      && cp "$workdir/retrieval/after_warmup/$f" "$OUT/retrieval_after_warmup_$f"
  done
fi
exit "$status"
