"""The run behind `run.py`: which mode does what, with the workdir's lock where it writes.

`train_and_evaluate(config, workdir, mode)` is what `run.py` calls. The training stages
are the method's (`core.method`, config field `method`), run by `stages.run_training`
(resuming, checkpoints, early stopping); SIGTERM handling is `preemption`; an epoch and its
record are `epoch`; where a run stands is `core.progress.Progress`; scoring, the retrieval
report and predictions are `inference.evaluators`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any

from absl import logging

from cers_jax import sharding
from cers_jax.core import method as method_lib
from cers_jax.core.progress import INIT, Progress
from cers_jax.data import dataset
from cers_jax.errors import ConfigError, WorkdirError
from cers_jax.inference import export as export_lib
from cers_jax.inference import evaluate as evaluate_lib
from cers_jax.inference import evaluators
from cers_jax.training import checkpoints as checkpointing
from cers_jax.training import curves
from cers_jax.training import experiment as experiment_lib
from cers_jax.training import lock as lock_lib
from cers_jax.training import workdir as workdir_lib
from cers_jax.training.preemption import Preempted, StopOnSigterm
from cers_jax.training.stages import run_training

# Re-exported: run.py and research code reach the run's vocabulary through this module.
from cers_jax.core.progress import DONE, SEMI, WARMUP  # noqa: F401,E402
from cers_jax.training.epoch import NonFiniteLossError  # noqa: F401,E402
from cers_jax.training.stages import validate  # noqa: F401,E402

MODES = ('prepare', 'warmup', 'train', 'eval', 'retrieval', 'predict', 'export', 'all')


def default_workdir(workdir: str | None, config_file: str) -> str:
  if workdir:
    return workdir
  name = os.path.splitext(os.path.basename(config_file or 'run'))[0]
  return os.path.join('runs', name)


def pool_stage(method) -> str:
  """The stage after which a method's knowledge pool exists (CERS: warm-up)."""
  before = method_lib.stages_before_retrieval(method)
  if not before:
    raise ConfigError(f'--config.method={method.name!r} has no knowledge pool to report on '
                      '(--mode retrieval needs a method that retrieves).')
  return before[-1]


def retrieval_checkpoint(exp, state, stop=None) -> tuple[Any, Progress]:
  """The checkpoint to report on (eval.which); runs the stages before the pool exists
  (CERS: warm-up) first if it is not built yet. Returns (state, its progress)."""
  state, progress = run_training(exp, state, until=pool_stage(exp.method), stop=stop)
  which = exp.config.eval.which
  if which != 'latest' and exp.checkpoints.latest_step(which) is not None:
    state, meta = _restore_named(exp, state, which)
    progress = Progress.from_meta(meta)
  return state, progress


def _restore_named(exp, state, which: str) -> tuple[Any, dict]:
  """The newest intact `which` checkpoint; when none is left, the error names the other."""
  try:
    return exp.checkpoints.restore(which, state)
  except checkpointing.DamagedCheckpointError as error:
    other = checkpointing.BEST if which == checkpointing.LATEST else checkpointing.LATEST
    raise checkpointing.DamagedCheckpointError(
        f'{error} Or use the {other!r} checkpoint: --config.eval.which={other}.') from None


def _no_weights_message(workdir: str, which: str) -> str:
  return (f'No {which!r} checkpoint in {os.path.join(workdir, "checkpoints", which)}: train '
          'first (--mode=train), point --workdir at a finished run, or evaluate the '
          "authors' weights with --config.model.checkpoint=FILE.")


def restore_for_eval(exp, state, which: str) -> tuple[Any, dict]:
  """The `which` checkpoint, or without one the method's imported weights (CERS: the
  authors', config model.checkpoint): (state, meta).

  Raises:
    WorkdirError: neither a checkpoint nor weights to import.
  """
  if exp.checkpoints.latest_step(which) is not None:
    if exp.config.model.checkpoint:
      logging.info('Evaluating the %s checkpoint of %s; model.checkpoint only initialised '
                   'its training.', which, exp.workdir)
    state, meta = _restore_named(exp, state, which)
    meta.setdefault('checkpoint', which)
    return state, meta
  imported = exp.method.imported_state(exp, state)
  if imported is None:
    raise WorkdirError(_no_weights_message(exp.workdir, which))
  return imported


