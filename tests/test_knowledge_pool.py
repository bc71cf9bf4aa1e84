"""Tests for cers_jax.retrieval.pool (docs/design.md section 4): fixture, numpy reference, edges."""

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from cers_jax.retrieval import pool as kp
from cers_jax.retrieval import search

FIXTURE = __file__.rsplit('/', 1)[0] + '/fixtures/hybrid_retrieval.npz'
MAP = (2, 3, 4)  # Tiny (h, w, C) f4 maps.
RETRIEVING_MODES = ('image', 'cot', 'text', 'image+text', 'image+cot')


# ------------------------------------------------------------------------------------------
# numpy reference


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _around_mean(table, query, centre):
  """Unit rows and queries, taken around the mean unit row when `centre`."""
  table, query = _unit(table), np.asarray(query, np.float64)
  if not centre:
    return table, _unit(query)
  mean = table.mean(axis=0)
  return _unit(table - mean), _unit(query - mean)


def reference_retrieve(feat, cot, text, ids, qf, qc, qt, *, mode, k_coarse, k, exclude=None,
                       key_dtype=np.float32, centre=False):
  """Brute force: stable argsort, lowest row first on ties (float64 cosines)."""
  n = feat.shape[0]
  key = _unit(feat.reshape(n, -1)).astype(key_dtype).astype(np.float64)
  q = _unit(qf.reshape(qf.shape[0], -1)).astype(key_dtype).astype(np.float64)
  signals = {'image': (key, q), 'cot': _around_mean(cot, qc, centre),
             'text': _around_mean(text, qt, centre)}
  first, _, fine_signal = mode.partition('+')
  table, query = signals[first]
  scores = query @ table.T
  if exclude is not None:
    scores[ids[None, :] == np.asarray(exclude)[:, None]] = -np.inf
  order = np.argsort(-scores, axis=1, kind='stable')
  if not fine_signal:
    rows = order[:, :k]
    return rows, np.take_along_axis(scores, rows, 1)
  cand = order[:, :min(k_coarse, n)]
  fine_table, fine_query = signals[fine_signal]
  fine = np.einsum('bke,be->bk', fine_table[cand], fine_query)
  fine[np.isneginf(np.take_along_axis(scores, cand, 1))] = -np.inf
  pos = np.argsort(-fine, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(cand, pos, 1), np.take_along_axis(fine, pos, 1)


def random_case(seed, n=37, b=6, e=8, e_text=5):
  rng = np.random.default_rng(seed)
  feat = rng.normal(size=(n,) + MAP).astype(np.float32)
  cot = rng.normal(size=(n, e)).astype(np.float32)
  text = rng.normal(size=(n, e_text)).astype(np.float32)
  ids = rng.permutation(1000)[:n].astype(np.int32)
  qf = (3.0 * rng.normal(size=(b,) + MAP)).astype(np.float32)
  qc = rng.normal(size=(b, e)).astype(np.float32)
  qt = rng.normal(size=(b, e_text)).astype(np.float32)
  # Half the queries are pool members (labeled images), half are not.
  exclude = np.concatenate([ids[:b // 2], 2000 + np.arange(b - b // 2)]).astype(np.int32)
  qf[:b // 2] = feat[:b // 2] + 0.1 * qf[:b // 2]
  return feat, cot, text, ids, qf, qc, qt, exclude


def assert_matches_reference(out, case, *, mode, k_coarse, k, exclude, key_dtype=np.float32,
                             pool_feat=None, centre=False, score_atol=1e-6):
  feat, cot, text, ids, qf, qc, qt, _ = case
  rows, scores = reference_retrieve(feat, cot, text, ids, qf, qc, qt, mode=mode,
                                    k_coarse=k_coarse, k=k, exclude=exclude,
                                    key_dtype=key_dtype, centre=centre)
  np.testing.assert_array_equal(np.asarray(out.rows), rows)
  np.testing.assert_array_equal(np.asarray(out.ids), ids[rows])
  np.testing.assert_allclose(np.asarray(out.scores), scores, rtol=1e-5, atol=score_atol)
  expected_feat = feat if pool_feat is None else pool_feat
  np.testing.assert_array_equal(np.asarray(out.feat), expected_feat[rows])


# ------------------------------------------------------------------------------------------
# the authors' fixture


def test_hybrid_retrieval_fixture_indices_and_rows():
  z = np.load(FIXTURE)
  pool_img, q_img = z['in/pool_img'], z['in/q_img']
  # Their pool rows are both the keys and the retrieved values (unit-norm rows).
  pool = kp.KnowledgePool(feat=jnp.asarray(pool_img.reshape(-1, 4, 4, 3)),
                          key=jnp.asarray(pool_img), cot=jnp.asarray(z['in/pool_cot']),
                          text=None, ids=jnp.arange(pool_img.shape[0], dtype=jnp.int32))
  out = search.retrieve(pool, q_img.reshape(-1, 4, 4, 3), z['in/q_cot'], mode='image+cot',
                    k_coarse=10, k=3)
  np.testing.assert_array_equal(np.asarray(out.rows), z['out/indices'])
  np.testing.assert_array_equal(np.asarray(out.feat).reshape(z['out/retrieved'].shape),
                                z['out/retrieved'])
  # Their L2 search of raw queries against unit-norm rows ranks like our cosine.
  l2 = ((q_img[:, None, :] - pool_img[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.argsort(l2, 1)[:, :10],
                                np.argsort(-(q_img @ pool_img.T), 1)[:, :10])


def test_hybrid_retrieval_fixture_authors_refresh():
  z = np.load(FIXTURE)
  pool_img = z['in/pool_img']
  n = pool_img.shape[0]
  pool = kp.KnowledgePool(feat=jnp.asarray(pool_img.reshape(n, 4, 4, 3)),
                          key=jnp.asarray(pool_img), cot=None, text=None,
                          ids=jnp.arange(n, dtype=jnp.int32))
  new = z['in/new_img'].reshape(n, 4, 4, 3)
  out = kp.refresh_rows(pool, jnp.arange(n), new, 0.99)
  np.testing.assert_allclose(np.asarray(out.key), z['out/ema_pool_img'], rtol=0, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(out.feat), new)
  as_key = kp.refresh_rows(pool, jnp.arange(n), new, 0.99, values='key')
  np.testing.assert_array_equal(np.asarray(as_key.feat).reshape(n, -1), np.asarray(as_key.key))


# ------------------------------------------------------------------------------------------
# numpy reference on random pools


@pytest.mark.parametrize('mode', RETRIEVING_MODES)
@pytest.mark.parametrize('self_exclusion', [False, True])
def test_matches_numpy_reference(mode, self_exclusion):
  case = random_case(seed=RETRIEVING_MODES.index(mode))
  feat, cot, text, ids, qf, qc, qt, exclude = case
  exclude = exclude if self_exclusion else None
  pool = kp.build_pool(feat, cot, text, ids)
  out = search.retrieve(pool, qf, qc, qt, mode=mode, k_coarse=9, k=4, exclude=exclude)
  assert out.feat.shape == (6, 4) + MAP and out.rows.dtype == jnp.int32
  assert out.scores.dtype == jnp.float32
  assert_matches_reference(out, case, mode=mode, k_coarse=9, k=4, exclude=exclude)
  if self_exclusion:
    assert not (np.asarray(out.ids) == exclude[:, None]).any()
  elif mode == 'image':
    # Labeled queries (near copies of rows 0..2) find themselves without exclusion.
    assert (np.asarray(out.rows)[:3, 0] == np.arange(3)).all()


@pytest.mark.parametrize('mode', RETRIEVING_MODES)
def test_centred_cosines_match_numpy_reference(mode):
  case = random_case(seed=11)
  feat, cot, text, ids, qf, qc, qt, exclude = case
  # A shared direction dominates every embedding, as in CoTs written from one template.
  cot, qc = cot + 6.0, qc + 6.0
  text, qt = text + 6.0, qt + 6.0
  case = (feat, cot, text, ids, qf, qc, qt, exclude)
  pool = kp.build_pool(feat, cot, text, ids)
  out = search.retrieve(pool, qf, qc, qt, mode=mode, k_coarse=9, k=4, exclude=exclude, centre=True)
  # Subtracting the shared direction cancels most of each float32 row: 1e-5 absolute.
  assert_matches_reference(out, case, mode=mode, k_coarse=9, k=4, exclude=exclude, centre=True,
                           score_atol=1e-5)
  plain = search.retrieve(pool, qf, qc, qt, mode=mode, k_coarse=9, k=4, exclude=exclude)
  if mode != 'image':
    # Around the mean the scores spread out and the ranking changes.
    assert np.ptp(np.asarray(out.scores)) > 5 * np.ptp(np.asarray(plain.scores))
    assert not np.array_equal(np.asarray(out.rows), np.asarray(plain.rows))
  else:
    np.testing.assert_array_equal(np.asarray(out.rows), np.asarray(plain.rows))


def test_centring_ignores_padding_rows():
  case = random_case(seed=12, n=10)
  feat, cot, text, ids, qf, qc, qt, exclude = case
  pool = kp.build_pool(feat, cot, text, ids)
  padded = pool.replace(**{name: np.concatenate([np.asarray(getattr(pool, name)),
                                                 np.zeros((3,) + getattr(pool, name).shape[1:],
                                                          getattr(pool, name).dtype)])
                           for name in ('feat', 'key', 'cot', 'text')},
                        ids=np.concatenate([np.asarray(pool.ids), -np.ones(3, np.int32)]))
  for mode in ('cot', 'image+cot'):
    want = search.retrieve(pool, qf, qc, qt, mode=mode, k_coarse=9, k=4, centre=True)
    got = search.retrieve(padded, qf, qc, qt, mode=mode, k_coarse=9, k=4, centre=True)
    np.testing.assert_array_equal(np.asarray(got.rows), np.asarray(want.rows))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), rtol=1e-6)


@pytest.mark.parametrize('mode', ['image', 'image+cot'])
def test_bfloat16_keys_score_in_float32(mode):
  case = random_case(seed=7)
  feat, cot, text, ids, qf, qc, qt, exclude = case
  pool = kp.build_pool(feat, cot, text, ids, key_dtype=jnp.bfloat16)
  assert pool.key.dtype == jnp.bfloat16
  out = search.retrieve(pool, qf, qc, mode=mode, k_coarse=9, k=4, exclude=exclude)
  assert out.scores.dtype == jnp.float32
  assert_matches_reference(out, case, mode=mode, k_coarse=9, k=4, exclude=exclude,
                           key_dtype=ml_dtypes.bfloat16)


def test_k_coarse_larger_than_pool_is_clipped():
  case = random_case(seed=3, n=8)
  feat, cot, text, ids, qf, qc, qt, exclude = case
  pool = kp.build_pool(feat, cot, text, ids)
  for excl in (None, exclude):
    out = search.retrieve(pool, qf, qc, mode='image+cot', k_coarse=50, k=5, exclude=excl)
    assert_matches_reference(out, case, mode='image+cot', k_coarse=50, k=5, exclude=excl)
  # K = N with exclusion: the excluded row is a candidate but must not win the fine stage.
  out = search.retrieve(pool, qf, qc, mode='image+cot', k_coarse=50, k=7, exclude=exclude)
  assert np.isfinite(np.asarray(out.scores)).all()
  assert not (np.asarray(out.ids) == exclude[:, None]).any()


# ------------------------------------------------------------------------------------------
# ties and degenerate queries


def test_ties_go_to_the_lowest_row_and_zero_query_is_defined():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(4,) + MAP).astype(np.float32)
  # Rows 1, 3 and 6 are the same map (at different scales: same unit key).
  feat = np.stack([base[0], base[1], base[2], 2 * base[1], base[3], -base[1], 0.5 * base[1]])
  ids = np.arange(10, 17, dtype=np.int32)
  pool = kp.build_pool(feat, rng.normal(size=(7, 3)), None, ids)
  query = np.stack([base[1], np.zeros(MAP, np.float32)])
  out = search.retrieve(pool, query, mode='image', k=3)
  np.testing.assert_array_equal(np.asarray(out.rows)[0], [1, 3, 6])
  # A zero-norm query: every cosine is 0, so top_k's rule picks rows 0, 1, 2.
  np.testing.assert_array_equal(np.asarray(out.rows)[1], [0, 1, 2])
  np.testing.assert_array_equal(np.asarray(out.scores)[1], [0, 0, 0])
  assert np.isfinite(np.asarray(out.scores)).all()
  fourth = np.asarray(search.retrieve(pool, query, mode='image', k=4).rows)[0, 3]
  excluded = search.retrieve(pool, query, mode='image', k=3, exclude=np.array([11, 10]))
  np.testing.assert_array_equal(np.asarray(excluded.rows), [[3, 6, fourth], [1, 2, 3]])


def test_fine_stage_ties_keep_coarse_rank():
  rng = np.random.default_rng(1)
  feat = rng.normal(size=(6,) + MAP).astype(np.float32)
  cot = np.tile(np.array([[1.0, 0.0]], np.float32), (6, 1))  # every CoT identical
  pool = kp.build_pool(feat, cot, None, np.arange(6))
  out = search.retrieve(pool, feat[4:5] + 0.01, np.ones((1, 2)), mode='image+cot',
                    k_coarse=4, k=3)
  coarse = search.retrieve(pool, feat[4:5] + 0.01, mode='image', k=3)
  np.testing.assert_array_equal(np.asarray(out.rows), np.asarray(coarse.rows))


def test_padding_rows_are_never_retrieved():
  rng = np.random.default_rng(2)
  feat = rng.normal(size=(5,) + MAP).astype(np.float32)
  pool = kp.build_pool(feat, None, None, np.arange(5))
  padded = kp.KnowledgePool(
      feat=jnp.concatenate([pool.feat, pool.feat[:1]]),
      key=jnp.concatenate([pool.key, pool.key[:1]]), cot=None, text=None,
      ids=jnp.concatenate([pool.ids, jnp.array([-1], jnp.int32)]))
  out = search.retrieve(padded, feat[:1], mode='image', k=5)
  np.testing.assert_array_equal(np.sort(np.asarray(out.rows)[0]), np.arange(5))
  np.testing.assert_array_equal(np.asarray(kp.pool_rows(padded, jnp.array([-1, 4]))), [-1, 4])


# ------------------------------------------------------------------------------------------
# transformations


def test_inside_jit_and_vmap():
  case = random_case(seed=11)
  feat, cot, text, ids, qf, qc, qt, exclude = case
  pool = kp.build_pool(feat, cot, text, ids)

  @jax.jit
  def step(pool, qf, qc, exclude):
    out = search.retrieve(pool, qf, qc, mode='image+cot', k_coarse=9, k=4, exclude=exclude)
    return out, kp.ema_update(pool, kp.pool_rows(pool, exclude), qf, 0.99)

  out, new_pool = step(pool, qf, qc, exclude)
  assert_matches_reference(out, case, mode='image+cot', k_coarse=9, k=4, exclude=exclude)
  assert isinstance(new_pool, kp.KnowledgePool)

  # vmap over groups of query batches (the pool is shared).
  groups = 2
  qfg, qcg, exg = (x.reshape((groups, -1) + x.shape[1:]) for x in (qf, qc, exclude))
  batched = jax.vmap(lambda a, b, c: search.retrieve(pool, a, b, mode='image+cot', k_coarse=9,
                                                 k=4, exclude=c))(qfg, qcg, exg)
  for g in range(groups):
    single = search.retrieve(pool, qfg[g], qcg[g], mode='image+cot', k_coarse=9, k=4,
                         exclude=exg[g])
    np.testing.assert_array_equal(np.asarray(batched.rows[g]), np.asarray(single.rows))
    np.testing.assert_array_equal(np.asarray(batched.feat[g]), np.asarray(single.feat))
  # vmap down to single queries (batch of one inside).
  per_query = jax.vmap(lambda a, b: search.retrieve(pool, a[None], b[None], mode='cot', k=3))(
      qf, qc)
  whole = search.retrieve(pool, qf, qc, mode='cot', k=3)
  np.testing.assert_array_equal(np.asarray(per_query.rows)[:, 0], np.asarray(whole.rows))


# ------------------------------------------------------------------------------------------
# errors


def test_errors_are_clear():
  case = random_case(seed=4, n=5)
  feat, cot, text, ids, qf, qc, qt, exclude = case
  pool = kp.build_pool(feat, cot, None, ids)
  with pytest.raises(ValueError, match='skip the call'):
    search.retrieve(pool, qf, qc, mode='none')
  assert not search.needs_retrieval('none') and search.needs_retrieval('image+cot')
  with pytest.raises(ValueError, match='unknown retrieval mode'):
    search.needs_retrieval('imgae')
  with pytest.raises(ValueError, match='k=6 reference cases'):
    search.retrieve(pool, qf, mode='image', k=6)
  with pytest.raises(ValueError, match='own row excluded'):
    search.retrieve(pool, qf, mode='image', k=5, exclude=exclude)
  assert search.retrieve(pool, qf, mode='image', k=5).rows.shape == (6, 5)
  with pytest.raises(ValueError, match='k_coarse=2 < k=3'):
    search.retrieve(pool, qf, qc, mode='image+cot', k_coarse=2, k=3)
  with pytest.raises(ValueError, match='needs pool.text'):
    search.retrieve(pool, qf, None, qt, mode='text', k=2)
  with pytest.raises(ValueError, match='needs pool.cot and query_cot'):
    search.retrieve(pool, qf, None, mode='image+cot', k_coarse=4, k=2)
  with pytest.raises(ValueError, match='needs query_feat maps shaped like the pool maps'):
    search.retrieve(pool, qf[:, :1], mode='image', k=2)
  with pytest.raises(ValueError, match='needs query_feat'):
    search.retrieve(pool, None, qc, mode='image+cot', k_coarse=4, k=2)
  # 'cot' mode needs no image query.
  assert search.retrieve(pool, None, qc, mode='cot', k=2).feat.shape == (6, 2) + MAP
  with pytest.raises(ValueError, match='pool is empty'):
    kp.build_pool(feat[:0], cot[:0], None, ids[:0])
  with pytest.raises(ValueError, match='unique'):
    kp.build_pool(feat, cot, None, np.zeros(5, np.int32))
  with pytest.raises(ValueError, match=r'`cot` must have shape'):
    kp.build_pool(feat, cot[:4], None, ids)


# ------------------------------------------------------------------------------------------
# updates


def test_ema_update_eq5_skips_minus_one_and_last_duplicate_wins():
  rng = np.random.default_rng(6)
  feat = rng.normal(size=(6,) + MAP).astype(np.float32)
  pool = kp.build_pool(feat, None, None, np.arange(100, 106))
  rows = np.array([2, -1, 4, 2, 0], np.int32)
  new = rng.normal(size=(5,) + MAP).astype(np.float32)
  out = jax.jit(kp.ema_update)(pool, rows, new, 0.9)
  expected = feat.copy()
  for i in (4, 2, 3):  # row 2 from its last occurrence (batch position 3)
    expected[rows[i]] = 0.9 * feat[rows[i]] + 0.1 * new[i]
  np.testing.assert_allclose(np.asarray(out.feat), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.feat)[[1, 3, 5]], feat[[1, 3, 5]])
  np.testing.assert_allclose(np.asarray(out.key), _unit(expected.reshape(6, -1)), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.ids), np.asarray(pool.ids))
  # Rows found by id: the unlabeled sample (id 7) maps to -1 and is skipped.
  np.testing.assert_array_equal(np.asarray(kp.pool_rows(pool, jnp.array([105, 7, 100]))),
                                [5, -1, 0])


def test_ema_update_stops_gradients_and_keeps_dtypes():
  rng = np.random.default_rng(8)
  feat = rng.normal(size=(4,) + MAP).astype(np.float32)
  pool = kp.build_pool(feat, None, None, np.arange(4), key_dtype=jnp.bfloat16)
  new = jnp.asarray(rng.normal(size=(2,) + MAP), jnp.float32)

  def loss(x):
    updated = kp.ema_update(pool, jnp.array([0, 3]), x, 0.5)
    return updated.feat.sum() + updated.key.astype(jnp.float32).sum()

  grad = jax.grad(loss)(new)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  updated = kp.ema_update(pool, jnp.array([0, 3]), new, 0.5)
  assert updated.key.dtype == jnp.bfloat16 and updated.feat.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(updated.feat)[3], 0.5 * feat[3] + 0.5 * new[1],
                             rtol=1e-6)


# ------------------------------------------------------------------------------------------
# collection and checkpointing


def _batches(rng, n_total, batch=4):
  for start in range(0, n_total + 2, batch):  # last batch is padded
    index = np.arange(start, start + batch) % n_total
    yield {'index': index, 'is_labeled': index % 3 == 0,
           'valid': np.arange(start, start + batch) < n_total,
           'image': rng.normal(size=(batch,) + MAP).astype(np.float32)}


def test_collect_pool_keeps_valid_labeled_rows_only():
  rng = np.random.default_rng(9)
  n_total = 10
  cot_table = rng.normal(size=(n_total, 3)).astype(np.float32)
  text_table = rng.normal(size=(n_total, 2)).astype(np.float32)
  batches = list(_batches(rng, n_total))
  pool = kp.collect_pool(batches, lambda b: jnp.asarray(b['image']) * 2,
                         cot_table=cot_table, text_table=text_table)
  np.testing.assert_array_equal(np.asarray(pool.ids), [0, 3, 6, 9])
  images = np.concatenate([b['image'] for b in batches])[:n_total]
  np.testing.assert_allclose(np.asarray(pool.feat), 2 * images[[0, 3, 6, 9]])
  np.testing.assert_allclose(np.asarray(pool.cot), _unit(cot_table[[0, 3, 6, 9]]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(pool.text), _unit(text_table[[0, 3, 6, 9]]), atol=1e-6)

  unlabeled = [dict(b, is_labeled=np.zeros(4, bool)) for b in batches]
  with pytest.raises(ValueError, match='no valid labeled row'):
    kp.collect_pool(unlabeled, lambda b: b['image'], cot_table=cot_table, text_table=None)
  with pytest.raises(ValueError, match='seen more than once'):
    kp.collect_pool(batches + batches[:1], lambda b: b['image'], cot_table=None,
                    text_table=None)
  with pytest.raises(ValueError, match=r"lacks \['is_labeled'\]"):
    kp.collect_pool([{'index': np.arange(2), 'valid': np.ones(2, bool)}], lambda b: b,
                    cot_table=None, text_table=None)
  with pytest.raises(ValueError, match='pass the table of all samples'):
    kp.collect_pool(batches, lambda b: b['image'], cot_table=cot_table[:5], text_table=None)


@pytest.mark.parametrize('with_text', [True, False])
def test_orbax_round_trip_is_exact(tmp_path, with_text):
  case = random_case(seed=10)
  feat, cot, text, ids, *_ = case
  pool = kp.build_pool(feat, cot, text if with_text else None, ids, key_dtype=jnp.bfloat16)
  state = {'pool': pool, 'step': jnp.asarray(3, jnp.int32)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'ckpt', state)
  checkpointer.wait_until_finished()
  target = jax.eval_shape(lambda: state)
  restored = checkpointer.restore(tmp_path / 'ckpt', target)
  assert isinstance(restored['pool'], kp.KnowledgePool)
  assert (restored['pool'].text is None) == (not with_text)
  assert len(jax.tree.leaves(restored)) == (6 if with_text else 5)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
