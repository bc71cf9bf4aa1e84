"""Pretrained ConvNeXt weights (torchvision, timm or HF transformers) -> `ConvNeXt`.

The naming scheme is detected from the state dict, with or without an enclosing prefix
(e.g. HF's 'convnext.' or a whole-model checkpoint's 'encoder.'). Classifier heads and the
final norm have no counterpart in the feature extractor (docs/design.md section 2) and are
reported as ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
from absl import logging
from flax import nnx

from cers_jax.convert import layout
from cers_jax.convert.assign import LoadReport, WeightLoadError, find_prefix, load_into
from cers_jax.convert.io import read_state_dict

# How a torch module's 'weight'/'bias' become nnx parameters.
_KINDS: dict[str, dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]] = {
    'conv': {'weight': ('kernel', layout.conv_kernel), 'bias': ('bias', np.asarray)},
    'linear': {'weight': ('kernel', layout.linear_kernel), 'bias': ('bias', np.asarray)},
    'norm': {'weight': ('scale', np.asarray), 'bias': ('bias', np.asarray)},
}
_SCALE = 'layer_scale'  # A bare parameter, not a module with weight/bias.


class _Rule(NamedTuple):
  pattern: re.Pattern[str]
  target: Callable[[re.Match[str]], str]  # nnx module path (or parameter path for _SCALE)
  kind: str


def _rule(pattern: str, target: Callable[[re.Match[str]], str], kind: str) -> _Rule:
  return _Rule(re.compile(pattern + r'$'), target, kind)


def _block(m: re.Match[str], attr: str) -> str:
  """Block path from a match whose groups 1 and 2 are the stage and block indices."""
  return f'stages/{m.group(1)}/{m.group(2)}/{attr}'


def _down(what: str, stage: int) -> str:
  """The downsampling layer in front of `stage` (1..3)."""
  return f'downsample_{what}/{stage - 1}'


_TV_STAGE = {1: 0, 3: 1, 5: 2, 7: 3}
_TV_DOWN = {2: 1, 4: 2, 6: 3}


def _tv_block(m: re.Match[str], attr: str) -> str:
  return f'stages/{_TV_STAGE[int(m.group(1))]}/{m.group(2)}/{attr}'


class _Scheme(NamedTuple):
  name: str
  marker: str
  rules: tuple[_Rule, ...]
  ignore: re.Pattern[str]


_SCHEMES = (
    _Scheme(
        'torchvision', 'features.0.0.weight', (
            _rule(r'features\.0\.0\.(weight|bias)', lambda m: 'stem_conv', 'conv'),
            _rule(r'features\.0\.1\.(weight|bias)', lambda m: 'stem_norm', 'norm'),
            _rule(r'features\.([246])\.0\.(weight|bias)',
                  lambda m: _down('norms', _TV_DOWN[int(m.group(1))]), 'norm'),
            _rule(r'features\.([246])\.1\.(weight|bias)',
                  lambda m: _down('convs', _TV_DOWN[int(m.group(1))]), 'conv'),
            _rule(r'features\.([1357])\.(\d+)\.block\.0\.(weight|bias)',
                  lambda m: _tv_block(m, 'dwconv'), 'conv'),
            _rule(r'features\.([1357])\.(\d+)\.block\.2\.(weight|bias)',
                  lambda m: _tv_block(m, 'norm'), 'norm'),
            _rule(r'features\.([1357])\.(\d+)\.block\.3\.(weight|bias)',
                  lambda m: _tv_block(m, 'pwconv1'), 'linear'),
            _rule(r'features\.([1357])\.(\d+)\.block\.5\.(weight|bias)',
                  lambda m: _tv_block(m, 'pwconv2'), 'linear'),
            _rule(r'features\.([1357])\.(\d+)\.layer_scale',
                  lambda m: _tv_block(m, 'layer_scale'), _SCALE),
        ),
        re.compile(r'classifier\..*')),
    _Scheme(
        'timm', 'stem.0.weight', (
            _rule(r'stem\.0\.(weight|bias)', lambda m: 'stem_conv', 'conv'),
            _rule(r'stem\.1\.(weight|bias)', lambda m: 'stem_norm', 'norm'),
            _rule(r'stages\.([123])\.downsample\.0\.(weight|bias)',
                  lambda m: _down('norms', int(m.group(1))), 'norm'),
            _rule(r'stages\.([123])\.downsample\.1\.(weight|bias)',
                  lambda m: _down('convs', int(m.group(1))), 'conv'),
            _rule(r'stages\.(\d)\.blocks\.(\d+)\.conv_dw\.(weight|bias)',
                  lambda m: _block(m, 'dwconv'), 'conv'),
            _rule(r'stages\.(\d)\.blocks\.(\d+)\.norm\.(weight|bias)',
                  lambda m: _block(m, 'norm'), 'norm'),
            _rule(r'stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)',
                  lambda m: _block(m, 'pwconv1'), 'linear'),
            _rule(r'stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)',
                  lambda m: _block(m, 'pwconv2'), 'linear'),
            _rule(r'stages\.(\d)\.blocks\.(\d+)\.gamma',
                  lambda m: _block(m, 'layer_scale'), _SCALE),
        ),
        re.compile(r'(head|norm_pre)\..*')),
    _Scheme(
        'transformers', 'embeddings.patch_embeddings.weight', (
            _rule(r'embeddings\.patch_embeddings\.(weight|bias)', lambda m: 'stem_conv', 'conv'),
            _rule(r'embeddings\.layernorm\.(weight|bias)', lambda m: 'stem_norm', 'norm'),
            _rule(r'encoder\.stages\.([123])\.downsampling_layer\.0\.(weight|bias)',
                  lambda m: _down('norms', int(m.group(1))), 'norm'),
            _rule(r'encoder\.stages\.([123])\.downsampling_layer\.1\.(weight|bias)',
                  lambda m: _down('convs', int(m.group(1))), 'conv'),
            _rule(r'encoder\.stages\.(\d)\.layers\.(\d+)\.dwconv\.(weight|bias)',
                  lambda m: _block(m, 'dwconv'), 'conv'),
            _rule(r'encoder\.stages\.(\d)\.layers\.(\d+)\.layernorm\.(weight|bias)',
                  lambda m: _block(m, 'norm'), 'norm'),
            _rule(r'encoder\.stages\.(\d)\.layers\.(\d+)\.pwconv1\.(weight|bias)',
                  lambda m: _block(m, 'pwconv1'), 'linear'),
            _rule(r'encoder\.stages\.(\d)\.layers\.(\d+)\.pwconv2\.(weight|bias)',
                  lambda m: _block(m, 'pwconv2'), 'linear'),
            _rule(r'encoder\.stages\.(\d)\.layers\.(\d+)\.layer_scale_parameter',
                  lambda m: _block(m, 'layer_scale'), _SCALE),
        ),
        re.compile(r'(layernorm|classifier|pooler)\..*')),
)


def _detect(sd: Mapping[str, np.ndarray], prefix: str | None,
            source: str) -> tuple[_Scheme, str]:
  """The naming scheme and prefix of the ConvNeXt inside `sd`."""
  hits = []
  for scheme in _SCHEMES:
    try:
      hits.append((scheme, find_prefix(sd, scheme.marker, prefix=prefix, what='ConvNeXt',
                                       source=source)))
    except WeightLoadError:
      continue
  if len(hits) == 1:
    return hits[0]
  if not hits:
    raise WeightLoadError(
        f'{source}: no ConvNeXt found; expected torchvision (features.0.0.weight), timm '
        '(stem.0.weight) or transformers (embeddings.patch_embeddings.weight) names'
        + (f' under prefix {prefix!r}' if prefix is not None else '') + '.')
  raise WeightLoadError(f'{source}: ambiguous ConvNeXt naming, matches '
                        f'{[(s.name, p) for s, p in hits]}; pass prefix=... to choose.')


def _convert(sd: Mapping[str, np.ndarray], prefix: str | None,
             source: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """Mapped weights (unrecognised names kept as-is, so loading reports them) and ignored."""
  scheme, prefix = _detect(sd, prefix, source)
  out: dict[str, np.ndarray] = {}
  ignored: list[str] = []
  for key, value in sd.items():
    if not key.startswith(prefix):
      ignored.append(key)
      continue
    name = key[len(prefix):]
    for rule in scheme.rules:
      m = rule.pattern.match(name)
      if m is None:
        continue
      target = rule.target(m)
      if rule.kind == _SCALE:
        out[target] = layout.channel_vector(value)
      else:
        param, fn = _KINDS[rule.kind][m.group(m.lastindex)]
        out[f'{target}/{param}'] = fn(value)
      break
    else:
      if scheme.ignore.match(name):
        ignored.append(key)
      else:
        out[key] = value
  logging.info('%s: %s ConvNeXt names under prefix %r; %d tensors ignored.', source,
               scheme.name, prefix, len(ignored))
  return out, ignored


def convnext_weights(sd: Mapping[str, np.ndarray], *,
                     prefix: str | None = None) -> dict[str, np.ndarray]:
  """Maps a torch-layout torchvision / timm / HF ConvNeXt state dict onto `ConvNeXt`'s paths.

  `prefix` None detects where the ConvNeXt sits. Unrecognised names are kept as-is, so
  loading reports them as unexpected; heads and final norms are dropped.
  """
  return _convert(sd, prefix, '<state dict>')[0]


def load_convnext(module: nnx.Module, path_or_sd: str | os.PathLike[str] | Mapping[str, np.ndarray],
                  *, strict: bool = True, prefix: str | None = None) -> LoadReport:
  """Loads pretrained ConvNeXt weights (file, HF directory or state dict) into `module`.

  `module` must have the checkpoint's depths and dims; heads and final norms are reported
  under `ignored`.
  """
  if isinstance(path_or_sd, Mapping):
    sd, source = path_or_sd, '<state dict>'
  else:
    sd, source = read_state_dict(path_or_sd), os.fspath(path_or_sd)
  weights, ignored = _convert(sd, prefix, source)
  return load_into(module, weights, strict=strict, source=source, ignored=ignored)