def scoring_context(exp, meta: dict) -> evaluators.Context:
  """How a restored checkpoint is tested and predicted: as model selection scored it.

  A checkpoint of a stage before the method's pool exists (CERS: a best checkpoint from
  warm-up, with train.validate_warmup) holds an empty pool, so the method's steps would
  fuse references of zeros into D_r; it is scored with the steps its stage validated
  with instead (CERS: no retrieval), and its summary says so (retrieval_mode 'none').
  """
  context = evaluators.Context.of(exp)
  stage_name = meta.get('stage')
  if stage_name not in method_lib.stages_before_retrieval(exp.method):
    return context
  stage = next(s for s in exp.stages if s.name == stage_name)
  if stage.validation_steps is None:
    raise RuntimeError(f'Method {exp.method.name!r}: its stage {stage_name!r} runs before '
                       'the pool exists but gives no validation_steps to score it with.')
  logging.info('The %s checkpoint is of %s epoch %s, before the knowledge pool exists: it '
               'is scored as it was validated, without retrieval.',
               meta.get('checkpoint', exp.config.eval.which), stage_name, meta.get('epoch'))
  return dataclasses.replace(context, steps=stage.validation_steps,
                             heads=dataclasses.replace(context.heads, retrieves=False))


def _check_before_work(config, workdir: str, mode: str) -> method_lib.Method:
  """What can be refused before any data is prepared or any file written; returns the
  config's method."""
  if mode not in MODES:
    raise ConfigError(f'Unknown mode {mode!r}; choose one of {MODES}.')
  method = method_lib.of_config(config)
  method.check(config)
  if mode == 'retrieval':
    pool_stage(method)
  weights = config.model.checkpoint
  if weights and not os.path.exists(weights):
    raise ConfigError(f'--config.model.checkpoint={weights}: no such file.')
  try:  # Evaluation comes last: a bad metric setting must not wait for training to end.
    evaluate_lib.EvalOptions.from_config(config)
  except ValueError as error:
    raise ConfigError(f'A metric setting of --config.eval is not valid: {error} '
                      'configs/base.py lists the choices (eval.surface_*).') from None
  which = config.eval.which
  if (mode in ('eval', 'predict', 'export') and not weights
      and not checkpointing.has_checkpoint(workdir, which)):
    raise WorkdirError(_no_weights_message(workdir, which))
  return method


def _writes(workdir: str, mode: str, method: method_lib.Method | None = None) -> bool:
  """Whether `mode` writes the workdir's checkpoints, data or predictions (and so needs its
  lock): `retrieval` does while the pool is not built, since it trains until it is.
  `method`: the run's (default: `method_lib.DEFAULT`)."""
  if mode in lock_lib.WRITING_MODES:
    return True
  if mode == 'retrieval':
    method = method or method_lib.default()
    saved = checkpointing.read_saved(workdir, checkpointing.LATEST)
    before_pool = (INIT, *method_lib.stages_before_retrieval(method))
    return saved is None or saved[1].get('stage') in before_pool
  return False


def train_and_evaluate(config, workdir: str, mode: str = 'all') -> dict:
  """The whole job behind run.py; returns a summary dict (also written to the workdir).

  A writing mode holds the workdir's lock (`lock.WorkdirLock`) from before its first
  write to its end; eval, and retrieval after warm-up, read beside a running writer.

  Raises:
    ConfigError, WorkdirError, DataError: user errors, before any work where possible
      (WorkdirError too when another run holds the workdir's lock).
    DamagedCheckpointError: no intact checkpoint step is left to restore.
    Preempted: SIGTERM during training (a checkpoint of that step was saved).
  """
  start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  method = _check_before_work(config, workdir, mode)
  workdir_lib.ensure_writable(workdir, '--workdir')
  writes = _writes(workdir, mode, method)
  holds_lock = writes and sharding.is_main_process()  # Process 0 locks for all.
  with (lock_lib.WorkdirLock(workdir, mode) if holds_lock else contextlib.nullcontext()):
    try:
      summary = _locked_job(config, workdir, mode, read_only=not writes)
    except Preempted as stopped:
      # A run stopped by its time limit still says how far it got (scripts/gpu_brisc.sh
      # copies summary.json back from the device).
      _write_summary(workdir, _preempted_summary(workdir, mode, stopped), start)
      raise
    _write_summary(workdir, summary, start)
  logging.info('Summary: %s', json.dumps(summary, indent=2))
  return summary


def _write_summary(workdir: str, summary: dict, start: float) -> None:
  summary['seconds'] = time.perf_counter() - start
  if sharding.is_main_process():
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)


