"""The optimizer every method shares, its learning-rate schedule and the per-stage recipe.

`train.optimizer` chooses the update rule: 'sgd' (the authors': momentum and torch-style
coupled weight decay) or 'adamw' (decoupled weight decay; docs/design.md section 13).

`train.lr_schedule` chooses the rate by optimizer step (docs/design.md section 9):

  single_cosine  one cosine from `train.learning_rate` to 0 over both stages;
  semi_cosine    the peak rate held through warm-up, then a cosine from the peak to 0 over
                 the semi-supervised stage's own steps (the CERS authors': their warm-up
                 script steps its scheduler outside the epoch loop, and
                 rag_train_two_decoder.py builds a fresh SGD and a cosine over its epochs);
  constant       the peak rate throughout (BCP's and UCMT's public code).

`train.lr_schedule`, `train.semi_optimizer`, `train.semi_init` and `train.select_from` may
be 'auto': each method's own default (`RECIPES`, from its public code), resolved by
`recipe(config, method)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cers_jax.errors import ConfigError

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('single_cosine', 'semi_cosine', 'constant')
SEMI_OPTIMIZERS = ('fresh', 'continue')  # The optimizer state at the semi stage's start.
SEMI_INITS = ('best', 'last')  # The weights the semi stage starts from.
SELECTIONS = ('semi', 'any')  # The epochs the best checkpoint is chosen among.


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How a method spends its stages (the 'auto' value of each train.* switch)."""

  lr_schedule: str = 'single_cosine'
  semi_optimizer: str = 'continue'
  semi_init: str = 'last'
  select_from: str = 'any'


# Each method's public code (docs/design.md sections 9 and 16 give the sources):
#   cers          CERS authors: warm-up script (constant rate, saves and reloads its best),
#                 rag_train_two_decoder.py (loads that checkpoint, fresh SGD, cosine).
#   mean_teacher  SSL4MIS train_mean_teacher_2D.py: one loop, one SGD, one poly decay over
#                 all iterations (single_cosine is the nearest of ours), selection from the
#                 iterations where consistency acts.
#   bcp           BCP ACDC_BCP_train.py: SGD at a constant 0.01; self_train() builds a new
#                 optimizer and loads pre_train()'s best checkpoint.
#   ucmt          UCMT train.py: one loop, AdamW at a constant 1e-4, no stages at all.
#   supervised    no public code: one supervised run, selection over all of it.
RECIPES = {
    'cers': Recipe('semi_cosine', 'fresh', 'best', 'semi'),
    'mean_teacher': Recipe('single_cosine', 'continue', 'last', 'semi'),
    'bcp': Recipe('constant', 'fresh', 'best', 'semi'),
    'ucmt': Recipe('constant', 'continue', 'last', 'semi'),
    'supervised': Recipe('single_cosine', 'continue', 'last', 'any'),
}
_CHOICES = dict(lr_schedule=SCHEDULES, semi_optimizer=SEMI_OPTIMIZERS, semi_init=SEMI_INITS,
                select_from=SELECTIONS)


def recipe(config, method) -> Recipe:
  """`config`'s train.* switches, each 'auto' replaced by `method`'s default (a method not
  in RECIPES, e.g. a research project's, defaults to the single schedule of one run).

  `method`: a method object (its `.name`) or a method name.
  """
  name = getattr(method, 'name', method)
  own = getattr(method, 'recipe', None) or RECIPES.get(name, Recipe())
  values = {}
  for field, choices in _CHOICES.items():
    value = config.train.get(field, 'auto')
    if value == 'auto':
      value = getattr(own, field)
    if value not in choices:
      raise ConfigError(f'--config.train.{field}={value!r}: choose one of '
                        f"{('auto', *choices)}.")
    values[field] = value
  return Recipe(**values)


