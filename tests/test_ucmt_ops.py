"""Tests for cers_jax.methods.ucmt_ops against numpy transcriptions of the authors' code.

The references below re-state github.com/Senyh/UCMT (commit ed73de5) in numpy, in the
authors' NCHW layout and 2-class softmax form: ``train.py`` L249-311 (uncertainty, UMIX),
``utils/loss_functions.py`` (DSCLoss), ``utils/ramps.py`` and ``models/deeplabv3.py``
(weighted_update). A sigmoid logit z is their 2-class logits (0, z).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cers_jax.methods import ucmt_ops

_RTOL = 1e-5
_ATOL = 1e-6


# ---- numpy transcriptions of the authors' code (NCHW, 2 classes) -------------------------

def _two_class_logits(z_nhwc):
  """(B, H, W, 1) sigmoid logits -> (B, 2, H, W) softmax logits (0, z)."""
  z = np.transpose(z_nhwc, (0, 3, 1, 2)).astype(np.float64)
  return np.concatenate([np.zeros_like(z), z], axis=1)


def _softmax(x):
  e = np.exp(x - x.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _ref_uncertainty(prob_a, prob_b):
  """train.py L249-250: entropy of the mean of two (B, 2, H, W) softmax outputs."""
  m = np.mean(np.stack([prob_a, prob_b]), axis=0)
  return -1.0 * np.sum(m * np.log(m + 1e-6), axis=1, keepdims=True)


def _unfold(x, k):
  """torch.nn.Unfold(kernel_size=(k, k), stride=k): (B, C, H, W) -> (B, C*k*k, L)."""
  b, c, h, w = x.shape
  gh, gw = h // k, w // k
  x = x.reshape(b, c, gh, k, gw, k).transpose(0, 1, 3, 5, 2, 4)  # B C kh kw gh gw
  return x.reshape(b, c * k * k, gh * gw)


def _fold(cols, c, h, w, k):
  """torch.nn.Fold with stride = kernel: the inverse of ``_unfold``."""
  b = cols.shape[0]
  gh, gw = h // k, w // k
  x = cols.reshape(b, c, k, k, gh, gw).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, c, h, w)


def _ref_sorted_patches(umap, k):
  """train.py L256-259: patch means, sorted descending (ties: lower index first)."""
  b = umap.shape[0]
  x = _unfold(umap, k).reshape(b, 1, k, k, -1)
  x_mean = np.mean(x, axis=(1, 2, 3))
  return np.argsort(-x_mean, axis=1, kind='stable')


def _ref_umix(arrays, order1, order2, k, topk):
  """train.py L265-273: the in-place patch swaps, then fold; ``arrays`` are NCHW."""
  out = []
  for a in arrays:
    b, c, h, w = a.shape
    u = _unfold(a.astype(np.float64), k).reshape(b, c, k, k, -1).copy()
    for i in range(b):
      u[i, :, :, :, order1[i, :topk]] = u[i, :, :, :, order2[i, -topk:]]
      u[i, :, :, :, order2[i, :topk]] = u[i, :, :, :, order1[i, -topk:]]
    out.append(_fold(u.reshape(b, c * k * k, -1), c, h, w, k))
  return out


def _ref_dsc(logits2, label, inter_weight=1.0, intra_weights=(1.0, 1.0)):
  """utils/loss_functions.py DSCLoss.forward on (B, 2, H, W) logits, (B, H, W) labels."""
  label = label.astype(np.int64)
  w = np.asarray(intra_weights, np.float64)
  log_p = np.log(_softmax(logits2))
  nll = -np.take_along_axis(log_p, label[:, None], axis=1)[:, 0]
  cel = np.sum(w[label] * nll) / np.sum(w[label])
  pred = _softmax(logits2)
  onehot = np.stack([label == 0, label == 1], axis=1).astype(np.float64)
  b, c = onehot.shape[:2]
  pred, onehot = pred.reshape(b, c, -1), onehot.reshape(b, c, -1)
  dice = (2.0 * (pred * onehot).sum(2) + 1e-5) / (pred.sum(2) + onehot.sum(2) + 1e-5)
  dice_loss = 1 - dice.sum(0) / b
  dicel = (dice_loss * w).mean()
  return cel * (1 - inter_weight) + dicel * inter_weight


def _ref_rampup(current, rampup_length):
  if rampup_length == 0:
    return 1.0
  current = np.clip(current, 0.0, rampup_length)
  phase = 1.0 - current / rampup_length
  return float(np.exp(-5.0 * phase * phase))


def _ref_weighted_update(t, s1, s2, coefficient=0.99, ema_decay=0.99, cur_step=None):
  if cur_step is not None:
    ema_decay = min(1 - 1 / (cur_step + 1), ema_decay)
  return t * ema_decay + coefficient * (1 - ema_decay) * s1 + (
      (1 - coefficient) * (1 - ema_decay) * s2)


def _nhwc(x_nchw):
  return np.transpose(x_nchw, (0, 2, 3, 1))


# ---- fixed inputs ------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  b, h, w = 3, 32, 32
  return {
      'z1': rng.normal(0, 2, (b, h, w, 1)).astype(np.float32),
      'z2': rng.normal(0, 2, (b, h, w, 1)).astype(np.float32),
      'zt': rng.normal(0, 2, (b, h, w, 1)).astype(np.float32),
      'image': rng.normal(0, 1, (b, h, w, 3)).astype(np.float32),
      'label': (rng.uniform(size=(b, h, w, 1)) > 0.6).astype(np.float32),
  }


# ---- tests -------------------------------------------------------------------------------

class TestUncertainty:

  def test_matches_two_class_entropy(self, data):
    p1 = _softmax(_two_class_logits(data['z1']))
    pt = _softmax(_two_class_logits(data['zt']))
    expect = _nhwc(_ref_uncertainty(p1, pt))
    fn = jax.jit(lambda a, b: ucmt_ops.mean_entropy_uncertainty(jax.nn.sigmoid(a),
                                                                jax.nn.sigmoid(b)))
    out = fn(data['z1'], data['zt'])
    assert out.shape == data['z1'].shape
    np.testing.assert_allclose(out, expect, rtol=_RTOL, atol=_ATOL)


class TestUmix:

  @pytest.mark.parametrize('grid,topk,correlated', [(16, 2, False), (4, 5, True)])
  def test_image_and_label_match_authors(self, data, grid, topk, correlated):
    # correlated=True makes U1 close to U2 so the two replacements hit shared patches,
    # where the order of the in-place writes decides the result.
    z2 = data['z1'] + 0.05 * data['z2'] if correlated else data['z2']
    pt = _softmax(_two_class_logits(data['zt']))
    u1 = _ref_uncertainty(_softmax(_two_class_logits(data['z1'])), pt)
    u2 = _ref_uncertainty(_softmax(_two_class_logits(z2)), pt)
    k = data['image'].shape[1] // grid
    order1, order2 = _ref_sorted_patches(u1, k), _ref_sorted_patches(u2, k)
    image_ref, label_ref = _ref_umix(
        [np.transpose(data['image'], (0, 3, 1, 2)),
         np.transpose(data['label'], (0, 3, 1, 2))], order1, order2, k, topk)

    @jax.jit
    def fn(z1, z2, zt, image, label):
      p_t = jax.nn.sigmoid(zt)
      v1 = ucmt_ops.mean_entropy_uncertainty(jax.nn.sigmoid(z1), p_t)
      v2 = ucmt_ops.mean_entropy_uncertainty(jax.nn.sigmoid(z2), p_t)
      idx = ucmt_ops.umix_indices(v1, v2, grid=grid, topk=topk)
      return (ucmt_ops.apply_umix(image, idx, grid=grid),
              ucmt_ops.apply_umix(label, idx, grid=grid), idx)

    image_mix, label_mix, idx = fn(data['z1'], z2, data['zt'], data['image'], data['label'])
    np.testing.assert_array_equal(idx.dst1, order1[:, :topk])
    np.testing.assert_array_equal(idx.src1, order2[:, -topk:])
    np.testing.assert_allclose(image_mix, _nhwc(image_ref), rtol=0, atol=0)
    np.testing.assert_array_equal(label_mix, _nhwc(label_ref))
    if correlated:
      overlap = [set(a) & set(b) for a, b in zip(np.asarray(idx.dst1),
                                                 np.asarray(idx.dst2))]
      assert any(overlap), 'the fixture should exercise overlapping writes'
    assert not np.array_equal(image_mix, data['image'])

  def test_patch_order_is_row_major(self):
    u = np.zeros((1, 8, 8, 1), np.float32)
    u[0, 4:8, 0:4] = 1.0  # Patch (row 1, col 0) of a 2x2 grid: index 2.
    means = ucmt_ops.patch_uncertainty(jnp.asarray(u), grid=2)
    np.testing.assert_array_equal(means, [[0.0, 0.0, 1.0, 0.0]])

  def test_rejects_indivisible_size(self):
    with pytest.raises(ValueError, match='divisible'):
      ucmt_ops.patch_uncertainty(jnp.zeros((1, 30, 32, 1)), grid=16)


class TestDscLoss:

  @pytest.mark.parametrize('inter_weight,intra', [(1.0, (1.0, 1.0)), (0.5, (1.0, 1.0)),
                                                  (0.3, (0.4, 1.7))])
  def test_matches_authors(self, data, inter_weight, intra):
    expect = _ref_dsc(_two_class_logits(data['z1']), data['label'][..., 0], inter_weight,
                      intra)
    fn = jax.jit(lambda z, y: ucmt_ops.dsc_loss_from_logits(
        z, y, inter_weight=inter_weight, class_weights=intra))
    np.testing.assert_allclose(fn(data['z1'], data['label']), expect, rtol=_RTOL)

  def test_row_weights_drop_rows(self, data):
    z, y = data['z1'], data['label']
    w = jnp.asarray([1.0, 0.0, 1.0])
    for inter_weight in (1.0, 0.5):
      full = ucmt_ops.dsc_loss_from_logits(z[[0, 2]], y[[0, 2]], inter_weight=inter_weight)
      weighted = ucmt_ops.dsc_loss_from_logits(z, y, inter_weight=inter_weight, weights=w)
      np.testing.assert_allclose(weighted, full, rtol=_RTOL)
      zero = ucmt_ops.dsc_loss_from_logits(z, y, inter_weight=inter_weight,
                                           weights=jnp.zeros(3))
      assert float(zero) == 0.0


class TestUcmtLoss:

  def _ref(self, data, s1u, s2u, ramp):
    """train.py L189-191 and L210-221 with the default DSCLoss (inter_weight 1)."""
    label = data['label'][..., 0]
    sup = (_ref_dsc(_two_class_logits(data['z1']), label)
           + _ref_dsc(_two_class_logits(data['z2']), label))
    p1, p2 = _two_class_logits(s1u), _two_class_logits(s2u)
    pseudo = np.argmax(_softmax(_two_class_logits(data['zt'])), axis=1)
    pseudo1 = np.argmax(_softmax(p1), axis=1)
    pseudo2 = np.argmax(_softmax(p2), axis=1)
    cmt = (_ref_dsc(p1, pseudo) + _ref_dsc(p2, pseudo)) * 0.5
    cps = (_ref_dsc(p1, pseudo2) + _ref_dsc(p2, pseudo1)) * 0.5
    unsup = (cps + cmt) * 0.1
    return sup + ramp * unsup, {'sup': sup, 'cmt': cmt, 'cps': cps, 'unsup': unsup}

  def test_matches_authors_and_has_finite_gradients(self, data):
    rng = np.random.default_rng(1)
    s1u = rng.normal(0, 2, data['z1'].shape).astype(np.float32)
    s2u = rng.normal(0, 2, data['z1'].shape).astype(np.float32)
    iters_per_epoch = 227
    iteration = 400
    ramp = _ref_rampup(iteration, iters_per_epoch * 5)
    expect, terms = self._ref(data, s1u, s2u, ramp)

    def loss_fn(s1l, s2l, s1u, s2u, it):
      lam = ucmt_ops.unsup_weight(it, iters_per_epoch=iters_per_epoch)
      yt = ucmt_ops.hard_pseudo_label(jnp.asarray(data['zt']))
      return ucmt_ops.ucmt_loss(s1l, s2l, data['label'], s1u, s2u, yt, ramp=lam)

    fn = jax.jit(loss_fn)
    loss, aux = fn(data['z1'], data['z2'], s1u, s2u, iteration)
    np.testing.assert_allclose(loss, expect, rtol=_RTOL)
    for name, value in terms.items():
      np.testing.assert_allclose(aux[name], value, rtol=_RTOL, err_msg=name)

    # Saturated logits included: the gradient must stay finite.
    s1u_big = s1u.copy()
    s1u_big[0, :4] = 60.0
    s1u_big[1, :4] = -60.0
    grads = jax.jit(jax.grad(lambda *a: loss_fn(*a)[0], argnums=(0, 1, 2, 3)))(
        data['z1'], data['z2'], s1u_big, s2u, iteration)
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g)))
      assert np.any(np.asarray(g) != 0)

  def test_rampup_matches_authors(self):
    its = np.array([0, 1, 300, 1134, 1135, 5000], np.float32)
    got = jax.jit(lambda i: ucmt_ops.unsup_weight(i, iters_per_epoch=227))(its)
    np.testing.assert_allclose(got, [_ref_rampup(i, 1135) for i in its], rtol=_RTOL)

  def test_hard_pseudo_label_is_argmax(self, data):
    z = data['zt'].copy()
    z[0, 0, 0, 0] = 0.0  # A tie: torch.argmax takes the first class, background.
    expect = np.argmax(_softmax(_two_class_logits(z)), axis=1)[..., None]
    np.testing.assert_array_equal(ucmt_ops.hard_pseudo_label(jnp.asarray(z)), expect)


class TestEma:

  @pytest.mark.parametrize('step', [0, 1, 5, 99, 1000])
  def test_collaborative_matches_weighted_update(self, step):
    rng = np.random.default_rng(step)
    tree = lambda: {'a': rng.normal(size=(4, 3)).astype(np.float32),
                    'b': {'c': rng.normal(size=(5,)).astype(np.float32)}}
    t, s1, s2 = tree(), tree(), tree()
    got = jax.jit(lambda t, s1, s2, k: ucmt_ops.collaborative_ema_update(
        t, s1, s2, 0.99, k))(t, s1, s2, step)
    expect = jax.tree.map(
        lambda a, b, c: _ref_weighted_update(a.astype(np.float64), b, c, cur_step=step),
        t, s1, s2)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=_RTOL, atol=_ATOL),
                 got, expect)

  def test_single_student_ema(self):
    t = {'w': np.full((3,), 2.0, np.float32)}
    s = {'w': np.full((3,), 4.0, np.float32)}
    np.testing.assert_allclose(ucmt_ops.ema_update(t, s, 0.99, 0)['w'], 4.0)
    # step 3: d = min(1 - 1/4, 0.99) = 0.75.
    np.testing.assert_allclose(ucmt_ops.ema_update(t, s, 0.99, 3)['w'], 2.5, rtol=_RTOL)
    np.testing.assert_allclose(ucmt_ops.ema_update(t, s, 0.99, 10**6)['w'],
                               0.99 * 2 + 0.01 * 4, rtol=_RTOL)
