"""The jitted CERS steps inside your own training loop: warm-up, pool, semi-supervised.

  python examples/custom_loop.py /tmp/custom_loop [steps]

Builds the synthetic default (generated on first use) and runs a few steps of each stage;
every step is `state, metrics = step(state, batch...)` with the TrainState passed explicitly.
"""

import sys

import numpy as np

from cers_jax import sharding
from cers_jax.core import embed
from cers_jax.core import losses
from cers_jax.data import pipeline
from cers_jax.training import experiment
from configs import synthetic


def _floats(metrics: dict) -> dict[str, float]:
  """A step's metrics as Python floats (one device-to-host copy)."""
  return {name: float(value) for name, value in sharding.to_host(metrics).items()}


def main(workdir: str, steps_per_stage: str = '3', config=None) -> list[dict]:
  config = config or synthetic.get_config()
  exp, state = experiment.create(config, workdir)
  config, data, steps, mesh = exp.config, exp.data, exp.steps, exp.steps.mesh
  exp.checkpoints.close()  # This loop saves nothing.

  def loader(split: str, seed: int, is_labeled: bool):
    return pipeline.make_train_loader(data.arrays(), data.rows[split],
                                      batch_size=config.train.batch_size, seed=seed,
                                      is_labeled=is_labeled)

  labeled, unlabeled = loader('train_labeled', 0, True), loader('train_unlabeled', 1, False)
  history = []
  state = embed.with_text_features(state, steps, data, config)  # Frozen CoT BERT, once.
  for _ in range(int(steps_per_stage)):
    state, metrics = steps.warmup(state, sharding.shard_batch(next(labeled), mesh))
    history.append(dict(stage='warmup', **_floats(metrics)))
  state = embed.with_pool(state, steps, data, config)  # The knowledge pool, after warm-up.
  weight = sharding.replicate(np.float32(losses.consistency_weight(
      0, consistency=config.train.consistency, rampup=config.train.consistency_rampup)), mesh)
  for _ in range(int(steps_per_stage)):
    state, metrics = steps.semi(state, sharding.shard_batch(next(labeled), mesh),
                                sharding.shard_batch(next(unlabeled), mesh), weight)
    history.append(dict(stage='semi', **_floats(metrics)))
  for record in history:
    print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                   for k, v in record.items()))
  return history


if __name__ == '__main__':
  main(*sys.argv[1:])
