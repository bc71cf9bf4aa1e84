"""Reading PyTorch / HF checkpoints into numpy state dicts, with torch optional.

safetensors files are read with `safetensors.numpy` and never import torch; `.bin`/`.pth`/
`.pt` pickles need torch (imported only then, `weights_only=True`). Half-precision tensors
(fp16, bf16) come back as float32 so the loaders can cast once to the parameter dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

# Importing ml_dtypes registers bfloat16 with numpy; safetensors.numpy needs that to read
# bf16 checkpoints at all.
import ml_dtypes
import numpy as np
from absl import logging
from safetensors.numpy import load_file

_PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.ckpt')
_WRAPPER_KEYS = ('state_dict', 'model')


def _to_numpy(arr: np.ndarray) -> np.ndarray:
  """float16 / bfloat16 -> float32; other dtypes unchanged."""
  if arr.dtype in (np.float16, np.dtype(ml_dtypes.bfloat16)):
    return arr.astype(np.float32)
  return arr


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  return {k: _to_numpy(v) for k, v in load_file(path).items()}


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  """Finds the tensor dict inside a training checkpoint ({'state_dict': ...} etc.)."""
  while isinstance(obj, Mapping):
    inner = [k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)]
    if not inner:
      return obj
    obj = obj[inner[0]]
  raise ValueError(f'{path}: expected a state dict (a mapping of names to tensors), '
                   f'found {type(obj).__name__}.')


def _read_pickle(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'{path} is a PyTorch pickle and reading it needs torch, which is not installed. '
        'Either pip install torch (the CPU build is enough), or convert the file to '
        'safetensors once on a machine that has torch.') from e
  obj = torch.load(path, map_location='cpu', weights_only=True)
  sd = _unwrap(obj, path)
  out: dict[str, np.ndarray] = {}
  skipped = []
  for key, value in sd.items():
    if isinstance(value, torch.Tensor):
      if value.dtype in (torch.float16, torch.bfloat16):
        value = value.float()
      out[key] = value.detach().cpu().numpy()
    else:
      skipped.append(key)
  if skipped:
    logging.info('%s: skipped %d non-tensor entries: %s', path, len(skipped), skipped[:10])
  return out


def _read_directory(path: str) -> dict[str, np.ndarray]:
  """An HF model folder: model.safetensors, a sharded index, or pytorch_model.bin."""
  single = os.path.join(path, 'model.safetensors')
  if os.path.isfile(single):
    return _read_safetensors(single)
  for index_name, reader in (('model.safetensors.index.json', _read_safetensors),
                             ('pytorch_model.bin.index.json', _read_pickle)):
    index = os.path.join(path, index_name)
    if os.path.isfile(index):
      with open(index, encoding='utf-8') as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      out: dict[str, np.ndarray] = {}
      for shard in shards:
        out.update(reader(os.path.join(path, shard)))
      return out
  pickle = os.path.join(path, 'pytorch_model.bin')
  if os.path.isfile(pickle):
    return _read_pickle(pickle)
  raise FileNotFoundError(
      f'{path}: no weights found; expected model.safetensors, '
      'model.safetensors.index.json (+ shards) or pytorch_model.bin in this folder. '
      'Point the config at the folder that holds the checkpoint (e.g. an HF snapshot).')


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """A checkpoint's tensors as numpy arrays in the file's (torch) layout; fp16/bf16 -> float32.

  `path` is a `.safetensors` file, a torch pickle (`.bin`, `.pth`, `.pt`, `.ckpt`; a
  top-level 'state_dict' or 'model' entry is unwrapped), or an HF model directory. Raises
  ImportError for a pickle when torch is not installed.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return _read_directory(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file or directory; check the '
                            'weights path in the config.')
  if path.endswith('.safetensors'):
    return _read_safetensors(path)
  if path.endswith(_PICKLE_SUFFIXES):
    return _read_pickle(path)
  raise ValueError(f'{path}: unknown checkpoint type; expected .safetensors, '
                   f'{"/".join(_PICKLE_SUFFIXES)} or an HF model directory.')
