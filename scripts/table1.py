"""The paper's Table 1 on one protocol: methods x labeled fractions x seeds, resumable.

  python scripts/table1.py --config configs/brisc_small.py --out runs/table1 \
      [--methods cers,supervised,mean_teacher,ucmt,bcp] [--fractions 0.25,0.5,1.0] \
      [--seeds 0,1,2] [--dry-run] [--table-only] [--config.x=y ...]

Every run is `python run.py --config CONFIG --workdir OUT/frac<f>/seed<s>/<method>
--config.method=<method> --config.seed=<s> --config.data.labeled_fraction=<f> --mode=all`
plus the extra `--config.*` flags given here (the dataset's paths, for one). One run at a
time; the runs of one seed and fraction share one data cache and split manifest
(OUT/data/seed<s>_frac<f>), so every method trains on the same labeled images and is
scored on the same test images. A run whose eval/test_summary.json exists is skipped, a
run stopped half-way resumes from its checkpoint (run.py resumes by itself), so a later
invocation with more seeds adds them. Each run's command and wall-clock go to OUT/runs.json.

Then it prints Table 1's layout (test Dice and IoU of each method's primary decoder, in %,
mean ± std over seeds; per-image means as the paper) and, per fraction, every method's
paired per-image difference to CERS (images' scores averaged over seeds first) with its
bootstrap 95% CI and Wilcoxon p; both go to OUT/table1.md and OUT/table1.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cers_jax import grid  # noqa: E402
from cers_jax.core import method as method_lib  # noqa: E402

METHODS = ('cers', 'supervised', 'mean_teacher', 'ucmt', 'bcp')
REFERENCE = 'cers'
# The paper's Table 1 rows that are not implemented here, and why (README "Table 1").
NOT_IMPLEMENTED = ('DuCiSC', 'LeFeD', 'LViT')


def workdir(out: str, fraction: float, seed: int, method: str) -> str:
  return os.path.join(out, f'frac{fraction:g}', f'seed{seed}', method)


def command(config: str, out: str, fraction: float, seed: int, method: str,
            extra: list[str]) -> list[str]:
  """The run.py command (after the interpreter) of one cell of the grid."""
  return ['run.py', f'--config={config}',
          f'--workdir={workdir(out, fraction, seed, method)}', f'--config.method={method}',
          f'--config.seed={seed}', f'--config.data.labeled_fraction={fraction:g}',
          f'--config.data.cache_dir={grid.cache_dir(out, fraction, seed)}',
          '--mode=all', *extra]


def run_grid(args, extra: list[str]) -> None:
  cells = [(f, s, m) for f in args.fractions for s in args.seeds for m in args.methods]
  log_path = os.path.join(args.out, 'runs.json')
  for index, (fraction, seed, method) in enumerate(cells, 1):
    cmd = command(args.config, args.out, fraction, seed, method, extra)
    grid.run_command(workdir(args.out, fraction, seed, method), cmd,
                     label=f'[{index}/{len(cells)}]', log_path=log_path, dry_run=args.dry_run)


def score_table(args) -> tuple[list[str], dict]:
  """Markdown lines of the Dice/IoU table, and its numbers."""
  header = '| method | ' + ' | '.join(f'Dice {f:g} | IoU {f:g}' for f in args.fractions) + ' |'
  lines = [header, '|---|' + '---:|---:|' * len(args.fractions)]
  numbers = {}
  for method in args.methods:
    primary = method_lib.resolve(method).primary
    cells = []
    for fraction in args.fractions:
      scores = [s for s in (grid.summary(workdir(args.out, fraction, seed, method))
                            for seed in args.seeds) if s is not None]
      dice = [s[f'dice_{primary}_mean'] for s in scores]
      iou = [s[f'iou_{primary}_mean'] for s in scores]
      numbers[f'{method}/{fraction:g}'] = dict(decoder=primary, seeds=len(scores), dice=dice,
                                               iou=iou)
      cells += [grid.mean_std(dice), grid.mean_std(iou)]
    lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
  return lines, numbers


def paired_table(args) -> tuple[list[str], list[dict]]:
  """Markdown lines of every method's paired per-image difference to CERS."""
  reference = method_lib.resolve(REFERENCE).primary
  lines = ['| labeled | method - CERS | images | Dice diff | 95% CI | Wilcoxon p |',
           '|---:|---|---:|---:|---:|---:|']
  rows = []
  for fraction in args.fractions:
    ref_runs = grid.finished([workdir(args.out, fraction, s, REFERENCE) for s in args.seeds])
    for method in args.methods:
      runs = grid.finished([workdir(args.out, fraction, s, method) for s in args.seeds])
      if method == REFERENCE or not runs or len(runs) != len(ref_runs):
        continue
      dice = grid.paired_dice(runs, ref_runs, decoder=method_lib.resolve(method).primary,
                              reference_decoder=reference, resamples=args.resamples)
      rows.append(dict(fraction=fraction, method=method, seeds=len(runs), **dice))
      lines.append(f'| {fraction:g} | {method} | {dice["n"]} | {grid.paired_cells(dice)} |')
  return lines, rows


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python scripts/table1.py', description=__doc__.split('\n\n')[0],
      epilog='Flags this script does not know (--config.x=y) are passed to every run.py.')
  parser.add_argument('--config', required=True, help='config file of every run')
  parser.add_argument('--out', required=True, help='folder of the grid')
  parser.add_argument('--methods', type=grid.parse_list, default=list(METHODS))
  parser.add_argument('--fractions', type=lambda t: grid.parse_list(t, float), default=[0.25])
  parser.add_argument('--seeds', type=lambda t: grid.parse_list(t, int), default=[0])
  parser.add_argument('--resamples', type=int, default=2000, help='bootstrap resamples')
  parser.add_argument('--dry-run', action='store_true', help='print the commands only')
  parser.add_argument('--table-only', action='store_true', help='train nothing; print')
  return parser


def main(argv=None) -> dict:
  args, extra = _parser().parse_known_args(argv)
  grid.passthrough_flags(extra)
  for method in args.methods:
    method_lib.resolve(method)  # A misspelt method fails before hours of training.
  if not args.table_only:
    run_grid(args, extra)
  if args.dry_run:
    return {}
  scores, numbers = score_table(args)
  paired, rows = paired_table(args)
  text = '\n'.join([f'Test split; seeds {",".join(map(str, args.seeds))}; config '
                    f'{args.config} {" ".join(extra)}'.rstrip(), '', *scores, '',
                    'Paired per-image Dice difference to CERS (D_r), in points:', '',
                    *paired, '',
                    f'Not implemented: {", ".join(NOT_IMPLEMENTED)} (README "Table 1").'])
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'table1.md'), 'w') as f:
    f.write(text + '\n')
  result = dict(config=args.config, extra=extra, seeds=args.seeds, scores=numbers,
                paired_to_cers=rows)
  with open(os.path.join(args.out, 'table1.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main()
