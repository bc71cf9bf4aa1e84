"""Pure, jit-safe operations of UCMT for binary segmentation with one sigmoid logit.

UCMT: Shen, Cao, Yang, Liu, Yang, Zaiane, "Co-training with High-Confidence Pseudo Labels
for Semi-supervised Medical Image Segmentation", IJCAI 2023 (arXiv 2301.04465): an
uncertainty-guided collaborative mean teacher (CMT) plus uncertainty-guided region mix
(UMIX). Everything below is read from the authors' public code, github.com/Senyh/UCMT at
commit ed73de5: the 2D script ``train.py`` (ISIC skin lesions; the repository has no
colonoscopy script), ``models/deeplabv3.py``, ``utils/loss_functions.py``,
``utils/ramps.py``, ``data/dataset.py``. Line numbers below refer to that commit. Where the
3D script ``train_3d.py`` differs it is said so; the 2D script is the one transcribed.

Architecture (train.py L114-126): THREE SEPARATE FULL NETWORKS of the same architecture,
student 1, student 2 and one teacher; no encoder is shared. Each is DeepLabv3+ with an
ImageNet ResNet-50 (``--backbone DeepLabv3p``, the default; models/networkLib/segmodels.py
L23-27 loads the ImageNet backbone, output stride 8) or a small U-Net (``--backbone UNet``, channels
16-256, dropout 0.05-0.5 in the encoder). Their 2-class heads are re-initialised
(Kaiming-normal fan_in, BN eps 1e-5 momentum 0.1) independently, so the students start from
different heads. The teacher gets no gradient (``detach_model``); its parameters are an
EMA of a weighted sum of the two students (``collaborative_ema_update``). Predictions and
saved weights are the teacher's (L358-359; eval.py loads them).

Training, per iteration (two optimizer steps; all three networks stay in train mode,
L161-163, so every forward pass normalises with its own batch's statistics, updates its
BatchNorm running statistics and applies dropout, the teacher's included):

Step 1 (L175-225):
  1. Labeled batch (image x, mask y; x un-augmented photometrically): p1 = S1(x),
     p2 = S2(x), pt = T(x) (pt only feeds step 2's uncertainty).
     sup = dsc(S1(x), y) + dsc(S2(x), y)  (a sum; train_3d.py averages the two).
  2. Unlabeled batch u with two photometric views uA1 and uA2 (uA2 is a second
     augmentation applied on top of uA1, dataset.py L54-56): q1 = S1(uA1), q2 = S2(uA2),
     qt = T(u). Pseudo labels are HARD argmax labels, no confidence threshold: the
     teacher's ``yt`` and each student's own ``y1``, ``y2``, all detached.
     cmt = (dsc(q1, yt) + dsc(q2, yt)) / 2      # students learn from the teacher
     cps = (dsc(q1, y2) + dsc(q2, y1)) / 2      # cross pseudo supervision between students
     unsup = alpha * (cps + cmt), alpha = 0.1 (L134, L219).
  3. loss = sup + lambda * unsup, lambda = sigmoid_rampup(iteration, 5 * iters_per_epoch)
     (L220-221), ``iteration`` counting iterations (not steps) from 0.
  4. AdamW step on both students; ``collaborative_ema_update(step=iteration)`` (L225).
Step 2 (L241-337), reusing step 1's (pre-update) predictions, nothing re-run for them:
  5. Labeled UMIX: U1 = ``mean_entropy_uncertainty(p1, pt)``, U2 = same of (p2, pt). Within
     each image, its ``topk`` most-uncertain patches under U1 are overwritten by its ``topk``
     least-uncertain patches under U2, then its ``topk`` most-uncertain patches under U2 by
     its least-uncertain under U1 (``umix_indices`` / ``apply_umix``). The mix is applied to
     xA1 (the augmented view of x, which step 1 did not use) and identically to y.
     sup = dsc(S1(x_mix), y_mix) + dsc(S2(x_mix), y_mix).
  6. Unlabeled UMIX: U1 from (q1, qt), U2 from (q2, qt); the same mix is applied to uA1 and
     to the teacher's hard pseudo label yt from step 1. Both students see the same mixed
     image: r1 = S1(u_mix), r2 = S2(u_mix); y1, y2 are now their argmax labels on u_mix.
     cmt = (dsc(r1, yt_mix) + dsc(r2, yt_mix)) / 2; cps = (dsc(r1, y2) + dsc(r2, y1)) / 2.
  7. loss = sup + lambda * 0.1 * (cps + cmt); AdamW step; ``collaborative_ema_update`` again
     with the same ``step=iteration`` (L337).
The teacher runs only in step 1. In step 2 the image fed to the students is the mixed one
only; the un-mixed images are not re-fed.

Loss ``dsc`` (utils/loss_functions.py DSCLoss; ``dsc_loss_from_logits``):
  (1 - inter_weight) * CE + inter_weight * Dice, with inter_weight = 1.0 (train.py L52), so
  the CE term is multiplied by 0 and every UCMT loss is a PURE 2-CLASS SOFT DICE: the mean
  over {background, foreground} of 1 - mean_b dice_b,c, smooth 1e-5, class weights [1, 1].

EMA (models/deeplabv3.py L52-56 for DeepLabv3p, L219-223 for UNet; weighted_update):
  d = min(1 - 1 / (step + 1), 0.99); teacher = d * teacher + 0.99 (1 - d) * S1
  + 0.01 (1 - d) * S2 (``coefficient`` 0.99 favours student 1). Over ``parameters()`` only:
  BatchNorm running statistics are NOT averaged or copied; the teacher's own come from its
  train-mode forward passes on x and u in step 1. At iteration 0, d = 0: the teacher's
  random initialisation is replaced outright.

Hyperparameters, 2D (train.py ``get_args`` unless said):
  * image size 256 (L39; images first resized to 512, flipped h/v, rotated up to 180 deg with
    p 0.5, then resized to 256; dataset.py L50-53, L82-87); photometric augmentation for the
    A1/A2 views: ColorJitter(0.5, 0.5, 0.5, 0.25) p 0.8, posterize 5 bits p 0.2,
    autocontrast p 0.2, equalize p 0.2, Gaussian blur k 3 sigma [0.1, 2] p 0.5
    (dataset.py L74-81, data/transforms.py); ImageNet mean/std normalisation.
  * labeled fraction 0.05 (L40) of the ISIC 2018 train split (1815 images); the labeled
    subset is repeated to the train set's length; the "unlabeled" loader is the WHOLE train
    set, labeled images included (L63-71). Batch size 8 labeled + 8 unlabeled (L45);
    iterations per epoch = ceil(1815 / 8) = 227; 25 epochs (L44) = 5675 iterations, i.e.
    11350 optimizer steps.
  * AdamW, lr 1e-4 constant (no schedule), betas (0.9, 0.999), torch defaults eps 1e-8 and
    weight decay 0.01; one optimizer per student (L141-142).
  * alpha 0.1 on the unsupervised terms (L134); ramp-up sigmoid over 5 epochs of iterations
    (L220); EMA decay 0.99 and student weighting 0.99 / 0.01 (L225; deeplabv3.py L52).
  * UMIX: patches of (H / 16) x (W / 16), i.e. a 16 x 16 grid of 256 non-overlapping 16 px
    patches at 256 px (L128-131); topk = 2 patches replaced per direction (L43). train_3d.py
    uses an 8 x 8 x 8 grid and topk 2.
  * The checkpoint kept is the teacher at the epoch with the lowest mean step-2 training
    loss (there is no validation in 2D, L356-358); eval.py thresholds by argmax and reports
    the foreground Dice averaged over test images.

Not read here: the paper's own method and implementation sections (only its abstract and
introduction were reachable), so where the paper and the code might differ (e.g. whether the
students share an encoder) the code above is what is transcribed.

Binary form: the authors' 2-class softmax over logits (z0, z1) equals a sigmoid of the
single logit z = z1 - z0: p_fg = sigmoid(z), p_bg = sigmoid(-z), argmax = (z > 0). Every
function here takes that one logit, or sigmoid probabilities, shaped (B, H, W, 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from cers_jax.core.losses import sigmoid_rampup

# The authors add 1e-6 inside the log of the entropy (train.py L250) and use smooth 1e-5 in
# the Dice (utils/loss_functions.py L25).
ENTROPY_EPS = 1e-6
DICE_SMOOTH = 1e-5
# UMIX defaults for 2D: a 16 x 16 grid of patches (train.py L128), 2 patches per direction.
UMIX_GRID = 16
UMIX_TOPK = 2
UNSUP_ALPHA = 0.1
EMA_DECAY = 0.99
EMA_COEFFICIENT = 0.99
RAMPUP_EPOCHS = 5


def mean_entropy_uncertainty(p_student: jax.Array, p_teacher: jax.Array, *,
                             eps: float = ENTROPY_EPS) -> jax.Array:
  """UCMT's uncertainty map: entropy of the mean of a student's and the teacher's prediction.

  The authors' 2-class form (train.py L249-252) is ``-sum_c m_c log(m_c + eps)`` with
  ``m = (softmax(student) + softmax(teacher)) / 2``; written here for sigmoid probabilities
  with m_bg = 1 - m_fg. UCMT builds one map per student: (S1, T) and (S2, T).

  Args:
    p_student: (B, H, W, 1) foreground probabilities of one student.
    p_teacher: (B, H, W, 1) foreground probabilities of the teacher on the same image (for
      unlabeled images, the teacher sees the un-augmented view, the student its own view).
    eps: added inside the logs, as the authors do.

  Returns:
    (B, H, W, 1) entropy in nats, in [0, log 2] up to ``eps``.
  """
  fg = 0.5 * (p_student + p_teacher)
  bg = 1.0 - fg
  return -(fg * jnp.log(fg + eps) + bg * jnp.log(bg + eps))


def _check_grid(shape: Sequence[int], grid: int) -> tuple[int, int]:
  _, h, w, _ = shape
  if h % grid or w % grid:
    raise ValueError(
        f'ucmt_ops: UMIX needs H and W divisible by the grid {grid}, got {h}x{w}; set '
        'the image size to a multiple of the grid or change the UMIX grid in the config.')
  return h // grid, w // grid


def _to_patches(x: jax.Array, grid: int) -> jax.Array:
  """(B, H, W, C) -> (B, grid * grid, ph, pw, C), patches in row-major order.

  Row-major is the order of ``torch.nn.Unfold`` with stride = kernel, so patch indices and
  sort ties line up with the authors'.
  """
  b, _, _, c = x.shape
  ph, pw = _check_grid(x.shape, grid)
  x = x.reshape(b, grid, ph, grid, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * grid, ph, pw, c)


def _from_patches(patches: jax.Array, grid: int) -> jax.Array:
  b, _, ph, pw, c = patches.shape
  x = patches.reshape(b, grid, grid, ph, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * ph, grid * pw, c)


def patch_uncertainty(uncertainty: jax.Array, *, grid: int = UMIX_GRID) -> jax.Array:
  """(B, grid * grid) mean uncertainty of each non-overlapping patch, row-major."""
  patches = _to_patches(uncertainty, grid)
  return jnp.mean(patches.reshape(patches.shape[0], patches.shape[1], -1), axis=-1)


class UmixIndices(NamedTuple):
  """Patch indices of one UMIX, each (B, topk) int32, applied in this order.

  First ``x[dst1] = x[src1]``, then ``x[dst2] = x[src2]`` on the result; index j of a dst
  row takes index j of the matching src row.
  """

  dst1: jax.Array  # The topk most uncertain patches under U1, most uncertain first.
  src1: jax.Array  # The topk least uncertain under U2, also most uncertain first.
  dst2: jax.Array  # The topk most uncertain under U2, most uncertain first.
  src2: jax.Array  # The topk least uncertain under U1, most uncertain first.


def umix_indices(u1: jax.Array, u2: jax.Array, *, grid: int = UMIX_GRID,
                 topk: int = UMIX_TOPK) -> UmixIndices:
  """Which patches UMIX overwrites and with which, from the two students' uncertainty maps.

  The authors (train.py L256-271) sort each map's patch means in descending order and pair
  ``order1[:topk]`` with ``order2[-topk:]``: the most uncertain patch under U1 receives the
  second-least uncertain under U2 when topk = 2, the next one the least uncertain. Patches
  move within one image; images are never paired with each other.

  Args:
    u1: (B, H, W, 1) uncertainty of (student 1, teacher).
    u2: (B, H, W, 1) uncertainty of (student 2, teacher).
    grid: patches per side; the patch is (H / grid) x (W / grid) (authors: 16 in 2D).
    topk: patches replaced in each direction (authors: 2).

  Returns:
    The ``UmixIndices`` to pass to ``apply_umix``. Ties in patch means are broken by the
    lower patch index first (a stable sort); the authors' ``torch.sort`` leaves tie order
    unspecified.
  """
  n = grid * grid
  if not 1 <= topk <= n:
    raise ValueError(f'ucmt_ops: UMIX topk must be in [1, {n}] for a {grid}x{grid} grid, '
                     f'got {topk}.')
  order1 = jnp.argsort(-patch_uncertainty(u1, grid=grid), axis=1, stable=True)
  order2 = jnp.argsort(-patch_uncertainty(u2, grid=grid), axis=1, stable=True)
  return UmixIndices(dst1=order1[:, :topk].astype(jnp.int32),
                     src1=order2[:, n - topk:].astype(jnp.int32),
                     dst2=order2[:, :topk].astype(jnp.int32),
                     src2=order1[:, n - topk:].astype(jnp.int32))


def apply_umix(x: jax.Array, indices: UmixIndices, *, grid: int = UMIX_GRID) -> jax.Array:
  """Applies one UMIX to a (B, H, W, C) array: image, mask, pseudo label or confidence.

  Call it with the same ``indices`` on the image and on its labels so they stay aligned
  (the authors mix xA1 with y, and uA1 with the teacher's hard pseudo label). The second
  replacement reads the array the first one wrote, as the authors' in-place indexing does;
  it matters only where dst1 and dst2 share a patch (the second write wins).
  """
  patches = _to_patches(x, grid)

  def mix_one(p, dst1, src1, dst2, src2):
    p = p.at[dst1].set(p[src1])
    return p.at[dst2].set(p[src2])

  return _from_patches(jax.vmap(mix_one)(patches, *indices), grid)


def hard_pseudo_label(logits: jax.Array) -> jax.Array:
  """The authors' ``argmax(softmax(.))`` for one logit: 1.0 where z > 0, else 0.0.

  A logit of exactly 0 is background, as ``torch.argmax`` returns the first of tied
  classes. The result carries no gradient.
  """
  return jax.lax.stop_gradient((logits > 0).astype(logits.dtype))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  # A zero denominator (all rows weighted 0) gives 0, with no 0/0 in the gradient.
  return num / jnp.where(den > 0, den, 1.0)


def dsc_loss_from_logits(logits: jax.Array, target: jax.Array, *,
                         inter_weight: float = 1.0,
                         class_weights: tuple[float, float] = (1.0, 1.0),
                         smooth: float = DICE_SMOOTH,
                         weights: jax.Array | None = None) -> jax.Array:
  """The authors' DSCLoss (utils/loss_functions.py) for one sigmoid logit.

  ``(1 - inter_weight) * CE + inter_weight * Dice``. This is their 2-class softmax loss
  written for a sigmoid: CE is the class-weighted BCE from logits (torch's weighted-mean
  ``CrossEntropyLoss``), and Dice is computed for BOTH classes, background probability
  sigmoid(-z) against 1 - target, foreground sigmoid(z) against target:
  ``mean_c w_c (1 - mean_b (2 sum(p t) + s) / (sum(p) + sum(t) + s))``. UCMT uses
  inter_weight = 1.0, class weights [1, 1], so its loss is the 2-class Dice alone.

  Args:
    logits: (B, H, W, 1) foreground logits.
    target: (B, H, W, 1) labels in {0, 1} (ground truth or hard pseudo labels).
    inter_weight: weight of the Dice term; CE gets 1 - inter_weight (authors: 1.0).
    class_weights: (background, foreground) weights of CE and Dice (authors: [1, 1]).
    smooth: Dice smoothing (authors: 1e-5).
    weights: optional (B,) row weights, 1 for a real row, 0 for padding; None is the
      authors' plain batch mean. All-zero weights give 0.

  Returns:
    Scalar loss.
  """
  b = logits.shape[0]
  logits = logits.reshape(b, -1)
  target = target.reshape(b, -1).astype(logits.dtype)
  rows = jnp.ones((b,), logits.dtype) if weights is None else weights.astype(logits.dtype)
  w_bg, w_fg = class_weights

  probs = (jax.nn.sigmoid(-logits), jax.nn.sigmoid(logits))
  targets = (1.0 - target, target)
  dice_terms = []
  for w_c, p, t in zip((w_bg, w_fg), probs, targets):
    dice = (2.0 * jnp.sum(p * t, axis=1) + smooth) / (
        jnp.sum(p, axis=1) + jnp.sum(t, axis=1) + smooth)
    # mean_b (1 - dice) is the authors' 1 - mean_b dice, and stays 0 with no real rows.
    dice_terms.append(w_c * _safe_div(jnp.sum(rows * (1.0 - dice)), jnp.sum(rows)))
  dice_loss = 0.5 * (dice_terms[0] + dice_terms[1])
  if inter_weight == 1.0:
    return dice_loss

  nll = -(target * jax.nn.log_sigmoid(logits) + (1.0 - target) * jax.nn.log_sigmoid(-logits))
  pixel_w = rows[:, None] * (w_fg * target + w_bg * (1.0 - target))
  ce = _safe_div(jnp.sum(pixel_w * nll), jnp.sum(pixel_w))
  return (1.0 - inter_weight) * ce + inter_weight * dice_loss


def unsup_weight(iteration: jax.Array | float, *, iters_per_epoch: int,
                 rampup_epochs: float = RAMPUP_EPOCHS) -> jax.Array:
  """lambda: ``sigmoid_rampup(iteration, rampup_epochs * iters_per_epoch)`` (train.py L220).

  ``iteration`` counts iterations (each of two optimizer steps) from 0 and may be traced.
  """
  return sigmoid_rampup(iteration, float(rampup_epochs * iters_per_epoch))


def ucmt_loss(s1_labeled: jax.Array, s2_labeled: jax.Array, label: jax.Array,
              s1_unlabeled: jax.Array, s2_unlabeled: jax.Array, teacher_pseudo: jax.Array,
              *, ramp: jax.Array | float, alpha: float = UNSUP_ALPHA,
              inter_weight: float = 1.0,
              labeled_weights: jax.Array | None = None,
              unlabeled_weights: jax.Array | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One step's UCMT loss (train.py L189-221 for step 1, L278-332 for step 2).

  ``sup + ramp * alpha * (cps + cmt)`` with
  ``sup = dsc(s1_labeled, label) + dsc(s2_labeled, label)``,
  ``cmt = (dsc(s1_unlabeled, yt) + dsc(s2_unlabeled, yt)) / 2`` and
  ``cps = (dsc(s1_unlabeled, y2) + dsc(s2_unlabeled, y1)) / 2``, where yt is the teacher's
  hard pseudo label and y1, y2 are the students' own hard labels on these very logits, all
  detached. Step 1 passes the un-mixed logits and label; step 2 the logits on the UMIX
  images with the mixed label and mixed teacher pseudo label.

  Args:
    s1_labeled, s2_labeled: (B, H, W, 1) student logits on the labeled images.
    label: (B, H, W, 1) ground truth in {0, 1} (mixed in step 2).
    s1_unlabeled, s2_unlabeled: (B, H, W, 1) student logits on the unlabeled images
      (views uA1 and uA2 in step 1; the same mixed uA1 in step 2).
    teacher_pseudo: (B, H, W, 1) the teacher's hard pseudo label in {0, 1}
      (``hard_pseudo_label`` of its logits on u; mixed in step 2).
    ramp: lambda, ``unsup_weight(iteration, ...)``.
    alpha: weight of the unsupervised terms inside the ramp (authors: 0.1).
    inter_weight: DSCLoss's Dice weight (authors: 1.0, i.e. Dice only).
    labeled_weights, unlabeled_weights: optional (B,) row weights for padded batches.

  Returns:
    (loss, terms) with terms 'sup', 'cmt', 'cps', 'unsup' (= alpha * (cps + cmt)).
  """
  def dsc(logits, target, w):
    return dsc_loss_from_logits(logits, target, inter_weight=inter_weight, weights=w)

  sup = dsc(s1_labeled, label, labeled_weights) + dsc(s2_labeled, label, labeled_weights)
  yt = jax.lax.stop_gradient(teacher_pseudo)
  cmt = 0.5 * (dsc(s1_unlabeled, yt, unlabeled_weights)
               + dsc(s2_unlabeled, yt, unlabeled_weights))
  y1 = hard_pseudo_label(s1_unlabeled)
  y2 = hard_pseudo_label(s2_unlabeled)
  cps = 0.5 * (dsc(s1_unlabeled, y2, unlabeled_weights)
               + dsc(s2_unlabeled, y1, unlabeled_weights))
  unsup = alpha * (cps + cmt)
  loss = sup + ramp * unsup
  return loss, {'sup': sup, 'cmt': cmt, 'cps': cps, 'unsup': unsup}


def ema_decay(step: jax.Array | int, alpha: float = EMA_DECAY) -> jax.Array:
  """``min(1 - 1 / (step + 1), alpha)``: 0 at step 0, so the first update copies."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(1.0 - 1.0 / (step + 1.0), alpha)


def ema_update(teacher_params: Any, student_params: Any, alpha: float = EMA_DECAY,
               step: jax.Array | int = 0) -> Any:
  """The authors' single-student ``ema_update`` (models/deeplabv3.py L46-50).

  ``t <- d t + (1 - d) s`` with ``d = ema_decay(step, alpha)``. UCMT's train.py uses
  ``collaborative_ema_update`` instead; this is kept for the one-student case. Pass
  parameters only: the authors average ``parameters()``, not BatchNorm statistics.
  """
  d = ema_decay(step, alpha)
  return jax.tree.map(lambda t, s: d * t + (1.0 - d) * s, teacher_params, student_params)


def collaborative_ema_update(teacher_params: Any, student1_params: Any,
                             student2_params: Any, alpha: float = EMA_DECAY,
                             step: jax.Array | int = 0, *,
                             coefficient: float = EMA_COEFFICIENT) -> Any:
  """UCMT's teacher update, ``weighted_update`` (models/deeplabv3.py L52-56).

  ``t <- d t + c (1 - d) s1 + (1 - c) (1 - d) s2`` with ``d = ema_decay(step, alpha)`` and
  c = ``coefficient`` (authors: alpha 0.99, c 0.99, step = the iteration index, the same for
  both of an iteration's updates). Parameters only; the teacher keeps BatchNorm statistics
  of its own forward passes.
  """
  d = ema_decay(step, alpha)
  w1 = coefficient * (1.0 - d)
  w2 = (1.0 - coefficient) * (1.0 - d)
  return jax.tree.map(lambda t, s1, s2: d * t + w1 * s1 + w2 * s2,
                      teacher_params, student1_params, student2_params)
