"""Tests for cers_jax.inference.retrieval_report: metrics by hand, labels, and collapse
detection."""

import ml_collections
import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from cers_jax.data import tokenize
from cers_jax.data.records import DataError
from cers_jax.inference import retrieval_report as rr
from cers_jax.models.cers import CERS, unit_rows
from cers_jax.retrieval import pool as kp
from cers_jax.retrieval import search
from tests import train_helpers

MAP = (2, 2, 3)


def _eval_config(**fields):
  config = ml_collections.ConfigDict(dict(label_regex='', label_csv='', label_column='label'))
  config.update(fields)
  return config


def test_mask_dice_matrix_and_the_empty_rule():
  query = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
  pool = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], np.float32)
  np.testing.assert_allclose(rr.mask_dice_matrix(query, pool),
                             [[2 / 3, 0.0, 0.0], [0.0, 1.0, 0.0]])


def test_resized_masks_keep_binary_values():
  masks = np.zeros((1, 8, 8), np.uint8)
  masks[0, :4, :4] = 1
  small = rr.resized_masks(masks, 4).reshape(4, 4)
  np.testing.assert_array_equal(small[:2, :2], 1)
  assert small.sum() == 4


def test_mode_metrics_by_hand():
  # 2 queries, pool of 4 rows, k = 2 (+1 rank for the tie check).
  dice = np.array([[0.8, 0.2, 0.0, 0.5], [0.1, 0.9, 0.4, 0.0]])
  ranking = rr.Ranking(rows=np.array([[0, 3, 1], [2, 1, 0]]),
                       scores=np.array([[0.9, 0.9, 0.5], [0.7, 0.6, 0.6]], np.float32),
                       entries=np.array([[1.0], [2.0], [2.0], [3.0]]))
  query_labels = np.array([['a', 'x'], ['b', 'y']])
  pool_labels = np.array([['a', 'x'], ['b', 'x'], ['b', 'y'], ['a', 'y']])
  image_rows = np.array([[0, 1, 2], [1, 3, 0]])
  m = rr.mode_metrics(ranking, 2, dice, query_labels, pool_labels, ('kind', 'plane'),
                      image_rows=image_rows)
  assert m['ref_mask_dice'] == pytest.approx(np.mean([(0.8 + 0.5) / 2, (0.4 + 0.9) / 2]))
  # Query 0: rows 0 (a,x) and 3 (a,y); query 1: rows 2 (b,y) and 1 (b,x).
  assert m['label_match'] == pytest.approx(0.5)
  assert m['label_match_by_group'] == {'kind': pytest.approx(1.0), 'plane': pytest.approx(0.5)}
  # Adjacent pairs: q0 (0,3) tie, different entries; q0 (3,1) no tie; q1 (2,1) no tie;
  # q1 (1,0) tie, different entries. Rows 1 and 2 share an entry: a duplicate, not a tie.
  assert m['tie_share'] == pytest.approx(2 / 4)
  assert m['duplicate_share'] == pytest.approx(1 / 4)
  assert m['score_range'] == pytest.approx(np.mean([0.4, 0.1]), rel=1e-6)
  # Query 0 keeps row 0 of the image top 2 (0, 1), query 1 keeps row 1 of (1, 3).
  assert m['changed_vs_image'] == pytest.approx(0.5)


def test_group_labels_from_named_regex_groups():
  labels = rr.group_labels(_eval_config(label_regex=r'_(?P<tumour>gl|me)_(?P<plane>ax|co)_'),
                           ['x_gl_ax_1', 'x_me_co_2', 'other'])
  assert labels.names == ('tumour', 'plane')
  np.testing.assert_array_equal(labels.values, [['gl', 'ax'], ['me', 'co'], ['', '']])


def test_group_labels_from_a_csv_with_bom_and_extensions(tmp_path):
  path = tmp_path / 'labels.csv'
  path.write_bytes(b'\xef\xbb\xbfImage,Kind\r\na.png,contained\r\nb.png,none\r\n')
  labels = rr.group_labels(_eval_config(label_csv=str(path), label_column='kind'),
                           ['a', 'b', 'c'])
  np.testing.assert_array_equal(labels.values[:, 0], ['contained', 'none', ''])


def test_group_label_errors_name_the_fix(tmp_path):
  with pytest.raises(DataError, match='label_regex'):
    rr.group_labels(_eval_config(label_regex='(unclosed'), ['a'])
  path = tmp_path / 'labels.csv'
  path.write_text('image,kind\na,b\n')
  with pytest.raises(DataError, match="label \\('lesion'\\)"):
    rr.group_labels(_eval_config(label_csv=str(path), label_column='lesion'), ['a'])
  assert rr.group_labels(_eval_config(), ['a']) is None


