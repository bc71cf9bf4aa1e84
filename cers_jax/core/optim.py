"""The optimizer every method shares by default: SGD with momentum on a cosine schedule.

`train.optimizer` chooses the update rule: 'sgd' (the authors': momentum and torch-style
coupled weight decay) or 'adamw' (decoupled weight decay; docs/design.md section 13). Both
follow the same cosine schedule from `train.learning_rate`.
"""

from __future__ import annotations

import optax

from cers_jax.errors import ConfigError

OPTIMIZERS = ('sgd', 'adamw')


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """The learning rate by optimizer step: cosine decay over all stages."""
  return optax.cosine_decay_schedule(config.train.learning_rate, max(total_steps, 1))


def check(config) -> str:
  """The name of `train.optimizer`; refused here (before any work) when unknown."""
  name = config.train.get('optimizer', 'sgd')
  if name not in OPTIMIZERS:
    raise ConfigError(f'--config.train.optimizer={name!r}: choose one of {OPTIMIZERS}.')
  return name


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """`train.optimizer` on the cosine schedule: SGD with momentum and coupled weight decay
  (the authors'), or AdamW."""
  schedule = make_schedule(config, total_steps)
  if check(config) == 'adamw':
    return optax.adamw(schedule, weight_decay=config.train.weight_decay)
  return optax.chain(optax.add_decayed_weights(config.train.weight_decay),
                     optax.sgd(schedule, momentum=config.train.momentum))
