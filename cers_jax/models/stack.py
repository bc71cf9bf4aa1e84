"""Running a stack of identical blocks as one `jax.lax.scan` (config `model.scan_blocks`).

An unrolled Python loop puts every block into the HLO: ConvNeXt-T's 18 blocks and
BERT-base's 12 layers, forward and backward, in every train-step program. A scan holds one
body per stack (2.4x less HLO), but XLA:CPU was measured to compile it no faster, at times
slower (benchmarks/README.md, "Compile time"), so the switch is off by default. The parameter tree stays as it is (`encoder/stages/<s>/<b>/...`,
`text_encoder/layers/<i>/...`: converters, checkpoints and golden fixtures rely on it); the
blocks' states are stacked at call time, which XLA turns into copies, and gradients flow
back through the stacking to each block's own parameters.

RNG streams: every block owns forked streams (nnx.Dropout, MultiHeadAttention and DropPath
fork them), and `nnx.reseed` gives each stream its own key, so the scanned body draws from
block i's key and count exactly as the loop does: the dropout masks are the same as the
unrolled loop's, and the advanced counts are written back to each block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


# What a block's call may write: its RNG streams, and anything else but parameters.
_MUTABLE = (nnx.RngState, nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))


def _changed(before: list[Array], after: list[Array]) -> bool:
  # Leaves the call did not touch are the very objects merged in (checked while tracing).
  return any(a is not b for a, b in zip(before, after))


def scan_blocks(blocks: Sequence[nnx.Module], x: Array,
                call: Callable[[nnx.Module, Array, Any], Array], *, xs: Any = None,
                graphdef: Any = None) -> Array:
  """`call(block_n, ... call(block_1, x, xs[0]) ..., xs[n-1])` as one lax.scan.

  Args:
    blocks: modules whose states have one structure (same paths, shapes and dtypes).
    x: the carry, e.g. (B, H, W, C) features; every block must return its shape and dtype.
    call: applies one block to the carry and that block's slice of `xs`.
    xs: per-block data with a leading axis of len(blocks) (e.g. drop rates), or None.
    graphdef: the graph definition every block runs under; default: the blocks' own, which
      must then be identical (ValueError otherwise).

  RNG counts advanced inside the body are written back to `blocks`; nothing is written
  when the body consumes no randomness (eval mode), so a module closed over by a plain
  jax.jit is left untouched. Other state a block writes (BatchNorm statistics) is refused:
  the stacks scanned here hold none, and silently dropping it would be wrong.
  """
  graphdefs, states = zip(*(nnx.split(block) for block in blocks))
  if graphdef is None:
    if any(g != graphdefs[0] for g in graphdefs[1:]):
      raise ValueError('scan_blocks needs blocks with identical graph definitions (same '
                       'structure and static attributes); run them in a loop instead.')
    graphdef = graphdefs[0]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
  rng_changed = []  # Filled while tracing the body: whether it consumed any RNG stream.

  def body(carry, inputs):
    state, extra = inputs
    block = nnx.merge(graphdef, state)
    rngs_before, other_before = (jax.tree.leaves(nnx.state(block, f)) for f in _MUTABLE)
    carry = call(block, carry, extra)
    rngs, other = (nnx.state(block, f) for f in _MUTABLE)
    if _changed(other_before, jax.tree.leaves(other)):
      raise NotImplementedError('scan_blocks writes back RNG state only, but a block '
                                'changed other state (e.g. BatchNorm statistics).')
    rng_changed.append(_changed(rngs_before, jax.tree.leaves(rngs)))
    return carry, rngs

  x, rng_states = jax.lax.scan(body, x, (stacked, xs))
  if any(rng_changed):
    for i, block in enumerate(blocks):
      nnx.update(block, jax.tree.map(lambda leaf, i=i: leaf[i], rng_states))
  return x
