"""Prints the retrieval study's tables from the run folders of scripts/brisc_study.sh.

  python scripts/study_table.py OUT_DIR

Table 1, after warm-up (OUT_DIR/seed*/warmup/retrieval/after_warmup/report.json): per
retrieval mode, the mean over seeds of ref_mask_dice, label_match and tie_share, with the
spread (half the range over seeds). Table 2, after training (OUT_DIR/seed*/<mode>/): best
validation Dice of D_r (with its epoch's D_s) and test Dice of both decoders, same format.
"""

import glob
import json
import os
import sys

import numpy as np


def _mean_spread(values: list[float]) -> str:
  if not values:
    return '-'
  values = np.asarray(values, np.float64)
  return f'{values.mean():.3f} ± {(values.max() - values.min()) / 2:.3f}'


def _load(path: str):
  with open(path) as f:
    return json.load(f)


def retrieval_table(out: str) -> str:
  reports = [_load(p) for p in sorted(glob.glob(
      os.path.join(out, 'seed*', 'warmup', 'retrieval', 'after_warmup', 'report.json')))]
  if not reports:
    return '(no retrieval report yet)'
  lines = [f'Retrieval after warm-up: {len(reports)} seed(s), {reports[0]["split"]} split, '
           f'{reports[0]["num_queries"]} queries, k={reports[0]["k"]}, pool of '
           f'{reports[0]["pool_size"]}; CoT {reports[0].get("cot")}', '',
           '| mode | ref_mask_dice | label_match | tie_share |', '|---|---:|---:|---:|']
  for mode in reports[0]['modes']:
    rows = [r['modes'][mode] for r in reports]
    lines.append(f'| {mode} | {_mean_spread([m["ref_mask_dice"] for m in rows])} | '
                 f'{_mean_spread([m.get("label_match", np.nan) for m in rows])} | '
                 f'{_mean_spread([m["tie_share"] for m in rows])} |')
  return '\n'.join(lines)


def _best_val(run: str) -> tuple[float, float] | None:
  path = os.path.join(run, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    records = [json.loads(line) for line in f if '"val_dice_r_mean"' in line]
  if not records:
    return None
  best = max(records, key=lambda r: r['val_dice_r_mean'])
  return best['val_dice_r_mean'], best['val_dice_s_mean']


def training_table(out: str) -> str:
  runs: dict[str, list[str]] = {}
  for path in sorted(glob.glob(os.path.join(out, 'seed*', '*', 'eval', 'test_summary.json'))):
    run = os.path.dirname(os.path.dirname(path))
    runs.setdefault(os.path.basename(run).replace('_', '+'), []).append(run)
  if not runs:
    return '(no finished training run yet)'
  lines = ['| pool.mode | seeds | best val Dice D_r | its val Dice D_s | test Dice D_r | '
           'test Dice D_s |', '|---|---:|---:|---:|---:|---:|']
  for mode, dirs in runs.items():
    val = [v for v in (_best_val(d) for d in dirs) if v is not None]
    test = [_load(os.path.join(d, 'eval', 'test_summary.json')) for d in dirs]
    lines.append(f'| {mode} | {len(dirs)} | {_mean_spread([v[0] for v in val])} | '
                 f'{_mean_spread([v[1] for v in val])} | '
                 f'{_mean_spread([t["dice_r_mean"] for t in test])} | '
                 f'{_mean_spread([t["dice_s_mean"] for t in test])} |')
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1] in ('-h', '--help'):
    print(__doc__)
    return 0 if len(argv) == 2 else 2
  print(retrieval_table(argv[1]))
  print()
  print(training_table(argv[1]))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
