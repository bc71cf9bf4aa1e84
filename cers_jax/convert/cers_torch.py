"""Import the authors' whole PyTorch CERS state dict into `cers_jax.models.cers.CERS`.

The authors' `model/CERS.py` names (listed with shapes in
shared/reference/cers_torch_state_dict.json) map onto CERS's nnx paths:

    encoder.stageK.0 / .1      -> encoder/...  (torchvision `features.{2K-2}` / `{2K-1}`)
    text_encoder.bert.*        -> text_encoder/...  (`bert_weights`)
    cross_attns.i.*            -> cross_attns/i/...        (TextCrossAttention)
    fusion_module.*            -> fusion/...               (RetrievalFusion, paper Eq. 3)
    decoder_leftN.*            -> decoder_r/blocks/{4-N}/... (MCAMBlock, deepest first)
    final_conv_left.*          -> decoder_r/head/...
    decoder_rightN.*           -> decoder_s/blocks/{4-N}/... (ResUNetBlock)
    final_conv_right.*         -> decoder_s/head/...

BatchNorm running statistics become the BatchStat `mean` / `var`; `num_batches_tracked`
counters are ignored. Their state dict has no alignment projections, no CoT BERT and no
knowledge pool: a strict load fills exactly the sub-modules their model has, and
`run.py --mode eval|predict --config.model.checkpoint=FILE` rebuilds the pool from the
labeled training images with the imported encoder. Their pool keeps each f4 map flattened
from NCHW, (C, h, w) order, where ours keeps (h, w, C): `authors_pool_feat` converts.

The per-module converters take a state dict with the module's own torch names, as the
golden fixtures store them. Every converter passes names it does not know through
unchanged, so `load_into` reports them as unexpected rather than dropping them silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx

from cers_jax.convert import layout
from cers_jax.convert.assign import LoadReport
from cers_jax.convert.assign import load_into
from cers_jax.convert.bert import bert_weights
from cers_jax.convert.convnext import convnext_weights
from cers_jax.convert.io import read_state_dict

StateDict = Mapping[str, np.ndarray]

_IGNORED_SUFFIX = 'num_batches_tracked'
_TEXT_BERT = 'text_encoder.bert.'
# What `bert_weights` drops on purpose (BERT pooler, MLM heads, position-id buffer).
_TEXT_IGNORED = re.compile(
    re.escape(_TEXT_BERT) + r'(pooler\..*|cls\..*|embeddings\.position_ids)')
# Sub-modules of CERS that the authors' state dict holds, in its order.
AUTHORS_SUBMODULES = ('encoder', 'text_encoder', 'cross_attns', 'fusion', 'decoder_r',
                      'decoder_s')


class _Reader:
  """Reads a torch state dict by module-relative names and remembers what it used."""

  def __init__(self, sd: StateDict):
    self.sd = sd
    self.used: set[str] = set()

  def get(self, name: str) -> np.ndarray | None:
    if name in self.sd:
      self.used.add(name)
      return np.asarray(self.sd[name])
    return None

  def finish(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds every unused, non-ignored tensor under its torch name (-> unexpected)."""
    for name, value in self.sd.items():
      if name not in self.used and not name.endswith(_IGNORED_SUFFIX):
        out[name] = np.asarray(value)
    return out


def _put(out: dict[str, np.ndarray], path: str, value: np.ndarray | None) -> None:
  # An absent tensor is left out, so `load_into` names the module path as missing.
  if value is not None:
    out[path] = value


def _conv(r: _Reader, out: dict[str, np.ndarray], dst: str, src: str) -> None:
  w = r.get(f'{src}.weight')
  _put(out, f'{dst}/kernel', None if w is None else layout.conv_kernel(w))
  _put(out, f'{dst}/bias', r.get(f'{src}.bias'))


def _linear(r: _Reader, out: dict[str, np.ndarray], dst: str, src: str) -> None:
  w = r.get(f'{src}.weight')
  _put(out, f'{dst}/kernel', None if w is None else layout.linear_kernel(w))
  _put(out, f'{dst}/bias', r.get(f'{src}.bias'))


