"""Paired comparison of two runs on the same images: `python -m cers_jax.compare A B`.

Reads each run's `eval/<split>_per_image.csv` (written by `cers_jax.inference.evaluate`).
A side may be several workdirs (seeds) joined by commas, `runs/a_s0,runs/a_s1`: each image's
scores are then averaged over that side's workdirs first, so that the comparison stays
paired by image. Every workdir must have scored the same images. For each metric it
reports both means, the mean paired difference A - B with a bootstrap 95% CI (images
resampled as pairs) and the two-sided Wilcoxon signed-rank p-value (`cers_jax.stats`).

  python -m cers_jax.compare runs/cers runs/none [--split test] [--decoders r,s]
                             [--json OUT] [--resamples 2000] [--seed 0]

Runs of different methods name their decoders differently (CERS: r, s; the baselines: seg):
`--decoders-b` names B's decoder paired with each of A's, e.g. CERS's D_r against the
supervised U-Net: `python -m cers_jax.compare runs/cers runs/unet --decoders r
--decoders-b seg`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Iterable, Mapping, Sequence

import numpy as np

from cers_jax import stats
from cers_jax.errors import WorkdirError

# (column stem, printed name, which direction is better).
METRICS = (('dice', 'Dice', 'higher'), ('iou', 'IoU', 'higher'), ('hd95', 'HD95', 'lower'),
           ('assd', 'ASSD', 'lower'), ('nsd', 'NSD', 'higher'))
Table = dict[str, dict]  # image id -> that image's CSV row (numbers as float)
SHOWN_IDS = 5  # Ids named in a mismatch error before "... and N more".


def _value(text: str):
  """A CSV cell as a float where it is one ('nan' included), else the string."""
  try:
    return float(text)
  except ValueError:
    return text


def read_per_image(workdir: str, split: str = 'test') -> Table:
  """The per-image CSV of `workdir`'s `split` as {id: row}; a WorkdirError if it is absent."""
  path = os.path.join(workdir, 'eval', f'{split}_per_image.csv')
  if not os.path.isfile(path):
    raise WorkdirError(f'{workdir}: no {os.path.join("eval", split + "_per_image.csv")}; '
                       f'score it first: python run.py --mode eval --workdir {workdir} '
                       f'--config.eval.split={split} (with its --config).')
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  if not rows or 'id' not in rows[0]:
    raise WorkdirError(f'{path} holds no per-image rows: evaluate {workdir} again.')
  return {row['id']: {k: _value(v) for k, v in row.items() if k != 'id'} for row in rows}


def _ids(ids: Iterable[str]) -> str:
  ids = sorted(ids)
  more = f' and {len(ids) - SHOWN_IDS} more' if len(ids) > SHOWN_IDS else ''
  return ', '.join(ids[:SHOWN_IDS]) + more


def check_same_images(name_a: str, a: Mapping, name_b: str, b: Mapping) -> None:
  """Raises WorkdirError naming `name_b` and the ids it lacks or adds relative to `name_a`."""
  missing, extra = set(a) - set(b), set(b) - set(a)
  if missing or extra:
    parts = ([f'missing {len(missing)} ({_ids(missing)})'] if missing else []) + (
        [f'extra {len(extra)} ({_ids(extra)})'] if extra else [])
    raise WorkdirError(f'{name_b} scored other images than {name_a}: {"; ".join(parts)}. '
                       'Compare runs evaluated on the same split of the same data.')


def pool_seeds(tables: Sequence[tuple[str, Table]]) -> Table:
  """One table from several workdirs' tables of the same images: numbers averaged per image
  (non-finite values left out of that image's average), strings taken from the first."""
  first_name, first = tables[0]
  for name, table in tables[1:]:
    check_same_images(first_name, first, name, table)
  pooled = {}
  for image, row in first.items():
    out = {}
    for key, value in row.items():
      if isinstance(value, float):
        values = stats.finite([t[image].get(key, math.nan) for _, t in tables])
        out[key] = float(values.mean()) if len(values) else math.nan
      else:
        out[key] = value
    pooled[image] = out
  return pooled


def read_side(spec: str, split: str = 'test') -> Table:
  """The table of one side: `spec` is a workdir or comma-separated workdirs (seeds)."""
  workdirs = [w for w in spec.split(',') if w]
  if not workdirs:
    raise WorkdirError(f'{spec!r} names no workdir.')
  return pool_seeds([(w, read_per_image(w, split)) for w in workdirs])


def _by_id(per_image) -> Table:
  if isinstance(per_image, Mapping):
    return dict(per_image)
  return {row['id']: row for row in per_image}


def _unit(table: Table) -> str:
  units = {row.get('surface_unit', '') for row in table.values()}
  return units.pop() if len(units) == 1 else '/'.join(sorted(units))


def decoders_of(table: Table) -> tuple[str, ...]:
  """The decoders a per-image table scores (its dice_<d> columns), in column order."""
  row = next(iter(table.values()), {})
  return tuple(key[len('dice_'):] for key in row if key.startswith('dice_'))


def _check_decoders(name: str, table: Table, decoders: Sequence[str]) -> None:
  missing = [d for d in decoders if d not in decoders_of(table)]
  if missing:
    raise WorkdirError(f'{name} has no decoder {", ".join(missing)}: its per-image scores '
                       f'name {", ".join(decoders_of(table)) or "none"}.')


