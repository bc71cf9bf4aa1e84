"""configs/qata.py and configs/mosmed.py on LViT's layout with the text workbooks named and
placed as users download them (issue 15): `run.py --mode prepare` as a user runs it.

QaTa-COV19: `Train_text_for_Covid19.xlsx` (train and val rows) and `Test_text_for_Covid19.xlsx`
in the dataset folder, masks `mask_<image>`. MosMedData+: `Train_text_MosMedData+ 1.xlsx`,
`Val_text_MosMedData+ 1.xlsx`, `Test_text_MosMedData+.xlsx` inside the `*_Folder`s, masks
named like their images. Workbooks as LViT's: one sheet, header Image, Description, rows
keyed by the mask file name with its extension.
"""

import json
import os
import subprocess
import sys

import numpy as np
import openpyxl
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # Prepares datasets through run.py processes.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {'Train_Folder': 'train', 'Val_Folder': 'val', 'Test_Folder': 'test'}
NAMES = {'Train_Folder': 6, 'Val_Folder': 2, 'Test_Folder': 2}  # Images per folder.


def _workbook(path, rows):
  book = openpyxl.Workbook()
  sheet = book.active
  sheet.append(['Image', 'Description'])
  for row in rows:
    sheet.append(list(row))
  book.save(path)


def _lvit(root, stem, mask_prefix):
  """Images and masks in LViT's folders; returns {folder: [(image id, mask file name)]}."""
  rng = np.random.default_rng(0)
  made = {}
  for folder, n in NAMES.items():
    made[folder] = []
    for i in range(n):
      image_id = f'{stem}_{folder[:2].lower()}{i}'
      mask_name = f'{mask_prefix}{image_id}.png'
      for sub in ('img', 'labelcol'):
        os.makedirs(os.path.join(root, folder, sub), exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (36, 40), dtype=np.uint8)).save(
          os.path.join(root, folder, 'img', f'{image_id}.png'))
      mask = np.zeros((36, 40), np.uint8)
      mask[8:20, 10:16 + i] = 255
      Image.fromarray(mask).save(os.path.join(root, folder, 'labelcol', mask_name))
      made[folder].append((image_id, mask_name))
  return made


def _text(image_id):
  return f'Bilateral pulmonary infection, lower left lung of {image_id}.'


def _rows(made, *folders):
  return [(mask, _text(image_id)) for folder in folders for image_id, mask in made[folder]]


def _prepare(tmp_path, config, root, *flags):
  workdir = str(tmp_path / 'work')
  env = dict(os.environ, JAX_PLATFORMS='cpu', TQDM_DISABLE='1')
  result = subprocess.run(
      [sys.executable, 'run.py', f'--config={config}', '--mode=prepare',
       f'--workdir={workdir}', f'--config.data.root={root}', '--config.data.image_size=32',
       '--config.tokenizer.vocab_size=100', *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  return result, workdir


def _load(workdir, name):
  with open(os.path.join(workdir, 'data', name)) as f:
    return json.load(f)


def _check_prepared(result, workdir, made, workbooks):
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
  report = _load(workdir, 'report.json')
  n = sum(NAMES.values())
  assert report['counts']['images'] == report['counts']['with_text'] == n
  assert not any(k.startswith('missing') or k == 'ignored_workbook'
                 for k in report['problem_counts'])
  text_files = [f for f in report['annotation_files'] if f['kind'] == 'text']
  assert [os.path.basename(f['path']) for f in text_files] == workbooks
  assert all(f['found_by'] == 'content' and f['rows'] == f['matched'] for f in text_files)
  assert sum(f['matched'] for f in text_files) == n
  assert f'{n} images, {n} with masks, {n} with text, ' in result.stderr
  for name in workbooks:
    assert name in result.stderr  # The per-file log line.
  split = _load(workdir, 'split.json')
  assert split['protocol'] == 'official'
  ids = {folder: sorted(i for i, _ in pairs) for folder, pairs in made.items()}
  assert split['ids']['test'] == ids['Test_Folder']
  assert split['ids']['val'] == ids['Val_Folder']
  assert sorted(split['ids']['train_labeled'] + split['ids']['train_unlabeled']) == (
      ids['Train_Folder'])
  assert len(split['ids']['train_labeled']) == 2  # 25% of 6, rounded.
  samples = {s['id']: s for s in _load(workdir, 'samples.json')}
  assert all(samples[i]['official_split'] == FOLDERS[folder]
             for folder, folder_ids in ids.items() for i in folder_ids)
  assert all(s['text'] == _text(i) for i, s in samples.items())


def test_qata_as_downloaded(tmp_path):
  root = tmp_path / 'QaTa-COV19'
  made = _lvit(str(root), 'covid', 'mask_')
  workbooks = ['Test_text_for_Covid19.xlsx', 'Train_text_for_Covid19.xlsx']
  _workbook(root / workbooks[1], _rows(made, 'Train_Folder', 'Val_Folder'))
  _workbook(root / workbooks[0], _rows(made, 'Test_Folder'))
  result, workdir = _prepare(tmp_path, 'configs/qata.py', root)
  _check_prepared(result, workdir, made, workbooks)


def test_mosmed_as_downloaded(tmp_path):
  root = tmp_path / 'MosMedDataPlus'
  made = _lvit(str(root), 'study_0255', '')
  workbooks = ['Train_text_MosMedData+ 1.xlsx', 'Val_text_MosMedData+ 1.xlsx',
               'Test_text_MosMedData+.xlsx']
  for folder, name in zip(FOLDERS, workbooks):
    _workbook(root / folder / name, _rows(made, folder))
  result, workdir = _prepare(tmp_path, 'configs/mosmed.py', root)
  _check_prepared(result, workdir, made, workbooks)


# With pretrained tokenizers, prepare used to exit 0 and leave every text empty.
@pytest.mark.parametrize('flags', [(), ('--config.tokenizer.text_dir=/nowhere',
                                        '--config.tokenizer.cot_dir=/nowhere')],
                         ids=['trained_tokenizers', 'pretrained_tokenizer_flags'])
def test_qata_without_text_stops_in_prepare(tmp_path, flags):
  root = tmp_path / 'QaTa-COV19'
  _lvit(str(root), 'covid', 'mask_')
  result, workdir = _prepare(tmp_path, 'configs/qata.py', root, *flags)
  assert result.returncode != 0
  assert 'None of the 10 images under' in result.stderr
  assert '--config.data.text_csv' in result.stderr and 'Train_Folder' in result.stderr
  assert 'train_wordpiece' not in result.stderr and 'Traceback' not in result.stderr
  assert not os.path.exists(os.path.join(workdir, 'tokenizers'))
  assert 'error' in _load(workdir, 'report.json')
