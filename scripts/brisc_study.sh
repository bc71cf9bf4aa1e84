#!/usr/bin/env bash
# The retrieval study on BRISC 2025 (README "Retrieval study"), on a 2-core CPU.
#
#   bash scripts/brisc_study.sh DATA_DIR CSV_DIR OUT_DIR [SEEDS] [MODES]
#
# DATA_DIR holds segmentation_task/train/{images,masks} (e.g. ../shared/data/brisc2025_train256),
# CSV_DIR the authors' brisc2025 CSVs (text.csv, cot_output_gpt5_{mask,no_mask}.csv).
# For every seed (default "0 1"; the seed also draws the `paper` split): one warm-up with
# configs/brisc_small.py, whose pool build writes the retrieval report of every mode
# (warmup/retrieval/after_warmup/), then, from a copy of that warmed-up run, the
# semi-supervised stage, test evaluation and predictions once per retrieval mode (default
# "none image image+cot"). Warm-up does not retrieve, so every mode of a seed starts from the
# same weights and pool. Extra flags for run.py go in $EXTRA. Then prints the table:
#   python scripts/study_table.py OUT_DIR
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,15p' "$0"
  exit 2
fi
data=$1
csv=$2
out=$3
seeds=${4:-0 1}
modes=${5:-none image image+cot}
cd "$(dirname "$0")/.."
flags=(--config=configs/brisc_small.py
       --config.data.root="$data"
       --config.data.text_csv="$csv/text.csv"
       --config.data.cot_mask_csv="$csv/cot_output_gpt5_mask.csv"
       --config.data.cot_no_mask_csv="$csv/cot_output_gpt5_no_mask.csv")
# shellcheck disable=SC2206
extra=(${EXTRA:-})
for seed in $seeds; do
  root="$out/seed$seed"
  mkdir -p "$root"
  # One cache and split per seed, shared by its runs.
  common=("${flags[@]}" --config.seed="$seed" --config.data.cache_dir="$root/data" "${extra[@]}")
  if [ ! -f "$root/warmup/retrieval/after_warmup/report.json" ]; then
    python run.py "${common[@]}" --workdir="$root/warmup" --mode=warmup
  fi
  for mode in $modes; do
    run="$root/${mode/+/_}"
    if [ ! -f "$run/eval/test_summary.json" ]; then
      rm -rf "$run"
      cp -r "$root/warmup" "$run"
      python run.py "${common[@]}" --workdir="$run" --config.pool.mode="$mode" --mode=all
    fi
  done
done
python scripts/study_table.py "$out"
