"""The whole CERS network as one nnx.Module (docs/design.md section 1).

    image --ConvNeXt--> f1..f4 --TextCrossAttention(text BERT tokens)--> a1..a4
    f4, retrieved f4 maps --RetrievalFusion (paper Eq. 3)--> r
    D_r = MCAMDecoder(a1..a4, r) -> logits_r      D_s = ResUNetDecoder(a1..a4) -> logits_s
    mean(f4) -> image_proj -> image embedding;  CoT BERT pooled -> cot_proj -> CoT embedding

Retrieval is not a module but a pure function of the knowledge pool
(`cers_jax.retrieval`). `encode` and `decode` are separate so that one encoder pass serves
both the retrieval query (f4) and the decoders in the same jitted step. Eval mode is
`nnx.view(model, deterministic=True, use_running_average=True)`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cers_jax.errors import ConfigError
from cers_jax.models.bert import BertEncoder
from cers_jax.models.convnext import ConvNeXt
from cers_jax.models.decoders import MCAMDecoder
from cers_jax.models.decoders import ResUNetDecoder
from cers_jax.models.decoders import RetrievalUNetDecoder
from cers_jax.models.fusion import RetrievalFusion
from cers_jax.models.fusion import TextCrossAttention
from cers_jax.models.layers import check_depthwise, use_depthwise, xavier_uniform
from cers_jax.models.swin import SwinUNetDecoder

Array = jax.Array

_COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
POOLINGS = ('cls', 'mean')
# Sub-modules whose parameters are not in the authors' 48,728,354 count.
AUTHORS_EXCLUDED = ('text_encoder', 'cot_encoder', 'alignment')


class Encoded(NamedTuple):
  """Encoder outputs shared by retrieval and both decoders.

  `features` are the raw ConvNeXt stages f1..f4, (B, H/4, W/4, C1) ... (B, H/32, W/32, C4);
  f4 is the retrieval query and the pool's value. `attended` are the text-aware a1..a4, same
  shapes.
  """
  features: tuple[Array, Array, Array, Array]
  attended: tuple[Array, Array, Array, Array]


def compute_dtype(name: str) -> Any:
  """The jnp dtype of `config.model.compute_dtype` (parameters stay float32)."""
  if name not in _COMPUTE_DTYPES:
    raise ValueError(f'config.model.compute_dtype={name!r} is not one of '
                     f'{sorted(_COMPUTE_DTYPES)}.')
  return _COMPUTE_DTYPES[name]


def _bert(cfg: ml_collections.ConfigDict, *, dtype: Any, scan_blocks: bool,
          rngs: nnx.Rngs) -> BertEncoder:
  """A BERT from a config section; a frozen one runs without dropout (it is not trained)."""
  if not cfg.trainable:
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.dropout = 0.0
  return BertEncoder.from_config(cfg, dtype=dtype, scan_blocks=scan_blocks, rngs=rngs)


def pool_tokens(hidden: Array, mask: Array, pooling: str) -> Array:
  """(B, L, H) token features -> (B, H) float32: the [CLS] token, or the mean of real tokens.

  A randomly initialised BERT's [CLS] output hardly depends on the text (the same token at
  the same position, little attention mass from the rest), so CoTs are told apart by the
  mean; sentence encoders such as all-MiniLM-L6-v2 were trained for the mean too.
  """
  if pooling == 'cls':
    return hidden[:, 0].astype(jnp.float32)
  if pooling != 'mean':
    raise ValueError(f'config.model.cot.pooling={pooling!r} is not one of {POOLINGS}.')
  weight = (mask != 0).astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * weight, axis=1)
  return total / jnp.maximum(jnp.sum(weight, axis=1), 1.0)


def unit_rows(x: Array) -> Array:
  """Row-wise L2 normalisation in float32 (torch F.normalize, eps 1e-12)."""
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


class Alignment(nnx.Module):
  """CLIP-style projections of image (C4) and CoT (H_cot) features, and the logit scale."""

  def __init__(self, image_dim: int, cot_dim: int, embed_dim: int, logit_scale_init: float,
               *, dtype: Any = None, rngs: nnx.Rngs):
    self.image_proj = nnx.Linear(image_dim, embed_dim, use_bias=False, dtype=dtype,
                                 kernel_init=xavier_uniform(), rngs=rngs)
    self.cot_proj = nnx.Linear(cot_dim, embed_dim, use_bias=False, dtype=dtype,
                               kernel_init=xavier_uniform(), rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(logit_scale_init, jnp.float32))


DECODERS = ('mcam', 'unet', 'swin_unet')  # model.decoder: D_r (paper Table 3).


def _decoder_kind(cfg) -> str:
  kind = cfg.get('decoder', 'mcam')  # .get: configs written before the switch existed.
  if kind not in DECODERS:
    raise ConfigError(f'--config.model.decoder={kind!r}: choose one of {DECODERS}.')
  dims = tuple(cfg.encoder_dims)
  if kind == 'swin_unet' and any(dims[i + 1] != 2 * dims[i] for i in range(len(dims) - 1)):
    raise ConfigError(f'--config.model.decoder=swin_unet reads the encoder stages as Swin '
                      f'widths (C, 2C, 4C, 8C); --config.model.encoder_dims={dims} are not.')
  return kind


def _decoder_r(cfg, kind: str, dims: tuple[int, ...], *, dtype,
               rngs: nnx.Rngs) -> nnx.Module:
  """D_r of `kind` (`_decoder_kind`); `model.mcam.*` switch MCAM's parts."""
  if kind == 'unet':
    return RetrievalUNetDecoder(dims, tuple(cfg.decoder_dims), dtype=dtype, rngs=rngs)
  if kind == 'swin_unet':  # Swin-UNet's own widths: the encoder's (decoder_dims unused).
    return SwinUNetDecoder(dims, dtype=dtype, rngs=rngs)
  mcam = cfg.get('mcam', {})
  return MCAMDecoder(dims, tuple(cfg.decoder_dims), reduction=cfg.coord_reduction,
                     coord_attention=bool(mcam.get('coord_attention', True)),
                     multi_scale=bool(mcam.get('multi_scale', True)), dtype=dtype, rngs=rngs)


