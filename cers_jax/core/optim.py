"""The optimizer every method shares by default: SGD with momentum on a cosine schedule."""

from __future__ import annotations

import optax


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """The learning rate by optimizer step: cosine decay over all stages."""
  return optax.cosine_decay_schedule(config.train.learning_rate, max(total_steps, 1))


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """SGD with momentum and torch-style (coupled) weight decay on a cosine schedule."""
  schedule = make_schedule(config, total_steps)
  return optax.chain(optax.add_decayed_weights(config.train.weight_decay),
                     optax.sgd(schedule, momentum=config.train.momentum))
