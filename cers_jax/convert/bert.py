"""HF BERT checkpoints (BertModel, BertForMaskedLM, CXR-BERT, MiniLM ...) -> `BertEncoder`.

The BERT is found wherever it sits ('bert.', 'text_encoder.bert.', the root) by its
word-embedding name. The pooler, MLM heads ('cls.*'), position-id buffers and anything
outside the BERT are reported as ignored: the encoder (docs/design.md section 3) returns token
features only.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping

import numpy as np
from absl import logging
from flax import nnx

from cers_jax.convert import layout
from cers_jax.convert.assign import LoadReport, find_prefix, load_into
from cers_jax.convert.io import read_state_dict

_MARKER = 'embeddings.word_embeddings.weight'
_IGNORE = re.compile(r'(pooler\..*|cls\..*|embeddings\.position_ids)')
# Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
_NORM_PARAM = {'weight': 'scale', 'gamma': 'scale', 'bias': 'bias', 'beta': 'bias'}
_EMBEDDINGS = {'word_embeddings', 'position_embeddings', 'token_type_embeddings'}
_LAYER = re.compile(r'encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)')
_LINEARS = {'intermediate.dense': 'intermediate', 'output.dense': 'output'}
_NORMS = {'attention.output.LayerNorm': 'attention_norm', 'output.LayerNorm': 'output_norm'}
_QKV = {'attention.self.query': 'query', 'attention.self.key': 'key',
        'attention.self.value': 'value'}


def _map_name(name: str, value: np.ndarray,
              num_heads: int) -> tuple[str, np.ndarray] | None:
  """(nnx path, array) for one BertModel tensor name, or None if unknown."""
  parts = name.split('.')
  if len(parts) == 3 and parts[0] == 'embeddings':
    if parts[1] in _EMBEDDINGS and parts[2] == 'weight':
      return f'{parts[1]}/embedding', value
    if parts[1] == 'LayerNorm' and parts[2] in _NORM_PARAM:
      return f'embed_norm/{_NORM_PARAM[parts[2]]}', value
    return None
  m = _LAYER.fullmatch(name)
  if m is None:
    return None
  layer, module, param = m.groups()
  base = f'layers/{layer}'
  if module in _NORMS and param in _NORM_PARAM:
    return f'{base}/{_NORMS[module]}/{_NORM_PARAM[param]}', value
  if param not in ('weight', 'bias'):
    return None
  to_param: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]
  if module in _LINEARS:
    base, to_param = f'{base}/{_LINEARS[module]}', {
        'weight': ('kernel', layout.linear_kernel), 'bias': ('bias', np.asarray)}
  elif module in _QKV:
    base, to_param = f'{base}/attention/{_QKV[module]}', {
        'weight': ('kernel', functools.partial(layout.mha_in_kernel, num_heads=num_heads)),
        'bias': ('bias', functools.partial(layout.mha_in_bias, num_heads=num_heads))}
  elif module == 'attention.output.dense':
    base, to_param = f'{base}/attention/out', {
        'weight': ('kernel', functools.partial(layout.mha_out_kernel, num_heads=num_heads)),
        'bias': ('bias', np.asarray)}
  else:
    return None
  param_name, fn = to_param[param]
  return f'{base}/{param_name}', fn(value)


def _convert(sd: Mapping[str, np.ndarray], num_heads: int, prefix: str | None,
             source: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """Mapped weights (unrecognised names kept as-is, so loading reports them) and ignored."""
  prefix = find_prefix(sd, _MARKER, prefix=prefix, what='BERT', source=source)
  out: dict[str, np.ndarray] = {}
  ignored: list[str] = []
  for key, value in sd.items():
    if not key.startswith(prefix):
      ignored.append(key)
      continue
    name = key[len(prefix):]
    if _IGNORE.fullmatch(name):
      ignored.append(key)
      continue
    mapped = _map_name(name, value, num_heads)
    if mapped is None:
      out[key] = value
    else:
      out[mapped[0]] = mapped[1]
  logging.info('%s: BERT under prefix %r; %d tensors ignored.', source, prefix, len(ignored))
  return out, ignored


def bert_weights(sd: Mapping[str, np.ndarray], *, num_heads: int,
                 prefix: str | None = None) -> dict[str, np.ndarray]:
  """Maps a torch-layout HF BertModel state dict onto `BertEncoder`'s nnx paths.

  `num_heads` is needed for the per-head kernels (the state dict does not record it);
  `prefix` None detects where the BertModel sits. Unrecognised names under the prefix are
  kept as-is, so loading reports them as unexpected.
  """
  return _convert(sd, num_heads, prefix, '<state dict>')[0]


def load_bert(module: nnx.Module, path_or_sd: str | os.PathLike[str] | Mapping[str, np.ndarray],
              *, strict: bool = True, prefix: str | None = None) -> LoadReport:
  """Loads a pretrained BERT (file, HF directory or state dict) into a `BertEncoder` in place.

  The report lists pooler, MLM heads, buffers and other sub-models under `ignored`.
  """
  if isinstance(path_or_sd, Mapping):
    sd, source = path_or_sd, '<state dict>'
  else:
    sd, source = read_state_dict(path_or_sd), os.fspath(path_or_sd)
  num_heads = module.layers[0].attention.num_heads if len(module.layers) else 1
  weights, ignored = _convert(sd, num_heads, prefix, source)
  return load_into(module, weights, strict=strict, source=source, ignored=ignored)
