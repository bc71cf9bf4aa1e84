"""Checkpoints of the whole TrainState: the pool and tables travel with the parameters."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cers_jax.training import checkpoints
from tests import train_helpers as th

pytestmark = pytest.mark.slow  # A model state written to and read from disk.


@pytest.fixture(scope='module')
def trained():
  """(fresh state, the same state some steps later: new parameters and a filled pool)."""
  config = th.tiny_config()
  _, _, fresh = th.make_state(config)
  rng = np.random.default_rng(5)
  noise = lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)  # noqa: E731
  pool = fresh.pool.replace(feat=noise(fresh.pool.feat), ids=fresh.pool.ids[::-1])
  state = fresh.replace(step=fresh.step + 1, params=jax.tree.map(noise, fresh.params),
                        pool=pool)
  return fresh, state


def _host(state):
  """Every leaf as numpy; PRNG keys (the state's and the modules' streams) as their data."""

  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return jax.tree.map(leaf, state)


def test_save_and_restore_round_trips_the_state_pool_and_meta(tmp_path, trained):
  fresh, state = trained
  store = checkpoints.Checkpoints(str(tmp_path), keep=2)
  meta = dict(stage='semi', epoch=3, best_dice=0.5, iterators={'labeled': [{'pos': 7}]})
  store.save('latest', int(state.step), state, meta, json.dumps({'seed': 1}))
  restored, restored_meta = store.restore('latest', fresh)  # Into the zero-pool structure.
  chex.assert_trees_all_equal(_host(restored), _host(state))
  assert restored_meta == meta
  assert int(restored.step) == 1 and not np.allclose(np.asarray(restored.pool.feat), 0)
  assert checkpoints.read_saved(str(tmp_path)) == ({'seed': 1}, meta)
  store.close()


def test_latest_keeps_the_newest_best_keeps_one_and_a_step_is_replaced(tmp_path, trained):
  fresh, state = trained
  store = checkpoints.Checkpoints(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    store.save('latest', step, state, dict(epoch=step), '{}')
    store.save('best', step, state, dict(epoch=step), '{}')
  store.save('latest', 3, state, dict(epoch=30), '{}')  # The same step saved again.
  latest = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints' / 'latest') if d.isdigit())
  best = [d for d in os.listdir(tmp_path / 'checkpoints' / 'best') if d.isdigit()]
  assert latest == [2, 3] and best == ['3']
  assert store.restore('latest', fresh)[1] == dict(epoch=30)
  assert store.restore('latest', fresh, step=2)[1] == dict(epoch=2)
  store.close()


def test_restore_without_a_checkpoint_says_what_to_do(tmp_path, trained):
  fresh, _ = trained
  assert not checkpoints.has_checkpoint(str(tmp_path), 'best')
  assert checkpoints.read_saved(str(tmp_path)) is None
  store = checkpoints.Checkpoints(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='train first'):
    store.restore('best', fresh)
  store.close()
