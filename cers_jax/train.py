"""The training loop: warm-up, pool build, semi-supervised stage (DESIGN.md section 3).

`train_and_evaluate(config, workdir, mode)` is what `run.py` calls. Every stage resumes
from `<workdir>/checkpoints/latest`; a checkpoint is written at the end of every epoch with
the data iterators' state, so a resumed run repeats exactly the batches and random keys an
uninterrupted one would have used.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from cers_jax import evaluate as evaluate_lib
from cers_jax import experiment as experiment_lib
from cers_jax import knowledge_pool as kp
from cers_jax import losses
from cers_jax import predict as predict_lib
from cers_jax import retrieval_report
from cers_jax import sharding
from cers_jax.data import pipeline

MODES = ('prepare', 'warmup', 'train', 'eval', 'retrieval', 'predict', 'all')

INIT, WARMUP, SEMI, DONE = 'init', 'warmup', 'semi', 'done'


class NonFiniteLossError(RuntimeError):
  """A loss became NaN or inf; the last good checkpoint is kept."""


def default_workdir(workdir: str | None, config_file: str) -> str:
  if workdir:
    return workdir
  name = os.path.splitext(os.path.basename(config_file or 'run'))[0]
  return os.path.join('runs', name)


def _fresh_meta() -> dict:
  return dict(stage=INIT, epoch=0, best_dice=-1.0, best_epoch=-1, bad_epochs=0,
              iterators={})


def _padded_row_batches(rows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """(rows padded to batch_size by repeating the last row, number of real rows)."""
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    real = len(chunk)
    yield np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real)]), real


def compute_cls_tables(exp) -> None:
  """Pooled features of the frozen CoT BERT for every row, once per run.

  A labeled training image aligns with, and queries with, its mask-aware CoT; every other
  image queries with the CoT written without the mask (DESIGN.md section 1).
  """
  data, tokens = exp.data, exp.data.tokens
  labeled = np.zeros(data.num_samples, bool)
  labeled[data.rows['train_labeled']] = True
  all_rows = np.arange(data.num_samples, dtype=np.int32)

  def cls_of(prefix: str) -> np.ndarray:
    out = np.zeros((data.num_samples, exp.config.model.cot.hidden_size), np.float32)
    ids, mask = tokens[f'{prefix}_ids'], tokens[f'{prefix}_mask']
    for rows, real in _padded_row_batches(all_rows, exp.config.train.eval_batch_size):
      cls = exp.steps.cot_cls(exp.state, exp.replicated(ids[rows]),
                              exp.replicated(mask[rows]))
      out[rows[:real]] = exp.to_host(cls)[:real]
    return out

  with tqdm(total=3, desc='CoT/text features', leave=False) as bar:
    cot_mask = cls_of('cot_mask'); bar.update()
    cot_no_mask = cls_of('cot_no_mask'); bar.update()
    text = cls_of('report_cot'); bar.update()
  query = np.where(labeled[:, None], cot_mask, cot_no_mask)
  tables = exp.state.tables.replace(cot_cls=exp.replicated(cot_mask),
                                    query_cls=exp.replicated(query),
                                    text_cls=exp.replicated(text))
  exp.state = exp.state.replace(tables=tables)


def _project(exp, cls: jax.Array) -> jax.Array:
  out = []
  cls = exp.to_host(cls)
  rows = np.arange(cls.shape[0], dtype=np.int32)
  for chunk, real in _padded_row_batches(rows, exp.config.train.eval_batch_size):
    out.append(exp.to_host(exp.steps.project(exp.state, exp.replicated(cls[chunk])))[:real])
  return exp.replicated(np.concatenate(out))


def build_pool(exp) -> None:
  """After warm-up: fixed CoT/text embeddings for every row (config pool.cot_space), then
  the labeled pool."""
  tables = exp.state.tables
  tables = tables.replace(query_cot=_project(exp, tables.query_cls),
                          query_text=_project(exp, tables.text_cls))
  exp.state = exp.state.replace(tables=tables)
  batches = _eval_batches(exp, exp.data.rows['train_labeled'], is_labeled=True)
  pool = kp.collect_pool(
      batches, lambda b: exp.to_host(exp.steps.features(exp.state, exp.global_batch(b))),
      cot_table=exp.to_host(tables.query_cot), text_table=exp.to_host(tables.query_text))
  if pool.feat.shape != exp.state.pool.feat.shape:
    raise RuntimeError(f'Pool of shape {pool.feat.shape}, expected '
                       f'{exp.state.pool.feat.shape}: labeled rows were lost.')
  pool = jax.tree.map(lambda new, old: np.asarray(new).astype(old.dtype), pool,
                      exp.state.pool)
  exp.state = exp.state.replace(pool=sharding.place_pool(
      pool, exp.mesh, shard_rows=exp.config.pool.shard_rows))


def refresh_pool(exp) -> None:
  """The authors' once-an-epoch refresh of every labeled row (config pool.update_rule)."""
  rows = exp.data.rows['train_labeled']
  pool = exp.state.pool
  for batch in _eval_batches(exp, rows, is_labeled=True):
    feats = exp.steps.features(exp.state, exp.global_batch(batch))
    pool_rows = kp.pool_rows(pool, exp.replicated(batch['index']))
    pool_rows = jnp.where(exp.replicated(batch['valid']), pool_rows, -1)
    # values='key': the authors hand the unit-norm blended rows to the fusion module.
    pool = kp.refresh_rows(pool, pool_rows, feats, exp.config.pool.momentum, values='key')
  exp.state = exp.state.replace(pool=pool)


