"""Per-volume 3D scores of slice predictions (layout 'nifti'; README "Datasets").

The model segments slices; a volume's result is its slices stacked back in their order
along the slicing axis. `VolumeAccumulator` collects the binary masks of every evaluation
batch (the `on_batch` hook of `inference.evaluate`) by volume and slice index, and scores
each volume of both decoders with a 3D Dice and a 3D HD95 in millimetres: in-plane spacing
at the cached resolution (`Sample.spacing`), slice thickness from the header's pixdim along
the slicing axis (`Sample.slice_thickness`). A slice the split lacks (dropped by
`data.nifti.empty_margin`) is empty in both prediction and ground truth, so the stack keeps
its true geometry.

Rules, as for the 2D scores: a volume whose prediction and ground truth are both empty has
Dice 1. HD95 is `cers_jax.surface.surface_metrics`'s (the larger of the two directed 95th
percentiles of surface distances, MONAI's definition) with the empty-mask rule evaluation
uses for images (`eval.surface_both_empty` / `surface_one_empty`); NaN HD95s (the 'nan'
rules) are left out of the mean and counted.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Sequence

from absl import logging
import numpy as np

from cers_jax import stats
from cers_jax import surface
from cers_jax.data.records import Sample

DECODERS = ('r', 's')
FIELDS = ('volume', 'slices', 'gt_voxels', 'dice_r', 'hd95_r', 'dice_s', 'hd95_s')


def has_volumes(samples: Sequence[Sample]) -> bool:
  """Whether any sample is a slice of a volume."""
  return any(getattr(s, 'volume', '') for s in samples)


def accumulator_for(samples: Sequence[Sample], rows,
                    empty_rule: surface.EmptyRule | None = None, *,
                    decoders: Sequence[str] = DECODERS) -> 'VolumeAccumulator | None':
  """A VolumeAccumulator when some of `rows` are slices of a volume, else None."""
  if not has_volumes([samples[int(r)] for r in np.asarray(rows).tolist()]):
    return None
  return VolumeAccumulator(samples, empty_rule=empty_rule, decoders=decoders)


def chain(*hooks):
  """One `on_batch` hook calling each of `hooks` (None and None-valued entries skipped);
  a VolumeAccumulator counts as its `add`."""
  calls = [h.add if isinstance(h, VolumeAccumulator) else h for h in hooks if h is not None]
  if not calls:
    return None

  def on_batch(*batch):
    for call in calls:
      call(*batch)

  return on_batch


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None,
         empty_rule: surface.EmptyRule | None = None) -> float:
  """HD95 of two N-D binary masks in the unit of `spacing` (`surface.surface_metrics`)."""
  return float(surface.surface_metrics(pred, gt, spacing=spacing,
                                       empty_rule=empty_rule)['hd95'])


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
  """Dice of two binary masks; 1 when both are empty (the authors' rule)."""
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  return stats.pooled_dice(np.count_nonzero(pred & gt), np.count_nonzero(pred),
                           np.count_nonzero(gt))


def _binary(masks: np.ndarray, count: int) -> np.ndarray:
  """(count, H, W) bool of a batch of masks given as (count, H, W[, 1])."""
  masks = np.asarray(masks)
  return masks.reshape(count, *masks.shape[1:3]).astype(bool)


class VolumeAccumulator:
  """Slices of evaluation batches stacked into volumes and scored in 3D.

  Usage: `acc = VolumeAccumulator(data.cache.samples)`, `acc.add(rows, pred_r, pred_s, gt)`
  per batch (rows are cache rows, masks (B, H, W) binary: one per decoder of `decoders`,
  then the truth), then `acc.records()`, `acc.summary()` or `acc.write(out_dir, split)`.
  Rows that are not slices are ignored.
  """

  def __init__(self, samples: Sequence[Sample], *,
               empty_rule: surface.EmptyRule | None = None,
               decoders: Sequence[str] = DECODERS):
    """`empty_rule`: what HD95 is when a mask is empty (None: `surface.EmptyRule()`);
    `decoders`: the names of the predictions `add` takes, in order."""
    self._samples = samples
    self._empty_rule = empty_rule
    self._decoders = tuple(decoders)
    # {volume: {slice_index: (packed pred_r, packed pred_s, packed gt)}}; packed bits keep
    # a whole test split of 224 px slices in a few hundred MB at most.
    self._slices: dict[str, dict[int, tuple[np.ndarray, ...]]] = {}
    self._meta: dict[str, tuple[tuple[float, float] | None, float]] = {}
    self._shape: tuple[int, int] | None = None

  def add(self, rows, *masks) -> None:
    """Adds one batch: cache rows (B,) and binary masks (B, H, W) of each decoder (D_r, D_s
    for CERS) and of the truth."""
    rows = np.asarray(rows).reshape(-1)
    if len(masks) != len(self._decoders) + 1:
      raise ValueError(f'{len(masks)} masks for the decoders {self._decoders} and the truth.')
    masks = [_binary(m, len(rows)) for m in masks]
    for i, row in enumerate(rows.tolist()):
      sample = self._samples[row]
      volume = getattr(sample, 'volume', '')
      if not volume:
        continue
      self._shape = masks[0].shape[1:]
      self._meta.setdefault(volume, (sample.spacing, float(sample.slice_thickness)))
      self._slices.setdefault(volume, {})[int(sample.slice_index)] = tuple(
          np.packbits(m[i]) for m in masks)

  def __len__(self) -> int:
    return len(self._slices)

  def _stack(self, volume: str) -> np.ndarray:
    """(decoders + 1, D, H, W) bool over the volume's slice range: each decoder's
    prediction, then the truth."""
    slices = self._slices[volume]
    first, last = min(slices), max(slices)
    height, width = self._shape
    out = np.zeros((len(self._decoders) + 1, last - first + 1, height, width), bool)
    for index, packed in slices.items():
      for k, bits in enumerate(packed):
        out[k, index - first] = np.unpackbits(bits, count=height * width).reshape(
            height, width).astype(bool)
    return out

  def _spacing(self, volume: str) -> tuple[float, float, float] | None:
    spacing, thickness = self._meta[volume]
    if spacing is None or thickness <= 0:
      return None  # Voxel units: a volume read without its header's spacing.
    return (thickness, float(spacing[0]), float(spacing[1]))

  def records(self) -> list[dict[str, Any]]:
    """One record per volume (sorted): slice count, ground-truth voxels, Dice and HD95."""
    records = []
    for volume in sorted(self._slices):
      *preds, gt = self._stack(volume)
      spacing = self._spacing(volume)
      record: dict[str, Any] = dict(volume=volume, slices=len(self._slices[volume]),
                                    gt_voxels=int(gt.sum()))
      for name, pred in zip(self._decoders, preds):
        record[f'dice_{name}'] = dice(pred, gt)
        record[f'hd95_{name}'] = hd95(pred, gt, spacing, self._empty_rule)
      records.append(record)
    return records

  def summary(self, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Volume means: `volume_dice_r_mean`, `volume_hd95_r_mean` (over defined HD95), ..."""
    records = self.records() if records is None else records
    summary: dict[str, Any] = dict(volume_count=len(records))
    for name in self._decoders:
      dices = np.array([r[f'dice_{name}'] for r in records], np.float64)
      hds = np.array([r[f'hd95_{name}'] for r in records], np.float64)
      hds = hds[np.isfinite(hds)]
      summary[f'volume_dice_{name}_mean'] = float(dices.mean()) if dices.size else None
      summary[f'volume_dice_{name}_std'] = float(dices.std()) if dices.size else None
      summary[f'volume_hd95_{name}_mean'] = float(hds.mean()) if hds.size else None
      summary[f'volume_hd95_{name}_count'] = int(hds.size)
    summary['volume_hd95_unit'] = ('mm' if all(self._spacing(v) for v in self._slices)
                                   else 'voxels (some volumes have no spacing)')
    return summary

  def write(self, out_dir: str, split: str) -> dict[str, Any]:
    """Writes `<split>_per_volume.csv` into `out_dir`; returns the summary."""
    records = self.records()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f'{split}_per_volume.csv'), 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=list(self.fields()))
      writer.writeheader()
      writer.writerows(records)
    summary = self.summary(records)
    scores = '; '.join(f'Dice D_{d} {_fmt(summary[f"volume_dice_{d}_mean"])}, HD95 D_{d} '
                       f'{_fmt(summary[f"volume_hd95_{d}_mean"])}' for d in self._decoders)
    logging.info('%s per volume (%d volumes, 3D, HD95 in %s): %s', split,
                 summary['volume_count'], summary['volume_hd95_unit'], scores)
    return summary

  def fields(self) -> tuple[str, ...]:
    """The columns of `<split>_per_volume.csv` (FIELDS for CERS's decoders)."""
    return ('volume', 'slices', 'gt_voxels',
            *(f'{m}_{d}' for d in self._decoders for m in ('dice', 'hd95')))


def _fmt(value: float | None) -> str:
  return 'n/a' if value is None else f'{value:.4f}'
