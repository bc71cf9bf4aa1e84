"""Small layers and initializers shared by the model files (docs/design.md sections 2 and 7).

What PyTorch has and Flax does not spell the same way: per-sample stochastic depth, exact
GELU, `F.interpolate(mode='bilinear')` with both `align_corners` conventions, and
xavier-uniform initializers whose fans match `torch.nn.init.xavier_uniform_`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class DropPath(nnx.Module):
  """Stochastic depth: drops a sample's whole residual branch with probability `rate`.

  torchvision `StochasticDepth(mode='row')`: one Bernoulli draw per sample, survivors scaled
  by 1 / (1 - rate). `nnx.view(model, deterministic=True)` makes it the identity. `rngs` is
  only needed when `rate > 0` and the layer is trained.
  """

  def __init__(self, rate: float, *, deterministic: bool = False,
               rng_collection: str = 'dropout', rngs: nnx.Rngs | None = None):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f'DropPath rate must be in [0, 1), got {rate}.')
    self.rate = float(rate)
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    if rngs is not None and self.rate > 0.0:
      self.rngs = rngs[rng_collection].fork()
    else:
      self.rngs = nnx.data(None)

  def __call__(self, x: jax.Array, rate: float | jax.Array | None = None) -> jax.Array:
    """`rate` replaces the layer's own when given; blocks run by `scan_blocks` pass theirs
    as a traced scalar, since a static rate per block would give each its own graphdef."""
    rate = self.rate if rate is None else rate
    if self.deterministic or (isinstance(rate, float) and rate == 0.0):
      return x
    if self.rngs is None:
      raise ValueError(
          'DropPath is in training mode with rate > 0 but was built without rngs: pass '
          'rngs=nnx.Rngs(dropout=...) or use nnx.view(model, deterministic=True).')
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.rngs(), keep, shape)
    # A traced float32 `keep` would promote bfloat16 activations; a Python float does not.
    keep = keep if isinstance(keep, float) else jnp.asarray(keep, x.dtype)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))

  def set_view(self, deterministic: bool | None = None, rate: float | None = None):
    """Used by `nnx.view`; deterministic=True makes the layer the identity. `rate` sets
    the static rate (ConvNeXt gives scanned blocks one, and their own rates as data)."""
    if deterministic is not None:
      self.deterministic = deterministic
    if rate is not None:
      self.rate = float(rate)


def gelu_exact(x: jax.Array) -> jax.Array:
  """The erf GELU of `torch.nn.GELU()` (not the tanh approximation jax uses by default)."""
  return jax.nn.gelu(x, approximate=False)


def _bilinear_source(in_size: int, out_size: int, scale: float,
                     align_corners: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Low index, high index and high weight per output pixel along one axis (torch rules)."""
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    ratio = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = dst * ratio
  else:
    # torch uses the given scale_factor (not in/out) for the coordinate map, and clamps
    # negative source coordinates to 0.
    src = np.maximum((dst + 0.5) / scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  return lo, hi, frac


def upsample_bilinear(x: jax.Array, scale: float = 2, *, align_corners: bool) -> jax.Array:
  """`F.interpolate(x, scale_factor=scale, mode='bilinear', align_corners=...)` for NHWC.

  Two static gathers and a linear blend per spatial axis reproduce torch's sampling grid
  exactly (jax.image.resize follows the align_corners=False rule only and antialiases on
  downscaling). The output is (B, floor(H * scale), floor(W * scale), C).
  """
  if x.ndim != 4:
    raise ValueError(f'upsample_bilinear expects NHWC (4 dims), got shape {x.shape}.')
  out = x
  for axis in (1, 2):
    in_size = x.shape[axis]
    out_size = int(math.floor(in_size * scale))
    lo, hi, frac = _bilinear_source(in_size, out_size, float(scale), align_corners)
    a = jnp.take(out, lo, axis=axis)
    b = jnp.take(out, hi, axis=axis)
    w = jnp.asarray(frac, dtype=x.dtype).reshape((-1,) + (1,) * (3 - axis))
    out = a + (b - a) * w
  return out


def xavier_uniform(fan_in_axes: Sequence[int] | int = -2,
                   fan_out_axes: Sequence[int] | int = -1) -> nnx.Initializer:
  """`torch.nn.init.xavier_uniform_` for a kernel in JAX layout.

  For an HWIO conv kernel or an (in, out) linear kernel the defaults already give torch's
  fans (jax multiplies both by the receptive field). For multi-head kernels name the axes,
  e.g. a query kernel (in, heads, head_dim) uses fan_in_axes=0, fan_out_axes=(1, 2).
  """
  return nnx.initializers.variance_scaling(
      1.0, 'fan_avg', 'uniform', in_axis=fan_in_axes, out_axis=fan_out_axes)


def xavier_uniform_fans(fan_in: int, fan_out: int) -> nnx.Initializer:
  """Uniform(-b, b), b = sqrt(6 / (fan_in + fan_out)), whatever the kernel shape.

  Needed where torch's fans do not follow from the JAX kernel: `nn.MultiheadAttention`
  initialises its packed in_proj_weight (3E, E) as one matrix, so each of the q/k/v kernels
  gets fan_in = E, fan_out = 3E.
  """
  bound = math.sqrt(6.0 / (fan_in + fan_out))

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def trunc_normal(std: float = 0.02) -> nnx.Initializer:
  """`torch.nn.init.trunc_normal_(std=std)` with its default absolute bounds [-2, 2].

  torch's bounds are absolute (+-100 std at std 0.02), so the draw is effectively an
  untruncated normal; jax's `truncated_normal` would cut at +-2 std and shrink the std by 12%.
  """
  return jax.nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


# How a depthwise convolution is computed (`config.model.depthwise`): 'conv' is XLA's
# grouped convolution (the default; cuDNN's depthwise kernels on a GPU), 'shift' the
# kernel's kh x kw shifted multiply-adds, which XLA fuses into one loop. XLA:CPU runs the
# grouped form as a generic convolution: one ConvNeXt-T 7x7 depthwise layer at batch 16,
# 24x24x96 took 65 ms forward and 231 ms with its gradients there, against 2 ms and 62 ms
# shifted; but a program with 'shift' compiles about 1.5-3x longer (benchmarks/README.md,
# "Depthwise convolutions on the CPU"), so it pays on long CPU runs, not on short ones.
DEPTHWISE = ('conv', 'shift')


def check_depthwise(name: str) -> str:
  """`name` if it is one of `DEPTHWISE`; else a ValueError naming the setting."""
  if name not in DEPTHWISE:
    raise ValueError(f'config.model.depthwise={name!r} is not one of {DEPTHWISE}.')
  return name


def depthwise_shift(x: jax.Array, kernel: jax.Array,
                    padding: Sequence[tuple[int, int]]) -> jax.Array:
  """A stride-1 depthwise convolution (cross-correlation, as `lax.conv`) as shifted
  multiply-adds: (B, H, W, C) with a (kh, kw, 1, C) kernel and ((top, bottom), (left,
  right)) zero padding -> (B, H', W', C). Sums in float32 whatever the compute dtype, as
  XLA's convolutions accumulate."""
  kh, kw = kernel.shape[:2]
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  rows = padded.shape[1] - kh + 1
  cols = padded.shape[2] - kw + 1
  weights = kernel[:, :, 0, :].astype(jnp.float32)
  total = None
  for i in range(kh):
    for j in range(kw):
      term = padded[:, i:i + rows, j:j + cols, :].astype(jnp.float32) * weights[i, j]
      total = term if total is None else total + term
  return total.astype(x.dtype)


class DepthwiseConv(nnx.Conv):
  """`nnx.Conv` with one filter per channel (`feature_group_count` = channels), stride 1:
  the same parameters (kernel (kh, kw, 1, C), bias (C,)) and outputs, computed as `impl`
  says (`DEPTHWISE`; set after construction by `use_depthwise`)."""

  def __init__(self, channels: int, kernel_size: Sequence[int], *, padding, **kwargs):
    if isinstance(padding, str):
      raise ValueError(f'DepthwiseConv takes explicit padding (an int or two pairs), not '
                       f'{padding!r}.')
    super().__init__(channels, channels, tuple(kernel_size), padding=padding,
                     feature_group_count=channels, **kwargs)
    self.pad_pairs = ((padding, padding),) * 2 if isinstance(padding, int) else tuple(
        tuple(p) for p in padding)
    self.impl = 'conv'

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.impl == 'conv':
      return super().__call__(inputs)
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias),
                                              dtype=self.dtype)
    out = depthwise_shift(inputs, kernel, self.pad_pairs)
    return out if bias is None else out + bias


def use_depthwise(model: nnx.Module, impl: str) -> None:
  """Sets how every `DepthwiseConv` in `model` computes (`config.model.depthwise`)."""
  check_depthwise(impl)  # Refuses an unknown name here, at construction.
  for _, module in nnx.iter_graph(model):
    if isinstance(module, DepthwiseConv):
      module.impl = impl
