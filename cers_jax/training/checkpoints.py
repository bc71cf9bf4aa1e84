"""Orbax checkpoints of the whole TrainState, the data iterators' state and the config.

Two managers under `<workdir>/checkpoints/`: `latest/` keeps the last `keep` epochs for
resumption, `best/` keeps the single checkpoint with the highest validation Dice (STYLE
habit 6). Each checkpoint holds three items: `state` (the TrainState pytree, knowledge
pool included), `meta` (JSON: stage, epoch, best Dice, early-stopping counter, iterator
states) and `config` (JSON: the config the run trained with, which a resumed run is
checked against; `read_saved` reads both JSON items without touching the workdir).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from cers_jax.training.state import TrainState

LATEST = 'latest'
BEST = 'best'


def _directory(workdir: str, which: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints', which)


def _read_only(workdir: str, which: str) -> ocp.CheckpointManager | None:
  directory = _directory(workdir, which)
  if not os.path.isdir(directory):
    return None
  return ocp.CheckpointManager(directory,
                               options=ocp.CheckpointManagerOptions(read_only=True))


def has_checkpoint(workdir: str, which: str = LATEST) -> bool:
  """Whether `<workdir>/checkpoints/<which>` holds a finished checkpoint (creates nothing)."""
  manager = _read_only(workdir, which)
  return manager is not None and manager.latest_step() is not None


def read_saved(workdir: str, which: str = LATEST) -> tuple[dict, dict] | None:
  """(config, meta) JSON of the newest `which` checkpoint, or None; creates nothing."""
  manager = _read_only(workdir, which)
  step = None if manager is None else manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  return restored.config, restored.meta


class Checkpoints:
  """The latest/best checkpoint pair of one workdir."""

  def __init__(self, workdir: str, *, keep: int = 2):
    # Synchronous saves: the loop needs every checkpoint on disk before it goes on (a
    # checkpoint still being written cannot be resumed from), so a background save gains
    # nothing. Async saves followed by wait_until_finished() also made orbax count that
    # wait towards the next save and warn "Waiting for previous save to complete took
    # N seconds" at every save after the first.
    def manager(which: str, max_to_keep: int) -> ocp.CheckpointManager:
      return ocp.CheckpointManager(
          _directory(workdir, which), options=ocp.CheckpointManagerOptions(
              max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))

    self._managers = {LATEST: manager(LATEST, keep), BEST: manager(BEST, 1)}

  def latest_step(self, which: str = LATEST) -> int | None:
    return self._managers[which].latest_step()

  def save(self, which: str, step: int, state: TrainState, meta: dict[str, Any],
           config_json: str) -> None:
    """Saves synchronously: a checkpoint that is not on disk cannot be resumed from.

    Saving again at a step that already has a checkpoint replaces it (the end of warm-up
    saves once more after the pool build, at the same optimizer step).
    """
    manager = self._managers[which]
    if step in manager.all_steps():
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(meta),
        config=ocp.args.JsonSave(json.loads(config_json))), force=True)

  def restore(self, which: str, target: TrainState, step: int | None = None):
    """Restores (state, meta) into the shape/dtype structure of `target`.

    Args:
      which: 'latest' or 'best'.
      target: a TrainState (or its `jax.eval_shape`) with the structure to restore into.
      step: a specific step; the newest one when None.

    Raises:
      FileNotFoundError: when there is no checkpoint of that kind.
    """
    manager = self._managers[which]
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f'No {which!r} checkpoint in {manager.directory}: train first (--mode=train) '
          'or point --workdir at a finished run.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    logging.info('Restored %s checkpoint at step %d from %s', which, step,
                 manager.directory)
    return restored.state, restored.meta

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()
