"""Tests for cers_jax.core.losses against the authors' PyTorch losses (fixture
losses_and_metrics)."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cers_jax.core import losses
from tests.fixture_utils import load_fixture, nhwc

_RTOL = 1e-5


@pytest.fixture(scope='module')
def fx():
  z, _ = load_fixture('losses_and_metrics')
  return {
      'probs': nhwc(z['in/probs']), 'target': nhwc(z['in/target']),
      'logits': nhwc(z['in/logits']), 'clip_logits': z['in/clip_logits_per_image'],
      'epochs': z['in/rampup_epochs'],
      **{k[len('out/'):]: z[k] for k in z.files if k.startswith('out/')},
  }


def _torch_bce(p, t):
  """torch.nn.BCELoss in float64 numpy: logs clamped at -100."""
  p = p.astype(np.float64)
  with np.errstate(divide='ignore'):
    lp = np.maximum(np.log(p), -100.0)
    l1p = np.maximum(np.log1p(-p), -100.0)
  return float(np.mean(-(t * lp + (1 - t) * l1p)))


class TestFixture:

  def test_dice_loss(self, fx):
    np.testing.assert_allclose(losses.dice_loss(fx['probs'], fx['target']),
                               fx['dice_loss'][0], rtol=_RTOL)

  def test_dice_ce(self, fx):
    np.testing.assert_allclose(losses.dice_ce(fx['probs'], fx['target']),
                               fx['dice_ce'][0], rtol=_RTOL)

  def test_sharpen(self, fx):
    out = losses.sharpen(jnp.asarray(fx['probs']), 0.1)
    np.testing.assert_allclose(out, np.transpose(fx['sharpen'], (0, 2, 3, 1)),
                               rtol=_RTOL, atol=1e-30)

  def test_mse_sum_against_sharpened_reversed_batch(self, fx):
    p = jnp.asarray(fx['probs'])
    out = losses.mse_sum(p, losses.sharpen(p, 0.1)[::-1])
    np.testing.assert_allclose(out, fx['mse_sum'][0], rtol=_RTOL)

  def test_clip_loss(self, fx):
    np.testing.assert_allclose(losses.clip_loss(fx['clip_logits']), fx['clip'][0],
                               rtol=_RTOL)

  def test_rampup(self, fx):
    np.testing.assert_allclose(losses.sigmoid_rampup(fx['epochs'], 200), fx['rampup'],
                               rtol=_RTOL)
    np.testing.assert_allclose(
        losses.consistency_weight(fx['epochs'], consistency=0.003, rampup=200),
        0.003 * fx['rampup'], rtol=_RTOL)


class TestValues:

  def test_dice_ce_from_logits_matches_probability_form(self, fx):
    logits = fx['logits']
    expect = losses.dice_ce(jax.nn.sigmoid(logits), fx['target'])
    np.testing.assert_allclose(losses.dice_ce_from_logits(logits, fx['target']), expect,
                               rtol=_RTOL)

  def test_bce_matches_torch_clamp_at_saturated_probs(self):
    p = np.array([0.0, 1.0, 0.3, 1.0, 0.0, 0.9], np.float32).reshape(2, 1, 3, 1)
    t = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], np.float32).reshape(2, 1, 3, 1)
    out = losses.bce(p, t)
    assert np.isfinite(out)
    np.testing.assert_allclose(out, _torch_bce(p, t), rtol=_RTOL)
    # Two of six pixels hit the clamp: the loss is dominated by 2 * 100 / 6.
    assert out > 33.0

  def test_bce_from_logits_is_exact_where_sigmoid_saturates(self):
    logits = jnp.full((1, 2, 2, 1), 40.0)
    target = jnp.zeros((1, 2, 2, 1))
    # log(1 - sigmoid(40)) = -40 exactly; the probability route hits log(0) -> -100.
    np.testing.assert_allclose(losses.bce_from_logits(logits, target), 40.0, rtol=_RTOL)
    np.testing.assert_allclose(losses.bce(jax.nn.sigmoid(logits), target), 100.0,
                               rtol=_RTOL)

  def test_dice_perfect_and_disjoint(self):
    t = np.zeros((2, 4, 4, 1), np.float32)
    t[:, :2] = 1.0
    assert abs(float(losses.dice_loss(t, t))) < 1e-6
    np.testing.assert_allclose(losses.dice_loss(1.0 - t, t), 1.0, atol=1e-6)

  def test_sharpen_closed_form_and_stability(self):
    p = jnp.array([0.0, 1e-30, 1e-4, 0.3, 0.5, 0.7, 1.0 - 1e-7, 1.0], jnp.float32)
    for temperature in (0.1, 0.01, 0.001):
      out = np.asarray(losses.sharpen(p, temperature))
      assert np.all(np.isfinite(out)), temperature
      assert out[0] == 0.0 and out[-1] == 1.0
      np.testing.assert_allclose(out[4], 0.5, rtol=1e-6)
      # Symmetry: sharpen(1 - p) = 1 - sharpen(p).
      np.testing.assert_allclose(losses.sharpen(1.0 - p[3], temperature),
                                 1.0 - out[3], atol=1e-6)
    q = np.array([0.3, 0.7, 1e-4], np.float64)
    ref = q ** 10 / (q ** 10 + (1 - q) ** 10)
    # 1e-4 ** 10 = 1e-40 is below float32's normal range: compare it absolutely.
    np.testing.assert_allclose(losses.sharpen(jnp.asarray(q, jnp.float32), 0.1), ref,
                               rtol=1e-5, atol=1e-37)

  def test_sharpen_gradient_finite_at_edges(self):
    g = jax.grad(lambda p: jnp.sum(losses.sharpen(p, 0.1)))(jnp.array([0.0, 0.5, 1.0]))
    assert np.all(np.isfinite(np.asarray(g)))

  def test_consistency_loss_value_and_stop_gradient(self):
    rng = np.random.default_rng(0)
    p_r = jnp.asarray(rng.uniform(size=(2, 4, 4, 1)), jnp.float32)
    p_s = jnp.asarray(rng.uniform(size=(2, 4, 4, 1)), jnp.float32)
    expect = (np.sum((p_r - losses.sharpen(p_s, 0.1)) ** 2)
              + np.sum((p_s - losses.sharpen(p_r, 0.1)) ** 2))
    np.testing.assert_allclose(losses.consistency_loss(p_r, p_s, temperature=0.1), expect,
                               rtol=_RTOL)
    # Targets are detached: d/dp_r = 2 (p_r - sg(sharpen(p_s))) only.
    g_r = jax.grad(lambda a: losses.consistency_loss(a, p_s, temperature=0.1))(p_r)
    np.testing.assert_allclose(g_r, 2.0 * (p_r - losses.sharpen(p_s, 0.1)), rtol=1e-5,
                               atol=1e-6)

  def test_clip_logits(self):
    rng = np.random.default_rng(1)
    img = rng.normal(size=(3, 5)).astype(np.float32)
    txt = rng.normal(size=(3, 5)).astype(np.float32)
    out = losses.clip_logits(img, txt, jnp.log(1 / 0.07))
    np.testing.assert_allclose(out, (img @ txt.T) / 0.07, rtol=1e-5)

  def test_clip_loss_prefers_the_diagonal(self):
    diag = 10.0 * jnp.eye(4)
    assert float(losses.clip_loss(diag)) < 1e-3
    assert float(losses.clip_loss(jnp.zeros((4, 4)))) == pytest.approx(np.log(4), rel=1e-6)

  def test_consistency_weight_edges(self):
    assert float(losses.consistency_weight(0, rampup=0)) == pytest.approx(0.003)
    assert float(losses.consistency_weight(300, rampup=200)) == pytest.approx(0.003)
    assert float(losses.consistency_weight(0, rampup=200)) == pytest.approx(
        0.003 * np.exp(-5.0))


class TestWeights:

  def _batch(self):
    rng = np.random.default_rng(2)
    probs = rng.uniform(0.01, 0.99, size=(4, 6, 6, 1)).astype(np.float32)
    target = (rng.uniform(size=(4, 6, 6, 1)) > 0.5).astype(np.float32)
    return probs, target

  def test_weighted_losses_equal_losses_on_the_kept_rows(self):
    probs, target = self._batch()
    w = np.array([1, 0, 1, 0], np.float32)
    keep = w > 0
    logits = np.log(probs) - np.log1p(-probs)

    def all_losses(p, t, x, **weights):
      return {
          'dice_loss': losses.dice_loss(p, t, **weights),
          'bce': losses.bce(p, t, **weights),
          'dice_ce': losses.dice_ce(p, t, **weights),
          'dice_ce_from_logits': losses.dice_ce_from_logits(x, t, **weights),
          'mse_sum': losses.mse_sum(p, t, **weights),
          'consistency': losses.consistency_loss(p, t, temperature=0.1, **weights),
      }

    chex.assert_trees_all_close(all_losses(probs, target, logits, weights=w),
                                all_losses(probs[keep], target[keep], logits[keep]),
                                rtol=_RTOL)

  def test_all_zero_weights_give_zero_loss_and_gradient(self):
    probs, target = self._batch()
    w = np.zeros(4, np.float32)
    logits = jnp.asarray(np.log(probs) - np.log1p(-probs))
    for fn in (losses.dice_loss, losses.bce, losses.dice_ce, losses.mse_sum):
      assert float(fn(probs, target, weights=w)) == 0.0, fn.__name__
    value, grad = jax.value_and_grad(
        lambda x: losses.dice_ce_from_logits(x, target, weights=w))(logits)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


class TestJitAndGradients:

  def test_jit_matches_eager(self, fx):
    def total(logits, target, w, epoch):
      p = jax.nn.sigmoid(logits)
      return (losses.dice_ce_from_logits(logits, target, w)
              + losses.consistency_weight(epoch) * losses.consistency_loss(
                  p, p[::-1], temperature=0.1, weights=w))

    w = jnp.array([1.0, 1.0, 0.0])
    args = (fx['logits'], fx['target'], w, jnp.asarray(7))
    np.testing.assert_allclose(jax.jit(total)(*args), total(*args), rtol=_RTOL)
    np.testing.assert_allclose(jax.jit(losses.clip_loss)(fx['clip_logits']),
                               fx['clip'][0], rtol=_RTOL)

  def test_dice_ce_from_logits_grad_finite_at_extreme_logits(self):
    logits = jnp.array([-1e4, -200.0, -30.0, 0.0, 30.0, 200.0, 1e4, 50.0],
                       jnp.float32).reshape(2, 2, 2, 1)
    target = jnp.array([1, 0, 1, 0, 0, 1, 0, 1], jnp.float32).reshape(2, 2, 2, 1)
    value, grad = jax.value_and_grad(
        lambda x: losses.dice_ce_from_logits(x, target))(logits)
    assert np.isfinite(float(value))
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    # The badly wrong pixels (target 1 at -1e4, target 0 at +1e4) still get a push.
    assert grad.reshape(-1)[0] < 0 and grad.reshape(-1)[6] > 0

  def test_dice_ce_grad_finite_at_saturated_probs(self):
    probs = jnp.array([0.0, 1.0, 0.5, 1.0], jnp.float32).reshape(1, 2, 2, 1)
    target = jnp.array([1, 0, 1, 1], jnp.float32).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda p: losses.dice_ce(p, target))(probs)
    assert np.all(np.isfinite(np.asarray(grad)))
