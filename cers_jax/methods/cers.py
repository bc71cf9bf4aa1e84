"""CERS as a training method (docs/design.md section 9): warm-up, pool build, semi-supervised.

Two stages of the protocol in `cers_jax.core.method`:

  warmup  labeled batches only: DiceCE of both decoders + the image-CoT CLIP loss. Before a
          fresh run's first epoch the frozen CoT BERT's features of every row are computed
          once; after the last, the knowledge pool is built from the warmed-up encoder (and
          the retrieval report written, eval.retrieval_report).
  semi    a labeled and an unlabeled batch per step: retrieval, both decoders, DiceCE +
          the ramped consistency term, the pool's EMA update; validated every epoch
          (model selection on D_r, the retrieval-aware decoder).

The authors' stage recipe by default (docs/design.md section 9): warm-up at a constant
rate; the semi stage from warm-up's best weights (when warm-up validates; the pool is built
from them), with a new optimizer state and a cosine over its own steps, the consistency
ramp spanning its steps, the best checkpoint from its epochs.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from cers_jax import sharding
from cers_jax.convert.assign import WeightLoadError
from cers_jax.core import embed
from cers_jax.core import losses
from cers_jax.core import optim
from cers_jax.core import steps as ts
from cers_jax.core.method import Built, Stage
from cers_jax.core.progress import SEMI, WARMUP
from cers_jax.core.state import TrainState, create_train_state, empty_tables
from cers_jax.data.dataset import Data
from cers_jax.errors import ConfigError
from cers_jax.inference import evaluators
from cers_jax.inference import predict
from cers_jax.methods.budget import steps_per_epoch
from cers_jax.models import cers as cers_model
from cers_jax.retrieval import pool as kp
from cers_jax.retrieval import search
from configs import base as base_config


def _check_importable(model_config) -> None:
  """Refuses the authors' whole checkpoint for a model their weights do not fit."""
  ablated = [f'--config.model.mcam.{part}=False'
             for part in ('coord_attention', 'multi_scale')
             if not model_config.get('mcam', {}).get(part, True)]
  if model_config.get('decoder', 'mcam') != 'mcam':
    ablated.append(f'--config.model.decoder={model_config.decoder}')
  if model_config.checkpoint and ablated:
    raise ConfigError(
        f'--config.model.checkpoint={model_config.checkpoint}: the authors\' weights are '
        f'for the whole MCAM decoder, and {", ".join(ablated)} builds a different one. '
        'Drop the ablation flags to import them, or train the ablated model from scratch.')


def build_model(model_config, *, seed: int) -> cers_model.CERS:
  """The CERS network, with whatever pretrained weights the config points to."""
  from cers_jax.convert import bert as bert_convert
  from cers_jax.convert import cers_torch
  from cers_jax.convert import convnext as convnext_convert

  _check_importable(model_config)
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


def _model(config) -> cers_model.CERS:
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
  return model


def _build_pool(config, data: Data, workdir: str, steps: ts.Steps, state, progress):
  """The pool after warm-up, and its retrieval report (eval.retrieval_report)."""
  state = embed.with_pool(state, steps, data, config)
  if config.eval.retrieval_report:
    context = evaluators.Context(config=config, workdir=workdir, data=data, steps=steps,
                                 heads=predict.Heads())  # CERS's decoders, retrieving.
    evaluators.Retrieval(context).run(state, config.eval.split or 'val',
                                      folder='after_warmup', stage=progress.stage,
                                      epoch=progress.epoch)
  return state


def _changed_pool_build(changes) -> list[str]:
  """The changed settings the CoT tables and the pool are built from (those configs/base.py
  declares 'pool_build'): a run resumed with one builds them again."""
  return [f'{field}: {old!r} -> {new!r}' for field, (old, new) in changes.items()
          if base_config.resume_class(field) == 'pool_build']


