"""Training losses of CERS as pure, jit-safe functions of arrays (DESIGN.md section 3).

Warm-up: ``dice_ce`` on both decoders plus ``clip_loss`` between image and CoT embeddings.
Semi-supervised stage: ``dice_ce`` on labeled rows plus ``consistency_weight(epoch)`` times
``consistency_loss`` between the two decoders' probabilities on every row.

Arrays are NHWC (``(B, H, W, 1)`` for masks and probabilities); every reduction is per sample
first, so a ``weights`` vector of shape ``(B,)`` (1 = real labeled row, 0 = padding or an
unlabeled row) can drop rows without recompiling. A batch whose weights are all zero gives a
loss of exactly 0 (and zero gradients), never NaN.

The values match the authors' PyTorch losses (golden fixture ``losses_and_metrics``): soft
Dice with ``smooth=1e-7`` averaged over the batch, ``torch.nn.BCELoss`` (which clamps each
log at -100), ``MSELoss(reduction='sum')`` against sharpened, detached targets, and CLIP's
symmetric cross-entropy.
"""

import jax
import jax.numpy as jnp

# torch.nn.BCELoss clamps log(p) and log(1 - p) at -100 so that p in {0, 1} stays finite.
_TORCH_BCE_LOG_FLOOR = -100.0