def compare_tables(per_image_a, per_image_b, *, decoders: Sequence[str] = ('r',),
                   decoders_b: Sequence[str] | None = None, resamples: int = 2000,
                   seed: int = 0, names: tuple[str, str] = ('A', 'B')) -> list[dict]:
  """Per metric of each decoder: means of A and B, the paired difference A - B with its
  bootstrap 95% CI, and the Wilcoxon signed-rank p-value.

  Args:
    per_image_a, per_image_b: {id: row} tables (or lists of rows with an 'id') of the same
      images, with columns such as dice_r, hd95_r; metrics absent from either are skipped.
    decoders: A's decoders: 'r' (D_r, CERS) and/or 's' (D_s); 'seg' for a baseline.
    decoders_b: B's decoder paired with each of A's (None: the same names).
    resamples, seed: of the paired bootstrap.
    names: how a mismatch error names the two sides.

  Returns:
    One dict per metric: metric, name, better ('higher'|'lower'), n (images with both
    values finite), mean_a, mean_b, diff, ci95 ([lo, hi]), p (Wilcoxon), unit.
  """
  a, b = _by_id(per_image_a), _by_id(per_image_b)
  decoders_b = tuple(decoders if decoders_b is None else decoders_b)
  if len(decoders_b) != len(decoders):
    raise WorkdirError(f'{len(decoders)} decoders of A ({", ".join(decoders)}) against '
                       f'{len(decoders_b)} of B ({", ".join(decoders_b)}): pair them one '
                       'to one.')
  _check_decoders(names[0], a, decoders)
  _check_decoders(names[1], b, decoders_b)
  check_same_images(names[0], a, names[1], b)
  if _unit(a) != _unit(b):
    raise WorkdirError(f'{names[0]} measured surfaces in {_unit(a) or "?"}, {names[1]} in '
                       f'{_unit(b) or "?"}: evaluate both with the same pixel spacing.')
  ids = sorted(a)
  out = []
  for d, d_b in zip(decoders, decoders_b):
    for stem, name, better in METRICS:
      key, key_b = f'{stem}_{d}', f'{stem}_{d_b}'
      if not all(key in a[i] and key_b in b[i] for i in ids):
        continue
      va = np.array([a[i][key] for i in ids], np.float64)
      vb = np.array([b[i][key_b] for i in ids], np.float64)
      label = f'{name} D_{d}' if d == d_b else f'{name} {d} vs {d_b}'
      pa, pb = stats.paired(va, vb)
      diff = stats.paired_bootstrap_diff(va, vb, resamples=resamples, seed=seed)
      out.append(dict(metric=key if d == d_b else f'{key}-{key_b}', name=label,
                      better=better, n=diff['count'],
                      mean_a=float(pa.mean()) if len(pa) else math.nan,
                      mean_b=float(pb.mean()) if len(pb) else math.nan,
                      diff=diff['diff'], ci95=diff['ci95'], p=stats.wilcoxon_p(va, vb),
                      unit=_unit(a) if stem in ('hd95', 'assd') else ''))
  return out


def format_table(rows: list[dict], label_a: str = 'A', label_b: str = 'B') -> str:
  """`compare_tables` rows as an aligned text table."""
  header = ['metric', 'n', 'mean A', 'mean B', 'A - B', '95% CI of A - B', 'Wilcoxon p']
  lines = [[r['name'] + (f' ({r["unit"]})' if r['unit'] else ''), str(r['n']),
            f'{r["mean_a"]:.4f}', f'{r["mean_b"]:.4f}', f'{r["diff"]:+.4f}',
            f'[{r["ci95"][0]:+.4f}, {r["ci95"][1]:+.4f}]', f'{r["p"]:.3g}'] for r in rows]
  widths = [max(len(x) for x in col) for col in zip(header, *lines)]
  text = ['  '.join(x.ljust(w) if j == 0 else x.rjust(w)
                    for j, (x, w) in enumerate(zip(line, widths)))
          for line in [header] + lines]
  return '\n'.join([f'A = {label_a}', f'B = {label_b}'] + text)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m cers_jax.compare',
      description='Paired comparison of two runs on the images both scored.')
  parser.add_argument('run_a', help='workdir, or comma-separated workdirs (seeds) pooled')
  parser.add_argument('run_b', help='the same for the other side')
  parser.add_argument('--split', default='test', help='eval/<split>_per_image.csv to read')
  parser.add_argument('--decoders', default='r',
                      help="A's decoders: 'r' (D_r), 's' (D_s), 'r,s'; 'seg' (a baseline)")
  parser.add_argument('--decoders-b', default='',
                      help="B's decoder paired with each of A's ('': the same names)")
  parser.add_argument('--json', default='', help='also write the rows to this JSON file')
  parser.add_argument('--resamples', type=int, default=2000, help='paired bootstrap resamples')
  parser.add_argument('--seed', type=int, default=0, help='bootstrap seed')
  return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = _parser().parse_args(argv)
  decoders = [d for d in args.decoders.split(',') if d]
  decoders_b = [d for d in args.decoders_b.split(',') if d] or None
  if not decoders:
    sys.exit(f"error: --decoders={args.decoders!r}: give 'r', 's', 'r,s' or 'seg'.")
  try:
    a, b = read_side(args.run_a, args.split), read_side(args.run_b, args.split)
    rows = compare_tables(a, b, decoders=decoders, decoders_b=decoders_b,
                          resamples=args.resamples, seed=args.seed,
                          names=(args.run_a, args.run_b))
  except WorkdirError as error:
    sys.exit(f'error: {error}')
  print(f'{args.split}: {len(a)} images, paired; bootstrap {args.resamples} resamples, '
        f'seed {args.seed}')
  print(format_table(rows, args.run_a, args.run_b))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(run_a=args.run_a, run_b=args.run_b, split=args.split, images=len(a),
                     resamples=args.resamples, seed=args.seed, rows=rows), f, indent=2)
  return rows


if __name__ == '__main__':
  main()
