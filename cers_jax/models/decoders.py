"""The two CERS decoders (docs/design.md section 7), each returning one logit per input pixel.

`MCAMDecoder` is the retrieval-aware D_r: MCAM blocks carry a main stream and a retrieval
stream, joined by a coordinate-attention gate (golden fixtures `mcam_decoder_block`,
`coord_att_gated_fusion`). `ResUNetDecoder` is the standard D_s: residual U-Net blocks on
a1..a4 only (fixture `resunet_decoder_block`). Blocks are ordered deepest first
(`blocks[0]` is the authors' `decoder_left4` / `decoder_right4`), as
`config.model.decoder_dims`.

BatchNorm follows PyTorch (momentum 0.1 there is flax momentum 0.9, eps 1e-5); eval mode
is `nnx.view(model, use_running_average=True)`. One known difference: flax moves
`running_var` towards the biased batch variance, PyTorch towards the unbiased one (a factor
n / (n - 1), n = values per channel in the batch: at least B * (H + W) = 16 * 28 = 448 in
the deepest coordinate gate at 224 px and batch 16, so under 0.25%). Normalisation itself
matches PyTorch exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cers_jax.models.layers import DepthwiseConv
from cers_jax.models.layers import gelu_exact
from cers_jax.models.layers import upsample_bilinear
from cers_jax.models.layers import xavier_uniform

Array = jax.Array
Dtype = Any

_BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1: new = 0.9 * old + 0.1 * batch.
_BN_EPS = 1e-5
# The MCAM multi-scale LayerNorms use torch's default eps; the fixture `mcam_decoder_block`
# rules out ConvNeXt's 1e-6 (5e-4 relative error).
_LN_EPS = 1e-5


def conv(
    in_features: int,
    out_features: int,
    kernel: int,
    *,
    groups: int = 1,
    use_bias: bool = True,
    dtype: Dtype | None,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  """A stride-1 'same' conv with xavier-uniform weights and zero bias (docs/design.md section 7);
  one filter per channel when `groups` = in_features = out_features."""
  if groups > 1 and groups == in_features == out_features:
    return DepthwiseConv(in_features, (kernel, kernel), padding=kernel // 2,
                         use_bias=use_bias, dtype=dtype, kernel_init=xavier_uniform(),
                         rngs=rngs)
  return nnx.Conv(in_features, out_features, (kernel, kernel),
                  padding=kernel // 2, feature_group_count=groups, use_bias=use_bias,
                  dtype=dtype, kernel_init=xavier_uniform(), rngs=rngs)


def batch_norm(features: int, *, dtype: Dtype | None, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm with PyTorch's defaults, in training mode until viewed otherwise."""
  return nnx.BatchNorm(features, momentum=_BN_MOMENTUM, epsilon=_BN_EPS,
                       use_running_average=False, dtype=dtype, rngs=rngs)


def _layer_norm(features: int, *, dtype: Dtype | None, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=_LN_EPS, dtype=dtype, rngs=rngs)


