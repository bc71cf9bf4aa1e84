"""PyTorch -> JAX tensor layouts used by every weight converter.

torch stores conv weights OIHW and linear weights (out, in); Flax NNX wants HWIO and
(in, out). `nnx.MultiHeadAttention` keeps per-head kernels: query/key/value
(in, heads, head_dim) and out (heads, head_dim, out).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (O, I, kh, kw) -> nnx.Conv kernel (kh, kw, I, O)."""
  if w.ndim != 4:
    raise ValueError(f'conv weight must be 4-D (O, I, kh, kw), got shape {w.shape}.')
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> nnx.Linear kernel (in, out)."""
  if w.ndim != 2:
    raise ValueError(f'linear weight must be 2-D (out, in), got shape {w.shape}.')
  return np.ascontiguousarray(w.T)


def channel_vector(v: np.ndarray) -> np.ndarray:
  """A per-channel tensor stored (C,), (C, 1, 1) or (1, C, 1, 1) -> (C,)."""
  if v.size != max(v.shape, default=1):
    raise ValueError(f'expected a per-channel vector, got shape {v.shape}.')
  return np.ascontiguousarray(v.reshape(-1))


def mha_in_kernel(w: np.ndarray, num_heads: int) -> np.ndarray:
  """One torch q/k/v projection weight (E, in) -> nnx kernel (in, heads, E // heads)."""
  e = w.shape[0]
  if w.ndim != 2 or e % num_heads:
    raise ValueError(f'projection weight {w.shape} is not (E, in) with E divisible by '
                     f'num_heads={num_heads}.')
  return np.ascontiguousarray(w.T.reshape(w.shape[1], num_heads, e // num_heads))


def mha_in_bias(b: np.ndarray, num_heads: int) -> np.ndarray:
  """One torch q/k/v projection bias (E,) -> nnx bias (heads, E // heads)."""
  if b.ndim != 1 or b.shape[0] % num_heads:
    raise ValueError(f'projection bias {b.shape} is not (E,) with E divisible by '
                     f'num_heads={num_heads}.')
  return np.ascontiguousarray(b.reshape(num_heads, -1))


def mha_out_kernel(w: np.ndarray, num_heads: int) -> np.ndarray:
  """torch output projection weight (out, E) -> nnx kernel (heads, E // heads, out)."""
  if w.ndim != 2 or w.shape[1] % num_heads:
    raise ValueError(f'output projection weight {w.shape} is not (out, E) with E divisible '
                     f'by num_heads={num_heads}.')
  return np.ascontiguousarray(w.T.reshape(num_heads, -1, w.shape[0]))


def mha_from_torch(
    in_proj_weight: np.ndarray | Sequence[np.ndarray],
    in_proj_bias: np.ndarray | Sequence[np.ndarray] | None,
    out_weight: np.ndarray,
    out_bias: np.ndarray | None,
    *,
    num_heads: int,
) -> dict[str, np.ndarray]:
  """Arrays for `nnx.MultiHeadAttention` from torch attention weights.

  `in_proj_weight` is either `nn.MultiheadAttention`'s packed (3E, E) [Wq; Wk; Wv] or three
  (E, in) weights (torch's q/k/v_proj_weight, or HF BERT's query/key/value); `in_proj_bias`
  likewise, or None. Keys are relative to the attention module: 'query/kernel'
  (in, heads, head_dim), 'query/bias' (heads, head_dim), likewise 'key/*' and 'value/*',
  'out/kernel' (heads, head_dim, out) and 'out/bias' (out,); bias keys only where biases
  exist.
  """
  if isinstance(in_proj_weight, np.ndarray):
    if in_proj_weight.ndim != 2 or in_proj_weight.shape[0] % 3:
      raise ValueError('packed in_proj_weight must be (3E, E), got shape '
                       f'{in_proj_weight.shape}.')
    weights = np.split(in_proj_weight, 3, axis=0)
  else:
    weights = list(in_proj_weight)
  if in_proj_bias is None:
    biases = [None, None, None]
  elif isinstance(in_proj_bias, np.ndarray):
    biases = np.split(in_proj_bias, 3, axis=0)
  else:
    biases = list(in_proj_bias)
  if len(weights) != 3 or len(biases) != 3:
    raise ValueError('expected three in-projection weights/biases (q, k, v).')
  out: dict[str, np.ndarray] = {}
  for name, w, b in zip(('query', 'key', 'value'), weights, biases):
    out[f'{name}/kernel'] = mha_in_kernel(w, num_heads)
    if b is not None:
      out[f'{name}/bias'] = mha_in_bias(b, num_heads)
  out['out/kernel'] = mha_out_kernel(out_weight, num_heads)
  if out_bias is not None:
    out['out/bias'] = np.ascontiguousarray(out_bias)
  return out
