"""Orbax checkpoints of the whole TrainState, the data iterators' state and the config.

Two managers under `<workdir>/checkpoints/`: `latest/` keeps the last `keep` epochs for
resumption, `best/` keeps the single checkpoint with the highest validation Dice (STYLE
habit 6). Each checkpoint holds three items: `state` (the TrainState pytree, knowledge
pool included), `meta` (JSON: stage, epoch, best Dice, early-stopping counter, iterator
states) and `config` (JSON: the config the run trained with, which a resumed run is
checked against; `read_saved` reads both JSON items without touching the workdir).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from cers_jax.core.state import TrainState

LATEST = 'latest'
BEST = 'best'


def _directory(workdir: str, which: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints', which)


def _read_only_options() -> ocp.CheckpointManagerOptions:
  # Stated in full: orbax warns that it sets each of these itself otherwise.
  return ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)


def _read_only(workdir: str, which: str) -> ocp.CheckpointManager | None:
  directory = _directory(workdir, which)
  if not os.path.isdir(directory):
    return None
  return ocp.CheckpointManager(directory, options=_read_only_options())


def has_checkpoint(workdir: str, which: str = LATEST) -> bool:
  """Whether `<workdir>/checkpoints/<which>` holds a finished checkpoint (creates nothing)."""
  manager = _read_only(workdir, which)
  return manager is not None and manager.latest_step() is not None


class DamagedCheckpointError(RuntimeError):
  """No step of a checkpoint kind could be restored; the message lists every step."""


@dataclasses.dataclass(frozen=True)
class Damage:
  """A checkpoint step that failed to restore: which kind, its step, what failed."""

  which: str
  step: int
  directory: str
  where: str  # The array and file the error names, else the step's folder.
  error: str  # The error's first line.

  def line(self) -> str:
    return (f'The {self.which!r} checkpoint of step {self.step} is damaged ({self.where}: '
            f'{self.error})')

  def record(self) -> dict:
    return dataclasses.asdict(self)


def _chain(error: BaseException) -> list[BaseException]:
  """The error and the ones it was raised from (orbax wraps TensorStore's)."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _telling(error: BaseException) -> BaseException:
  """The error of the chain that names what failed: TensorStore's "Error reading ..."
  (orbax's wrapper names only an index range), else the innermost."""
  chain = _chain(error)
  for candidate in chain:
    if 'Error reading' in str(candidate):
      return candidate
  return chain[-1]


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  line = text[0] if text else type(error).__name__
  return line if len(line) <= 300 else line[:297] + '...'


def _where(error: BaseException, step_dir: str) -> str:
  """The array and file a restore error names (TensorStore says both), else the step."""
  text = str(error)
  array = re.search(r'Error reading "([^"]+)"', text)
  path = re.search(r'(?:local )?file "([^"]+)"', text)
  where = path.group(1) if path else step_dir
  return f'array {array.group(1)} in {where}' if array else where


def _damage(which: str, manager: ocp.CheckpointManager, step: int,
            error: BaseException) -> Damage:
  step_dir = os.path.join(str(manager.directory), str(step))
  if isinstance(error, _UnreadableArray):
    return Damage(which, step, str(manager.directory), error.where, error.reason)
  error = _telling(error)
  return Damage(which, step, str(manager.directory), _where(error, step_dir),
                _first_line(error))


class _UnreadableArray(ValueError):
  """A stored array whose bytes cannot be read back (`_check_readable`)."""

  def __init__(self, where: str, reason: str):
    super().__init__(f'{where}: {reason}')
    self.where, self.reason = where, reason


def _check_readable(state_dir: str) -> None:
  """Reads back every value of the step's OCDBT array store, raw, without decoding.

  Done before orbax restores the step, for two reasons. A truncated or missing data file
  fails here with TensorStore's own error naming the array. And when orbax meets such a
  file itself, it raises and closes its event loop while TensorStore still completes the
  step's other reads, whose callbacks then print dozens of "Event loop is closed"
  tracebacks from TensorStore's threads; these reads are plain TensorStore futures, with
  no event loop. Costs one extra read of the step (the page cache serves orbax's).

  Raises:
    _UnreadableArray: naming the first array that cannot be read.
  """
  if not os.path.isfile(os.path.join(state_dir, 'manifest.ocdbt')):
    return  # Not an OCDBT store: orbax's restore is the only check.
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  base = 'file://' + os.path.abspath(state_dir) + '/'
  try:
    store = ts.KvStore.open({'driver': 'ocdbt', 'base': base}).result()
    keys = store.list().result()
  except Exception as error:  # pylint: disable=broad-except
    raise _UnreadableArray(f'the array index of {state_dir}', _first_line(error)) from None
  reads = [(key, store.read(key)) for key in keys]
  for key, read in reads:
    try:
      read.result()
    except Exception as error:  # pylint: disable=broad-except
      name = key.decode('utf-8', 'replace')
      raise _UnreadableArray(f'array {name} in {state_dir}', _first_line(error)) from None


def _newest_intact(which: str, manager: ocp.CheckpointManager, restore_step,
                   damaged: list[Damage]):
  """`restore_step(step)` of the newest step that restores, newest first; each step that
  raises is logged in one line and appended to `damaged`.

  Orbax and TensorStore report unreadable bytes as ValueError, OSError, RuntimeError and
  more, hence the broad except; a structure that no longer fits fails on every step, and
  the final error quotes each step's reason so that it is not mistaken for damage alone.

  Raises:
    DamagedCheckpointError: every step failed.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  failed = []
  for step in steps:
    try:
      return step, restore_step(step)
    except Exception as error:  # pylint: disable=broad-except
      damage = _damage(which, manager, step, error)
      logging.warning('%s: skipping it.', damage.line())
      failed.append(damage)
      damaged.append(damage)
  listing = '; '.join(f'step {d.step} ({d.where}: {d.error})' for d in failed)
  raise DamagedCheckpointError(
      f'No intact {which!r} checkpoint is left in {manager.directory}: {listing}. Nothing '
      'was deleted: copy an intact backup of that folder back, or move it away to start '
      'that checkpoint anew (training then starts from the beginning).')


def read_saved(workdir: str, which: str = LATEST) -> tuple[dict, dict] | None:
  """(config, meta) JSON of the newest readable `which` checkpoint, or None; creates nothing.

  Raises:
    DamagedCheckpointError: there are steps, but the JSON of none of them can be read.
  """
  manager = _read_only(workdir, which)
  if manager is None or manager.latest_step() is None:
    return None

  def restore_json(step):
    restored = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return restored.config, restored.meta

  return _newest_intact(which, manager, restore_json, [])[1]


class Checkpoints:
  """The latest/best checkpoint pair of one workdir.

  `read_only`: for runs that only read (eval, retrieval beside a training run): the
  managers create, rotate and clean up nothing. `damaged` collects the steps that failed
  to restore in this process, for the invocation log.
  """

  def __init__(self, workdir: str, *, keep: int = 2, read_only: bool = False):
    # Synchronous saves: the loop needs every checkpoint on disk before it goes on (a
    # checkpoint still being written cannot be resumed from), so a background save gains
    # nothing. Async saves followed by wait_until_finished() also made orbax count that
    # wait towards the next save and warn "Waiting for previous save to complete took
    # N seconds" at every save after the first.
    def manager(which: str, max_to_keep: int) -> ocp.CheckpointManager:
      options = (_read_only_options() if read_only
                 else ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                   enable_async_checkpointing=False))
      return ocp.CheckpointManager(_directory(workdir, which), options=options)

    self.read_only = read_only
    self.damaged: list[Damage] = []
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

    Without `step`, the newest step that restores: a damaged newer one (truncated or
    missing files) is named in a warning, kept on disk and recorded in `self.damaged`,
    and the next older one is tried. A reader beside a training run re-lists the steps
    first, so that it sees the newest complete one.

    Args:
      which: 'latest' or 'best'.
      target: a TrainState (or its `jax.eval_shape`) with the structure to restore into.
      step: a specific step, not replaced by another when it fails.

    Raises:
      FileNotFoundError: when there is no checkpoint of that kind.
      DamagedCheckpointError: when no step of that kind restores.
    """
    manager = self._managers[which]
    if self.read_only:
      manager.reload()
    if manager.latest_step() is None:
      raise FileNotFoundError(
          f'No {which!r} checkpoint in {manager.directory}: train first (--mode=train) '
          'or point --workdir at a finished run.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)

    def restore_step(at: int):
      _check_readable(os.path.join(str(manager.directory), str(at), 'state'))
      restored = manager.restore(at, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      return restored.state, restored.meta

    if step is not None:
      state, meta = restore_step(step)
    else:
      newest = manager.latest_step()
      step, (state, meta) = _newest_intact(which, manager, restore_step, self.damaged)
      if step != newest:
        logging.warning('Using the %r checkpoint of step %d instead, the newest intact one.',
                        which, step)
    logging.info('Restored %s checkpoint at step %d from %s', which, step,
                 manager.directory)
    return state, meta

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()
