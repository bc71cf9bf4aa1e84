"""The training loop: warm-up, pool build, semi-supervised stage (DESIGN.md section 3).

`train_and_evaluate(config, workdir, mode)` is what `run.py` calls. Every stage resumes
from `<workdir>/checkpoints/latest`; a checkpoint is written at the end of every epoch with
the data iterators' state, so a resumed run repeats exactly the batches and random keys an
uninterrupted one would have used.

Preemption: while training runs, SIGTERM (what SLURM and cloud schedulers send before they
kill a job) is turned into a flag read after every step. The loop then saves a checkpoint
at that step boundary, mid-epoch, with the epoch's progress (steps done and its metric
sums, `meta['partial']`) and the iterators' positions, and raises `Preempted`. Rerunning
the same command resumes from that step: the rest of the epoch sees the same batches and
keys, and its metrics.jsonl record the same means, as without the interruption.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import signal
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from cers_jax import sharding
from cers_jax.training import workdir as workdir_lib
from cers_jax.data import pipeline
from cers_jax.errors import ConfigError, WorkdirError
from cers_jax.inference import evaluate as evaluate_lib
from cers_jax.inference import predict as predict_lib
from cers_jax.retrieval import embed
from cers_jax.retrieval import report as retrieval_report
from cers_jax.retrieval import search
from cers_jax.training import checkpoints as checkpointing
from cers_jax.training import curves
from cers_jax.training import experiment as experiment_lib
from cers_jax.training import lock as lock_lib
from cers_jax.training import losses
from cers_jax.training.state import TrainState

MODES = ('prepare', 'warmup', 'train', 'eval', 'retrieval', 'predict', 'all')

INIT, WARMUP, SEMI, DONE = 'init', 'warmup', 'semi', 'done'


class NonFiniteLossError(RuntimeError):
  """A loss became NaN or inf; the last good checkpoint is kept."""


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


def default_workdir(workdir: str | None, config_file: str) -> str:
  if workdir:
    return workdir
  name = os.path.splitext(os.path.basename(config_file or 'run'))[0]
  return os.path.join('runs', name)


def _fresh_meta() -> dict:
  return dict(stage=INIT, epoch=0, best_dice=-1.0, best_epoch=-1, bad_epochs=0,
              iterators={})


_PROCESS_SEED_STRIDE = 1000  # Seed offset of each further process's data streams.


def _train_loaders(exp, meta: dict) -> dict:
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
  for name, states in meta.get('iterators', {}).items():
    if len(states) != jax.process_count():
      raise RuntimeError(
          f'This checkpoint was written by {len(states)} processes and is resumed by '
          f'{jax.process_count()}: the data iterators cannot be restored. Resume with '
          f'{len(states)} processes, or evaluate it (--mode=eval), which needs no iterators.')
    loaders[name].set_state(states[jax.process_index()])
  return loaders


class _MetricLog:
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

  def __enter__(self) -> '_MetricLog':
    return self

  def __exit__(self, *exc) -> None:
    self.curves.close()


def _check_finite(history: list[tuple[int, dict]], stage: str) -> None:
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


def _run_epoch(state: TrainState, step_fn, *, stage: str, epoch: int, num_steps: int,
               batch_images: int, desc: str, log_every: int, stop=None,
               done: dict | None = None,
               refresh_seconds: float = 0.5) -> tuple[TrainState, dict]:
  """Runs `state, metrics = step_fn(state)` for the epoch's steps, returns (state, record).

  Metrics stay on the device while steps are dispatched; the host reads only those already
  computed (`is_ready`), in one `jax.device_get` every `log_every` steps or
  `refresh_seconds`, whichever comes first, to check for NaN/inf, sum them and show the latest on the progress bar. The epoch's end
  reads the rest.

  Args:
    stop: called with the global step after every step; True ends the epoch there.
    done: what a preempted invocation ran of this epoch (meta['partial']: 'steps', 'sums',
      'seconds'); the epoch continues after it and its means cover every step.

  Returns:
    The new state and the epoch's record, with 'steps_done' (num_steps unless `stop` ended
    it early) and 'sums' (the metric sums so far).
  """
  done = done or {}
  first = min(int(done.get('steps', 0)), num_steps)
  sums: dict[str, float] = dict(done.get('sums', {}))
  steps_done = first
  pending: collections.deque[tuple[int, dict]] = collections.deque()
  ready: list[tuple[int, dict]] = []
  start = last_read = time.perf_counter()
  first_step = int(jax.device_get(state.step))

  def read(entries, bar) -> None:
    # One explicit device-to-host copy per read (jax.device_get), never an implicit one.
    values = jax.device_get([aux for _, aux in entries])
    entries = [(step, aux) for (step, _), aux in zip(entries, values)]
    _check_finite(entries, stage)
    for _, aux in entries:
      for key, value in aux.items():
        sums[key] = sums.get(key, 0.0) + float(value)
    bar.update(len(entries))
    rate = (bar.n - first) * batch_images / max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(loss=f'{float(entries[-1][1]["loss"]):.4f}', img_s=f'{rate:.1f}')

  with tqdm(total=num_steps, initial=first, desc=desc, leave=False,
            dynamic_ncols=True) as bar:
    for i in range(num_steps - first):
      state, aux = step_fn(state)
      pending.append((first_step + i, aux))
      steps_done = first + i + 1
      while pending and _ready(pending[0][1]):
        ready.append(pending.popleft())
      if ready and (len(ready) >= log_every
                    or time.perf_counter() - last_read >= refresh_seconds):
        read(ready, bar)
        ready, last_read = [], time.perf_counter()
      if stop is not None and stop(first_step + i + 1) and steps_done < num_steps:
        break
    rest = ready + list(pending)
    if rest:
      read(rest, bar)
  seconds = time.perf_counter() - start + float(done.get('seconds', 0.0))
  means = {k: v / max(steps_done, 1) for k, v in sums.items()}
  means.update(stage=stage, epoch=epoch, step=int(jax.device_get(state.step)),
               seconds=seconds, images_per_s=steps_done * batch_images / seconds,
               steps_done=steps_done, sums=sums)
  return state, means


def validate(state: TrainState, exp) -> dict:
  """Mean val Dice/IoU of both decoders (D_r with retrieval: the CERS result).

  Model selection reads only these per-image means: no surface metrics and no bootstrap
  every epoch, and metrics.jsonl keeps its four val keys."""
  options = evaluate_lib.EvalOptions(threshold=exp.config.eval.threshold,
                                     bootstrap_resamples=0)
  summary = evaluate_lib.evaluate_rows(state, exp.steps, exp.data, exp.data.rows['val'],
                                       exp.config.train.eval_batch_size, options=options)
  return {f'val_{k}_mean': summary[f'{k}_mean'] for k in evaluate_lib.SCORES}


def _save(exp, state: TrainState, meta: dict, loaders: dict | None,
          which: str = 'latest') -> None:
  """Saves a checkpoint; `config.json` is the config the latest one was trained with."""
  if loaders is not None:
    # Each process reads its own rows: the checkpoint keeps every process's position.
    meta['iterators'] = {name: sharding.gather_json(loader.get_state())
                         for name, loader in loaders.items()}
  meta['workdir'] = exp.workdir  # Lets a copied workdir's paths be compared (workdir.py).
  config_json = experiment_lib.config_json(exp.config)
  exp.checkpoints.save(which, int(jax.device_get(state.step)), state, meta, config_json)
  if which == 'latest' and sharding.is_main_process():
    path = os.path.join(exp.workdir, 'config.json')
    with open(f'{path}.tmp', 'w') as f:
      f.write(config_json)
    os.replace(f'{path}.tmp', path)


def _partial(meta: dict, stage: str) -> dict | None:
  """The part of the current epoch a preempted invocation ran, if any."""
  partial = meta.get('partial')
  if partial and partial['stage'] == stage and partial['epoch'] == meta['epoch']:
    return partial
  return None


def _finish_epoch(exp, state: TrainState, meta: dict, loaders: dict, record: dict,
                  num_steps: int) -> dict:
  """The epoch's record, or, when it was stopped early, a saved checkpoint and Preempted."""
  steps_done, sums = record.pop('steps_done'), record.pop('sums')
  if steps_done >= num_steps:
    meta.pop('partial', None)
    return record
  meta['partial'] = dict(stage=meta['stage'], epoch=meta['epoch'], steps=steps_done,
                         sums=sums, seconds=record['seconds'])
  _save(exp, state, meta, loaders)
  raise Preempted(
      f'Stopped by SIGTERM after step {record["step"]} ({meta["stage"]} epoch '
      f'{meta["epoch"] + 1}, {steps_done} of {num_steps} steps), saved in '
      f'{os.path.join(exp.workdir, "checkpoints", "latest")}. Run the same command again '
      'to resume from that step.')


