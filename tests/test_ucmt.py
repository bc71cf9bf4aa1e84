"""UCMT's steps (cers_jax.methods.ucmt) on a tiny ConvNeXt U-Net: one jitted warm-up step,
one jitted UCMT iteration (two updates, the teacher's collaborative EMA after each, as
Senyh/UCMT train.py calls `weighted_update`), and the teacher's passes and eval step.
The optimizer records what each update was handed, so one compiled UCMT iteration shows the
students between its two updates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cers_jax.core import optim
from cers_jax.errors import ConfigError
from cers_jax.methods import ucmt
from tests.run_configs import tiny_run

WARMUP_TOTAL, SEMI_TOTAL = 2, 10
# A semi state two iterations in: iteration index 3 of the EMA (d = 0.75 < 0.99, so the
# index matters), semi iteration 1 of the ramp.
SEMI_STEP = WARMUP_TOTAL + 2


def _batch(rng, *, mask=True):
  batch = {'image': jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)}
  if mask:
    batch['mask'] = jnp.asarray(rng.uniform(size=(4, 32, 32, 1)) > 0.7, jnp.float32)
  return batch


def _their_weighted_update(teacher, s1, s2, cur_step, ema_decay=0.99, coefficient=0.99):
  """models/deeplabv3.py weighted_update, leaf by leaf in numpy."""
  d = min(1 - 1 / (cur_step + 1), ema_decay)
  w1, w2 = coefficient * (1 - d), (1 - coefficient) * (1 - d)
  return jax.tree.map(lambda t, a, b: d * np.asarray(t) + w1 * np.asarray(a)
                      + w2 * np.asarray(b), teacher, s1, s2)


def _assert_trees_close(got, want, atol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=1e-5)


def _changed(a, b):
  return any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _record_params():
  """A transformation that keeps the parameters each update was handed (pre-update)."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda updates, state, params: (updates, params))


@pytest.fixture(scope='module')
def setup():
  config = tiny_run.get_config()
  tx = optax.chain(optim.make_optimizer(config, WARMUP_TOTAL + 2 * SEMI_TOTAL),
                   _record_params())
  graphs, state = ucmt.create_state(config, tx)
  return dict(config=config, tx=tx, graphs=graphs, state=state,
              hyper=ucmt.Hyper.from_config(config), rng=np.random.default_rng(0))


def test_hyper_and_budget(setup):
  hyper = setup['hyper']
  assert hyper == ucmt.Hyper(alpha=0.1, rampup=0.2, ema_decay=0.99, coefficient=0.99,
                             grid=16, topk=2)
  assert isinstance(hyper.grid, int) and isinstance(hyper.topk, int)
  plan = ucmt.st.Plan(warmup_steps_per_epoch=3, semi_steps_per_epoch=5, warmup_total=6,
                      semi_total=10)
  assert ucmt.optimizer_steps(plan) == 26  # Two optimizer steps per UCMT iteration.


def test_students_start_apart_and_the_teacher_as_student_1(setup):
  state = setup['state']
  s1, s2 = (ucmt.student_params(state.params, i) for i in (0, 1))
  assert _changed(s1, s2)
  _assert_trees_close(state.teacher.params, s1, atol=0)


def test_warmup_step_updates_both_students_and_copies_them_into_the_teacher(setup):
  graphs, tx, hyper, state = setup['graphs'], setup['tx'], setup['hyper'], setup['state']
  step = jax.jit(lambda s, l: ucmt.warmup_step(s, l, graphs=graphs, tx=tx, hyper=hyper))
  new, metrics = step(state, _batch(setup['rng']))
  assert int(new.step) == 1 and np.isfinite(float(metrics['loss']))
  assert _changed(state.params, new.params)
  # Iteration 0: d = 0, the teacher becomes 0.99 S1 + 0.01 S2 whatever it was.
  want = _their_weighted_update(state.teacher.params, ucmt.student_params(new.params, 0),
                                ucmt.student_params(new.params, 1), 0)
  _assert_trees_close(new.teacher.params, want)
  assert _changed(state.teacher.batch_stats, new.teacher.batch_stats)  # Its own pass.
  assert _changed(state.batch_stats, new.batch_stats)  # The students' passes reach the state.


