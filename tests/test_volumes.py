"""Tests for cers_jax.inference.volumes: slices stacked into volumes, 3D Dice and HD95."""

import csv

import numpy as np
import pytest

from cers_jax import surface
from cers_jax.data.records import Sample
from cers_jax.inference import volumes

SPACING = (0.5, 0.75)  # (row, col) mm at the cached size.
THICKNESS = 3.0


def _samples(depths):
  """Slice samples of volumes with `depths` slices each, then one plain image."""
  out = [Sample(id=f'{v}_s{i:03d}', image_path=f'{v}.nii.gz', mask_path=f'{v}.nii.gz',
                text=None, cot_mask=None, cot_no_mask=None, group=v, volume=v,
                slice_index=i, spacing=SPACING, slice_thickness=THICKNESS)
         for v, depth in depths.items() for i in range(depth)]
  return out + [Sample(id='plain', image_path='p.png', mask_path='p.png', text=None,
                       cot_mask=None, cot_no_mask=None)]


def _box(shape, lo, hi):
  out = np.zeros(shape, bool)
  out[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return out


def _feed(acc, samples, stacks, order, batch=3):
  """Adds the slices of `stacks` ({volume: (pred_r, pred_s, gt)}) in `order` of rows."""
  for start in range(0, len(order), batch):
    rows = np.asarray(order[start:start + batch])
    parts = [[], [], []]
    for row in rows:
      s = samples[row]
      for k in range(3):
        parts[k].append(stacks[s.volume][k][s.slice_index] if s.volume
                        else np.ones((8, 8), bool))
    acc.add(rows, *[np.stack(p)[..., None] for p in parts])  # (B, H, W, 1) is accepted.


def test_hd95_in_mm_and_the_empty_rule():
  gt = _box((6, 8, 8), (1, 2, 2), (4, 6, 6))
  shifted = np.roll(gt, 2, axis=0)  # Two slices further along the slicing axis.
  assert volumes.hd95(gt, gt, (3.0, 0.5, 0.5)) == 0.0
  assert volumes.hd95(shifted, gt, (3.0, 0.5, 0.5)) == pytest.approx(6.0)
  assert volumes.hd95(shifted, gt) == pytest.approx(2.0)  # No spacing: voxels.
  missed = np.zeros_like(gt)
  assert np.isnan(volumes.hd95(missed, gt, empty_rule=surface.EmptyRule(one_empty='nan')))
  assert volumes.hd95(missed, gt) == pytest.approx(surface.diagonal(gt.shape))  # 'worst'


def test_accumulator_scores_each_volume_in_3d(tmp_path):
  samples = _samples({'a': 5, 'b': 4, 'c': 3})
  gt_a = _box((5, 8, 8), (1, 2, 2), (4, 6, 6))
  gt_b = _box((4, 8, 8), (0, 1, 1), (2, 5, 7))
  stacks = {
      'a': (gt_a, np.roll(gt_a, 1, axis=0), gt_a),  # D_r exact, D_s one slice off.
      'b': (np.zeros_like(gt_b), gt_b, gt_b),  # D_r misses the lesion.
      'c': (np.zeros((3, 8, 8), bool),) * 3,  # No lesion, none predicted.
  }
  order = list(np.random.default_rng(0).permutation(len(samples)))  # Volumes interleaved.
  acc = volumes.VolumeAccumulator(samples)
  _feed(acc, samples, stacks, order)
  assert len(acc) == 3  # The plain image is not a volume.
  records = {r['volume']: r for r in acc.records()}
  assert records['a']['slices'] == 5 and records['a']['gt_voxels'] == int(gt_a.sum())
  assert records['a']['dice_r'] == 1.0 and records['a']['hd95_r'] == 0.0
  assert records['a']['dice_s'] == pytest.approx(volumes.dice(np.roll(gt_a, 1, 0), gt_a))
  assert records['a']['hd95_s'] == pytest.approx(THICKNESS)  # One slice off = 3 mm.
  assert records['b']['dice_r'] == 0.0 and records['b']['dice_s'] == 1.0
  diagonal = surface.diagonal(gt_b.shape, (THICKNESS, *SPACING))  # A missed lesion: worst.
  assert records['b']['hd95_r'] == pytest.approx(diagonal)
  assert records['c']['dice_r'] == 1.0  # Both empty scores 1.
  summary = acc.write(str(tmp_path), 'test')
  assert summary['volume_count'] == 3
  assert summary['volume_dice_r_mean'] == pytest.approx(2 / 3)
  assert summary['volume_hd95_unit'] == 'mm'
  with open(tmp_path / 'test_per_volume.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['volume'] for r in rows] == ['a', 'b', 'c']
  assert float(rows[0]['hd95_s']) == pytest.approx(THICKNESS)


def test_missing_slices_keep_the_geometry():
  samples = _samples({'a': 6})
  gt = _box((6, 8, 8), (1, 2, 2), (5, 6, 6))
  pred = np.roll(gt, 1, axis=0)
  acc = volumes.VolumeAccumulator(samples)
  # Slice 3 is not in the split: the stack still puts slice 4 at 4 x 3 mm.
  _feed(acc, samples, {'a': (pred, pred, gt)}, [0, 1, 2, 4, 5])
  kept = [0, 1, 2, 4, 5]
  gt_gap, pred_gap = gt.copy(), pred.copy()
  gt_gap[3], pred_gap[3] = False, False
  record, = acc.records()
  assert record['slices'] == len(kept)
  assert record['dice_r'] == pytest.approx(volumes.dice(pred_gap, gt_gap))
  assert record['hd95_r'] == pytest.approx(
      volumes.hd95(pred_gap, gt_gap, (THICKNESS, *SPACING)), rel=1e-6)


def test_an_accumulator_only_for_splits_with_slices_and_chained_hooks():
  samples = _samples({'a': 2})
  assert volumes.accumulator_for(samples, [2]) is None  # Only the plain image.
  acc = volumes.accumulator_for(samples, [0, 1, 2])
  seen = []
  hook = volumes.chain(None, lambda *batch: seen.append(batch[0].tolist()), acc)
  masks = np.zeros((2, 8, 8), bool)
  hook(np.asarray([0, 1]), masks, masks, masks)
  assert seen == [[0, 1]] and len(acc) == 1
  assert volumes.chain(None, None) is None
