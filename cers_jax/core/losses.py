"""Training losses of CERS as pure, jit-safe functions of arrays (docs/design.md section 8).

Warm-up: ``dice_ce`` on both decoders plus ``clip_loss`` between image and CoT embeddings.
Semi-supervised stage: ``dice_ce`` on labeled rows plus ``consistency_weight(epoch)`` times
``consistency_loss`` between the two decoders' probabilities.

Masks and probabilities are ``(B, H, W, 1)``. Every reduction is per sample first, so a
``(B,)`` ``weights`` vector (1 = real labeled row, 0 = padding or unlabeled) drops rows
without recompiling; all-zero weights give a loss of exactly 0, never NaN. Values match the
authors' PyTorch losses (golden fixture ``losses_and_metrics``).
"""

import jax
import jax.numpy as jnp

# torch.nn.BCELoss clamps log(p) and log(1 - p) at -100 so that p in {0, 1} stays finite.
_TORCH_BCE_LOG_FLOOR = -100.0


def _per_sample_sum(x: jax.Array) -> jax.Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _per_sample_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def _weighted_mean(per_sample: jax.Array, weights: jax.Array | None) -> jax.Array:
  """sum(w * l) / sum(w); 0 when no row has weight; the plain mean without weights."""
  if weights is None:
    return jnp.mean(per_sample)
  weights = weights.astype(per_sample.dtype)
  total = jnp.sum(weights)
  # The safe denominator keeps the all-padding batch at 0 without a 0/0 in the gradient.
  safe_total = jnp.where(total > 0, total, 1.0)
  return jnp.sum(weights * per_sample) / safe_total


def _weighted_sum(per_sample: jax.Array, weights: jax.Array | None) -> jax.Array:
  if weights is None:
    return jnp.sum(per_sample)
  return jnp.sum(weights.astype(per_sample.dtype) * per_sample)


def dice_per_sample(probs: jax.Array, target: jax.Array, *,
                    smooth: float = 1e-7) -> jax.Array:
  """(B,) soft Dice losses ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)``."""
  inter = _per_sample_sum(probs * target)
  denom = _per_sample_sum(probs) + _per_sample_sum(target)
  return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def dice_loss(probs: jax.Array, target: jax.Array, *, smooth: float = 1e-7,
              weights: jax.Array | None = None) -> jax.Array:
  """Soft Dice loss per sample, averaged over the rows with weight (authors: smooth 1e-7)."""
  return _weighted_mean(dice_per_sample(probs, target, smooth=smooth), weights)


def bce(probs: jax.Array, target: jax.Array,
        weights: jax.Array | None = None) -> jax.Array:
  """Mean binary cross-entropy on probabilities as ``torch.nn.BCELoss`` (logs floored at -100).

  Prefer ``bce_from_logits`` when logits are at hand: it stays exact where the probability
  saturates in float32.
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
  """Mean binary cross-entropy from logits via ``log_sigmoid``.

  Equals ``bce(sigmoid(logits), target)`` while |logit| is below about 16 in float32;
  beyond, it keeps the exact value and a non-zero gradient where ``bce`` hits the clamp.
  """
  # log(1 - sigmoid(x)) = log_sigmoid(-x): no cancellation for large positive x.
  pixel = -(target * jax.nn.log_sigmoid(logits)
            + (1.0 - target) * jax.nn.log_sigmoid(-logits))
  return _weighted_mean(_per_sample_mean(pixel), weights)


def dice_ce(probs: jax.Array, target: jax.Array,
            weights: jax.Array | None = None) -> jax.Array:
  """The authors' DiceCE on probabilities: ``dice_loss`` (smooth 1e-7) + ``bce``."""
  return dice_loss(probs, target, weights=weights) + bce(probs, target, weights)


def dice_ce_from_logits(logits: jax.Array, target: jax.Array,
                        weights: jax.Array | None = None) -> jax.Array:
  """``dice_ce(sigmoid(logits), target)`` with the BCE term taken stably from logits.

  The form to train with: gradients stay finite and informative for any logit.
  """
  probs = jax.nn.sigmoid(logits)
  return (dice_loss(probs, target, weights=weights)
          + bce_from_logits(logits, target, weights))