def test_semi_step_is_two_updates_with_the_collaborative_ema_after_each(setup):
  graphs, tx, hyper = setup['graphs'], setup['tx'], setup['hyper']
  state = setup['state'].replace(step=jnp.asarray(SEMI_STEP, jnp.int32))
  step = jax.jit(lambda s, l, u: ucmt.semi_step(s, l, u, graphs=graphs, tx=tx, hyper=hyper,
                                                warmup_total=WARMUP_TOTAL,
                                                semi_total=SEMI_TOTAL))
  new, metrics = step(state, _batch(setup['rng']), _batch(setup['rng'], mask=False))
  assert int(new.step) == SEMI_STEP + 2
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  ramp = float(np.exp(-5 * (1 - 1 / (hyper.rampup * SEMI_TOTAL)) ** 2))  # Iteration 1.
  np.testing.assert_allclose(float(metrics['ramp']), ramp, rtol=1e-5)
  # The students after update 1: what update 2 was handed (_record_params).
  after_1 = new.opt_state[-1]
  assert _changed(state.params, after_1) and _changed(after_1, new.params)
  teacher = state.teacher.params
  for students in (after_1, new.params):  # Both with step = the iteration's index.
    teacher = _their_weighted_update(teacher, ucmt.student_params(students, 0),
                                     ucmt.student_params(students, 1), WARMUP_TOTAL + 1)
  _assert_trees_close(new.teacher.params, teacher)
  # The teacher's statistics come from its own passes (step 1), not from the students.
  assert _changed(state.teacher.batch_stats, new.teacher.batch_stats)
  assert _changed(ucmt.student_params(new.batch_stats, 0), new.teacher.batch_stats)


def test_the_teacher_trains_with_stochastic_depth_and_borrows_student_1s_rng_shape():
  config = tiny_run.get_config()
  config.model.drop_path_rate = 0.3
  graphs, state = ucmt.create_state(config, optax.sgd(0.1))
  image = _batch(np.random.default_rng(1))['image']
  passes = jax.jit(lambda s, k: ucmt.teacher_passes(graphs, s, (image,), k)[0][0])
  assert not np.allclose(passes(state, jax.random.key(0)), passes(state, jax.random.key(1)))


def test_evaluate_runs_the_teacher_in_eval_mode(setup):
  graphs, state = setup['graphs'], setup['state']
  evaluate = jax.jit(lambda s, b: ucmt.eval_step(s, b, graphs=graphs, threshold=0.5))
  batch = _batch(setup['rng'])
  out = evaluate(state, batch)
  prob = np.asarray(out['prob_seg'])
  assert prob.shape == (4, 32, 32, 1) and prob.min() >= 0 and prob.max() <= 1
  assert out['dice_seg'].shape == (4,) and out['iou_seg'].shape == (4,)
  # Only the teacher is read: zeroing the students changes nothing.
  zeroed = state.replace(params=jax.tree.map(jnp.zeros_like, state.params))
  np.testing.assert_array_equal(np.asarray(evaluate(zeroed, batch)['prob_seg']), prob)
  # Eval mode: a row's prediction does not depend on the rest of the batch.
  single = evaluate(state, {'image': batch['image'][:1]})
  assert set(single) == {'prob_seg'}
  np.testing.assert_allclose(np.asarray(single['prob_seg']), prob[:1], atol=1e-5)


@pytest.mark.parametrize('field, value', [('grid', 5), ('topk', 0), ('topk', 257)])
def test_check_refuses_a_umix_that_does_not_fit(field, value):
  config = tiny_run.get_config()
  config.method = 'ucmt'
  config.ucmt[field] = value
  with pytest.raises(ConfigError, match=f'ucmt.{field}'):
    ucmt.METHOD.check(config)


def test_method_fields():
  method = ucmt.METHOD
  assert (method.name, method.decoders, method.primary, method.stage_names,
          method.retrieval_stage) == ('ucmt', ('seg',), 'seg', ('warmup', 'semi'), None)
  assert dataclasses.is_dataclass(method)
