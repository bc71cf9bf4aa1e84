"""Tests for cers_jax.inference.pages: overlays and the evidence page."""

import html

import numpy as np

from cers_jax.data.records import Sample
from cers_jax.inference import pages
from cers_jax.inference.predict import PredictItem


def test_overlay_draws_prediction_and_truth():
  image = np.full((12, 12, 3), 100, np.uint8)
  pred = np.zeros((12, 12), np.uint8)
  pred[2:8, 2:8] = 1
  truth = np.zeros((12, 12), np.uint8)
  truth[5:11, 5:11] = 1
  out = pages.overlay(image, pred, truth)
  np.testing.assert_array_equal(out[2, 2], pages.PRED_COLOUR.astype(np.uint8))
  np.testing.assert_array_equal(out[10, 10], pages.TRUTH_COLOUR.astype(np.uint8))
  assert out[4, 4, 0] > 100 and out[4, 4, 1] < 100  # Tinted red inside the prediction.
  np.testing.assert_array_equal(out[0, 11], [100, 100, 100])  # Untouched elsewhere.
  np.testing.assert_array_equal(pages.overlay(image, pred * 0), image)


def test_page_escapes_texts_and_lists_references_in_rank_order():
  samples = [Sample(id=f'ref{r}', image_path='', mask_path=None, text='',
                    cot_mask=f'<b>mask CoT {r}</b>' if r else None,
                    cot_no_mask=f'no-mask CoT {r}') for r in range(3)]
  item = PredictItem(id='case <1>', image_path=None, mask_path=None, text='a & b', cot='c')
  record = dict(dice_r='', mean_prob=0.25)
  page = pages.render_page(item, record, [(2, 'ref2', 0.75), (0, 'ref0', 0.5)],
                           mode='image+cot', samples=samples)
  assert html.escape('case <1>') in page and 'a &amp; b' in page
  assert html.escape('<b>mask CoT 2</b>') in page and 'no-mask CoT 0' in page
  assert page.index('ref2') < page.index('ref0')  # Best first.
  assert 'No ground-truth mask given' in page
  none_page = pages.render_page(item, record, [], mode='none', samples=samples)
  assert 'Retrieval is off' in none_page


def test_index_links_the_training_curves_when_given():
  record = dict(id='a', mean_prob=0.5, dice_r='', retrieved_ids='r1;r2')
  assert 'curves.png' not in pages.render_index([record], 'title')
  page = pages.render_index([record], 'title', curves_href='../../curves.png')
  assert '<a href="../../curves.png">Training curves</a>' in page
  assert 'href="pages/a.html"' in page