def make_schedule(config, total_steps: int, *, warmup_steps: int = 0,
                  schedule: str = 'single_cosine') -> optax.Schedule:
  """The learning rate by optimizer step (module docstring).

  Args:
    total_steps: optimizer steps of the whole run.
    warmup_steps: of those, the warm-up stage's (the semi stage starts after them).
    schedule: one of SCHEDULES (`recipe(config, method).lr_schedule`).
  """
  peak = config.train.learning_rate
  if schedule == 'constant':
    return optax.constant_schedule(peak)
  if schedule == 'semi_cosine':
    semi = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1))
    return lambda step: jnp.where(step < warmup_steps, peak,
                                  semi(jnp.maximum(step - warmup_steps, 0)))
  if schedule != 'single_cosine':
    raise ConfigError(f'--config.train.lr_schedule={schedule!r}: choose one of '
                      f"{('auto', *SCHEDULES)}.")
  return optax.cosine_decay_schedule(peak, max(total_steps, 1))


def check(config) -> str:
  """The name of `train.optimizer`; refused here (before any work) when unknown."""
  name = config.train.get('optimizer', 'sgd')
  if name not in OPTIMIZERS:
    raise ConfigError(f'--config.train.optimizer={name!r}: choose one of {OPTIMIZERS}.')
  return name


def make_optimizer(config, total_steps: int, *, warmup_steps: int = 0,
                   schedule: str = 'single_cosine') -> optax.GradientTransformation:
  """`train.optimizer` on `make_schedule`'s rate: SGD with momentum and coupled weight
  decay (the authors'), or AdamW."""
  return _optimizer(config, make_schedule(config, total_steps, warmup_steps=warmup_steps,
                                          schedule=schedule))


def method_optimizer(config, method, *, total_steps: int, warmup_steps: int
                     ) -> tuple[Recipe, optax.GradientTransformation, optax.Schedule]:
  """(`method`'s recipe, its optimizer, the schedule that optimizer follows): what a
  method's `build` needs for a run of `total_steps` optimizer steps, `warmup_steps` of
  them before the semi-supervised stage."""
  own = recipe(config, method)
  rate = make_schedule(config, total_steps, warmup_steps=warmup_steps,
                       schedule=own.lr_schedule)
  return own, _optimizer(config, rate), rate


def _optimizer(config, rate: optax.Schedule) -> optax.GradientTransformation:
  if check(config) == 'adamw':
    return optax.adamw(rate, weight_decay=config.train.weight_decay)
  return optax.chain(optax.add_decayed_weights(config.train.weight_decay),
                     optax.sgd(rate, momentum=config.train.momentum))


def at_step(opt_state, step):
  """`opt_state` with its schedule's count set to `step` (the run's optimizer step), the
  rest as it is. `step` is a device scalar; the count keeps its placement and dtype."""

  def moved(leaf):
    if isinstance(leaf, optax.ScaleByScheduleState):
      return leaf._replace(count=leaf.count * 0 + jnp.asarray(step).astype(leaf.count.dtype))
    return leaf

  return jax.tree.map(moved, opt_state,
                      is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


def fresh_optimizer_state(tx: optax.GradientTransformation, state):
  """`state` with a new optimizer state, as a script that builds a new optimizer for the
  semi stage: momentum (SGD) or the moments and bias-correction count (AdamW) start at zero.

  The schedule's own count is set to `state.step`, not 0: the schedule (`make_schedule`)
  is a function of the run's optimizer step, so a restart of the rate is the schedule's
  business ('semi_cosine') and this only forgets the gradient history.
  """
  return state.replace(opt_state=at_step(tx.init(state.params), state.step))


def semi_start(tx: optax.GradientTransformation, own: Recipe,
               then: Callable[[Any], Any] | None = None) -> Callable[[Any], Any] | None:
  """The semi-supervised stage's `Stage.start`: a fresh optimizer state when the recipe says
  so (train.semi_optimizer=fresh), then `then`, the method's own start (BCP: its teacher)."""
  if own.semi_optimizer != 'fresh':
    return then

  def start(state):
    state = fresh_optimizer_state(tx, state)
    return state if then is None else then(state)

  return start
