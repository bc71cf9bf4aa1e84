"""Row-sharded knowledge pool on 4 host devices (DESIGN.md section 2, two-stage top-k).

XLA_FLAGS must be set before jax initialises and the rest of the suite runs on one device,
so the test re-runs this file as a subprocess with 4 forced host devices; the checks live
in `_worker` and compare every sharded result with the one-device result and the numpy
reference of tests/test_knowledge_pool.py.
"""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
DEVICES = 4


def test_sharded_pool_matches_single_device():
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, f'worker failed:\n{proc.stdout}\n{proc.stderr[-6000:]}'
  assert 'sharded checks passed' in proc.stdout, proc.stdout


def _worker() -> None:
  sys.path.insert(0, str(HERE))
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import ml_dtypes
  import numpy as np

  from cers_jax import knowledge_pool as kp
  import test_knowledge_pool as single

  assert jax.device_count() == DEVICES, jax.devices()
  checks = 0

  def same(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def same_retrieved(out, want):
    for name in ('rows', 'ids', 'feat'):
      same(getattr(out, name), getattr(want, name))
    # The same cosines, reduced in shard-sized pieces: equal up to float32 rounding.
    np.testing.assert_allclose(np.asarray(out.scores), np.asarray(want.scores), rtol=1e-6,
                               atol=1e-7)

  # n = 14 does not split over 4 shards: shard_pool pads 2 rows that must never come back.
  case = single.random_case(seed=21, n=14, b=8)
  feat, cot, text, ids, qf, qc, qt, exclude = case
  base = kp.build_pool(feat, cot, text, ids)
  # Ties across shards: rows 1, 6 and 12 (shards 0, 1, 3) hold the same map.
  tie_feat = feat.copy()
  tie_feat[6] = 2 * feat[1]
  tie_feat[12] = feat[1]
  tie_queries = np.stack([feat[1], np.zeros_like(feat[1])] * 4)
  tie_case = (tie_feat, cot, text, ids, tie_queries, qc, qt, exclude)

  for axis_type in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((DEVICES,), ('data',), axis_types=(axis_type,))
    pool = kp.shard_pool(base, mesh)
    assert pool.size == 16 and pool.key.sharding.spec == P('data'), pool.key.sharding
    batch_sharded = NamedSharding(mesh, P('data'))

    # Modes differ only in the table scored; the Auto mesh runs the two that differ in plan.
    modes = single.RETRIEVING_MODES if axis_type == AxisType.Explicit else ('image',
                                                                             'image+cot')
    for mode in modes:
      for excl in (None, exclude):
        want = kp.retrieve(base, qf, qc, qt, mode=mode, k_coarse=9, k=4, exclude=excl)
        single.assert_matches_reference(want, case, mode=mode, k_coarse=9, k=4, exclude=excl)
        forced = kp.retrieve_sharded(pool, qf, qc, qt, mesh=mesh, mode=mode, k_coarse=9,
                                     k=4, exclude=excl)
        automatic = kp.retrieve(pool, qf, qc, qt, mode=mode, k_coarse=9, k=4, exclude=excl)
        for out in (forced, automatic):
          same_retrieved(out, want)
          checks += 1
      # CoT/text cosines around the pool's mean: the mean of all real rows, padding aside.
      want = kp.retrieve(base, qf, qc, qt, mode=mode, k_coarse=9, k=4, exclude=exclude,
                         centre=True)
      single.assert_matches_reference(want, case, mode=mode, k_coarse=9, k=4,
                                      exclude=exclude, centre=True, score_atol=1e-5)
      for out in (kp.retrieve_sharded(pool, qf, qc, qt, mesh=mesh, mode=mode, k_coarse=9,
                                      k=4, exclude=exclude, centre=True),
                  kp.retrieve(pool, qf, qc, qt, mode=mode, k_coarse=9, k=4, exclude=exclude,
                              centre=True)):
        same_retrieved(out, want)
        checks += 1
      if mode != 'image+cot':
        continue
      # Queries arriving batch-sharded, as in a data-parallel step.
      spread = [jax.device_put(x, batch_sharded) for x in (qf, qc, qt, exclude)]
      same_retrieved(kp.retrieve(pool, *spread[:3], mode=mode, k_coarse=9, k=4,
                                 exclude=spread[3]),
                     kp.retrieve(base, qf, qc, qt, mode=mode, k_coarse=9, k=4, exclude=exclude))
      checks += 1
      # K = 50 > N: clipped to the 16 rows, padding included, and still exact.
      out = kp.retrieve_sharded(pool, qf, qc, mesh=mesh, mode=mode, k_coarse=50, k=5,
                                exclude=exclude)
      same_retrieved(out, kp.retrieve(base, qf, qc, mode=mode, k_coarse=50, k=5,
                                      exclude=exclude))
      assert (np.asarray(out.ids) >= 0).all()
      checks += 1

    # Ties and zero-norm queries resolve to the lowest row across shards too.
    tie_base = kp.build_pool(tie_feat, cot, text, ids)
    tie_pool = kp.shard_pool(tie_base, mesh)
    for excl in (None, exclude):
      want = kp.retrieve(tie_base, tie_queries, mode='image', k=4, exclude=excl)
      single.assert_matches_reference(want, tie_case, mode='image', k_coarse=9, k=4,
                                      exclude=excl)
      same_retrieved(kp.retrieve_sharded(tie_pool, tie_queries, mesh=mesh, mode='image', k=4,
                                         exclude=excl), want)
      checks += 1
    same(kp.retrieve(tie_base, tie_queries, mode='image', k=4).rows[:2],
         [[1, 6, 12, 0], [0, 1, 2, 3]])

    # bfloat16 keys.
    bf_base = kp.build_pool(feat, cot, text, ids, key_dtype=jnp.bfloat16)
    bf_pool = kp.shard_pool(bf_base, mesh)
    want = kp.retrieve(bf_base, qf, qc, mode='image+cot', k_coarse=9, k=4, exclude=exclude)
    single.assert_matches_reference(want, case, mode='image+cot', k_coarse=9, k=4,
                                    exclude=exclude, key_dtype=ml_dtypes.bfloat16)
    same_retrieved(kp.retrieve_sharded(bf_pool, qf, qc, mesh=mesh, mode='image+cot',
                                       k_coarse=9, k=4, exclude=exclude), want)
    checks += 1

    # vmap over query groups against the sharded pool.
    groups = [x.reshape((2, -1) + x.shape[1:]) for x in (qf, qc, exclude)]
    batched = jax.vmap(lambda a, b, c: kp.retrieve_sharded(
        pool, a, b, mesh=mesh, mode='image+cot', k_coarse=9, k=4, exclude=c))(*groups)
    for g in range(2):
      same_retrieved(jax.tree.map(lambda x: x[g], batched),
                     kp.retrieve(base, groups[0][g], groups[1][g], mode='image+cot',
                                 k_coarse=9, k=4, exclude=groups[2][g]))
      checks += 1

    # A train-step-shaped jit: retrieve, find the batch's rows, Eq. 5 update, refresh.
    @jax.jit
    def step(pool, qf, qc, batch_ids):
      out = kp.retrieve(pool, qf, qc, mode='image+cot', k_coarse=9, k=4, exclude=batch_ids)
      rows = kp.pool_rows(pool, batch_ids)
      return out, rows, kp.ema_update(pool, rows, qf, 0.9), kp.refresh_rows(pool, rows, qf,
                                                                             0.9)

    for args in ((qf, qc, exclude),
                 tuple(jax.device_put(x, batch_sharded) for x in (qf, qc, exclude))):
      out, rows, updated, refreshed = step(pool, *args)
      want_out, want_rows, want_updated, want_refreshed = step(base, qf, qc, exclude)
      same_retrieved(out, want_out)
      same(rows, want_rows)
      same(rows, [0, 1, 2, 3, -1, -1, -1, -1])
      for got, want in ((updated, want_updated), (refreshed, want_refreshed)):
        assert got.feat.sharding.spec[0] == 'data', got.feat.sharding
        for name in ('feat', 'key'):
          # Row writes are exact; the blend may differ by an ulp with the fused layout.
          np.testing.assert_allclose(np.asarray(getattr(got, name))[:14],
                                     np.asarray(getattr(want, name)), rtol=1e-6, atol=1e-7)
          same(np.asarray(getattr(got, name))[4:14], np.asarray(getattr(base, name))[4:14])
          same(np.asarray(getattr(got, name))[14:], 0)
        same(got.ids, pool.ids)
        checks += 1

  print(f'{checks} sharded checks passed on {jax.device_count()} devices')


if __name__ == '__main__':
  _worker()