def _norm(r: _Reader, out: dict[str, np.ndarray], dst: str, src: str) -> None:
  """LayerNorm or BatchNorm: affine -> scale/bias; running stats -> BatchStat mean/var."""
  _put(out, f'{dst}/scale', r.get(f'{src}.weight'))
  _put(out, f'{dst}/bias', r.get(f'{src}.bias'))
  _put(out, f'{dst}/mean', r.get(f'{src}.running_mean'))
  _put(out, f'{dst}/var', r.get(f'{src}.running_var'))


def _mha(r: _Reader, out: dict[str, np.ndarray], dst: str, src: str,
         num_heads: int) -> None:
  names = [f'{src}.{n}' for n in ('in_proj_weight', 'in_proj_bias', 'out_proj.weight',
                                  'out_proj.bias')]
  arrays = [r.get(n) for n in names]
  if any(a is None for a in arrays):
    return  # load_into then names every attention path as missing.
  for key, value in layout.mha_from_torch(*arrays, num_heads=num_heads).items():
    out[f'{dst}/{key}'] = value


def ignored_names(sd: StateDict) -> tuple[str, ...]:
  """The torch names skipped on purpose: BatchNorm `num_batches_tracked` counters, and the text
  BERT's pooler / MLM head / position-id buffer should a checkpoint carry them.
  """
  return tuple(sorted(k for k in sd
                      if k.endswith(_IGNORED_SUFFIX) or _TEXT_IGNORED.fullmatch(k)))


def text_cross_attention_weights(sd: StateDict, *, num_heads: int) -> dict[str, np.ndarray]:
  """The authors' `CrossAttentionBlock` -> `TextCrossAttention` paths (8 heads in CERS)."""
  r, out = _Reader(sd), {}
  _put(out, 'gamma', r.get('gamma'))
  _conv(r, out, 'q_proj', 'q_proj')
  _linear(r, out, 'k_proj', 'k_proj')
  _linear(r, out, 'v_proj', 'v_proj')
  _mha(r, out, 'mha', 'mha', num_heads)
  _conv(r, out, 'out_proj', 'out_proj')
  _norm(r, out, 'norm', 'norm')
  return r.finish(out)


def retrieval_fusion_weights(sd: StateDict, *, num_heads: int) -> dict[str, np.ndarray]:
  """The authors' `SpatialRAGFusionModule` -> `RetrievalFusion` paths."""
  r, out = _Reader(sd), {}
  _mha(r, out, 'cross_attn', 'cross_attn', num_heads)
  _norm(r, out, 'norm_q', 'norm_q')
  _norm(r, out, 'norm_kv', 'norm_kv')
  _linear(r, out, 'gate', 'gate.0')
  _conv(r, out, 'out_proj', 'out_proj')
  return r.finish(out)


def _coord_gate(r: _Reader, out: dict[str, np.ndarray], dst: str, src: str) -> None:
  _conv(r, out, f'{dst}conv1', f'{src}conv1')
  _norm(r, out, f'{dst}bn1', f'{src}bn1')
  _conv(r, out, f'{dst}conv_h', f'{src}conv_h')
  _conv(r, out, f'{dst}conv_w', f'{src}conv_w')
  _conv(r, out, f'{dst}out_conv', f'{src}out_conv.0')
  _norm(r, out, f'{dst}out_bn', f'{src}out_conv.1')


def coord_gate_weights(sd: StateDict) -> dict[str, np.ndarray]:
  """The authors' `CoordAttGatedFusion` -> `CoordAttGatedFusion` paths."""
  r, out = _Reader(sd), {}
  _coord_gate(r, out, '', '')
  return r.finish(out)


