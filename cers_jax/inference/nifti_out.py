"""Predicted label volumes written back as NIfTI (layout 'nifti'; README "Datasets").

`--mode predict` (and `all`) on a dataset of volume slices writes, beside the pages of
`inference.predict`, one file per volume of the test split:
`predictions/volumes/<case>_pred.nii.gz`, D_r's mask (the CERS result, as `masks/*.png`),
uint8 0/1, with the source image's affine and header (its data type set to uint8, no
intensity scaling). Each slice's prediction is resized from the cached resolution back to
the slice's original in-plane shape by nearest neighbour and put back at its index along
`data.nifti.axis`; slices the cache does not hold (`data.nifti.empty_margin`) stay 0.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import logging
import numpy as np
from PIL import Image

from cers_jax.core.method import EvalSteps
from cers_jax.data import nifti
from cers_jax.data.dataset import Data
from cers_jax.data.records import Sample
from cers_jax.inference import evaluate

SUBFOLDER = 'volumes'
SUFFIX = '_pred.nii.gz'


def volume_rows(samples: Sequence[Sample], rows: Sequence[int]) -> dict[str, list[int]]:
  """{case: cache rows} of the rows that are slices of a volume."""
  by_volume: dict[str, list[int]] = {}
  for row in np.asarray(rows).tolist():
    volume = getattr(samples[row], 'volume', '')
    if volume:
      by_volume.setdefault(volume, []).append(int(row))
  return by_volume


def _to_shape(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """Nearest-neighbour resize of a (S, S) {0, 1} mask to (rows, cols)."""
  mask = np.asarray(mask, np.uint8)
  if mask.shape == (rows, cols):
    return mask
  return np.asarray(Image.fromarray(mask).resize((cols, rows), Image.Resampling.NEAREST))


def assemble(source_path: str, slices: dict[int, np.ndarray], axis: int):
  """The NIfTI image of `slices` ({index: (S, S) mask}) on the grid of `source_path`."""
  source = nifti.nibabel().load(source_path)
  shape, _ = nifti.volume_header(source_path)
  axis = axis % 3
  kept = [a for a in range(3) if a != axis]
  labels = np.zeros(shape, np.uint8)
  for index, mask in slices.items():
    plane = _to_shape(mask, shape[kept[0]], shape[kept[1]])
    index_of = [slice(None)] * 3
    index_of[axis] = index
    labels[tuple(index_of)] = plane
  header = source.header.copy()
  header.set_data_dtype(np.uint8)
  header.set_slope_inter(1.0, 0.0)
  return type(source)(labels, source.affine, header)


def write_volume(path: str, source_path: str, slices: dict[int, np.ndarray],
                 axis: int) -> str:
  """Writes the predicted label volume of `slices` to `path` (written atomically)."""
  image = assemble(source_path, slices, axis)
  tmp = path.replace(SUFFIX, '.tmp' + SUFFIX)
  nifti.nibabel().save(image, tmp)
  os.replace(tmp, path)
  return path


def _predicted_slices(state, steps: EvalSteps, data: Data, rows: np.ndarray, batch_size: int,
                      threshold: float, decoder: str = 'r') -> dict[int, np.ndarray]:
  """{cache row: the (S, S) uint8 mask of `decoder` (D_r: CERS's result)} of `rows`."""
  masks = {}
  for index, out, _ in evaluate.predict_rows(state, steps, data, rows, batch_size,
                                             desc='predicting volumes'):
    for i, row in enumerate(index.tolist()):
      masks[int(row)] = (out[f'prob_{decoder}'][i, ..., 0] > threshold).astype(
          np.uint8)  # As scored.
  return masks


def write_predicted_volumes(state, steps: EvalSteps, data: Data, config: Any, out_dir: str, *,
                            write: bool = True, decoder: str = 'r') -> list[str]:
  """Predicts every test-split slice of a volume and writes each volume's NIfTI.

  Returns the paths written ([] when the test split holds no slices of volumes). Every
  process computes (the eval batches are global); only the one with `write` writes.
  """
  samples = data.cache.samples
  by_volume = volume_rows(samples, data.rows['test'])
  if not by_volume:
    return []
  rows = np.asarray(sorted(r for rs in by_volume.values() for r in rs), np.int32)
  masks = _predicted_slices(state, steps, data, rows, config.train.eval_batch_size,
                            config.eval.threshold, decoder)
  if not write:
    return []
  folder = os.path.join(out_dir, SUBFOLDER)
  os.makedirs(folder, exist_ok=True)
  axis = nifti.NiftiSettings.from_config(config.data).axis
  written = []
  for case, case_rows in sorted(by_volume.items()):
    slices = {samples[r].slice_index: masks[r] for r in case_rows}
    written.append(write_volume(os.path.join(folder, f'{case}{SUFFIX}'),
                                samples[case_rows[0]].image_path, slices, axis))
  logging.info('Wrote %d predicted label volumes (D_%s) into %s.', len(written), decoder,
               folder)
  return written
