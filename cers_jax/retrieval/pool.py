"""The knowledge pool: one row per labeled training image, as immutable arrays.

  feat (N, h, w, C)  raw f4 maps: the values retrieved and fused (paper Eq. 3).
  key  (N, D)        unit-norm retrieval keys, D = h*w*C (flattened `feat`, normalised).
  cot  (N, E)        unit-norm CoT embeddings (fixed after warm-up), or None.
  text (N, E')       unit-norm report-text embeddings (mode 'text'), or None.
  ids  (N,)          int32 global sample indices (the batches' `index`); -1: an empty row.

Updates return a new pool, so they run inside the jitted step. `ema_update` is paper Eq. 5
(feat <- m*feat + (1-m)*sg(new); key = normalise(flatten(feat))); `refresh_rows` is the
authors' once-an-epoch rule, key <- rownorm(beta*key + (1-beta)*flatten(new)), which blends
a raw map into a unit-norm row, so the raw map dominates and the "EMA" is nearly a
replacement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

NORM_EPS = 1e-8  # The authors' rownorm eps; also guards zero-norm queries.

Array = jax.Array


@flax.struct.dataclass
class KnowledgePool:
  """One row per labeled training image; see the module docstring for the fields."""

  feat: Array  # (N, h, w, C) raw f4 maps.
  key: Array  # (N, h*w*C) unit-norm flattened f4 maps.
  cot: Array | None  # (N, E) unit-norm CoT embeddings.
  text: Array | None  # (N, E') unit-norm report-text embeddings.
  ids: Array  # (N,) int32 global sample ids, -1 for an empty row.

  @property
  def size(self) -> int:
    return self.feat.shape[0]


def empty_pool(num_rows: int, feature_shape: tuple[int, int, int], embed_dim: int,
               dtype=jnp.float32) -> KnowledgePool:
  """A zero pool of the right shape; filled after warm-up by returning a new one."""
  h, w, c = feature_shape
  return KnowledgePool(
      feat=jnp.zeros((num_rows, h, w, c), dtype),
      key=jnp.zeros((num_rows, h * w * c), dtype),
      cot=jnp.zeros((num_rows, embed_dim), jnp.float32),
      text=jnp.zeros((num_rows, embed_dim), jnp.float32),
      ids=jnp.full((num_rows,), -1, jnp.int32),
  )


def l2_normalise(x: Array, eps: float = NORM_EPS) -> Array:
  """Rows of `x` divided by max(norm, eps), in float32."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)



def _table(x: Any, n: int, name: str) -> Array | None:
  """Validates an optional (N, E) embedding table and row-normalises it."""
  if x is None:
    return None
  if x.ndim != 2 or x.shape[0] != n:
    raise ValueError(
        f'build_pool: `{name}` must have shape (N={n}, E), got {x.shape}.')
  return l2_normalise(x)


def build_pool(feat: Any, cot: Any, text: Any, ids: Any, *,
               feat_dtype: Any = jnp.float32,
               key_dtype: Any = jnp.float32) -> KnowledgePool:
  """A pool of labeled rows: (N, h, w, C) maps, optional (N, E) CoT and text embeddings
  (normalised here) and (N,) unique ids >= 0; raises ValueError on anything else.

  `key_dtype=bfloat16` halves retrieval's memory traffic; scores still accumulate in float32.
  """
  feat = jnp.asarray(feat)
  if feat.ndim != 4:
    raise ValueError('build_pool: `feat` must be (N, h, w, C) f4 maps, '
                     f'got shape {feat.shape}.')
  n = feat.shape[0]
  if n == 0:
    raise ValueError('build_pool: the pool is empty; it needs at least one '
                     'labeled training image (check data.labeled_fraction and the split).')
  ids = jnp.asarray(ids, jnp.int32)
  if ids.shape != (n,):
    raise ValueError(f'build_pool: `ids` must have shape ({n},), '
                     f'got {ids.shape}.')
  if not isinstance(ids, jax.core.Tracer):
    host_ids = np.asarray(ids)
    if (host_ids < 0).any() or len(np.unique(host_ids)) != n:
      raise ValueError('build_pool: `ids` must be unique and >= 0 (one row '
                       'per labeled image); got duplicates or negatives.')
  cot = _table(None if cot is None else jnp.asarray(cot), n, 'cot')
  text = _table(None if text is None else jnp.asarray(text), n, 'text')
  key = l2_normalise(feat.reshape(n, -1)).astype(key_dtype)
  return KnowledgePool(feat=feat.astype(feat_dtype), key=key, cot=cot, text=text, ids=ids)


