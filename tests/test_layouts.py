"""Tests for cers_jax.data.layouts on tiny folders in each layout and on the real BRISC set."""

import collections
import os
import pathlib

import ml_collections
import numpy as np
import openpyxl
import pandas as pd
import pytest
from PIL import Image

from cers_jax.data import layouts
from cers_jax.data.records import DataError

SHARED = pathlib.Path(os.environ.get(
    'CERS_SHARED_DIR', pathlib.Path(__file__).resolve().parents[1].parent / 'shared'))
COT = 'Texture: t\nBoundary: b\nContext: c\nSummary: s'


def _image(path, mode='L', size=(24, 20)):
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(len(str(path)))
  Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).convert(mode).save(path)


def _mask(path, size=(24, 20)):
  path.parent.mkdir(parents=True, exist_ok=True)
  m = np.zeros(size[::-1], np.uint8)
  m[5:10, 6:12] = 255
  Image.fromarray(m).save(path)


def _csv(path, header, rows):
  path.write_text('\n'.join([header] + [f'{a},"{b}"' for a, b in rows]) + '\n')


def _kinds(scan):
  return collections.Counter(p.kind for p in scan.problems)


def test_registry():
  assert layouts.LAYOUTS == {'cers': layouts.read_cers, 'lvit': layouts.read_lvit,
                             'brisc': layouts.read_brisc, 'nifti': layouts.read_nifti}


def test_cers_layout(tmp_path):
  for i in range(4):
    _image(tmp_path / 'frames' / f'img{i}.png')
  _image(tmp_path / 'frames' / 'img0.jpg', 'RGB')  # Same id as img0.png: a duplicate.
  (tmp_path / 'frames' / 'notes.txt').write_text('not an image')
  for i in range(3):
    _mask(tmp_path / 'masks' / f'img{i}.png')
  _mask(tmp_path / 'masks' / 'stray.png')
  _csv(tmp_path / 'text.csv', 'image,text',
       [(f'img{i}.png', f'text {i}') for i in range(4)] + [('ghost.png', 'who')])
  _csv(tmp_path / 'cot_output_mask.csv', 'image,cot', [('img0', COT), ('img1', COT)])
  scan = layouts.read_cers(str(tmp_path))
  assert [s.id for s in scan.samples] == ['img0', 'img1', 'img2', 'img3']
  s0 = scan.samples[0]
  assert s0.image_path.endswith('frames/img0.jpg')  # Sorted names: .jpg before .png.
  assert s0.mask_path.endswith('masks/img0.png')
  assert (s0.text, s0.cot_mask, s0.cot_no_mask) == ('text 0', COT, None)
  assert scan.samples[3].mask_path is None
  assert all(s.official_split == '' and s.group == '' for s in scan.samples)
  assert _kinds(scan) == {'duplicate_image': 1, 'missing_mask': 1, 'orphan_mask': 1,
                          'unknown_image': 1, 'missing_cot_mask': 2,
                          'no_annotation_file': 1}
  ghost = next(p for p in scan.problems if p.kind == 'unknown_image')
  assert (ghost.id, ghost.line) == ('ghost', 6) and ghost.file.endswith('text.csv')


def test_cers_configured_paths_relative_to_root(tmp_path):
  _image(tmp_path / 'frames' / 'a.png')
  _mask(tmp_path / 'masks' / 'a.png')
  (tmp_path / 'ann').mkdir()
  _csv(tmp_path / 'ann' / 'r.csv', 'image,text', [('a.png', 'hello')])
  _csv(tmp_path / 'ann' / 'c.csv', 'image,cot', [('a', COT)])
  scan = layouts.read_cers(str(tmp_path), text_csv='ann/r.csv', cot_no_mask_csv='ann/c.csv')
  assert (scan.samples[0].text, scan.samples[0].cot_no_mask) == ('hello', COT)
  with pytest.raises(DataError, match=r"cot_mask annotation file 'ann/x.csv' not found.*"
                     r"config.data.cot_mask_csv"):
    layouts.read_cers(str(tmp_path), cot_mask_csv='ann/x.csv')


def _lvit(root, prefix):
  """A tiny LViT folder: QaTa style when prefix='mask_', MosMedData+ style when ''."""
  for folder, names in (('Train_Folder', ['a', 'b', 'c']), ('Val_Folder', ['d']),
                        ('Test_Folder', ['e', 'f'])):
    for name in names:
      _image(root / folder / 'img' / f'{name}.png')
      _mask(root / folder / 'labelcol' / f'{prefix}{name}.png')
    split = folder.split('_')[0]
    pd.DataFrame({'Image': [f'{prefix}{n}.png' for n in names],
                  'Description': [f'report {n}' for n in names]}).to_excel(
                      root / folder / f'{split}_text.xlsx', index=False)