def _per_sample_sum(x: jax.Array) -> jax.Array:
  """Sums every axis but the batch axis: (B, ...) -> (B,)."""
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _per_sample_mean(x: jax.Array) -> jax.Array:
  """Means every axis but the batch axis: (B, ...) -> (B,)."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def _weighted_mean(per_sample: jax.Array, weights: jax.Array | None) -> jax.Array:
  """Mean over rows with non-zero weight; 0 when no row has weight.

  Args:
    per_sample: (B,) per-sample losses.
    weights: optional (B,) non-negative row weights (usually a 0/1 mask).

  Returns:
    A scalar: sum(w * l) / sum(w), or the plain mean when ``weights`` is None.
  """
  if weights is None:
    return jnp.mean(per_sample)
  weights = weights.astype(per_sample.dtype)
  total = jnp.sum(weights)
  # The safe denominator keeps the all-padding batch at 0 without a 0/0 in the gradient.
  safe_total = jnp.where(total > 0, total, 1.0)
  return jnp.sum(weights * per_sample) / safe_total


def _weighted_sum(per_sample: jax.Array, weights: jax.Array | None) -> jax.Array:
  """Sum over rows, each scaled by its weight (all rows when ``weights`` is None)."""
  if weights is None:
    return jnp.sum(per_sample)
  return jnp.sum(weights.astype(per_sample.dtype) * per_sample)


def dice_per_sample(probs: jax.Array, target: jax.Array, *,
                    smooth: float = 1e-7) -> jax.Array:
  """Soft Dice loss of every sample, ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)``.

  Args:
    probs: (B, H, W, 1) probabilities.
    target: (B, H, W, 1) binary masks, same shape.
    smooth: the additive smoothing ``s`` (authors: 1e-7).

  Returns:
    (B,) per-sample soft Dice losses.
  """
  inter = _per_sample_sum(probs * target)
  denom = _per_sample_sum(probs) + _per_sample_sum(target)
  return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def dice_loss(probs: jax.Array, target: jax.Array, *, smooth: float = 1e-7,
              weights: jax.Array | None = None) -> jax.Array:
  """Soft Dice loss per sample, averaged over the (weighted) batch.

  Args:
    probs: (B, H, W, 1) probabilities.
    target: (B, H, W, 1) binary masks.
    smooth: additive smoothing in numerator and denominator (authors: 1e-7).
    weights: optional (B,) 0/1 mask; the mean runs over rows with weight 1 only, and is 0
      when no row has weight.

  Returns:
    A scalar loss.
  """
  return _weighted_mean(dice_per_sample(probs, target, smooth=smooth), weights)


def bce(probs: jax.Array, target: jax.Array,
        weights: jax.Array | None = None) -> jax.Array:
  """Mean binary cross-entropy on probabilities, as ``torch.nn.BCELoss``.

  Each log is clamped at -100 as torch does, so ``probs`` in {0, 1} give finite values.
  Prefer ``bce_from_logits`` when logits are at hand: it is exact where the probability
  saturates in float32.

  Args:
    probs: (B, H, W, 1) probabilities in [0, 1].
    target: (B, H, W, 1) binary masks.
    weights: optional (B,) 0/1 row mask; the mean runs over the pixels of weighted rows.

  Returns:
    A scalar loss.
  """
  # The inner where() keeps log's argument positive so the gradient at p in {0, 1} is 0,
  # not 0 * inf = NaN.
  pos = probs > 0
  below_one = probs < 1
  log_p = jnp.where(pos, jnp.log(jnp.where(pos, probs, 1.0)), _TORCH_BCE_LOG_FLOOR)
  log_1mp = jnp.where(below_one, jnp.log1p(-jnp.where(below_one, probs, 0.0)),
                      _TORCH_BCE_LOG_FLOOR)
  log_p = jnp.maximum(log_p, _TORCH_BCE_LOG_FLOOR)
  log_1mp = jnp.maximum(log_1mp, _TORCH_BCE_LOG_FLOOR)
  pixel = -(target * log_p + (1.0 - target) * log_1mp)
  return _weighted_mean(_per_sample_mean(pixel), weights)


def bce_from_logits(logits: jax.Array, target: jax.Array,
                    weights: jax.Array | None = None) -> jax.Array:
  """Mean binary cross-entropy computed from logits with ``log_sigmoid`` (stable).

  Equals ``bce(sigmoid(logits), target)`` wherever the probability is representable
  (|logit| below about 16 in float32); beyond, it keeps the exact value and a non-zero
  gradient where the probability route saturates at the -100 clamp.

  Args:
    logits: (B, H, W, 1) pre-sigmoid outputs.
    target: (B, H, W, 1) binary masks.
    weights: optional (B,) 0/1 row mask.

  Returns:
    A scalar loss.
  """
  # log(1 - sigmoid(x)) = log_sigmoid(-x): no cancellation for large positive x.
  pixel = -(target * jax.nn.log_sigmoid(logits)
            + (1.0 - target) * jax.nn.log_sigmoid(-logits))
  return _weighted_mean(_per_sample_mean(pixel), weights)


def dice_ce(probs: jax.Array, target: jax.Array,
            weights: jax.Array | None = None) -> jax.Array:
  """The authors' DiceCE on probabilities: ``dice_loss`` (smooth 1e-7) + ``bce``.

  Args:
    probs: (B, H, W, 1) sigmoid probabilities.
    target: (B, H, W, 1) binary masks.
    weights: optional (B,) 0/1 row mask (padding / unlabeled rows have 0).

  Returns:
    A scalar loss.
  """
  return dice_loss(probs, target, weights=weights) + bce(probs, target, weights)


def dice_ce_from_logits(logits: jax.Array, target: jax.Array,
                        weights: jax.Array | None = None) -> jax.Array:
  """``dice_ce(sigmoid(logits), target)`` with the BCE term computed stably from logits.

  This is the form to train with: gradients stay finite and informative for any logit.

  Args:
    logits: (B, H, W, 1) pre-sigmoid outputs.
    target: (B, H, W, 1) binary masks.
    weights: optional (B,) 0/1 row mask.

  Returns:
    A scalar loss.
  """
  probs = jax.nn.sigmoid(logits)
  return (dice_loss(probs, target, weights=weights)
          + bce_from_logits(logits, target, weights))


def sharpen(p: jax.Array, temperature: float = 0.1) -> jax.Array:
  """Temperature sharpening ``p^(1/T) / (p^(1/T) + (1 - p)^(1/T))``, computed in log space.

  The ratio equals ``sigmoid((log p - log(1 - p)) / T)``. Flooring both logs at the
  smallest normal float maps p = 0 and p = 1 to exactly 0 and 1 with finite gradients, and
  the form stays finite for any T, where the power form gives 0/0 once both powers
  underflow (e.g. T = 0.001 at p = 0.5).

  Args:
    p: probabilities in [0, 1], any shape.
    temperature: T > 0 (authors: 0.1, i.e. tenth powers).

  Returns:
    Sharpened probabilities, same shape and dtype as ``p``.
  """
  tiny = jnp.finfo(p.dtype).tiny
  log_odds = jnp.log(jnp.maximum(p, tiny)) - jnp.log(jnp.maximum(1.0 - p, tiny))
  return jax.nn.sigmoid(log_odds / temperature)


def mse_sum(a: jax.Array, b: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Sum of squared differences, as ``torch.nn.MSELoss(reduction='sum')``.

  Args:
    a: (B, ...) array.
    b: array of the same shape.
    weights: optional (B,) row weights; rows with weight 0 contribute nothing.

  Returns:
    A scalar: sum over rows of ``w_b * sum((a_b - b_b) ** 2)``.
  """
  return _weighted_sum(_per_sample_sum(jnp.square(a - b)), weights)


