"""Prints what a run's workdir says about speed, Dice and retrieval (scripts/gpu_brisc.sh).

  python scripts/run_summary.py WORKDIR

From `metrics.jsonl`: images/s of every epoch (the first epoch of a stage includes compiling
its step, so the steady rate is the median of the later ones), the validation Dice of both
decoders (D_r, with retrieval: the CERS result; D_s, the standard decoder) after every
semi-supervised epoch; from `eval/test_summary.json` the test Dice; from
`retrieval/after_warmup/report.json` (and `retrieval/report.json` when present) the retrieval
report's table; from `summary.json` the run's wall time. Whatever is missing (a run stopped
early) is said, not an error.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from cers_jax.inference.retrieval_report import format_table


def _load(path: str):
  with open(path) as f:
    return json.load(f)


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def speed_lines(records: list[dict]) -> list[str]:
  lines = []
  for stage, label, per_step in (('warmup', 'warm-up', 'B'), ('semi', 'semi-supervised',
                                                                '2B')):
    epochs = [r for r in records if r.get('stage') == stage]
    if not epochs:
      lines.append(f'  {label}: no epoch finished')
      continue
    first = epochs[0]
    text = (f'  {label} ({per_step} images a step): epoch 1 {first["images_per_s"]:.1f} '
            f'images/s in {first["seconds"]:.1f} s (compile included)')
    if len(epochs) > 1:
      rates = [r['images_per_s'] for r in epochs[1:]]
      seconds = [r['seconds'] for r in epochs[1:]]
      later = 'epoch 2' if len(epochs) == 2 else f'epochs 2-{len(epochs)}'
      text += (f'; {later}: median {statistics.median(rates):.1f} images/s, '
               f'{statistics.median(seconds):.1f} s an epoch, so about '
               f'{first["seconds"] - statistics.median(seconds):.0f} s of compiling')
    lines.append(text)
  return lines


def dice_lines(records: list[dict]) -> list[str]:
  semi = [r for r in records if 'val_dice_r_mean' in r]
  if not semi:
    return ['  no semi-supervised epoch finished']
  lines = ['  epoch  loss     val Dice D_r  val Dice D_s']
  for r in semi:
    lines.append(f'  {r["epoch"] + 1:>5}  {r["loss"]:.4f}   {r["val_dice_r_mean"]:.4f}'
                 f'        {r["val_dice_s_mean"]:.4f}')
  return lines


def summary(workdir: str) -> str:
  records = _records(workdir)
  out = [f'== Run summary: {workdir} ==', 'Throughput:', *speed_lines(records),
         'Validation (val split, after each semi-supervised epoch):', *dice_lines(records)]
  test = os.path.join(workdir, 'eval', 'test_summary.json')
  if os.path.exists(test):
    t = _load(test)
    out.append(f'Test ({t["count"]} images, {t.get("checkpoint", "?")} checkpoint): Dice D_r '
               f'{t["dice_r_mean"]:.4f}, D_s {t["dice_s_mean"]:.4f}; IoU D_r '
               f'{t["iou_r_mean"]:.4f}, D_s {t["iou_s_mean"]:.4f}')
  else:
    out.append('Test: not evaluated (no eval/test_summary.json)')
  for name in ('after_warmup', ''):
    path = os.path.join(workdir, 'retrieval', name, 'report.json')
    if not os.path.exists(path):
      if name:
        out.append('Retrieval report after warm-up: none (warm-up did not finish)')
      continue
    report = _load(path)
    out.append(f'Retrieval report {name or "(--mode retrieval)"}: {report["num_queries"]} '
               f'{report["split"]} queries, k={report["k"]}, K={report.get("k_coarse")}, pool '
               f'of {report["pool_size"]}, CoT {report.get("cot")}')
    out.append(format_table(report))
    out.extend(f'  problem: {p}' for p in report['problems'])
  run = os.path.join(workdir, 'summary.json')
  if os.path.exists(run):
    last = _load(run)
    line = f'Whole run: {last.get("seconds", float("nan")):.0f} s'
    if last.get('preempted'):
      line = (f'Last invocation: {last.get("seconds", float("nan")):.0f} s, stopped by SIGTERM; '
              f'latest checkpoint {last.get("latest_checkpoint")}')
    out.append(line)
  return '\n'.join(out)


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1] in ('-h', '--help'):
    print(__doc__)
    return 0 if len(argv) == 2 else 2
  if not os.path.isdir(argv[1]):
    print(f'error: {argv[1]} is not a folder; give a run\'s --workdir.', file=sys.stderr)
    return 1
  print(summary(argv[1]))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