def mcam_block_weights(sd: StateDict) -> dict[str, np.ndarray]:
  """The authors' MCAM `DecoderBlock` -> `MCAMBlock` paths."""
  r, out = _Reader(sd), {}
  _conv(r, out, 'conv_main', 'conv_main.0')
  _conv(r, out, 'conv_rag', 'conv_rag.0')
  _coord_gate(r, out, 'coord_gate/', 'CAGF.')
  for t in ('main', 'rag', 'shared'):
    _conv(r, out, f'dw_{t}', f'out_conv_{t}_1')
    _norm(r, out, f'ln_{t}', f'out_ln_{t}')
    _conv(r, out, f'expand_{t}', f'out_conv_{t}_2')
  for t in ('main', 'rag'):
    _conv(r, out, f'project_{t}', f'out_conv_{t}_3')
  return r.finish(out)


def resunet_block_weights(sd: StateDict) -> dict[str, np.ndarray]:
  """The authors' `ResUNetDecoderBlock` -> `ResUNetBlock` paths."""
  r, out = _Reader(sd), {}
  _conv(r, out, 'conv1', 'conv1.0')
  _norm(r, out, 'bn1', 'conv1.1')
  _conv(r, out, 'conv2', 'conv2.0')
  _norm(r, out, 'bn2', 'conv2.1')
  _conv(r, out, 'shortcut_conv', 'shortcut.0')
  _norm(r, out, 'shortcut_bn', 'shortcut.1')
  return r.finish(out)


def head_weights(sd: StateDict) -> dict[str, np.ndarray]:
  """The authors' `final_conv_left/right` Sequential -> `SegmentationHead` paths."""
  r, out = _Reader(sd), {}
  _conv(r, out, 'conv', '0')
  _norm(r, out, 'bn', '1')
  _conv(r, out, 'out', '3')
  return r.finish(out)


