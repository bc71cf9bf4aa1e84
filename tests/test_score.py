"""Tests for cers_jax.score on a hand-made prepared dataset (no model): the eval rules,
name matching, missing and unmatched files. The end-to-end check (a run's own eval CSV
reproduced from its masks) is in test_interop.py."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cers_jax import score
from cers_jax.data import splits
from cers_jax.data.records import DataError, Sample, sample_to_dict

S = 8


def _cache(tmp_path):
  """4 test images: a square, an empty mask, a bar, a dot; train/val one image each."""
  ids = ['a', 'b', 'c', 'd', 'tr', 'va']
  masks = np.zeros((6, S, S), np.uint8)
  masks[0, 2:6, 2:6] = 1
  masks[2, :, 3] = 1
  masks[3, 4, 4] = 1
  cache = tmp_path / 'data'
  cache.mkdir()
  np.save(cache / 'images.npy', np.zeros((6, S, S, 3), np.uint8))
  np.save(cache / 'masks.npy', masks)
  np.save(cache / 'has_mask.npy', np.ones(6, bool))
  samples = [sample_to_dict(Sample(id=i, image_path=f'{i}.png', mask_path=f'm/{i}.png',
                                   text=None, cot_mask=None, cot_no_mask=None), row)
             for row, i in enumerate(ids)]
  (cache / 'samples.json').write_text(json.dumps(samples))
  ids_by_split = dict(train_labeled=['tr'], train_unlabeled=[], val=['va'],
                      test=['a', 'b', 'c', 'd'])
  splits.write_json(str(cache / 'split.json'),
                    dict(protocol='paper', seed=0, ids=ids_by_split))
  return str(cache), masks


def _png(path, mask, scale=1):
  Image.fromarray((np.kron(mask, np.ones((scale, scale), np.uint8)) * 255)).save(path)


def test_scores_with_the_eval_rules_and_names_files(tmp_path, capsys):
  cache, masks = _cache(tmp_path)
  preds = tmp_path / 'preds'
  preds.mkdir()
  half = masks[0].copy()
  half[2:4] = 0
  _png(preds / 'a_pred.png', half, scale=4)  # another size: resized as the truth was
  _png(preds / 'b.png', masks[1])  # both empty: Dice 1
  _png(preds / 'c_mask.png', masks[2])
  _png(preds / 'extra.png', masks[2])
  argv = [str(preds), '--cache_dir', cache, '--no_surface']
  assert score.main(argv) == 1
  assert "no mask for 1 of the 4 test images: d" in capsys.readouterr().err
  assert score.main(argv + ['--missing', 'empty']) == 0
  assert '1 unmatched files (extra.png)' in capsys.readouterr().out
  with open(preds / 'eval' / 'test_per_image.csv') as f:
    rows = {r['id']: r for r in csv.DictReader(f)}
  assert [float(rows[i]['dice_seg']) for i in 'abcd'] == pytest.approx(
      [2 * 8 / (8 + 16), 1.0, 1.0, 0.0])
  assert rows['d']['pred_px_seg'] == '0' and rows['b']['mask_empty'] == 'True'
  with open(preds / 'eval' / 'test_summary.json') as f:
    summary = json.load(f)
  assert (summary['count'], summary['empty_masks'], summary['missing_ids'],
          summary['unmatched_names']) == (4, 1, ['d'], ['extra.png'])


def test_surface_metrics_and_refusals(tmp_path):
  cache, masks = _cache(tmp_path)
  preds = tmp_path / 'preds' / 'masks'  # predict's layout
  preds.mkdir(parents=True)
  for i, name in enumerate('abcd'):
    _png(preds / f'{name}.png', masks[i])
  summary = score.score(str(tmp_path / 'preds'), cache, split='test', out_dir=str(tmp_path),
                        options=score.options_of(None, score._parser().parse_args(
                            ['x', '--pixel_spacing_mm', '0.5', '--decoder', 'r'])))
  assert summary['dice_r_mean'] == 1.0 and summary['hd95_r_mean'] == 0.0
  assert summary['surface_unit'] == 'mm'
  _png(preds / 'a_seg.png', masks[0])
  with pytest.raises(DataError, match=r"Two masks of 'a': .*a.png and .*a_seg.png"):
    score.score(str(tmp_path / 'preds'), cache, split='test', out_dir=str(tmp_path),
                options=score.options_of(None, score._parser().parse_args(['x'])))


def test_label_volumes_are_sliced_as_prepared(tmp_path, monkeypatch):
  """Slices of volume 'v1' (3 slices along the last axis, one of them held out): a label
  volume `v1_pred.nii.gz` is sliced and resized as prepare did; 3D scores per volume too.
  nibabel itself is not needed here: the volume reader is replaced."""
  from cers_jax.data import nifti
  truth = np.zeros((S, S, 3), np.uint8)
  truth[2:6, 2:6, 0] = 1
  truth[3:5, 3:5, 1] = 1
  cache = tmp_path / 'data'
  cache.mkdir()
  masks = np.moveaxis(truth, -1, 0)
  np.save(cache / 'images.npy', np.zeros((3, S, S, 3), np.uint8))
  np.save(cache / 'masks.npy', masks)
  np.save(cache / 'has_mask.npy', np.ones(3, bool))
  samples = [sample_to_dict(Sample(id=f'v1_s{k:03d}', image_path='v1.nii.gz',
                                   mask_path='v1_label.nii.gz', text=None, cot_mask=None,
                                   cot_no_mask=None, group='v1', volume='v1', slice_index=k,
                                   spacing=(1.0, 1.0), slice_thickness=2.0), k)
             for k in range(3)]
  (cache / 'samples.json').write_text(json.dumps(samples))
  splits.write_json(str(cache / 'split.json'), dict(protocol='grouped', seed=0, ids=dict(
      train_labeled=['v1_s002'], train_unlabeled=[], val=[], test=['v1_s000', 'v1_s001'])))
  preds = tmp_path / 'preds'
  preds.mkdir()
  (preds / 'v1_pred.nii.gz').write_bytes(b'')
  predicted = np.kron(truth, np.ones((2, 2, 1), np.uint8))  # at twice the cached size
  predicted[..., 1] = 0
  read = []
  monkeypatch.setattr(nifti, 'read_label_volume', lambda path: read.append(path) or predicted)
  summary = score.score(str(preds), str(cache), split='test', out_dir=str(tmp_path),
                        options=score.options_of(None, score._parser().parse_args(
                            ['x', '--decoder', 'r'])), nifti_axis=-1)
  assert read == [str(preds / 'v1_pred.nii.gz')]
  with open(tmp_path / 'eval' / 'test_per_image.csv') as f:
    rows = {r['id']: r for r in csv.DictReader(f)}
  assert (float(rows['v1_s000']['dice_r']), float(rows['v1_s001']['dice_r'])) == (1.0, 0.0)
  assert (tmp_path / 'eval' / 'test_per_volume.csv').exists()
  assert summary['surface_unit'] == 'mm'
