"""Mean Teacher's loss, noise, ramp-up and teacher update against a numpy transcription of
HiLab-git/SSL4MIS `code/train_mean_teacher_2D.py` (and its utils/losses.py `DiceLoss`,
utils/ramps.py `sigmoid_rampup`), written from reading that code, on fixed inputs; then one
jitted step on a tiny ConvNeXt U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cers_jax.methods import mean_teacher as mt
from cers_jax.methods import student as st
from tests.run_configs import tiny_run


# --- numpy transcription of SSL4MIS (NCHW, softmax over 2 classes) -------------------------

def _softmax(logits):  # (B, 2, H, W)
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _ssl4mis_dice_loss(inputs, target, n_classes=2):
  """DiceLoss(n_classes)(inputs, target[:, None]): one-hot target, per class
  1 - (2 sum(s t) + 1e-5) / (sum(s s) + sum(t t) + 1e-5), summed and divided by n."""
  one_hot = np.concatenate([(target == i) for i in range(n_classes)], axis=1).astype(float)
  loss = 0.0
  for i in range(n_classes):
    score, truth = inputs[:, i], one_hot[:, i]
    intersect = np.sum(score * truth)
    loss += 1 - (2 * intersect + 1e-5) / (np.sum(score * score) + np.sum(truth * truth) + 1e-5)
  return loss / n_classes


def _ssl4mis_ce(logits, target):  # CrossEntropyLoss(): mean over pixels
  log_p = np.log(_softmax(logits))
  picked = np.take_along_axis(log_p, target[:, None].astype(int), axis=1)
  return -picked.mean()


def _ssl4mis_rampup(current, rampup_length):
  if rampup_length == 0:
    return 1.0
  current = np.clip(current, 0.0, rampup_length)
  phase = 1.0 - current / rampup_length
  return float(np.exp(-5.0 * phase * phase))


def _ssl4mis_ema(ema_params, params, alpha, global_step):
  alpha = min(1 - 1 / (global_step + 1), alpha)
  return [e * alpha + (1 - alpha) * p for e, p in zip(ema_params, params)]


def _two_class_logits(seed, shape=(3, 2, 8, 8)):
  return np.random.default_rng(seed).normal(size=shape) * 2.0


def _nhwc_foreground_logit(logits):  # The sigmoid logit of 2-class logits (B, 2, H, W).
  return jnp.asarray((logits[:, 1] - logits[:, 0])[..., None], jnp.float32)


def test_supervised_loss_is_ssl4mis_half_dice_plus_ce():
  logits = _two_class_logits(0)
  target = (np.random.default_rng(1).uniform(size=(3, 8, 8)) > 0.6).astype(np.int64)
  want = 0.5 * (_ssl4mis_dice_loss(_softmax(logits), target[:, None])
                + _ssl4mis_ce(logits, target))
  got = jax.jit(mt.supervised_loss)(_nhwc_foreground_logit(logits),
                                    jnp.asarray(target[..., None], jnp.float32))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_consistency_is_the_mean_squared_softmax_difference():
  student, teacher = _softmax(_two_class_logits(2)), _softmax(_two_class_logits(3))
  want = np.mean((student - teacher) ** 2)
  p = jax.nn.sigmoid(_nhwc_foreground_logit(_two_class_logits(2)))
  q = jax.nn.sigmoid(_nhwc_foreground_logit(_two_class_logits(3)))
  np.testing.assert_allclose(float(jnp.mean((p - q) ** 2)), want, rtol=1e-5)


@pytest.mark.parametrize('step', [0, 1, 5, 98, 99, 100, 5000])
def test_ema_alpha_and_update_follow_update_ema_variables(step):
  rng = np.random.default_rng(step)
  teacher, student = [rng.normal(size=(4, 3))], [rng.normal(size=(4, 3))]
  want = _ssl4mis_ema(teacher, student, 0.99, step)[0]
  alpha = mt.ema_alpha(jnp.asarray(step, jnp.int32), 0.99)
  got = st.ema({'w': jnp.asarray(teacher[0])}, {'w': jnp.asarray(student[0])}, alpha)['w']
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


def test_ramp_and_noise():
  # Their weight at iteration i of 30,000: 0.1 * sigmoid_rampup(i // 150, 200); ours ramps
  # over the same horizon without the 150-iteration stairs.
  for i in (0, 150, 7500, 15000, 29999, 30000, 40000):
    want = 0.1 * _ssl4mis_rampup(i // 150, 200.0)
    got = float(mt.consistency_weight(jnp.asarray(i // 150 * 150), 30000, consistency=0.1,
                                      rampup=1.0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  noise = np.asarray(mt.teacher_noise(jax.random.key(0), (4096,), 0.1, 0.2))
  assert noise.min() >= -0.2 and noise.max() <= 0.2
  assert abs(noise.std() - 0.1) < 0.01 and (np.abs(noise) == 0.2).mean() > 0.02  # Clamped.


def test_semi_step_moves_the_student_and_averages_the_teacher_with_their_alpha():
  config = tiny_run.get_config()
  model = st.build_network(config, 1)
  tx = optax.sgd(0.1)
  graphdef, state = st.create_state(model, tx, rng=jax.random.key(0), with_teacher=True)
  state = state.replace(step=jnp.asarray(3, jnp.int32))
  rng = np.random.default_rng(0)
  batch = lambda: {'image': jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),  # noqa: E731
                   'mask': jnp.asarray(rng.uniform(size=(4, 32, 32, 1)) > 0.7, jnp.float32)}
  hyper = mt.Hyper()
  step = jax.jit(lambda s, l, u: mt.semi_step(s, l, u, graphdef=graphdef, tx=tx, cfg=hyper,
                                              semi_start=2, semi_total=10))
  before_teacher = state.teacher.params
  new, metrics = step(state, batch(), batch())
  alpha = min(1 - 1 / (3 + 1), 0.99)  # Their iter_num is the step count before the update.
  want = jax.tree.map(lambda t, s: alpha * t + (1 - alpha) * s, before_teacher, new.params)
  for got_leaf, want_leaf in zip(jax.tree.leaves(new.teacher.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), atol=1e-6)
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                   jax.tree.leaves(new.params))]
  assert any(changed) and int(new.step) == 4
  weight = 0.1 * _ssl4mis_rampup(1.0, 10.0)  # One step into a 10-step ramp.
  np.testing.assert_allclose(float(metrics['consistency_weight']), weight, rtol=1e-5)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['consistency']) > 0