class CERS(nnx.Module):
  """CERS: ConvNeXt + text BERT + cross-attention, retrieval fusion, two decoders.

  `decoder_r` is the retrieval-aware D_r, `decoder_s` the standard D_s.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """Builds the network from `config.model` (configs/base.py)."""
    dtype = compute_dtype(cfg.compute_dtype)
    dims = tuple(cfg.encoder_dims)
    # .get: a workdir's config.json written before the switch existed lacks the field.
    scan = bool(cfg.get('scan_blocks', False))
    self.text_trainable = bool(cfg.text.trainable)
    self.cot_trainable = bool(cfg.cot.trainable)
    self.cot_pooling = str(cfg.cot.pooling)
    decoder_kind = _decoder_kind(cfg)  # Refused before minutes of initialising the encoders.
    # .get: a workdir's config.json written before the switch existed lacks the field.
    depthwise = check_depthwise(str(cfg.get('depthwise', 'conv')))
    if self.cot_pooling not in POOLINGS:
      raise ValueError(f'config.model.cot.pooling={self.cot_pooling!r} is not one of '
                       f'{POOLINGS}.')
    self.encoder = ConvNeXt(depths=tuple(cfg.encoder_depths), dims=dims,
                            drop_path_rate=cfg.drop_path_rate,
                            layer_scale_init=cfg.layer_scale_init, dtype=dtype,
                            scan_blocks=scan, rngs=rngs)
    self.text_encoder = _bert(cfg.text, dtype=dtype, scan_blocks=scan, rngs=rngs)
    self.cross_attns = nnx.List([
        TextCrossAttention(c, cfg.text.hidden_size, cfg.attn_dim, cfg.attn_heads,
                           dtype=dtype, rngs=rngs) for c in dims
    ])
    self.fusion = RetrievalFusion(dims[3], cfg.attn_heads, dropout=cfg.fusion_dropout,
                                  dtype=dtype, rngs=rngs)
    self.decoder_r = _decoder_r(cfg, decoder_kind, dims, dtype=dtype, rngs=rngs)
    self.decoder_s = ResUNetDecoder(dims, tuple(cfg.decoder_dims), dtype=dtype, rngs=rngs)
    self.alignment = Alignment(dims[3], cfg.cot.hidden_size, cfg.embed_dim,
                               cfg.logit_scale_init, dtype=dtype, rngs=rngs)
    self.cot_encoder = _bert(cfg.cot, dtype=dtype, scan_blocks=scan, rngs=rngs)
    use_depthwise(self, depthwise)

  def f4_shape(self, image_size: int) -> tuple[int, int, int]:
    """(h, w, C4) of f4 for square images of `image_size`: a pool row's map shape.

    Computed with jax.eval_shape: nothing is allocated or run.
    """
    zeros = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return tuple(jax.eval_shape(lambda m, x: m.encoder(x)[-1], self, zeros).shape[1:])

  def encode(self, image: Array, text_ids: Array, text_mask: Array) -> Encoded:
    """Image and text encoders plus the per-stage text cross-attention.

    `image` is (B, H, W, 3), normalised, with H and W divisible by 32; `text_ids` and
    `text_mask` are (B, L), the mask 1 for real tokens.
    """
    if image.ndim != 4 or image.shape[1] % 32 or image.shape[2] % 32:
      raise ValueError(f'image must be (B, H, W, 3) with H, W divisible by 32, got '
                       f'{image.shape}; set data.image_size to a multiple of 32.')
    features = self.encoder(image)
    text = self.text_encoder(text_ids, text_mask)
    if not self.text_trainable:
      text = jax.lax.stop_gradient(text)
    attended = tuple(att(f, text, text_mask) for att, f in zip(self.cross_attns, features))
    return Encoded(features=tuple(features), attended=attended)

  def decode(self, encoded: Encoded, retrieved: Array | None = None) -> tuple[Array, Array]:
    """(logits_r, logits_s), each (B, H, W, 1) float32.

    `retrieved` is (B, k, h, w, C4), the raw f4 maps of the k reference cases, or None
    (warm-up, pool mode 'none'): then D_r's deepest block gets no retrieval stream.
    """
    rag = None if retrieved is None else self.fusion(encoded.features[3], retrieved)
    logits_r = self.decoder_r(encoded.attended, rag)
    logits_s = self.decoder_s(encoded.attended)
    return logits_r.astype(jnp.float32), logits_s.astype(jnp.float32)

  def __call__(self, image: Array, text_ids: Array, text_mask: Array,
               retrieved: Array | None = None) -> tuple[Array, Array, Array]:
    """`encode` then `decode`: (logits_r, logits_s, f4), f4 being (B, H/32, W/32, C4)."""
    encoded = self.encode(image, text_ids, text_mask)
    logits_r, logits_s = self.decode(encoded, retrieved)
    return logits_r, logits_s, encoded.features[3]

  def image_embedding(self, f4: Array) -> Array:
    """(B, h, w, C4) f4 -> (B, embed_dim) unit-norm float32 (spatial mean, then projection)."""
    return unit_rows(self.alignment.image_proj(jnp.mean(f4, axis=(1, 2))))

  def cot_features(self, ids: Array, mask: Array) -> Array:
    """CoT token ids (B, L) and mask (B, L) -> (B, H_cot) pooled CoT BERT features.

    Pooling is config.model.cot.pooling ([CLS] or mean). Gradients stop here while the
    CoT BERT is frozen (config.model.cot.trainable=False).
    """
    pooled = pool_tokens(self.cot_encoder(ids, mask), mask, self.cot_pooling)
    return pooled if self.cot_trainable else jax.lax.stop_gradient(pooled)

  def cot_embedding(self, cls_features: Array) -> Array:
    """(B, H_cot) [CLS] features -> (B, embed_dim) unit-norm float32 CoT embeddings."""
    return unit_rows(self.alignment.cot_proj(cls_features))


def count_params(model: nnx.Module, *, exclude: tuple[str, ...] = AUTHORS_EXCLUDED) -> int:
  """Number of trainable parameter scalars (nnx.Param; BatchNorm statistics excluded).

  Works on an `nnx.eval_shape` abstract model too. The default `exclude` leaves out what the
  authors' 48,728,354 count leaves out: both BERTs and the alignment projections.
  """
  total = 0
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path and str(path[0]) in exclude:
      continue
    total += math.prod(value.shape)
  return total
