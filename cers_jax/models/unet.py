"""The baselines' network: the ConvNeXt encoder with residual U-Net decoders (paper Table 1).

The paper compares CERS with "U-Net with the same ConvNeXt backbone" and semi-supervised
methods re-implemented on it. Here that network is CERS's own encoder and its standard
decoder D_s (`ResUNetDecoder`) reading the raw ConvNeXt stages f1..f4 — no report text, no
cross-attention, no retrieval. A method with several decoders on one encoder (UCMT's
collaborative students) asks for `num_decoders` > 1; each decoder is initialised apart.

    image --ConvNeXt--> f1..f4 --ResUNetDecoder_i--> logits_i   (B, H, W, 1) each
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cers_jax.models.cers import compute_dtype
from cers_jax.models.convnext import ConvNeXt
from cers_jax.models.decoders import ResUNetDecoder


class ConvNeXtUNet(nnx.Module):
  """ConvNeXt encoder + `num_decoders` residual U-Net decoders (`decoders[i]`)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, num_decoders: int = 1,
               rngs: nnx.Rngs):
    """Builds the network from `config.model` (its encoder and decoder fields only)."""
    if num_decoders < 1:
      raise ValueError(f'num_decoders must be at least 1, got {num_decoders}.')
    dtype = compute_dtype(cfg.compute_dtype)
    dims = tuple(cfg.encoder_dims)
    self.encoder = ConvNeXt(depths=tuple(cfg.encoder_depths), dims=dims,
                            drop_path_rate=cfg.drop_path_rate,
                            layer_scale_init=cfg.layer_scale_init, dtype=dtype,
                            scan_blocks=bool(cfg.get('scan_blocks', False)), rngs=rngs)
    self.decoders = nnx.List([
        ResUNetDecoder(dims, tuple(cfg.decoder_dims), dtype=dtype, rngs=rngs)
        for _ in range(num_decoders)
    ])

  def __call__(self, image: jax.Array) -> tuple[jax.Array, ...]:
    """(B, H, W, 3) normalised images, H and W divisible by 32 -> per decoder (B, H, W, 1)
    float32 logits."""
    if image.ndim != 4 or image.shape[1] % 32 or image.shape[2] % 32:
      raise ValueError(f'image must be (B, H, W, 3) with H, W divisible by 32, got '
                       f'{image.shape}; set data.image_size to a multiple of 32.')
    features = tuple(self.encoder(image))
    return tuple(decoder(features).astype(jnp.float32) for decoder in self.decoders)
