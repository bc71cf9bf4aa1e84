"""ConvNeXt image encoder with torchvision `convnext_tiny` semantics (docs/design.md section 2).

NHWC throughout: the channels `LayerNorm2d` of torchvision is a plain `nnx.LayerNorm` over
the last axis here. Attribute names are relied on by `cers_jax.convert.convnext`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cers_jax.models.layers import DepthwiseConv, DropPath, gelu_exact, trunc_normal
from cers_jax.models import stack

_LN_EPS = 1e-6


def _layer_norm(dim: int, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance, as torch computes it; the one-pass E[x^2]-E[x]^2 loses digits on
  # activations with a large mean.
  return nnx.LayerNorm(dim, epsilon=_LN_EPS, use_fast_variance=False, dtype=dtype,
                       rngs=rngs)


class ConvNeXtBlock(nnx.Module):
  """dw7x7 -> LN -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> x layer_scale -> DropPath -> +x."""

  def __init__(self, dim: int, *, drop_path: float, layer_scale_init: float,
               dtype: Any = None, rngs: nnx.Rngs):
    init = trunc_normal(0.02)
    self.dwconv = DepthwiseConv(dim, (7, 7), padding=((3, 3), (3, 3)), kernel_init=init,
                                dtype=dtype, rngs=rngs)
    self.norm = _layer_norm(dim, dtype, rngs)
    self.pwconv1 = nnx.Linear(dim, 4 * dim, kernel_init=init, dtype=dtype, rngs=rngs)
    self.pwconv2 = nnx.Linear(4 * dim, dim, kernel_init=init, dtype=dtype, rngs=rngs)
    self.layer_scale = nnx.Param(jnp.full((dim,), layer_scale_init, jnp.float32))
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array, drop_rate: jax.Array | None = None) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, C); `drop_rate` overrides the block's stochastic depth."""
    y = self.dwconv(x)
    y = self.norm(y)
    y = self.pwconv2(gelu_exact(self.pwconv1(y)))
    y = y * self.layer_scale[...].astype(y.dtype)
    return x + self.drop_path(y, drop_rate)


class ConvNeXt(nnx.Module):
  """ConvNeXt feature extractor returning the four stage outputs (strides 4, 8, 16, 32)."""

  def __init__(self, *, depths: Sequence[int] = (3, 3, 9, 3),
               dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.1,
               layer_scale_init: float = 1e-6, in_channels: int = 3, dtype: Any = None,
               scan_blocks: bool = False, rngs: nnx.Rngs):
    """Block i of n gets stochastic depth `drop_path_rate * i / (n - 1)`, as in torchvision.

    `scan_blocks` runs each stage's blocks as one lax.scan (`cers_jax.models.stack`): the
    same outputs and parameters, one HLO body per stage instead of one per block.
    """
    if len(depths) != 4 or len(dims) != 4:
      raise ValueError(f'ConvNeXt needs 4 stages, got depths={depths}, dims={dims}.')
    init = trunc_normal(0.02)
    self.stem_conv = nnx.Conv(in_channels, dims[0], (4, 4), strides=(4, 4), padding='VALID',
                              kernel_init=init, dtype=dtype, rngs=rngs)
    self.stem_norm = _layer_norm(dims[0], dtype, rngs)
    self.downsample_norms = nnx.List(
        [_layer_norm(dims[i], dtype, rngs) for i in range(3)])
    self.downsample_convs = nnx.List([
        nnx.Conv(dims[i], dims[i + 1], (2, 2), strides=(2, 2), padding='VALID',
                 kernel_init=init, dtype=dtype, rngs=rngs) for i in range(3)])
    total = sum(depths)
    denominator = max(total - 1, 1)
    stages = []
    block_id = 0
    for dim, depth in zip(dims, depths):
      blocks = []
      for _ in range(depth):
        blocks.append(ConvNeXtBlock(
            dim, drop_path=drop_path_rate * block_id / denominator,
            layer_scale_init=layer_scale_init, dtype=dtype, rngs=rngs))
        block_id += 1
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.scan_blocks = scan_blocks

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(B, H, W, C) -> (f1, f2, f3, f4): (B, H/4, W/4, dims[0]) ... (B, H/32, W/32, dims[3])."""
    x = self.stem_norm(self.stem_conv(x))
    features = []
    for i, stage in enumerate(self.stages):
      if i > 0:
        x = self.downsample_convs[i - 1](self.downsample_norms[i - 1](x))
      x = self._run_stage(stage, x)
      features.append(x)
    return tuple(features)

  def _run_stage(self, stage: Sequence[ConvNeXtBlock], x: jax.Array) -> jax.Array:
    if not self.scan_blocks:
      for block in stage:
        x = block(x)
      return x
    for group in _scan_groups(stage):
      x = group[0](x) if len(group) == 1 else _scan_group(group, x)
    return x


# Static drop rate of the views scanned blocks share; the body gets each block's own rate.
_SHARED_RATE = 0.5


def _shared_rate_view(block: ConvNeXtBlock) -> ConvNeXtBlock:
  return nnx.view(block, only=DropPath, rate=_SHARED_RATE)


def _scan_groups(stage: Sequence[ConvNeXtBlock]) -> list[list[ConvNeXtBlock]]:
  """Runs of consecutive blocks that can share one scan body.

  Blocks differ in their static stochastic-depth rate (torchvision's linear schedule),
  which the scan carries as data instead, so blocks are compared with that rate set alike.
  What still differs falls back to a plain call: a rate-0 block builds its DropPath without
  an RNG stream (only the network's first block when drop_path_rate > 0).
  """
  groups, signature = [], None
  for block in stage:
    current = nnx.graphdef(_shared_rate_view(block))
    if groups and current == signature:
      groups[-1].append(block)
    else:
      groups.append([block])
      signature = current
  return groups


def _scan_group(group: Sequence[ConvNeXtBlock], x: jax.Array) -> jax.Array:
  rates = [block.drop_path.rate for block in group]
  if all(rate == rates[0] for rate in rates):
    return stack.scan_blocks(group, x, lambda block, carry, _: block(carry))
  return stack.scan_blocks(group, x, lambda block, carry, rate: block(carry, rate),
                           xs=jnp.asarray(rates, jnp.float32),
                           graphdef=nnx.graphdef(_shared_rate_view(group[0])))