def _preempted_summary(workdir: str, mode: str, stopped: Preempted) -> dict:
  """What a SIGTERM-stopped invocation reached: its message and the latest checkpoint's
  stage, epoch and best validation Dice."""
  summary: dict[str, Any] = dict(workdir=workdir, mode=mode, preempted=str(stopped))
  try:
    saved = checkpointing.read_saved(workdir, checkpointing.LATEST)
  except checkpointing.DamagedCheckpointError as e:  # Never hide the SIGTERM behind it.
    summary['latest_checkpoint'] = f'unreadable: {e}'
    return summary
  if saved is not None:
    meta = saved[1]
    summary['latest_checkpoint'] = {k: meta.get(k) for k in ('stage', 'epoch', 'best_dice',
                                                             'best_epoch')}
    if meta.get('partial'):
      summary['latest_checkpoint']['steps_into_epoch'] = meta['partial'].get('steps')
  return summary


def _locked_job(config, workdir: str, mode: str, *, read_only: bool) -> dict:
  """What `train_and_evaluate` does once it may (the lock held where it writes)."""
  config = experiment_lib.resolve_config(config, workdir)
  changes = workdir_lib.check_resume(workdir, config, mode)
  if sharding.is_main_process():
    workdir_lib.log_invocation(workdir, mode, config, changes)
  if mode == 'prepare':
    data = dataset.prepare_data_once(config, workdir)
    return dict(workdir=workdir, mode=mode, cache_dir=config.data.cache_dir,
                splits={name: len(rows) for name, rows in data.rows.items()})
  exp, state = experiment_lib.create(config, workdir, read_only=read_only, changes=changes)
  try:
    return _run_mode(exp, state, mode)
  finally:
    exp.checkpoints.close()
    if exp.checkpoints.damaged and sharding.is_main_process():
      workdir_lib.log_damaged(workdir, mode, exp.checkpoints.damaged)


def _run_mode(exp, state, mode: str) -> dict:
  summary: dict = dict(workdir=exp.workdir, mode=mode)
  context = evaluators.Context.of(exp)
  with StopOnSigterm() as stop:
    if mode in ('warmup', 'train', 'all'):
      # --mode warmup: the method's first stage only (CERS: warm-up and the pool build).
      until = exp.stages[0].name if mode == 'warmup' else None
      state, progress = run_training(exp, state, until=until, stop=stop)
      summary['stage'] = progress.stage
      summary[f'best_val_dice_{exp.method.primary}'] = progress.best_dice
      summary['best_epoch'] = progress.best_epoch
      if progress.warmup_best_epoch >= 0:  # Warm-up validated: what semi-supervision added.
        summary['warmup_best_val_dice'] = progress.warmup_best_dice
        summary['warmup_best_epoch'] = progress.warmup_best_epoch
        if progress.best_epoch >= 0:
          summary['semi_minus_warmup'] = progress.best_dice - progress.warmup_best_dice
    if mode == 'retrieval':
      state, progress = retrieval_checkpoint(exp, state, stop=stop)
    if stop.at_boundary():
      raise Preempted(f'Stopped by SIGTERM after training; the checkpoints in '
                      f'{os.path.join(exp.workdir, "checkpoints")} are complete. Run the '
                      'same command again for what this one had left to do.')
  if mode == 'retrieval':
    report = evaluators.build('retrieval', context).run(
        state, exp.config.eval.split or 'val', stage=progress.stage,
        epoch=progress.epoch).metrics
    summary['retrieval'] = {m: {k: v for k, v in r.items() if not isinstance(v, dict)}
                            for m, r in report['modes'].items()}
  if mode in ('eval', 'predict', 'export', 'all'):
    state, meta = restore_for_eval(exp, state, exp.config.eval.which)
    context = scoring_context(exp, meta)
    if mode == 'export':  # The predictor as a jax.export artefact (docs/interop.md).
      out_dir = os.path.join(exp.workdir, 'export')
      if sharding.is_main_process():
        export_lib.export_predictor(state, context.steps, exp.data, exp.config, out_dir,
                                    retrieves=context.heads.retrieves,
                                    primary=context.heads.primary, meta=meta)
      summary['export_dir'] = out_dir
    if mode in ('eval', 'all'):
      split = exp.config.eval.split or 'test'
      summary[split] = dict(evaluators.build('segmentation', context).run(
          state, split, meta=meta).metrics)
    if mode in ('predict', 'all'):
      summary['predict_dir'] = evaluators.build('predictions', context).run(
          state, 'test', curves_png=os.path.join(exp.workdir, curves.CURVES_FILE)
      ).metrics['predict_dir']
  return summary
