"""The stage runner's start of the last stage (cers_jax/training/stages.py): the semi stage
starts from warm-up's best weights (train.semi_init) and the best checkpoint is chosen
among semi epochs (train.select_from), with the warm-up's best kept for the summary."""

import types

import flax
import jax
import jax.numpy as jnp
import optax
import pytest

from cers_jax.core import optim
from cers_jax.core.method import Stage
from cers_jax.core.progress import WARMUP, Progress
from cers_jax.training import checkpoints as checkpointing
from cers_jax.training import stages
from configs import base


@flax.struct.dataclass
class _State:
  step: jnp.ndarray
  params: dict
  opt_state: optax.OptState


TX = optax.sgd(optax.constant_schedule(0.1), momentum=0.9)


def _schedule_states(opt_state) -> list[optax.ScaleByScheduleState]:
  return [leaf for leaf in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
          if isinstance(leaf, optax.ScaleByScheduleState)]


def _state(step: int, value: float) -> _State:
  params = {'w': jnp.full((2,), value)}
  return _State(step=jnp.asarray(step, jnp.int32), params=params, opt_state=TX.init(params))


class _Checkpoints:
  def __init__(self, best):
    self.best, self.restored = best, []

  def restore(self, which, target):
    self.restored.append(which)
    return self.best, {}


def _exp(method='cers', **train):
  config = base.get_config()
  for key, value in train.items():
    config.train[key] = value
  return types.SimpleNamespace(config=config, method=types.SimpleNamespace(name=method),
                               checkpoints=_Checkpoints(_state(step=12, value=7.0)))


def _warmup(validates=True):
  return Stage(name=WARMUP, epochs=5, steps_per_epoch=6, streams=('labeled',),
               epoch_step=lambda epoch: (None, {}), images_per_step=4, validates=validates)


# Warm-up ran 5 epochs (30 steps); its best was epoch 2 (step 12), val Dice 0.4.
AFTER_WARMUP = Progress(stage=WARMUP, epoch=5, best_dice=0.4, best_epoch=2)


def test_cers_starts_from_the_warmup_best_and_selects_among_semi_epochs():
  exp = _exp()
  state, progress = stages._enter_last_stage(exp, _warmup(), _state(30, 1.0), AFTER_WARMUP)
  assert exp.checkpoints.restored == [checkpointing.BEST]
  assert float(state.params['w'][0]) == 7.0  # The best's weights ...
  assert int(state.step) == 30  # ... at the run's step: schedule, ramp and keys go on.
  counts = [leaf.count for leaf in _schedule_states(state.opt_state)]
  assert [int(c) for c in counts] == [30]
  assert (progress.best_dice, progress.best_epoch) == (-1.0, -1)  # Semi epochs only.
  assert (progress.warmup_best_dice, progress.warmup_best_epoch) == (0.4, 2)
  assert progress.to_meta()['warmup_best_epoch'] == 2  # Saved, so a resume keeps it.


def test_the_former_recipe_keeps_the_last_weights_and_any_epochs_best():
  exp = _exp(semi_init='last', select_from='any')
  state, progress = stages._enter_last_stage(exp, _warmup(), _state(30, 1.0), AFTER_WARMUP)
  assert exp.checkpoints.restored == []
  assert float(state.params['w'][0]) == 1.0
  assert (progress.best_dice, progress.best_epoch) == (0.4, 2)
  assert (progress.warmup_best_dice, progress.warmup_best_epoch) == (0.4, 2)


@pytest.mark.parametrize('method', ['mean_teacher', 'ucmt'])
def test_methods_whose_code_runs_one_loop_go_on_from_the_last_weights(method):
  exp = _exp(method)
  state, progress = stages._enter_last_stage(exp, _warmup(), _state(30, 1.0), AFTER_WARMUP)
  assert exp.checkpoints.restored == [] and float(state.params['w'][0]) == 1.0
  assert progress.best_epoch == -1  # Their best is still chosen among semi epochs.


def test_a_warmup_that_did_not_validate_has_no_best_to_start_from():
  exp = _exp()
  unvalidated = Progress(stage=WARMUP, epoch=5)
  state, progress = stages._enter_last_stage(exp, _warmup(validates=False), _state(30, 1.0),
                                             unvalidated)
  assert exp.checkpoints.restored == [] and float(state.params['w'][0]) == 1.0
  assert progress.warmup_best_epoch == -1 and 'warmup_best_epoch' not in progress.to_meta()


def test_a_fresh_optimizer_state_at_the_run_step():
  grads = {'w': jnp.ones((2,))}
  state = _state(30, 1.0)
  _, moved = TX.update(grads, state.opt_state, state.params)
  fresh = optim.fresh_optimizer_state(TX, state.replace(opt_state=moved))
  assert float(jnp.abs(fresh.opt_state[0].trace['w']).sum()) == 0.0
  assert int(_schedule_states(fresh.opt_state)[0].count) == 30


@pytest.mark.slow
def test_cers_semi_stage_starts_from_the_validated_warmup_best_once(tmp_path):
  """The tiny CERS run with warm-up validated: the semi stage starts from warm-up's best
  (its pool built from those weights), selection restarts, the summary has the warm-up's
  best; stopped after every epoch and resumed, the same records."""
  from cers_jax.training import loop  # pylint: disable=g-import-not-at-top
  from tests.run_configs import method_runs  # pylint: disable=g-import-not-at-top

  config = lambda **train: method_runs.method_config(  # noqa: E731
      'cers', warmup_epochs=2, epochs=1, validate_warmup=True, **train)
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  summary = loop.train_and_evaluate(config(), whole, mode='train')
  records = method_runs.records(whole)
  assert [(r['stage'], r['epoch']) for r in records] == [
      ('warmup', 0), ('warmup', 1), ('semi', 0)]
  warmup_best = max(r['val_dice_r_mean'] for r in records[:2])
  assert summary['warmup_best_val_dice'] == pytest.approx(warmup_best)
  assert summary['best_epoch'] == 1  # The semi epoch, whatever the warm-up scored.
  assert summary['semi_minus_warmup'] == pytest.approx(records[2]['val_dice_r_mean']
                                                       - warmup_best)
  for _ in range(3):
    loop.train_and_evaluate(config(stop_after_epochs=1), split, mode='train')
  for got, want in zip(method_runs.records(split), records, strict=True):
    assert got == {k: pytest.approx(v, rel=1e-5) if isinstance(v, float) else v
                   for k, v in want.items()}
