#!/usr/bin/env bash
# BRISC 2025 with the full-size CERS on the GPU (configs/brisc_gpu.py: ConvNeXt-T, 224x224,
# bfloat16, protocol `paper`, 25% labeled; 8 warm-up and 4 semi-supervised epochs), then its
# summary: images/s, val Dice of D_r and D_s, test Dice and the retrieval report after
# warm-up. scripts/gpu_run.sh runs it as its last stage; it also runs alone.
#
#   python scripts/pack_brisc.py SRC .brisc_pack --csv-dir CSV_DIR   # here, once (~28 MiB)
#   bash scripts/gpu_brisc.sh [--quick] [PACK_DIR]                    # there (default .brisc_pack)
#
# On the device machine: carry .brisc_pack and .whl (scripts/gpu_wheels.txt). --quick runs
# the same pipeline with a tiny CERS at 32x32 and a few steps (configs/brisc_gpu.py:quick),
# from scratch, on any machine.
# Training is stopped by SIGTERM after $GPU_BRISC_LIMIT_S seconds (default 420; gpu_run.sh
# gives it 200) and killed $GPU_BRISC_GRACE_S seconds (default 30) later if it has not saved
# and exited by then. A stopped run still leaves its checkpoint, summary.json (how far it
# got) and the summary below; the same command resumes from runs/brisc_gpu ($WORKDIR) while
# the machine still holds it. Where $OUT is set, brisc_summary.txt and brisc_run.tar.gz (the
# log, metrics.jsonl, summary.json, config.json, the test summary, the retrieval report and
# the GPU utilization samples) land there: two files of the 8 a device call brings back.
set -euo pipefail
cd "$(dirname "$0")/.."
config=configs/brisc_gpu.py
workdir=${WORKDIR:-runs/brisc_gpu}
limit=${GPU_BRISC_LIMIT_S:-420}
grace=${GPU_BRISC_GRACE_S:-30}
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
timeout -s TERM -k "$grace" "$limit" python3 run.py --config="$config" --workdir="$workdir" \
  --config.data.root="$pack" 2>&1 | tee -a "$log" || status=$?
echo "== run.py ended with status $status after $((SECONDS - start)) s" \
     "(143 or 124: stopped at the ${limit} s limit) ==" | tee -a "$log"
if [ -n "$sampler" ]; then
  kill "$sampler" 2>/dev/null || true
  awk '{s += $1; n++} n == 20 {printf " %d", s / n; s = 0; n = 0}
       END {if (n) printf " %d", s / n; print ""}' "$workdir/gpu_utilization.txt" \
    | sed 's/^/== GPU utilization %, mean of each 20 s of the run:/' | tee -a "$log"
fi
# The summary comes back whatever happened above: it says what is missing.
python3 scripts/run_summary.py "$workdir" | tee "$workdir/run_summary.txt" || status=$?
if [ -n "${OUT:-}" ]; then
  cp "$workdir/run_summary.txt" "$OUT/brisc_summary.txt"
  files=()
  for f in gpu_brisc.log gpu_utilization.txt metrics.jsonl summary.json config.json \
           eval/test_summary.json retrieval/after_warmup/report.json \
           retrieval/after_warmup/report.png; do
    if [ -f "$workdir/$f" ]; then files+=("$f"); fi
  done
  tar -czf "$OUT/brisc_run.tar.gz" -C "$workdir" "${files[@]}"
  echo "== $OUT/brisc_run.tar.gz: ${files[*]}"
fi
exit "$status"
