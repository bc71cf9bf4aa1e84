"""Assembles a run from its config: data, tokenizers, model, optimizer, TrainState, steps.

The same functions serve `run.py`, the benchmarks and research code:

  exp, state = experiment.create(config, 'runs/demo')  # data, model, jitted steps; state
  state, meta = exp.checkpoints.restore('best', state)
  out = exp.steps.evaluate(state, sharding.global_batch(batch, exp.steps.mesh))

`resolve_config` fills the fields a run derives (dataset location for the synthetic default,
vocabulary sizes of trained tokenizers) into an unlocked copy, which is what checkpoints
store.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from cers_jax import sharding
from cers_jax.convert.assign import WeightLoadError
from cers_jax.data import cache as cache_lib
from cers_jax.data import pipeline
from cers_jax.data import prepare as prepare_lib
from cers_jax.data import tokenize
from cers_jax.errors import ConfigError, WorkdirError
from cers_jax.models import cers as cers_model
from cers_jax.retrieval import embed
from cers_jax.retrieval import pool as kp
from cers_jax.training import checkpoints as checkpointing
from cers_jax.training import steps as ts
from cers_jax.training.state import TrainState, create_train_state, empty_tables

SPLITS = ('train_labeled', 'train_unlabeled', 'val', 'test')


@dataclasses.dataclass
class Data:
  """A prepared dataset: the uint8 cache, split rows and token arrays of every row."""

  cache: cache_lib.Cache
  rows: dict[str, np.ndarray]  # split name -> cache rows (int32)
  tokens: dict[str, np.ndarray]  # text_ids/text_mask (N,L); cot_{mask,no_mask}_{ids,mask}
  text_tokenizer: Any
  cot_tokenizer: Any

  @property
  def num_samples(self) -> int:
    return len(self.cache.samples)

  def arrays(self) -> pipeline.PipelineArrays:
    """What the input pipeline indexes by cache row."""
    return pipeline.PipelineArrays(
        images=self.cache.images, masks=self.cache.masks, text_ids=self.tokens['text_ids'],
        text_mask=self.tokens['text_mask'], has_mask=self.cache.has_mask)


def resolve_config(config: ml_collections.ConfigDict, workdir: str):
  """An unlocked copy of `config` with the run's derived fields filled in."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.synthetic.num_images > 0 and not config.data.root:
    root = os.path.join(workdir, 'synthetic')
    config.data.root = root
    config.data.text_csv = config.data.text_csv or os.path.join(root, 'text.csv')
    config.data.cot_mask_csv = config.data.cot_mask_csv or os.path.join(
        root, 'cot_output_mask.csv')
    config.data.cot_no_mask_csv = config.data.cot_no_mask_csv or os.path.join(
        root, 'cot_output_no_mask.csv')
    # The generator's latent lesion kind: the retrieval report's group label.
    config.eval.label_csv = config.eval.label_csv or os.path.join(root, 'attributes.csv')
  if not config.data.cache_dir:
    config.data.cache_dir = os.path.join(workdir, 'data')
  return config


def _generate_synthetic_if_needed(config) -> None:
  if config.synthetic.num_images <= 0:
    return
  from cers_jax.data import synthetic  # Only the synthetic default needs it.
  marker = os.path.join(config.data.root, 'text.csv')
  if os.path.exists(marker):
    return
  logging.info('Generating %d synthetic images into %s', config.synthetic.num_images,
               config.data.root)
  synthetic.generate_synthetic(config.data.root, num_images=config.synthetic.num_images,
                               image_size=config.synthetic.image_size, seed=config.seed)


def _tokenizer(directory: str, trained_dir: str, texts: list[str], vocab_size: int):
  """A pretrained tokenizer when configured, else one trained on the run's own texts."""
  if directory:
    return tokenize.load_tokenizer(directory)
  if os.path.exists(os.path.join(trained_dir, 'tokenizer.json')):
    return tokenize.load_tokenizer(trained_dir)
  logging.info('Training a %d-token WordPiece vocabulary into %s', vocab_size, trained_dir)
  return tokenize.train_wordpiece(texts, vocab_size=vocab_size, out_dir=trained_dir)


