"""Training curves of a run: `curves.png` and TensorBoard events from its epoch records.

The loop appends one JSON record per epoch to `<workdir>/metrics.jsonl`, tagged with the
method's stage (CERS: warm-up records with the warm-up loss terms; semi-supervised records
with the semi loss terms and validation Dice/IoU of both decoders). This module turns them
into

  curves.png    six panels on one epoch axis, the stages in the order they ran (the last
                one's start marked): the loss terms (log scale), val Dice of every decoder
                (CERS: D_r, retrieval-aware, the result, and D_s, standard; an EMA teacher),
                the unsupervised term's share of the loss (against 1%), the learning
                rate, the unsupervised weight, the pseudo-labels' foreground share beside
                the labeled masks';
  tensorboard/  the same records as TensorBoard scalars, `<stage>/<key>` at the optimizer
                step (tensorboardX: no TensorFlow, no torch).

`RunCurves(workdir)` is what the loop holds: `.write(record)` after each record is
appended, `.close()` at the end. Records written before a key existed (`learning_rate`,
`consistency_weight`, `consistency_weighted`) and NaN values are drawn as gaps. To
(re)draw the figure of an existing run:

  python -m cers_jax.training.curves runs/synthetic
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from collections.abc import Sequence

from absl import logging

from cers_jax import sharding
from cers_jax.core.progress import DONE, INIT

METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'
TENSORBOARD_DIR = 'tensorboard'
# Numeric record keys that are not loss terms; every other numeric key is one.
_NOT_LOSSES = frozenset(('epoch', 'step', 'seconds', 'images_per_s', 'learning_rate',
                         'consistency_weight', 'ramp', 'unsup_weight', 'unsup_share',
                         'pseudo_fg', 'labeled_fg', 'pseudo_foreground'))
UNSUP_FLOOR = 0.01  # The diagnostics panel's line: an unsupervised term below it hardly acts.
# How the val-Dice panel draws a decoder; any other decoder: 'D_<name>', a colour of _MORE.
_DECODERS = {'r': ('D_r (retrieval-aware)', '#3b73b9'), 's': ('D_s (standard)', '#e08a2c')}
_MORE = ('#2e7d32', '#c62828', '#6a1b9a', '#00838f')


def read_records(workdir: str) -> list[dict]:
  """The epoch records of `<workdir>/metrics.jsonl`, in the order they were written.

  A last line cut short (a process killed while writing it) is skipped with a warning; a
  broken line anywhere else is an error.

  Raises:
    FileNotFoundError: when the workdir has no metrics.jsonl.
    ValueError: when a line other than the last is not JSON.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'No {METRICS_FILE} in {workdir}: give the --workdir of a run that has trained at '
        'least one epoch.')
  with open(path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as error:
      if number < len(lines):
        raise ValueError(f'{path} line {number} is not JSON ({error}): the file is damaged; '
                         'remove that line.') from error
      logging.warning('%s: skipped its last line, which is cut short (%s).', path, error)
  return records


def _number(value) -> float:
  """A record value as a float; NaN when missing or not a number."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return math.nan
  return float(value)


def stage_order(records: Sequence[dict]) -> list[str]:
  """The stages of epoch records in the order the run went through them: by the smallest
  optimizer step of each stage's records (records without one: in file order)."""
  first_step: dict[str, float] = {}
  for record in records:
    stage = record.get('stage')
    if stage in (None, INIT, DONE) or not isinstance(record.get('epoch'), int):
      continue
    step = record.get('step')
    step = float(step) if isinstance(step, numbers.Real) else math.inf
    first_step[stage] = min(first_step.get(stage, math.inf), step)
  return sorted(first_step, key=lambda stage: first_step[stage])


def epoch_axis(records: Sequence[dict]) -> tuple[list[dict], list[int], int]:
  """The records on one epoch axis: the first stage's epochs 1..W1, the next's W1+1.., ...

  A (stage, epoch) written twice (a run stopped between writing a record and saving its
  checkpoint repeats that epoch when resumed) keeps its last record.

  Returns:
    (records, x, W): the records sorted by position, their 1-based positions, and the
    number of epochs before the last stage (CERS: the warm-up epochs; the boundary lies at
    W + 0.5; 0 for a method with one stage).
  """
  order = stage_order(records)
  last = {}
  for record in records:
    if record.get('stage') in order and isinstance(record.get('epoch'), int):
      last[(record['stage'], record['epoch'])] = record
  offsets, offset = {}, 0
  for stage in order:
    offsets[stage] = offset
    offset += 1 + max((epoch for name, epoch in last if name == stage), default=-1)
  before_last = offsets[order[-1]] if len(order) > 1 else 0
  placed = sorted((epoch + 1 + offsets[stage], record)
                  for (stage, epoch), record in last.items())
  return [r for _, r in placed], [x for x, _ in placed], before_last


def _loss_keys(records: Sequence[dict]) -> list[str]:
  keys = []
  for record in records:
    for key, value in record.items():
      if (key not in keys and key not in _NOT_LOSSES and not key.startswith(('val_', 'best_'))
          and isinstance(value, numbers.Real) and not isinstance(value, bool)):
        keys.append(key)
  return keys


# How the figure names CERS's stages; any other stage by its own name.
_STAGE_NAMES = {'warmup': 'warm-up', 'semi': 'semi-supervised'}


class _Series:
  """The records' values on the epoch axis, with a gap at the warm-up / semi boundary (the
  two stages' losses are different objectives)."""

  def __init__(self, records: list[dict], x: list[int], warmup: int):
    self.records, self.x, self.warmup = records, x, warmup
    self.stages = stage_order(records)
    self.last_stage = self.stages[-1] if self.stages else ''
    self.last_name = _STAGE_NAMES.get(self.last_stage, self.last_stage)
    self.first_names = ', '.join(_STAGE_NAMES.get(s, s) for s in self.stages[:-1])
    self.both_stages = bool(warmup) and bool(x) and x[-1] > warmup
    self.xs = x[:warmup] + [warmup + 0.5] + x[warmup:] if self.both_stages else x

  def __call__(self, key: str) -> list[float]:
    values = [_number(r.get(key)) for r in self.records]
    if self.both_stages:
      return values[:self.warmup] + [math.nan] + values[self.warmup:]
    return values

  def has(self, key: str) -> bool:
    return any(math.isfinite(v) for v in self(key))


def _missing(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, transform=ax.transAxes, ha='center', va='center', fontsize=9,
          color='#757575')


def _draw_losses(ax, series: _Series, cmap) -> None:
  for i, key in enumerate(_loss_keys(series.records)):
    values = series(key)
    label = 'consistency (raw)' if key == 'consistency' else key
    ax.plot(series.xs, [v if v > 0 else math.nan for v in values], marker='.', ms=4,
            lw=1.2, color=cmap(i % 10), label=label)
  if ax.lines:
    ax.set_yscale('log')
    ax.legend(fontsize=7, ncol=2)
  else:
    _missing(ax, 'no loss recorded')
  ax.set_title('loss terms (epoch means)', fontsize=10)


def _decoders(records: Sequence[dict]) -> tuple[list[str], str | None]:
  """(decoders with a val Dice in the records, the primary one: the best-Dice key's)."""
  decoders, primary = [], None
  for record in records:
    for key in record:
      if key.startswith('val_dice_') and key.endswith('_mean'):
        name = key[len('val_dice_'):-len('_mean')]
        if name not in decoders:
          decoders.append(name)
      if key.startswith('best_val_dice_'):
        primary = key[len('best_val_dice_'):]
  return decoders, primary or (decoders[0] if decoders else None)


def _draw_dice(ax, series: _Series) -> None:
  decoders, primary = _decoders(series.records)
  colours = {}
  for i, name in enumerate(decoders):
    label, colours[name] = _DECODERS.get(name, (f'D_{name}', _MORE[i % len(_MORE)]))
    key = f'val_dice_{name}_mean'
    if series.has(key):
      ax.plot(series.xs, series(key), marker='.', ms=4, lw=1.2, color=colours[name],
              label=label)
  dice = [_number(r.get(f'val_dice_{primary}_mean')) for r in series.records]
  if any(math.isfinite(v) for v in dice):
    best = max((i for i, v in enumerate(dice) if math.isfinite(v)), key=lambda i: dice[i])
    where = (f'{series.last_stage} epoch {series.x[best] - series.warmup}' if series.warmup
             else f'epoch {series.x[best]}')
    ax.plot([series.x[best]], [dice[best]], '*', ms=11, color=colours[primary],
            label=f'best D_{primary} {dice[best]:.3f} ({where})')
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc='lower right')
  else:
    _missing(ax, 'no validation yet (validation runs after each epoch of the stages that '
             'validate)')
  ax.set_title('val Dice', fontsize=10)


