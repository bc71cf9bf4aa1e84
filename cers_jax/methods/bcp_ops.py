"""Bidirectional Copy-Paste (BCP) as pure, jit-safe operations on a one-logit binary head.

Bai, Chen, Li, Shen, Wang, "Bidirectional Copy-Paste for Semi-Supervised Medical Image
Segmentation", CVPR 2023 (arXiv 2305.00673). Reference: the authors' 2D ACDC script
``code/ACDC_BCP_train.py`` and ``code/utils/losses.py`` in github.com/DeepMed-Lab-ECNU/BCP
(read at commit 7879f98, 2024-07-21). Line numbers below refer to that script.

Their ACDC 2D hyperparameters (argparse defaults, lines 37-54, and the code that uses them):

  pre-train iterations   10000 (``--pre_iterations``)
  self-train iterations  30000 (``--max_iterations``)
  batch                  24 slices = 12 labeled + 12 unlabeled (``--batch_size``,
                         ``--labeled_bs``); each half is split in two sub-batches of 6
                         (``img_a``/``img_b``, ``uimg_a``/``uimg_b``)
  input                  256 x 256 slices (``--patch_size``), 1 channel, 4 classes
  optimizer              SGD, lr 0.01 constant (no decay in this script), momentum 0.9,
                         weight decay 1e-4 (lines 223 and 334)
  u_weight               0.5: weight of the pseudo-labelled region in ``mix_loss``
  EMA decay              0.99 fixed, every self-train step (line 390)
  copy-paste box         one zero box of int(256 * 2/3) = 170 per side, top-left corner
                         uniform in [0, 86) per axis, shared by the whole batch and by
                         both mixes of a step (``generate_mask``, line 131)
  consistency            none: ``get_current_consistency_weight`` (``--consistency`` 0.1,
                         rampup 200) is computed at line 370 but only logged, never in the
                         loss; ``--magnitude`` and ``--s_param`` are unused
  labeled data           ``--labelnum`` 7 patients = the first 136 slices (10 %); 3 -> 68 (5 %)
  augmentation           per slice (dataloaders/dataset.py): p=0.5 random rot90 + flip,
                         else p=0.25 rotation in [-20, 20) degrees (order 0); then a
                         nearest-neighbour resize to 256
  model selection        student validated every 200 iterations (mean Dice over classes);
                         the best pre-train checkpoint starts the self-train stage
  network                ``UNet_2d``: 16-32-64-128-256 channels, BatchNorm, encoder dropout
                         0.05/0.1/0.2/0.3/0.5

Procedure (``M`` is the box mask: 1 outside the box, 0 inside):

  pre-train (labeled only; the unlabeled half of each batch is loaded and ignored):
    x = mix(img_a, img_b, M); the student is trained on x with
    (dice + ce) / 2 of ``mix_loss(out, lab_a, lab_b, M, image_weight=1, patch_weight=1)``.
  self-train: student and teacher both start from the best pre-train checkpoint (the
    student also restores its SGD momentum). Per step, with one fresh ``M``:
    1. teacher (no grad, but in train mode: dropout on, BatchNorm batch statistics of each
       6-slice sub-batch) -> pseudo labels plab_a, plab_b of uimg_a, uimg_b: argmax, then
       per class the largest connected component (``pseudo_label``);
    2. inward:  x_unl = mix(uimg_a, img_a, M), supervised by plab_a outside the box
       (weight u_weight = 0.5) and lab_a inside (weight 1);
       outward: x_l = mix(img_b, uimg_b, M), supervised by lab_b outside (weight 1) and
       plab_b inside (weight u_weight = 0.5);
    3. loss = ``mix_loss(x_unl ...) + mix_loss(x_l ...)`` (each already (dice + ce) / 2),
       two separate student forward passes; one SGD step;
    4. ``ema_update(teacher, student, 0.99)`` over every state-dict entry, BatchNorm
       statistics included (a teacher that always runs in train mode never reads them).
  The ground truth of the unlabeled slices is loaded but only drawn in TensorBoard.

What differs here: the head is one sigmoid logit per pixel (binary segmentation), so the
2-class softmax of their code becomes sigmoid(z) for the foreground and sigmoid(-z) for the
background; their CE becomes BCE from logits, their 2-class Dice the mean of the foreground
and background Dice, their argmax ``z > 0``. All are exact for 2-class logits whose
difference (foreground minus background) is z. Arrays are NHWC: images and masks
``(B, H, W, C)``, labels, logits and loss masks ``(B, H, W, 1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# DiceLoss._dice_mask_loss smoothing (utils/losses.py) and the CE denominator guard of
# mix_loss (ACDC_BCP_train.py line 177).
_DICE_SMOOTH = 1e-10
_CE_EPS = 1e-16


def patch_side(image_size: int, ratio: float = 2 / 3) -> int:
  """Side of the copy-paste box, ``int(image_size * ratio)`` as ``generate_mask``.

  Raises:
    ValueError: when the box leaves no room for a random corner, where their
      ``np.random.randint(0, image_size - patch)`` would raise as well.
  """
  patch = int(image_size * ratio)
  if not 0 < patch < image_size:
    raise ValueError(f'bcp_ops.patch_side: a box of ratio {ratio} on a {image_size}-pixel '
                     f'image has side {patch}; it needs 0 < side < {image_size}. Pick a '
                     'ratio in (1 / image_size, 1 - 1 / image_size).')
  return patch


def box_mask(image_size: int, corner_y: jax.Array | int, corner_x: jax.Array | int,
             patch: int) -> jax.Array:
  """(H, W, 1) float32 ones with zeros on rows [y, y + patch) and columns [x, x + patch).

  The corner may be traced, so the random mask and a test's fixed one share this code.
  """
  rows = jnp.arange(image_size)[:, None]
  cols = jnp.arange(image_size)[None, :]
  inside = ((rows >= corner_y) & (rows < corner_y + patch)
            & (cols >= corner_x) & (cols < corner_x + patch))
  return jnp.where(inside, 0.0, 1.0).astype(jnp.float32)[..., None]


def copy_paste_mask(key: jax.Array, image_size: int, ratio: float = 2 / 3) -> jax.Array:
  """BCP's ``generate_mask``: (H, W, 1) ones with one zero box at a random position.

  The box has side ``patch_side(image_size, ratio)`` (170 for 256); each corner coordinate
  is uniform in ``[0, image_size - patch)`` (upper bound exclusive, as numpy's randint), so
  the box never touches the last row or column. One mask serves the whole batch and both
  mixes of a step, as in their code; broadcast it against ``(B, H, W, C)``.
  """
  patch = patch_side(image_size, ratio)
  key_y, key_x = jax.random.split(key)
  corner_y = jax.random.randint(key_y, (), 0, image_size - patch)
  corner_x = jax.random.randint(key_x, (), 0, image_size - patch)
  return box_mask(image_size, corner_y, corner_x, patch)


def mix(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
  """``a * mask + b * (1 - mask)``: ``a`` outside the box (mask 1), ``b`` pasted inside.

  Used alike for images and for labels. Their three mixes, by variable name:

  * pre-train ``net_input = img_a * img_mask + img_b * (1 - img_mask)``:
    ``mix(img_a, img_b, m)``, two labeled images; labels ``mix(lab_a, lab_b, m)``.
  * self-train inward ``net_input_unl = uimg_a * img_mask + img_a * (1 - img_mask)``:
    ``mix(uimg_a, img_a, m)``, an unlabeled image around a labeled patch; labels
    ``mix(plab_a, lab_a, m)``.
  * self-train outward ``net_input_l = img_b * img_mask + uimg_b * (1 - img_mask)``:
    ``mix(img_b, uimg_b, m)``, a labeled image around an unlabeled patch; labels
    ``mix(lab_b, plab_b, m)``.
  """
  mask = mask.astype(a.dtype)
  return a * mask + b * (1 - mask)


def _masked_dice(probs: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """One class of their ``DiceLoss._dice_mask_loss``: squared sums over the whole batch."""
  intersect = jnp.sum(probs * target * mask)
  y_sum = jnp.sum(target * target * mask)
  z_sum = jnp.sum(probs * probs * mask)
  return 1.0 - (2.0 * intersect + _DICE_SMOOTH) / (z_sum + y_sum + _DICE_SMOOTH)


def masked_dice_loss(logits: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Their ``DiceLoss(n_classes=2)(softmax, target, mask)`` for a one-logit head.

  Their loss averages the per-class Dice over every class, background included, each
  pooled over the whole batch (not per image), with squared probabilities and targets in
  the denominator and smoothing 1e-10. Here: the mean of the foreground Dice on
  ``sigmoid(z)`` against ``target`` and the background Dice on ``sigmoid(-z)`` against
  ``1 - target``. Their losses.py before 2023-10-29 (issue #25) applied no mask to the
  background class; this follows the fixed code, the mask on both.

  Args:
    logits: (B, H, W, 1) foreground logits.
    target: (B, H, W, 1) {0, 1} labels.
    mask: (B, H, W, 1) or broadcastable; 1 where the pixel counts.
  """
  mask = jnp.broadcast_to(mask, logits.shape).astype(logits.dtype)
  foreground = _masked_dice(jax.nn.sigmoid(logits), target, mask)
  background = _masked_dice(jax.nn.sigmoid(-logits), 1.0 - target, mask)
  return 0.5 * (foreground + background)


def masked_bce_from_logits(logits: jax.Array, target: jax.Array,
                           mask: jax.Array) -> jax.Array:
  """``sum(CE * mask) / (sum(mask) + 1e-16)`` of ``mix_loss`` with BCE as the CE.

  BCE from logits is their 2-class softmax cross-entropy written for a sigmoid: exact when
  the two class logits differ by ``z``. Pooled over the whole batch, as theirs.
  """
  mask = jnp.broadcast_to(mask, logits.shape).astype(logits.dtype)
  pixel = -(target * jax.nn.log_sigmoid(logits)
            + (1.0 - target) * jax.nn.log_sigmoid(-logits))
  return jnp.sum(pixel * mask) / (jnp.sum(mask) + _CE_EPS)


def mix_loss_terms(logits: jax.Array, image_label: jax.Array, patch_label: jax.Array,
                   mask: jax.Array, *, image_weight: float | jax.Array,
                   patch_weight: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """Their ``mix_loss``: the weighted (dice, ce) pair, before the ``/ 2``.

  ``image_label`` supervises where ``mask`` is 1 (outside the box), ``patch_label`` where
  it is 0 (the pasted box), each by masked Dice and masked BCE. Their call sites map to:

  * pre-train: ``image_weight=1, patch_weight=1``;
  * inward (``out_unl``, ``unlab=True``): image plab_a, patch lab_a,
    ``image_weight=u_weight, patch_weight=1``;
  * outward (``out_l``): image lab_b, patch plab_b, ``image_weight=1,
    patch_weight=u_weight``.

  Args:
    logits: (B, H, W, 1) foreground logits of the mixed image.
    image_label: (B, H, W, 1) {0, 1} label of the image around the box.
    patch_label: (B, H, W, 1) {0, 1} label of the pasted image.
    mask: (B, H, W, 1) or (H, W, 1) box mask, 1 outside the box.
    image_weight: weight of the terms outside the box.
    patch_weight: weight of the terms inside the box.

  Returns:
    (dice, ce), each the sum of its two weighted region terms.
  """
  mask = jnp.broadcast_to(mask, logits.shape).astype(logits.dtype)
  patch_mask = 1.0 - mask
  dice = (image_weight * masked_dice_loss(logits, image_label, mask)
          + patch_weight * masked_dice_loss(logits, patch_label, patch_mask))
  ce = (image_weight * masked_bce_from_logits(logits, image_label, mask)
        + patch_weight * masked_bce_from_logits(logits, patch_label, patch_mask))
  return dice, ce


def mix_loss(logits: jax.Array, image_label: jax.Array, patch_label: jax.Array,
             mask: jax.Array, *, image_weight: float | jax.Array,
             patch_weight: float | jax.Array) -> jax.Array:
  """``(dice + ce) / 2`` of ``mix_loss_terms``: one mixed image's share of their loss.

  Their self-train loss ``(unl_dice + l_dice + unl_ce + l_ce) / 2`` is the sum of this for
  the inward and the outward mix; their pre-train loss is this for the one mix.
  """
  dice, ce = mix_loss_terms(logits, image_label, patch_label, mask,
                            image_weight=image_weight, patch_weight=patch_weight)
  return 0.5 * (dice + ce)


def _propagate_min_labels(labels: jax.Array, foreground: jax.Array,
                          sentinel: int) -> jax.Array:
  """One round: 3x3 min over foreground neighbours, then one pointer jump.

  Invariant: a foreground pixel's label is the flat index of a pixel of its own
  component. The jump (label of the pixel the label names) keeps it and lets a value cross
  many pixels per round, so long snakes need far fewer rounds than their length.
  """
  batch = labels.shape[0]
  # Background holds the sentinel, larger than any index, so it never wins a min.
  pooled = jax.lax.reduce_window(labels, sentinel, jax.lax.min, (1, 3, 3), (1, 1, 1),
                                 'SAME')
  pooled = jnp.where(foreground, pooled, sentinel)
  flat = pooled.reshape(batch, -1)
  fg_flat = foreground.reshape(batch, -1)
  jumped = jnp.take_along_axis(flat, jnp.where(fg_flat, flat, 0), axis=1)
  flat = jnp.where(fg_flat, jnp.minimum(flat, jumped), sentinel)
  return flat.reshape(labels.shape)


def component_labels(mask: jax.Array) -> jax.Array:
  """(B, H, W) int32: each 8-connected foreground component labelled by its first pixel.

  The label is the smallest row-major flat index (within the image) of the component;
  background gets ``H * W``. 8-connectivity matches ``skimage.measure.label``'s default
  in 2D (connectivity = ndim), which their ``get_ACDC_2DLargestCC`` uses.

  Args:
    mask: (B, H, W) or (B, H, W, 1) boolean foreground.
  """
  foreground = mask.reshape(mask.shape[:3]).astype(bool)
  _, height, width = foreground.shape
  sentinel = height * width
  index = jnp.arange(sentinel, dtype=jnp.int32).reshape(1, height, width)
  initial = jnp.where(foreground, index, sentinel).astype(jnp.int32)

  def body(state):
    labels, _ = state
    updated = _propagate_min_labels(labels, foreground, sentinel)
    return updated, jnp.any(updated != labels)

  labels, _ = jax.lax.while_loop(lambda state: state[1], body,
                                 (initial, jnp.asarray(True)))
  return labels


def largest_component(mask: jax.Array) -> jax.Array:
  """Keep, per image, only the largest 8-connected foreground component.

  Their ``get_ACDC_2DLargestCC`` for one foreground class: images with no foreground stay
  empty. Ties go to the component whose first pixel comes first in row-major order, as
  theirs (skimage numbers components in raster order and ``np.argmax`` takes the first
  maximum). jit-safe with static shapes; the propagation loop runs until no label changes.

  Args:
    mask: (B, H, W, 1) boolean (or {0, 1}) foreground.

  Returns:
    (B, H, W, 1) boolean.
  """
  foreground = mask.reshape(mask.shape[:3]).astype(bool)
  batch, height, width = foreground.shape
  pixels = height * width
  labels = component_labels(foreground)
  # Segment ids unique across the batch; background pixels count into their own (empty)
  # segment, so every id stays in range.
  own_index = jnp.arange(pixels, dtype=jnp.int32).reshape(1, height, width)
  local = jnp.where(foreground, labels, own_index)
  offsets = (jnp.arange(batch, dtype=jnp.int32) * pixels).reshape(batch, 1, 1)
  segment = (local + offsets).reshape(-1)
  counts = jax.ops.segment_sum(foreground.reshape(-1).astype(jnp.int32), segment,
                               num_segments=batch * pixels)
  size = jnp.where(foreground, counts[segment].reshape(foreground.shape), 0)
  best_size = jnp.max(size, axis=(1, 2), keepdims=True)
  is_best = foreground & (size == best_size)
  chosen = jnp.min(jnp.where(is_best, labels, pixels), axis=(1, 2), keepdims=True)
  keep = foreground & (labels == chosen)
  return keep.reshape(mask.shape)


def pseudo_label(teacher_logits: jax.Array) -> jax.Array:
  """Their ``get_ACDC_masks(output, nms=1)`` for one foreground logit.

  Argmax of the 2-class softmax is ``z > 0`` (a tie, z = 0, goes to background as the
  first maximum), then ``largest_component`` per image.

  Args:
    teacher_logits: (B, H, W, 1) teacher foreground logits.

  Returns:
    (B, H, W, 1) float32 {0, 1} pseudo labels.
  """
  return largest_component(teacher_logits > 0).astype(jnp.float32)


def ema_update(teacher_params, student_params, alpha: float | jax.Array):
  """Their ``update_model_ema``: ``alpha * teacher + (1 - alpha) * student`` per leaf.

  Their alpha is a fixed 0.99 every self-train step (no ``min(1 - 1 / (step + 1), alpha)``
  warm-up). It runs over the whole ``state_dict``, so BatchNorm running means and
  variances are averaged like the weights, not copied: pass the batch statistics through
  this too. Floating leaves are averaged in their own dtype; any other leaf (a counter,
  a key) takes the student's value, where their int64 ``num_batches_tracked`` got a
  truncated average that no layer reads in train mode.

  Args:
    teacher_params: pytree of the teacher's arrays.
    student_params: pytree of the same structure from the student.
    alpha: EMA decay, Python float or traced scalar.

  Returns:
    The new teacher pytree.
  """
  def average(teacher: jax.Array, student: jax.Array) -> jax.Array:
    if not jnp.issubdtype(teacher.dtype, jnp.floating):
      return student
    return (alpha * teacher + (1 - alpha) * student).astype(teacher.dtype)

  return jax.tree.map(average, teacher_params, student_params)
