"""Pure, jitted steps over a TrainState (docs/design.md sections 9 and 12).

Each step is one XLA program: encoder, text encoder, retrieval, both decoders, losses,
gradients, optimizer and pool update. `make_steps` closes over the model's graph definition
and an immutable `StepConfig` only; everything that changes is an argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cers_jax import metrics as metrics_lib
from cers_jax import sharding
from cers_jax.core import losses
from cers_jax.core.state import EmbeddingTables, TrainState, merge_model
from cers_jax.errors import ConfigError
from cers_jax.models import cers as cers_model
from cers_jax.retrieval import pool as kp
from cers_jax.retrieval import search

Batch = dict[str, jax.Array]
UPDATE_RULES = ('ema', 'epoch_refresh')
COT_SPACES = ('projection', 'features')


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static (compile-time) settings of the steps; hashable, never mutated."""

  mode: str = 'image+cot'  # Retrieval mode (retrieval.search.MODES).
  k_coarse: int = 50
  k: int = 5
  exclude_self: bool = True
  pool_update: str = 'ema'  # 'ema' updates rows inside the step; 'epoch_refresh' does not.
  pool_momentum: float = 0.99
  clip_weight: float = 0.5
  sharpen_temperature: float = 0.1
  cot_space: str = 'projection'  # What CoT/text retrieval compares (COT_SPACES).
  centre_cot: bool = False  # CoT/text cosines around the pool's mean row.
  # `mode` resolved once, here (the steps read it, not the name); not compared or hashed.
  mode_spec: search.Mode = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, 'mode_spec', search.mode_spec(self.mode))

  @classmethod
  def from_config(cls, config) -> 'StepConfig':
    if config.pool.mode not in search.MODES:
      raise ConfigError(f'--config.pool.mode={config.pool.mode!r}: choose one of {search.MODES}.')
    if config.pool.update_rule not in UPDATE_RULES:
      raise ConfigError(f'--config.pool.update_rule={config.pool.update_rule!r}: choose one '
                        f'of {UPDATE_RULES}.')
    if config.pool.cot_space not in COT_SPACES:
      raise ConfigError(f'--config.pool.cot_space={config.pool.cot_space!r}: choose one of '
                        f'{COT_SPACES}.')
    return cls(mode=config.pool.mode, k_coarse=config.pool.k_coarse, k=config.pool.k,
               exclude_self=config.pool.exclude_self, pool_update=config.pool.update_rule,
               pool_momentum=config.pool.momentum, clip_weight=config.train.clip_weight,
               sharpen_temperature=config.train.sharpen_temperature,
               cot_space=config.pool.cot_space, centre_cot=config.pool.centre_cot)


def _step_rng(state: TrainState) -> jax.Array:
  return jax.random.fold_in(state.rng, state.step)


def _training_model(graphdef, state: TrainState, params, rng):
  model = merge_model(graphdef, state, params, copy=True)
  nnx.reseed(model, dropout=rng)
  return model


def _eval_model(graphdef, state: TrainState):
  model = merge_model(graphdef, state)
  return nnx.view(model, deterministic=True, use_running_average=True)


def _new_module_state(model) -> tuple[nnx.State, nnx.State]:
  """BatchNorm statistics and RNG state written by a training forward pass."""
  return nnx.state(model, nnx.BatchStat), nnx.state(model, nnx.RngState)


def _supervised_loss(logits: jax.Array, mask: jax.Array) -> jax.Array:
  return losses.dice_ce_from_logits(logits, mask)


def _retrieve(model_f4: jax.Array, batch: Batch, pool: kp.KnowledgePool,
              tables: EmbeddingTables, cfg: StepConfig) -> search.Retrieved:
  """Retrieval for a batch; query embeddings come from the batch when it carries them
  (images outside the dataset, e.g. prediction) and from the tables otherwise."""
  index = batch['index']
  query_cot = batch['query_cot'] if 'query_cot' in batch else tables.query_cot[index]
  query_text = batch['query_text'] if 'query_text' in batch else tables.query_text[index]
  return search.retrieve(
      pool, jax.lax.stop_gradient(model_f4), query_cot, query_text, mode=cfg.mode,
      k_coarse=cfg.k_coarse, k=cfg.k, exclude=index if cfg.exclude_self else None,
      centre=cfg.centre_cot)