def _strip(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


_ENCODER_STAGE = re.compile(r'^encoder\.stage([1-4])\.([01])\.(.*)$')


def _encoder_as_torchvision(sd: StateDict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """encoder.stageK.{0,1}.* -> features.{2K-2,2K-1}.*; returns (renamed, new -> old name)."""
  out, original = {}, {}
  for key, value in sd.items():
    m = _ENCODER_STAGE.match(key)
    # A name outside the stages keeps its name: the ConvNeXt converter passes it on.
    new = f'features.{2 * int(m.group(1)) - 2 + int(m.group(2))}.{m.group(3)}' if m else key
    out[new], original[new] = value, key
  return out, original


_BLOCK = re.compile(r'^(decoder_left|decoder_right)([1-4])\.')
_SINGLE = {'fusion_module.': 'fusion/', 'final_conv_left.': 'decoder_r/head/',
           'final_conv_right.': 'decoder_s/head/'}


def _group_of(key: str) -> str | None:
  """The authors' sub-module a tensor belongs to, as its name prefix; None if unknown."""
  m = _BLOCK.match(key)
  if m:
    return m.group(0)
  if key.startswith(_TEXT_BERT):
    return _TEXT_BERT
  head = key.split('.', 2)
  if head[0] == 'cross_attns' and len(head) == 3 and head[1].isdigit():
    return f'cross_attns.{head[1]}.'
  if head[0] == 'encoder' or f'{head[0]}.' in _SINGLE:
    return f'{head[0]}.'
  return None


def _convert_group(group: str, tensors: StateDict, *, attn_heads: int, text_heads: int
                   ) -> tuple[str, dict[str, np.ndarray], Callable[[str], str]]:
  """(nnx prefix, converted tensors, torch name of a name the converter passed on)."""
  local = _strip(tensors, group)

  def back(name: str) -> str:
    return group + name

  if group == 'encoder.':
    renamed, original = _encoder_as_torchvision(tensors)
    return 'encoder/', convnext_weights(renamed), lambda name: original.get(name, name)
  if group == _TEXT_BERT:
    return 'text_encoder/', bert_weights(local, num_heads=text_heads, prefix=''), back
  if group.startswith('cross_attns.'):
    converted = text_cross_attention_weights(local, num_heads=attn_heads)
    return f'cross_attns/{group.split(".")[1]}/', converted, back
  if group == 'fusion_module.':
    return _SINGLE[group], retrieval_fusion_weights(local, num_heads=attn_heads), back
  if group in _SINGLE:
    return _SINGLE[group], head_weights(local), back
  m = _BLOCK.match(group)
  block = 4 - int(m.group(2))
  if m.group(1) == 'decoder_left':
    return f'decoder_r/blocks/{block}/', mcam_block_weights(local), back
  return f'decoder_s/blocks/{block}/', resunet_block_weights(local), back


def cers_weights(sd: StateDict, *, attn_heads: int = 8,
                 text_heads: int = 12) -> dict[str, np.ndarray]:
  """Maps the authors' whole CERS state dict onto CERS's nnx paths (JAX layout).

  `attn_heads` is config.model.attn_heads, `text_heads` config.model.text.num_heads. Names
  this mapping does not know are passed through under their torch name (a strict load
  reports them as unexpected); the tensors `ignored_names` lists are left out.
  """
  out: dict[str, np.ndarray] = {}
  groups: dict[str, dict[str, np.ndarray]] = {}
  for key, value in sd.items():
    if key.endswith(_IGNORED_SUFFIX) or _TEXT_IGNORED.fullmatch(key):
      continue
    group = _group_of(key)
    if group is None:
      out[key] = np.asarray(value)
    else:
      groups.setdefault(group, {})[key] = value
  for group, tensors in groups.items():
    prefix, converted, original = _convert_group(group, tensors, attn_heads=attn_heads,
                                                 text_heads=text_heads)
    for name, value in converted.items():
      # nnx paths have no dots; a dotted name is a torch name the converter did not know.
      if '.' in name:
        out[original(name)] = value
      else:
        out[prefix + name] = value
  return out


def authors_pool_feat(rows: np.ndarray, feature_shape: tuple[int, int, int]) -> np.ndarray:
  """The authors' pool rows (N, C*h*w), flattened from NCHW f4 maps, as our (N, h, w, C).

  Cosine similarities between rows do not depend on the flattening order, but the maps the
  fusion module attends to do: their rows must be converted before they can be our
  `KnowledgePool.feat`. `feature_shape` is our (h, w, C) (`CERS.f4_shape(image_size)`).
  """
  h, w, c = feature_shape
  rows = np.asarray(rows)
  if rows.ndim != 2 or rows.shape[1] != h * w * c:
    raise ValueError(f'Pool rows of shape {rows.shape} are not (N, C*h*w) = (N, {c * h * w}) '
                     f'for f4 maps of (h, w, C) = {feature_shape}.')
  return np.ascontiguousarray(rows.reshape(-1, c, h, w).transpose(0, 2, 3, 1))


class CERSAuthorsView(nnx.Module):
  """The sub-modules of CERS that the authors' model has (shared references, not copies).

  Loading into this view fills the CERS it was made from; what the authors' model lacks
  (alignment projections, CoT BERT) is simply not part of the target.
  """

  def __init__(self, model: nnx.Module, names: tuple[str, ...]):
    for name in names:
      setattr(self, name, getattr(model, name))


def load_authors_checkpoint(model: nnx.Module, path_or_sd: str | os.PathLike | StateDict,
                            *, strict: bool = True,
                            include_absent: bool = False) -> LoadReport:
  """Loads the authors' whole CERS checkpoint (file or state dict) into `model`, in place.

  `model` needs the matching config (ConvNeXt-T, BERT-base text encoder, attn_dim 256, 8
  heads, decoder_dims (384, 192, 96, 48)). `include_absent` also targets what their model
  lacks (alignment projections, CoT BERT), which then count as missing.
  """
  if isinstance(path_or_sd, (str, os.PathLike)):
    source = os.fspath(path_or_sd)
    sd = read_state_dict(source)
  else:
    source, sd = '<authors state dict>', path_or_sd
  names = AUTHORS_SUBMODULES
  if include_absent:
    names = names + tuple(n for n in ('alignment', 'cot_encoder') if hasattr(model, n))
  weights = cers_weights(sd, attn_heads=model.fusion.cross_attn.num_heads,
                         text_heads=model.text_encoder.layers[0].attention.num_heads)
  return load_into(CERSAuthorsView(model, names), weights, strict=strict, source=source,
                   ignored=ignored_names(sd))
