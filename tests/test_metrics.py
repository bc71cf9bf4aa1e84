"""Tests for cers_jax.metrics against the authors' evaluation (fixture losses_and_metrics).

The fixture's metrics were computed on sigmoid(in/logits) (its note says "probs"; the
numbers only match the sigmoid of the logits, whose third sample predicts nothing on an
empty target and so scores 1).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cers_jax import metrics
from tests.fixture_utils import load_fixture, nhwc

_RTOL = 1e-5


@pytest.fixture(scope='module')
def fx():
  z, _ = load_fixture('losses_and_metrics')
  return {
      'probs': np.asarray(jax.nn.sigmoid(nhwc(z['in/logits']))),
      'target': nhwc(z['in/target']),
      **{k[len('out/metric_'):]: z[k] for k in z.files if k.startswith('out/metric_')},
  }


def _masks(*rows):
  """(B, 2, 2, 1) float masks from flat 4-pixel rows."""
  return np.asarray(rows, np.float32).reshape(len(rows), 2, 2, 1)


class TestFixture:

  def test_dice_iou(self, fx):
    dice, iou = metrics.dice_iou_per_image(fx['probs'], fx['target'])
    np.testing.assert_allclose(dice, fx['Dice'], rtol=_RTOL)
    np.testing.assert_allclose(iou, fx['IoU'], rtol=_RTOL)

  def test_soft_dice_is_pdice(self, fx):
    np.testing.assert_allclose(metrics.soft_dice_per_image(fx['probs'], fx['target']),
                               fx['pDice'], rtol=_RTOL)

  def test_class_mean_dice_iou(self, fx):
    mdice, miou = metrics.mean_dice_iou_per_image(fx['probs'], fx['target'])
    np.testing.assert_allclose(mdice, fx['mDice'], rtol=_RTOL)
    np.testing.assert_allclose(miou, fx['mIoU'], rtol=_RTOL)

  def test_jit(self, fx):
    fn = jax.jit(lambda p, t: (metrics.dice_iou_per_image(p, t),
                               metrics.mean_dice_iou_per_image(p, t),
                               metrics.soft_dice_per_image(p, t)))
    (dice, iou), (mdice, miou), pdice = fn(fx['probs'], fx['target'])
    for got, key in ((dice, 'Dice'), (iou, 'IoU'), (mdice, 'mDice'), (miou, 'mIoU'),
                     (pdice, 'pDice')):
      np.testing.assert_allclose(got, fx[key], rtol=_RTOL, err_msg=key)


class TestRules:

  def test_binarize_is_strict(self):
    out = metrics.binarize(jnp.array([0.0, 0.5, 0.50001, 1.0]))
    np.testing.assert_array_equal(out, [0.0, 0.0, 1.0, 1.0])

  def test_empty_cases(self):
    probs = _masks([0.1, 0.2, 0.3, 0.4],   # empty prediction, empty target -> 1
                   [0.9, 0.2, 0.3, 0.4],   # prediction, empty target -> 0
                   [0.1, 0.2, 0.3, 0.4],   # empty prediction, target -> 0
                   [0.9, 0.9, 0.3, 0.4])   # half overlap
    target = _masks([0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 1])
    dice, iou = metrics.dice_iou_per_image(probs, target)
    np.testing.assert_allclose(dice, [1.0, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(iou, [1.0, 0.0, 0.0, 1 / 3], rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(dice))) and np.all(np.isfinite(np.asarray(iou)))

  def test_class_mean_of_full_images(self):
    # Everything foreground, predicted everything: fg perfect, bg empty in both -> 1.
    ones = _masks([1, 1, 1, 1])
    mdice, miou = metrics.mean_dice_iou_per_image(ones, ones)
    np.testing.assert_allclose(mdice, [1.0])
    np.testing.assert_allclose(miou, [1.0])

  def test_threshold_argument(self):
    probs = _masks([0.3, 0.3, 0.1, 0.1])
    target = _masks([1, 1, 0, 0])
    assert float(metrics.dice_iou_per_image(probs, target)[0][0]) == 0.0
    assert float(metrics.dice_iou_per_image(probs, target, threshold=0.2)[0][0]) == 1.0


class TestReduction:

  def test_metric_sums_mask_padding(self):
    dice = jnp.array([0.5, 1.0, jnp.nan, 0.25])
    iou = jnp.array([0.4, 1.0, jnp.nan, 0.2])
    valid = jnp.array([True, True, False, True])
    empty = jnp.array([False, True, True, False])
    s = jax.jit(metrics.metric_sums)(dice, iou, valid, empty)
    assert set(s) == set(metrics.SUM_KEYS)
    np.testing.assert_allclose(s['dice'], 1.75)
    np.testing.assert_allclose(s['dice_sq'], 0.25 + 1.0 + 0.0625)
    np.testing.assert_allclose(s['iou'], 1.6, rtol=1e-6)
    assert float(s['count']) == 3.0
    assert float(s['empty_count']) == 1.0

  def test_batch_metric_sums(self):
    probs = _masks([0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.9, 0.9])
    target = _masks([0, 0, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1])
    s = metrics.batch_metric_sums(probs, target, jnp.array([True, True, False]))
    np.testing.assert_allclose(s['dice'], 1.5)
    assert float(s['count']) == 2.0 and float(s['empty_count']) == 1.0

  def test_accumulate_and_summarize_agree_with_numpy(self):
    rng = np.random.default_rng(0)
    sums = None
    kept_dice, kept_iou = [], []
    for _ in range(3):
      dice = rng.uniform(size=5)
      iou = dice / (2 - dice)
      valid = rng.uniform(size=5) > 0.3
      sums = metrics.accumulate(sums, dice, iou, valid, empty=dice > 0.9)
      kept_dice += list(dice[valid])
      kept_iou += list(iou[valid])
    out = metrics.summarize_sums(sums)
    assert out['count'] == len(kept_dice)
    np.testing.assert_allclose(out['dice_mean'], np.mean(kept_dice), rtol=1e-12)
    np.testing.assert_allclose(out['dice_std'], np.std(kept_dice), rtol=1e-9)
    np.testing.assert_allclose(out['iou_mean'], np.mean(kept_iou), rtol=1e-12)
    np.testing.assert_allclose(out['iou_std'], np.std(kept_iou), rtol=1e-9)
    assert out['empty_count'] == int(np.sum(np.asarray(kept_dice) > 0.9))
    listed = metrics.summarize({'dice': kept_dice, 'iou': kept_iou,
                                'empty': [d > 0.9 for d in kept_dice]})
    for key in out:
      np.testing.assert_allclose(listed[key], out[key], rtol=1e-9, err_msg=key)

  def test_device_sums_add_on_host(self):
    a = metrics.metric_sums(jnp.array([1.0, 0.5]), jnp.array([1.0, 0.25]),
                            jnp.array([True, True]))
    b = metrics.metric_sums(jnp.array([0.0]), jnp.array([0.0]), jnp.array([True]))
    out = metrics.summarize_sums(metrics.add_sums(metrics.add_sums(None, a), b))
    assert out['count'] == 3
    np.testing.assert_allclose(out['dice_mean'], 0.5)
    np.testing.assert_allclose(out['dice_std'], np.std([1.0, 0.5, 0.0]), rtol=1e-6)

  def test_empty_summary_and_bad_input(self):
    out = metrics.summarize_sums(metrics.accumulate(None, [0.3], [0.2], [False]))
    assert out['count'] == 0 and np.isnan(out['dice_mean'])
    with pytest.raises(ValueError, match='one value per row'):
      metrics.accumulate(None, [0.3, 0.2], [0.2], [True, True])
    with pytest.raises(KeyError, match='metric_sums'):
      metrics.add_sums(None, {'dice': 1.0})