def collect_pool(batches: Iterable[Mapping[str, Any]],
                 features_fn: Callable[[Mapping[str, Any]], Any], *,
                 cot_table: Any, text_table: Any,
                 desc: str = 'building knowledge pool',
                 feat_dtype: Any = jnp.float32,
                 key_dtype: Any = jnp.float32) -> KnowledgePool:
  """The pool of every valid labeled row of `batches`, in the order seen.

  Batches carry 'index', 'is_labeled' and 'valid' (False on padding) besides what
  `features_fn` (batch -> (B, h, w, C) f4 maps) reads; `cot_table`/`text_table` are indexed
  by global sample id. A labeled row seen twice, an id outside the tables or no labeled row
  at all raise ValueError.
  """
  feats, ids = [], []
  for batch in tqdm(batches, desc=desc, unit='batch'):
    missing = [name for name in ('index', 'is_labeled', 'valid') if name not in batch]
    if missing:
      raise ValueError(f'collect_pool: batch lacks {missing}; the pool may '
                       'only hold valid labeled rows, so every batch must say which.')
    keep = np.asarray(batch['is_labeled'], bool) & np.asarray(batch['valid'], bool)
    if not keep.any():
      continue
    f = np.asarray(features_fn(batch))
    feats.append(f[keep])
    ids.append(np.asarray(batch['index'], np.int64)[keep])
  if not feats:
    raise ValueError('collect_pool: no valid labeled row in the batches; '
                     'pass the labeled training set (the pool is never built from '
                     'unlabeled data).')
  feat = np.concatenate(feats)
  idx = np.concatenate(ids)
  uniq, counts = np.unique(idx, return_counts=True)
  if (counts > 1).any():
    raise ValueError('collect_pool: labeled samples seen more than once '
                     f'(e.g. ids {uniq[counts > 1][:5].tolist()}); iterate the labeled set '
                     'exactly once, without repeats or shuffled wrap-around.')

  def gather(table: Any, name: str) -> np.ndarray | None:
    if table is None:
      return None
    table = np.asarray(table)
    if idx.min() < 0 or idx.max() >= table.shape[0]:
      raise ValueError(f'collect_pool: `{name}` has {table.shape[0]} rows '
                       f'but sample ids reach {idx.max()}; pass the table of all samples.')
    return table[idx]

  pool = build_pool(feat, gather(cot_table, 'cot_table'), gather(text_table, 'text_table'),
                    idx, feat_dtype=feat_dtype, key_dtype=key_dtype)
  logging.info('knowledge pool: %d labeled rows, feat %s, key %s', pool.size,
               pool.feat.shape, pool.key.dtype)
  return pool



def pool_rows(pool: KnowledgePool, ids: Array) -> Array:
  """(B,) global ids -> (B,) int32 pool rows, -1 where an id is absent (or negative)."""
  ids = jnp.asarray(ids, jnp.int32)
  match = (ids[:, None] == pool.ids[None, :]) & (ids[:, None] >= 0)
  return jnp.where(match.any(axis=1), jnp.argmax(match, axis=1), -1).astype(jnp.int32)


def _scatter_targets(rows: Array, n: int) -> Array:
  """Rows to write: -1, out-of-range and all but the last duplicate map to n (dropped)."""
  rows = jnp.asarray(rows, jnp.int32)
  later_duplicate = jnp.triu(rows[:, None] == rows[None, :], k=1).any(axis=1)
  keep = (rows >= 0) & (rows < n) & ~later_duplicate
  return jnp.where(keep, rows, n)


def _take_rows(x: Array, rows: Array) -> Array:
  """x[rows] with rows clipped into range."""
  return x[jnp.clip(rows, 0, x.shape[0] - 1)]


def _set_rows(x: Array, target: Array, values: Array) -> Array:
  """x.at[target].set(values), dropping target == N."""
  return x.at[target].set(values, mode='drop')


def _write_rows(pool: KnowledgePool, rows: Array, feat: Array, key: Array) -> KnowledgePool:
  target = _scatter_targets(rows, pool.size)
  feat = jax.lax.stop_gradient(feat).astype(pool.feat.dtype)
  key = jax.lax.stop_gradient(key).astype(pool.key.dtype)
  return pool.replace(feat=_set_rows(pool.feat, target, feat),
                      key=_set_rows(pool.key, target, key))


def ema_update(pool: KnowledgePool, rows: Array, new_feat: Array,
               momentum: float | Array) -> KnowledgePool:
  """Paper Eq. 5 for `rows`: feat <- m*feat + (1-m)*sg(new); key = normalise(feat).

  `rows` come from `pool_rows`: -1 (unlabeled samples of a mixed batch) and rows outside
  [0, N) are skipped, and of a repeated row the last occurrence wins.
  """
  rows = jnp.asarray(rows, jnp.int32)
  old = _take_rows(pool.feat, rows).astype(jnp.float32)
  new = jax.lax.stop_gradient(new_feat).astype(jnp.float32)
  blended = momentum * old + (1.0 - momentum) * new
  return _write_rows(pool, rows, blended, l2_normalise(blended.reshape(rows.shape[0], -1)))


def refresh_rows(pool: KnowledgePool, rows: Array, new_feat: Array, beta: float | Array, *,
                 values: str = 'raw') -> KnowledgePool:
  """The authors' once-an-epoch refresh: key <- rownorm(beta*key + (1-beta)*flatten(new)).

  Matches `hybrid_retrieval`'s `out/ema_pool_img` (eps 1e-8); rows as in `ema_update`.
  `values`: what `feat` becomes, 'raw' (the fresh map, nearly the blend anyway) or 'key'
  (the unit-norm key as a map: what the authors' code hands to the fusion module).
  """
  if values not in ('raw', 'key'):
    raise ValueError(f"refresh_rows: values={values!r}; use 'raw' or 'key'.")
  rows = jnp.asarray(rows, jnp.int32)
  old_key = _take_rows(pool.key, rows).astype(jnp.float32)
  new = jax.lax.stop_gradient(new_feat).astype(jnp.float32)
  key = l2_normalise(beta * old_key + (1.0 - beta) * new.reshape(rows.shape[0], -1))
  feat = new if values == 'raw' else key.reshape(new.shape)
  return _write_rows(pool, rows, feat, key)


# ------------------------------------------------------------------------------------------
# Row-sharded pools.