def _stop_between_epochs(exp, meta: dict, stop) -> None:
  if stop is not None and stop.at_boundary():
    raise Preempted(
        f'Stopped by SIGTERM after {meta["stage"]} epoch {meta["epoch"]}, saved in '
        f'{os.path.join(exp.workdir, "checkpoints")}. Run the same command again to resume.')


def _epoch(exp, state: TrainState, meta: dict, stage: str, step_fn, stop, loaders):
  """One epoch of `stage` (resuming a preempted one): (state, record)."""
  config = exp.config
  if stage == WARMUP:
    num_steps, total, images = (exp.warmup_steps_per_epoch, config.train.warmup_epochs,
                                config.train.batch_size)
  else:
    num_steps, total, images = (exp.semi_steps_per_epoch, config.train.epochs,
                                2 * config.train.batch_size)
  label = 'warm-up' if stage == WARMUP else 'semi'
  state, record = _run_epoch(
      state, step_fn, stage=stage, epoch=meta['epoch'], num_steps=num_steps,
      batch_images=images, desc=f'{label} {meta["epoch"] + 1}/{total}',
      log_every=config.train.log_every, stop=stop, done=_partial(meta, stage))
  record['learning_rate'] = float(exp.schedule(record['step']))
  return state, _finish_epoch(exp, state, meta, loaders, record, num_steps)


