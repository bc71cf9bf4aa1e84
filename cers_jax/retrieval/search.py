"""Retrieval modes and coarse-to-fine top-k over the knowledge pool (docs/design.md section 5).

`MODE_TABLE` names every mode once: what its first stage compares, what re-ranks the K
first-stage candidates, what a score means. `retrieve` is a pure function of arrays, so it
runs inside the jitted steps; a pool whose rows are sharded over the mesh
(`sharding.place_pool`) is partitioned by XLA, with the same result.

Edge cases: queries are normalised with an eps guard (a zero query scores 0 everywhere and
takes the lowest rows; -0.0 is folded into 0.0 so it cannot break top_k's tie rule). Ties
go to the lowest row in the first stage and to the better coarse rank in the fine stage.
K is clipped to N; k above the rows available, or above K, raises at trace time. Rows
whose id equals the query's `exclude` id, and padding rows (id -1), score -inf.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from cers_jax.retrieval.pool import KnowledgePool, l2_normalise

Array = jax.Array


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

  @property
  def retrieves(self) -> bool:
    """Whether this mode retrieves anything (False for 'none')."""
    return self.first_stage is not None

  def uses(self, signal: str) -> bool:
    return signal in self.signals


MODE_TABLE = {
    'none': Mode(None, None, 'no retrieval'),
    'image': Mode('image', None, 'cosine of the image features (flattened f4)'),
    'cot': Mode('cot', None, 'cosine of the CoT embeddings'),
    'text': Mode('text', None, 'cosine of the report-text embeddings'),
    # Table 2's 'image then text' row: the fine stage reads the report text instead.
    'image+text': Mode('image', 'text', 'report-text cosine among the top-K image matches'),
    'image+cot': Mode('image', 'cot', 'CoT cosine among the top-K image matches'),
    'random': Mode('random', None, 'a uniform random number', in_model=False),
    'oracle': Mode('mask', None, "Dice of the reference's mask with the query's own mask",
                   in_model=False),
}
MODES = tuple(name for name, mode in MODE_TABLE.items() if mode.in_model)
# Pool field and `retrieve` argument of each signal `retrieve` computes.
_POOL_FIELD = {'image': 'key', 'cot': 'cot', 'text': 'text'}


@flax.struct.dataclass
class Retrieved:
  """What `retrieve` returns for a batch of B queries."""

  feat: Array  # (B, k, h, w, C) retrieved maps, best first.
  rows: Array  # (B, k) int32 pool rows.
  ids: Array  # (B, k) int32 global sample ids of those rows.
  scores: Array  # (B, k) float32 cosines of the final stage.


def mode_spec(mode: str, *, report: bool = False) -> Mode:
  """The `Mode` of a name; `report=True` also accepts the report-only modes."""
  spec = MODE_TABLE.get(mode)
  if spec is None or not (spec.in_model or report):
    names = tuple(MODE_TABLE) if report else MODES
    raise ValueError(f'pool.mode: unknown retrieval mode {mode!r}; use one of {names} '
                     '(config field pool.mode).')
  return spec


def needs_retrieval(mode: str) -> bool:
  """Whether `mode` retrieves anything (False for 'none'); validates the name."""
  return mode_spec(mode).retrieves


def _check_retrieve_args(pool: KnowledgePool, query_feat: Any, query_cot: Any,
                         query_text: Any, mode: str, spec: Mode, k_coarse: int, k: int,
                         exclude: Any) -> None:
  """Trace-time checks: every misuse names the config field to change."""
  if not spec.retrieves:
    raise ValueError("retrieve: mode 'none' retrieves nothing; skip the call "
                     'when needs_retrieval(mode) is False.')
  n = pool.size
  available = n - (exclude is not None)
  if k < 1 or k > available:
    excluded = ', own row excluded' if exclude is not None else ''
    raise ValueError(f'retrieve: k={k} reference cases requested but the pool '
                     f'offers {available} (N={n}{excluded}); lower pool.k or label more '
                     'images.')
  if spec.fine_stage is not None and k_coarse < k:
    raise ValueError(f'retrieve: k_coarse={k_coarse} < k={k}; the fine stage '
                     'picks k of the K coarse candidates, so set pool.k_coarse >= pool.k.')
  if spec.uses('image'):
    if query_feat is None or query_feat.shape[1:] != pool.feat.shape[1:]:
      got = None if query_feat is None else query_feat.shape[1:]
      raise ValueError(f'retrieve: mode {mode!r} needs query_feat maps shaped '
                       f'like the pool maps {pool.feat.shape[1:]}, got {got}.')
  for name, query, table in (('cot', query_cot, pool.cot), ('text', query_text, pool.text)):
    if not spec.uses(name):
      continue
    if table is None or query is None:
      raise ValueError(f'retrieve: mode {mode!r} needs pool.{name} and '
                       f'query_{name}; build the pool with {name} embeddings and pass them.')
    if query.shape[-1] != table.shape[-1]:
      raise ValueError(f'retrieve: query_{name} width {query.shape[-1]} != '
                       f'pool.{name} width {table.shape[-1]}.')


def _cosines(query: Array, table: Array, centre: Array | None = None) -> Array:
  """(B, E) raw queries x (N, E) unit-norm rows -> (B, N) float32 cosines.

  With `centre` (E,), both sides are taken relative to it (and the rows re-normalised).
  """
  if centre is not None:
    query = query - centre
    table = l2_normalise(table - centre)
  q = l2_normalise(query.reshape(query.shape[0], -1)).astype(table.dtype)
  scores = jnp.einsum('bd,nd->bn', q, table, preferred_element_type=jnp.float32)
  # top_k ranks 0.0 above -0.0; folding them keeps ties on the lowest row index.
  return jnp.where(scores == 0, 0.0, scores)


def _signal(pool: KnowledgePool, signal: str, query_feat: Array | None,
            query_cot: Array | None, query_text: Array | None) -> tuple[Array, Array]:
  """(query, pool table) compared by a signal."""
  query = {'image': query_feat, 'cot': query_cot, 'text': query_text}[signal]
  return query, getattr(pool, _POOL_FIELD[signal])


def _centres(pool: KnowledgePool, spec: Mode, centre: bool) -> dict[str, Array]:
  """The mean of the real pool rows of each embedding signal `spec` compares ({} if off).

  CoTs written from one template share most of their words, so their embeddings share one
  dominant direction; cosines taken around the pool's mean compare what differs.
  """
  if not centre:
    return {}
  real = (pool.ids >= 0)[:, None]
  count = jnp.maximum(jnp.sum(real), 1).astype(jnp.float32)
  return {signal: jnp.sum(jnp.where(real, getattr(pool, _POOL_FIELD[signal]), 0.0), axis=0,
                          dtype=jnp.float32) / count
          for signal in spec.signals if signal in ('cot', 'text')}


def _first_stage_scores(pool: KnowledgePool, query_feat: Array, query_cot: Array | None,
                        query_text: Array | None, spec: Mode, exclude: Array | None,
                        centres: dict[str, Array]) -> Array:
  """(B, N) float32 scores of the first stage, -inf on excluded and padding rows."""
  signal = spec.first_stage
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
    cand_table = l2_normalise(cand_table - centre)
  q = l2_normalise(query)
  fine = jnp.einsum('be,bke->bk', q, cand_table, preferred_element_type=jnp.float32)
  fine = jnp.where(fine == 0, 0.0, fine)
  fine = jnp.where(jnp.isneginf(cand_scores), -jnp.inf, fine)
  return jax.lax.top_k(fine, k)


@functools.partial(jax.jit, static_argnames=('mode', 'k_coarse', 'k', 'centre'))
def retrieve(pool: KnowledgePool, query_feat: Array, query_cot: Array | None = None,
             query_text: Array | None = None, *, mode: str, k_coarse: int = 50, k: int = 5,
             exclude: Array | None = None, centre: bool = False) -> Retrieved:
  """Retrieves k reference cases per query (docs/design.md section 5).

  Args:
    pool: the knowledge pool.
    query_feat: (B, h, w, C) raw f4 maps of the queries (used by 'image', 'image+text',
      'image+cot').
    query_cot: (B, E) CoT embeddings of the queries ('cot', 'image+cot'), or None.
    query_text: (B, E') report-text embeddings ('text', 'image+text'), or None.
    mode: a name of `MODES` (static); 'none' raises.
    k_coarse: K, coarse candidates of the two-stage modes (static); clipped to N.
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
  spec = mode_spec(mode)  # The only look-up: the helpers below take the Mode.
  _check_retrieve_args(pool, query_feat, query_cot, query_text, mode, spec, k_coarse, k,
                       exclude)
  centres = _centres(pool, spec, centre)
  scores = _first_stage_scores(pool, query_feat, query_cot, query_text, spec, exclude,
                               centres)
  fine_stage = spec.fine_stage
  if fine_stage is not None:
    cand_scores, cand_rows = jax.lax.top_k(scores, min(k_coarse, pool.size))
    query, table = _signal(pool, fine_stage, query_feat, query_cot, query_text)
    scores, pos = _fine_stage(cand_scores, table[cand_rows], query, k,
                              centres.get(fine_stage))
    rows = jnp.take_along_axis(cand_rows, pos, axis=1)
  else:
    scores, rows = jax.lax.top_k(scores, k)
  return Retrieved(feat=pool.feat[rows], rows=rows, ids=pool.ids[rows], scores=scores)

