"""The stage runner: a method's training stages, run or resumed (docs/design.md section 9).

`run_training(exp, state)` runs the stages of the experiment's method (`exp.stages`, see
`cers_jax.core.method`) in order, or resumes them from `<workdir>/checkpoints/latest`. A
checkpoint is written at the end of every epoch with the data iterators' state, so a
resumed run repeats exactly the batches and random keys an uninterrupted one would have
used; a SIGTERM saves mid-epoch (`preemption`). A stage that validates scores val after
every epoch (`evaluators.Validation`), keeps the best checkpoint by the method's primary
decoder and stops early after `train.patience` epochs without a better one. Every function
takes the state and the run's `Progress` and returns new ones; nothing here knows which
method runs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from cers_jax import sharding
from cers_jax.core import optim
from cers_jax.core.method import Stage
from cers_jax.core.progress import DONE, INIT, Partial, Progress
from cers_jax.data import pipeline
from cers_jax.inference import evaluators
from cers_jax.training import checkpoints as checkpointing
from cers_jax.training import epoch as epoch_lib
from cers_jax.training import experiment as experiment_lib
from cers_jax.training.preemption import Preempted

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


def validate(state, exp, steps=None, decoders: tuple[str, ...] | None = None) -> dict:
  """Mean val Dice/IoU of every decoder of the method (`evaluators.Validation`), with
  `steps` (a stage's `validation_steps`) instead of the method's when given, and scoring
  `decoders` (a stage's monitor) instead of the method's when given."""
  context = evaluators.Context.of(exp)
  if steps is not None:
    context = dataclasses.replace(context, steps=steps)
  if decoders is not None:
    context = dataclasses.replace(context, heads=dataclasses.replace(
        context.heads, decoders=decoders, primary=decoders[0], retrieves=False))
  return dict(evaluators.build('validation', context).run(state, 'val').metrics)


def save(exp, state, progress: Progress, loaders: dict | None,
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

  exp: experiment_lib.Experiment
  log: epoch_lib.MetricLog
  stop: Any  # preemption.StopOnSigterm, or None
  loaders: dict
  budget: _Budget


def _finish_epoch(run: _Run, state, progress: Progress, record: dict,
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


def _epoch(run: _Run, stage: Stage, state, progress: Progress) -> tuple[Any, dict, Progress]:
  """One epoch of `stage` (resuming a preempted one): (state, record, progress)."""
  exp = run.exp
  step, extra = stage.epoch_step(progress.epoch)
  mesh = exp.steps.mesh

  def step_fn(state):
    batches = {name: sharding.shard_batch(next(run.loaders[name]), mesh)
               for name in stage.streams}
    return step(state, batches)

  partial = progress.partial_of(stage.name)
  state, record = epoch_lib.run_epoch(
      state, step_fn, stage=stage.name, epoch=progress.epoch, num_steps=stage.steps_per_epoch,
      batch_images=stage.images_per_step,
      desc=f'{stage.name} {progress.epoch + 1}/{stage.epochs}',
      log_every=exp.config.train.log_every, stop=run.stop,
      done=partial.as_done() if partial else None)
  record['learning_rate'] = float(exp.schedule(record['step']))
  record, progress = _finish_epoch(run, state, progress, record, stage.steps_per_epoch)
  record.update(extra)
  return state, record, progress


def _validated(run: _Run, stage: Stage, state, progress: Progress, record: dict,
               last: bool) -> tuple[Progress, bool]:
  """Scores val into `record`, saves a better model as best; (progress, stage over)."""
  exp, config = run.exp, run.exp.config
  primary = exp.method.primary
  record.update(validate(state, exp, stage.validation_steps))
  for name, steps in stage.monitors:
    record.update(validate(state, exp, steps, decoders=(name,)))
  progress, improved, stopping = progress.after_validation(
      record[f'val_dice_{primary}_mean'], patience=config.train.patience, epochs=stage.epochs)
  record[f'best_val_dice_{primary}'] = progress.best_dice
  over = progress.stage == DONE
  if over and not last:  # The runner moves on to the next stage (`_leave`).
    progress = progress.replace(stage=stage.name)
  scores = ' / '.join(f'D_{d} {record[f"val_dice_{d}_mean"]:.4f}'
                      for d in exp.method.decoders)
  logging.info('%s epoch %d: loss %.4f, val Dice %s (best D_%s %.4f @ %d), %.1f img/s',
               stage.name, progress.epoch, record['loss'], scores, primary,
               progress.best_dice, progress.best_epoch, record['images_per_s'])
  if improved:
    save(exp, state, progress, None, which=checkpointing.BEST)
  if stopping:
    logging.info('Early stopping: no better val Dice for %d epochs.', config.train.patience)
  return progress, over


def _stage_epochs(run: _Run, stage: Stage, state, progress: Progress, last: bool
                  ) -> tuple[Any, Progress, bool, bool]:
  """The epochs of `stage` this invocation runs: (state, progress, stage over, whether the
  budget ended the invocation)."""
  if progress.epoch < stage.epochs:
    logging.info('Compiling the %s step at its first call (cached for later runs)...',
                 stage.name)
  over = False
  while not over and progress.epoch < stage.epochs:
    state, record, progress = _epoch(run, stage, state, progress)
    if stage.after_epoch is not None:
      state = stage.after_epoch(state)
    if stage.validates:
      progress, over = _validated(run, stage, state, progress, record, last)
    else:
      progress = progress.replace(epoch=progress.epoch + 1)
      logging.info('%s epoch %d: loss %.4f (%.1f img/s)', stage.name, progress.epoch,
                   record['loss'], record['images_per_s'])
    run.log.write(record)
    progress = save(run.exp, state, progress, run.loaders)
    if run.budget.spend():
      return state, progress, over, True
    if progress.stage != DONE:
      _stop_between_epochs(run, progress)
  return state, progress, True, False


def _leave(run: _Run, stages: tuple[Stage, ...], index: int, state, progress: Progress
           ) -> tuple[Any, Progress]:
  """Ends stage `index` (its `finish`), starts the next one (its `start`) and saves; after
  the last, the run is DONE and a run that never validated keeps its final model as best."""
  exp = run.exp
  if index + 1 == len(stages):
    progress = progress.replace(stage=DONE)
    if progress.best_epoch < 0:  # Nothing validated (CERS with train.epochs=0).
      save(exp, state, progress, None, which=checkpointing.BEST)
    return state, save(exp, state, progress, run.loaders)
  following = stages[index + 1]
  if index + 2 == len(stages):  # The last (semi-supervised) stage starts.
    state, progress = _enter_last_stage(exp, stages[index], state, progress)
  # Patience counts epochs within a stage: one that stopped early does not stop the next.
  progress = progress.replace(stage=following.name, epoch=0, bad_epochs=0)
  if stages[index].finish is not None:
    state = stages[index].finish(state, progress)
  if following.start is not None:
    state = following.start(state)
  return state, save(exp, state, progress, run.loaders)


def _enter_last_stage(exp, stage: Stage, state, progress: Progress) -> tuple[Any, Progress]:
  """What the recipe (`optim.recipe`) does as the last stage starts, once: it runs in
  `_leave`, before the save that records the next stage, so a resumed run never repeats it.

  train.semi_init='best': the weights of the warm-up's best checkpoint (when warm-up
  validated) replace the last ones, before `stage.finish` (CERS builds its pool from them).
  train.select_from='semi': the best so far is forgotten, so the run's best checkpoint is
  the first stage's no more once a semi-supervised epoch validates. Either way the warm-up's
  best is kept in the progress (the summary's semi-minus-warm-up gain).
  """
  recipe = optim.recipe(exp.config, exp.method)
  validated = stage.validates and progress.best_epoch >= 0
  if validated:
    progress = progress.replace(warmup_best_dice=progress.best_dice,
                                warmup_best_epoch=progress.best_epoch)
  if recipe.semi_init == 'best':
    if validated:
      best, _ = exp.checkpoints.restore(checkpointing.BEST, state)
      # The run's step, not the best's: the schedule, ramps and random keys go on counting.
      state = best.replace(step=state.step, opt_state=optim.at_step(best.opt_state,
                                                                    state.step))
      logging.info('The %s stage starts from the best %s weights (epoch %d, val Dice %.4f), '
                   'not the last (train.semi_init=best).', progress.stage, stage.name,
                   progress.best_epoch, progress.best_dice)
    else:
      logging.info('train.semi_init=best, but %s did not validate '
                   '(train.validate_warmup=false): the next stage starts from its last '
                   'weights.', stage.name)
  if recipe.select_from == 'semi':
    progress = progress.replace(best_dice=-1.0, best_epoch=-1)
  return state, progress


def _resume(exp, state) -> tuple[Any, Progress]:
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


def run_training(exp, state, *, until: str | None = None, stop=None) -> tuple[Any, Progress]:
  """Runs (or resumes) the method's stages; with `until`, none after the stage so named.

  `stop` (a `preemption.StopOnSigterm`) is asked after every step; when it says so, the
  runner saves a checkpoint of that step and raises `Preempted`.
  """
  stages = exp.stages
  with epoch_lib.MetricLog(exp.workdir) as log:
    state, progress = _resume(exp, state)
    resumed_in = next((s for s in stages if s.name == progress.stage), None)
    if exp.changes and resumed_in is not None and resumed_in.resumed is not None:
      state = resumed_in.resumed(state, progress, exp.changes)
    if progress.stage == INIT:
      if stages[0].start is not None:
        state = stages[0].start(state)
      progress = progress.replace(stage=stages[0].name, epoch=0)
    run = _Run(exp, log, stop, train_loaders(exp, progress),
               _Budget(exp.config.train.stop_after_epochs))
    for index, stage in enumerate(stages):
      if progress.stage == stage.name:
        last = index + 1 == len(stages)
        state, progress, over, ended = _stage_epochs(run, stage, state, progress, last)
        if ended:
          return state, progress
        if over and progress.stage == stage.name:
          state, progress = _leave(run, stages, index, state, progress)
      if stage.name == until:
        break
    return state, progress
