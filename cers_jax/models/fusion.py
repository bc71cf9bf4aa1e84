"""Cross-attention fusion modules of CERS (docs/design.md sections 3 and 6).

`TextCrossAttention` lets each encoder map f_i attend to the report-text tokens; the result
a_i feeds both decoders (golden fixture `cross_attention_block`). `RetrievalFusion` is paper
Eq. 3: the raw f4 tokens attend to the k retrieved f4 maps and a sigmoid gate decides how
much of that evidence enters (golden fixture `spatial_rag_fusion`). Both use
`nnx.MultiHeadAttention` with their own in- and out-projections, as torch's
`nn.MultiheadAttention` has.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cers_jax.models.layers import xavier_uniform
from cers_jax.models.layers import xavier_uniform_fans

Array = jax.Array
Dtype = Any

# torch.nn.LayerNorm's default epsilon; the fixtures pin every norm in these modules to it.
_LN_EPS = 1e-5


def multi_head_attention(
    embed_dim: int,
    num_heads: int,
    *,
    dropout: float,
    dtype: Dtype | None,
    rngs: nnx.Rngs,
) -> nnx.MultiHeadAttention:
  """`nnx.MultiHeadAttention` laid out like torch `nn.MultiheadAttention(E, heads)`.

  Attention-weight dropout is per element (torch shares no mask across batch and heads) and
  active until `nnx.view(..., deterministic=True)` turns it off.
  """
  if embed_dim % num_heads:
    raise ValueError(
        f'attention width {embed_dim} is not divisible by num_heads={num_heads}; '
        'choose model.attn_dim / encoder_dims divisible by model.attn_heads.')
  return nnx.MultiHeadAttention(
      num_heads=num_heads,
      in_features=embed_dim,
      qkv_features=embed_dim,
      out_features=embed_dim,
      dtype=dtype,
      broadcast_dropout=False,
      dropout_rate=dropout,
      deterministic=False,
      # torch initialises the packed (3E, E) in_proj_weight as one matrix: fans E and 3E.
      kernel_init=xavier_uniform_fans(embed_dim, 3 * embed_dim),
      # LinearGeneral initialises its kernels flattened to 2-D, so plain fans are torch's.
      out_kernel_init=xavier_uniform(),
      decode=False,
      rngs=rngs,
  )


def _conv1x1(
    in_features: int, out_features: int, *, dtype: Dtype | None, rngs: nnx.Rngs
) -> nnx.Conv:
  return nnx.Conv(in_features, out_features, (1, 1), dtype=dtype,
                  kernel_init=xavier_uniform(), rngs=rngs)


class TextCrossAttention(nnx.Module):
  """Image tokens attend to report-text tokens.

  q = conv1x1(C -> A)(f) as H*W tokens, k = Linear(H_t -> A)(text), v = Linear(H_t -> A)
  (text); multi-head attention with its own projections, padding tokens masked; back to
  (H, W, A) -> conv1x1(A -> C); y = gamma * that + f (gamma a scalar, init 0, so a fresh
  block passes f through); LayerNorm over channels.
  """

  def __init__(
      self,
      in_channels: int,
      text_dim: int,
      attn_dim: int,
      num_heads: int,
      *,
      dtype: Dtype | None = None,
      rngs: nnx.Rngs,
  ):
    self.q_proj = _conv1x1(in_channels, attn_dim, dtype=dtype, rngs=rngs)
    self.k_proj = nnx.Linear(text_dim, attn_dim, dtype=dtype,
                             kernel_init=xavier_uniform(), rngs=rngs)
    self.v_proj = nnx.Linear(text_dim, attn_dim, dtype=dtype,
                             kernel_init=xavier_uniform(), rngs=rngs)
    self.mha = multi_head_attention(attn_dim, num_heads, dropout=0.0, dtype=dtype,
                                    rngs=rngs)
    self.out_proj = _conv1x1(attn_dim, in_channels, dtype=dtype, rngs=rngs)
    self.gamma = nnx.Param(jnp.zeros((1,), jnp.float32))
    self.norm = nnx.LayerNorm(in_channels, epsilon=_LN_EPS, dtype=dtype, rngs=rngs)

  def __call__(self, feat: Array, text: Array, text_mask: Array) -> Array:
    """(B, H, W, C) features, (B, L, H_t) text tokens, (B, L) mask -> (B, H, W, C)."""
    b, h, w, _ = feat.shape
    q = self.q_proj(feat)
    q = q.reshape(b, h * w, q.shape[-1])
    k = self.k_proj(text)
    v = self.v_proj(text)
    # (B, 1, 1, L): every head and every query sees the same key-padding mask.
    mask = text_mask.astype(bool)[:, None, None, :]
    att = self.mha(q, k, v, mask=mask)
    att = self.out_proj(att.reshape(b, h, w, att.shape[-1]))
    y = self.gamma[...].astype(att.dtype) * att + feat
    return self.norm(y)


class RetrievalFusion(nnx.Module):
  """Retrieval cross-attention, paper Eq. 3.

  q = LN_q(f4), kv = LN_kv(retrieved) as k*h*w tokens, att = MHA(q, kv, kv);
  gate = sigmoid(Linear(2C -> C)([f4 ; att])) with the un-normalised f4;
  r = conv1x1(f4 + gate * att).
  """

  def __init__(
      self,
      channels: int,
      num_heads: int,
      *,
      dropout: float = 0.1,
      dtype: Dtype | None = None,
      rngs: nnx.Rngs,
  ):
    self.norm_q = nnx.LayerNorm(channels, epsilon=_LN_EPS, dtype=dtype, rngs=rngs)
    self.norm_kv = nnx.LayerNorm(channels, epsilon=_LN_EPS, dtype=dtype, rngs=rngs)
    self.cross_attn = multi_head_attention(channels, num_heads, dropout=dropout,
                                           dtype=dtype, rngs=rngs)
    self.gate = nnx.Linear(2 * channels, channels, dtype=dtype,
                           kernel_init=xavier_uniform(), rngs=rngs)
    self.out_proj = _conv1x1(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, f4: Array, retrieved: Array) -> Array:
    """(B, h, w, C) f4 and (B, k, h', w', C) retrieved maps -> r, (B, h, w, C).

    h', w' may differ from h, w: the retrieved maps are only keys and values.
    """
    if retrieved.ndim != 5 or retrieved.shape[-1] != f4.shape[-1]:
      raise ValueError(
          f'retrieved must be (B, k, h, w, C={f4.shape[-1]}) f4 maps, got shape '
          f'{retrieved.shape}; pass the pool `feat` rows gathered per query.')
    b, h, w, c = f4.shape
    q = self.norm_q(f4.reshape(b, h * w, c))
    kv = self.norm_kv(retrieved.reshape(b, -1, c))
    att = self.cross_attn(q, kv, kv).reshape(b, h, w, c)
    gate = jax.nn.sigmoid(self.gate(jnp.concatenate([f4.astype(att.dtype), att], -1)))
    return self.out_proj(f4 + gate * att)
