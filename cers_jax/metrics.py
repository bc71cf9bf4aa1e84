"""Segmentation metrics, per image and jit-safe (docs/design.md section 11).

Probabilities are thresholded at 0.5; Dice = 2|P n G| / (|P| + |G|), IoU = |P n G| / |P u G|,
and an image whose prediction and ground truth are both empty scores 1. The paper reports the
mean (and std) over the test images. The authors' evaluation also logs ``pDice``
(``soft_dice_per_image``) and ``mDice`` / ``mIoU`` (``mean_dice_iou_per_image``); all are
pinned by the ``losses_and_metrics`` fixture. Host-side numpy metrics live beside this
module: surface distances (HD95, ASSD, NSD) in ``cers_jax.surface``, the Dice pooled over a
dataset, bootstrap intervals and paired tests in ``cers_jax.stats``.
"""

import jax
import jax.numpy as jnp


def binarize(probs: jax.Array, threshold: float = 0.5) -> jax.Array:
  """``probs > threshold`` (strict) as 0.0/1.0 in the dtype of ``probs``."""
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

  ``probs`` and ``target`` are (B, H, W, 1); returns two (B,) float32 arrays, 1.0 where
  prediction and target are both empty.
  """
  return _dice_iou_binary(_flat(binarize(probs, threshold)),
                          _flat(binarize(target, 0.5)))


def mean_dice_iou_per_image(probs: jax.Array, target: jax.Array,
                            threshold: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """The authors' ``mDice`` / ``mIoU``: (B,) Dice and IoU averaged over fg and bg.

  Each class scores 1 when it is empty in both prediction and target.
  """
  pred = _flat(binarize(probs, threshold))
  gt = _flat(binarize(target, 0.5))
  dice_fg, iou_fg = _dice_iou_binary(pred, gt)
  dice_bg, iou_bg = _dice_iou_binary(1.0 - pred, 1.0 - gt)
  return 0.5 * (dice_fg + dice_bg), 0.5 * (iou_fg + iou_bg)


def soft_dice_per_image(probs: jax.Array, target: jax.Array, *,
                        smooth: float = 1e-7) -> jax.Array:
  """The authors' ``pDice``: (B,) ``(2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s)``.

  No threshold, so it tracks calibration as well as overlap; an empty target gives about 0,
  not 1.
  """
  p = _flat(probs)
  t = _flat(target)
  inter = jnp.sum(p * t, axis=1)
  denom = jnp.sum(p * p, axis=1) + jnp.sum(t * t, axis=1)
  return (2.0 * inter + smooth) / (denom + smooth)
