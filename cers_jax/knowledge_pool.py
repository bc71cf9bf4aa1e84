"""The knowledge pool and coarse-to-fine retrieval (DESIGN.md section 2; paper Eqs. 2 and 5).

The pool is an immutable pytree of arrays with one row per *labeled* training image:

  feat (N, h, w, C)  raw f4 maps: the values that are retrieved and fused (Eq. 3).
  key  (N, D)        unit-norm retrieval keys, D = h*w*C (flattened `feat`, normalised).
  cot  (N, E)        unit-norm CoT embeddings (fixed after warm-up), or None.
  text (N, E')       unit-norm report-text embeddings (mode 'text'), or None.
  ids  (N,)          int32 global sample indices (the batches' `index` values); -1 marks a
                     padding row (added by `shard_pool`), which is never retrieved.

Retrieval is a pure function of arrays, so it sits inside the jitted train step, vmaps and
shards. `MODE_TABLE` describes every mode in one place (the paper's Table 2 ablation plus the
retrieval report's reference rows): what its first stage compares, what re-ranks the K
first-stage candidates, and what a returned score means.

Defined edge cases (never silent garbage):
  * Queries need not be unit-norm; they are normalised with an eps guard. A zero-norm query
    has all cosines 0 and takes the lowest row indices (top_k's tie rule; -0.0 is folded
    into 0.0 first so it cannot break that rule).
  * Ties in the first stage (every mode) go to the lowest row index; ties in the fine
    stage of 'image+cot' go to the better coarse rank.
  * K > N: K is clipped to N. k larger than the rows available (N, or N - 1 when `exclude`
    is given) or larger than k_coarse: ValueError at trace time, since the decoder needs
    exactly k maps.
  * An empty pool: ValueError when it is built.
  * Self-exclusion: rows whose id equals the query's `exclude` id score -inf before any
    top_k, and excluded or padding candidates are also barred from the fine stage.

Sharding (rows over a mesh axis, `shard_pool`): retrieval is a two-stage top-k. Every
shard scores its own rows under `jax.shard_map` and keeps its local top_k; the candidates
are all-gathered and merged by (score desc, row asc), which is exactly the one-device
result, ties included; the k maps are fetched with a masked local gather + psum. `retrieve`
takes this path by itself when the pool's rows are sharded on an Explicit-typed mesh
(`jax.make_mesh`'s default; the sharding is visible in the array type), and so do the row
reads/writes of `ema_update`/`refresh_rows`. On an Auto-typed mesh the sharding is not in
the type: the plain code is then partitioned by XLA (also exact), and `retrieve_sharded`
forces the explicit two-stage plan.

Updates: `ema_update` is paper Eq. 5 (feat <- m*feat + (1-m)*sg(new); key =
normalise(flatten(feat))). `refresh_rows` is the authors' once-an-epoch rule, kept as an
option: key <- rownorm(beta*key + (1-beta)*flatten(new)), which blends a raw map into a
unit-norm row, so the raw map dominates and the "EMA" is nearly a replacement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import dataclasses
import functools
import math
from typing import Any

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class Mode:
  """How one retrieval mode ranks the pool.

  A signal is 'image' (query f4 vs `key`), 'cot' (query CoT embedding vs `cot`), 'text'
  (query report-text embedding vs `text`), or one of the report-only signals 'random' and
  'mask' (the query's own mask: an oracle), which `retrieve` does not compute.
  """

  first_stage: str | None  # Signal ranking the whole pool; None = no retrieval.
  fine_stage: str | None  # Signal re-ranking the K first-stage candidates, or None.
  score: str  # What a returned score means.
  in_model: bool = True  # Usable as config pool.mode (False: retrieval report only).

  @property
  def signals(self) -> tuple[str, ...]:
    return tuple(s for s in (self.first_stage, self.fine_stage) if s is not None)

  def uses(self, signal: str) -> bool:
    return signal in self.signals


MODE_TABLE = {
    'none': Mode(None, None, 'no retrieval'),
    'image': Mode('image', None, 'cosine of the image features (flattened f4)'),
    'cot': Mode('cot', None, 'cosine of the CoT embeddings'),
    'text': Mode('text', None, 'cosine of the report-text embeddings'),
    'image+cot': Mode('image', 'cot', 'CoT cosine among the top-K image matches'),
    'random': Mode('random', None, 'a uniform random number', in_model=False),
    'oracle': Mode('mask', None, "Dice of the reference's mask with the query's own mask",
                   in_model=False),
}
MODES = tuple(name for name, mode in MODE_TABLE.items() if mode.in_model)
# Pool field and `retrieve` argument of each signal `retrieve` computes.
_POOL_FIELD = {'image': 'key', 'cot': 'cot', 'text': 'text'}
NORM_EPS = 1e-8  # The authors' rownorm eps; also guards zero-norm queries.

Array = jax.Array
P = jax.sharding.PartitionSpec


@flax.struct.dataclass
class KnowledgePool:
  """One row per labeled training image; see the module docstring for the fields."""

  feat: Array  # (N, h, w, C) raw f4 maps.
  key: Array  # (N, h*w*C) unit-norm flattened f4 maps.
  cot: Array | None  # (N, E) unit-norm CoT embeddings.
  text: Array | None  # (N, E') unit-norm report-text embeddings.
  ids: Array  # (N,) int32 global sample ids, -1 for padding rows.

  @property
  def size(self) -> int:
    """Number of rows N (padding rows included)."""
    return self.feat.shape[0]


@flax.struct.dataclass
class Retrieved:
  """What `retrieve` returns for a batch of B queries."""

  feat: Array  # (B, k, h, w, C) retrieved maps, best first.
  rows: Array  # (B, k) int32 pool rows.
  ids: Array  # (B, k) int32 global sample ids of those rows.
  scores: Array  # (B, k) float32 cosines of the final stage.


def _l2_normalise(x: Array, eps: float = NORM_EPS) -> Array:
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
        f'knowledge_pool.build_pool: `{name}` must have shape (N={n}, E), got {x.shape}.')
  return _l2_normalise(x)


def build_pool(feat: Any, cot: Any, text: Any, ids: Any, *,
               feat_dtype: Any = jnp.float32,
               key_dtype: Any = jnp.float32) -> KnowledgePool:
  """Builds a pool from labeled rows; normalises key, cot and text.

  Args:
    feat: (N, h, w, C) raw f4 maps of the labeled training images.
    cot: (N, E) CoT embeddings (need not be unit-norm), or None (modes 'cot' and
      'image+cot' then raise).
    text: (N, E') report-text embeddings, or None (mode 'text' then raises).
    ids: (N,) global sample ids, unique and >= 0.
    feat_dtype: storage dtype of `feat`.
    key_dtype: storage dtype of `key` (bfloat16 halves the memory traffic of retrieval;
      scores are always accumulated in float32).

  Returns:
    A KnowledgePool on the default device.

  Raises:
    ValueError: an empty pool, mismatched shapes, or duplicate/negative ids.
  """
  feat = jnp.asarray(feat)
  if feat.ndim != 4:
    raise ValueError('knowledge_pool.build_pool: `feat` must be (N, h, w, C) f4 maps, '
                     f'got shape {feat.shape}.')
  n = feat.shape[0]
  if n == 0:
    raise ValueError('knowledge_pool.build_pool: the pool is empty; it needs at least one '
                     'labeled training image (check data.labeled_fraction and the split).')
  ids = jnp.asarray(ids, jnp.int32)
  if ids.shape != (n,):
    raise ValueError(f'knowledge_pool.build_pool: `ids` must have shape ({n},), '
                     f'got {ids.shape}.')
  if not isinstance(ids, jax.core.Tracer):
    host_ids = np.asarray(ids)
    if (host_ids < 0).any() or len(np.unique(host_ids)) != n:
      raise ValueError('knowledge_pool.build_pool: `ids` must be unique and >= 0 (one row '
                       'per labeled image); got duplicates or negatives.')
  cot = _table(None if cot is None else jnp.asarray(cot), n, 'cot')
  text = _table(None if text is None else jnp.asarray(text), n, 'text')
  key = _l2_normalise(feat.reshape(n, -1)).astype(key_dtype)
  return KnowledgePool(feat=feat.astype(feat_dtype), key=key, cot=cot, text=text, ids=ids)


def collect_pool(batches: Iterable[Mapping[str, Any]],
                 features_fn: Callable[[Mapping[str, Any]], Any], *,
                 cot_table: Any, text_table: Any,
                 desc: str = 'building knowledge pool',
                 feat_dtype: Any = jnp.float32,
                 key_dtype: Any = jnp.float32) -> KnowledgePool:
  """Runs `features_fn` over batches and builds the pool from the labeled rows only.

  Args:
    batches: dicts with 'index' (B,) int, 'is_labeled' (B,) bool, 'valid' (B,) bool
      (False on padding) plus whatever `features_fn` needs.
    features_fn: batch -> (B, h, w, C) raw f4 maps (numpy or jax).
    cot_table: (N_total, E) CoT embeddings indexed by global sample id, or None.
    text_table: (N_total, E') report-text embeddings indexed by global id, or None.
    desc: progress-bar label.
    feat_dtype: storage dtype of `feat`.
    key_dtype: storage dtype of `key`.

  Returns:
    The KnowledgePool of every valid labeled row, in the order seen.

  Raises:
    ValueError: a batch lacks a required key, a labeled sample appears twice, an id is
      outside the tables, or no labeled row was seen.
  """
  feats, ids = [], []
  for batch in tqdm(batches, desc=desc, unit='batch'):
    missing = [name for name in ('index', 'is_labeled', 'valid') if name not in batch]
    if missing:
      raise ValueError(f'knowledge_pool.collect_pool: batch lacks {missing}; the pool may '
                       'only hold valid labeled rows, so every batch must say which.')
    keep = np.asarray(batch['is_labeled'], bool) & np.asarray(batch['valid'], bool)
    if not keep.any():
      continue
    f = np.asarray(features_fn(batch))
    feats.append(f[keep])
    ids.append(np.asarray(batch['index'], np.int64)[keep])
  if not feats:
    raise ValueError('knowledge_pool.collect_pool: no valid labeled row in the batches; '
                     'pass the labeled training set (the pool is never built from '
                     'unlabeled data).')
  feat = np.concatenate(feats)
  idx = np.concatenate(ids)
  uniq, counts = np.unique(idx, return_counts=True)
  if (counts > 1).any():
    raise ValueError('knowledge_pool.collect_pool: labeled samples seen more than once '
                     f'(e.g. ids {uniq[counts > 1][:5].tolist()}); iterate the labeled set '
                     'exactly once, without repeats or shuffled wrap-around.')

  def gather(table: Any, name: str) -> np.ndarray | None:
    if table is None:
      return None
    table = np.asarray(table)
    if idx.min() < 0 or idx.max() >= table.shape[0]:
      raise ValueError(f'knowledge_pool.collect_pool: `{name}` has {table.shape[0]} rows '
                       f'but sample ids reach {idx.max()}; pass the table of all samples.')
    return table[idx]

  pool = build_pool(feat, gather(cot_table, 'cot_table'), gather(text_table, 'text_table'),
                    idx, feat_dtype=feat_dtype, key_dtype=key_dtype)
  logging.info('knowledge pool: %d labeled rows, feat %s, key %s', pool.size,
               pool.feat.shape, pool.key.dtype)
  return pool


def mode_spec(mode: str, *, report: bool = False) -> Mode:
  """The `Mode` of a name; `report=True` also accepts the report-only modes."""
  spec = MODE_TABLE.get(mode)
  if spec is None or not (spec.in_model or report):
    names = tuple(MODE_TABLE) if report else MODES
    raise ValueError(f'knowledge_pool: unknown retrieval mode {mode!r}; use one of {names} '
                     '(config field pool.mode).')
  return spec


def needs_retrieval(mode: str) -> bool:
  """Whether `mode` retrieves anything (False for 'none'); validates the name."""
  return mode_spec(mode).first_stage is not None


def _check_retrieve_args(pool: KnowledgePool, query_feat: Any, query_cot: Any,
                         query_text: Any, mode: str, k_coarse: int, k: int,
                         exclude: Any) -> None:
  """Trace-time checks shared by `retrieve` and `retrieve_sharded`."""
  if not needs_retrieval(mode):
    raise ValueError("knowledge_pool.retrieve: mode 'none' retrieves nothing; skip the call "
                     'when needs_retrieval(mode) is False.')
  spec = mode_spec(mode)
  n = pool.size
  available = n - (exclude is not None)
  if k < 1 or k > available:
    excluded = ', own row excluded' if exclude is not None else ''
    raise ValueError(f'knowledge_pool.retrieve: k={k} reference cases requested but the pool '
                     f'offers {available} (N={n}{excluded}); lower pool.k or label more '
                     'images.')
  if spec.fine_stage is not None and k_coarse < k:
    raise ValueError(f'knowledge_pool.retrieve: k_coarse={k_coarse} < k={k}; the fine stage '
                     'picks k of the K coarse candidates, so set pool.k_coarse >= pool.k.')
  if spec.uses('image'):
    if query_feat is None or query_feat.shape[1:] != pool.feat.shape[1:]:
      got = None if query_feat is None else query_feat.shape[1:]
      raise ValueError(f'knowledge_pool.retrieve: mode {mode!r} needs query_feat maps shaped '
                       f'like the pool maps {pool.feat.shape[1:]}, got {got}.')
  for name, query, table in (('cot', query_cot, pool.cot), ('text', query_text, pool.text)):
    if not spec.uses(name):
      continue
    if table is None or query is None:
      raise ValueError(f'knowledge_pool.retrieve: mode {mode!r} needs pool.{name} and '
                       f'query_{name}; build the pool with {name} embeddings and pass them.')
    if query.shape[-1] != table.shape[-1]:
      raise ValueError(f'knowledge_pool.retrieve: query_{name} width {query.shape[-1]} != '
                       f'pool.{name} width {table.shape[-1]}.')


def _cosines(query: Array, table: Array, centre: Array | None = None) -> Array:
  """(B, E) raw queries x (N, E) unit-norm rows -> (B, N) float32 cosines.

  With `centre` (E,), both sides are taken relative to it (and the rows re-normalised).
  """
  if centre is not None:
    query = query - centre
    table = _l2_normalise(table - centre)
  q = _l2_normalise(query.reshape(query.shape[0], -1)).astype(table.dtype)
  scores = jnp.einsum('bd,nd->bn', q, table, preferred_element_type=jnp.float32)
  # top_k ranks 0.0 above -0.0; folding them keeps ties on the lowest row index.
  return jnp.where(scores == 0, 0.0, scores)


def _signal(pool: KnowledgePool, signal: str, query_feat: Array | None,
            query_cot: Array | None, query_text: Array | None) -> tuple[Array, Array]:
  """(query, pool table) compared by a signal."""
  query = {'image': query_feat, 'cot': query_cot, 'text': query_text}[signal]
  return query, getattr(pool, _POOL_FIELD[signal])


def _centres(pool: KnowledgePool, mode: str, centre: bool) -> dict[str, Array]:
  """The mean of the real pool rows of each embedding signal `mode` compares ({} if off).

  CoTs written from one template share most of their words, so their embeddings share one
  dominant direction; cosines taken around the pool's mean compare what differs.
  """
  if not centre:
    return {}
  real = (pool.ids >= 0)[:, None]
  count = jnp.maximum(jnp.sum(real), 1).astype(jnp.float32)
  return {signal: jnp.sum(jnp.where(real, getattr(pool, _POOL_FIELD[signal]), 0.0), axis=0,
                          dtype=jnp.float32) / count
          for signal in mode_spec(mode).signals if signal in ('cot', 'text')}


def _first_stage_scores(pool: KnowledgePool, query_feat: Array, query_cot: Array | None,
                        query_text: Array | None, mode: str, exclude: Array | None,
                        centres: dict[str, Array]) -> Array:
  """(B, N) float32 scores of the first stage, -inf on excluded and padding rows."""
  signal = mode_spec(mode).first_stage
  scores = _cosines(*_signal(pool, signal, query_feat, query_cot, query_text),
                    centres.get(signal))
  barred = (pool.ids < 0)[None, :]
  if exclude is not None:
    barred = barred | (pool.ids[None, :] == jnp.asarray(exclude, jnp.int32)[:, None])
  return jnp.where(barred, -jnp.inf, scores)


def _fine_stage(cand_scores: Array, cand_table: Array, query: Array, k: int,
                centre: Array | None = None) -> tuple[Array, Array]:
  """Re-ranks K coarse candidates by cosine; returns (scores, positions) (B, k)."""
  cand_table = cand_table.astype(jnp.float32)
  if centre is not None:
    query = query - centre
    cand_table = _l2_normalise(cand_table - centre)
  q = _l2_normalise(query)
  fine = jnp.einsum('be,bke->bk', q, cand_table, preferred_element_type=jnp.float32)
  fine = jnp.where(fine == 0, 0.0, fine)
  fine = jnp.where(jnp.isneginf(cand_scores), -jnp.inf, fine)
  return jax.lax.top_k(fine, k)


@functools.partial(jax.jit, static_argnames=('mode', 'k_coarse', 'k', 'centre'))
def retrieve(pool: KnowledgePool, query_feat: Array, query_cot: Array | None = None,
             query_text: Array | None = None, *, mode: str, k_coarse: int = 50, k: int = 5,
             exclude: Array | None = None, centre: bool = False) -> Retrieved:
  """Retrieves k reference cases per query (DESIGN.md section 2).

  Args:
    pool: the knowledge pool.
    query_feat: (B, h, w, C) raw f4 maps of the queries (used by 'image', 'image+cot').
    query_cot: (B, E) CoT embeddings of the queries ('cot', 'image+cot'), or None.
    query_text: (B, E') report-text embeddings ('text'), or None.
    mode: 'image' | 'cot' | 'text' | 'image+cot' (static); 'none' raises.
    k_coarse: K, coarse candidates of 'image+cot' (static); clipped to N.
    k: reference cases returned per query (static).
    exclude: (B,) global ids whose pool rows each query may not retrieve (its own), or None.
    centre: compare CoT and text embeddings around the pool's mean row (static; config
      pool.centre_cot); False is the authors' plain cosine.

  Returns:
    Retrieved with feat (B, k, h, w, C) best first, rows/ids (B, k) int32 and float32
    final-stage cosines (B, k).

  Raises:
    ValueError (at trace time): mode 'none' or unknown, k larger than the rows available,
      k_coarse < k, or missing/mismatched query or pool embeddings.
  """
  _check_retrieve_args(pool, query_feat, query_cot, query_text, mode, k_coarse, k, exclude)
  placed = _explicit_row_axis(pool.key)
  if placed is not None:
    return _retrieve_two_stage(pool, query_feat, query_cot, query_text, *placed, mode=mode,
                               k_coarse=k_coarse, k=k, exclude=exclude, centre=centre)
  centres = _centres(pool, mode, centre)
  scores = _first_stage_scores(pool, query_feat, query_cot, query_text, mode, exclude,
                               centres)
  fine_stage = mode_spec(mode).fine_stage
  if fine_stage is not None:
    cand_scores, cand_rows = jax.lax.top_k(scores, min(k_coarse, pool.size))
    query, table = _signal(pool, fine_stage, query_feat, query_cot, query_text)
    scores, pos = _fine_stage(cand_scores, table[cand_rows], query, k,
                              centres.get(fine_stage))
    rows = jnp.take_along_axis(cand_rows, pos, axis=1)
  else:
    scores, rows = jax.lax.top_k(scores, k)
  return Retrieved(feat=pool.feat[rows], rows=rows, ids=pool.ids[rows], scores=scores)


def pool_rows(pool: KnowledgePool, ids: Array) -> Array:
  """(B,) global ids -> (B,) int32 pool rows, -1 where an id is absent (or negative)."""
  ids = _replicated(jnp.asarray(ids, jnp.int32))
  match = (ids[:, None] == pool.ids[None, :]) & (ids[:, None] >= 0)
  return jnp.where(match.any(axis=1), jnp.argmax(match, axis=1), -1).astype(jnp.int32)


def _scatter_targets(rows: Array, n: int) -> Array:
  """Rows to write: -1, out-of-range and all but the last duplicate map to n (dropped)."""
  rows = jnp.asarray(rows, jnp.int32)
  later_duplicate = jnp.triu(rows[:, None] == rows[None, :], k=1).any(axis=1)
  keep = (rows >= 0) & (rows < n) & ~later_duplicate
  return jnp.where(keep, rows, n)


def _take_rows(x: Array, rows: Array) -> Array:
  """x[rows] with rows clipped into range; row-sharded `x` is read shard-locally."""
  placed = _explicit_row_axis(x)
  if placed is None:
    return x[jnp.clip(rows, 0, x.shape[0] - 1)]
  return _sharded_take(x, rows, *placed)


def _set_rows(x: Array, target: Array, values: Array) -> Array:
  """x.at[target].set(values) dropping target == N; row-sharded `x` writes shard-locally."""
  placed = _explicit_row_axis(x)
  if placed is None:
    return x.at[target].set(values, mode='drop')
  return _sharded_set(x, target, values, *placed)


def _write_rows(pool: KnowledgePool, rows: Array, feat: Array, key: Array) -> KnowledgePool:
  target = _scatter_targets(rows, pool.size)
  feat = jax.lax.stop_gradient(feat).astype(pool.feat.dtype)
  key = jax.lax.stop_gradient(key).astype(pool.key.dtype)
  return pool.replace(feat=_set_rows(pool.feat, target, feat),
                      key=_set_rows(pool.key, target, key))


def ema_update(pool: KnowledgePool, rows: Array, new_feat: Array,
               momentum: float | Array) -> KnowledgePool:
  """Paper Eq. 5 for the given rows: feat <- m*feat + (1-m)*sg(new); key = normalise(feat).

  Functional (`.at[].set`), so it runs inside the jitted train step, which returns the new
  pool. Gradients are stopped on everything written.

  Args:
    pool: the knowledge pool.
    rows: (B,) pool rows (from `pool_rows`); -1 (unlabeled samples in a mixed batch) and
      any row outside [0, N) are skipped. When a row appears more than once, the last
      occurrence in the batch wins (deterministically).
    new_feat: (B, h, w, C) the batch's raw f4 maps.
    momentum: m (0.99 in the paper); a Python float or a traced scalar.

  Returns:
    The updated pool (cot, text and ids unchanged).
  """
  rows = _replicated(jnp.asarray(rows, jnp.int32))
  old = _take_rows(pool.feat, rows).astype(jnp.float32)
  new = jax.lax.stop_gradient(new_feat).astype(jnp.float32)
  blended = momentum * old + (1.0 - momentum) * new
  return _write_rows(pool, rows, blended, _l2_normalise(blended.reshape(rows.shape[0], -1)))


def refresh_rows(pool: KnowledgePool, rows: Array, new_feat: Array, beta: float | Array, *,
                 values: str = 'raw') -> KnowledgePool:
  """The authors' once-an-epoch refresh: key <- rownorm(beta*key + (1-beta)*flatten(new)).

  Matches `hybrid_retrieval`'s `out/ema_pool_img` (eps 1e-8). Call it with every labeled
  row after recomputing their f4 maps. Rows follow `ema_update`'s rules (-1 skipped, the
  last duplicate wins).

  Args:
    pool: the knowledge pool.
    rows: (B,) pool rows.
    new_feat: (B, h, w, C) freshly computed raw f4 maps.
    beta: the authors' ema_beta (0.99).
    values: what `feat` (the retrieved values) becomes: 'raw' = `new_feat` (the fresh map,
      which the blend is nearly equal to anyway), or 'key' = the new unit-norm key reshaped
      to (h, w, C), which is exactly what the authors' code hands to the fusion module.

  Returns:
    The refreshed pool.
  """
  if values not in ('raw', 'key'):
    raise ValueError(f"knowledge_pool.refresh_rows: values={values!r}; use 'raw' or 'key'.")
  rows = _replicated(jnp.asarray(rows, jnp.int32))
  old_key = _take_rows(pool.key, rows).astype(jnp.float32)
  new = jax.lax.stop_gradient(new_feat).astype(jnp.float32)
  key = _l2_normalise(beta * old_key + (1.0 - beta) * new.reshape(rows.shape[0], -1))
  feat = new if values == 'raw' else key.reshape(new.shape)
  return _write_rows(pool, rows, feat, key)


# ------------------------------------------------------------------------------------------
# Row-sharded pools.


def shard_pool(pool: KnowledgePool, mesh: jax.sharding.Mesh,
               axis_name: str = 'data') -> KnowledgePool:
  """Pads the rows to a multiple of the mesh axis and shards them over it.

  Padding rows have id -1 and zero arrays; retrieval never returns them, but they do not
  count towards the static "rows available" check, so keep (real rows) > k.

  Args:
    pool: an unsharded pool.
    mesh: the device mesh.
    axis_name: the mesh axis to shard rows over.

  Returns:
    The pool with every field laid out as NamedSharding(mesh, P(axis_name)).
  """
  shards = mesh.shape[axis_name]
  pad = -pool.size % shards

  def place(x: Array | None, fill: Any) -> Array | None:
    if x is None:
      return None
    if pad:
      x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, P(axis_name)))

  return KnowledgePool(feat=place(pool.feat, 0), key=place(pool.key, 0),
                       cot=place(pool.cot, 0), text=place(pool.text, 0),
                       ids=place(pool.ids, -1))


def _explicit_row_axis(x: Array) -> tuple[Any, Any] | None:
  """(abstract mesh, axis) when x's rows are sharded in its type (Explicit mesh), else None.

  Under an Auto-typed mesh shardings are not part of the type, so this returns None and
  XLA's SPMD partitioner handles the plain code (correct, compiler-chosen plan).
  """
  sharding = getattr(jax.typeof(x), 'sharding', None)
  spec = getattr(sharding, 'spec', None)
  if not spec or spec[0] is None:
    return None
  return sharding.mesh, spec[0]


def _num_shards(mesh: Any, axis: Any) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[name] for name in names)


def _replicated(x: Array | None, mesh: Any = None) -> Array | None:
  """x laid out replicated if its type says it is sharded (Explicit mesh), else x as is.

  Batch-sharded queries, rows and ids are gathered this way before they meet the pool.
  """
  if x is None:
    return None
  sharding = getattr(jax.typeof(x), 'sharding', None)
  if not any(entry is not None for entry in getattr(sharding, 'spec', ())):
    return x
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(
      sharding.mesh if mesh is None else mesh, P()))


def _sharded_take(x: Array, rows: Array, mesh: Any, axis: Any) -> Array:
  """x[rows] (rows clipped) for row-sharded x: a masked local gather, then psum."""
  n = x.shape[0]
  local_n = n // _num_shards(mesh, axis)
  rows = _replicated(jnp.clip(rows, 0, n - 1), mesh)

  def local(block, want):
    at = want - jax.lax.axis_index(axis) * local_n
    mine = (at >= 0) & (at < local_n)
    got = block[jnp.clip(at, 0, local_n - 1)]
    # Exact: every row is added to zeros from the shards that do not hold it.
    got = jnp.where(mine.reshape(mine.shape + (1,) * (got.ndim - mine.ndim)), got, 0)
    return jax.lax.psum(got, axis)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P()), out_specs=P())(x, rows)


def _sharded_set(x: Array, target: Array, values: Array, mesh: Any, axis: Any) -> Array:
  """x.at[target].set(values, mode='drop') for row-sharded x, each shard writing its rows."""
  local_n = x.shape[0] // _num_shards(mesh, axis)
  target, values = _replicated(target, mesh), _replicated(values, mesh)

  def local(block, where, new):
    at = where - jax.lax.axis_index(axis) * local_n
    at = jnp.where((at >= 0) & (at < local_n), at, local_n)
    return block.at[at].set(new, mode='drop')

  return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(), P()),
                       out_specs=P(axis))(x, target, values)


def _retrieve_two_stage(pool: KnowledgePool, query_feat: Array, query_cot: Array | None,
                        query_text: Array | None, mesh: Any, axis: Any, *, mode: str,
                        k_coarse: int, k: int, exclude: Array | None,
                        centre: bool = False) -> Retrieved:
  """Per-shard top_k under shard_map, gather candidates, exact global merge."""
  n = pool.size
  shards = _num_shards(mesh, axis)
  if n % shards:
    raise ValueError(f'knowledge_pool.retrieve_sharded: N={n} rows do not split over '
                     f'{shards} shards; place the pool with shard_pool(pool, mesh).')
  local_n = n // shards
  fine_stage = mode_spec(mode).fine_stage
  count = min(k_coarse, n) if fine_stage is not None else k
  local_count = min(count, local_n)
  rows_spec = P(axis)
  pool_spec = KnowledgePool(feat=rows_spec, key=rows_spec,
                            cot=None if pool.cot is None else rows_spec,
                            text=None if pool.text is None else rows_spec, ids=rows_spec)
  queries = tuple(_replicated(x, mesh) for x in (query_feat, query_cot, query_text, exclude))
  # Means over all rows, taken before the rows are split into shards.
  centres = {name: _replicated(c, mesh) for name, c in _centres(pool, mode, centre).items()}

  def local_candidates(shard, qf, qc, qt, excl, local_centres):
    scores = _first_stage_scores(shard, qf, qc, qt, mode, excl, local_centres)
    top, local_rows = jax.lax.top_k(scores, local_count)
    rows = local_rows + jax.lax.axis_index(axis) * local_n
    if fine_stage is None:
      cand_fine = jnp.zeros(top.shape + (0,))
    else:
      cand_fine = getattr(shard, _POOL_FIELD[fine_stage])[local_rows]
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
    return tuple(gather(x) for x in (top, rows.astype(jnp.int32), shard.ids[local_rows],
                                     cand_fine))

  # A tiled all_gather is replicated, which the varying-axes check cannot infer.
  scores, rows, ids, cand_fine = jax.shard_map(
      local_candidates, mesh=mesh, check_vma=False,
      in_specs=(pool_spec,) + tuple(None if x is None else P() for x in queries)
      + ({name: P() for name in centres},),
      out_specs=(P(),) * 4)(pool, *queries, centres)
  # Merge by (score desc, row asc): exactly the single-device top_k order, ties included.
  position = jnp.broadcast_to(jnp.arange(rows.shape[1]), rows.shape)
  neg, rows, position = jax.lax.sort((-scores, rows, position), dimension=1, num_keys=2)
  scores, rows, position = -neg[:, :count], rows[:, :count], position[:, :count]
  ids = jnp.take_along_axis(ids, position, axis=1)
  if fine_stage is not None:
    cand_fine = jnp.take_along_axis(cand_fine, position[..., None], axis=1)
    query = _signal(pool, fine_stage, *queries[:3])[0]
    scores, pos = _fine_stage(scores, cand_fine, query, k, centres.get(fine_stage))
    rows = jnp.take_along_axis(rows, pos, axis=1)
    ids = jnp.take_along_axis(ids, pos, axis=1)
  return Retrieved(feat=_sharded_take(pool.feat, rows, mesh, axis), rows=rows, ids=ids,
                   scores=scores)


@functools.partial(jax.jit, static_argnames=('mesh', 'axis_name', 'mode', 'k_coarse', 'k',
                                             'centre'))
def retrieve_sharded(pool: KnowledgePool, query_feat: Array, query_cot: Array | None = None,
                     query_text: Array | None = None, *, mesh: jax.sharding.Mesh,
                     axis_name: str = 'data', mode: str, k_coarse: int = 50, k: int = 5,
                     exclude: Array | None = None, centre: bool = False) -> Retrieved:
  """`retrieve` with the two-stage top-k forced, for pools on any mesh (see `shard_pool`).

  Every shard scores its own rows against the replicated queries and keeps its local top
  min(K, rows per shard) under `jax.shard_map`; the candidates (scores, global rows, ids
  and, for 'image+cot', their CoT rows) are all-gathered and merged by (score desc, row
  asc), which is exactly the single-device result, ties included. The fine stage runs on
  the merged candidates and the k chosen maps are fetched with one masked gather + psum.

  `retrieve` takes this path by itself when the pool's rows are sharded on an Explicit
  mesh (jax.make_mesh's default); call `retrieve_sharded` to force it on an Auto mesh,
  where `retrieve` would otherwise leave the plan to XLA's SPMD partitioner.

  Args and returns: as `retrieve`, plus `mesh` and `axis_name` (static): the mesh and
  axis the pool's rows are sharded over.
  """
  _check_retrieve_args(pool, query_feat, query_cot, query_text, mode, k_coarse, k, exclude)
  return _retrieve_two_stage(pool, query_feat, query_cot, query_text, mesh, axis_name,
                             mode=mode, k_coarse=k_coarse, k=k, exclude=exclude,
                             centre=centre)