def _warmup(config, data: Data, workdir: str, steps: ts.Steps, num_steps: int,
            plain_steps: ts.Steps) -> Stage:
  def epoch_step(epoch):
    return (lambda state, batches: steps.warmup(state, batches['labeled'])), {}

  def start(state):
    return embed.with_text_features(state, steps, data, config)

  def build_pool(state, progress):
    return _build_pool(config, data, workdir, steps, state, progress)

  def resumed(state, progress, changes):
    # The CoT tables hold the pool's CoT rows (pool.cot_source): computed again, so that
    # the pool this warm-up ends with is built from this invocation's. Warm-up itself
    # reads only the mask CoTs (its CLIP loss), which no setting here changes.
    changed = _changed_pool_build(changes)
    if not changed:
      return state
    logging.info('Resumed in warm-up with %s: the CoT tables are computed again.',
                 '; '.join(changed))
    return embed.with_text_features(state, steps, data, config)

  # train.validate_warmup: val Dice after warm-up epochs too (a switch; not the authors'),
  # scored as warm-up trains: the pool is not built yet, so D_r gets no reference stream.
  return Stage(name=WARMUP, epochs=config.train.warmup_epochs, steps_per_epoch=num_steps,
               streams=('labeled',), epoch_step=epoch_step,
               images_per_step=config.train.batch_size, start=start, finish=build_pool,
               resumed=resumed,
               validates=bool(config.train.get('validate_warmup', False)),
               validation_steps=plain_steps)


def consistency_ramp(config, *, warmup_total: int, semi_total: int):
  """lambda by the run's optimizer step, or None for the former epoch-count ramp.

  The authors' lambda(e) = 0.003 exp(-5 (1 - e/200)^2) spans their whole 200-epoch stage.
  Here it spans `train.consistency_rampup_share` of the semi stage's actual steps (1.0:
  theirs), counted per step from the stage's first, so a short stage still ends at nearly
  the full weight (their epoch stairs made smooth). `train.consistency_rampup_share=0`
  keeps the ramp over `train.consistency_rampup` epochs whatever the stage's length.
  """
  share = float(config.train.get('consistency_rampup_share', 0.0))
  if share <= 0:
    return None
  length, peak = share * semi_total, float(config.train.consistency)
  return lambda step: peak * losses.sigmoid_rampup(step - warmup_total, length)


def _semi(config, data: Data, workdir: str, steps: ts.Steps, num_steps: int, *,
          warmup_total: int, start) -> Stage:
  ramp = consistency_ramp(config, warmup_total=warmup_total,
                          semi_total=config.train.epochs * num_steps)
  ramp_at = None if ramp is None else jax.jit(ramp)

  def epoch_step(epoch):
    if ramp_at is not None:
      # On the device from the state's step: no host read, exact across resumed epochs.
      def stepped(state, batches):
        return steps.semi(state, batches['labeled'], batches['unlabeled'],
                          ramp_at(state.step))

      return stepped, {}  # The epoch's mean lambda comes with the step's metrics.
    weight = float(losses.consistency_weight(
        epoch, consistency=config.train.consistency, rampup=config.train.consistency_rampup))
    device_weight = sharding.replicate(np.float32(weight), steps.mesh)

    def step(state, batches):
      return steps.semi(state, batches['labeled'], batches['unlabeled'], device_weight)

    return step, {'consistency_weight': weight}

  def resumed(state, progress, changes):
    # Allowed only before the pool's first retrieving step (training/workdir.py): a fork
    # of a warmed-up run (scripts/ablate.py cot_source) builds its pool again, exactly as
    # the warm-up's end would have under this invocation's settings.
    changed = _changed_pool_build(changes)
    if not changed:
      return state
    if progress.epoch or progress.partial:
      raise RuntimeError(f'{"; ".join(changed)} after semi-supervised steps have retrieved '
                         'from the pool: the resume checks should have refused it.')
    logging.info('Resumed right after warm-up with %s: the CoT tables and the pool are '
                 'built again.', '; '.join(changed))
    state = embed.with_text_features(state, steps, data, config)
    return _build_pool(config, data, workdir, steps, state, progress)

  refresh = None
  if config.pool.update_rule == 'epoch_refresh':
    refresh = lambda state: embed.with_refreshed_pool(state, steps, data, config)  # noqa: E731
  return Stage(name=SEMI, epochs=config.train.epochs, steps_per_epoch=num_steps,
               streams=('labeled', 'unlabeled'), epoch_step=epoch_step,
               images_per_step=2 * config.train.batch_size, validates=True,
               after_epoch=refresh, resumed=resumed, start=start)


