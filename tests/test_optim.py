"""cers_jax.core.optim: the optimizer switch (train.optimizer) on the cosine schedule."""

import jax.numpy as jnp
import optax
import pytest

from cers_jax.core import optim
from cers_jax.errors import ConfigError
from configs import base


def _config(**train):
  config = base.get_config()
  for key, value in train.items():
    config.train[key] = value
  return config


def _first_update(config, grad=1.0, param=2.0):
  tx = optim.make_optimizer(config, total_steps=10)
  params = {'w': jnp.full((3,), param)}
  updates, _ = tx.update({'w': jnp.full((3,), grad)}, tx.init(params), params)
  return float(updates['w'][0])


def test_sgd_is_the_authors_update_with_coupled_decay():
  config = _config(learning_rate=0.1, weight_decay=0.5)
  # -lr * (g + wd * p) at step 0 (momentum has nothing to add yet).
  assert _first_update(config) == pytest.approx(-0.1 * (1.0 + 0.5 * 2.0))


def test_adamw_decays_apart_from_the_gradient():
  config = _config(optimizer='adamw', learning_rate=0.1, weight_decay=0.5)
  # Adam's first step is -lr * sign(g); AdamW then subtracts lr * wd * p on its own.
  assert _first_update(config) == pytest.approx(-0.1 * 1.0 - 0.1 * 0.5 * 2.0, rel=1e-4)
  assert isinstance(optim.make_optimizer(config, 10), optax.GradientTransformation)


def test_an_unknown_optimizer_is_refused():
  with pytest.raises(ConfigError, match="train.optimizer='adam': choose one of"):
    optim.make_optimizer(_config(optimizer='adam'), 10)
