"""Tests for cers_jax.data.splits: the three protocols, labeled subsets, manifest checks."""

import json
import os

import ml_collections
import pytest

from cers_jax.data import splits
from cers_jax.data.records import SPLIT_NAMES, DataError, Sample


def _samples(n, *, official=None, masked=None, name='case{g}_{i}', per_group=1):
  out = []
  for k in range(n):
    g, i = divmod(k, per_group)
    sample_id = name.format(g=g, i=i)
    out.append(Sample(id=sample_id, image_path=f'{sample_id}.png',
                      mask_path=None if masked is not None and not masked(k) else 'm.png',
                      text=None, cot_mask=None, cot_no_mask=None,
                      official_split=official(k) if official else ''))
  return out


def _all(split):
  return [i for name in SPLIT_NAMES for i in split[name]]


def test_paper_protocol_sizes_disjoint_deterministic():
  samples = _samples(100)
  split = splits.make_split(samples, protocol='paper', seed=0, labeled_fraction=0.25)
  sizes = {k: len(v) for k, v in split.items()}
  assert sizes == {'train_labeled': 20, 'train_unlabeled': 60, 'val': 10, 'test': 10}
  assert sorted(_all(split)) == sorted(s.id for s in samples)  # A partition.
  assert all(v == sorted(v) for v in split.values())
  assert splits.make_split(samples[::-1], protocol='paper', seed=0,
                           labeled_fraction=0.25) == split  # Input order is irrelevant.
  other = splits.make_split(samples, protocol='paper', seed=1, labeled_fraction=0.25)
  assert other['test'] != split['test']


def test_labeled_subsets_are_nested_and_do_not_move_val_test():
  samples = _samples(200)
  by_fraction = {f: splits.make_split(samples, protocol='paper', seed=3, labeled_fraction=f)
                 for f in (0.0, 0.25, 0.5, 1.0)}
  assert by_fraction[0.0]['train_labeled'] == []
  assert len(by_fraction[1.0]['train_unlabeled']) == 0
  assert set(by_fraction[0.25]['train_labeled']) < set(by_fraction[0.5]['train_labeled'])
  for split in by_fraction.values():
    assert split['val'] == by_fraction[0.25]['val']
    assert split['test'] == by_fraction[0.25]['test']


def test_tiny_dataset_and_maskless_images():
  samples = _samples(6, masked=lambda k: k < 4)
  split = splits.make_split(samples, protocol='paper', seed=0, labeled_fraction=0.01)
  assert len(split['val']) == 1 and len(split['test']) == 1 and len(split['train_labeled']) == 1
  # Images without masks can only be unlabeled training images.
  assert {'case4_0', 'case5_0'} <= set(split['train_unlabeled'])
  assert not {'case4_0', 'case5_0'} & set(split['val'] + split['test'] + split['train_labeled'])
  with pytest.raises(DataError, match='No image has a mask'):
    splits.make_split(_samples(3, masked=lambda k: False), protocol='paper', seed=0)


def test_official_protocol():
  official = lambda k: 'test' if k % 5 == 0 else 'train'
  samples = _samples(50, official=official)
  split = splits.make_split(samples, protocol='official', seed=0, val_fraction=0.1,
                            labeled_fraction=0.5)
  assert split['test'] == sorted(s.id for s in samples if s.official_split == 'test')
  assert len(split['val']) == 4 and len(split['train_labeled']) == 18
  with_val = _samples(30, official=lambda k: ('train', 'val', 'test')[k % 3])
  split = splits.make_split(with_val, protocol='official', seed=0)
  assert split['val'] == sorted(s.id for s in with_val if s.official_split == 'val')
  with pytest.raises(DataError, match=r'needs the layout.*split_protocol=paper'):
    splits.make_split(_samples(10), protocol='official', seed=0, layout='cers')


def test_official_keeps_unmasked_val_and_test_images_out_of_training():
  folder = lambda k: ('train', 'val', 'test')[k % 3]
  samples = _samples(30, official=folder, masked=lambda k: k >= 3)  # k=0,1,2: no mask.
  split = splits.make_split(samples, protocol='official', seed=0)
  assert samples[0].id in split['train_unlabeled']  # The train folder's: unlabeled data.
  assert samples[1].id not in _all(split) and samples[2].id not in _all(split)
  paper = splits.make_split(samples, protocol='paper', seed=0)
  assert {s.id for s in samples[:3]} <= set(paper['train_unlabeled'])