@pytest.mark.parametrize('prefix', ['mask_', ''], ids=['qata', 'mosmed'])
def test_lvit_layout(tmp_path, prefix):
  _lvit(tmp_path, prefix)
  scan = layouts.read_lvit(str(tmp_path))
  assert [(s.id, s.official_split) for s in scan.samples] == [
      ('a', 'train'), ('b', 'train'), ('c', 'train'), ('d', 'val'), ('e', 'test'),
      ('f', 'test')]
  assert all(s.text == f'report {s.id}' for s in scan.samples)
  assert all(os.path.basename(s.mask_path) == f'{prefix}{s.id}.png' for s in scan.samples)
  assert len(scan.annotation_files) == 3
  assert _kinds(scan) == {'no_annotation_file': 2}  # No CoT files in the folder.


def test_lvit_text_csv_overrides_xlsx(tmp_path):
  _lvit(tmp_path, 'mask_')
  _csv(tmp_path / 'text.csv', 'image,text', [(f'{n}.png', f'csv {n}') for n in 'abcdef'])
  scan = layouts.read_lvit(str(tmp_path), text_csv='text.csv')
  assert [s.text for s in scan.samples] == [f'csv {n}' for n in 'abcdef']


def test_lvit_missing_folders(tmp_path):
  with pytest.raises(DataError, match=r"Train_Folder is not a folder, but layout 'lvit'"):
    layouts.read_lvit(str(tmp_path))


def _workbook(path, rows, header=('Image', 'Description'), first_sheet=None):
  """An .xlsx like LViT's: one sheet with `header` (or a leading sheet `first_sheet`)."""
  book = openpyxl.Workbook()
  sheet = book.active
  if first_sheet is not None:
    sheet.title = 'About'
    for row in first_sheet:
      sheet.append(list(row))
    sheet = book.create_sheet('Texts')
  sheet.append(list(header))
  for row in rows:
    sheet.append(list(row))
  path.parent.mkdir(parents=True, exist_ok=True)
  book.save(path)


def _lvit_images(root, prefix):
  """LViT folders without text files: train a,b,c; val d; test e,f."""
  for folder, names in (('Train_Folder', 'abc'), ('Val_Folder', 'd'), ('Test_Folder', 'ef')):
    for name in names:
      _image(root / folder / 'img' / f'{name}.png')
      _mask(root / folder / 'labelcol' / f'{prefix}{name}.png')


@pytest.mark.parametrize('where', ['root', 'folders'])
def test_lvit_finds_workbooks_as_downloaded(tmp_path, where):
  _lvit_images(tmp_path, 'mask_')
  train_dir = tmp_path if where == 'root' else tmp_path / 'Train_Folder'
  test_dir = tmp_path if where == 'root' else tmp_path / 'Test_Folder'
  # QaTa's published names; train and val rows share one workbook.
  _workbook(train_dir / 'Train_text_for_Covid19.xlsx',
            [(f'mask_{n}.png', f'report {n}') for n in 'abcd'])
  _workbook(test_dir / 'Test_text_for_Covid19.xlsx',
            [(f'mask_{n}.png', f'report {n}') for n in 'ef'])
  _workbook(tmp_path / 'notes.xlsx', [('x', 'y')], header=('Patient', 'Comment'))
  (tmp_path / '~$Test_text_for_Covid19.xlsx').write_bytes(b'Excel lock file')
  (tmp_path / 'broken.xlsx').write_bytes(b'not a zip')
  scan = layouts.read_lvit(str(tmp_path))
  assert [(s.id, s.text) for s in scan.samples] == [(n, f'report {n}') for n in 'abcdef']
  files = {os.path.basename(f['path']): f for f in scan.annotation_files}
  assert set(files) == {'Train_text_for_Covid19.xlsx', 'Test_text_for_Covid19.xlsx'}
  train = files['Train_text_for_Covid19.xlsx']
  assert (train['found_by'], train['rows'], train['matched'], train['duplicates'],
          train['unknown'], train['sheet']) == ('content', 4, 4, 0, 0, 'Sheet')
  assert _kinds(scan) == {'ignored_workbook': 1, 'unreadable_workbook': 1,
                          'no_annotation_file': 2}
  ignored = next(p for p in scan.problems if p.kind == 'ignored_workbook')
  assert ignored.file.endswith('notes.xlsx') and "'Patient', 'Comment'" in ignored.detail
  searched = scan.annotation_search['text']
  assert str(tmp_path / 'Val_Folder') in searched and "'description'" in searched


