"""The prepared dataset cache, read by every run (docs/design.md sections 10 and 12).

Images are decoded and resized once by `cers_jax.data.prepare.prepare` into uint8 arrays;
everything downstream (input pipeline, pool, embedding tables) indexes them by cache row.
Layout of <cache_dir> (docs/design.md section 10):
  images.npy (N, S, S, 3) uint8, masks.npy (N, S, S) uint8 {0, 1}, has_mask.npy (N,) bool,
  samples.json (Sample fields + "row", in row order), split.json, report.json,
  sources.json (per row, the image and mask files decoded: path, size, mtime_ns, sha1;
  `prepare` decodes a row again when its files changed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from cers_jax.data.records import SPLIT_NAMES, DataError, Sample, sample_from_dict
from cers_jax.data.splits import read_manifest

CACHE_FILES = ('images.npy', 'masks.npy', 'has_mask.npy', 'samples.json', 'split.json')
_PREPARE_HINT = ('Run the data preparation first (cers_jax.data.prepare.prepare(config, '
                 'workdir), which every training run calls).')


@dataclasses.dataclass(frozen=True)
class Cache:
  """A prepared dataset; `images` (N, S, S, 3) and `masks` (N, S, S) are memory-mapped uint8.

  Masks are {0, 1} and all zero where `has_mask` is False; `manifest` is split.json.
  """

  cache_dir: str
  images: np.ndarray
  masks: np.ndarray
  has_mask: np.ndarray
  samples: list[Sample]
  manifest: dict[str, Any]
  _row: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, '_row', {s.id: r for r, s in enumerate(self.samples)})

  def __len__(self) -> int:
    return len(self.samples)

  @property
  def image_size(self) -> int:
    return int(self.images.shape[1])

  def rows_of(self, ids: Sequence[str]) -> np.ndarray:
    """Cache rows (int32) of sample ids, in the given order."""
    row = self._row
    missing = [i for i in ids if i not in row]
    if missing:
      split_path = os.path.join(self.cache_dir, 'split.json')
      raise DataError(
          f'{len(missing)} ids are not in the cache {self.cache_dir} (e.g. {missing[:5]}); '
          f'{split_path} and the cache disagree. Delete {split_path} (a new split) or the '
          'cache arrays (a new cache) and prepare again.')
    return np.asarray([row[i] for i in ids], dtype=np.int32)

  def split_rows(self, name: str) -> np.ndarray:
    """Cache rows of one split of the manifest (a name from SPLIT_NAMES)."""
    if name not in SPLIT_NAMES:
      raise DataError(f'Unknown split {name!r}; choices: {list(SPLIT_NAMES)}.')
    return self.rows_of(self.manifest['ids'][name])


def read_samples(path: str) -> list[Sample]:
  """samples.json as Samples in row order (rows must be numbered 0..N-1)."""
  try:
    with open(path, encoding='utf-8') as f:
      entries = json.load(f)
    samples = [sample_from_dict(e) for e in entries]
  except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
    raise DataError(f'Cannot read {path}: {e}. Delete it and prepare again.') from e
  if [e.get('row') for e in entries] != list(range(len(entries))):
    raise DataError(f'{path}: "row" values are not 0..N-1 in order. Delete it and prepare '
                    'again.')
  return samples


def load_cache(cache_dir: str) -> Cache:
  """Opens a prepared cache, its arrays memory-mapped."""
  missing = [f for f in CACHE_FILES if not os.path.isfile(os.path.join(cache_dir, f))]
  if missing:
    raise DataError(f'Cache {cache_dir} lacks {missing}. {_PREPARE_HINT}')
  arrays = {}
  for name in ('images', 'masks', 'has_mask'):
    path = os.path.join(cache_dir, f'{name}.npy')
    try:
      arrays[name] = np.load(path, mmap_mode='r')
    except (OSError, ValueError) as e:
      raise DataError(f'Cannot read {path}: {e}. Delete it and prepare again.') from e
  samples = read_samples(os.path.join(cache_dir, 'samples.json'))
  n = len(samples)
  images, masks, has_mask = arrays['images'], arrays['masks'], arrays['has_mask']
  ok = (images.ndim == 4 and images.shape[0] == n and images.shape[3] == 3
        and images.shape[1] == images.shape[2] and images.dtype == np.uint8
        and masks.shape == images.shape[:3] and masks.dtype == np.uint8
        and has_mask.shape == (n,) and has_mask.dtype == np.bool_)
  if not ok:
    raise DataError(
        f'Cache {cache_dir} is inconsistent: images {images.shape} {images.dtype}, masks '
        f'{masks.shape} {masks.dtype}, has_mask {has_mask.shape} {has_mask.dtype}, '
        f'{n} samples. Delete the .npy files and samples.json and prepare again.')
  manifest = read_manifest(os.path.join(cache_dir, 'split.json'))
  return Cache(cache_dir, images, masks, np.asarray(has_mask), samples, manifest)