def prepare_data(config, workdir: str) -> Data:
  """Validates the dataset, writes/reuses the split manifest and cache, tokenizes texts."""
  _generate_synthetic_if_needed(config)
  prepared = prepare_lib.prepare(config, workdir)
  cache = prepared.cache
  rows = {name: np.asarray(prepared.rows[name], np.int32) for name in SPLITS}
  if len(rows['train_labeled']) == 0:
    raise ConfigError(
        f'The split manifest {os.path.join(config.data.cache_dir, "split.json")} has no '
        'labeled training images: raise --config.data.labeled_fraction.')
  train_rows = np.concatenate([rows['train_labeled'], rows['train_unlabeled']])
  samples = cache.samples
  reports = [samples[r].text or '' for r in train_rows]
  cots = [c for r in train_rows for c in (samples[r].cot_mask, samples[r].cot_no_mask) if c]
  tok_dir = os.path.join(workdir, 'tokenizers')
  text_tok = _tokenizer(config.tokenizer.text_dir, os.path.join(tok_dir, 'text'), reports,
                        config.tokenizer.vocab_size)
  cot_tok = _tokenizer(config.tokenizer.cot_dir, os.path.join(tok_dir, 'cot'),
                       cots + reports, config.tokenizer.vocab_size)
  tokens = {}
  tokens['text_ids'], tokens['text_mask'] = tokenize.encode_texts(
      text_tok, [s.text for s in samples], config.data.max_text_len)
  for kind in ('cot_mask', 'cot_no_mask'):
    tokens[f'{kind}_ids'], tokens[f'{kind}_mask'] = tokenize.encode_texts(
        cot_tok, [getattr(s, kind) for s in samples], config.data.max_cot_len)
  tokens['report_cot_ids'], tokens['report_cot_mask'] = tokenize.encode_texts(
      cot_tok, [s.text for s in samples], config.data.max_cot_len)
  return Data(cache=cache, rows=rows, tokens=tokens, text_tokenizer=text_tok,
              cot_tokenizer=cot_tok)


def prepare_data_once(config, workdir: str) -> Data:
  """`prepare_data` on the main process first (it writes the dataset files), then on the
  others, which find and read what it wrote. One process on one host: just prepare_data.

  If the main process fails (a DataError, say), it reports why; the others wait at the
  barrier until the distributed runtime notices that it is gone.
  """
  if sharding.is_main_process():
    data = prepare_data(config, workdir)
  sharding.sync('cers_jax: data prepared')
  if not sharding.is_main_process():
    data = prepare_data(config, workdir)
  return data