def run_training(exp, state: TrainState, *, until: str = SEMI,
                 stop=None) -> tuple[TrainState, dict]:
  """Runs (or resumes) warm-up and, unless until == 'warmup', the semi-supervised stage.

  `stop` (a `StopOnSigterm`) is asked after every step; when it says so, the loop saves a
  checkpoint of that step and raises `Preempted`. Returns (state, meta).
  """
  with _MetricLog(exp.workdir) as log:
    return _train(exp, state, log, until=until, stop=stop)


def _train(exp, state: TrainState, log: _MetricLog, *, until: str,
           stop) -> tuple[TrainState, dict]:
  config, steps, mesh = exp.config, exp.steps, exp.steps.mesh
  meta = _fresh_meta()
  newest = exp.checkpoints.latest_step()
  if newest is not None:
    state, meta = exp.checkpoints.restore('latest', state)
    _log_fallback(newest, int(jax.device_get(state.step)), meta)
    partial = meta.get('partial')
    logging.info('Resuming: stage %s, epoch %d, step %d%s', meta['stage'], meta['epoch'],
                 int(jax.device_get(state.step)),
                 f' ({partial["steps"]} steps into the epoch)' if partial else '')
  budget = config.train.stop_after_epochs or None

  if meta['stage'] == INIT:
    state = embed.with_text_features(state, steps, exp.data, config)
    meta.update(stage=WARMUP, epoch=0)
  loaders = _train_loaders(exp, meta)

  def spend_budget() -> bool:
    nonlocal budget
    if budget is None:
      return False
    budget -= 1
    return budget <= 0

  def warmup_fn(state):
    return steps.warmup(state, sharding.shard_batch(next(loaders['labeled']), mesh))

  if meta['stage'] == WARMUP and meta['epoch'] < config.train.warmup_epochs:
    logging.info('Compiling the warm-up step at its first call (cached for later runs)...')
  while meta['stage'] == WARMUP and meta['epoch'] < config.train.warmup_epochs:
    state, record = _epoch(exp, state, meta, WARMUP, warmup_fn, stop, loaders)
    log.write(record)
    logging.info('warm-up epoch %d: loss %.4f (%.1f img/s)', meta['epoch'] + 1,
                 record['loss'], record['images_per_s'])
    meta['epoch'] += 1
    _save(exp, state, meta, loaders)
    if spend_budget():
      return state, meta
    _stop_between_epochs(exp, meta, stop)
  if meta['stage'] == WARMUP:
    state = embed.with_pool(state, steps, exp.data, config)
    meta.update(stage=SEMI, epoch=0)
    _save(exp, state, meta, loaders)
    if config.eval.retrieval_report:
      report_retrieval(exp, state, meta, 'after_warmup')
  if until == WARMUP:
    return state, meta

  if meta['stage'] == SEMI and meta['epoch'] < config.train.epochs:
    logging.info('Compiling the semi-supervised step at its first call (cached for later '
                 'runs)...')
  while meta['stage'] == SEMI and meta['epoch'] < config.train.epochs:
    weight = float(losses.consistency_weight(
        meta['epoch'], consistency=config.train.consistency,
        rampup=config.train.consistency_rampup))
    device_weight = sharding.replicate(np.float32(weight), mesh)

    def semi_fn(state):
      return steps.semi(state, sharding.shard_batch(next(loaders['labeled']), mesh),
                        sharding.shard_batch(next(loaders['unlabeled']), mesh),
                        device_weight)

    state, record = _epoch(exp, state, meta, SEMI, semi_fn, stop, loaders)
    record['consistency_weight'] = weight
    if config.pool.update_rule == 'epoch_refresh':
      state = embed.with_refreshed_pool(state, steps, exp.data, config)
    record.update(validate(state, exp))
    meta['epoch'] += 1
    improved = record['val_dice_r_mean'] > meta['best_dice']
    if improved:
      meta.update(best_dice=record['val_dice_r_mean'], best_epoch=meta['epoch'],
                  bad_epochs=0)
    else:
      meta['bad_epochs'] += 1
    stopping = meta['bad_epochs'] >= config.train.patience
    if stopping or meta['epoch'] >= config.train.epochs:
      meta['stage'] = DONE
    record['best_val_dice_r'] = meta['best_dice']
    log.write(record)
    logging.info('semi epoch %d: loss %.4f, val Dice D_r %.4f / D_s %.4f (best %.4f @ %d), '
                 '%.1f img/s', meta['epoch'], record['loss'], record['val_dice_r_mean'],
                 record['val_dice_s_mean'], meta['best_dice'], meta['best_epoch'],
                 record['images_per_s'])
    if improved:
      _save(exp, state, meta, None, which='best')
    _save(exp, state, meta, loaders)
    if stopping:
      logging.info('Early stopping: no better val Dice for %d epochs.',
                   config.train.patience)
    if spend_budget():
      return state, meta
    if meta['stage'] != DONE:
      _stop_between_epochs(exp, meta, stop)
  if meta['stage'] == SEMI:  # epochs == 0: warm-up only; keep its model as the best.
    meta['stage'] = DONE
    _save(exp, state, meta, None, which='best')
    _save(exp, state, meta, loaders)
  return state, meta