def test_lvit_workbook_text_on_a_later_sheet(tmp_path):
  _lvit_images(tmp_path, '')
  _workbook(tmp_path / 'Val_text_MosMedData+ 1.xlsx', [(f'{n}.png', f't {n}') for n in 'abcdef'],
            first_sheet=[('Readme',), ('LViT text annotations',)])
  scan = layouts.read_lvit(str(tmp_path))
  assert all(s.text == f't {s.id}' for s in scan.samples)
  assert scan.annotation_files[0]['sheet'] == 'Texts'


def test_lvit_without_text_files_says_where_it_looked(tmp_path):
  _lvit_images(tmp_path, 'mask_')
  scan = layouts.read_lvit(str(tmp_path))
  assert all(s.text is None for s in scan.samples)
  missing = [p for p in scan.problems if p.kind == 'no_annotation_file']
  assert len(missing) == 3
  text = next(p for p in missing if 'no text file' in p.detail)
  for folder in ('Train_Folder', 'Val_Folder', 'Test_Folder'):
    assert str(tmp_path / folder) in text.detail
  assert 'text.csv (config.data.text_csv is empty)' in text.detail
  # Without workbooks the root's text.csv (image names, like the CERS authors') is read.
  _csv(tmp_path / 'text.csv', 'image,text', [(f'{n}.png', f'csv {n}') for n in 'abcdef'])
  scan = layouts.read_lvit(str(tmp_path))
  assert [s.text for s in scan.samples] == [f'csv {n}' for n in 'abcdef']
  assert scan.annotation_files[0]['found_by'] == 'default'


def test_text_csv_list_and_globs_merge_keep_the_first(tmp_path, monkeypatch):
  root, texts = tmp_path / 'ds', tmp_path / 'texts'
  _lvit_images(root, '')
  _workbook(texts / 'Train_text_MosMedData+ 1.xlsx', [(f'{n}.png', f'train {n}') for n in 'abc'])
  _workbook(texts / 'Val_text_MosMedData+ 1.xlsx',
            [('d.png', 'val d'), ('a.png', 'other a'), ('ghost.png', 'nobody')])
  _workbook(texts / 'Test_text_MosMedData+.xlsx', [(f'{n}.png', f'test {n}') for n in 'ef'])
  monkeypatch.chdir(tmp_path)  # Relative items: from the working directory, else the root.
  configured = 'texts/Train_text_MosMedData+ 1.xlsx, texts/V*.xlsx,texts/Test_*.xlsx'
  scan = layouts.read_lvit(str(root), text_csv=configured)
  assert [s.text for s in scan.samples] == [
      'train a', 'train b', 'train c', 'val d', 'test e', 'test f']
  counts = [(os.path.basename(f['path']), f['found_by'], f['matched'], f['duplicates'],
             f['unknown']) for f in scan.annotation_files]
  assert counts == [('Train_text_MosMedData+ 1.xlsx', 'config', 3, 0, 0),
                    ('Val_text_MosMedData+ 1.xlsx', 'config', 1, 1, 1),
                    ('Test_text_MosMedData+.xlsx', 'config', 2, 0, 0)]
  duplicate = next(p for p in scan.problems if p.kind == 'duplicate_id')
  assert (duplicate.id, duplicate.line) == ('a', 3)
  assert duplicate.file.endswith('Val_text_MosMedData+ 1.xlsx')
  assert 'Train_text_MosMedData+ 1.xlsx line 2 (different value); kept the first' in (
      duplicate.detail)
  assert _kinds(scan)['unknown_image'] == 1
  # A glob naming the same files again reads each once; a whole path may hold a comma.
  scan = layouts.read_lvit(str(root), text_csv=f'{texts}/*.xlsx,texts/T*.xlsx')
  assert len(scan.annotation_files) == 3
  (texts / 'all, texts.csv').write_text('image,text\na.png,comma\n')
  scan = layouts.read_lvit(str(root), text_csv='texts/all, texts.csv')
  assert scan.samples[0].text == 'comma'
  with pytest.raises(DataError, match=r"text annotation file 'texts/\*.txt' not found.*"
                     r"config.data.text_csv \(now 'texts/Train_text_MosMedData\+ 1.xlsx,"
                     r"texts/\*.txt'\): one path, or a comma-separated list"):
    layouts.read_lvit(str(root), text_csv='texts/Train_text_MosMedData+ 1.xlsx,texts/*.txt')
  with pytest.raises(DataError, match=r"texts is a folder: name files in it, e.g. "
                     r"'texts/\*.xlsx'"):
    layouts.read_lvit(str(root), text_csv='texts')