def _apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads,
                     batch_stats, rng_state, **replacements) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       batch_stats=batch_stats, rng_state=rng_state, **replacements)


def warmup_step(state: TrainState, batch: Batch, *, graphdef,
                tx: optax.GradientTransformation, cfg: StepConfig):
  """Labeled-only warm-up: DiceCE(D_r) + DiceCE(D_s) + w * CLIP(image emb, CoT emb).

  No retrieval: D_r's deepest block gets rag=None (docs/design.md section 7).
  """

  def loss_fn(params):
    model = _training_model(graphdef, state, params, _step_rng(state))
    encoded = model.encode(batch['image'], batch['text_ids'], batch['text_mask'])
    logits_r, logits_s = model.decode(encoded, None)
    f4 = encoded.features[-1]
    image_emb = model.image_embedding(f4)
    cot_emb = model.cot_embedding(state.tables.cot_cls[batch['index']])
    logits_per_image = losses.clip_logits(image_emb, cot_emb,
                                          model.alignment.logit_scale[...])
    seg_r = _supervised_loss(logits_r, batch['mask'])
    seg_s = _supervised_loss(logits_s, batch['mask'])
    clip = losses.clip_loss(logits_per_image)
    loss = seg_r + seg_s + cfg.clip_weight * clip
    aux = dict(loss=loss, seg_r=seg_r, seg_s=seg_s, clip=clip)
    return loss, (aux, _new_module_state(model))

  grads, (aux, (batch_stats, rng_state)) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = _apply_gradients(tx, state, grads, batch_stats, rng_state)
  return new_state, aux


def semi_step(state: TrainState, labeled: Batch, unlabeled: Batch,
              consistency_weight: jax.Array, *, graphdef,
              tx: optax.GradientTransformation, cfg: StepConfig):
  """One semi-supervised step: a labeled and an unlabeled batch (docs/design.md section 9).

  The two sub-batches go through separate forward passes so BatchNorm statistics are per
  sub-batch, as in the authors' code. The retrieval query is the f4 of the same encoder pass
  that feeds the decoders. The pool rows of the labeled batch are EMA-updated (Eq. 5) with
  that f4, after retrieval, and the new pool is returned.
  """
  retrieve = cfg.mode_spec.retrieves

  def forward(model, batch):
    encoded = model.encode(batch['image'], batch['text_ids'], batch['text_mask'])
    f4 = encoded.features[-1]
    retrieved = _retrieve(f4, batch, state.pool, state.tables, cfg) if retrieve else None
    logits_r, logits_s = model.decode(encoded, None if retrieved is None else retrieved.feat)
    return logits_r, logits_s, f4

  def consistency(logits_r, logits_s):
    return losses.consistency_loss(jax.nn.sigmoid(logits_r), jax.nn.sigmoid(logits_s),
                                   temperature=cfg.sharpen_temperature)

  def loss_fn(params):
    model = _training_model(graphdef, state, params, _step_rng(state))
    lr_, ls_, f4_l = forward(model, labeled)
    ur_, us_, _ = forward(model, unlabeled)
    seg = _supervised_loss(lr_, labeled['mask']) + _supervised_loss(ls_, labeled['mask'])
    cons = consistency(lr_, ls_) + consistency(ur_, us_)
    loss = seg + consistency_weight * cons
    # The raw term is large early on (thousands) and is multiplied by a weight ramping up
    # from ~0; both are logged so neither alone is mistaken for the loss.
    aux = dict(loss=loss, seg=seg, consistency_raw=cons,
               consistency_weighted=consistency_weight * cons,
               consistency_weight=consistency_weight,
               # Targets on the unlabeled batch: each decoder's for the other's.
               **losses.unsup_diagnostics(
                   loss=loss, unsup_weighted=consistency_weight * cons,
                   weight=consistency_weight,
                   pseudo=jax.nn.sigmoid(jnp.concatenate([ur_, us_])),
                   labeled_mask=labeled['mask']))
    return loss, (aux, f4_l, _new_module_state(model))

  grads, (aux, f4_l, (batch_stats, rng_state)) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  pool = state.pool
  if cfg.pool_update == 'ema' and retrieve:
    rows = kp.pool_rows(pool, labeled['index'])
    pool = kp.ema_update(pool, rows, f4_l, cfg.pool_momentum)
  new_state = _apply_gradients(tx, state, grads, batch_stats, rng_state, pool=pool)
  return new_state, aux