def _log_fallback(newest: int, restored: int, meta: dict) -> None:
  """What resuming from an older step than the newest (a damaged one) costs."""
  if restored < newest:
    logging.warning(
        'Resuming from step %d (%s epoch %d) instead of step %d, whose checkpoint is '
        'damaged: the %d steps in between run again (same batches and keys); their epochs '
        'are written to metrics.jsonl again, and the curves keep the newer record.',
        restored, meta['stage'], meta['epoch'], newest, newest - restored)


def report_retrieval(exp, state: TrainState, meta: dict, name: str) -> dict:
  """The retrieval report of `state` into <workdir>/retrieval[/name]."""
  split = exp.config.eval.split or 'val'
  out_dir = os.path.normpath(os.path.join(exp.workdir, 'retrieval', name))
  return retrieval_report.write_report(
      state, exp.steps, exp.data, exp.config, split, out_dir, stage=meta['stage'],
      epoch=meta['epoch'], step=int(jax.device_get(state.step)))


def retrieval_checkpoint(exp, state: TrainState, stop=None) -> tuple[TrainState, dict]:
  """The checkpoint to report on (eval.which); runs warm-up first if the pool is not built
  yet. Returns (state, meta)."""
  state, meta = run_training(exp, state, until=WARMUP, stop=stop)
  which = exp.config.eval.which
  if which != 'latest' and exp.checkpoints.latest_step(which) is not None:
    state, meta = _restore_named(exp, state, which)
  return state, meta


