"""SIGTERM as a request to stop at the next step boundary, and what stopping raises.

While training runs, SIGTERM (what SLURM and cloud schedulers send before they kill a job)
is turned into a flag read after every step. The stage runner then saves a checkpoint at
that step boundary, mid-epoch, with the epoch's progress (`progress.Partial`) and the
iterators' positions, and raises `Preempted`. Rerunning the same command resumes from that
step: the rest of the epoch sees the same batches and keys, and its metrics.jsonl record
the same means, as without the interruption.
"""

from __future__ import annotations

import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
  """SIGTERM stopped training; a checkpoint of the step it stopped at was saved."""

  EXIT_STATUS = 143  # What a shell reports for a process killed by SIGTERM (128 + 15).


class StopOnSigterm:
  """SIGTERM as a flag that training reads at step boundaries (a context manager).

  One process: a Python handler sets the flag. Several processes: JAX's distributed
  runtime already listens for SIGTERM, and `reached_preemption_sync_point` makes every
  process stop at the same step (not tested on real hosts yet).
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.received = True
    logging.warning('SIGTERM received: saving a checkpoint after the current step.')

  def __enter__(self) -> 'StopOnSigterm':
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread: signals cannot be caught here.
        self._previous = None
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __call__(self, step: int) -> bool:
    """Whether to stop after global step `step` (called once per step, every process)."""
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
      self.received = True  # Every process reaches the sync point at the same step.
    return self.received

  def at_boundary(self) -> bool:
    """Whether to stop now, between epochs or after training."""
    return self.received
