"""Data parallelism over a one-axis device mesh ('data').

Batches are split along their first axis over the mesh; parameters, optimizer state and
embedding tables are replicated; the knowledge pool is replicated or, with
`config.pool.shard_rows`, split by rows. Nothing in the steps changes: jit propagates the
shardings, a mean over the batch axis (BatchNorm statistics, losses) is a mean over the
global batch, and XLA inserts the gradient all-reduce.

Multi-host (`python run.py --distributed`, which calls `jax.distributed.initialize()`):
the mesh spans every process's devices. Training batches are per process: each process
draws its own rows (`process_rows`) and `shard_batch` assembles the global batch from the
local slices. Evaluation, pool building and prediction walk batches that every process
holds whole: `global_batch` places each process's block of them and `to_host` gathers the
outputs back, whole, on every process. Files are written by the main process only
(`is_main_process`), after the others wait at a barrier (`sync`) where they read them.
"""

from __future__ import annotations

import json
from typing import Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cers_jax.errors import ConfigError

DATA = 'data'


def make_mesh(num_devices: int = -1) -> Mesh:
  """A ('data',) mesh over the first `num_devices` devices (-1: all of them)."""
  devices = jax.devices()
  if jax.process_count() > 1 and num_devices not in (-1, len(devices)):
    raise ValueError(f'--config.mesh.data_parallel={num_devices}: a multi-host run uses '
                     f'every device of every process ({len(devices)}); leave it at -1.')
  if num_devices > 0:
    if num_devices > len(devices):
      raise ValueError(f'--config.mesh.data_parallel={num_devices} but only '
                       f'{len(devices)} devices are visible.')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA,))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'train.batch_size') -> None:
  n = mesh.shape[DATA]
  if batch_size % n:
    raise ConfigError(f'--config.{name}={batch_size} is not divisible by the {n} devices of '
                     'the data mesh: choose a multiple, or set --config.mesh.data_parallel.')


def process_rows(rows: np.ndarray) -> np.ndarray:
  """The slice of `rows` this process feeds (all of them on a single host)."""
  return rows[jax.process_index()::jax.process_count()]


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Places a host batch (this process's slice) on the mesh, split along axis 0."""
  sharding = NamedSharding(mesh, P(DATA))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """Places a batch that every process holds whole (eval, pool build, prediction).

  Each process contributes its contiguous block of rows, so the global array is the batch
  itself, in order; on one host this is `shard_batch`.
  """
  count = jax.process_count()
  if count == 1:
    return shard_batch(batch, mesh)
  size = len(next(iter(batch.values())))
  if size % count:
    raise ValueError(f'A batch of {size} rows cannot be split over {count} processes: make '
                     '--config.train.eval_batch_size a multiple of the number of devices.')
  block = slice(jax.process_index() * size // count, (jax.process_index() + 1) * size // count)
  return shard_batch({k: np.asarray(v)[block] for k, v in batch.items()}, mesh)


def to_host(tree):
  """Step outputs as numpy arrays, whole on every process (gathered across hosts)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def host_step(step, state, batch: dict, mesh: Mesh):
  """`step(state, batch)` on the mesh for a batch every process holds whole, its outputs
  as host numpy (every row, padding included)."""
  return to_host(step(state, global_batch(batch, mesh)))


def host_outputs(step, state, batches: Iterable[dict], mesh: Mesh):
  """The eval-batch loop: yields (batch, outputs) of every batch as host numpy, both cut to
  the batch's real rows (`batch['valid']`, False on padding).

  Evaluation, the retrieval report, the pool build and prediction all run their batches
  through this one loop; `step` is any jitted `(state, batch) -> pytree of (B, ...)`.
  """
  for batch in batches:
    valid = np.asarray(batch['valid'], bool)
    out = host_step(step, state, batch, mesh)
    yield ({k: np.asarray(v)[valid] for k, v in batch.items()},
           jax.tree.map(lambda leaf: leaf[valid], out))


def is_main_process() -> bool:
  """Whether this process writes the run's files (process 0; always true on one host)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes (nothing on one host)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather_json(value) -> list:
  """[value of process 0, value of process 1, ...] for a JSON-serialisable value."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int64(len(data)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:size])) for row, size in zip(rows, sizes)]


def _put_leaf(x, sharding: NamedSharding):
  """One host value (the same on every process) as a global array with `sharding`."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)  # Already global: a reshard.
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _put_leaf(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  # Each process fills its own devices' shards from its copy: no cross-host transfer and
  # no equality check (which would gather every array, pool included, over the network).
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _put(tree, sharding: NamedSharding):
  return jax.tree.map(lambda x: _put_leaf(x, sharding), tree)


def replicate(tree, mesh: Mesh):
  """Host values, identical on every process, replicated over the mesh."""
  return _put(tree, NamedSharding(mesh, P()))


def place_pool(pool, mesh: Mesh, *, shard_rows: bool = False):
  """Replicates the knowledge pool, or splits its rows over the mesh."""
  if not shard_rows:
    return replicate(pool, mesh)
  rows = mesh.shape[DATA]
  if pool.ids.shape[0] % rows:
    raise ValueError(
        f'pool.shard_rows needs the number of labeled images ({pool.ids.shape[0]}) '
        f'to be divisible by the {rows} devices; turn it off for this split.')
  return _put(pool, NamedSharding(mesh, P(DATA)))


def place_state(state, mesh: Mesh, *, shard_pool_rows: bool = False):
  """Replicates the TrainState; the pool as `place_pool` places it (each array once)."""
  placed = replicate(state.replace(pool=None), mesh)
  return placed.replace(pool=place_pool(state.pool, mesh, shard_rows=shard_pool_rows))


def pad_rows(array: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to `size` by repeating the last row: every call of a step sees one shape."""
  missing = size - len(array)
  return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)]) if missing else array
