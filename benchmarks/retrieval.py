"""Latency of coarse-to-fine retrieval: ours (one jitted program) vs the authors' method.

docs/design.md sections 5 and 12. Ours: `cers_jax.retrieval.pool.retrieve` in mode 'image+cot'
(cosine top-K over the flattened f4 maps, CoT re-rank to k, gather of the k maps), jitted,
the pool resident on the default device. Theirs: FAISS `IndexFlatL2` over the unit-norm
rows searched with the raw queries for the K candidates, then a Python loop that re-ranks
each query's candidates by CoT cosine with numpy and gathers the k rows (faiss-cpu, the
`bench` extra). Both run on the same machine in the same process, on the same data; the
`agree` column counts queries whose k rows are identical in both.

  python benchmarks/retrieval.py                      # N = 1k, 4k, 16k; float32 + bfloat16
  python benchmarks/retrieval.py --n=1000,100000 --dtype=bfloat16 --repeats=50

Pool sizes that would not fit in the available host memory are skipped with a note. FAISS
has no bfloat16 flat index, so the authors' time is always float32; the ratio in a
bfloat16 row compares our bfloat16 keys with their float32 search.
"""

import argparse
import gc
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cers_jax.retrieval import pool as kp
from cers_jax.retrieval import search

import _results  # benchmarks/_results.py, beside this script.

try:
  import faiss
except ImportError:
  faiss = None


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n', default='1000,4000,16000',
                      help='comma-separated pool sizes N (labeled images in the pool)')
  parser.add_argument('--dtype', default='float32,bfloat16',
                      help="comma-separated key dtypes for ours: 'float32', 'bfloat16'")
  parser.add_argument('--repeats', type=int, default=20,
                      help='timed calls per cell (fewer when a cell passes --budget-s)')
  parser.add_argument('--budget-s', type=float, default=4.0,
                      help='stop repeating a cell after this many seconds (at least 3 calls)')
  parser.add_argument('--batch', type=int, default=16, help='queries B')
  parser.add_argument('--map', default='7,7,768', help='f4 map shape h,w,C (D = h*w*C)')
  parser.add_argument('--cot-dim', type=int, default=512, help='CoT embedding width E')
  parser.add_argument('--k-coarse', type=int, default=50, help='K coarse candidates')
  parser.add_argument('--k', type=int, default=5, help='k reference cases')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default='', help='write every row here as soon as it is '
                      'measured (valid JSON after each row)')
  return parser.parse_args()


def available_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux); a large number elsewhere."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 1 << 50


def device_bytes() -> int:
  """Memory of the default device where the backend reports it (GPU/TPU); else unlimited."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('bytes_limit', 1 << 50)


def time_ms(fn, repeats: int, budget_s: float) -> float:
  """Median wall time of fn() in ms after one warm-up call."""
  fn()
  times = []
  start = time.perf_counter()
  while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def theirs_fn(index, pool_rows: np.ndarray, pool_cot: np.ndarray, query: np.ndarray,
              query_cot: np.ndarray, k_coarse: int, k: int):
  """The authors' retrieval: FAISS L2 coarse search, then a per-query numpy re-rank."""

  def run():
    _, cand = index.search(query, k_coarse)
    rows, maps = [], []
    for b in range(query.shape[0]):
      q = query_cot[b] / max(np.linalg.norm(query_cot[b]), 1e-8)
      sims = pool_cot[cand[b]] @ q
      best = cand[b][np.argsort(-sims, kind='stable')[:k]]
      rows.append(best)
      maps.append(pool_rows[best])
    return np.stack(rows), np.stack(maps)

  return run