def test_globs_from_the_root_and_for_cot_files(tmp_path, monkeypatch):
  _image(tmp_path / 'frames' / 'a.png')
  _image(tmp_path / 'frames' / 'b.png')
  _csv(tmp_path / 'text_1.csv', 'image,text', [('a.png', 'one')])
  _csv(tmp_path / 'text_2.csv', 'image,text', [('b.png', 'two'), ('a.png', 'one')])
  _csv(tmp_path / 'cot_a.csv', 'image,cot', [('a', COT)])
  _csv(tmp_path / 'cot_b.csv', 'image,cot', [('b', COT)])
  monkeypatch.chdir(tmp_path / 'frames')  # Nothing matches here: the root is tried next.
  scan = layouts.read_cers(str(tmp_path), text_csv='text_*.csv', cot_no_mask_csv='cot_?.csv')
  assert [(s.text, s.cot_no_mask) for s in scan.samples] == [('one', COT), ('two', COT)]
  duplicate = next(p for p in scan.problems if p.kind == 'duplicate_id')
  assert duplicate.id == 'a' and '(same value)' in duplicate.detail


def _brisc(root):
  task = root / 'segmentation_task'
  for split, names in (('train', ['t1', 't2', 't3']), ('test', ['s1'])):
    for name in names:
      _image(task / split / 'images' / f'{name}.jpg', 'RGB')
      _mask(task / split / 'masks' / f'{name}.png')
  _csv(root / 'text.csv', 'image,text', [(f'{n}.jpg', n) for n in ['t1', 't2', 't3', 's1']])
  return task


def test_brisc_layout(tmp_path):
  task = _brisc(tmp_path)
  for root in (tmp_path, task):  # The dataset folder or segmentation_task itself.
    scan = layouts.read_brisc(str(root), text_csv=str(tmp_path / 'text.csv'))
    assert [(s.id, s.official_split, s.text) for s in scan.samples] == [
        ('s1', 'test', 's1'), ('t1', 'train', 't1'), ('t2', 'train', 't2'),
        ('t3', 'train', 't3')]
  with pytest.raises(DataError, match='segmentation_task'):
    layouts.read_brisc(str(tmp_path / 'segmentation_task' / 'train'))


def test_empty_and_missing_datasets(tmp_path):
  (tmp_path / 'frames').mkdir()
  with pytest.raises(DataError, match=r"No images found for layout 'cers' under"):
    layouts.read_cers(str(tmp_path))
  with pytest.raises(DataError, match=r'frames is not a folder.*found in'):
    layouts.read_cers(str(tmp_path / 'frames'))


def test_read_dataset_dispatch_and_errors(tmp_path):
  _brisc(tmp_path)
  data = ml_collections.ConfigDict({'layout': 'brisc', 'root': str(tmp_path),
                                    'text_csv': '', 'cot_mask_csv': '',
                                    'cot_no_mask_csv': ''})
  assert len(layouts.read_dataset(data).samples) == 4
  data.layout = 'kaggle'
  with pytest.raises(DataError, match=r"Unknown data.layout 'kaggle'; choices"):
    layouts.read_dataset(data)
  data.layout, data.root = 'brisc', str(tmp_path / 'nowhere')
  with pytest.raises(DataError, match='is not a folder'):
    layouts.read_dataset(data)


def test_real_brisc_joins_everything():
  root = SHARED / 'data' / 'brisc2025_mini'
  cot = SHARED / 'data' / 'cers_cot' / 'brisc2025'
  if not (root.is_dir() and cot.is_dir()):
    pytest.skip(f'{root} or {cot} absent (set CERS_SHARED_DIR to the shared folder)')
  scan = layouts.read_brisc(str(root), text_csv=str(cot / 'text.csv'),
                            cot_mask_csv=str(cot / 'cot_output_gpt5_mask.csv'),
                            cot_no_mask_csv=str(cot / 'cot_output_gpt5_no_mask.csv'))
  assert len(scan.samples) == 99
  assert collections.Counter(s.official_split for s in scan.samples) == {'train': 72,
                                                                          'test': 27}
  for s in scan.samples:
    assert s.mask_path and os.path.basename(s.mask_path) == f'{s.id}.png'
    assert s.text and s.text.endswith('.')
    assert s.cot_mask.startswith('Texture:') and s.cot_no_mask.startswith('Texture:')
  kinds = _kinds(scan)
  # Each CSV covers all 4793 BRISC images: the rest are reported, one row each.
  assert kinds['unknown_image'] == 3 * (4793 - 99)
  assert not any(k.startswith('missing') or k == 'orphan_mask' for k in kinds)
