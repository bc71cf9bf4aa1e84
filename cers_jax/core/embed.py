"""Text embeddings and the knowledge pool, computed from a TrainState (docs/design.md sections 3-5).

One place for what training does around warm-up and what prediction does for new images:
pooled features of the frozen CoT BERT, their retrieval embeddings (config pool.cot_space),
and the pool of labeled training images. Every function takes the state and returns arrays
or a new state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cers_jax import sharding
from cers_jax.core.state import TrainState
from cers_jax.core.steps import Steps
from cers_jax.data import pipeline
from cers_jax.data import tokenize
from cers_jax.data.dataset import Data
from cers_jax.retrieval import pool as kp


# pool.cot_source -> the CoT column labeled (pool) rows query with and enter the pool with.
COT_SOURCES = {'mask': 'cot_mask', 'no_mask': 'cot_no_mask'}


def embed_dim(config) -> int:
  """Width of the CoT and text retrieval embeddings (config pool.cot_space)."""
  return (config.model.cot.hidden_size if config.pool.cot_space == 'features'
          else config.model.embed_dim)


def _chunks(count: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """(row indices padded to batch_size, number of real rows) covering range(count)."""
  rows = np.arange(count, dtype=np.int32)
  for start in range(0, count, batch_size):
    chunk = rows[start:start + batch_size]
    yield sharding.pad_rows(chunk, batch_size), len(chunk)


def cot_features(state: TrainState, steps: Steps, ids: np.ndarray, mask: np.ndarray,
                 batch_size: int) -> np.ndarray:
  """Pooled CoT BERT features (n, H) of token rows (config model.cot.pooling)."""
  out = []
  for rows, real in _chunks(len(ids), batch_size):
    features = steps.cot_cls(state, sharding.replicate(ids[rows], steps.mesh),
                             sharding.replicate(mask[rows], steps.mesh))
    out.append(sharding.to_host(features)[:real])
  return np.concatenate(out)


def retrieval_embeddings(state: TrainState, steps: Steps, features: np.ndarray,
                         batch_size: int) -> np.ndarray:
  """Unit-norm retrieval embeddings (n, E) of pooled CoT BERT features."""
  out = []
  for rows, real in _chunks(len(features), batch_size):
    embedded = steps.project(state, sharding.replicate(features[rows], steps.mesh))
    out.append(sharding.to_host(embedded)[:real])
  return np.concatenate(out)


def embed_texts(state: TrainState, steps: Steps, tokenizer, texts: Sequence[str | None],
                config) -> np.ndarray:
  """Retrieval embeddings (n, E) of texts; zero rows where a text is None (not queried)."""
  out = np.zeros((len(texts), embed_dim(config)), np.float32)
  present = [i for i, text in enumerate(texts) if text is not None]
  if not present:
    return out
  ids, mask = tokenize.encode_texts(tokenizer, [texts[i] for i in present],
                                    config.data.max_cot_len)
  batch_size = config.train.eval_batch_size
  features = cot_features(state, steps, ids, mask, batch_size)
  out[present] = retrieval_embeddings(state, steps, features, batch_size)
  return out


def with_text_features(state: TrainState, steps: Steps, data: Data, config) -> TrainState:
  """The state with pooled CoT BERT features of every row (once per run, before warm-up).

  A labeled training image aligns with its mask-aware CoT and, with config pool.cot_source
  'mask' (the authors'), queries and enters the pool with it too; with 'no_mask' it
  queries and enters the pool with the CoT written without the mask, the kind every other
  image queries with (docs/design.md section 3).
  """
  labeled = np.zeros(data.num_samples, bool)
  labeled[data.rows['train_labeled']] = True
  batch_size = config.train.eval_batch_size
  features = {}
  for prefix in tqdm(('cot_mask', 'cot_no_mask', 'report_cot'), desc='CoT/text features',
                     leave=False):
    features[prefix] = cot_features(state, steps, data.tokens[f'{prefix}_ids'],
                                    data.tokens[f'{prefix}_mask'], batch_size)
  pool_cot = features[COT_SOURCES[config.pool.get('cot_source', 'mask')]]
  query = np.where(labeled[:, None], pool_cot, features['cot_no_mask'])
  tables = state.tables.replace(
      **{name: sharding.replicate(value, steps.mesh) for name, value in (
          ('cot_cls', features['cot_mask']), ('query_cls', query),
          ('text_cls', features['report_cot']))})
  return state.replace(tables=tables)


def labeled_batches(data: Data, rows: np.ndarray, batch_size: int):
  """Eval batches of labeled training rows, marked labeled where real (pool build/refresh)."""
  for batch in pipeline.make_eval_batches(data.arrays(), rows, batch_size=batch_size):
    batch = dict(batch)
    batch['is_labeled'] = np.asarray(batch['valid'])
    yield batch


def with_pool(state: TrainState, steps: Steps, data: Data, config) -> TrainState:
  """After warm-up: fixed CoT/text retrieval embeddings of every row, then the labeled pool."""
  batch_size = config.train.eval_batch_size
  query_cot, query_text = (
      retrieval_embeddings(state, steps, sharding.to_host(features), batch_size)
      for features in (state.tables.query_cls, state.tables.text_cls))
  state = state.replace(tables=state.tables.replace(
      query_cot=sharding.replicate(query_cot, steps.mesh),
      query_text=sharding.replicate(query_text, steps.mesh)))

  def features(batch):
    return sharding.host_step(steps.features, state, batch, steps.mesh)

  pool = kp.collect_pool(labeled_batches(data, data.rows['train_labeled'], batch_size),
                         features, cot_table=query_cot, text_table=query_text)
  if pool.feat.shape != state.pool.feat.shape:
    raise RuntimeError(f'Pool of shape {pool.feat.shape}, expected '
                       f'{state.pool.feat.shape}: labeled rows were lost.')
  pool = jax.tree.map(lambda new, old: np.asarray(new).astype(old.dtype), pool, state.pool)
  return state.replace(pool=sharding.place_pool(pool, steps.mesh,
                                                shard_rows=config.pool.shard_rows))


def with_refreshed_pool(state: TrainState, steps: Steps, data: Data, config) -> TrainState:
  """The authors' once-an-epoch refresh of every labeled row (config pool.update_rule)."""
  pool = state.pool
  for batch in labeled_batches(data, data.rows['train_labeled'],
                               config.train.eval_batch_size):
    features = steps.features(state, sharding.global_batch(batch, steps.mesh))
    rows = kp.pool_rows(pool, sharding.replicate(batch['index'], steps.mesh))
    rows = jnp.where(sharding.replicate(batch['valid'], steps.mesh), rows, -1)
    # values='key': the authors hand the unit-norm blended rows to the fusion module.
    pool = kp.refresh_rows(pool, rows, features,
                           config.pool.momentum, values='key')
  return state.replace(pool=pool)
