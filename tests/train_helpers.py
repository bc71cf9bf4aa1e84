"""A tiny CERS, a random pool and random batches, shared by the train-step tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cers_jax.core import steps as ts
from cers_jax.core.optim import make_optimizer
from cers_jax.core.state import create_train_state, empty_tables
from cers_jax.models.cers import CERS
from cers_jax.retrieval import pool as kp
from tests.run_configs import tiny_run

IMAGE = 32
BATCH = 4
POOL_ROWS = 12
NUM_SAMPLES = 32  # Rows 0..11 are labeled (in the pool); 12.. are unlabeled.


def tiny_config(**model_overrides):
  """The end-to-end tests' tiny CERS, with a fixed vocabulary (no tokenizer here)."""
  config = tiny_run.get_config()
  for bert in (config.model.text, config.model.cot):
    bert.vocab_size = 50
  for key, value in model_overrides.items():
    setattr(config.model, key, value)
  assert config.data.image_size == IMAGE and config.train.batch_size == BATCH
  return config


def make_state(config, seed: int = 0):
  """(graphdef, tx, state) with a random pool of POOL_ROWS rows and random tables."""
  model = CERS(config.model, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  f4_shape = model.f4_shape(IMAGE)
  rng = np.random.default_rng(seed)
  e = config.model.embed_dim
  pool = kp.build_pool(rng.standard_normal((POOL_ROWS,) + f4_shape, np.float32),
                       rng.standard_normal((POOL_ROWS, e), np.float32),
                       rng.standard_normal((POOL_ROWS, e), np.float32),
                       np.arange(POOL_ROWS, dtype=np.int32))
  tables = empty_tables(NUM_SAMPLES, config.model.cot.hidden_size, e)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  tables = tables.replace(
      cot_cls=jnp.asarray(rng.standard_normal((NUM_SAMPLES, config.model.cot.hidden_size)),
                          jnp.float32),
      query_cot=jnp.asarray(unit(rng.standard_normal((NUM_SAMPLES, e))), jnp.float32),
      query_text=jnp.asarray(unit(rng.standard_normal((NUM_SAMPLES, e))), jnp.float32))
  tx = make_optimizer(config, 100)
  graphdef, state = create_train_state(model, tx, text_trainable=True, pool=pool,
                                       tables=tables, rng=jax.random.key(seed))
  return graphdef, tx, state


def make_batch(seed: int, *, labeled: bool) -> dict:
  rng = np.random.default_rng(seed)
  start = 0 if labeled else POOL_ROWS
  index = rng.choice(np.arange(start, start + POOL_ROWS), BATCH, replace=False)
  text_mask = np.ones((BATCH, 8), np.int32)
  text_mask[:, 5:] = 0
  yy, xx = np.mgrid[:IMAGE, :IMAGE]
  centres = rng.integers(8, IMAGE - 8, (BATCH, 2))
  mask = ((yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2
          < 36).astype(np.float32)[..., None]
  image = rng.standard_normal((BATCH, IMAGE, IMAGE, 3)).astype(np.float32) + 2 * mask
  return dict(image=image, mask=mask * labeled,
              text_ids=rng.integers(5, 50, (BATCH, 8)).astype(np.int32),
              text_mask=text_mask, index=index.astype(np.int32),
              is_labeled=np.full((BATCH,), labeled), valid=np.ones((BATCH,), bool))


def to_device(batch: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in batch.items()}


def steps_for(config, graphdef, tx):
  return ts.make_steps(graphdef, tx, ts.StepConfig.from_config(config))
