"""Tests for cers_jax.inference.nifti_out: predicted slices written back as NIfTI volumes."""

import os
import types

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from cers_jax.inference import nifti_out
from tests import test_nifti as helpers


def _nearest(mask, rows, cols):
  return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(
      (cols, rows), Image.Resampling.NEAREST))


@pytest.mark.parametrize('axis', [-1, 0])
def test_written_volume_reopens_on_the_source_grid(tmp_path, axis):
  source = helpers.save(tmp_path / 'src.nii.gz', helpers.image_of(helpers.sphere()))
  depth = helpers.SHAPE[axis]
  rng = np.random.default_rng(axis % 3)
  slices = {i: rng.integers(0, 2, (helpers.SIZE, helpers.SIZE)).astype(np.uint8)
            for i in range(depth) if i != 1}  # Slice 1 not predicted: stays 0.
  path = nifti_out.write_volume(str(tmp_path / f'x{nifti_out.SUFFIX}'), source, slices, axis)
  reopened = nib.load(path)
  np.testing.assert_allclose(reopened.affine, helpers.affine())
  assert reopened.shape == helpers.SHAPE
  assert reopened.get_data_dtype() == np.uint8
  labels = np.asanyarray(reopened.dataobj)
  assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
  rows, cols = [n for a, n in enumerate(helpers.SHAPE) if a != axis % 3]
  for index, mask in slices.items():
    np.testing.assert_array_equal(np.take(labels, index, axis=axis),
                                  _nearest(mask, rows, cols))
  assert not np.take(labels, 1, axis=axis).any()
  assert not [n for n in os.listdir(tmp_path) if '.tmp' in n]


def test_write_predicted_volumes_writes_the_test_volumes(tmp_path, monkeypatch):
  helpers.write_dataset(tmp_path / 'ds', 2)
  config = helpers.config_for(tmp_path / 'ds')
  samples = helpers.scan(tmp_path / 'ds').samples + [helpers.Sample(
      id='plain', image_path='p.png', mask_path=None, text=None, cot_mask=None,
      cot_no_mask=None)]
  test_rows = np.asarray([6, 7, 8, 9, 10, 11, 12], np.int32)  # case01 and the plain image.
  data = types.SimpleNamespace(cache=types.SimpleNamespace(samples=samples),
                               rows={'test': test_rows})
  full = np.ones((helpers.SIZE, helpers.SIZE), np.uint8)

  def fake_slices(state, steps, data, rows, batch_size, threshold, decoder):
    assert sorted(rows.tolist()) == list(range(6, 12))  # Only the slices of volumes.
    assert decoder == 'r'  # CERS's result: the retrieval-aware decoder.
    return {int(r): full * (samples[r].slice_index % 2) for r in rows}

  monkeypatch.setattr(nifti_out, '_predicted_slices', fake_slices)
  written = nifti_out.write_predicted_volumes(None, None, data, config, str(tmp_path / 'out'))
  assert [os.path.basename(p) for p in written] == ['case01_pred.nii.gz']
  labels = np.asanyarray(nib.load(written[0]).dataobj)
  assert labels.shape == helpers.SHAPE
  assert [int(labels[..., i].max()) for i in range(helpers.SHAPE[2])] == [0, 1, 0, 1, 0, 1]
  assert labels[..., 1].all()