def test_grouped_protocol_keeps_groups_together():
  samples = _samples(120, per_group=6, name='Jun_case{g}_{i}')
  split = splits.make_split(samples, protocol='grouped', seed=0, group_regex=r'^(.*)_\d+$',
                            labeled_fraction=0.25)
  side = {}
  for name in ('train_labeled', 'train_unlabeled', 'val', 'test'):
    for i in split[name]:
      side.setdefault(i.rsplit('_', 1)[0], set()).add('train' if name.startswith('train')
                                                       else name)
  assert len(side) == 20 and all(len(v) == 1 for v in side.values())
  assert len(split['test']) == 12 and len(split['val']) == 12
  # The paper protocol on the same ids does mix cases across sides (why 'grouped' exists).
  paper = splits.make_split(samples, protocol='paper', seed=0)
  groups_of = lambda ids: {i.rsplit('_', 1)[0] for i in ids}
  assert groups_of(paper['test']) & groups_of(paper['train_labeled'] + paper['train_unlabeled'])
  with pytest.raises(DataError,
                     match=r"group_regex 'xyz.*' does not match sample id 'Jun_case0_0'"):
    splits.make_split(samples, protocol='grouped', seed=0, group_regex=r'xyz(\d)')


def test_bad_arguments():
  samples = _samples(10)
  with pytest.raises(DataError, match=r"Unknown data.split_protocol 'random'"):
    splits.make_split(samples, protocol='random', seed=0)
  with pytest.raises(DataError, match='split_ratios'):
    splits.make_split(samples, protocol='paper', seed=0, ratios=(0.8, 0.1, 0.2))
  with pytest.raises(DataError, match='labeled_fraction'):
    splits.make_split(samples, protocol='paper', seed=0, labeled_fraction=1.5)


def _settings(**overrides):
  data = ml_collections.ConfigDict({'split_protocol': 'paper', 'labeled_fraction': 0.25,
                                    'split_ratios': (0.8, 0.1, 0.1), 'val_fraction': 0.1,
                                    'group_regex': ''})
  data.update(overrides)
  return splits.split_settings(data, 0)


def test_manifest_round_trip_and_checks(tmp_path):
  samples = _samples(20)
  ids = splits.make_split(samples, protocol='paper', seed=0)
  settings = _settings()
  manifest = splits.build_manifest(ids, settings, dataset_root='/d', layout='cers',
                                   image_size=32)
  path = str(tmp_path / 'split.json')
  splits.write_json(path, manifest)
  loaded = splits.read_manifest(path)
  assert loaded['ids'] == ids and loaded['protocol'] == 'paper' and loaded['seed'] == 0
  known = {s.id for s in samples}
  splits.check_manifest(loaded, settings, path, known)
  # ratios only matter for 'paper'/'grouped'; val_fraction only for 'official'.
  splits.check_manifest(loaded, _settings(val_fraction=0.3), path, known)
  with pytest.raises(DataError, match=r"labeled_fraction: split.json has 0.25, config has "
                     r"0.5.*delete that file"):
    splits.check_manifest(loaded, _settings(labeled_fraction=0.5), path, known)
  with pytest.raises(DataError, match=r"protocol: split.json has 'paper', config has "
                     r"'official'"):
    splits.check_manifest(loaded, _settings(split_protocol='official'), path, known)
  with pytest.raises(DataError, match=r'names 1 ids that are no longer in the dataset'):
    splits.check_manifest(loaded, settings, path, known - {ids['test'][0]})
  (tmp_path / 'bad.json').write_text('{"a": 1}')
  with pytest.raises(DataError, match='not a split manifest'):
    splits.read_manifest(str(tmp_path / 'bad.json'))


def test_labeled_count_asks_for_a_number_of_images():
  samples = _samples(40)
  split = splits.make_split(samples, protocol='paper', seed=0, labeled_count=5)
  assert len(split['train_labeled']) == 5
  # The count is a prefix of the same permutation the fractions use: nested subsets.
  more = splits.make_split(samples, protocol='paper', seed=0, labeled_count=9)
  assert set(split['train_labeled']) < set(more['train_labeled'])
  assert (split['val'], split['test']) == (more['val'], more['test'])
  with pytest.raises(DataError, match='labeled_count=999'):
    splits.make_split(samples, protocol='paper', seed=0, labeled_count=999)


