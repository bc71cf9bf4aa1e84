"""One epoch of jitted steps, read back without stalling the device, and its record.

`run_epoch` dispatches the steps and reads their metrics only once computed; `MetricLog`
writes each epoch's record to `<workdir>/metrics.jsonl`, TensorBoard and curves.png.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
from tqdm import tqdm

from cers_jax import sharding
from cers_jax.training import curves


class NonFiniteLossError(RuntimeError):
  """A loss became NaN or inf; the last good checkpoint is kept."""


class MetricLog:
  """Each epoch's record: a line of <workdir>/metrics.jsonl, TensorBoard scalars and
  curves.png (`curves.RunCurves`)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.curves = curves.RunCurves(workdir)

  def write(self, record: dict) -> None:
    if sharding.is_main_process():
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    self.curves.write(record)  # Drawn from metrics.jsonl: after the line is written.

  def __enter__(self) -> MetricLog:
    return self

  def __exit__(self, *exc) -> None:
    self.curves.close()


def check_finite(history: list[tuple[int, dict]], stage: str) -> None:
  """Fetches buffered step losses and names the first non-finite one."""
  for step, aux in history:
    loss = float(aux['loss'])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f'{stage} loss is {loss} at step {step}; stopping. The last good checkpoint is '
          'kept in checkpoints/latest: lower --config.train.learning_rate and resume.')


def _ready(aux: dict) -> bool:
  """Whether a step's metrics are computed, so reading them cannot stall the dispatch queue
  (host values are always ready)."""
  return all(getattr(value, 'is_ready', lambda: True)() for value in jax.tree.leaves(aux))


class _Tally:
  """The host's running sums of an epoch's step metrics, and its progress bar."""

  def __init__(self, bar, *, stage: str, first: int, sums: Mapping[str, float],
               batch_images: int):
    self.bar, self.stage, self.first, self.batch_images = bar, stage, first, batch_images
    self.sums = dict(sums)
    self.start = time.perf_counter()

  def read(self, entries: list[tuple[int, dict]]) -> None:
    # One explicit device-to-host copy per read (jax.device_get), never an implicit one.
    values = jax.device_get([aux for _, aux in entries])
    entries = [(step, aux) for (step, _), aux in zip(entries, values)]
    check_finite(entries, self.stage)
    for _, aux in entries:
      for key, value in aux.items():
        self.sums[key] = self.sums.get(key, 0.0) + float(value)
    self.bar.update(len(entries))
    rate = ((self.bar.n - self.first) * self.batch_images
            / max(time.perf_counter() - self.start, 1e-9))
    self.bar.set_postfix(loss=f'{float(entries[-1][1]["loss"]):.4f}', img_s=f'{rate:.1f}')


def _record(state, tally: _Tally, *, stage: str, epoch: int, steps_done: int,
            earlier_seconds: float) -> dict[str, Any]:
  seconds = time.perf_counter() - tally.start + earlier_seconds
  means = {k: v / max(steps_done, 1) for k, v in tally.sums.items()}
  means.update(stage=stage, epoch=epoch, step=int(jax.device_get(state.step)),
               seconds=seconds, images_per_s=steps_done * tally.batch_images / seconds,
               steps_done=steps_done, sums=tally.sums)
  return means


def run_epoch(state, step_fn: Callable, *, stage: str, epoch: int, num_steps: int,
              batch_images: int, desc: str, log_every: int,
              stop: Callable[[int], bool] | None = None, done: Mapping | None = None,
              refresh_seconds: float = 0.5):
  """Runs `state, metrics = step_fn(state)` for the epoch's steps, returns (state, record).

  Metrics stay on the device while steps are dispatched; the host reads only those already
  computed (`is_ready`), in one `jax.device_get` every `log_every` steps or
  `refresh_seconds`, whichever comes first, to check for NaN/inf, sum them and show the
  latest on the progress bar. The epoch's end reads the rest.

  Args:
    stop: called with the global step after every step; True ends the epoch there.
    done: what a preempted invocation ran of this epoch (`Partial.as_done()`: 'steps',
      'sums', 'seconds'); the epoch continues after it and its means cover every step.

  Returns:
    The new state and the epoch's record, with 'steps_done' (num_steps unless `stop` ended
    it early) and 'sums' (the metric sums so far).
  """
  done = done or {}
  first = min(int(done.get('steps', 0)), num_steps)
  steps_done = first
  pending: collections.deque[tuple[int, dict]] = collections.deque()
  ready: list[tuple[int, dict]] = []
  first_step = int(jax.device_get(state.step))
  with tqdm(total=num_steps, initial=first, desc=desc, leave=False,
            dynamic_ncols=True) as bar:
    tally = _Tally(bar, stage=stage, first=first, sums=done.get('sums', {}),
                   batch_images=batch_images)
    last_read = tally.start
    for i in range(num_steps - first):
      state, aux = step_fn(state)
      pending.append((first_step + i, aux))
      steps_done = first + i + 1
      while pending and _ready(pending[0][1]):
        ready.append(pending.popleft())
      if ready and (len(ready) >= log_every
                    or time.perf_counter() - last_read >= refresh_seconds):
        tally.read(ready)
        ready, last_read = [], time.perf_counter()
      if stop is not None and stop(first_step + i + 1) and steps_done < num_steps:
        break
    if ready or pending:
      tally.read(ready + list(pending))
  return state, _record(state, tally, stage=stage, epoch=epoch, steps_done=steps_done,
                        earlier_seconds=float(done.get('seconds', 0.0)))
