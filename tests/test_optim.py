"""cers_jax.core.optim: the optimizer switch (train.optimizer), the schedules of the stage
recipe (train.lr_schedule) and the per-method recipe."""

import math

import flax
import jax
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


# --- the stage recipe (docs/design.md section 9) ------------------------------------------

WARMUP, SEMI = 6, 4  # Optimizer steps of a tiny run's warm-up and semi-supervised stages.


def _rates(schedule, peak=0.1):
  rate = optim.make_schedule(_config(learning_rate=peak), WARMUP + SEMI,
                             warmup_steps=WARMUP, schedule=schedule)
  return [float(rate(step)) for step in range(WARMUP + SEMI)]


def test_semi_cosine_holds_warmup_then_restarts_over_the_semi_stage():
  rates = _rates('semi_cosine')
  assert rates[:WARMUP] == pytest.approx([0.1] * WARMUP)  # The authors' warm-up: constant.
  # First semi step: the peak again; last: the cosine's last value over the stage's 4 steps.
  assert rates[WARMUP] == pytest.approx(0.1)
  assert rates[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (SEMI - 1) / SEMI)))
  assert all(a > b for a, b in zip(rates[WARMUP:], rates[WARMUP + 1:]))


def test_single_cosine_and_constant_schedules():
  rates = _rates('single_cosine')
  total = WARMUP + SEMI
  # The former schedule, unchanged: the semi stage starts part-way down one cosine.
  assert rates[WARMUP] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * WARMUP / total)))
  assert rates[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (total - 1) / total)))
  assert _rates('constant') == pytest.approx([0.1] * total)


def test_recipe_auto_is_each_methods_public_code_and_explicit_values_win():
  config = _config()
  assert optim.recipe(config, 'cers') == optim.Recipe('semi_cosine', 'fresh', 'best', 'semi')
  assert optim.recipe(config, 'bcp') == optim.Recipe('constant', 'fresh', 'best', 'semi')
  assert optim.recipe(config, 'ucmt').lr_schedule == 'constant'
  assert optim.recipe(config, 'mean_teacher').semi_optimizer == 'continue'
  assert optim.recipe(config, 'supervised').select_from == 'any'
  assert optim.recipe(config, 'my.project:METHOD') == optim.Recipe()  # The former behaviour.
  former = _config(lr_schedule='single_cosine', semi_optimizer='continue', semi_init='last',
                   select_from='any')
  assert optim.recipe(former, 'cers') == optim.Recipe()
  with pytest.raises(ConfigError, match=r"train.lr_schedule='cosine': choose one of"):
    optim.recipe(_config(lr_schedule='cosine'), 'cers')


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_a_fresh_optimizer_forgets_the_gradients_but_not_the_step(name):
  """The semi stage's new optimizer state: momentum / Adam moments at zero, while the
  schedule's count is the run's step, so the rate is the schedule's at that step."""
  config = _config(optimizer=name, learning_rate=0.1, weight_decay=0.0)
  tx = optim.make_optimizer(config, WARMUP + SEMI, warmup_steps=WARMUP,
                            schedule='semi_cosine')

  @flax.struct.dataclass
  class State:
    step: jnp.ndarray
    params: dict
    opt_state: optax.OptState

  params = {'w': jnp.full((2,), 1.0)}
  opt_state = tx.init(params)
  for _ in range(WARMUP):
    _, opt_state = tx.update({'w': jnp.full((2,), 3.0)}, opt_state, params)
  state = optim.fresh_optimizer_state(
      tx, State(step=jnp.asarray(WARMUP, jnp.int32), params=params, opt_state=opt_state))
  counts = [leaf.count for leaf in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(leaf, optax.ScaleByScheduleState)]
  assert [int(c) for c in counts] == [WARMUP]
  # The first semi update is a first update at the semi stage's first rate (the peak):
  # SGD -lr * g with no momentum carried over; Adam -lr * sign(g) (bias-corrected anew).
  updates, _ = tx.update({'w': jnp.full((2,), 1.0)}, state.opt_state, params)
  assert float(updates['w'][0]) == pytest.approx(-0.1, rel=1e-4)


def test_brisc_small_budget_under_the_new_defaults():
  """The arithmetic of configs/brisc_small.py's CERS (787 labeled images, batch 16: 49
  warm-up steps an epoch; 5 semi epochs of 55 steps): the semi stage's share of the steps,
  and the rate and consistency weight at its first and last step."""
  from cers_jax.methods import cers
  from configs import brisc_small

  config = brisc_small.get_config()
  warmup_total = config.train.warmup_epochs * (787 // config.train.batch_size)
  semi_total = config.train.epochs * config.train.steps_per_epoch
  assert (warmup_total, semi_total) == (980, 275)
  recipe = optim.recipe(config, 'cers')
  assert recipe == optim.Recipe('semi_cosine', 'fresh', 'best', 'semi')
  rate = optim.make_schedule(config, warmup_total + semi_total, warmup_steps=warmup_total,
                             schedule=recipe.lr_schedule)
  first, last = warmup_total, warmup_total + semi_total - 1
  assert float(rate(first)) == pytest.approx(2e-3)
  assert float(rate(last)) == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 274 / 275)),
                                           rel=1e-3)  # float32 near 0: 6.5e-8.
  ramp = cers.consistency_ramp(config, warmup_total=warmup_total, semi_total=semi_total)
  assert float(ramp(first)) == pytest.approx(0.003 * math.exp(-5.0), rel=1e-5)
  assert float(ramp(last)) == pytest.approx(0.003 * math.exp(-5.0 / 275 ** 2), rel=1e-5)
  assert float(ramp(last)) > 0.99 * 0.003  # A short stage still reaches the full weight.
  # The former epoch-count ramp (share 0): the authors' 200 epochs, under 1% of the peak.
  config.train.consistency_rampup_share = 0.0
  assert cers.consistency_ramp(config, warmup_total=warmup_total,
                               semi_total=semi_total) is None
