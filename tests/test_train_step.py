"""The jitted warm-up / semi-supervised / eval steps on a tiny CERS."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cers_jax import sharding
from cers_jax.core import embed
from cers_jax.core import steps as ts
from cers_jax.data.cache import Cache
from cers_jax.data.dataset import Data
from cers_jax.data.pipeline import PipelineArrays
from cers_jax.data.records import Sample
from cers_jax.retrieval import pool as kp
from cers_jax.retrieval import search
from cers_jax.training import epoch as epoch_lib
from cers_jax.training import loop as train
from tests import train_helpers as th

pytestmark = pytest.mark.slow  # Compiles the train steps (several devices, bfloat16).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def setup():
  config = th.tiny_config()
  graphdef, tx, state = th.make_state(config)
  return config, graphdef, tx, state, th.steps_for(config, graphdef, tx)


def _copy(state):
  return jax.tree.map(jnp.copy, state)


def test_warmup_step_trains_and_keeps_the_pool(setup):
  config, graphdef, tx, state, steps = setup
  state = _copy(state)
  pool_before = np.array(state.pool.feat)
  params_before = jax.tree.map(np.array, state.params)
  losses = []
  for i in range(3):
    state, aux = steps.warmup(state, th.to_device(th.make_batch(i, labeled=True)))
    losses.append(float(aux['loss']))
    assert np.isfinite(float(aux['clip'])) and float(aux['clip']) > 0
  assert all(np.isfinite(losses))
  assert int(state.step) == 3
  np.testing.assert_array_equal(np.asarray(state.pool.feat), pool_before)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), params_before,
                         state.params)
  assert any(jax.tree.leaves(changed)), 'no parameter moved'
  # The CoT encoder is frozen: it lives outside the optimized params.
  assert not any('cot_encoder' in str(path) for path, _ in
                 jax.tree_util.tree_leaves_with_path(state.params))


def test_semi_step_updates_only_labeled_pool_rows_with_eq5(setup):
  config, graphdef, tx, state, steps = setup
  state = _copy(state)
  labeled = th.make_batch(10, labeled=True)
  unlabeled = th.make_batch(11, labeled=False)
  old_feat = np.array(state.pool.feat)  # A copy: the step donates (reuses) the buffer.
  # f4 of the labeled batch as the training forward computes it (same rng, same params).
  new_state, aux = steps.semi(state, th.to_device(labeled), th.to_device(unlabeled),
                              jnp.float32(0.003))
  assert np.isfinite(float(aux['loss'])) and float(aux['consistency_raw']) > 0
  new_feat = np.asarray(new_state.pool.feat)
  rows = labeled['index']
  untouched = np.setdiff1d(np.arange(th.POOL_ROWS), rows)
  np.testing.assert_array_equal(new_feat[untouched], old_feat[untouched])
  assert not np.allclose(new_feat[rows], old_feat[rows])
  # Eq. 5: new = m*old + (1-m)*f4, so (new - m*old)/(1-m) is an encoder output; its keys
  # are the normalised flattened maps.
  m = config.pool.momentum
  key = new_feat[rows].reshape(len(rows), -1)
  np.testing.assert_allclose(np.asarray(new_state.pool.key)[rows],
                             key / np.linalg.norm(key, axis=1, keepdims=True), rtol=1e-5,
                             atol=1e-6)
  implied_f4 = (new_feat[rows] - m * old_feat[rows]) / (1 - m)
  assert np.all(np.isfinite(implied_f4)) and np.abs(implied_f4).max() > 0


def test_no_recompiles_after_the_first_step(setup):
  config, graphdef, tx, state, steps = setup
  state = _copy(state)
  for i in range(3):
    state, _ = steps.warmup(state, th.to_device(th.make_batch(20 + i, labeled=True)))
    state, _ = steps.semi(state, th.to_device(th.make_batch(30 + i, labeled=True)),
                          th.to_device(th.make_batch(40 + i, labeled=False)),
                          jnp.float32(0.001 * i))
    steps.evaluate(state, th.to_device(th.make_batch(50 + i, labeled=False)))
  for fn in (steps.warmup, steps.semi, steps.evaluate):
    assert fn._cache_size() == 1, f'{fn} compiled {fn._cache_size()} times'


def test_an_epoch_makes_only_explicit_transfers(setup):
  """The training loop's epoch under jax.transfer_guard('disallow'): batches reach the mesh
  through explicit placement and metrics come back through jax.device_get, so no step
  hides a host round-trip. (The CPU backend guards host-to-device copies only; on a GPU,
  scripts/gpu_check.sh runs this test with device-to-host reads guarded too.)"""
  config, graphdef, tx, state, steps = setup
  mesh = sharding.make_mesh(1)
  state = sharding.place_state(_copy(state), mesh)
  batches = iter([(th.make_batch(60 + i, labeled=True), th.make_batch(70 + i, labeled=False))
                  for i in range(4)])
  weight = jax.device_put(np.float32(0.01))

  def step_fn(state):
    labeled, unlabeled = next(batches)
    return steps.semi(state, sharding.shard_batch(labeled, mesh),
                      sharding.shard_batch(unlabeled, mesh), weight)

  state, _ = step_fn(state)  # Compiling may move constants; the guard covers the steady state.
  first_step = int(state.step)
  with jax.transfer_guard('disallow'):
    state, record = epoch_lib.run_epoch(
        state, step_fn, stage=train.SEMI, epoch=0, num_steps=3, batch_images=2 * th.BATCH,
        desc='guarded epoch', log_every=config.train.log_every, refresh_seconds=0.0)
  assert np.isfinite(record['loss']) and record['step'] == first_step + 3
  with pytest.raises(Exception, match='[Dd]isallowed'):  # The guard is live here.
    with jax.transfer_guard('disallow'):
      jnp.asarray(th.make_batch(80, labeled=True)['image'])


def test_eval_step_is_deterministic_and_retrieves_k_rows(setup):
  config, graphdef, tx, state, steps = setup
  batch = th.to_device(th.make_batch(60, labeled=False))
  out1 = steps.evaluate(state, batch)
  out2 = steps.evaluate(state, batch)
  np.testing.assert_array_equal(np.asarray(out1['prob_r']), np.asarray(out2['prob_r']))
  assert out1['prob_r'].shape == (th.BATCH, th.IMAGE, th.IMAGE, 1)
  ids = np.asarray(out1['retrieved_ids'])
  assert ids.shape == (th.BATCH, config.pool.k)
  assert ids.min() >= 0 and ids.max() < th.POOL_ROWS
  # The same ranking as calling the pool directly with the batch's f4 and CoT embedding.
  f4 = steps.features(state, batch)
  direct = search.retrieve(state.pool, f4, state.tables.query_cot[batch['index']],
                       state.tables.query_text[batch['index']], mode=config.pool.mode,
                       k_coarse=config.pool.k_coarse, k=config.pool.k,
                       exclude=batch['index'], centre=config.pool.centre_cot)
  np.testing.assert_array_equal(ids, np.asarray(direct.ids))


def test_self_exclusion_in_the_step(setup):
  config, graphdef, tx, state, steps = setup
  batch = th.to_device(th.make_batch(70, labeled=True))
  # Put each query's own f4 into its pool row: without exclusion it would retrieve itself.
  f4 = steps.features(state, batch)
  pool = kp.ema_update(state.pool, kp.pool_rows(state.pool, batch['index']), f4, 0.0)
  state = state.replace(pool=pool)
  image_steps = ts.make_steps(graphdef, tx, ts.StepConfig(mode='image', k_coarse=6, k=3,
                                                          exclude_self=True))
  ids = np.asarray(image_steps.evaluate(state, batch)['retrieved_ids'])
  assert not np.any(ids == np.asarray(batch['index'])[:, None])
  keep_steps = ts.make_steps(graphdef, tx, ts.StepConfig(mode='image', k_coarse=6, k=3,
                                                         exclude_self=False))
  ids = np.asarray(keep_steps.evaluate(state, batch)['retrieved_ids'])
  np.testing.assert_array_equal(ids[:, 0], np.asarray(batch['index']))


def test_semi_step_without_retrieval():
  """Mode 'none' (Table 2's baseline): no pool access, D_r's deepest block gets no rag."""
  config = th.tiny_config()
  config.pool.mode = 'none'
  graphdef, tx, state = th.make_state(config)
  steps = th.steps_for(config, graphdef, tx)
  pool_before = np.array(state.pool.feat)
  state, aux = steps.semi(state, th.to_device(th.make_batch(1, labeled=True)),
                          th.to_device(th.make_batch(2, labeled=False)), jnp.float32(0.003))
  assert np.isfinite(float(aux['loss']))
  np.testing.assert_array_equal(np.asarray(state.pool.feat), pool_before)
  out = steps.evaluate(state, th.to_device(th.make_batch(3, labeled=False)))
  assert 'retrieved_ids' not in out


@pytest.mark.parametrize('mode', ['image', 'cot', 'text', 'image+text'])
def test_eval_step_ranks_like_the_pool_in_every_mode(setup, mode):
  config, graphdef, tx, state, _ = setup
  cfg = ts.StepConfig(mode=mode, k_coarse=6, k=3)
  steps = ts.make_steps(graphdef, tx, cfg)
  batch = th.to_device(th.make_batch(4, labeled=False))
  ids = np.asarray(steps.evaluate(state, batch)['retrieved_ids'])
  f4 = steps.features(state, batch)
  direct = search.retrieve(state.pool, f4, state.tables.query_cot[batch['index']],
                       state.tables.query_text[batch['index']], mode=mode, k_coarse=6, k=3,
                       exclude=batch['index'])
  np.testing.assert_array_equal(ids, np.asarray(direct.ids))


def test_bfloat16_compute_tracks_float32():
  """Mixed precision: bf16 activations, f32 params and losses, close to the f32 run."""
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = th.tiny_config(compute_dtype=dtype)
    # A small step size: with the demo's 0.05, a tiny random model is chaotic enough that
    # any rounding difference grows step by step, which says nothing about precision.
    config.train.learning_rate = 0.005
    graphdef, tx, state = th.make_state(config)
    steps = th.steps_for(config, graphdef, tx)
    losses = []
    for i in range(4):  # Semi steps: encoder, retrieval (bf16 f4 queries), both decoders.
      state, aux = steps.semi(state, th.to_device(th.make_batch(80 + i, labeled=True)),
                              th.to_device(th.make_batch(90 + i, labeled=False)),
                              jnp.float32(0.003))
      losses.append(float(aux['loss']))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    results[dtype] = np.array(losses)
  np.testing.assert_allclose(results['bfloat16'], results['float32'], rtol=0.05)


_MULTI_DEVICE = r'''
import sys
sys.path.insert(0, {repo!r})
import jax, jax.numpy as jnp, numpy as np
from cers_jax import sharding
from tests import train_helpers as th

assert jax.device_count() == 4, jax.devices()
config = th.tiny_config()
results = {{}}
for devices in (1, 4):
  graphdef, tx, state = th.make_state(config)
  steps = th.steps_for(config, graphdef, tx)
  mesh = sharding.make_mesh(devices)
  state = sharding.place_state(state, mesh)
  losses = []
  for i in range(2):  # The semi step covers BN, retrieval, the pool update and gradients.
    state, aux = steps.semi(state, sharding.shard_batch(th.make_batch(i, labeled=True), mesh),
                            sharding.shard_batch(th.make_batch(5 + i, labeled=False), mesh),
                            jnp.float32(0.003))
    losses.append(float(aux['loss']))
  results[devices] = (np.array(losses), jax.tree.map(np.asarray, state.params),
                      jax.tree.map(np.asarray, state.batch_stats), np.asarray(state.pool.feat))
l1, p1, b1, f1 = results[1]
l4, p4, b4, f4 = results[4]
np.testing.assert_allclose(l4, l1, rtol=1e-4)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), p4, p1)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), b4, b1)
np.testing.assert_allclose(f4, f1, rtol=1e-3, atol=1e-5)

# config.pool.shard_rows: pool rows split over the 4 devices, same retrieval and outputs.
graphdef, tx, state = th.make_state(config)
steps = th.steps_for(config, graphdef, tx)
mesh = sharding.make_mesh(4)
batch = sharding.shard_batch(th.make_batch(7, labeled=False), mesh)
outs = [steps.evaluate(sharding.place_state(state, mesh, shard_pool_rows=rows), batch)
        for rows in (False, True)]
np.testing.assert_array_equal(np.asarray(outs[0]['retrieved_ids']),
                              np.asarray(outs[1]['retrieved_ids']))
np.testing.assert_allclose(np.asarray(outs[0]['prob_r']), np.asarray(outs[1]['prob_r']),
                           rtol=1e-5, atol=1e-6)
print('4-device step matches 1 device:', l1, l4)
'''


def test_four_devices_match_one_device():
  """Data parallel over 4 host devices: same losses, params, BN stats and pool."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _MULTI_DEVICE.format(repo=REPO)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert '4-device step matches 1 device' in result.stdout


def test_epoch_refresh_follows_the_authors_rule(setup):
  """pool.update_rule=epoch_refresh: every labeled row recomputed in eval mode and blended
  into the unit-norm key; fusion gets the unit-norm rows (as the authors' code does)."""
  config, graphdef, tx, state, steps = setup
  rng = np.random.default_rng(3)
  n = th.NUM_SAMPLES
  arrays = PipelineArrays(
      images=rng.integers(0, 255, (n, th.IMAGE, th.IMAGE, 3), dtype=np.uint8),
      masks=rng.integers(0, 2, (n, th.IMAGE, th.IMAGE), dtype=np.uint8),
      text_ids=rng.integers(5, 50, (n, 8)).astype(np.int32),
      text_mask=np.ones((n, 8), np.int32))
  labeled = np.arange(th.POOL_ROWS, dtype=np.int32)
  samples = [Sample(id=f's{r}', image_path=f's{r}.png', mask_path=f'm{r}.png', text='',
                    cot_mask=None, cot_no_mask=None) for r in range(n)]
  cache = Cache('unused', arrays.images, arrays.masks, np.ones(n, bool), samples, {})
  data = Data(cache=cache, rows={'train_labeled': labeled},
              tokens=dict(text_ids=arrays.text_ids, text_mask=arrays.text_mask),
              text_tokenizer=None, cot_tokenizer=None)
  old_key = np.array(state.pool.key)
  refreshed = embed.with_refreshed_pool(state, steps, data, config)
  feats = np.concatenate([np.asarray(steps.features(state, th.to_device(b)))[b['valid']]
                          for b in embed.labeled_batches(data, labeled,
                                                         config.train.eval_batch_size)])
  beta = config.pool.momentum
  blended = beta * old_key + (1 - beta) * feats.reshape(len(labeled), -1)
  want = blended / np.maximum(np.linalg.norm(blended, axis=1, keepdims=True), 1e-8)
  np.testing.assert_allclose(np.asarray(refreshed.pool.key), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(refreshed.pool.feat).reshape(len(labeled), -1), want,
                             rtol=1e-5, atol=1e-6)
