"""What the study runners share (scripts/table1.py, scripts/ablate.py): run a grid of
run.py commands one at a time, resumably, and read it back as mean ± std and paired
per-image differences.

A cell of a grid is one run.py workdir. A cell whose `eval/test_summary.json` exists is
finished and skipped; one stopped half-way resumes from its checkpoint (run.py resumes by
itself), so a later invocation with more seeds only adds runs. Each finished command and
its wall-clock go to the grid's `runs.json`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

from cers_jax import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_list(text: str, kind=str) -> list:
  """'0,1,2' -> [0, 1, 2] with kind=int: the runners' comma-separated flags."""
  return [kind(x) for x in text.split(',') if x]


def cache_dir(out: str, fraction: float, seed: int) -> str:
  """The data cache and split manifest every run of a seed and fraction shares."""
  return os.path.join(out, 'data', f'seed{seed}_frac{fraction:g}')


def summary(run: str) -> dict | None:
  """The run's test summary, or None while it is not finished."""
  path = os.path.join(run, 'eval', 'test_summary.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_command(run: str, command: list[str], *, label: str, log_path: str,
                dry_run: bool, prepare: Callable[[], None] | None = None,
                done: Callable[[], bool] | None = None) -> bool:
  """Runs `command` (a run.py argv after the interpreter) for `run` unless it is done.

  `done` says whether it is (default: its test summary exists); `prepare` runs first (e.g.
  copying a warmed-up workdir into a fresh `run`). Returns whether it ran.
  """
  if (done() if done is not None else summary(run) is not None):
    print(f'{label} {run}: done, skipped', flush=True)
    return False
  print(f'{label} {shlex.join(command)}', flush=True)
  if dry_run:
    return False
  if prepare is not None:
    prepare()
  start = time.time()
  subprocess.run([sys.executable, *command], cwd=ROOT, check=True)
  log = {}
  if os.path.isfile(log_path):
    with open(log_path) as f:
      log = json.load(f)
  log[run] = dict(command=shlex.join(command), seconds=round(time.time() - start, 1),
                  finished=time.strftime('%Y-%m-%d %H:%M:%S'))
  os.makedirs(os.path.dirname(log_path) or '.', exist_ok=True)
  with open(log_path, 'w') as f:
    json.dump(log, f, indent=2)
  return True


def mean_std(values: Sequence[float]) -> str:
  """'61.20 ± 1.05' in points over seeds (sample std), one seed's value alone, '-' none."""
  if not values:
    return '-'
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f'{100 * mean:.2f}'
  std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
  return f'{100 * mean:.2f} ± {100 * std:.2f}'


def finished(runs: Sequence[str]) -> list[str]:
  return [r for r in runs if summary(r) is not None]


def paired_dice(runs: Sequence[str], reference_runs: Sequence[str], *, decoder: str,
                reference_decoder: str, resamples: int) -> dict:
  """Paired per-image Dice difference runs - reference (images averaged over seeds first):
  {'diff', 'ci95', 'p', 'n', ...} as `compare.compare_tables` gives it."""
  a, b = compare.read_side(','.join(runs)), compare.read_side(','.join(reference_runs))
  out = compare.compare_tables(a, b, decoders=(decoder,), decoders_b=(reference_decoder,),
                               resamples=resamples, names=(runs[0], reference_runs[0]))
  return next(r for r in out if r['metric'].startswith('dice_'))


def paired_cells(row: dict) -> str:
  """'-2.19 | [-4.26, -0.13] | 0.085': a paired row's markdown cells, in points."""
  return (f'{100 * row["diff"]:+.2f} | [{100 * row["ci95"][0]:+.2f}, '
          f'{100 * row["ci95"][1]:+.2f}] | {row["p"]:.3g}')


def passthrough_flags(extra: Sequence[str]) -> None:
  """Exits naming the flags that are not `--config.*` (the only ones passed to run.py)."""
  unknown = [x for x in extra if not x.startswith('--config.')]
  if unknown:
    sys.exit(f'error: {" ".join(unknown)}: only --config.* flags are passed to run.py.')
