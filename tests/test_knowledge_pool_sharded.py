"""A row-sharded knowledge pool on 4 host devices, placed as training places it.

`sharding.place_pool(..., shard_rows=True)` splits the pool's rows over the data mesh and
XLA partitions retrieval and the row updates. XLA_FLAGS must be set before jax starts, so
the test re-runs this file as a subprocess with 4 forced host devices; `_worker` compares
every sharded result with the one-device result and tests/test_knowledge_pool.py's numpy
reference.
"""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
DEVICES = 4


@pytest.mark.slow
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
  import ml_dtypes
  import numpy as np

  from cers_jax import sharding
  from cers_jax.retrieval import pool as kp
  from cers_jax.retrieval import search
  import test_knowledge_pool as single

  assert jax.device_count() == DEVICES, jax.devices()
  mesh = sharding.make_mesh()
  checks = 0

  def same(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def same_retrieved(out, want):
    for name in ('rows', 'ids', 'feat'):
      same(getattr(out, name), getattr(want, name))
    # The same cosines, reduced in shard-sized pieces: equal up to float32 rounding.
    np.testing.assert_allclose(np.asarray(out.scores), np.asarray(want.scores), rtol=1e-6,
                               atol=1e-7)

  case = single.random_case(seed=21, n=16, b=8)
  feat, cot, text, ids, qf, qc, qt, exclude = case
  base = kp.build_pool(feat, cot, text, ids)
  pool = sharding.place_pool(base, mesh, shard_rows=True)
  assert pool.key.sharding.spec[0] == sharding.DATA, pool.key.sharding
  spread = [sharding.shard_batch(dict(x=x), mesh)['x'] for x in (qf, qc, qt, exclude)]

  for mode in single.RETRIEVING_MODES:
    for excl, centre in ((None, False), (exclude, False), (exclude, True)):
      want = search.retrieve(base, qf, qc, qt, mode=mode, k_coarse=9, k=4, exclude=excl,
                             centre=centre)
      single.assert_matches_reference(want, case, mode=mode, k_coarse=9, k=4, exclude=excl,
                                      centre=centre, score_atol=1e-5 if centre else 1e-6)
      same_retrieved(search.retrieve(pool, qf, qc, qt, mode=mode, k_coarse=9, k=4,
                                     exclude=excl, centre=centre), want)
      checks += 1
    # Queries arriving batch-sharded, as in a data-parallel step.
    same_retrieved(search.retrieve(pool, *spread[:3], mode=mode, k_coarse=9, k=4,
                                   exclude=spread[3]),
                   search.retrieve(base, qf, qc, qt, mode=mode, k_coarse=9, k=4,
                                   exclude=exclude))
    checks += 1

  # Ties across shards (rows 1, 6 and 12 hold the same direction) and a zero query resolve
  # to the lowest rows, as on one device.
  tie_feat = feat.copy()
  tie_feat[6], tie_feat[12] = 2 * feat[1], feat[1]
  tie_queries = np.stack([feat[1], np.zeros_like(feat[1])] * 4)
  tie_pool = sharding.place_pool(kp.build_pool(tie_feat, cot, text, ids), mesh,
                                 shard_rows=True)
  same(search.retrieve(tie_pool, tie_queries, mode='image', k=4).rows[:2],
       [[1, 6, 12, 0], [0, 1, 2, 3]])
  checks += 1

  # bfloat16 keys.
  bf_base = kp.build_pool(feat, cot, text, ids, key_dtype=jnp.bfloat16)
  want = search.retrieve(bf_base, qf, qc, mode='image+cot', k_coarse=9, k=4, exclude=exclude)
  single.assert_matches_reference(want, case, mode='image+cot', k_coarse=9, k=4,
                                  exclude=exclude, key_dtype=ml_dtypes.bfloat16)
  same_retrieved(search.retrieve(sharding.place_pool(bf_base, mesh, shard_rows=True), qf, qc,
                                 mode='image+cot', k_coarse=9, k=4, exclude=exclude), want)
  checks += 1

  # A train-step-shaped jit: retrieve, find the batch's rows, Eq. 5 update, refresh.
  @jax.jit
  def step(pool, qf, qc, batch_ids):
    out = search.retrieve(pool, qf, qc, mode='image+cot', k_coarse=9, k=4, exclude=batch_ids)
    rows = kp.pool_rows(pool, batch_ids)
    return out, rows, kp.ema_update(pool, rows, qf, 0.9), kp.refresh_rows(pool, rows, qf, 0.9)

  want_out, want_rows, want_updated, want_refreshed = step(base, qf, qc, exclude)
  same(want_rows, [0, 1, 2, 3, -1, -1, -1, -1])
  out, rows, updated, refreshed = step(pool, spread[0], spread[1], spread[3])
  same_retrieved(out, want_out)
  same(rows, want_rows)
  for got, want in ((updated, want_updated), (refreshed, want_refreshed)):
    assert got.feat.sharding.spec[0] == sharding.DATA, got.feat.sharding
    for name in ('feat', 'key'):
      # Row writes are exact; the blend may differ by an ulp with the fused layout.
      np.testing.assert_allclose(np.asarray(getattr(got, name)),
                                 np.asarray(getattr(want, name)), rtol=1e-6, atol=1e-7)
      same(np.asarray(getattr(got, name))[4:], np.asarray(getattr(base, name))[4:])
    checks += 1

  # Rows that do not split over the devices are refused with the config field to change.
  try:
    sharding.place_pool(kp.build_pool(feat[:14], cot[:14], text[:14], ids[:14]), mesh,
                        shard_rows=True)
  except ValueError as error:
    assert 'pool.shard_rows' in str(error), error
    checks += 1

  print(f'{checks} sharded checks passed on {jax.device_count()} devices')


if __name__ == '__main__':
  _worker()
