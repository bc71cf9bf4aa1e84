"""Swin-UNet's decoder as D_r (paper Table 3's "Swin U-Net" row, `model.decoder='swin_unet'`).

Cao et al., "Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation", ECCV
Workshops 2022; read from github.com/HuCaoFighting/Swin-Unet
`networks/swin_transformer_unet_skip_expand_decoder_sys.py` (`SwinTransformerSys`'s decoder:
`PatchExpand`, `BasicLayer_up`, `SwinTransformerBlock`, `WindowAttention`,
`FinalPatchExpand_X4`, `concat_back_dim`, `norm_up`, `output`). Our ConvNeXt's stages have
Swin-T's widths (C, 2C, 4C, 8C with C = 96) and strides (4 to 32), so the decoder reads them
where Swin-UNet reads its own encoder's:

  bottleneck  x = LN(Linear([a4 ; r]) -> 8C)   r joins here, as in `RetrievalUNetDecoder`
              (r = a4 without retrieval); Swin-UNet's bottleneck is LN(stage-4 output)
  up 1        PatchExpand(8C): Linear(8C -> 16C, no bias), 2x2 pixel shuffle -> 4C, LN
  up 2..4     cat with a3 / a2 / a1, Linear(2D -> D), `depths[i]` Swin blocks (windowed
              attention, every other block shifted by half a window), then PatchExpand
              (not after the last)
  head        LN, FinalPatchExpand_X4: Linear(C -> 16C, no bias), 4x4 pixel shuffle -> C,
              LN; conv1x1 (no bias) -> 1 logit

Their settings: window 7, heads (3, 6, 12, 24) for widths (C, 2C, 4C, 8C), MLP ratio 4,
qkv bias, depths (2, 2, 2, 2) — their code builds the decoder's layers from `depths`, not
from its unused `depths_decoder`. As theirs, a map no larger than the window is one window
and is not shifted. Where a side is larger but not a multiple of the window (CPU scale:
96 px gives 24 and 12), it is zero-padded to one and cropped after attention (Swin's
detection code does this; their segmentation code requires 224 px, where 56/28/14/7 divide).
Heads scale with the width: `heads = width / 32` (their 3, 6, 12, 24 at C = 96). Dropout and
stochastic depth are 0 (their defaults for Synapse except drop_path 0.1, left out here).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cers_jax.models.layers import gelu_exact
from cers_jax.models.layers import trunc_normal

Array = jax.Array
_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, as their norm_layer.
_MASKED = -100.0  # Their attn_mask fill for token pairs from different shifted regions.


def _linear(cin: int, cout: int, *, use_bias: bool = True, dtype=None,
            rngs: nnx.Rngs) -> nnx.Linear:
  # Their _init_weights: trunc_normal(std=.02) weights, zero biases.
  return nnx.Linear(cin, cout, use_bias=use_bias, kernel_init=trunc_normal(0.02),
                    dtype=dtype, rngs=rngs)


def _norm(dim: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=_LN_EPS, dtype=dtype, rngs=rngs)


def relative_position_index(window: int, table_window: int | None = None) -> np.ndarray:
  """(w*w, w*w) index into a (2W-1)^2 bias table, W = `table_window` (default w): their
  `relative_position_index` when W = w. A smaller window (a map smaller than the built
  window) reads the table's central offsets, the same learned bias per offset."""
  table_window = table_window or window
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij'))
  flat = coords.reshape(2, -1)
  rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0) + (table_window - 1)
  return rel[..., 0] * (2 * table_window - 1) + rel[..., 1]


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """(nW, w*w, w*w) additive mask of a shifted window: 0 within a region, -100 across.

  Their `attn_mask`: the (padded) map cut into 3 x 3 regions by the slices (0, -w),
  (-w, -shift), (-shift, None) per axis; tokens of one window attend only within their
  region (the cyclic shift put unrelated pixels into one window).
  """
  region = np.zeros((height, width), np.int32)
  cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  label = 0
  for rows in cuts:
    for cols in cuts:
      region[rows, cols] = label
      label += 1
  windows = region.reshape(height // window, window, width // window, window)
  windows = windows.transpose(0, 2, 1, 3).reshape(-1, window * window)
  return np.where(windows[:, None, :] != windows[:, :, None], _MASKED, 0.0).astype(
      np.float32)


def _partition(x: Array, window: int) -> Array:
  """(B, H, W, C) -> (B * nW, w*w, C), windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _merge(windows: Array, window: int, b: int, h: int, w: int) -> Array:
  c = windows.shape[-1]
  x = windows.reshape(b, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class WindowAttention(nnx.Module):
  """Multi-head self-attention within a window, with the relative position bias."""

  def __init__(self, dim: int, window: int, heads: int, *, dtype=None, rngs: nnx.Rngs):
    self.window, self.heads = window, heads
    self.scale = (dim // heads) ** -0.5
    self.bias_table = nnx.Param(trunc_normal(0.02)(rngs.params(),
                                                   ((2 * window - 1) ** 2, heads)))
    self.qkv = _linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """(B * nW, N, C) windows of N = w*w tokens, w <= the built window [, (nW, N, N)
    mask] -> (B * nW, N, C)."""
    bw, n, c = x.shape
    index = relative_position_index(int(round(n ** 0.5)), self.window)
    qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    attn = q @ k.swapaxes(-1, -2)  # (B * nW, heads, N, N)
    bias = self.bias_table[...][jnp.asarray(index.reshape(-1))].reshape(n, n, self.heads)
    attn = attn + bias.transpose(2, 0, 1)[None].astype(attn.dtype)
    if mask is not None:
      windows = mask.shape[0]
      attn = attn.reshape(bw // windows, windows, self.heads, n, n) + mask[None, :, None]
      attn = attn.reshape(bw, self.heads, n, n)
    out = jax.nn.softmax(attn, axis=-1) @ v
    return self.proj(out.transpose(0, 2, 1, 3).reshape(bw, n, c))


class SwinBlock(nnx.Module):
  """Their `SwinTransformerBlock`: x + W-MSA(LN(x)), then x + MLP(LN(x)), on (B, H, W, C)."""

  def __init__(self, dim: int, heads: int, window: int, shift: int, *, dtype=None,
               rngs: nnx.Rngs):
    self.window, self.shift = window, shift
    self.norm1 = _norm(dim, dtype=dtype, rngs=rngs)
    self.attn = WindowAttention(dim, window, heads, dtype=dtype, rngs=rngs)
    self.norm2 = _norm(dim, dtype=dtype, rngs=rngs)
    self.fc1 = _linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(4 * dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    ws, shift = self.window, self.shift
    if min(h, w) <= ws:  # Theirs: such a map is one window, never shifted.
      ws, shift = min(h, w), 0
    pad_h, pad_w = -h % ws, -w % ws
    y = self.norm1(x)
    y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    mask = None
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      mask = jnp.asarray(shift_mask(hp, wp, ws, shift))
    y = _merge(self.attn(_partition(y, ws), mask), ws, b, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + y[:, :h, :w]
    return x + self.fc2(gelu_exact(self.fc1(self.norm2(x))))


class PatchExpand(nnx.Module):
  """A linear expansion, a scale x scale pixel shuffle, then LN.

  scale 2 (their `PatchExpand`): Linear(D -> 2D), out D/2 channels at 2x the side;
  scale 4 (`FinalPatchExpand_X4`): Linear(D -> 16D), out D channels at 4x the side.
  """

  def __init__(self, dim: int, scale: int, *, dtype=None, rngs: nnx.Rngs):
    self.scale = scale
    self.out_dim = dim // 2 if scale == 2 else dim
    self.expand = _linear(dim, self.out_dim * scale * scale, use_bias=False, dtype=dtype,
                          rngs=rngs)
    self.norm = _norm(self.out_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b, h, w, _ = x.shape
    s, c = self.scale, self.out_dim
    # einops 'b h w (p1 p2 c) -> b (h p1) (w p2) c'.
    x = self.expand(x).reshape(b, h, w, s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return self.norm(x.reshape(b, h * s, w * s, c))


class SwinUNetDecoder(nnx.Module):
  """D_r as Swin-UNet's decoder on (a1, a2, a3, a4) and the retrieval stream r."""

  def __init__(self, encoder_dims: Sequence[int], *, depths: Sequence[int] = (2, 2, 2, 2),
               window: int = 7, head_width: int = 32, dtype=None, rngs: nnx.Rngs):
    """`encoder_dims` (C, 2C, 4C, 8C), shallowest first; `depths` of the up layers 2..4
    are depths[2], depths[1], depths[0], as their decoder reads them."""
    dims = tuple(encoder_dims)
    if len(dims) != 4 or any(dims[i + 1] != 2 * dims[i] for i in range(3)):
      raise ValueError(f'SwinUNetDecoder needs encoder widths (C, 2C, 4C, 8C), got {dims}.')
    self.window = window
    self.fuse = _linear(2 * dims[3], dims[3], dtype=dtype, rngs=rngs)
    self.fuse_norm = _norm(dims[3], dtype=dtype, rngs=rngs)
    self.expand_first = PatchExpand(dims[3], 2, dtype=dtype, rngs=rngs)
    self.concat_back = nnx.List([_linear(2 * d, d, dtype=dtype, rngs=rngs)
                                 for d in (dims[2], dims[1], dims[0])])
    self.layers = nnx.List()
    self.expands = nnx.List()
    for level, d in zip((2, 1, 0), (dims[2], dims[1], dims[0])):
      heads = max(1, d // head_width)
      self.layers.append(nnx.List([
          SwinBlock(d, heads, window, 0 if i % 2 == 0 else window // 2, dtype=dtype,
                    rngs=rngs) for i in range(depths[level])]))
      if level > 0:
        self.expands.append(PatchExpand(d, 2, dtype=dtype, rngs=rngs))
    self.norm_up = _norm(dims[0], dtype=dtype, rngs=rngs)
    self.final_expand = PatchExpand(dims[0], 4, dtype=dtype, rngs=rngs)
    self.output = nnx.Conv(dims[0], 1, (1, 1), use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, attended: Sequence[Array], rag: Array | None = None) -> Array:
    """(a1, a2, a3, a4), r (B, h, w, 8C) or None -> (B, H, W, 1) logits, H = 4 x a1's."""
    a4 = attended[3]
    rag = a4 if rag is None else rag
    x = self.fuse_norm(self.fuse(jnp.concatenate([a4, rag], axis=-1)))
    x = self.expand_first(x)
    for i, (skip, concat, blocks) in enumerate(
        zip((attended[2], attended[1], attended[0]), self.concat_back, self.layers)):
      x = concat(jnp.concatenate([x, skip], axis=-1))
      for block in blocks:
        x = block(x)
      if i < len(self.expands):
        x = self.expands[i](x)
    x = self.final_expand(self.norm_up(x))
    return self.output(x)
