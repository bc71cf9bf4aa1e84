"""Tests for cers_jax.methods.bcp_ops against numpy transcriptions of the BCP authors' code.

The references below are written from reading github.com/DeepMed-Lab-ECNU/BCP
(``code/ACDC_BCP_train.py``, ``code/utils/losses.py``) for two classes, in float64, with
the one-logit head seen as 2-class logits ``[0, z]``. Connected components use
``scipy.ndimage.label`` with a full 3x3 structure, the 2D default of their
``skimage.measure.label``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cers_jax.methods import bcp_ops

_RTOL = 1e-5
_SIZE = 16


def _np_generate_mask(size, w, h):
  """generate_mask with its two randint draws fixed to w (rows) and h (columns)."""
  patch = int(size * 2 / 3)
  mask = np.ones((size, size))
  mask[w:w + patch, h:h + patch] = 0
  return mask


def _np_two_class_softmax(z):
  """(B, 2, H, W) softmax of the logits [0, z] from NHWC one-logit z."""
  logits = np.concatenate([np.zeros_like(z), z], axis=-1).astype(np.float64)
  logits = np.transpose(logits, (0, 3, 1, 2))
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return logits, e / e.sum(axis=1, keepdims=True)


def _np_dice_loss_masked(soft, label, mask, n_classes=2):
  """DiceLoss.forward(soft, label[:, None], mask[:, None]) of utils/losses.py."""
  loss = 0.0
  for i in range(n_classes):
    score, target = soft[:, i], (label == i).astype(np.float64)
    intersect = np.sum(score * target * mask)
    y_sum = np.sum(target * target * mask)
    z_sum = np.sum(score * score * mask)
    loss += 1 - (2 * intersect + 1e-10) / (z_sum + y_sum + 1e-10)
  return loss / n_classes


def _np_mix_loss(z, img_l, patch_l, mask, image_weight, patch_weight):
  """mix_loss of ACDC_BCP_train.py; z (B, H, W, 1), labels and mask (B, H, W)."""
  logits, soft = _np_two_class_softmax(z)
  log_soft = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  patch_mask = 1 - mask

  def ce(label):  # nn.CrossEntropyLoss(reduction='none')
    return -np.take_along_axis(log_soft, label[:, None].astype(int), axis=1)[:, 0]

  dice = _np_dice_loss_masked(soft, img_l, mask) * image_weight
  dice += _np_dice_loss_masked(soft, patch_l, patch_mask) * patch_weight
  loss_ce = image_weight * (ce(img_l) * mask).sum() / (mask.sum() + 1e-16)
  loss_ce += patch_weight * (ce(patch_l) * patch_mask).sum() / (patch_mask.sum() + 1e-16)
  return dice, loss_ce


def _np_largest_cc(segmentation):
  """get_ACDC_2DLargestCC for class 1 only; segmentation (B, H, W) of {0, 1}."""
  out = []
  for seg in segmentation:
    temp_prob = (seg == 1).astype(np.float64)
    labels, _ = ndimage.label(temp_prob, structure=np.ones((3, 3)))
    if labels.max() != 0:
      largest = labels == np.argmax(np.bincount(labels.flat)[1:]) + 1
      out.append(largest * 1.0)
    else:
      out.append(temp_prob)
  return np.stack(out)


def _np_get_masks(z):
  """get_ACDC_masks(output, nms=1): softmax, argmax (first maximum), largest component."""
  _, soft = _np_two_class_softmax(z)
  return _np_largest_cc(np.argmax(soft, axis=1))


_jit_largest = jax.jit(bcp_ops.largest_component)


def _largest(masks):
  """largest_component on (B, H, W) numpy masks, back as (B, H, W) float."""
  out = _jit_largest(jnp.asarray(masks, bool)[..., None])
  return np.asarray(out[..., 0], np.float64)


def _snake(size):
  """Serpentine path: full even rows joined alternately at the right and left ends."""
  snake = np.zeros((size, size), bool)
  snake[::2] = True
  for row in range(1, size, 2):
    snake[row, -1 if row % 4 == 1 else 0] = True
  return snake


class TestMask:

  @pytest.mark.parametrize('corner', [(0, 0), (5, 0), (2, 3), (5, 5)])
  def test_box_mask_matches_generate_mask(self, corner):
    patch = bcp_ops.patch_side(_SIZE)
    fn = jax.jit(bcp_ops.box_mask, static_argnums=(0, 3))
    out = fn(_SIZE, jnp.int32(corner[0]), jnp.int32(corner[1]), patch)
    assert out.shape == (_SIZE, _SIZE, 1) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out[..., 0], _np_generate_mask(_SIZE, *corner))

  def test_patch_side_is_their_int_two_thirds(self):
    assert bcp_ops.patch_side(256) == 170
    assert bcp_ops.patch_side(_SIZE) == int(_SIZE * 2 / 3) == 10

  def test_patch_side_without_room_fails(self):
    with pytest.raises(ValueError, match='patch_side'):
      bcp_ops.patch_side(1)
    with pytest.raises(ValueError, match='patch_side'):
      bcp_ops.patch_side(_SIZE, ratio=1.0)

  def test_random_corners_cover_randint_range(self):
    keys = jax.random.split(jax.random.key(0), 400)
    fn = jax.jit(jax.vmap(functools.partial(bcp_ops.copy_paste_mask, image_size=_SIZE)))
    masks = np.asarray(fn(keys))[..., 0]
    patch = bcp_ops.patch_side(_SIZE)
    corners = set()
    for mask in masks:
      rows, cols = np.nonzero(mask == 0)
      corner = (rows.min(), cols.min())
      # Exactly one full box, nothing else zeroed.
      np.testing.assert_array_equal(mask, _np_generate_mask(_SIZE, *corner))
      corners.add(corner)
    # numpy randint(0, 16 - 10): every corner in [0, 6) on both axes, 6 itself never.
    assert corners == {(y, x) for y in range(6) for x in range(6)}
    assert patch == 10

  def test_mix_matches_their_net_input(self):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, _SIZE, _SIZE, 1)).astype(np.float32)
    b = rng.normal(size=(2, _SIZE, _SIZE, 1)).astype(np.float32)
    mask = _np_generate_mask(_SIZE, 3, 1)
    want = a * mask[None, :, :, None] + b * (1 - mask[None, :, :, None])
    got = jax.jit(bcp_ops.mix)(a, b, jnp.asarray(mask, jnp.float32)[..., None])
    np.testing.assert_allclose(got, want, rtol=_RTOL)


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(1)
  z = (3 * rng.normal(size=(2, _SIZE, _SIZE, 1))).astype(np.float32)
  img_l = (rng.random((2, _SIZE, _SIZE)) > 0.6).astype(np.float32)
  patch_l = (rng.random((2, _SIZE, _SIZE)) > 0.3).astype(np.float32)
  mask = np.broadcast_to(_np_generate_mask(_SIZE, 4, 2), (2, _SIZE, _SIZE))
  return z, img_l, patch_l, mask


class TestMixLoss:

  @pytest.mark.parametrize('weights', [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5)])
  def test_terms_match_their_mix_loss(self, inputs, weights):
    z, img_l, patch_l, mask = inputs
    want_dice, want_ce = _np_mix_loss(z, img_l, patch_l, mask, *weights)
    fn = jax.jit(bcp_ops.mix_loss_terms)
    dice, ce = fn(z, img_l[..., None], patch_l[..., None],
                  jnp.asarray(mask[..., None], jnp.float32),
                  image_weight=weights[0], patch_weight=weights[1])
    np.testing.assert_allclose(dice, want_dice, rtol=_RTOL)
    np.testing.assert_allclose(ce, want_ce, rtol=_RTOL)
    total = jax.jit(bcp_ops.mix_loss)(
        z, img_l[..., None], patch_l[..., None], jnp.asarray(mask[0, ..., None]),
        image_weight=weights[0], patch_weight=weights[1])
    # An (H, W, 1) mask broadcasts to the batch: the CE denominators count every image.
    np.testing.assert_allclose(total, (want_dice + want_ce) / 2, rtol=_RTOL)

  def test_empty_region_gives_zero_terms(self, inputs):
    z, img_l, patch_l, _ = inputs
    ones = np.ones((2, _SIZE, _SIZE))
    want_dice, want_ce = _np_mix_loss(z, img_l, patch_l, ones, 1.0, 1.0)
    dice, ce = jax.jit(bcp_ops.mix_loss_terms)(
        z, img_l[..., None], patch_l[..., None], jnp.ones((2, _SIZE, _SIZE, 1)),
        image_weight=1.0, patch_weight=1.0)
    np.testing.assert_allclose(dice, want_dice, rtol=_RTOL)
    np.testing.assert_allclose(ce, want_ce, rtol=_RTOL)

  @pytest.mark.parametrize('scale', [1.0, 100.0])
  @pytest.mark.parametrize('all_image', [False, True])
  def test_gradient_is_finite(self, inputs, scale, all_image):
    z, img_l, patch_l, mask = inputs
    if all_image:  # The patch region is empty: its Dice is 1 - s / s, its CE 0 / 1e-16.
      mask = np.ones_like(mask)
    grad = jax.jit(jax.grad(functools.partial(
        bcp_ops.mix_loss, image_weight=0.5, patch_weight=1.0)))(
            jnp.asarray(z * scale), img_l[..., None], patch_l[..., None],
            jnp.asarray(mask[..., None], jnp.float32))
    assert np.all(np.isfinite(grad))
    assert np.any(grad != 0)


class TestLargestComponent:

  def test_two_components_of_different_sizes(self):
    masks = np.zeros((2, _SIZE, _SIZE))
    masks[0, 1:3, 1:3] = 1       # 4 pixels, first in raster order
    masks[0, 8:12, 5:10] = 1     # 20 pixels
    masks[1, 0:5, 10:16] = 1     # 30 pixels, first
    masks[1, 10:13, 0:3] = 1     # 9 pixels
    want = _np_largest_cc(masks)
    np.testing.assert_array_equal(_largest(masks), want)
    assert want[0].sum() == 20 and want[1].sum() == 30

  def test_no_foreground_stays_empty(self):
    masks = np.zeros((2, _SIZE, _SIZE))
    masks[1, 4:6, 4:6] = 1
    want = _np_largest_cc(masks)
    np.testing.assert_array_equal(_largest(masks), want)
    assert want[0].sum() == 0

  def test_diagonal_touch_is_one_component(self):
    masks = np.zeros((2, _SIZE, _SIZE))
    # Two 3x3 squares meeting at one corner (9 + 9 under 8-connectivity) beat a 12-pixel
    # block; with 4-connectivity the block would win.
    masks[0, 0:3, 0:3] = 1
    masks[0, 3:6, 3:6] = 1
    masks[0, 10:13, 8:12] = 1
    # A staircase of single pixels, connected only through corners.
    for i in range(_SIZE):
      masks[1, i, i] = 1
    masks[1, 0:3, 12:16] = 1
    want = _np_largest_cc(masks)
    np.testing.assert_array_equal(_largest(masks), want)
    assert want[0].sum() == 18 and want[1].sum() == _SIZE

  def test_tie_goes_to_first_in_raster_order(self):
    masks = np.zeros((2, _SIZE, _SIZE))
    masks[0, 9:11, 0:3] = 1      # 6 pixels, first pixel later in raster order
    masks[0, 2:4, 10:13] = 1     # 6 pixels, first pixel earlier
    masks[1, 0, 15] = 1          # 1-pixel ties, first pixel (0, 15)
    masks[1, 1, 0] = 1
    want = _np_largest_cc(masks)
    np.testing.assert_array_equal(_largest(masks), want)
    assert want[0, 2, 10] == 1 and want[1, 0, 15] == 1

  @pytest.mark.parametrize('size', [_SIZE, 64])
  def test_snake_is_one_component(self, size):
    snake = _snake(size)
    masks = np.stack([snake, np.zeros_like(snake)]).astype(np.float64)
    masks[1, size // 2:, :] = snake[size // 2:]
    np.testing.assert_array_equal(_largest(masks), _np_largest_cc(masks))
    labels = np.asarray(jax.jit(bcp_ops.component_labels)(jnp.asarray(snake)[None]))[0]
    assert set(np.unique(labels[snake])) == {0}
    assert np.all(labels[~snake] == size * size)

  def test_random_masks(self):
    rng = np.random.default_rng(2)
    masks = (rng.random((4, _SIZE, _SIZE)) > 0.55).astype(np.float64)
    np.testing.assert_array_equal(_largest(masks), _np_largest_cc(masks))

  def test_pseudo_label_matches_get_masks(self):
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, _SIZE, _SIZE, 1)).astype(np.float32)
    z[0, 5, 5, 0] = 0.0  # An exact tie goes to background, the first maximum.
    got = jax.jit(bcp_ops.pseudo_label)(z)
    assert got.shape == (2, _SIZE, _SIZE, 1) and got.dtype == jnp.float32
    np.testing.assert_array_equal(got[..., 0], _np_get_masks(z))


def test_ema_update_matches_update_model_ema():
  rng = np.random.default_rng(4)
  teacher = {'conv': {'kernel': rng.normal(size=(3, 3, 1, 4)).astype(np.float32)},
             'bn': {'mean': rng.normal(size=(4,)).astype(np.float32),
                    'var': rng.random(4).astype(np.float32)},
             'count': np.int32(7)}
  student = jax.tree.map(lambda x: (x + 1).astype(x.dtype) if x.dtype != np.int32
                         else np.int32(9), teacher)
  got = jax.jit(bcp_ops.ema_update)(teacher, student, 0.99)
  for path in (('conv', 'kernel'), ('bn', 'mean'), ('bn', 'var')):
    t, s, g = teacher[path[0]][path[1]], student[path[0]][path[1]], got[path[0]][path[1]]
    np.testing.assert_allclose(g, 0.99 * t.astype(np.float64) + 0.01 * s, rtol=_RTOL)
    assert g.dtype == t.dtype
  assert int(got['count']) == 9