def _published(tmp_path, fmt, samples):
  """A BCP/UniMatch-style split of `samples` written as `fmt`; returns (path, expected)."""
  ids = [s.id for s in samples]
  train, val, test, labeled = ids[:14], ids[14:17], ids[17:], ids[:3]
  if fmt == 'lists':
    folder = tmp_path / 'lists'
    folder.mkdir()
    # File names with folders and extensions, as peers publish them.
    (folder / 'train.list').write_text('\n'.join(f'images/{i}.png' for i in train) + '\n')
    (folder / 'val.txt').write_text('\n'.join(val) + '\n')
    (folder / 'test.txt').write_text('\n'.join(test) + '\n')
    (folder / 'labeled.txt').write_text('\n'.join(labeled) + '\n')
    path = folder
  elif fmt == 'csv':
    path = tmp_path / 'split.csv'
    rows = ['image,split'] + [f'{i}.png,{"labeled" if i in labeled else "train"}'
                              for i in train]
    rows += [f'{i},val' for i in val] + [f'{i},test' for i in test]
    path.write_text('\n'.join(rows) + '\n')
  else:
    path = tmp_path / 'split.json'
    path.write_text(json.dumps({'train': train, 'validation': val, 'test': test,
                                'labeled': labeled}))
  expected = {'train_labeled': sorted(labeled), 'train_unlabeled': sorted(train[3:]),
              'val': sorted(val), 'test': sorted(test)}
  return str(path), expected


@pytest.mark.parametrize('fmt', ['lists', 'csv', 'json'])
def test_published_split_files_in_each_format(tmp_path, fmt):
  samples = _samples(20)
  path, expected = _published(tmp_path, fmt, samples)
  split = splits.make_split(samples, protocol='paper', seed=0, split_file=path)
  assert split == expected
  # Without a labeled list, the count (or fraction) picks labeled ids from train.
  parts = splits.read_split_file(path)
  assert set(parts) >= {'train', 'val', 'test', 'labeled'}


def test_split_file_without_labeled_or_val_and_bad_files(tmp_path):
  samples = _samples(20)
  ids = [s.id for s in samples]
  folder = tmp_path / 'lists'
  folder.mkdir()
  (folder / 'train.txt').write_text('\n'.join(ids[:16]))
  (folder / 'test.txt').write_text('\n'.join(ids[16:]))
  split = splits.make_split(samples, protocol='paper', seed=0, split_file=str(folder),
                            labeled_count=4)
  assert len(split['train_labeled']) == 4 and len(split['val']) == 2
  assert sorted(split['test']) == sorted(ids[16:])
  (folder / 'test.txt').write_text('\n'.join(ids[16:] + ['ghost_1', 'ghost_2']))
  with pytest.raises(DataError, match=r"names 2 images that are not in the dataset: "
                     r"\['ghost_1', 'ghost_2'\]"):
    splits.make_split(samples, protocol='paper', seed=0, split_file=str(folder))
  (folder / 'test.txt').write_text('\n'.join(ids[15:]))
  with pytest.raises(DataError, match='more than one of'):
    splits.make_split(samples, protocol='paper', seed=0, split_file=str(folder))
  with pytest.raises(DataError, match='does not exist'):
    splits.read_split_file(str(tmp_path / 'nope.json'))
  (tmp_path / 'bad.csv').write_text('a,b\n1,2\n')
  with pytest.raises(DataError, match='needs an id column'):
    splits.read_split_file(str(tmp_path / 'bad.csv'))


def test_manifest_records_its_source_and_a_changed_split_file(tmp_path):
  samples = _samples(20)
  path, _ = _published(tmp_path, 'json', samples)
  settings = _settings(split_file=path, labeled_count=0)
  assert settings['protocol'] == 'file'
  ids = splits.make_split(samples, protocol='paper', seed=0, split_file=path)
  manifest = splits.build_manifest(ids, settings, dataset_root='/d', layout='cers',
                                   image_size=32)
  assert manifest['source'].startswith(f'file {os.path.abspath(path)} (sha256 ')
  known = {s.id for s in samples}
  splits.check_manifest(manifest, settings, 'split.json', known)
  with open(path, 'a') as f:
    f.write('\n')
  with pytest.raises(DataError, match='split_file_sha256'):
    splits.check_manifest(manifest, _settings(split_file=path, labeled_count=0),
                          'split.json', known)
  drawn = _settings(labeled_count=7)
  assert 'labeled_count' in splits._relevant(drawn)
  assert splits.split_source(drawn) == "drawn: protocol 'paper', seed 0, 7 labeled images"