def _eval_batches(exp, rows, *, is_labeled: bool = False):
  for batch in pipeline.make_eval_batches(exp.data.arrays(), rows,
                                          batch_size=exp.config.train.eval_batch_size):
    batch = dict(batch)
    batch['is_labeled'] = np.asarray(batch['valid']) & is_labeled
    yield batch


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
    if isinstance(states, dict):  # Written before positions were kept per process.
      states = [states]
    if len(states) != jax.process_count():
      raise RuntimeError(
          f'This checkpoint was written by {len(states)} processes and is resumed by '
          f'{jax.process_count()}: the data iterators cannot be restored. Resume with '
          f'{len(states)} processes, or evaluate it (--mode=eval), which needs no iterators.')
    loaders[name].set_state(states[jax.process_index()])
  return loaders


class _MetricLog:
  """Appends one JSON object per line to <workdir>/metrics.jsonl."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, record: dict) -> None:
    if not sharding.is_main_process():
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def _check_finite(history: list[tuple[int, dict]], stage: str) -> None:
  """Fetches buffered step losses and names the first non-finite one."""
  for step, aux in history:
    loss = float(aux['loss'])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f'{stage} loss is {loss} at step {step}; stopping. The last good checkpoint is '
          'kept in checkpoints/latest: lower --config.train.learning_rate and resume.')


def _run_epoch(exp, stage: str, epoch: int, num_steps: int, step_fn, desc: str) -> dict:
  """Runs `num_steps` steps without waiting on the device between them.

  Step metrics stay on the device; every `log_every` steps the host reads the *previous*
  chunk's values (long finished, so the read does not stall the queue of dispatched steps)
  to check for NaN/inf, accumulate means and refresh the progress bar. The epoch's end
  reads the rest.
  """
  sums: dict[str, float] = {}
  last_loss = float('nan')
  chunk: list[tuple[int, dict]] = []
  previous: list[tuple[int, dict]] = []
  batch_images = exp.config.train.batch_size * (2 if stage == SEMI else 1)
  start = time.perf_counter()

  def read(entries):
    nonlocal last_loss
    # One explicit device-to-host copy per chunk (jax.device_get), never an implicit one.
    values = jax.device_get([aux for _, aux in entries])
    entries = [(step, aux) for (step, _), aux in zip(entries, values)]
    _check_finite(entries, stage)
    for _, aux in entries:
      for key, value in aux.items():
        sums[key] = sums.get(key, 0.0) + float(value)
    if entries:
      last_loss = float(entries[-1][1]['loss'])

  with tqdm(total=num_steps, desc=desc, leave=False, dynamic_ncols=True) as bar:
    first_step = int(jax.device_get(exp.state.step))
    for i in range(num_steps):
      chunk.append((first_step + i, step_fn()))
      if len(chunk) >= exp.config.train.log_every:
        read(previous)
        bar.update(len(previous))
        rate = (i + 1 - len(chunk)) * batch_images / (time.perf_counter() - start)
        bar.set_postfix(loss=f'{last_loss:.4f}', img_s=f'{rate:.1f}')
        previous, chunk = chunk, []
    read(previous + chunk)
    bar.update(len(previous) + len(chunk))
  elapsed = time.perf_counter() - start
  means = {k: v / num_steps for k, v in sums.items()}
  means.update(stage=stage, epoch=epoch, step=int(jax.device_get(exp.state.step)),
               seconds=elapsed, images_per_s=num_steps * batch_images / elapsed)
  return means


def validate(exp) -> dict:
  """Mean val Dice/IoU of both decoders (D_r with retrieval: the CERS result)."""
  summary = evaluate_lib.evaluate_rows(exp, exp.data.rows['val'])
  return {f'val_{k}': v for k, v in summary.items() if k.endswith('_mean')}


def _save(exp, meta: dict, loaders: dict | None, which: str = 'latest') -> None:
  if loaders is not None:
    # Each process reads its own rows: the checkpoint keeps every process's position.
    meta['iterators'] = {name: sharding.gather_json(loader.get_state())
                         for name, loader in loaders.items()}
  exp.checkpoints.save(which, int(exp.state.step), exp.state, meta,
                       experiment_lib.config_json(exp.config))


def run_training(exp, *, until: str = SEMI) -> dict:
  """Runs (or resumes) warm-up and, unless until == 'warmup', the semi-supervised stage."""
  config = exp.config
  log = _MetricLog(exp.workdir)
  meta = _fresh_meta()
  if exp.checkpoints.latest_step() is not None:
    exp.state, meta = exp.checkpoints.restore('latest', exp.state)
    logging.info('Resuming: stage %s, epoch %d, step %d', meta['stage'], meta['epoch'],
                 int(exp.state.step))
  budget = config.train.stop_after_epochs or None

  if meta['stage'] == INIT:
    compute_cls_tables(exp)
    meta.update(stage=WARMUP, epoch=0)
  loaders = _train_loaders(exp, meta)

  def spend_budget() -> bool:
    nonlocal budget
    if budget is None:
      return False
    budget -= 1
    return budget <= 0

  while meta['stage'] == WARMUP and meta['epoch'] < config.train.warmup_epochs:
    epoch = meta['epoch']

    def warmup_fn():
      exp.state, aux = exp.steps.warmup(exp.state,
                                        exp.device_batch(next(loaders['labeled'])))
      return aux

    record = _run_epoch(exp, WARMUP, epoch, exp.warmup_steps_per_epoch, warmup_fn,
                        f'warm-up {epoch + 1}/{config.train.warmup_epochs}')
    log.write(record)
    logging.info('warm-up epoch %d: loss %.4f (%.1f img/s)', epoch + 1, record['loss'],
                 record['images_per_s'])
    meta['epoch'] = epoch + 1
    _save(exp, meta, loaders)
    if spend_budget():
      return meta
  if meta['stage'] == WARMUP:
    build_pool(exp)
    meta.update(stage=SEMI, epoch=0)
    _save(exp, meta, loaders)
    if config.eval.retrieval_report:
      report_retrieval(exp, meta, 'after_warmup')
  if until == WARMUP:
    return meta

  while meta['stage'] == SEMI and meta['epoch'] < config.train.epochs:
    epoch = meta['epoch']
    weight = exp.replicated(np.float32(losses.consistency_weight(
        epoch, consistency=config.train.consistency, rampup=config.train.consistency_rampup)))

    def semi_fn():
      exp.state, aux = exp.steps.semi(exp.state,
                                      exp.device_batch(next(loaders['labeled'])),
                                      exp.device_batch(next(loaders['unlabeled'])), weight)
      return aux

    record = _run_epoch(exp, SEMI, epoch, exp.semi_steps_per_epoch, semi_fn,
                        f'semi {epoch + 1}/{config.train.epochs}')
    if config.pool.update_rule == 'epoch_refresh':
      refresh_pool(exp)
    record.update(validate(exp))
    meta['epoch'] = epoch + 1
    improved = record['val_dice_r_mean'] > meta['best_dice']
    if improved:
      meta.update(best_dice=record['val_dice_r_mean'], best_epoch=epoch + 1, bad_epochs=0)
    else:
      meta['bad_epochs'] += 1
    stop = meta['bad_epochs'] >= config.train.patience
    if stop or meta['epoch'] >= config.train.epochs:
      meta['stage'] = DONE
    record['best_val_dice_r'] = meta['best_dice']
    log.write(record)
    logging.info('semi epoch %d: loss %.4f, val Dice D_r %.4f / D_s %.4f (best %.4f @ %d), '
                 '%.1f img/s', epoch + 1, record['loss'], record['val_dice_r_mean'],
                 record['val_dice_s_mean'], meta['best_dice'], meta['best_epoch'],
                 record['images_per_s'])
    if improved:
      _save(exp, meta, None, which='best')
    _save(exp, meta, loaders)
    if stop:
      logging.info('Early stopping: no better val Dice for %d epochs.',
                   config.train.patience)
    if spend_budget():
      return meta
  if meta['stage'] == SEMI:  # epochs == 0: warm-up only; keep its model as the best.
    meta['stage'] = DONE
    _save(exp, meta, None, which='best')
    _save(exp, meta, loaders)
  return meta


def report_retrieval(exp, meta: dict, name: str) -> dict:
  """The retrieval report of the current state into <workdir>/retrieval[/name]."""
  split = exp.config.eval.split or 'val'
  out_dir = os.path.join(exp.workdir, 'retrieval', name)
  return retrieval_report.write_report(
      exp, split, os.path.normpath(out_dir), stage=meta['stage'], epoch=meta['epoch'],
      step=int(jax.device_get(exp.state.step)))


def retrieval_checkpoint(exp) -> dict:
  """Restores the checkpoint to report on (eval.which); runs warm-up first if the pool is
  not built yet. Returns its meta."""
  meta = run_training(exp, until=WARMUP)
  which = exp.config.eval.which
  if which != 'latest' and exp.checkpoints.latest_step(which) is not None:
    exp.state, meta = exp.checkpoints.restore(which, exp.state)
  return meta


def train_and_evaluate(config, workdir: str, mode: str = 'all') -> dict:
  """The whole job behind run.py; returns a summary dict (also written to the workdir)."""
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; choose one of {MODES}.')
  start = time.perf_counter()
  if mode == 'prepare':
    workdir = os.path.abspath(workdir)
    resolved = experiment_lib.resolve_config(config, workdir)
    data = experiment_lib.prepare_data_once(resolved, workdir)
    return dict(workdir=workdir, mode=mode, cache_dir=resolved.data.cache_dir,
                splits={name: len(rows) for name, rows in data.rows.items()})
  exp = experiment_lib.create(config, workdir)
  summary: dict = dict(workdir=exp.workdir, mode=mode)
  if mode in ('warmup', 'train', 'all'):
    meta = run_training(exp, until=WARMUP if mode == 'warmup' else SEMI)
    summary.update(stage=meta['stage'], best_val_dice_r=meta['best_dice'],
                   best_epoch=meta['best_epoch'])
  if mode == 'retrieval':
    report = report_retrieval(exp, retrieval_checkpoint(exp), '')
    summary['retrieval'] = {m: {k: v for k, v in r.items() if not isinstance(v, dict)}
                            for m, r in report['modes'].items()}
  if mode in ('eval', 'all'):
    split = config.eval.split or 'test'
    summary[split] = evaluate_lib.evaluate_checkpoint(exp, split=split)
  if mode in ('predict', 'all'):
    summary['predict_dir'] = predict_lib.predict(exp)
  summary['seconds'] = time.perf_counter() - start
  if sharding.is_main_process():
    with open(os.path.join(exp.workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  logging.info('Summary: %s', json.dumps(summary, indent=2))
  exp.checkpoints.close()
  return summary
