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