def _pool_and_queries(cot_rows, query_cot, seed=0):
  rng = np.random.default_rng(seed)
  n = len(cot_rows)
  feat = rng.normal(size=(n,) + MAP).astype(np.float32)
  pool = kp.build_pool(feat, cot_rows, rng.normal(size=(n, 4)), np.arange(n))
  q = len(query_cot)
  query = dict(query_feat=rng.normal(size=(q,) + MAP).astype(np.float32),
               query_cot=np.asarray(query_cot, np.float32),
               query_text=rng.normal(size=(q, 4)).astype(np.float32))
  return pool, query


def _report_modes(pool, query, k=3, k_coarse=8):
  q, n = len(query['query_cot']), pool.size
  rng = np.random.default_rng(0)
  dice = rng.random((q, n))
  rankings = {mode: rr.rank_references(mode, pool=pool, dice=dice,
                                       barred=np.zeros((q, n), bool), exclude=None,
                                       count=k + 1, k_coarse=k_coarse, rng=rng, **query)
              for mode in rr.REPORT_MODES}
  return {mode: rr.mode_metrics(r, k, dice, None, None, (),
                                image_rows=rankings['image'].rows
                                if search.mode_spec(mode, report=True).fine_stage else None)
          for mode, r in rankings.items()}


def test_a_collapsed_cot_space_is_detected():
  rng = np.random.default_rng(1)
  direction = rng.normal(size=16)
  # What a frozen random BERT's [CLS] gives: one direction, differences near float32 eps.
  collapsed = direction + 1e-7 * rng.normal(size=(20, 16))
  pool, query = _pool_and_queries(collapsed, direction + 1e-7 * rng.normal(size=(6, 16)))
  modes = _report_modes(pool, query)
  problems = rr.ranking_problems(modes)
  assert any(p.startswith('cot:') for p in problems), problems
  assert any(p.startswith('image+cot:') for p in problems), problems
  assert not any(p.startswith(('image:', 'text:', 'random:', 'oracle:')) for p in problems)
  assert modes['cot']['tie_share'] > rr.MAX_TIE_SHARE or (
      modes['cot']['score_range'] < rr.MIN_SCORE_RANGE)


def test_a_ranking_cot_space_passes():
  rng = np.random.default_rng(2)
  pool, query = _pool_and_queries(rng.normal(size=(20, 16)), rng.normal(size=(6, 16)))
  modes = _report_modes(pool, query)
  assert rr.ranking_problems(modes) == []
  assert modes['image+cot']['changed_vs_image'] > 0


@pytest.mark.slow
def test_fine_stage_ranking_follows_the_cot_texts(tmp_path):
  """Text -> tokenizer -> CoT BERT (mean pooling) -> retrieval: editing a CoT moves ranks."""
  texts = [
      'Texture: homogeneous bright core. Boundary: the rim fades; oedema. Summary: contained.',
      'Texture: mottled core. Boundary: crisp outer margin; invasive. Summary: infiltrative.',
      'Texture: no focal abnormal signal. Boundary: no lesion margin. Summary: no lesion.',
      'Texture: mottled bright cores. Boundary: the rim fades gradually. Summary: encapsulated.',
      'Texture: homogeneous core. Boundary: crisp outer margin ends the rim. Summary: invasive.',
      'Texture: slight noise. Boundary: well-defined margin; reactive halo. Summary: contained.',
  ]
  tokenizer = tokenize.train_wordpiece(texts, vocab_size=120, out_dir=str(tmp_path / 'tok'))
  config = train_helpers.tiny_config()
  config.model.cot.vocab_size = len(tokenizer)
  config.model.cot.pooling = 'mean'
  config.pool.cot_space = 'features'
  model = CERS(config.model, rngs=nnx.Rngs(params=0, dropout=1))

  def embed(batch_texts):
    ids, mask = tokenize.encode_texts(tokenizer, batch_texts, config.data.max_cot_len)
    features = model.cot_features(jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(unit_rows(features))  # What project_step does for 'features'.

  query_text = texts[1]
  pool_texts = texts[2:]  # The query's own CoT is not in the pool.
  feat = np.ones((len(pool_texts),) + MAP, np.float32)  # Equal images: the CoT decides.
  pool = kp.build_pool(feat, embed(pool_texts), None, np.arange(len(pool_texts)))
  query_feat = np.ones((1,) + MAP, np.float32)

  def ranked(p):
    out = search.retrieve(p, query_feat, embed([query_text]), mode='image+cot', k_coarse=4, k=4)
    return np.asarray(out.rows)[0], np.asarray(out.scores)[0]

  before, scores = ranked(pool)
  assert len(np.unique(scores)) == len(scores), scores  # Distinct scores: it ranks.
  # Give the last-ranked pool entry the query's own CoT: it must move to rank 1.
  last = int(before[-1])
  edited = list(pool_texts)
  edited[last] = query_text
  after, after_scores = ranked(pool.replace(cot=kp.build_pool(feat, embed(edited), None,
                                                              np.arange(4)).cot))
  assert after[0] == last and after_scores[0] == pytest.approx(1.0, abs=1e-5)
  assert not np.array_equal(before, after)