def build_model(model_config, *, seed: int) -> cers_model.CERS:
  """The CERS network, with whatever pretrained weights the config points to."""
  from cers_jax.convert import bert as bert_convert
  from cers_jax.convert import cers_torch
  from cers_jax.convert import convnext as convnext_convert

  model = cers_model.CERS(model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  if model_config.encoder_weights:
    convnext_convert.load_convnext(model.encoder, model_config.encoder_weights)
  if model_config.text.weights:
    bert_convert.load_bert(model.text_encoder, model_config.text.weights)
  if model_config.cot.weights:
    bert_convert.load_bert(model.cot_encoder, model_config.cot.weights)
  elif model_config.cot.pooling == 'cls':
    logging.warning(
        'The CoT BERT is initialised at random and read by its [CLS] token, which hardly '
        'depends on the text: CoT retrieval will not rank (see the retrieval report). Give '
        'pretrained weights (--config.model.cot.weights) or --config.model.cot.pooling=mean.')
  if model_config.checkpoint:
    cers_torch.load_authors_checkpoint(model, model_config.checkpoint)
  return model


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """The learning rate by optimizer step: cosine decay over both stages."""
  return optax.cosine_decay_schedule(config.train.learning_rate, max(total_steps, 1))


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """SGD with momentum and torch-style (coupled) weight decay on a cosine schedule."""
  schedule = make_schedule(config, total_steps)
  return optax.chain(optax.add_decayed_weights(config.train.weight_decay),
                     optax.sgd(schedule, momentum=config.train.momentum))


def steps_per_epoch(config, data: Data) -> tuple[int, int]:
  """(warm-up steps, semi-supervised steps) per epoch; both need at least one batch."""
  batch = config.train.batch_size
  labeled = len(data.rows['train_labeled'])
  if labeled < batch:
    raise ConfigError(
        f'Only {labeled} labeled training images for a batch of {batch}: lower '
        '--config.train.batch_size or raise --config.data.labeled_fraction.')
  unlabeled = len(data.rows['train_unlabeled'])
  semi = config.train.steps_per_epoch or max(labeled, unlabeled) // batch
  return labeled // batch, max(semi, 1)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a run is built from, fixed once created; the TrainState travels separately."""

  config: ml_collections.ConfigDict  # Resolved (unlocked) copy.
  workdir: str
  data: Data
  graphdef: Any
  steps: ts.Steps  # Jitted steps; `steps.mesh` is the data mesh they run on.
  checkpoints: checkpointing.Checkpoints
  warmup_steps_per_epoch: int
  semi_steps_per_epoch: int
  schedule: optax.Schedule  # The learning rate by step (logged with every epoch).


def create(config, workdir: str, *, read_only: bool = False
           ) -> tuple[Experiment, TrainState]:
  """Prepares data, builds the model and returns (experiment, fresh state); restore is
  separate (`exp.checkpoints.restore`). `read_only`: checkpoints are only read (a run that
  evaluates, possibly beside the run that trains in `workdir`)."""
  if config.model.cot.trainable:
    raise ConfigError(
        '--config.model.cot.trainable=True: training computes the CoT BERT features once, '
        'before warm-up (the CoT BERT is frozen), so they would never be trained; leave it '
        'False.')
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = resolve_config(config, workdir)
  data = prepare_data_once(config, workdir)
  with config.unlocked():
    config.model.text.vocab_size = len(data.text_tokenizer)
    config.model.cot.vocab_size = len(data.cot_tokenizer)

  mesh = sharding.make_mesh(config.mesh.data_parallel)
  sharding.check_batch_size(config.train.batch_size, mesh)
  sharding.check_batch_size(config.train.eval_batch_size, mesh, 'train.eval_batch_size')
  warmup_spe, semi_spe = steps_per_epoch(config, data)
  total = (config.train.warmup_epochs * warmup_spe + config.train.epochs * semi_spe)
  tx = make_optimizer(config, total)
  logging.info('Building the model (%d px input; its first build on a machine compiles many '
               'small programs, later ones read them from the compilation cache)...',
               config.data.image_size)
  start = time.perf_counter()
  try:
    model = build_model(config.model, seed=config.seed)
  except WeightLoadError as error:
    if config.model.checkpoint and not config.tokenizer.text_dir and 'word_embeddings' in str(
        error):
      raise WeightLoadError(
          f'{error} The report-text BERT of the checkpoint reads the token ids of its own '
          'tokenizer: give its folder with --config.tokenizer.text_dir.') from error
    raise
  logging.info('Model built in %.1f s: %s parameters.', time.perf_counter() - start,
               f'{cers_model.count_params(model, exclude=()):,}')
  f4_shape = model.f4_shape(config.data.image_size)
  pool = kp.empty_pool(len(data.rows['train_labeled']), f4_shape, embed.embed_dim(config))
  tables = empty_tables(data.num_samples, config.model.cot.hidden_size,
                        embed.embed_dim(config))
  graphdef, state = create_train_state(
      model, tx, text_trainable=config.model.text.trainable, pool=pool, tables=tables,
      rng=jax.random.key(config.seed))
  state = sharding.place_state(state, mesh, shard_pool_rows=config.pool.shard_rows)
  steps = ts.make_steps(graphdef, tx, ts.StepConfig.from_config(config), mesh=mesh,
                        threshold=config.eval.threshold)
  exp = Experiment(config=config, workdir=workdir, data=data, graphdef=graphdef, steps=steps,
                   checkpoints=checkpointing.Checkpoints(workdir, keep=config.checkpoint.keep,
                                                        read_only=read_only),
                   warmup_steps_per_epoch=warmup_spe, semi_steps_per_epoch=semi_spe,
                   schedule=make_schedule(config, total))
  return exp, state


def from_workdir(workdir: str, which: str = 'best') -> tuple[Experiment, TrainState, dict]:
  """A finished (or running) run's experiment and its `which` checkpoint: (exp, state, meta).

  Reads the config the run was trained with (`<workdir>/config.json`), so research code
  needs neither the config file nor its overrides. Its checkpoints are opened read-only,
  so this may run beside the training run; a damaged newest step falls back to the newest
  intact one, with a warning.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise WorkdirError(f'{path} does not exist: {workdir} is not a training workdir (run '
                       '`python run.py --config ... --workdir ...` first).')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  exp, state = create(config, workdir, read_only=True)
  if exp.checkpoints.latest_step(which) is None:
    exp.checkpoints.close()
    raise WorkdirError(f'No {which!r} checkpoint in {os.path.join(workdir, "checkpoints")}.')
  state, meta = exp.checkpoints.restore(which, state)
  return exp, state, meta


def config_json(config) -> str:
  return json.dumps(json.loads(config.to_json_best_effort()), indent=2)
