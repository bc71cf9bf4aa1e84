"""The one pytree that holds everything that evolves during training (docs/design.md, habit 2).

`TrainState` carries the trainable parameters, the frozen ones (the CoT BERT and, when
configured, the report-text BERT), BatchNorm statistics, the module RNG state, the optax
state, the knowledge pool (docs/design.md section 4), the per-sample embedding tables and the step.
Its structure is fixed from initialisation on — the pool and tables are allocated with zeros
before warm-up and filled by returning new arrays — so one `jax.eval_shape` target restores
any checkpoint of a run, whatever stage it was saved in.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cers_jax.retrieval.pool import KnowledgePool


@flax.struct.dataclass
class EmbeddingTables:
  """Per-sample text features, one row per cache row (the batch's `index`).

  The CoT BERT is frozen, so its pooled features (config model.cot.pooling: [CLS] or token
  mean; the `*_cls` names predate the choice) are computed once before warm-up; the unit-norm
  retrieval embeddings once after warm-up (docs/design.md section 12: never per step).
  """

  cot_cls: jax.Array  # (N, H_cot) feature of the CoT a row is aligned with in warm-up.
  query_cls: jax.Array  # (N, H_cot) feature of the CoT a row queries the pool with.
  text_cls: jax.Array  # (N, H_cot) feature of the report text (retrieval mode 'text').
  query_cot: jax.Array  # (N, E) unit-norm CoT embedding used as retrieval query.
  query_text: jax.Array  # (N, E) unit-norm report-text embedding (mode 'text').
  # E: embed_dim, or H_cot when config pool.cot_space='features'.


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # () int32, optimizer steps taken over both stages.
  params: nnx.State  # Trainable nnx.Param leaves.
  frozen: nnx.State  # nnx.Param leaves that are never updated.
  batch_stats: nnx.State  # BatchNorm running statistics.
  rng_state: nnx.State  # Module RNG streams; reseeded every step from `rng`.
  opt_state: optax.OptState
  pool: KnowledgePool
  tables: EmbeddingTables
  rng: jax.Array  # Root key; per-step keys are fold_in(rng, step).


def trainable_filter(text_trainable: bool) -> nnx.filterlib.Filter:
  """Which nnx.Param leaves the optimizer updates.

  The CoT BERT is always frozen (its pooled features are precomputed); the report-text BERT
  is trainable by default, as in the authors' code.
  """
  frozen_paths = [nnx.PathContains('cot_encoder')]
  if not text_trainable:
    frozen_paths.append(nnx.PathContains('text_encoder'))
  return nnx.All(nnx.Param, nnx.Not(nnx.Any(*frozen_paths)))


def split_model(model: nnx.Module, text_trainable: bool):
  """Splits a model into (graphdef, params, frozen, batch_stats, rng_state)."""
  return nnx.split(model, trainable_filter(text_trainable), nnx.Param, nnx.BatchStat, ...)


def merge_model(graphdef, state: TrainState, params=None, *, copy: bool = False):
  """Rebuilds the model from a TrainState (optionally with other params, e.g. under grad).

  `copy=True` is needed inside differentiated functions: BatchNorm writes its statistics
  into the merged module, and without a copy those writes would hit traced leaves of the
  caller's state.
  """
  params = state.params if params is None else params
  return nnx.merge(graphdef, params, state.frozen, state.batch_stats, state.rng_state,
                   copy=copy)


def empty_tables(num_samples: int, cot_hidden: int, embed_dim: int) -> EmbeddingTables:
  zeros = lambda d: jnp.zeros((num_samples, d), jnp.float32)
  return EmbeddingTables(cot_cls=zeros(cot_hidden), query_cls=zeros(cot_hidden),
                         text_cls=zeros(cot_hidden), query_cot=zeros(embed_dim),
                         query_text=zeros(embed_dim))


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, *,
                       text_trainable: bool, pool: KnowledgePool, tables: EmbeddingTables,
                       rng: jax.Array):
  """Returns (graphdef, TrainState) for `model`; the model object is not used afterwards."""
  graphdef, params, frozen, batch_stats, rng_state = split_model(model, text_trainable)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                     batch_stats=batch_stats, rng_state=rng_state,
                     opt_state=tx.init(params), pool=pool, tables=tables, rng=rng)
  return graphdef, state
