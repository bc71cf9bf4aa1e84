"""Val Dice of both decoders against training time, one line per run: recipe search.

  python scripts/dice_vs_time.py OUT.png LABEL=WORKDIR [LABEL=WORKDIR ...]

Reads each run's metrics.jsonl (the epochs that scored val: semi-supervised epochs, and
warm-up epochs with --config.train.validate_warmup=True) and plots val Dice of D_r (solid)
and D_s (dashed) against the cumulative training time of the epochs (their steps, as each
record's `seconds`: validation, checkpoints, the pool build, data preparation and
evaluation are not counted, so a run's process takes longer). Prints the same numbers as a
table.
"""

from __future__ import annotations

import sys

from cers_jax.training import curves


def series(workdir: str) -> list[tuple[float, str, int, float, float]]:
  """(seconds so far, stage, epoch, val Dice D_r, val Dice D_s) of each validated epoch."""
  records, _, _ = curves.epoch_axis(curves.read_records(workdir))
  out, elapsed = [], 0.0
  for record in records:
    elapsed += float(record.get('seconds', 0.0))
    if 'val_dice_r_mean' in record:
      out.append((elapsed, record['stage'], record['epoch'] + 1, record['val_dice_r_mean'],
                  record['val_dice_s_mean']))
  return out


def main(argv: list[str]) -> None:
  if len(argv) < 2 or any('=' not in a for a in argv[1:]):
    sys.exit(__doc__)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(8, 5))
  for i, spec in enumerate(argv[1:]):
    label, workdir = spec.split('=', 1)
    points = series(workdir)
    colour = plt.get_cmap('tab10')(i % 10)
    minutes = [p[0] / 60 for p in points]
    ax.plot(minutes, [p[3] for p in points], '-o', ms=3, color=colour, label=f'{label} D_r')
    ax.plot(minutes, [p[4] for p in points], '--s', ms=3, color=colour, label=f'{label} D_s')
    print(f'{label} ({workdir})')
    for seconds, stage, epoch, dice_r, dice_s in points:
      print(f'  {seconds / 60:6.1f} min  {stage:>6} {epoch:>3}  D_r {dice_r:.4f}  '
            f'D_s {dice_s:.4f}')
  ax.axhline(0.70, color='#9e9e9e', lw=1, ls=':')
  ax.set_xlabel('training time (min of train steps, 2-core CPU)')
  ax.set_ylabel('val Dice (per image)')
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(argv[0], dpi=100)


if __name__ == '__main__':
  main(sys.argv[1:])