def _draw_one(ax, series: _Series, key: str, colour: str, title: str) -> None:
  if series.has(key):
    ax.plot(series.xs, series(key), marker='.', ms=4, lw=1.2, color=colour)
  else:
    _missing(ax, f'{key} not in these records')
  ax.set_title(title, fontsize=10)


def _draw_unsup_share(ax, series: _Series) -> None:
  """The weighted unsupervised term's share of the loss, against UNSUP_FLOOR (log scale):
  a method whose semi-supervision never acts stays under the line."""
  if series.has('unsup_share'):
    ax.plot(series.xs, [v if v > 0 else math.nan for v in series('unsup_share')],
            marker='.', ms=4, lw=1.2, color='#c62828', label='unsup. term / loss')
    ax.axhline(UNSUP_FLOOR, color='#757575', ls=':', lw=1, label=f'{UNSUP_FLOOR:.0%}')
    ax.set_yscale('log')
    ax.legend(fontsize=7)
  else:
    _missing(ax, 'unsup_share not in these records')
  ax.set_title('unsupervised share of the loss', fontsize=10)


def _draw_foreground(ax, series: _Series) -> None:
  """The pseudo-labels' foreground share beside the labeled masks'."""
  for key, colour, label in (('pseudo_fg', '#2e7d32', 'pseudo-labels'),
                             ('labeled_fg', '#455a64', 'labeled masks')):
    if series.has(key):
      ax.plot(series.xs, series(key), marker='.', ms=4, lw=1.2, color=colour, label=label)
  if ax.lines:
    ax.legend(fontsize=7)
  else:
    _missing(ax, 'pseudo_fg not in these records')
  ax.set_title('foreground share', fontsize=10)


