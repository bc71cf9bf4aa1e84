"""BERT text encoder with HF `BertModel` semantics, without the pooler (docs/design.md section 3).

Used twice in CERS: for the report text (CXR-BERT in the paper; its tokens feed the text
cross-attention) and for the chain-of-thought (Bio_ClinicalBERT; pooled for the CoT
projection). Post-LayerNorm, LayerNorm eps 1e-12, exact GELU, absolute positions, padding
keys masked. Attribute names are relied on by `cers_jax.convert.bert`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cers_jax.models import stack
from cers_jax.models.layers import gelu_exact, trunc_normal

_LN_EPS = 1e-12


def _layer_norm(dim: int, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=_LN_EPS, use_fast_variance=False, dtype=dtype,
                       rngs=rngs)


class BertLayer(nnx.Module):
  """Self-attention + feed-forward, each followed by dropout, residual and LayerNorm."""

  def __init__(self, *, hidden_size: int, num_heads: int, intermediate_size: int,
               dropout: float, dtype: Any = None, rngs: nnx.Rngs):
    init = trunc_normal(0.02)
    # HF drops attention probabilities elementwise, so broadcast_dropout=False.
    self.attention = nnx.MultiHeadAttention(
        num_heads, hidden_size, decode=False, dropout_rate=dropout, broadcast_dropout=False,
        deterministic=False, kernel_init=init, dtype=dtype, rngs=rngs)
    self.attention_norm = _layer_norm(hidden_size, dtype, rngs)
    self.intermediate = nnx.Linear(hidden_size, intermediate_size, kernel_init=init,
                                   dtype=dtype, rngs=rngs)
    self.output = nnx.Linear(intermediate_size, hidden_size, kernel_init=init, dtype=dtype,
                             rngs=rngs)
    self.output_norm = _layer_norm(hidden_size, dtype, rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, L, H), (B, 1, 1, L) bool -> (B, L, H)."""
    attended = self.attention(x, mask=mask)
    x = self.attention_norm(x + self.dropout(attended))
    y = self.output(gelu_exact(self.intermediate(x)))
    return self.output_norm(x + self.dropout(y))


class BertEncoder(nnx.Module):
  """Embeddings + a stack of `BertLayer`; returns the last hidden state."""

  def __init__(self, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
               intermediate_size: int, max_position: int = 512, type_vocab_size: int = 2,
               dropout: float = 0.1, dtype: Any = None, scan_blocks: bool = False,
               rngs: nnx.Rngs):
    """Arguments follow HF `BertConfig` (`num_layers` is `num_hidden_layers`, `max_position`
    `max_position_embeddings`; `dropout` is both hidden and attention-probability dropout).
    `scan_blocks` runs the layers as one lax.scan (`cers_jax.models.stack`): the same
    outputs and parameters, one HLO body instead of one per layer.
    """
    if hidden_size % num_heads:
      raise ValueError(f'hidden_size {hidden_size} is not divisible by num_heads {num_heads}.')
    init = trunc_normal(0.02)
    self.max_position = max_position
    self.word_embeddings = nnx.Embed(vocab_size, hidden_size, embedding_init=init,
                                     dtype=dtype, rngs=rngs)
    self.position_embeddings = nnx.Embed(max_position, hidden_size, embedding_init=init,
                                         dtype=dtype, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(type_vocab_size, hidden_size,
                                           embedding_init=init, dtype=dtype, rngs=rngs)
    self.embed_norm = _layer_norm(hidden_size, dtype, rngs)
    self.embed_dropout = nnx.Dropout(dropout, rngs=rngs)
    self.layers = nnx.List([
        BertLayer(hidden_size=hidden_size, num_heads=num_heads,
                  intermediate_size=intermediate_size, dropout=dropout, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)])
    self.scan_blocks = scan_blocks

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, *, dtype: Any = None,
                  scan_blocks: bool = False, rngs: nnx.Rngs) -> BertEncoder:
    """A fresh encoder from `config.model.text` or `config.model.cot`."""
    return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
               num_layers=cfg.num_layers, num_heads=cfg.num_heads,
               intermediate_size=cfg.intermediate_size, max_position=cfg.max_position,
               type_vocab_size=cfg.type_vocab_size, dropout=cfg.dropout, dtype=dtype,
               scan_blocks=scan_blocks, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """(B, L) token ids and mask (nonzero = real token) -> (B, L, H) last hidden state.

    Padding positions hold values too (they attend to the real tokens, as in HF), but no real
    position attends to them. `token_type_ids` default to zeros.
    """
    length = input_ids.shape[1]
    if length > self.max_position:
      raise ValueError(f'Sequence length {length} exceeds max_position {self.max_position}; '
                       'truncate the tokens (data.max_text_len / data.max_cot_len).')
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    positions = jnp.arange(length)[None, :]
    x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
         + self.position_embeddings(positions))
    x = self.embed_dropout(self.embed_norm(x))
    mask = (attention_mask != 0)[:, None, None, :]
    if self.scan_blocks and len(self.layers) > 1:
      return stack.scan_blocks(self.layers, x, lambda layer, carry, _: layer(carry, mask))
    for layer in self.layers:
      x = layer(x, mask)
    return x