def eval_step(state: TrainState, batch: Batch, *, graphdef, cfg: StepConfig,
              threshold: float = 0.5):
  """Eval-mode forward: probabilities, per-image Dice/IoU and the retrieved pool rows.

  Val/test images are never in the pool, so no self-exclusion is needed; it is still applied
  when configured, which is harmless for ids absent from the pool.
  """
  model = _eval_model(graphdef, state)
  encoded = model.encode(batch['image'], batch['text_ids'], batch['text_mask'])
  f4 = encoded.features[-1]
  retrieved = None
  if cfg.mode_spec.retrieves:
    retrieved = _retrieve(f4, batch, state.pool, state.tables, cfg)
  logits_r, logits_s = model.decode(encoded, None if retrieved is None else retrieved.feat)
  prob_r, prob_s = jax.nn.sigmoid(logits_r), jax.nn.sigmoid(logits_s)
  out = dict(prob_r=prob_r, prob_s=prob_s)
  if 'mask' in batch:
    out['dice_r'], out['iou_r'] = metrics_lib.dice_iou_per_image(prob_r, batch['mask'],
                                                                 threshold)
    out['dice_s'], out['iou_s'] = metrics_lib.dice_iou_per_image(prob_s, batch['mask'],
                                                                 threshold)
  if retrieved is not None:
    out['retrieved_ids'] = retrieved.ids
    out['retrieved_scores'] = retrieved.scores
  return out


def features_step(state: TrainState, batch: Batch, *, graphdef) -> jax.Array:
  """Eval-mode f4 maps (B, h, w, C): what the pool stores for a labeled image."""
  model = _eval_model(graphdef, state)
  encoded = model.encode(batch['image'], batch['text_ids'], batch['text_mask'])
  return encoded.features[-1]


def cot_cls_step(state: TrainState, ids: jax.Array, mask: jax.Array, *, graphdef):
  """Pooled features of the frozen CoT BERT (config model.cot.pooling) for token ids."""
  return _eval_model(graphdef, state).cot_features(ids, mask)


def project_step(state: TrainState, features: jax.Array, *, graphdef,
                 cot_space: str = 'projection') -> jax.Array:
  """Unit-norm retrieval embeddings of pooled CoT BERT features (after warm-up).

  'projection': the CLIP-trained alignment projection (the authors'); 'features': the
  features themselves, which keeps what the CoT says even where the image cannot show it.
  """
  if cot_space == 'features':
    return cers_model.unit_rows(features)
  return _eval_model(graphdef, state).cot_embedding(features)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted step functions of one model; what run.py and research code call."""

  mesh: jax.sharding.Mesh  # The data mesh; batches are placed on it (cers_jax.sharding).
  warmup: Callable[..., Any]
  semi: Callable[..., Any]
  evaluate: Callable[..., Any]
  features: Callable[..., Any]
  cot_cls: Callable[..., Any]
  project: Callable[..., Any]


def make_steps(graphdef, tx: optax.GradientTransformation, cfg: StepConfig, *,
               mesh: jax.sharding.Mesh | None = None, threshold: float = 0.5) -> Steps:
  """Jits every step once; train steps donate the incoming state's buffers.

  `mesh`: the data mesh batches are placed on (default: every device).
  """
  return Steps(
      mesh=sharding.make_mesh() if mesh is None else mesh,
      warmup=jax.jit(lambda s, b: warmup_step(s, b, graphdef=graphdef, tx=tx, cfg=cfg),
                     donate_argnums=0),
      semi=jax.jit(lambda s, l, u, w: semi_step(s, l, u, w, graphdef=graphdef, tx=tx,
                                                 cfg=cfg), donate_argnums=0),
      evaluate=jax.jit(lambda s, b: eval_step(s, b, graphdef=graphdef, cfg=cfg,
                                              threshold=threshold)),
      features=jax.jit(lambda s, b: features_step(s, b, graphdef=graphdef)),
      cot_cls=jax.jit(lambda s, i, m: cot_cls_step(s, i, m, graphdef=graphdef)),
      project=jax.jit(lambda s, c: project_step(s, c, graphdef=graphdef,
                                                cot_space=cfg.cot_space)),
  )