class CoordAttGatedFusion(nnx.Module):
  """Coordinate-attention gate between the main and retrieval streams.

  z = [main ; rag]; pooled along W and along H, the two profiles go through one shared
  conv1x1(2C -> mip) + BN + GELU, then conv_h / conv_w + sigmoid give a_h (H, 1) and
  a_w (1, W); rag' = a_h * a_w * rag; main' = GELU(BN(conv3x3(main + rag'))).
  """

  def __init__(
      self,
      channels: int,
      *,
      reduction: int = 16,
      dtype: Dtype | None = None,
      rngs: nnx.Rngs,
  ):
    """mip = max(8, channels // reduction) channels in the shared bottleneck."""
    mip = max(8, channels // reduction)
    self.conv1 = conv(2 * channels, mip, 1, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(mip, dtype=dtype, rngs=rngs)
    self.conv_h = conv(mip, channels, 1, dtype=dtype, rngs=rngs)
    self.conv_w = conv(mip, channels, 1, dtype=dtype, rngs=rngs)
    self.out_conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)
    self.out_bn = batch_norm(channels, dtype=dtype, rngs=rngs)

  def __call__(self, main: Array, rag: Array) -> tuple[Array, Array]:
    """(main, rag), each (B, H, W, C) -> (main', rag'), same shapes."""
    h = main.shape[1]
    z = jnp.concatenate([main, rag], axis=-1)
    zh = jnp.mean(z, axis=2, keepdims=True)  # (B, H, 1, 2C)
    zw = jnp.mean(z, axis=1, keepdims=True).transpose(0, 2, 1, 3)  # (B, W, 1, 2C)
    # Both profiles share conv1 and bn1 (and bn1's batch statistics), as one (H + W) map.
    y = gelu_exact(self.bn1(self.conv1(jnp.concatenate([zh, zw], axis=1))))
    y_h, y_w = y[:, :h], y[:, h:].transpose(0, 2, 1, 3)
    gate = jax.nn.sigmoid(self.conv_h(y_h)) * jax.nn.sigmoid(self.conv_w(y_w))
    rag = gate * rag
    main = gelu_exact(self.out_bn(self.out_conv(main + rag)))
    return main, rag


class PlainFusion(nnx.Module):
  """The coordinate gate's ablation (paper Table 3, "w/o coordinate attention"): no gate.

  rag' = rag; main' = GELU(BN(conv1x1(main + rag))): the gate's pooled profiles and
  sigmoids removed and its 3x3 output convolution replaced by a 1x1 one.
  """

  def __init__(self, channels: int, *, dtype: Dtype | None = None, rngs: nnx.Rngs):
    self.out_conv = conv(channels, channels, 1, dtype=dtype, rngs=rngs)
    self.out_bn = batch_norm(channels, dtype=dtype, rngs=rngs)

  def __call__(self, main: Array, rag: Array) -> tuple[Array, Array]:
    return gelu_exact(self.out_bn(self.out_conv(main + rag))), rag


class MCAMBlock(nnx.Module):
  """One block of the retrieval-aware decoder D_r.

  s = [x ; skip]; main = GELU(conv1x1(up(s))), rag = GELU(conv1x1(up(rag or x))) (up:
  bilinear x2, align_corners=True); coordinate gate; then per stream t: own branch
  GELU(conv1x1(C -> 4C)(LN(dw7x7_t(t)))) plus a shared branch with dw5x5 whose weights
  both streams use; out_t = conv1x1_t(4C -> C)(own + shared) + t.

  The paper's Table 3 ablations: `coord_attention=False` puts `PlainFusion` in the gate's
  place; `multi_scale=False` makes the 7x7 and 5x5 depthwise convolutions 1x1 (per-channel
  scales), so the block keeps its branches but sees no neighbourhood beyond the upsampling.
  """

  def __init__(
      self,
      in_channels: int,
      skip_channels: int,
      out_channels: int,
      *,
      reduction: int = 16,
      coord_attention: bool = True,
      multi_scale: bool = True,
      dtype: Dtype | None = None,
      rngs: nnx.Rngs,
  ):
    """skip_channels=0 builds a block without an encoder skip (the deepest)."""
    c, hidden = out_channels, 4 * out_channels
    own_kernel, shared_kernel = (7, 5) if multi_scale else (1, 1)
    self.skip_channels = skip_channels
    self.conv_main = conv(in_channels + skip_channels, c, 1, dtype=dtype, rngs=rngs)
    self.conv_rag = conv(in_channels, c, 1, dtype=dtype, rngs=rngs)
    self.coord_gate = (
        CoordAttGatedFusion(c, reduction=reduction, dtype=dtype, rngs=rngs)
        if coord_attention else PlainFusion(c, dtype=dtype, rngs=rngs))
    self.dw_main = conv(c, c, own_kernel, groups=c, dtype=dtype, rngs=rngs)
    self.ln_main = _layer_norm(c, dtype=dtype, rngs=rngs)
    self.expand_main = conv(c, hidden, 1, dtype=dtype, rngs=rngs)
    self.project_main = conv(hidden, c, 1, dtype=dtype, rngs=rngs)
    self.dw_rag = conv(c, c, own_kernel, groups=c, dtype=dtype, rngs=rngs)
    self.ln_rag = _layer_norm(c, dtype=dtype, rngs=rngs)
    self.expand_rag = conv(c, hidden, 1, dtype=dtype, rngs=rngs)
    self.project_rag = conv(hidden, c, 1, dtype=dtype, rngs=rngs)
    self.dw_shared = conv(c, c, shared_kernel, groups=c, dtype=dtype, rngs=rngs)
    self.ln_shared = _layer_norm(c, dtype=dtype, rngs=rngs)
    self.expand_shared = conv(c, hidden, 1, dtype=dtype, rngs=rngs)

  def _shared(self, t: Array) -> Array:
    return gelu_exact(self.expand_shared(self.ln_shared(self.dw_shared(t))))

  def __call__(
      self, x: Array, skip: Array | None = None, rag: Array | None = None
  ) -> tuple[Array, Array]:
    """(B, H, W, C_in) x [+ skip] [+ rag] -> (main, rag), each (B, 2H, 2W, out_channels).

    Without `rag` (warm-up), up(x) feeds the retrieval stream.
    """
    if (skip is None) != (self.skip_channels == 0):
      raise ValueError(
          f'MCAMBlock built with skip_channels={self.skip_channels} was called with '
          f'skip={"None" if skip is None else skip.shape}.')
    s = x if skip is None else jnp.concatenate([x, skip], axis=-1)
    main = gelu_exact(self.conv_main(upsample_bilinear(s, 2, align_corners=True)))
    rag = gelu_exact(self.conv_rag(
        upsample_bilinear(x if rag is None else rag, 2, align_corners=True)))
    main, rag = self.coord_gate(main, rag)
    own_main = gelu_exact(self.expand_main(self.ln_main(self.dw_main(main))))
    own_rag = gelu_exact(self.expand_rag(self.ln_rag(self.dw_rag(rag))))
    out_main = self.project_main(own_main + self._shared(main)) + main
    out_rag = self.project_rag(own_rag + self._shared(rag)) + rag
    return out_main, out_rag


class SegmentationHead(nnx.Module):
  """Bilinear x2 (align_corners=False) -> conv3x3 (no bias) -> BN -> ReLU -> conv1x1 -> 1."""

  def __init__(
      self, in_channels: int, hidden: int, *, dtype: Dtype | None = None, rngs: nnx.Rngs
  ):
    self.conv = conv(in_channels, hidden, 3, use_bias=False, dtype=dtype, rngs=rngs)
    self.bn = batch_norm(hidden, dtype=dtype, rngs=rngs)
    self.out = conv(hidden, 1, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """(B, H, W, in_channels) -> (B, 2H, 2W, 1) logits."""
    x = upsample_bilinear(x, 2, align_corners=False)
    return self.out(jax.nn.relu(self.bn(self.conv(x))))


def _check_dims(encoder_dims: Sequence[int], decoder_dims: Sequence[int]) -> None:
  if len(encoder_dims) != 4 or len(decoder_dims) != 4:
    raise ValueError(
        f'decoders need 4 encoder_dims and 4 decoder_dims (deepest first), got '
        f'{tuple(encoder_dims)} and {tuple(decoder_dims)}; fix config.model.')


class MCAMDecoder(nnx.Module):
  """Retrieval-aware decoder D_r: four MCAM blocks + head on [main1 ; rag1]."""

  def __init__(
      self,
      encoder_dims: Sequence[int],
      decoder_dims: Sequence[int],
      *,
      reduction: int = 16,
      coord_attention: bool = True,
      multi_scale: bool = True,
      dtype: Dtype | None = None,
      rngs: nnx.Rngs,
  ):
    """`encoder_dims` are a1..a4's channels, shallowest first; `decoder_dims` deepest first.

    `coord_attention`, `multi_scale`: `MCAMBlock`'s ablation switches, for every block.
    """
    _check_dims(encoder_dims, decoder_dims)
    skips = (0, *reversed(encoder_dims[:3]))
    ins = (encoder_dims[3], *decoder_dims[:3])
    self.blocks = nnx.List([
        MCAMBlock(i, s, o, reduction=reduction, coord_attention=coord_attention,
                  multi_scale=multi_scale, dtype=dtype, rngs=rngs)
        for i, s, o in zip(ins, skips, decoder_dims)
    ])
    self.head = SegmentationHead(2 * decoder_dims[3], decoder_dims[3] // 2, dtype=dtype,
                                 rngs=rngs)

  def __call__(self, attended: Sequence[Array], rag: Array | None = None) -> Array:
    """(a1, a2, a3, a4) and r, (B, h, w, C4) or None (warm-up) -> (B, H, W, 1) logits.

    The logits are at the input image resolution, 4x a1's.
    """
    skips = (None, attended[2], attended[1], attended[0])
    main = attended[3]
    for block, skip in zip(self.blocks, skips):
      main, rag = block(main, skip, rag)
    return self.head(jnp.concatenate([main, rag], axis=-1))


class ResUNetBlock(nnx.Module):
  """Residual U-Net decoder block of the standard decoder D_s.

  u = up([x ; skip]) (bilinear x2, align_corners=True);
  out = ReLU(BN(conv3x3(ReLU(BN(conv3x3(u))))) + BN(conv1x1(u))), convs without bias.
  """

  def __init__(
      self,
      in_channels: int,
      skip_channels: int,
      out_channels: int,
      *,
      dtype: Dtype | None = None,
      rngs: nnx.Rngs,
  ):
    cin = in_channels + skip_channels
    self.skip_channels = skip_channels
    self.conv1 = conv(cin, out_channels, 3, use_bias=False, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(out_channels, dtype=dtype, rngs=rngs)
    self.conv2 = conv(out_channels, out_channels, 3, use_bias=False, dtype=dtype,
                      rngs=rngs)
    self.bn2 = batch_norm(out_channels, dtype=dtype, rngs=rngs)
    self.shortcut_conv = conv(cin, out_channels, 1, use_bias=False, dtype=dtype, rngs=rngs)
    self.shortcut_bn = batch_norm(out_channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, skip: Array | None = None) -> Array:
    """(B, H, W, in) [+ (B, H, W, skip)] -> (B, 2H, 2W, out)."""
    if (skip is None) != (self.skip_channels == 0):
      raise ValueError(
          f'ResUNetBlock built with skip_channels={self.skip_channels} was called with '
          f'skip={"None" if skip is None else skip.shape}.')
    s = x if skip is None else jnp.concatenate([x, skip], axis=-1)
    u = upsample_bilinear(s, 2, align_corners=True)
    y = jax.nn.relu(self.bn1(self.conv1(u)))
    y = self.bn2(self.conv2(y))
    return jax.nn.relu(y + self.shortcut_bn(self.shortcut_conv(u)))


class ResUNetDecoder(nnx.Module):
  """Standard decoder D_s: four residual U-Net blocks + head on the last block only."""

  def __init__(
      self,
      encoder_dims: Sequence[int],
      decoder_dims: Sequence[int],
      *,
      dtype: Dtype | None = None,
      rngs: nnx.Rngs,
  ):
    """`encoder_dims` are a1..a4's channels, shallowest first; `decoder_dims` deepest first."""
    _check_dims(encoder_dims, decoder_dims)
    skips = (0, *reversed(encoder_dims[:3]))
    ins = (encoder_dims[3], *decoder_dims[:3])
    self.blocks = nnx.List([
        ResUNetBlock(i, s, o, dtype=dtype, rngs=rngs)
        for i, s, o in zip(ins, skips, decoder_dims)
    ])
    self.head = SegmentationHead(decoder_dims[3], decoder_dims[3] // 2, dtype=dtype,
                                 rngs=rngs)

  def __call__(self, attended: Sequence[Array]) -> Array:
    """(a1, a2, a3, a4) -> (B, H, W, 1) logits at the input resolution."""
    skips = (None, attended[2], attended[1], attended[0])
    x = attended[3]
    for block, skip in zip(self.blocks, skips):
      x = block(x, skip)
    return self.head(x)


class RetrievalUNetDecoder(nnx.Module):
  """D_r as a standard U-Net decoder (paper Table 3's "U-Net" row, `model.decoder='unet'`).

  The retrieval stream joins once, at the bottleneck, where MCAM's first block takes it:
  x4 = GELU(conv1x1([a4 ; r])) with C4 channels, r = a4 itself when nothing is retrieved
  (warm-up, mode `none`; MCAM's block 4 likewise feeds up(a4) to its retrieval stream);
  then the residual U-Net blocks and head of D_s on (a1, a2, a3, x4).
  """

  def __init__(
      self,
      encoder_dims: Sequence[int],
      decoder_dims: Sequence[int],
      *,
      dtype: Dtype | None = None,
      rngs: nnx.Rngs,
  ):
    _check_dims(encoder_dims, decoder_dims)
    c4 = encoder_dims[3]
    self.fuse = conv(2 * c4, c4, 1, dtype=dtype, rngs=rngs)
    self.unet = ResUNetDecoder(encoder_dims, decoder_dims, dtype=dtype, rngs=rngs)

  def __call__(self, attended: Sequence[Array], rag: Array | None = None) -> Array:
    """(a1, a2, a3, a4) and r, (B, h, w, C4) or None -> (B, H, W, 1) logits."""
    a4 = attended[3]
    rag = a4 if rag is None else rag
    x4 = gelu_exact(self.fuse(jnp.concatenate([a4, rag], axis=-1)))
    return self.unet((*attended[:3], x4))