def sharpen(p: jax.Array, temperature: float = 0.1) -> jax.Array:
  """Temperature sharpening ``p^(1/T) / (p^(1/T) + (1 - p)^(1/T))`` (authors: T = 0.1).

  Computed as ``sigmoid((log p - log(1 - p)) / T)``. Flooring both logs at the smallest
  normal float maps p = 0 and p = 1 to exactly 0 and 1 with finite gradients, and stays
  finite for any T, where the power form gives 0/0 once both powers underflow (e.g.
  T = 0.001 at p = 0.5).
  """
  tiny = jnp.finfo(p.dtype).tiny
  log_odds = jnp.log(jnp.maximum(p, tiny)) - jnp.log(jnp.maximum(1.0 - p, tiny))
  return jax.nn.sigmoid(log_odds / temperature)


def mse_sum(a: jax.Array, b: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """``torch.nn.MSELoss(reduction='sum')``, each row scaled by its optional weight."""
  return _weighted_sum(_per_sample_sum(jnp.square(a - b)), weights)


def consistency_loss(p_r: jax.Array, p_s: jax.Array, *, temperature: float,
                     weights: jax.Array | None = None) -> jax.Array:
  """Cross-decoder consistency: each decoder regresses the other's sharpened, detached output.

  ``mse_sum(p_r, sg(sharpen(p_s))) + mse_sum(p_s, sg(sharpen(p_r)))``, with ``p_r`` from the
  retrieval-aware decoder and ``p_s`` from the standard one. A sum, not a mean: scale it
  with ``consistency_weight``.
  """
  target_r = jax.lax.stop_gradient(sharpen(p_s, temperature))
  target_s = jax.lax.stop_gradient(sharpen(p_r, temperature))
  return mse_sum(p_r, target_r, weights) + mse_sum(p_s, target_s, weights)


def clip_logits(image_emb: jax.Array, text_emb: jax.Array,
                logit_scale: jax.Array) -> jax.Array:
  """(B, B) CLIP logits per image, ``exp(logit_scale) * image_emb @ text_emb.T``.

  Both embeddings are (B, D) and L2-normalised, row i of one pairing with row i of the
  other; ``logit_scale`` is the log inverse temperature (init log(1/0.07)).
  """
  return jnp.exp(logit_scale) * (image_emb @ text_emb.T)


def clip_loss(logits_per_image: jax.Array) -> jax.Array:
  """Symmetric CLIP cross-entropy of (B, B) logits, the diagonal being the positives."""
  def diagonal_ce(logits: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.diagonal(log_probs))

  return 0.5 * (diagonal_ce(logits_per_image) + diagonal_ce(logits_per_image.T))


def sigmoid_rampup(epoch: jax.Array | float, rampup: float) -> jax.Array:
  """Mean-teacher ramp-up ``exp(-5 (1 - clip(epoch / rampup, 0, 1))^2)``; 1 if rampup is 0.

  ``epoch`` may be traced; ``rampup`` must be a static Python number.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  if rampup == 0:
    return jnp.ones_like(epoch)
  phase = 1.0 - jnp.clip(epoch / rampup, 0.0, 1.0)
  return jnp.exp(-5.0 * phase * phase)


def consistency_weight(epoch: jax.Array | float, *, consistency: float = 0.003,
                       rampup: float = 200) -> jax.Array:
  """``consistency * sigmoid_rampup(epoch, rampup)`` (authors: 0.003, 200 epochs)."""
  return consistency * sigmoid_rampup(epoch, rampup)


def unsup_diagnostics(*, loss: jax.Array, unsup_weighted: jax.Array, weight: jax.Array,
                      pseudo: jax.Array, labeled_mask: jax.Array) -> dict[str, jax.Array]:
  """The per-step numbers every semi-supervised method logs (docs/design.md section 9),
  so that a method whose unsupervised term never acts shows it in metrics.jsonl:

    unsup_weight  the unsupervised term's weight (a ramp's value; constant for BCP);
    unsup_share   the weighted unsupervised term over the whole loss;
    pseudo_fg     the foreground share of the pseudo-labels (or targets above 0.5),
    labeled_fg    beside the labeled masks' foreground share.

  Args:
    pseudo: pseudo-labels or target probabilities, any shape; > 0.5 counts as foreground.
    labeled_mask: the labeled batch's masks in {0, 1}.
  """
  loss = jax.lax.stop_gradient(loss)
  unsup_weighted = jax.lax.stop_gradient(unsup_weighted)
  return dict(unsup_weight=jnp.asarray(weight, jnp.float32),
              unsup_share=unsup_weighted / jnp.maximum(jnp.abs(loss), 1e-12),
              pseudo_fg=jnp.mean((jax.lax.stop_gradient(pseudo) > 0.5).astype(jnp.float32)),
              labeled_fg=jnp.mean(labeled_mask.astype(jnp.float32)))