def _mark_stages(axes, dice_ax, series: _Series) -> None:
  warmup = series.warmup
  for ax in axes.flat:
    if series.both_stages:
      ax.axvline(warmup + 0.5, color='#9e9e9e', ls='--', lw=1)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
  if series.both_stages:
    dice_ax.text(warmup + 0.5, 1.0, f' {series.last_name}', fontsize=7, color='#616161',
                 va='top', transform=dice_ax.get_xaxis_transform())
  for ax in axes[1]:
    ax.set_xlabel(f'epoch (1-{warmup}: {series.first_names}, then {series.last_name})'
                  if warmup else 'epoch', fontsize=9)


def write_curves(records: Sequence[dict], path: str) -> None:
  """Draws the run's curves (module docstring: six panels) to `path`.

  Args:
    records: epoch records as in metrics.jsonl (`read_records`), in any order.
    path: the PNG to write (replaced atomically, so a viewer never reads half a file).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  series = _Series(*epoch_axis(records))
  fig, axes = plt.subplots(2, 3, figsize=(15, 7), sharex=True)
  (losses_ax, dice_ax, share_ax), (lr_ax, weight_ax, fg_ax) = axes
  _draw_losses(losses_ax, series, plt.get_cmap('tab10'))
  _draw_dice(dice_ax, series)
  _draw_unsup_share(share_ax, series)
  _draw_one(lr_ax, series, 'learning_rate', '#455a64', 'learning rate')
  weight = 'consistency_weight' if series.has('consistency_weight') else 'unsup_weight'
  _draw_one(weight_ax, series, weight, '#6a1b9a', 'unsupervised weight (ramp-up)')
  _draw_foreground(fg_ax, series)
  _mark_stages(axes, dice_ax, series)
  fig.suptitle(f'{len(series.records)} epochs: ' + ', '.join(
      f'{sum(r.get("stage") == stage for r in series.records)} {_STAGE_NAMES.get(stage, stage)}'
      for stage in series.stages), fontsize=10)
  fig.tight_layout()
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = os.path.join(directory, f'.{os.path.basename(path)}.tmp.png')
  fig.savefig(temporary, dpi=100)
  plt.close(fig)
  os.replace(temporary, path)


class TensorBoardWriter:
  """Writes epoch records as TensorBoard scalars `<stage>/<key>` (main process only).

  Every numeric value of a record but `step` (the x axis) becomes one scalar, e.g.
  `warmup/loss`, `semi/val_dice_r_mean`. Other processes construct it too and write
  nothing, so the loop needs no branch. Without tensorboardX (an optional logger: the GPU
  image lacks it) one warning says so and nothing is written here; metrics.jsonl and
  curves.png hold the same records.
  """

  def __init__(self, logdir: str):
    self._logdir = logdir
    self._writer = None
    self._unavailable = False

  def write(self, record: dict, step: int | None = None) -> None:
    """Writes `record`'s numeric values at `step` (default: `record['step']`) and flushes."""
    if not sharding.is_main_process() or self._unavailable:
      return
    if self._writer is None:
      # Opened at the first record: an invocation that trains nothing (retrieval beside a
      # training run, a finished run resumed) leaves no empty event file behind.
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        self._unavailable = True
        logging.warning('No TensorBoard events in %s: tensorboardX cannot be imported (%s); '
                        'metrics.jsonl and curves.png hold the same records. `pip install '
                        '"tensorboardX>=2.6.2,<3"` writes them.', self._logdir, e)
        return
      self._writer = SummaryWriter(self._logdir)
    step = int(record['step']) if step is None else int(step)
    stage = record.get('stage', 'train')
    for key, value in record.items():
      if key != 'step' and isinstance(value, numbers.Real) and not isinstance(value, bool):
        self._writer.add_scalar(f'{stage}/{key}', float(value), step)
    # One record per epoch: flushing each makes it visible to a running TensorBoard now.
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> TensorBoardWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class RunCurves:
  """What the training loop calls with each epoch record, after appending it to
  metrics.jsonl: the TensorBoard scalars at every record; curves.png (drawn from the whole
  metrics.jsonl, earlier invocations included) at the first record, then at most every
  `min_interval_s` seconds (a redraw costs 1-2 s on a CPU, about one synthetic epoch), and
  at `close()`. Other processes than the main one write nothing.
  """

  def __init__(self, workdir: str, *, min_interval_s: float = 60.0):
    self._workdir = workdir
    self._main = sharding.is_main_process()
    self._board = TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR))
    self._min_interval_s = min_interval_s
    self._drawn_at = -math.inf
    self._undrawn = False

  def write(self, record: dict) -> None:
    self._board.write(record)
    self._undrawn = True
    if time.monotonic() - self._drawn_at >= self._min_interval_s:
      self.draw()

  def draw(self) -> None:
    """Redraws curves.png now if a record came since the last drawing."""
    if not (self._main and self._undrawn):
      return
    write_curves(read_records(self._workdir), os.path.join(self._workdir, CURVES_FILE))
    self._drawn_at = time.monotonic()
    self._undrawn = False

  def close(self) -> None:
    self.draw()
    self._board.close()

  def __enter__(self) -> RunCurves:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1].startswith('-'):
    sys.exit('usage: python -m cers_jax.training.curves WORKDIR  (draws '
             f'WORKDIR/{CURVES_FILE} from WORKDIR/{METRICS_FILE})')
  workdir = argv[1]
  try:
    records = read_records(workdir)
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f'error: {error}')
  path = os.path.join(workdir, CURVES_FILE)
  write_curves(records, path)
  print(f'Wrote {path} ({len(records)} records).')


if __name__ == '__main__':
  main(sys.argv)