@dataclasses.dataclass(frozen=True)
class CERSMethod:
  """CERS: two decoders, D_r (retrieval-aware, the result) and D_s (standard)."""

  name: str = 'cers'
  decoders: tuple[str, ...] = ('r', 's')
  primary: str = 'r'
  stage_names: tuple[str, ...] = (WARMUP, SEMI)
  retrieval_stage: str | None = SEMI

  def check(self, config) -> None:
    optim.check(config)
    optim.recipe(config, self)
    source = config.pool.get('cot_source', 'mask')
    if source not in embed.COT_SOURCES:
      raise ConfigError(f'--config.pool.cot_source={source!r}: choose one of '
                        f'{tuple(embed.COT_SOURCES)}.')
    if config.model.cot.trainable:
      raise ConfigError(
          '--config.model.cot.trainable=True: training computes the CoT BERT features '
          'once, before warm-up (the CoT BERT is frozen), so they would never be trained; '
          'leave it False.')

  def build(self, config, data: Data, workdir: str, mesh) -> Built:
    warmup_spe, semi_spe = steps_per_epoch(config, data)
    warmup_total = config.train.warmup_epochs * warmup_spe
    total = warmup_total + config.train.epochs * semi_spe
    recipe, tx, rate = optim.method_optimizer(config, self, total_steps=total,
                                              warmup_steps=warmup_total)
    model = _model(config)
    f4_shape = model.f4_shape(config.data.image_size)
    pool = kp.empty_pool(len(data.rows['train_labeled']), f4_shape, embed.embed_dim(config))
    tables = empty_tables(data.num_samples, config.model.cot.hidden_size,
                          embed.embed_dim(config))
    graphdef, state = create_train_state(
        model, tx, text_trainable=config.model.text.trainable, pool=pool, tables=tables,
        rng=jax.random.key(config.seed))
    state = sharding.place_state(state, mesh, shard_pool_rows=config.pool.shard_rows)
    step_config = ts.StepConfig.from_config(config)
    steps = ts.make_steps(graphdef, tx, step_config, mesh=mesh,
                          threshold=config.eval.threshold)
    # Warm-up's steps without retrieval (its validation, train.validate_warmup); jitted
    # lazily, so nothing is compiled unless they run.
    plain_steps = ts.make_steps(graphdef, tx, dataclasses.replace(step_config, mode='none'),
                                mesh=mesh, threshold=config.eval.threshold)
    stages = (_warmup(config, data, workdir, steps, warmup_spe, plain_steps),
              _semi(config, data, workdir, steps, semi_spe, warmup_total=warmup_total,
                    # The authors' semi script builds a new SGD (semi_optimizer=fresh).
                    start=optim.semi_start(tx, recipe)))
    return Built(graphdef=graphdef, state=state, steps=steps, schedule=rate,
                 stages=stages)

  def imported_state(self, exp, state: TrainState) -> tuple[TrainState, dict] | None:
    """The authors' imported weights (config model.checkpoint) readied for evaluation.

    Their state dict holds the network only: no knowledge pool, no CoT BERT and no
    alignment projections. The CoT features come from our CoT BERT (model.cot.weights) and
    the pool is built from the labeled training images with the imported encoder, exactly
    as at the end of our warm-up. None without config model.checkpoint.

    `exp`: the run's `training.experiment.Experiment` (config, data, steps, workdir).
    """
    config, data, steps = exp.config, exp.data, exp.steps
    if not config.model.checkpoint:
      return None
    mode = search.mode_spec(config.pool.mode)
    if config.pool.cot_space == 'projection' and (mode.uses('cot') or mode.uses('text')):
      logging.warning(
          "The authors' state dict has no alignment projections, so they are random here "
          'and retrieval mode %r ranks by randomly projected CoTs. Use --config.pool.'
          'cot_space=features (with --config.model.cot.weights) or --config.pool.mode=image.',
          config.pool.mode)
    logging.info("Evaluating the authors' weights from %s (no orbax checkpoint in %s); the "
                 'pool is built from the %d labeled training images.', config.model.checkpoint,
                 exp.workdir, len(data.rows['train_labeled']))
    state = embed.with_text_features(state, steps, data, config)
    state = embed.with_pool(state, steps, data, config)
    return state, dict(stage='imported', epoch=None,
                       checkpoint=os.path.abspath(config.model.checkpoint))


METHOD = CERSMethod()
