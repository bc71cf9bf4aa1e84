"""Tests for cers_jax.data.synthetic: layout, determinism and the designed ambiguity."""

import csv
import os
import time

import numpy as np
from PIL import Image
import pytest

from cers_jax.data import synthetic

_CLASS_WORDS = {w for words in synthetic._CLASS_WORDS.values() for w in words}


def _read_csv(path):
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f))


def _files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('syn'))
  start = time.perf_counter()
  summary = synthetic.generate_synthetic(root, num_images=240, image_size=64, seed=0)
  return root, summary, time.perf_counter() - start


def test_layout_and_files(dataset):
  root, summary, seconds = dataset
  assert seconds < 20, f'240 images took {seconds:.1f}s'
  ids = [f'syn_{i:04d}' for i in range(240)]
  assert sorted(os.listdir(os.path.join(root, 'frames'))) == [f'{i}.png' for i in ids]
  assert sorted(os.listdir(os.path.join(root, 'masks'))) == [f'{i}.png' for i in ids]
  for name in ('text.csv', 'cot_output_mask.csv', 'cot_output_no_mask.csv', 'README.txt',
               'attributes.csv'):
    assert os.path.exists(os.path.join(root, name)), name
  image = Image.open(os.path.join(root, 'frames', 'syn_0000.png'))
  assert image.mode == 'L' and image.size == (64, 64)
  texts = _read_csv(os.path.join(root, 'text.csv'))
  assert [r['image'] for r in texts] == [f'{i}.png' for i in ids]  # File names, as authors'.
  for name in ('cot_output_mask.csv', 'cot_output_no_mask.csv'):
    cots = _read_csv(os.path.join(root, name))
    assert [r['image'] for r in cots] == ids  # Stems.
    for row in cots:
      lines = row['cot'].split('\n')
      assert [l.split(':')[0] for l in lines] == ['Texture', 'Boundary', 'Context', 'Summary']
  assert summary['num_images'] == 240
  assert summary['contained'] + summary['infiltrative'] + summary['empty'] == 240
  assert summary['empty'] > 5 and summary['contained'] > 60 and summary['infiltrative'] > 60
  assert summary['two_lesions'] > 10
  assert 'synthetic dataset' in open(os.path.join(root, 'README.txt')).read()


def test_masks_binary_and_empty_ones_empty(dataset):
  root, _, _ = dataset
  attrs = _read_csv(os.path.join(root, 'attributes.csv'))
  for row in attrs:
    mask = np.asarray(Image.open(os.path.join(root, 'masks', row['image'] + '.png')))
    assert set(np.unique(mask)) <= {0, 255}
    assert (mask.any()) == (row['lesion_class'] != 'none'), row
    assert abs((mask > 0).mean() - float(row['mask_fraction'])) < 1e-3


def test_text_never_names_the_class_but_cots_do(dataset):
  root, _, _ = dataset
  attrs = {r['image']: r for r in _read_csv(os.path.join(root, 'attributes.csv'))}
  for row in _read_csv(os.path.join(root, 'text.csv')):
    assert not any(w in row['text'].lower() for w in _CLASS_WORDS), row
  for name, key in (('cot_output_mask.csv', 'lesion_class'),
                    ('cot_output_no_mask.csv', 'no_mask_cot_class')):
    for row in _read_csv(os.path.join(root, name)):
      stated = attrs[row['image']][key]
      summary = row['cot'].split('\n')[3].lower()
      if stated == 'none':
        assert 'no lesion' in summary
        continue
      other = [c for c in synthetic.CLASSES if c != stated][0]
      assert any(w in summary for w in synthetic._CLASS_WORDS[stated]), row
      assert not any(w in summary for w in synthetic._CLASS_WORDS[other]), row
  errors = sum(r['no_mask_cot_class'] != r['lesion_class'] for r in attrs.values())
  # Mask CoTs are always right; about 10% of the no-mask CoTs are wrong.
  assert 5 <= errors <= 45


def test_classes_look_alike_but_masks_differ(dataset):
  """The designed ambiguity: image statistics match across classes, mask extents do not."""
  root, _, _ = dataset
  stats = {c: {'bright': [], 'area': []} for c in synthetic.CLASSES}
  for row in _read_csv(os.path.join(root, 'attributes.csv')):
    if row['lesion_class'] == 'none' or row['num_lesions'] != '1':
      continue
    image = np.asarray(Image.open(os.path.join(root, 'frames', row['image'] + '.png')),
                       np.float32)
    stats[row['lesion_class']]['bright'].append((image > image.mean() + 40).mean())
    stats[row['lesion_class']]['area'].append(float(row['mask_fraction']))
  a, b = stats[synthetic.CONTAINED], stats[synthetic.INFILTRATIVE]
  # Bright-area fraction of the image: within 10% between the classes...
  assert abs(np.mean(a['bright']) - np.mean(b['bright'])) < 0.1 * np.mean(a['bright'])
  # ...while the infiltrative masks (core + rim) are far larger.
  assert np.mean(b['area']) > 2.0 * np.mean(a['area'])


def test_same_seed_byte_identical_and_prefix_stable(tmp_path):
  a, b, c, d = (str(tmp_path / n) for n in 'abcd')
  synthetic.generate_synthetic(a, num_images=20, image_size=48, seed=3)
  synthetic.generate_synthetic(b, num_images=20, image_size=48, seed=3)
  assert _files(a) == _files(b)
  synthetic.generate_synthetic(c, num_images=20, image_size=48, seed=4)
  files_a, files_c = _files(a), _files(c)
  assert files_a.keys() == files_c.keys()
  assert sum(files_a[k] != files_c[k] for k in files_a) > 20
  synthetic.generate_synthetic(d, num_images=10, image_size=48, seed=3)
  files_d = _files(d)
  for i in range(10):
    for sub in ('frames', 'masks'):
      key = os.path.join(sub, f'syn_{i:04d}.png')
      assert files_d[key] == files_a[key]


def test_regenerate_replaces_previous_and_refuses_foreign_folder(tmp_path):
  root = str(tmp_path / 'syn')
  synthetic.generate_synthetic(root, num_images=12, image_size=32)
  synthetic.generate_synthetic(root, num_images=6, image_size=32)
  assert len(os.listdir(os.path.join(root, 'frames'))) == 6
  foreign = tmp_path / 'mine'
  (foreign / 'frames').mkdir(parents=True)
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(foreign / 'frames' / 'x.png')
  with pytest.raises(FileExistsError, match='mine'):
    synthetic.generate_synthetic(str(foreign), num_images=2, image_size=32)
