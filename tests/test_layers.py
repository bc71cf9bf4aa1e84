"""Tests for cers_jax.models.layers: DropPath, GELU, bilinear upsampling, initializers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from cers_jax.models import layers


class _Residual(nnx.Module):

  def __init__(self, rate: float, rngs: nnx.Rngs):
    self.drop_path = layers.DropPath(rate, rngs=rngs)

  def __call__(self, x):
    return self.drop_path(x)


def test_drop_path_deterministic_is_identity():
  layer = layers.DropPath(0.5, deterministic=True, rngs=nnx.Rngs(dropout=0))
  x = jnp.arange(24.0).reshape(2, 3, 4)
  np.testing.assert_array_equal(layer(x), x)


def test_drop_path_drops_whole_samples_and_keeps_expectation():
  rate = 0.3
  layer = layers.DropPath(rate, rngs=nnx.Rngs(dropout=0))
  x = jnp.ones((4000, 2, 2, 3))
  y = np.asarray(layer(x))
  per_sample = y.reshape(4000, -1)
  # Every sample is either dropped entirely or kept entirely, scaled by 1/(1-rate).
  assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / (1 - rate)).all(1))
  dropped = (per_sample == 0).all(1).mean()
  assert abs(dropped - rate) < 0.04
  assert abs(y.mean() - 1.0) < 0.06
  # A second call draws a new mask.
  assert not np.array_equal(y, np.asarray(layer(x)))


def test_drop_path_view_toggles_training():
  model = _Residual(0.5, nnx.Rngs(dropout=1))
  x = jnp.ones((64, 4))
  eval_model = nnx.view(model, deterministic=True)
  np.testing.assert_array_equal(eval_model(x), x)
  assert not np.array_equal(model(x), x)
  assert model.drop_path.deterministic is False
  train_again = nnx.view(eval_model, deterministic=False)
  assert not np.array_equal(train_again(x), x)


def test_drop_path_rejects_bad_rate_and_missing_rngs():
  with pytest.raises(ValueError, match='rate'):
    layers.DropPath(1.0)
  with pytest.raises(ValueError, match='rngs'):
    layers.DropPath(0.2)(jnp.ones((2, 3)))
  np.testing.assert_array_equal(layers.DropPath(0.0)(jnp.ones((2, 3))), jnp.ones((2, 3)))


def test_gelu_exact_matches_torch():
  x = np.linspace(-6, 6, 101, dtype=np.float32)
  got = np.asarray(layers.gelu_exact(jnp.asarray(x)))
  # torch's float32 erf loses digits in the far negative tail, hence the atol.
  np.testing.assert_allclose(got, F.gelu(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)
  # The tanh approximation (jax's default) is measurably different.
  assert np.abs(got - np.asarray(jax.nn.gelu(jnp.asarray(x)))).max() > 1e-4


@pytest.mark.parametrize('align_corners', [True, False])
@pytest.mark.parametrize('shape,scale', [((2, 5, 5, 3), 2), ((1, 4, 7, 2), 2),
                                         ((1, 3, 6, 1), 3), ((2, 1, 4, 2), 2),
                                         ((1, 5, 6, 2), 1.5)])
def test_upsample_bilinear_matches_torch(shape, scale, align_corners):
  x = np.random.RandomState(0).randn(*shape).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), scale_factor=scale,
                       mode='bilinear', align_corners=align_corners).numpy()
  got = jax.jit(lambda v: layers.upsample_bilinear(v, scale, align_corners=align_corners))(
      jnp.asarray(x))
  assert got.shape == want.transpose(0, 2, 3, 1).shape
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


def test_upsample_bilinear_conventions_differ():
  x = jnp.asarray(np.random.RandomState(1).randn(1, 4, 4, 1).astype(np.float32))
  a = layers.upsample_bilinear(x, 2, align_corners=True)
  b = layers.upsample_bilinear(x, 2, align_corners=False)
  assert not np.allclose(a, b)
  # align_corners=True keeps the corner pixels.
  np.testing.assert_allclose(a[0, [0, -1]][:, [0, -1]], x[0, [0, -1]][:, [0, -1]])


def _torch_xavier_bound(shape_oi):
  fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape_oi))
  return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize('torch_shape,jax_shape', [
    ((32, 16, 3, 3), (3, 3, 16, 32)),  # conv OIHW -> HWIO
    ((64, 48), (48, 64)),  # linear (out, in) -> (in, out)
    ((24, 1, 7, 7), (7, 7, 1, 24)),  # depthwise
])
def test_xavier_uniform_matches_torch_fans(torch_shape, jax_shape):
  bound = _torch_xavier_bound(torch_shape)
  w = np.asarray(layers.xavier_uniform()(jax.random.key(0), jax_shape))
  assert np.abs(w).max() <= bound
  assert abs(w.std() - bound / math.sqrt(3)) / (bound / math.sqrt(3)) < 0.05


@pytest.mark.slow
def test_xavier_for_attention_kernels():
  e, heads = 32, 4
  # A separate (E, in) projection viewed as an (in, heads, head_dim) kernel.
  bound = _torch_xavier_bound((e, 48))
  w = np.asarray(layers.xavier_uniform(0, (1, 2))(jax.random.key(1), (48, heads, e // heads)))
  assert abs(w.std() - bound / math.sqrt(3)) / (bound / math.sqrt(3)) < 0.05
  assert np.abs(w).max() <= bound
  # torch's packed in_proj_weight (3E, E): fans E and 3E for each of q/k/v.
  packed = torch.nn.MultiheadAttention(e, heads).in_proj_weight.detach().numpy()
  packed_bound = _torch_xavier_bound((3 * e, e))
  assert np.abs(packed).max() <= packed_bound
  w = np.asarray(layers.xavier_uniform_fans(e, 3 * e)(jax.random.key(2), (e, heads, e // heads)))
  assert np.abs(w).max() <= packed_bound
  assert abs(w.std() - packed.std()) / packed.std() < 0.1


def test_trunc_normal_std_like_torch():
  w = np.asarray(layers.trunc_normal(0.02)(jax.random.key(0), (256, 256)))
  t = torch.nn.init.trunc_normal_(torch.empty(256, 256), std=0.02).numpy()
  assert abs(w.std() - 0.02) < 0.001
  assert abs(w.std() - t.std()) < 0.001


@pytest.mark.parametrize('kernel,padding,use_bias', [(7, ((3, 3), (3, 3)), True),
                                                     (5, 2, False), (3, 1, True)])
def test_depthwise_shift_equals_xla_grouped_convolution(kernel, padding, use_bias):
  """`model.depthwise='shift'` computes what nnx.Conv's grouped convolution computes, its
  gradients too, with the same parameters."""
  impl = 'shift'
  channels = 6
  conv = layers.DepthwiseConv(channels, (kernel, kernel), padding=padding, use_bias=use_bias,
                              rngs=nnx.Rngs(0))
  if use_bias:
    conv.bias[...] = jax.random.normal(jax.random.key(2), (channels,))
  x = jax.random.normal(jax.random.key(1), (2, 9, 11, channels))

  def loss(module, x):
    return (module(x) ** 2).sum()

  results = {}
  for name in ('conv', impl):
    layers.use_depthwise(conv, name)
    results[name] = (conv(x), nnx.grad(loss, argnums=(0, 1))(conv, x))
  (out_c, (grad_mc, grad_xc)), (out_s, (grad_ms, grad_xs)) = results['conv'], results[impl]
  assert out_s.shape == out_c.shape == x.shape
  np.testing.assert_allclose(out_s, out_c, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_xs, grad_xc, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grad_ms.kernel[...], grad_mc.kernel[...], rtol=1e-5, atol=1e-4)


def test_depthwise_shift_in_bfloat16_sums_in_float32():
  conv = layers.DepthwiseConv(4, (7, 7), padding=3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
  layers.use_depthwise(conv, 'shift')
  shifted = conv(x)
  layers.use_depthwise(conv, 'conv')
  grouped = conv(x)
  assert shifted.dtype == grouped.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(shifted), np.float32(grouped), rtol=2e-2, atol=2e-2)


def test_depthwise_switch_names_are_checked():
  with pytest.raises(ValueError, match="model.depthwise='fast'"):
    layers.use_depthwise(nnx.Module(), 'fast')
  assert layers.check_depthwise('shift') == 'shift'