def _restore_named(exp, state: TrainState, which: str) -> tuple[TrainState, dict]:
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


def import_authors_state(exp, state: TrainState) -> tuple[TrainState, dict]:
  """Readies the authors' imported weights (config model.checkpoint) for evaluation.

  Their state dict holds the network only: no knowledge pool, no CoT BERT and no alignment
  projections. The CoT features come from our CoT BERT (model.cot.weights) and the pool is
  built from the labeled training images with the imported encoder, exactly as at the end
  of our warm-up. Returns (state, meta for the eval summary).
  """
  config = exp.config
  mode = search.mode_spec(config.pool.mode)
  if config.pool.cot_space == 'projection' and (mode.uses('cot') or mode.uses('text')):
    logging.warning(
        "The authors' state dict has no alignment projections, so they are random here and "
        "retrieval mode %r ranks by randomly projected CoTs. Use --config.pool.cot_space="
        'features (with --config.model.cot.weights) or --config.pool.mode=image.',
        config.pool.mode)
  logging.info("Evaluating the authors' weights from %s (no orbax checkpoint in %s); the "
               'pool is built from the %d labeled training images.', config.model.checkpoint,
               exp.workdir, len(exp.data.rows['train_labeled']))
  state = embed.with_text_features(state, exp.steps, exp.data, config)
  state = embed.with_pool(state, exp.steps, exp.data, config)
  return state, dict(stage='imported', epoch=None,
                     checkpoint=os.path.abspath(config.model.checkpoint))


def restore_for_eval(exp, state: TrainState, which: str) -> tuple[TrainState, dict]:
  """The `which` checkpoint, or without one the authors' imported weights: (state, meta).

  Raises:
    WorkdirError: neither a checkpoint nor config model.checkpoint.
  """
  if exp.checkpoints.latest_step(which) is not None:
    if exp.config.model.checkpoint:
      logging.info('Evaluating the %s checkpoint of %s; model.checkpoint only initialised '
                   'its training.', which, exp.workdir)
    state, meta = _restore_named(exp, state, which)
    meta.setdefault('checkpoint', which)
    return state, meta
  if not exp.config.model.checkpoint:
    raise WorkdirError(_no_weights_message(exp.workdir, which))
  return import_authors_state(exp, state)


def _check_before_work(config, workdir: str, mode: str) -> None:
  """What can be refused before any data is prepared or any file written."""
  if mode not in MODES:
    raise ConfigError(f'Unknown mode {mode!r}; choose one of {MODES}.')
  weights = config.model.checkpoint
  if weights and not os.path.exists(weights):
    raise ConfigError(f'--config.model.checkpoint={weights}: no such file.')
  which = config.eval.which
  if (mode in ('eval', 'predict') and not weights
      and not checkpointing.has_checkpoint(workdir, which)):
    raise WorkdirError(_no_weights_message(workdir, which))


