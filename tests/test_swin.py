"""cers_jax/models/swin.py against a torch transcription of Swin-UNet's own code
(HuCaoFighting/Swin-Unet, swin_transformer_unet_skip_expand_decoder_sys.py):
`SwinTransformerBlock` with `WindowAttention` (shifted and not), `PatchExpand`,
`FinalPatchExpand_X4`; then the decoder's shapes and its retrieval input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cers_jax.models import swin

torch = pytest.importorskip('torch')


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _t(x):
  return torch.tensor(np.asarray(x), dtype=torch.float64)


def _linear(module, x):
  y = x @ _t(module.kernel[...])
  return y + _t(module.bias[...]) if module.bias is not None else y


def _layer_norm(module, x):
  return torch.nn.functional.layer_norm(x, x.shape[-1:], _t(module.scale[...]),
                                        _t(module.bias[...]), eps=1e-5)


# --- their code, transcribed (torch, float64) ---------------------------------------------

def _window_partition(x, ws):
  b, h, w, c = x.shape
  x = x.view(b, h // ws, ws, w // ws, ws, c)
  return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def _window_reverse(windows, ws, h, w):
  b = int(windows.shape[0] / (h * w / ws / ws))
  x = windows.view(b, h // ws, w // ws, ws, ws, -1)
  return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def _their_index(ws):
  coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing='ij'))
  flat = torch.flatten(coords, 1)
  rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
  rel[:, :, 0] += ws - 1
  rel[:, :, 1] += ws - 1
  rel[:, :, 0] *= 2 * ws - 1
  return rel.sum(-1)


def _their_mask(h, w, ws, shift):
  img_mask = torch.zeros((1, h, w, 1))
  slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
  cnt = 0
  for hs in slices:
    for wsl in slices:
      img_mask[:, hs, wsl, :] = cnt
      cnt += 1
  mask_windows = _window_partition(img_mask, ws).view(-1, ws * ws)
  attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
  return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def _their_attention(attn_module, x, mask, heads, ws):
  b_, n, c = x.shape
  qkv = _linear(attn_module.qkv, x).reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
  q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
  attn = q @ k.transpose(-2, -1)
  table = _t(attn_module.bias_table[...])
  bias = table[_their_index(ws).view(-1)].view(ws * ws, ws * ws, -1).permute(2, 0, 1)
  attn = attn + bias.unsqueeze(0)
  if mask is not None:
    nw = mask.shape[0]
    attn = attn.view(b_ // nw, nw, heads, n, n) + mask.double().unsqueeze(1).unsqueeze(0)
    attn = attn.view(-1, heads, n, n)
  attn = torch.softmax(attn, dim=-1)
  return _linear(attn_module.proj, (attn @ v).transpose(1, 2).reshape(b_, n, c))


def _their_block(block, x, heads, ws, shift):
  b, h, w, c = x.shape
  shortcut = x.reshape(b, h * w, c)
  y = _layer_norm(block.norm1, shortcut).view(b, h, w, c)
  if shift:
    y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
  windows = _window_partition(y, ws).view(-1, ws * ws, c)
  mask = _their_mask(h, w, ws, shift) if shift else None
  y = _window_reverse(_their_attention(block.attn, windows, mask, heads, ws).view(-1, ws, ws, c),
                      ws, h, w)
  if shift:
    y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
  x = shortcut + y.reshape(b, h * w, c)
  hidden = torch.nn.functional.gelu(_linear(block.fc1, _layer_norm(block.norm2, x)))
  mlp = _linear(block.fc2, hidden)
  return (x + mlp).view(b, h, w, c)


def _their_expand(module, x, scale):
  b, h, w, _ = x.shape
  y = _linear(module.expand, x)
  c = y.shape[-1] // (scale * scale)
  # einops 'b h w (p1 p2 c)-> b (h p1) (w p2) c'
  y = y.view(b, h, w, scale, scale, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * scale, w * scale, c)
  return _layer_norm(module.norm, y)


# --- tests ------------------------------------------------------------------------------

def test_relative_position_index_is_theirs():
  np.testing.assert_array_equal(swin.relative_position_index(7), _their_index(7).numpy())
  # A smaller window reads the central offsets of the big table.
  small = swin.relative_position_index(3, 7)
  offsets = np.stack(np.divmod(small, 13), -1) - 6
  assert offsets.min() == -2 and offsets.max() == 2


@pytest.mark.parametrize('shift', [0, 3])
def test_swin_block_matches_their_code(shift):
  block = swin.SwinBlock(8, 2, 7, shift, rngs=nnx.Rngs(0))
  # Random biases and LayerNorm affine (theirs start at 0 / 1: nothing would test them).
  rng = np.random.default_rng(0)
  for module in (block.norm1, block.norm2):
    module.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
    module.bias[...] = jnp.asarray(rng.normal(0, 0.1, 8), jnp.float32)
  for module in (block.attn.qkv, block.attn.proj, block.fc1, block.fc2):
    module.bias[...] = jnp.asarray(rng.normal(0, 0.1, module.bias.shape), jnp.float32)
  x = rng.standard_normal((2, 14, 14, 8)).astype(np.float32)
  ours = block(jnp.asarray(x))
  theirs = _their_block(block, _t(x), heads=2, ws=7, shift=shift)
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-4, atol=1e-5)


def test_shift_mask_is_theirs():
  np.testing.assert_array_equal(swin.shift_mask(14, 21, 7, 3), _their_mask(14, 21, 7, 3).numpy())


@pytest.mark.parametrize('scale', [2, 4])
def test_patch_expand_matches_their_code(scale):
  module = swin.PatchExpand(16, scale, rngs=nnx.Rngs(1))
  x = np.random.default_rng(1).standard_normal((2, 3, 5, 16)).astype(np.float32)
  ours = module(jnp.asarray(x))
  assert ours.shape == (2, 3 * scale, 5 * scale, 8 if scale == 2 else 16)
  np.testing.assert_allclose(np.asarray(ours), _their_expand(module, _t(x), scale).numpy(),
                             rtol=1e-4, atol=1e-5)


def test_small_maps_are_one_unshifted_window_and_larger_ones_are_padded():
  block = swin.SwinBlock(8, 2, 7, 3, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 6, 6, 8)), jnp.float32)
  # 6 <= 7: one 6x6 window, no shift: equal to their block built with window 6, shift 0,
  # whose table is the central part of ours.
  ours = block(x)
  theirs_table = np.asarray(block.attn.bias_table[...]).reshape(13, 13, 2)[1:12, 1:12]
  reference = swin.SwinBlock(8, 2, 6, 0, rngs=nnx.Rngs(0))
  for name in ('norm1', 'norm2', 'fc1', 'fc2'):
    setattr(reference, name, getattr(block, name))
  reference.attn.qkv, reference.attn.proj = block.attn.qkv, block.attn.proj
  reference.attn.bias_table[...] = jnp.asarray(theirs_table.reshape(121, 2))
  np.testing.assert_allclose(ours, reference(x), rtol=1e-5, atol=1e-6)
  padded = block(jnp.ones((1, 12, 12, 8)))  # 12 -> 14, attended, cropped back.
  chex.assert_shape(padded, (1, 12, 12, 8))
  chex.assert_tree_all_finite(padded)


def test_decoder_shapes_retrieval_and_gradients():
  dims = (16, 32, 64, 128)
  decoder = swin.SwinUNetDecoder(dims, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(0), 5)
  attended = tuple(jax.random.normal(keys[i], (2, 96 // s, 96 // s, c))
                   for i, (s, c) in enumerate(zip((4, 8, 16, 32), dims)))
  rag = jax.random.normal(keys[4], (2, 3, 3, 128))
  with_rag, without = decoder(attended, rag), decoder(attended, None)
  chex.assert_shape((with_rag, without), (2, 96, 96, 1))
  assert np.abs(with_rag - without).max() > 1e-5
  grads = nnx.grad(lambda d: jnp.mean(d(attended, rag) ** 2))(decoder)
  norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.9 * len(norms)
  with pytest.raises(ValueError, match='widths'):
    swin.SwinUNetDecoder((16, 32, 48, 64), rngs=nnx.Rngs(0))