def main() -> None:
  args = parse_args()
  sizes = [int(x) for x in args.n.split(',')]
  dtypes = [x.strip() for x in args.dtype.split(',')]
  for name in dtypes:
    if name not in ('float32', 'bfloat16'):
      raise SystemExit(f"--dtype: {name!r} is not 'float32' or 'bfloat16'")
  shape = tuple(int(x) for x in args.map.split(','))
  d = int(np.prod(shape))
  b = args.batch
  results = _results.JsonResults(args.json, dict(
      benchmark='retrieval', batch=b, map=list(shape), cot_dim=args.cot_dim,
      k_coarse=args.k_coarse, k=args.k, mode='image+cot', platform=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
      host=platform.processor() or platform.machine(),
      faiss=faiss.__version__ if faiss else None))
  print(f'# retrieval latency: B={b}, D={d} ({"x".join(map(str, shape))}), '
        f'E={args.cot_dim}, K={args.k_coarse}, k={args.k}, mode image+cot')
  print(f'# device: {jax.devices()[0].device_kind} ({jax.default_backend()}), host '
        f'{platform.processor() or platform.machine()}, jax {jax.__version__}, '
        f'faiss {faiss.__version__ if faiss else "MISSING"}')
  if faiss is None:
    print('# faiss is not installed: timing ours only. For the comparison: '
          'pip install faiss-cpu  (or pip install -e .[bench])')
  print()
  print('| N | key dtype | ours (ms) | authors: FAISS + numpy (ms) | speed-up | agree |')
  print('|---:|:---|---:|---:|---:|:---:|')

  # Random data is drawn on the device: drawing a 100k-row pool (15 GB) with numpy on the
  # host takes tens of seconds, more than the timings themselves.
  keys = jax.random.split(jax.random.key(args.seed), 2 + 2 * len(sizes))
  query_dev = jax.random.normal(keys[0], (b,) + shape, jnp.float32)
  query_cot_dev = jax.random.normal(keys[1], (b, args.cot_dim), jnp.float32)
  query, query_cot = np.asarray(query_dev), np.asarray(query_cot_dev)

  for i, n in enumerate(sizes):
    pool_bytes = n * d * 4
    host_need = (1 << 30) + (2 * pool_bytes if faiss is not None else 0)
    device_need, device_has = 2 * pool_bytes, device_bytes()  # feat + key
    if jax.default_backend() == 'cpu':
      host_need, device_need = host_need + device_need, 0
    if host_need > available_bytes() or device_need > device_has:
      print(f'| {n} | – | skipped: needs ~{host_need / 2**30:.0f} GiB of host and '
            f'~{device_need / 2**30:.0f} GiB of device memory; '
            f'{available_bytes() / 2**30:.0f} and {device_has / 2**30:.0f} GiB available '
            '| | | |')
      results.add(dict(n=n, skipped=True, host_need_gib=host_need / 2**30,
                       device_need_gib=device_need / 2**30))
      continue
    pool = kp.build_pool(jax.random.normal(keys[2 + 2 * i], (n,) + shape, jnp.float32),
                         jax.random.normal(keys[3 + 2 * i], (n, args.cot_dim), jnp.float32),
                         None, jnp.arange(n))
    jax.block_until_ready(pool)
    theirs_ms, their_rows = None, None
    if faiss is not None:
      pool_rows = np.asarray(pool.key)  # their pool: unit-norm rows, also what they fuse
      index = faiss.IndexFlatL2(d)
      index.add(pool_rows)
      run = theirs_fn(index, pool_rows, np.asarray(pool.cot), query.reshape(b, d), query_cot,
                      args.k_coarse, args.k)
      their_rows = run()[0]
      theirs_ms = time_ms(run, args.repeats, args.budget_s)
      del index, pool_rows, run
      gc.collect()
    for name in dtypes:
      if name == 'bfloat16':
        pool = pool.replace(key=pool.key.astype(jnp.bfloat16))
        jax.block_until_ready(pool)

      def ours(pool=pool):
        return jax.block_until_ready(search.retrieve(pool, query_dev, query_cot_dev,
                                                 mode='image+cot', k_coarse=args.k_coarse,
                                                 k=args.k))

      our_rows = np.asarray(ours().rows)
      ours_ms = time_ms(ours, args.repeats, args.budget_s)
      agree = None
      if theirs_ms is None:
        print(f'| {n} | {name} | {ours_ms:.2f} | faiss missing | – | – |', flush=True)
      else:
        agree = int((our_rows == their_rows).all(axis=1).sum())
        print(f'| {n} | {name} | {ours_ms:.2f} | {theirs_ms:.2f} | '
              f'{theirs_ms / ours_ms:.1f}x | {agree}/{b} |', flush=True)
      results.add(dict(n=n, key_dtype=name, ours_ms=ours_ms, authors_ms=theirs_ms,
                       agree=agree, queries=b))
    del pool
    gc.collect()
  results.finish()


if __name__ == '__main__':
  main()
