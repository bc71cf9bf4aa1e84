"""The stage runner: warm-up, pool build, semi-supervised stage (docs/design.md section 9).

`run_training(exp, state)` runs or resumes them from `<workdir>/checkpoints/latest`. A
checkpoint is written at the end of every epoch with the data iterators' state, so a
resumed run repeats exactly the batches and random keys an uninterrupted one would have
used; a SIGTERM saves mid-epoch (`preemption`). Every function takes the state and the
run's `Progress` and returns new ones.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from cers_jax import sharding
from cers_jax.data import pipeline
from cers_jax.inference import evaluate as evaluate_lib
from cers_jax.retrieval import embed
from cers_jax.retrieval import report as retrieval_report
from cers_jax.training import checkpoints as checkpointing
from cers_jax.training import epoch as epoch_lib
from cers_jax.training import experiment as experiment_lib
from cers_jax.training import losses
from cers_jax.training.preemption import Preempted
from cers_jax.training.progress import DONE, INIT, SEMI, WARMUP, Partial, Progress
from cers_jax.training.state import TrainState

_PROCESS_SEED_STRIDE = 1000  # Seed offset of each further process's data streams.


def train_loaders(exp, progress: Progress) -> dict:
  """Infinite, seeded, resumable iterators over the labeled and unlabeled train rows.

  With 100% labeled data there is no unlabeled split: the consistency term then runs on a
  second, differently shuffled stream of labeled images.
  """
  config, rows = exp.config, exp.data.rows
  unlabeled_rows = rows['train_unlabeled']
  unlabeled_is_labeled = False
  if len(unlabeled_rows) < config.train.batch_size:
    unlabeled_rows, unlabeled_is_labeled = rows['train_labeled'], True
  process = jax.process_index()

  def loader(split_rows: np.ndarray, seed: int, is_labeled: bool):
    # Each process draws from its own rows, with a random stream of its own.
    return pipeline.make_train_loader(
        exp.data.arrays(), sharding.process_rows(split_rows),
        batch_size=config.train.batch_size // jax.process_count(),
        seed=seed + _PROCESS_SEED_STRIDE * process, is_labeled=is_labeled,
        worker_count=config.data.num_workers, prefetch=config.data.prefetch,
        augment_prob=config.data.zoom_prob, zoom_range=tuple(config.data.zoom_range))

  loaders = {'labeled': loader(rows['train_labeled'], config.seed, True),
             'unlabeled': loader(unlabeled_rows, config.seed + 1, unlabeled_is_labeled)}
  for name, states in progress.iterators.items():
    if len(states) != jax.process_count():
      raise RuntimeError(
          f'This checkpoint was written by {len(states)} processes and is resumed by '
          f'{jax.process_count()}: the data iterators cannot be restored. Resume with '
          f'{len(states)} processes, or evaluate it (--mode=eval), which needs no iterators.')
    loaders[name].set_state(states[jax.process_index()])
  return loaders


def validate(state: TrainState, exp) -> dict:
  """Mean val Dice/IoU of both decoders (D_r with retrieval: the CERS result).

  Model selection reads only these per-image means: no surface metrics and no bootstrap
  every epoch, and metrics.jsonl keeps its four val keys."""
  options = evaluate_lib.EvalOptions(threshold=exp.config.eval.threshold,
                                     bootstrap_resamples=0)
  summary = evaluate_lib.evaluate_rows(state, exp.steps, exp.data, exp.data.rows['val'],
                                       exp.config.train.eval_batch_size, options=options)
  return {f'val_{k}_mean': summary[f'{k}_mean'] for k in evaluate_lib.SCORES}


def save(exp, state: TrainState, progress: Progress, loaders: dict | None,
         which: str = checkpointing.LATEST) -> Progress:
  """Saves a checkpoint and returns the progress it holds (with the loaders' positions
  when given); `config.json` is the config the latest one was trained with."""
  if loaders is not None:
    # Each process reads its own rows: the checkpoint keeps every process's position.
    progress = progress.replace(iterators={
        name: sharding.gather_json(loader.get_state()) for name, loader in loaders.items()})
  progress = progress.replace(workdir=exp.workdir)
  config_json = experiment_lib.config_json(exp.config)
  exp.checkpoints.save(which, int(jax.device_get(state.step)), state, progress.to_meta(),
                       config_json)
  if which == checkpointing.LATEST and sharding.is_main_process():
    path = os.path.join(exp.workdir, 'config.json')
    with open(f'{path}.tmp', 'w') as f:
      f.write(config_json)
    os.replace(f'{path}.tmp', path)
  return progress


class _Budget:
  """`train.stop_after_epochs`: how many more epochs this invocation may run (0 = all)."""

  def __init__(self, epochs: int):
    self.left = epochs or None

  def spend(self) -> bool:
    """Counts an epoch; whether the budget is used up."""
    if self.left is None:
      return False
    self.left -= 1
    return self.left <= 0


@dataclasses.dataclass(frozen=True)
class _Run:
  """What every epoch of one invocation needs besides the state and the progress."""

  exp: Any  # experiment.Experiment
  log: epoch_lib.MetricLog
  stop: Any  # preemption.StopOnSigterm, or None
  loaders: dict
  budget: _Budget


def _finish_epoch(run: _Run, state: TrainState, progress: Progress, record: dict,
                  num_steps: int) -> tuple[dict, Progress]:
  """(record, progress) of a whole epoch; a stopped one is saved and raises Preempted."""
  steps_done, sums = record.pop('steps_done'), record.pop('sums')
  if steps_done >= num_steps:
    return record, progress.replace(partial=None)
  partial = Partial(stage=progress.stage, epoch=progress.epoch, steps=steps_done, sums=sums,
                    seconds=record['seconds'])
  save(run.exp, state, progress.replace(partial=partial), run.loaders)
  raise Preempted(
      f'Stopped by SIGTERM after step {record["step"]} ({progress.stage} epoch '
      f'{progress.epoch + 1}, {steps_done} of {num_steps} steps), saved in '
      f'{os.path.join(run.exp.workdir, "checkpoints", "latest")}. Run the same command '
      'again to resume from that step.')


def _stop_between_epochs(run: _Run, progress: Progress) -> None:
  if run.stop is not None and run.stop.at_boundary():
    raise Preempted(
        f'Stopped by SIGTERM after {progress.stage} epoch {progress.epoch}, saved in '
        f'{os.path.join(run.exp.workdir, "checkpoints")}. Run the same command again to '
        'resume.')


def _epoch(run: _Run, state: TrainState, progress: Progress, stage: str, step_fn
           ) -> tuple[TrainState, dict, Progress]:
  """One epoch of `stage` (resuming a preempted one): (state, record, progress)."""
  exp, config = run.exp, run.exp.config
  if stage == WARMUP:
    num_steps, total, images = (exp.warmup_steps_per_epoch, config.train.warmup_epochs,
                                config.train.batch_size)
  else:
    num_steps, total, images = (exp.semi_steps_per_epoch, config.train.epochs,
                                2 * config.train.batch_size)
  partial = progress.partial_of(stage)
  label = 'warm-up' if stage == WARMUP else 'semi'
  state, record = epoch_lib.run_epoch(
      state, step_fn, stage=stage, epoch=progress.epoch, num_steps=num_steps,
      batch_images=images, desc=f'{label} {progress.epoch + 1}/{total}',
      log_every=config.train.log_every, stop=run.stop,
      done=partial.as_done() if partial else None)
  record['learning_rate'] = float(exp.schedule(record['step']))
  record, progress = _finish_epoch(run, state, progress, record, num_steps)
  return state, record, progress


def _warmup_stage(run: _Run, state: TrainState, progress: Progress
                  ) -> tuple[TrainState, Progress, bool]:
  """Warm-up epochs until the last; (state, progress, whether the budget ended the run)."""
  exp, total = run.exp, run.exp.config.train.warmup_epochs

  def warmup_fn(state):
    batch = sharding.shard_batch(next(run.loaders['labeled']), exp.steps.mesh)
    return exp.steps.warmup(state, batch)

  if progress.stage == WARMUP and progress.epoch < total:
    logging.info('Compiling the warm-up step at its first call (cached for later runs)...')
  while progress.stage == WARMUP and progress.epoch < total:
    state, record, progress = _epoch(run, state, progress, WARMUP, warmup_fn)
    run.log.write(record)
    logging.info('warm-up epoch %d: loss %.4f (%.1f img/s)', progress.epoch + 1,
                 record['loss'], record['images_per_s'])
    progress = save(exp, state, progress.replace(epoch=progress.epoch + 1), run.loaders)
    if run.budget.spend():
      return state, progress, True
    _stop_between_epochs(run, progress)
  return state, progress, False


def _build_pool(run: _Run, state: TrainState, progress: Progress
                ) -> tuple[TrainState, Progress]:
  """The knowledge pool from the warmed-up encoder; the retrieval report, if asked."""
  exp = run.exp
  state = embed.with_pool(state, exp.steps, exp.data, exp.config)
  progress = save(exp, state, progress.replace(stage=SEMI, epoch=0), run.loaders)
  if exp.config.eval.retrieval_report:
    report_retrieval(exp, state, progress, 'after_warmup')
  return state, progress


def _semi_epoch(run: _Run, state: TrainState, progress: Progress
                ) -> tuple[TrainState, Progress]:
  """One semi-supervised epoch, validated; saves the best and the latest checkpoint."""
  exp, config, mesh = run.exp, run.exp.config, run.exp.steps.mesh
  weight = float(losses.consistency_weight(
      progress.epoch, consistency=config.train.consistency,
      rampup=config.train.consistency_rampup))
  device_weight = sharding.replicate(np.float32(weight), mesh)

  def semi_fn(state):
    return exp.steps.semi(state, sharding.shard_batch(next(run.loaders['labeled']), mesh),
                          sharding.shard_batch(next(run.loaders['unlabeled']), mesh),
                          device_weight)

  state, record, progress = _epoch(run, state, progress, SEMI, semi_fn)
  record['consistency_weight'] = weight
  if config.pool.update_rule == 'epoch_refresh':
    state = embed.with_refreshed_pool(state, exp.steps, exp.data, config)
  record.update(validate(state, exp))
  progress, improved, stopping = progress.after_validation(
      record['val_dice_r_mean'], patience=config.train.patience, epochs=config.train.epochs)
  record['best_val_dice_r'] = progress.best_dice
  run.log.write(record)
  logging.info('semi epoch %d: loss %.4f, val Dice D_r %.4f / D_s %.4f (best %.4f @ %d), '
               '%.1f img/s', progress.epoch, record['loss'], record['val_dice_r_mean'],
               record['val_dice_s_mean'], progress.best_dice, progress.best_epoch,
               record['images_per_s'])
  if improved:
    save(exp, state, progress, None, which=checkpointing.BEST)
  progress = save(exp, state, progress, run.loaders)
  if stopping:
    logging.info('Early stopping: no better val Dice for %d epochs.', config.train.patience)
  return state, progress


def _semi_stage(run: _Run, state: TrainState, progress: Progress
                ) -> tuple[TrainState, Progress, bool]:
  """Semi-supervised epochs until the last or early stopping; as `_warmup_stage`."""
  epochs = run.exp.config.train.epochs
  if progress.stage == SEMI and progress.epoch < epochs:
    logging.info('Compiling the semi-supervised step at its first call (cached for later '
                 'runs)...')
  while progress.stage == SEMI and progress.epoch < epochs:
    state, progress = _semi_epoch(run, state, progress)
    if run.budget.spend():
      return state, progress, True
    if progress.stage != DONE:
      _stop_between_epochs(run, progress)
  return state, progress, False


def _resume(exp, state: TrainState) -> tuple[TrainState, Progress]:
  """The newest intact latest checkpoint's state and progress, or a fresh run's."""
  newest = exp.checkpoints.latest_step()
  if newest is None:
    return state, Progress()
  state, meta = exp.checkpoints.restore(checkpointing.LATEST, state)
  progress = Progress.from_meta(meta)
  restored = int(jax.device_get(state.step))
  if restored < newest:
    logging.warning(
        'Resuming from step %d (%s epoch %d) instead of step %d, whose checkpoint is '
        'damaged: the %d steps in between run again (same batches and keys); their epochs '
        'are written to metrics.jsonl again, and the curves keep the newer record.',
        restored, progress.stage, progress.epoch, newest, newest - restored)
  partial = progress.partial
  logging.info('Resuming: stage %s, epoch %d, step %d%s', progress.stage, progress.epoch,
               restored, f' ({partial.steps} steps into the epoch)' if partial else '')
  return state, progress


def run_training(exp, state: TrainState, *, until: str = SEMI,
                 stop=None) -> tuple[TrainState, Progress]:
  """Runs (or resumes) warm-up and, unless until == WARMUP, the semi-supervised stage.

  `stop` (a `preemption.StopOnSigterm`) is asked after every step; when it says so, the
  runner saves a checkpoint of that step and raises `Preempted`.
  """
  with epoch_lib.MetricLog(exp.workdir) as log:
    state, progress = _resume(exp, state)
    if progress.stage == INIT:
      state = embed.with_text_features(state, exp.steps, exp.data, exp.config)
      progress = progress.replace(stage=WARMUP, epoch=0)
    run = _Run(exp, log, stop, train_loaders(exp, progress),
               _Budget(exp.config.train.stop_after_epochs))
    state, progress, ended = _warmup_stage(run, state, progress)
    if ended:
      return state, progress
    if progress.stage == WARMUP:
      state, progress = _build_pool(run, state, progress)
    if until == WARMUP:
      return state, progress
    state, progress, ended = _semi_stage(run, state, progress)
    if not ended and progress.stage == SEMI:  # epochs == 0: keep the warm-up model as best.
      progress = progress.replace(stage=DONE)
      save(exp, state, progress, None, which=checkpointing.BEST)
      progress = save(exp, state, progress, run.loaders)
    return state, progress


def report_retrieval(exp, state: TrainState, progress: Progress, name: str) -> dict:
  """The retrieval report of `state` into <workdir>/retrieval[/name]."""
  split = exp.config.eval.split or 'val'
  out_dir = os.path.normpath(os.path.join(exp.workdir, 'retrieval', name))
  return retrieval_report.write_report(
      state, exp.steps, exp.data, exp.config, split, out_dir, stage=progress.stage,
      epoch=progress.epoch, step=int(jax.device_get(state.step)))
