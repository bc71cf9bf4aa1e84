"""Data parallelism over a one-axis device mesh ('data').

Batches are split along their first axis over the mesh; parameters, optimizer state and
embedding tables are replicated; the knowledge pool is replicated or, with
`config.pool.shard_rows`, split by rows. Nothing in the steps changes: jit propagates the
shardings, a mean over the batch axis (BatchNorm statistics, losses) is a mean over the
global batch, and XLA inserts the gradient all-reduce.

Multi-host: call `jax.distributed.initialize()` at the top of run.py's main (or set the
usual JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables and let it
auto-detect) on every host; `shard_batch` assembles the global batch from each process's
local slice with `jax.make_array_from_process_local_data`, and each process feeds its own
rows (see `process_rows`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = 'data'


def make_mesh(num_devices: int = -1) -> Mesh:
  """A ('data',) mesh over the first `num_devices` devices (-1: all of them)."""
  devices = jax.devices()
  if num_devices > 0:
    if num_devices > len(devices):
      raise ValueError(f'--config.mesh.data_parallel={num_devices} but only '
                       f'{len(devices)} devices are visible.')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA,))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'train.batch_size') -> None:
  n = mesh.shape[DATA]
  if batch_size % n:
    raise ValueError(f'--config.{name}={batch_size} is not divisible by the {n} devices of '
                     'the data mesh: choose a multiple, or set --config.mesh.data_parallel.')


def process_rows(rows: np.ndarray) -> np.ndarray:
  """The slice of `rows` this process feeds (all of them on a single host)."""
  return rows[jax.process_index()::jax.process_count()]


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Places a host batch (this process's slice) on the mesh, split along axis 0."""
  sharding = NamedSharding(mesh, P(DATA))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def place_state(state, mesh: Mesh, *, shard_pool_rows: bool = False):
  """Replicates the TrainState; optionally splits the pool's rows over the mesh."""
  state = replicate(state, mesh)
  if shard_pool_rows:
    rows = mesh.shape[DATA]
    if state.pool.ids.shape[0] % rows:
      raise ValueError(
          f'pool.shard_rows needs the number of labeled images ({state.pool.ids.shape[0]}) '
          f'to be divisible by the {rows} devices; turn it off for this split.')
    state = state.replace(pool=jax.device_put(state.pool, NamedSharding(mesh, P(DATA))))
  return state
