"""Segmentation metrics (DESIGN.md section 5): per-image functions on device, sums on host.

Per image, probabilities are thresholded at 0.5 and Dice = 2|P n G| / (|P| + |G|),
IoU = |P n G| / |P u G|; an image whose prediction and ground truth are both empty scores 1.
The paper reports the mean (and std) of these over the test images.

Besides the headline ``Dice``/``IoU``, the authors' evaluation logs three variants, all
reproduced here and pinned by the ``losses_and_metrics`` fixture:

* ``pDice`` (``soft_dice_per_image``): Dice on the raw probabilities with squared
  denominators (V-Net form), ``(2 sum(p t) + 1e-7) / (sum(p^2) + sum(t^2) + 1e-7)``.
* ``mDice`` / ``mIoU`` (``mean_dice_iou_per_image``): the mean over the two classes
  (foreground, background) of the thresholded Dice / IoU, each class scoring 1 when empty in
  both prediction and target.

Jitted steps return sums and counts (``metric_sums``) with padding rows masked out; the host
adds them up (``accumulate``, ``add_sums``) and reduces at the end (``summarize_sums``), or
reduces lists of per-image values (``summarize``) when per-image scores are kept anyway.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Keys of a metric-sums dict; every value is a scalar sum or count.
SUM_KEYS = ('dice', 'dice_sq', 'iou', 'iou_sq', 'count', 'empty_count')


def binarize(probs: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Hard mask ``probs > threshold`` as float (1.0 foreground, 0.0 background).

  Args:
    probs: probabilities, any shape.
    threshold: strict lower bound for foreground (authors: 0.5).

  Returns:
    An array of 0.0/1.0 in the dtype of ``probs``.
  """
  return (probs > threshold).astype(probs.dtype)


def _flat(x: jax.Array) -> jax.Array:
  """(B, ...) -> (B, N) float32."""
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


