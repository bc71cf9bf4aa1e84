"""Compile time of the full-size encoders, unrolled vs scanned (config model.scan_blocks).

  JAX_ENABLE_COMPILATION_CACHE=false python benchmarks/compile_time.py float32,bfloat16

One program per row: ConvNeXt-T + the report-text BERT-base, training mode, forward and
backward (`jax.jit(jax.grad(...))`, lower + compile) at batch 2, 224x224, 64 tokens.
Prints a markdown table of wall and process CPU seconds; nothing is run or allocated.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from cers_jax.models.bert import BertEncoder
from cers_jax.models.cers import compute_dtype
from cers_jax.models.convnext import ConvNeXt
from configs import base


def _compile_seconds(scan: bool, dtype: str) -> tuple[float, float]:
  cfg = base.get_config().model
  dt = compute_dtype(dtype)
  model = nnx.eval_shape(lambda: nnx.List([
      ConvNeXt(scan_blocks=scan, dtype=dt, rngs=nnx.Rngs(0)),
      BertEncoder.from_config(cfg.text, dtype=dt, scan_blocks=scan, rngs=nnx.Rngs(0))]))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, image, ids, mask):
    encoder, text = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(encoder, dropout=jax.random.key(0))
    nnx.reseed(text, dropout=jax.random.key(1))
    total = sum(jnp.sum(f.astype(jnp.float32)) for f in encoder(image))
    return total + jnp.sum(text(ids, mask).astype(jnp.float32))

  args = (params, rest, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32),
          jax.ShapeDtypeStruct((2, 64), jnp.int32), jax.ShapeDtypeStruct((2, 64), jnp.int32))
  wall, cpu = time.perf_counter(), time.process_time()
  jax.jit(jax.grad(loss)).lower(*args).compile()
  return time.perf_counter() - wall, time.process_time() - cpu


def main():
  dtypes = sys.argv[1].split(',') if len(sys.argv) > 1 else ['float32', 'bfloat16']
  print('| compute dtype | scan_blocks | compile wall (s) | compile CPU (s) |')
  print('|---|---|---:|---:|')
  for dtype in dtypes:
    for scan in (False, True):
      wall, cpu = _compile_seconds(scan, dtype)
      print(f'| {dtype} | {scan} | {wall:.1f} | {cpu:.1f} |', flush=True)


if __name__ == '__main__':
  main()