def consistency_loss(p_r: jax.Array, p_s: jax.Array, *, temperature: float,
                     weights: jax.Array | None = None) -> jax.Array:
  """Cross-decoder consistency: each decoder regresses the other's sharpened output.

  ``mse_sum(p_r, sg(sharpen(p_s))) + mse_sum(p_s, sg(sharpen(p_r)))`` with ``sg`` the
  stop-gradient, so each decoder is pulled towards a detached, confident target.

  Args:
    p_r: (B, H, W, 1) probabilities of the retrieval-aware decoder.
    p_s: (B, H, W, 1) probabilities of the standard decoder.
    temperature: sharpening temperature T (authors: 0.1).
    weights: optional (B,) row weights (0 for padding rows).

  Returns:
    A scalar loss (a sum, not a mean: scale it with ``consistency_weight``).
  """
  target_r = jax.lax.stop_gradient(sharpen(p_s, temperature))
  target_s = jax.lax.stop_gradient(sharpen(p_r, temperature))
  return mse_sum(p_r, target_r, weights) + mse_sum(p_s, target_s, weights)


def clip_logits(image_emb: jax.Array, text_emb: jax.Array,
                logit_scale: jax.Array) -> jax.Array:
  """CLIP similarity logits ``exp(logit_scale) * image_emb @ text_emb.T``.

  Args:
    image_emb: (B, D) L2-normalised image embeddings.
    text_emb: (B, D) L2-normalised CoT embeddings (row i pairs with image i).
    logit_scale: scalar, the log of the inverse temperature (init log(1/0.07)).

  Returns:
    (B, B) logits per image; their transpose are the logits per text.
  """
  return jnp.exp(logit_scale) * (image_emb @ text_emb.T)


def clip_loss(logits_per_image: jax.Array) -> jax.Array:
  """Symmetric CLIP cross-entropy with the diagonal as the positives.

  Args:
    logits_per_image: (B, B) logits, row i = image i against every text.

  Returns:
    A scalar: mean of the image->text and text->image cross-entropies with labels
    ``arange(B)``.
  """
  def diagonal_ce(logits: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.diagonal(log_probs))

  return 0.5 * (diagonal_ce(logits_per_image) + diagonal_ce(logits_per_image.T))


def sigmoid_rampup(epoch: jax.Array | float, rampup: float) -> jax.Array:
  """Mean-teacher ramp-up ``exp(-5 (1 - clip(epoch / rampup, 0, 1))^2)``; 1 if rampup is 0.

  Args:
    epoch: current epoch (a Python number or a traced scalar/array).
    rampup: ramp-up length in epochs (a static Python number).

  Returns:
    The ramp-up factor in (0, 1], same shape as ``epoch``, float32.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  if rampup == 0:
    return jnp.ones_like(epoch)
  phase = 1.0 - jnp.clip(epoch / rampup, 0.0, 1.0)
  return jnp.exp(-5.0 * phase * phase)


def consistency_weight(epoch: jax.Array | float, *, consistency: float = 0.003,
                       rampup: float = 200) -> jax.Array:
  """Consistency weight lambda(e) = ``consistency * sigmoid_rampup(e, rampup)``.

  Args:
    epoch: current semi-supervised epoch (Python number or traced scalar).
    consistency: peak weight (authors: 0.003).
    rampup: ramp-up length in epochs (authors: 200); 0 means full weight at once.

  Returns:
    The weight, a float32 array shaped like ``epoch``.
  """
  return consistency * sigmoid_rampup(epoch, rampup)
