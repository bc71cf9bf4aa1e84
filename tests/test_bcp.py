"""BCP's two jitted steps on a tiny ConvNeXt U-Net: the teacher's fixed-decay EMA over
parameters and BatchNorm statistics, its pseudo labels, and the self-train start (the
operations themselves are checked against the authors' code in tests/test_bcp_ops.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cers_jax.errors import ConfigError
from cers_jax.methods import bcp
from cers_jax.methods import student as st
from tests.run_configs import tiny_run


def _setup():
  config = tiny_run.get_config()
  tx = optax.sgd(0.05)
  graphdef, state = st.create_state(st.build_network(config, 1), tx, rng=jax.random.key(0),
                                    with_teacher=True)
  rng = np.random.default_rng(0)
  batch = lambda: {'image': jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),  # noqa: E731
                   'mask': jnp.asarray(rng.uniform(size=(4, 32, 32, 1)) > 0.7, jnp.float32)}
  return graphdef, state, tx, batch


def _close(tree_a, tree_b, **tolerance):
  for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tolerance)


def test_pretrain_step_learns_from_a_labeled_pair_and_leaves_the_teacher():
  graphdef, state, tx, batch = _setup()
  step = jax.jit(lambda s, l: bcp.pretrain_step(s, l, graphdef=graphdef, tx=tx,
                                                hyper=bcp.Hyper()))
  labeled = batch()
  new, metrics = step(state, labeled)
  assert int(new.step) == 1 and np.isfinite(float(metrics['loss']))
  _close(new.teacher.params, state.teacher.params)  # The teacher waits for self-training.
  losses = [float(metrics['loss'])]
  for _ in range(5):
    new, metrics = step(new, labeled)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0]


def test_self_train_step_averages_parameters_and_statistics_with_a_fixed_decay():
  graphdef, state, tx, batch = _setup()
  state = bcp.teacher_from_student(state)
  _close(state.teacher.params, state.params)
  step = jax.jit(lambda s, l, u: bcp.self_train_step(s, l, u, graphdef=graphdef, tx=tx,
                                                     hyper=bcp.Hyper()))
  teacher_before = state.teacher
  new, metrics = step(state, batch(), batch())
  # 0.99 at every step (their update_model_ema), not min(1 - 1/(t + 1), 0.99).
  want_params = jax.tree.map(lambda t, s: 0.99 * t + 0.01 * s, teacher_before.params,
                             new.params)
  want_stats = jax.tree.map(lambda t, s: 0.99 * t + 0.01 * s, teacher_before.batch_stats,
                            new.batch_stats)
  _close(new.teacher.params, want_params, atol=1e-6)
  _close(new.teacher.batch_stats, want_stats, atol=1e-6)
  assert np.isfinite(float(metrics['loss']))
  assert float(metrics['loss']) == pytest.approx(
      float(metrics['inward']) + float(metrics['outward']), rel=1e-6)


@pytest.mark.parametrize('bias, foreground', [(50.0, 1.0), (-50.0, 0.0)])
def test_pseudo_labels_are_the_teachers(bias, foreground):
  graphdef, state, tx, batch = _setup()
  # A teacher whose head says "lesion" (or "background") everywhere labels every pixel so.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, bias)
      if "['head']['out']['bias']" in jax.tree_util.keystr(path) else x, state.teacher.params)
  state = state.replace(teacher=state.teacher.replace(params=params))
  _, metrics = jax.jit(lambda s, l, u: bcp.self_train_step(
      s, l, u, graphdef=graphdef, tx=tx, hyper=bcp.Hyper()))(state, batch(), batch())
  assert float(metrics['pseudo_foreground']) == foreground


def test_check_refuses_odd_batches_and_boxes_without_room():
  config = tiny_run.get_config()
  config.train.batch_size = 3
  with pytest.raises(ConfigError, match='BCP splits each batch into two halves'):
    bcp.METHOD.check(config)
  config.train.batch_size = 4
  config.bcp.patch_ratio = 1.0
  with pytest.raises(ValueError, match='needs 0 < side < 32'):
    bcp.METHOD.check(config)
