"""The real CLI on a tiny NIfTI dataset: train, evaluate per slice and per volume, predict
label volumes that reopen on their source grid.

The volumes are the tiny run's 64 synthetic 32x32 images stacked eight to a volume, with the
same texts keyed by slice id, and 13 labeled training slices as the tiny run has 13 labeled
images: the shapes of tests/test_end_to_end, for the shared compilation cache. Measured on
the 2-core CPU: 192 s with a cold cache, 48 s warm.
"""

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from cers_jax.data import nifti
from cers_jax.data import synthetic
from tests import cli_helpers
from tests import test_nifti as helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join('tests', 'run_configs', 'tiny_run.py')
CASES, DEPTH = 8, 8


def _stack_synthetic(source, root):
  """images/, labels/ and the CSVs of `source` (a CERS-layout folder) as CASES volumes."""
  frames = sorted(os.listdir(os.path.join(source, 'frames')))
  slice_of = {}
  for name in ('images', 'labels'):
    os.makedirs(os.path.join(root, name))
  for case in range(CASES):
    stems = [os.path.splitext(f)[0] for f in frames[case * DEPTH:(case + 1) * DEPTH]]
    read = lambda sub, stem: np.asarray(Image.open(os.path.join(source, sub, f'{stem}.png')))
    image = np.stack([read('frames', s) for s in stems], axis=-1).astype(np.int16) * 4 - 300
    labels = (np.stack([read('masks', s) for s in stems], axis=-1) >= 128).astype(np.uint8)
    helpers.save(os.path.join(root, 'images', f'vol{case}.nii.gz'), image)
    helpers.save(os.path.join(root, 'labels', f'vol{case}.nii.gz'), labels)
    slice_of.update({s: nifti.slice_id(f'vol{case}', i) for i, s in enumerate(stems)})
  for name in ('text.csv', 'cot_output_mask.csv', 'cot_output_no_mask.csv'):
    with open(os.path.join(source, name), newline='') as f:
      rows = list(csv.reader(f))
    with open(os.path.join(root, name), 'w', newline='') as f:
      csv.writer(f).writerows([rows[0]] + [[slice_of[os.path.splitext(k)[0]], v]
                                           for k, v in rows[1:]])


@pytest.mark.slow
def test_nifti_dataset_trains_evaluates_and_predicts_volumes(tmp_path):
  synthetic.generate_synthetic(str(tmp_path / 'synthetic'), num_images=CASES * DEPTH,
                               image_size=32)
  root = tmp_path / 'volumes'
  _stack_synthetic(str(tmp_path / 'synthetic'), str(root))
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, 'run.py', f'--config={CONFIG}', f'--workdir={workdir}',
       '--config.synthetic.num_images=0', '--config.data.layout=nifti',
       f'--config.data.root={root}',
       # 13 of the 48 training slices labeled, as the tiny run's 13 of 52: the same pool.
       '--config.data.labeled_fraction=0.27'],
      cwd=REPO, env=cli_helpers.run_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]

  with open(workdir / 'data' / 'split.json') as f:
    split = json.load(f)
  assert split['protocol'] == 'grouped'
  test_cases = sorted({i.rsplit('_s', 1)[0] for i in split['ids']['test']})
  train_cases = {i.rsplit('_s', 1)[0] for n in ('train_labeled', 'train_unlabeled')
                 for i in split['ids'][n]}
  assert test_cases and not train_cases & set(test_cases)

  with open(workdir / 'eval' / 'test_summary.json') as f:
    summary = json.load(f)
  assert summary['count'] == len(split['ids']['test'])
  assert summary['surface_unit'] == 'mm'  # The slices' own spacing.
  assert summary['volume_count'] == len(test_cases)
  assert 0.0 <= summary['volume_dice_r_mean'] <= 1.0
  assert summary['volume_hd95_unit'] == 'mm'
  with open(workdir / 'eval' / 'test_per_volume.csv') as f:
    per_volume = list(csv.DictReader(f))
  assert sorted(r['volume'] for r in per_volume) == test_cases
  assert all(int(r['slices']) == DEPTH for r in per_volume)

  written = sorted(os.listdir(workdir / 'predictions' / 'volumes'))
  assert written == [f'{c}_pred.nii.gz' for c in test_cases]
  for case in test_cases:
    source = nib.load(root / 'images' / f'{case}.nii.gz')
    predicted = nib.load(workdir / 'predictions' / 'volumes' / f'{case}_pred.nii.gz')
    np.testing.assert_allclose(predicted.affine, source.affine)
    assert predicted.shape == source.shape == (32, 32, DEPTH)
    labels = np.asanyarray(predicted.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
