"""Tests for the 'nifti' layout: cers_jax.data.nifti, its reader, decoding, split and cache."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from configs import base
from configs import nifti_example
from cers_jax.core import steps as ts
from cers_jax.data import layouts
from cers_jax.data import nifti
from cers_jax.data import prepare as prepare_lib
from cers_jax.data import splits
from cers_jax.data.records import DataError, Sample, sample_from_dict, sample_to_dict

SHAPE = (20, 24, 6)  # Voxels (X, Y, Z): non-square in-plane, few slices.
SPACING = (0.8, 0.9, 2.5)  # mm: anisotropic.
SIZE = 16  # Cached side.


def affine(spacing=SPACING, offset=(-10.0, 5.0, 30.0)):
  """A known affine: the spacing on the diagonal, a 90-degree in-plane rotation, an offset."""
  out = np.zeros((4, 4))
  out[0, 1], out[1, 0], out[2, 2] = -spacing[1], spacing[0], spacing[2]
  out[:3, 3], out[3, 3] = offset, 1.0
  return out


def sphere(shape=SHAPE, center=(10, 12, 3), radius_mm=4.0, spacing=SPACING):
  grid = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, center, spacing)],
                     indexing='ij')
  return sum(g ** 2 for g in grid) <= radius_mm ** 2


def box(shape=SHAPE, lo=(4, 5, 1), hi=(12, 15, 4)):
  out = np.zeros(shape, bool)
  out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
  return out


def save(path, array, spacing=SPACING):
  nib.save(nib.Nifti1Image(np.asarray(array), affine(spacing)), str(path))
  return str(path)


def image_of(labels, seed=0):
  """A CT-like volume: background around -100 HU, lesion around +80 HU, noise."""
  rng = np.random.default_rng(seed)
  return (np.where(labels, 80.0, -100.0) + rng.normal(0, 10, labels.shape)).astype(np.int16)


def write_dataset(root, cases=4, *, shape=SHAPE, text_by='case', cot=True, lesions=None):
  """images/ and labels/ of `cases` volumes (spheres and boxes), texts and CoTs."""
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  os.makedirs(os.path.join(root, 'labels'), exist_ok=True)
  names = [f'case{c:02d}' for c in range(cases)]
  for c, name in enumerate(names):
    labels = (lesions[c] if lesions is not None else
              sphere(shape) if c % 2 == 0 else box(shape)).astype(np.uint8)
    save(os.path.join(root, 'images', f'{name}.nii.gz'), image_of(labels, c))
    save(os.path.join(root, 'labels', f'{name}.nii.gz'), labels * (1 + c % 2))
  keys = ([f'{n}.nii.gz' for n in names] if text_by == 'case' else
          [nifti.slice_id(n, i) for n in names for i in range(shape[2])])
  with open(os.path.join(root, 'text.csv'), 'w') as f:
    f.write('image,text\n' + ''.join(f'{k},report of {k}\n' for k in keys))
  if cot:
    for kind in ('mask', 'no_mask'):
      with open(os.path.join(root, f'cot_output_{kind}.csv'), 'w') as f:
        f.write('image,cot\n' + ''.join(f'{k},cot {kind} of {k}\n' for k in keys))
  return names


def config_for(root, **nifti_fields):
  config = base.get_config()
  config.data.layout = 'nifti'
  config.data.root = str(root)
  config.data.image_size = SIZE
  for key, value in nifti_fields.items():
    config.data.nifti[key] = value
  return config


def scan(root, **nifti_fields):
  return layouts.read_dataset(config_for(root, **nifti_fields).data)


# ------------------------------------------------------------------ reading and joining


def test_slices_are_samples_joined_by_case_with_spacing_at_the_cached_size(tmp_path):
  names = write_dataset(tmp_path, 3)
  with open(tmp_path / 'text.csv', 'a') as f:  # A slice's own text wins over its case's.
    f.write('case00_s002,own text of slice 2\n')
  result = scan(tmp_path)
  assert len(result.samples) == 3 * SHAPE[2]
  assert [s.id for s in result.samples[:2]] == ['case00_s000', 'case00_s001']
  s = result.samples[2]
  assert (s.volume, s.group, s.slice_index) == ('case00', 'case00', 2)
  assert s.image_path.endswith('images/case00.nii.gz')
  assert s.mask_path.endswith('labels/case00.nii.gz')
  assert s.spacing == pytest.approx((0.8 * 20 / SIZE, 0.9 * 24 / SIZE))
  assert s.slice_thickness == pytest.approx(2.5)
  assert s.text == 'own text of slice 2'
  assert result.samples[3].text == 'report of case00.nii.gz'
  assert all(x.cot_mask == f'cot mask of {x.volume}.nii.gz' for x in result.samples)
  kinds = {p.kind for p in result.problems}
  assert not kinds & {'unknown_image', 'missing_text', 'missing_cot_mask'}, result.problems
  text_file = next(f for f in result.annotation_files if f['kind'] == 'text')
  assert (text_file['matched'], text_file['unknown']) == (len(names) + 1, 0)


def test_texts_keyed_by_slice_id_and_the_slicing_axis(tmp_path):
  write_dataset(tmp_path, 2, text_by='slice')
  result = scan(tmp_path)
  assert result.samples[7].id == 'case01_s001'
  assert result.samples[7].text == 'report of case01_s001'
  along_x = scan(tmp_path, axis=0).samples
  assert len(along_x) == 2 * SHAPE[0]
  assert along_x[0].spacing == pytest.approx((0.9 * 24 / SIZE, 2.5 * 6 / SIZE))
  assert along_x[0].slice_thickness == pytest.approx(0.8)


def test_samples_json_round_trip_and_old_entries(tmp_path):
  write_dataset(tmp_path, 1)
  sample = scan(tmp_path).samples[3]
  entry = json.loads(json.dumps(sample_to_dict(sample, 3)))
  assert sample_from_dict(entry) == sample
  old = {k: v for k, v in entry.items()
         if k not in ('volume', 'slice_index', 'spacing', 'slice_thickness')}
  plain = sample_from_dict(old)
  assert (plain.volume, plain.slice_index, plain.spacing) == ('', -1, None)


def test_bad_settings_name_the_field(tmp_path):
  write_dataset(tmp_path, 1)
  with pytest.raises(DataError, match='data.nifti.axis'):
    scan(tmp_path, axis=3)
  with pytest.raises(DataError, match='data.nifti.window'):
    scan(tmp_path, window=(40.0, 0.0))
  with pytest.raises(DataError, match='images/<case>'):
    layouts.read_dataset(config_for(tmp_path / 'images').data)


# ------------------------------------------------------------------ decoding


def test_decode_volume_windows_slices_and_binarises_labels(tmp_path):
  volume = np.zeros(SHAPE, np.float32)
  volume[..., 1] = np.linspace(-200, 200, SHAPE[0])[:, None]  # A ramp in slice 1.
  labels = box().astype(np.uint8) * 3  # Class 3 is lesion too.
  image_path, label_path = save(tmp_path / 'i.nii', volume), save(tmp_path / 'l.nii', labels)
  settings = nifti.NiftiSettings(window=(0.0, 200.0))  # [-100, 100] -> [0, 255].
  (image, mask, info), = nifti.decode_volume(image_path, label_path, [1], SHAPE[0], settings)
  assert info['error_kind'] == '' and not info['empty_mask']
  assert image.shape == (SHAPE[0], SHAPE[0], 3) and image.dtype == np.uint8
  # Rows run along voxel axis 0; the in-plane shape (20, 24) is resized to 20 x 20.
  expected = np.round((np.clip(np.linspace(-200, 200, SHAPE[0]), -100, 100) + 100) * 255 / 200)
  np.testing.assert_allclose(image[:, 0, 0], expected, atol=2)
  assert mask.max() == 1 and mask.sum() > 0
  lo, hi = nifti.window_bounds(volume, nifti.NiftiSettings())  # Percentiles by default.
  assert (lo, hi) == pytest.approx(tuple(np.percentile(volume, (0.5, 99.5))))
  np.testing.assert_array_equal(nifti.to_uint8(np.array([lo - 5, lo, hi, hi + 5]), lo, hi),
                                [0, 0, 255, 255])
  assert not nifti.to_uint8(np.ones(3), 1.0, 1.0).any()  # A constant volume is black.


def test_prepare_caches_every_slice(tmp_path):
  write_dataset(tmp_path / 'ds', 4)
  prepared = prepare_lib.prepare(config_for(tmp_path / 'ds'), str(tmp_path / 'w'))
  cache = prepared.cache
  assert cache.images.shape == (4 * SHAPE[2], SIZE, SIZE, 3)
  assert cache.samples[1].spacing == pytest.approx((1.0, 1.35))
  settings = nifti.NiftiSettings()
  expected = nifti.decode_volume(cache.samples[9].image_path, cache.samples[9].mask_path,
                                 [3], SIZE, settings)[0]
  np.testing.assert_array_equal(cache.images[9], expected[0])
  np.testing.assert_array_equal(cache.masks[9], expected[1])
  assert cache.masks[0].sum() == 0 and cache.masks[3].sum() > 0  # Empty slices are kept.
  assert prepared.report['problem_counts']['empty_mask'] > 0
  with open(tmp_path / 'w' / 'data' / 'sources.json') as f:
    sources = json.load(f)
  assert len({s['image']['path'] for s in sources}) == 4
  again = prepare_lib.prepare(config_for(tmp_path / 'ds'), str(tmp_path / 'w'))
  assert again.report['reused'] == {'split': True, 'cache': True}
  windowed = prepare_lib.prepare(config_for(tmp_path / 'ds', window=(0.0, 100.0)),
                                 str(tmp_path / 'w'))  # Other pixels: decoded anew.
  assert windowed.report['reused'] == {'split': True, 'cache': False}
  assert not np.array_equal(windowed.cache.images[9], expected[0])


def test_volume_tasks_decode_each_volume_once_and_keep_sample_order():
  samples = [Sample(id=f'{v}_s{i}', image_path=f'{v}.nii', mask_path=None, text=None,
                    cot_mask=None, cot_no_mask=None, volume=v, slice_index=i)
             for v, i in [('a', 0), ('b', 0), ('a', 1), ('b', 1)]]
  samples.insert(2, Sample(id='png', image_path='x.png', mask_path=None, text=None,
                           cot_mask=None, cot_no_mask=None))
  tasks, positions = prepare_lib._decode_tasks(samples, SIZE, nifti.NiftiSettings())
  assert [t[0] for t in tasks] == ['volume', 'volume', 'image']
  assert [t[3] for t in tasks[:2]] == [[0, 1], [0, 1]]
  assert positions == [[0, 3], [1, 4], [2]]
  results = iter([['a0', 'a1'], ['b0', 'b1'], ['png']])
  assert list(prepare_lib._in_order(positions, results)) == ['a0', 'b0', 'png', 'a1', 'b1']


# ------------------------------------------------------------------ bad volumes


def test_every_bad_volume_is_a_named_problem(tmp_path):
  root = tmp_path / 'ds'
  write_dataset(root, 6)
  (root / 'images' / 'case00.nii.gz').write_bytes(b'not a volume')  # unreadable image
  (root / 'labels' / 'case01.nii.gz').write_bytes(b'\x1f\x8b broken')  # unreadable label
  save(root / 'labels' / 'case02.nii.gz', np.zeros((20, 24, 5), np.uint8))  # shape
  save(root / 'labels' / 'case03.nii.gz', np.full(SHAPE, 0.5, np.float32))  # non-integer
  os.remove(root / 'labels' / 'case04.nii.gz')  # image without label
  save(root / 'labels' / 'lonely.nii.gz', box().astype(np.uint8))  # label without image
  with pytest.raises(DataError, match='4 files make the dataset unusable'):
    prepare_lib.prepare(config_for(root), str(tmp_path / 'w'))
  with open(tmp_path / 'w' / 'data' / 'report.json') as f:
    report = json.load(f)
  by_kind = {p['kind']: p for p in report['problems']}
  counts = report['problem_counts']
  for kind, case in [('unreadable_image', 'case00'), ('unreadable_mask', 'case01'),
                     ('size_mismatch', 'case02'), ('non_integer_label', 'case03'),
                     ('missing_mask', 'case04'), ('orphan_mask', 'lonely')]:
    assert counts[kind] == 1, (kind, counts)  # Once per volume, not once per slice.
    assert case in by_kind[kind]['file'], by_kind[kind]
  assert 'every one of its' in by_kind['size_mismatch']['detail']
  assert 'non-integer' in by_kind['non_integer_label']['detail']


def test_empty_margin_drops_slices_far_from_a_lesion(tmp_path):
  lesion = box(lo=(4, 5, 2), hi=(12, 15, 3))  # Lesion in slice 2 only.
  write_dataset(tmp_path, 2, lesions=[lesion, lesion])
  kept = scan(tmp_path, empty_margin=1)
  assert [s.slice_index for s in kept.samples if s.volume == 'case00'] == [1, 2, 3]
  dropped = [p for p in kept.problems if p.kind == 'dropped_slices']
  assert len(dropped) == 2 and '3 of 6 slices' in dropped[0].detail
  assert len(scan(tmp_path).samples) == 12  # -1 (default) keeps every slice.


# ------------------------------------------------------------------ split


def test_paper_split_keeps_each_volume_on_one_side(tmp_path):
  write_dataset(tmp_path / 'ds', 10)
  config = config_for(tmp_path / 'ds')
  assert config.data.split_protocol == 'paper'
  prepared = prepare_lib.prepare(config, str(tmp_path / 'w'))
  assert prepared.manifest['protocol'] == 'grouped'
  side = {}
  for name, ids in prepared.manifest['ids'].items():
    for sample_id in ids:
      side.setdefault(sample_id.rsplit('_s', 1)[0], set()).add(
          'train' if name.startswith('train') else name)
  assert len(side) == 10 and all(len(sides) == 1 for sides in side.values())
  assert {'val', 'test'} <= set.union(*side.values())
  config.data.split_protocol = 'official'
  with pytest.raises(DataError, match='official'):
    splits.make_split(layouts.read_dataset(config.data).samples,
                      protocol=splits.split_protocol(config.data), seed=0)


def test_the_example_config_overrides_only_and_reads_a_dataset(tmp_path):
  config = nifti_example.get_config()
  assert set(config.to_dict()['data']) == set(base.get_config().to_dict()['data'])
  ts.StepConfig.from_config(config)
  write_dataset(tmp_path, 2)
  config.data.root, config.data.image_size = str(tmp_path), SIZE
  samples = layouts.read_dataset(config.data).samples
  assert {s.slice_index for s in samples} == {0, 1, 2, 3, 4, 5}  # Margin 2 keeps these.
