"""The training budget every method shares: steps per epoch of each stage, from the data.

Table 1's methods are compared "under the same training protocol", so every method of this
project spends the same optimizer steps: `train.warmup_epochs` epochs of one pass over the
labeled images, then `train.epochs` epochs of `train.steps_per_epoch` steps (default: one
pass over the larger of the labeled and unlabeled sets).
"""

from __future__ import annotations

from cers_jax.data.dataset import Data
from cers_jax.errors import ConfigError


def steps_per_epoch(config, data: Data) -> tuple[int, int]:
  """(warm-up steps, semi-supervised steps) per epoch; both need at least one batch."""
  batch = config.train.batch_size
  labeled = len(data.rows['train_labeled'])
  if labeled < batch:
    raise ConfigError(
        f'Only {labeled} labeled training images for a batch of {batch}: lower '
        '--config.train.batch_size or raise --config.data.labeled_fraction.')
  unlabeled = len(data.rows['train_unlabeled'])
  semi = config.train.steps_per_epoch or max(labeled, unlabeled) // batch
  return labeled // batch, max(semi, 1)


def total_steps(config, data: Data) -> int:
  """Optimizer steps over both stages (the learning-rate schedule's horizon)."""
  warmup, semi = steps_per_epoch(config, data)
  return config.train.warmup_epochs * warmup + config.train.epochs * semi