def _dice_iou_binary(pred: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dice and IoU of flat binary masks (B, N); both empty scores 1."""
  inter = jnp.sum(pred * target, axis=1)
  total = jnp.sum(pred, axis=1) + jnp.sum(target, axis=1)
  union = total - inter
  # Both empty <=> total == 0; the safe denominator avoids 0/0 in the unused branch.
  empty = total == 0
  dice = jnp.where(empty, 1.0, 2.0 * inter / jnp.where(empty, 1.0, total))
  iou = jnp.where(empty, 1.0, inter / jnp.where(empty, 1.0, union))
  return dice, iou


def dice_iou_per_image(probs: jax.Array, target: jax.Array,
                       threshold: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Thresholded Dice and IoU of every image (the paper's metrics).

  Args:
    probs: (B, H, W, 1) probabilities (sigmoid of the logits).
    target: (B, H, W, 1) ground-truth masks (values > 0.5 are foreground).
    threshold: probability threshold (authors: 0.5).

  Returns:
    ``(dice, iou)``, each (B,) float32; 1.0 where prediction and target are both empty.
  """
  return _dice_iou_binary(_flat(binarize(probs, threshold)),
                          _flat(binarize(target, 0.5)))


def mean_dice_iou_per_image(probs: jax.Array, target: jax.Array,
                            threshold: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Class-averaged Dice and IoU of every image (the authors' ``mDice`` / ``mIoU``).

  The average over foreground and background of the thresholded Dice (IoU), each class
  scoring 1 when it is empty in both prediction and target.

  Args:
    probs: (B, H, W, 1) probabilities.
    target: (B, H, W, 1) ground-truth masks.
    threshold: probability threshold.

  Returns:
    ``(mdice, miou)``, each (B,) float32.
  """
  pred = _flat(binarize(probs, threshold))
  gt = _flat(binarize(target, 0.5))
  dice_fg, iou_fg = _dice_iou_binary(pred, gt)
  dice_bg, iou_bg = _dice_iou_binary(1.0 - pred, 1.0 - gt)
  return 0.5 * (dice_fg + dice_bg), 0.5 * (iou_fg + iou_bg)


def soft_dice_per_image(probs: jax.Array, target: jax.Array, *,
                        smooth: float = 1e-7) -> jax.Array:
  """Soft Dice on probabilities with squared denominators (the authors' ``pDice``).

  ``(2 sum(p t) + smooth) / (sum(p^2) + sum(t^2) + smooth)``; no threshold, so it tracks
  calibration as well as overlap. An empty target gives about 0, not 1.

  Args:
    probs: (B, H, W, 1) probabilities.
    target: (B, H, W, 1) ground-truth masks.
    smooth: additive smoothing (authors: 1e-7).

  Returns:
    (B,) float32 scores.
  """
  p = _flat(probs)
  t = _flat(target)
  inter = jnp.sum(p * t, axis=1)
  denom = jnp.sum(p * p, axis=1) + jnp.sum(t * t, axis=1)
  return (2.0 * inter + smooth) / (denom + smooth)


def metric_sums(dice: jax.Array, iou: jax.Array, valid: jax.Array,
                empty: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums and counts of per-image scores over the valid rows (jit-safe).

  Args:
    dice: (B,) per-image Dice.
    iou: (B,) per-image IoU.
    valid: (B,) bool, False for padding rows (they add nothing).
    empty: optional (B,) bool, True where the ground truth is empty; counted into
      ``empty_count`` (0 when omitted).

  Returns:
    A dict with the scalar float32 entries of ``SUM_KEYS``: sums of the scores and of their
    squares (for the std), the number of valid rows, and of valid rows with empty ground
    truth.
  """
  w = valid.astype(jnp.float32)
  dice = dice.astype(jnp.float32)
  iou = iou.astype(jnp.float32)
  empty_count = (jnp.sum(w * empty.astype(jnp.float32)) if empty is not None
                 else jnp.zeros((), jnp.float32))
  # where(), not w * x: a NaN in a padding row must not leak into the sums.
  return {
      'dice': jnp.sum(jnp.where(valid, dice, 0.0)),
      'dice_sq': jnp.sum(jnp.where(valid, dice * dice, 0.0)),
      'iou': jnp.sum(jnp.where(valid, iou, 0.0)),
      'iou_sq': jnp.sum(jnp.where(valid, iou * iou, 0.0)),
      'count': jnp.sum(w),
      'empty_count': empty_count,
  }


def batch_metric_sums(probs: jax.Array, target: jax.Array, valid: jax.Array,
                      threshold: float = 0.5) -> dict[str, jax.Array]:
  """``metric_sums`` of a batch straight from probabilities (what an eval step returns).

  Args:
    probs: (B, H, W, 1) probabilities.
    target: (B, H, W, 1) ground-truth masks.
    valid: (B,) bool, False for padding rows.
    threshold: probability threshold.

  Returns:
    The dict of ``metric_sums``, with ``empty_count`` counting empty ground truths.
  """
  dice, iou = dice_iou_per_image(probs, target, threshold)
  empty = jnp.sum(_flat(binarize(target, 0.5)), axis=1) == 0
  return metric_sums(dice, iou, valid, empty)


def _zero_sums() -> dict[str, float]:
  return {k: 0.0 for k in SUM_KEYS}


def add_sums(a: Mapping[str, object] | None,
             b: Mapping[str, object]) -> dict[str, float]:
  """Adds two metric-sums dicts on the host in float64 (``a`` may be None or empty).

  Args:
    a: running sums, or None to start from zero.
    b: sums to add (e.g. a jitted step's ``metric_sums`` output, device arrays are fine).

  Returns:
    A new dict of Python floats; neither input is modified.
  """
  base = _zero_sums() if not a else dict(a)
  missing = [k for k in SUM_KEYS if k not in b]
  if missing:
    raise KeyError(f'metric sums are missing {missing}; build them with metric_sums().')
  return {k: float(base[k]) + float(np.asarray(b[k], np.float64)) for k in SUM_KEYS}


def accumulate(sums: Mapping[str, object] | None, dice: object, iou: object,
               valid: object, empty: object | None = None) -> dict[str, float]:
  """Adds a batch of per-image scores to running sums on the host (padding masked out).

  Args:
    sums: running sums (a dict of ``SUM_KEYS``), or None to start from zero.
    dice: (B,) per-image Dice (numpy or device array).
    iou: (B,) per-image IoU.
    valid: (B,) bool, False for padding rows.
    empty: optional (B,) bool, True where the ground truth is empty.

  Returns:
    A new dict of Python floats.
  """
  valid = np.asarray(valid, bool)
  dice = np.asarray(dice, np.float64)
  iou = np.asarray(iou, np.float64)
  if not dice.shape == iou.shape == valid.shape:
    raise ValueError(f'accumulate(): dice {dice.shape}, iou {iou.shape} and valid '
                     f'{valid.shape} must all be (B,), one value per row.')
  dice, iou = dice[valid], iou[valid]
  batch = {
      'dice': dice.sum(), 'dice_sq': np.square(dice).sum(),
      'iou': iou.sum(), 'iou_sq': np.square(iou).sum(),
      'count': float(valid.sum()),
      'empty_count': (float(np.asarray(empty, bool)[valid].sum()) if empty is not None
                      else 0.0),
  }
  return add_sums(sums, batch)


def _mean_std(total: float, total_sq: float, count: float) -> tuple[float, float]:
  if count == 0:
    return float('nan'), float('nan')
  mean = total / count
  # Clamp: the one-pass variance can come out a hair below 0 from rounding.
  return mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))


def summarize_sums(sums: Mapping[str, object]) -> dict[str, float]:
  """Mean and (population) std of Dice and IoU from accumulated sums.

  Args:
    sums: a dict of ``SUM_KEYS`` (from ``accumulate`` / ``add_sums``).

  Returns:
    ``{'dice_mean', 'dice_std', 'iou_mean', 'iou_std', 'count', 'empty_count'}``; means
    and stds are NaN when ``count`` is 0.
  """
  s = add_sums(None, sums)
  dice_mean, dice_std = _mean_std(s['dice'], s['dice_sq'], s['count'])
  iou_mean, iou_std = _mean_std(s['iou'], s['iou_sq'], s['count'])
  return {'dice_mean': dice_mean, 'dice_std': dice_std, 'iou_mean': iou_mean,
          'iou_std': iou_std, 'count': int(s['count']),
          'empty_count': int(s['empty_count'])}


def summarize(per_image_lists: Mapping[str, Sequence[float]]) -> dict[str, float]:
  """Mean and (population) std from lists of per-image scores of the valid images.

  Args:
    per_image_lists: ``{'dice': [...], 'iou': [...]}`` and optionally ``'empty': [...]``
      (bools, True where the ground truth is empty), one entry per image.

  Returns:
    The same dict as ``summarize_sums``.
  """
  if 'dice' not in per_image_lists or 'iou' not in per_image_lists:
    raise KeyError("summarize() needs 'dice' and 'iou' lists of per-image scores.")
  dice = np.asarray(per_image_lists['dice'], np.float64).reshape(-1)
  iou = np.asarray(per_image_lists['iou'], np.float64).reshape(-1)
  if dice.shape != iou.shape:
    raise ValueError(f"summarize(): {dice.size} dice but {iou.size} iou values; "
                     'give one of each per image.')
  empty = per_image_lists.get('empty')
  sums = accumulate(None, dice, iou, np.ones(dice.shape, bool), empty)
  return summarize_sums(sums)