def _writes(workdir: str, mode: str) -> bool:
  """Whether `mode` writes the workdir's checkpoints, data or predictions (and so needs its
  lock): `retrieval` does while warm-up has not finished, since it runs warm-up first."""
  if mode in lock_lib.WRITING_MODES:
    return True
  if mode == 'retrieval':
    saved = checkpointing.read_saved(workdir, checkpointing.LATEST)
    return saved is None or saved[1].get('stage') in (INIT, WARMUP)
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
  _check_before_work(config, workdir, mode)
  workdir_lib.ensure_writable(workdir, '--workdir')
  writes = _writes(workdir, mode)
  holds_lock = writes and sharding.is_main_process()  # Process 0 locks for all.
  with (lock_lib.WorkdirLock(workdir, mode) if holds_lock else contextlib.nullcontext()):
    summary = _locked_job(config, workdir, mode, read_only=not writes)
    summary['seconds'] = time.perf_counter() - start
    if sharding.is_main_process():
      with open(os.path.join(workdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
  logging.info('Summary: %s', json.dumps(summary, indent=2))
  return summary


def _locked_job(config, workdir: str, mode: str, *, read_only: bool) -> dict:
  """What `train_and_evaluate` does once it may (the lock held where it writes)."""
  config = experiment_lib.resolve_config(config, workdir)
  changes = workdir_lib.check_resume(workdir, config, mode)
  if sharding.is_main_process():
    workdir_lib.log_invocation(workdir, mode, config, changes)
  if mode == 'prepare':
    data = experiment_lib.prepare_data_once(config, workdir)
    return dict(workdir=workdir, mode=mode, cache_dir=config.data.cache_dir,
                splits={name: len(rows) for name, rows in data.rows.items()})
  exp, state = experiment_lib.create(config, workdir, read_only=read_only)
  try:
    return _run_mode(exp, state, mode)
  finally:
    exp.checkpoints.close()
    if exp.checkpoints.damaged and sharding.is_main_process():
      workdir_lib.log_damaged(workdir, mode, exp.checkpoints.damaged)


def _run_mode(exp, state: TrainState, mode: str) -> dict:
  summary: dict = dict(workdir=exp.workdir, mode=mode)
  with StopOnSigterm() as stop:
    if mode in ('warmup', 'train', 'all'):
      state, meta = run_training(exp, state, until=WARMUP if mode == 'warmup' else SEMI,
                                 stop=stop)
      summary.update(stage=meta['stage'], best_val_dice_r=meta['best_dice'],
                     best_epoch=meta['best_epoch'])
    if mode == 'retrieval':
      state, meta = retrieval_checkpoint(exp, state, stop=stop)
    if stop.at_boundary():
      raise Preempted(f'Stopped by SIGTERM after training; the checkpoints in '
                      f'{os.path.join(exp.workdir, "checkpoints")} are complete. Run the '
                      'same command again for what this one had left to do.')
  if mode == 'retrieval':
    report = report_retrieval(exp, state, meta, '')
    summary['retrieval'] = {m: {k: v for k, v in r.items() if not isinstance(v, dict)}
                            for m, r in report['modes'].items()}
  if mode in ('eval', 'predict', 'all'):
    state, meta = restore_for_eval(exp, state, exp.config.eval.which)
    if mode in ('eval', 'all'):
      split = exp.config.eval.split or 'test'
      summary[split] = evaluate_lib.evaluate_split(
          state, exp.steps, exp.data, exp.config, split=split, meta=meta,
          out_dir=os.path.join(exp.workdir, 'eval'))
    if mode in ('predict', 'all'):
      summary['predict_dir'] = predict_lib.predict(
          state, exp.steps, exp.data, exp.config, exp.workdir,
          curves_png=os.path.join(exp.workdir, curves.CURVES_FILE))
  return summary
