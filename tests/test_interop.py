"""Working with other tools, end to end on one tiny run (docs/interop.md): a published split
file drives the run, `cers_jax.score` re-scores its predicted masks exactly as its eval did,
and the exported predictor runs without this package."""

import csv
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from cers_jax import compare
from cers_jax import score
from cers_jax.inference import evaluate
from cers_jax.training import experiment
from cers_jax.training import loop

import cli_helpers

pytestmark = pytest.mark.slow  # The fixture starts run.py.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join('tests', 'run_configs', 'tiny_run.py')
IDS = [f'syn_{i:04d}' for i in range(64)]
# A BCP-style published split: 40 train (6 labeled), 8 val, 16 test (all predicted).
TRAIN, VAL, TEST, LABELED = IDS[:40], IDS[40:48], IDS[48:], IDS[:6]


def _write_lists(folder):
  os.makedirs(folder)
  for name, ids in (('train', TRAIN), ('val', VAL), ('test', TEST), ('labeled', LABELED)):
    with open(os.path.join(folder, f'{name}.list'), 'w') as f:
      f.write(''.join(f'{i}.png\n' for i in ids))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny CERS trained 1 + 1 epochs on the split of a list folder, evaluated and
  predicted (--mode all)."""
  base = tmp_path_factory.mktemp('interop')
  lists = str(base / 'lists')
  _write_lists(lists)
  workdir = str(base / 'run')
  result = subprocess.run(
      [sys.executable, 'run.py', f'--config={CONFIG}', f'--workdir={workdir}',
       f'--config.data.split_file={lists}', '--config.train.warmup_epochs=1',
       '--config.train.epochs=1'], cwd=REPO, env=cli_helpers.run_env(),
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
  return workdir, lists


def test_published_split_file_drives_the_run(run):
  workdir, lists = run
  with open(os.path.join(workdir, 'data', 'split.json')) as f:
    manifest = json.load(f)
  assert manifest['protocol'] == 'file'
  assert manifest['source'].startswith(f'file {os.path.abspath(lists)} (sha256 ')
  assert manifest['ids'] == {'train_labeled': LABELED, 'train_unlabeled': TRAIN[6:],
                             'val': VAL, 'test': TEST}
  with open(os.path.join(workdir, 'eval', 'test_per_image.csv')) as f:
    assert sorted(r['id'] for r in csv.DictReader(f)) == TEST


def _rows(path):
  with open(path, newline='') as f:
    return {r['id']: r for r in csv.DictReader(f)}


def test_score_reproduces_the_runs_own_eval_from_its_masks(run, tmp_path, capsys):
  workdir, _ = run
  masks = os.path.join(workdir, 'predictions')  # predict's masks/<id>.png (D_r, 0/255)
  out = str(tmp_path / 'scored')
  assert score.main([masks, '--workdir', workdir, '--decoder', 'r', '--out', out]) == 0
  ours = _rows(os.path.join(workdir, 'eval', 'test_per_image.csv'))
  theirs = _rows(os.path.join(out, 'eval', 'test_per_image.csv'))
  assert sorted(theirs) == TEST
  columns = [c for c in next(iter(theirs.values())) if c != 'id']
  assert {'dice_r', 'iou_r', 'inter_px_r', 'gt_px', 'hd95_r', 'nsd_r',
          'surface_case_r', 'surface_unit'} <= set(columns)
  for i in TEST:
    assert {c: theirs[i][c] for c in columns} == {c: ours[i][c] for c in columns}, i
  with open(os.path.join(out, 'eval', 'test_summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, 'eval', 'test_summary.json')) as f:
    evaluated = json.load(f)
  for key in ('dice_r_mean', 'dice_r_pooled', 'iou_r_per_image_ci95', 'hd95_r_mean',
              'empty_masks', 'count'):
    assert summary[key] == evaluated[key], key
  assert (summary['missing_predictions'], summary['unmatched_files']) == (0, 0)
  # compare pairs the scored folder with the run: no difference on any image.
  rows = compare.main([workdir, out, '--decoders', 'r', '--resamples', '50'])
  dice = next(r for r in rows if r['metric'] == 'dice_r')
  assert dice['n'] == len(TEST) and dice['diff'] == 0.0


def test_score_names_missing_and_unmatched_files(run, tmp_path, capsys):
  workdir, _ = run
  folder = tmp_path / 'theirs'
  shutil.copytree(os.path.join(workdir, 'predictions', 'masks'), folder)
  # Another tool's names: suffixes are matched; a stray file and a missing one are not.
  os.rename(folder / f'{TEST[1]}.png', folder / f'{TEST[1]}_pred.png')
  os.remove(folder / f'{TEST[0]}.png')
  shutil.copy(folder / f'{TEST[2]}.png', folder / 'not_an_image_of_test.png')
  assert score.main([str(folder), '--workdir', workdir, '--decoder', 'seg']) == 1
  err = capsys.readouterr().err
  assert f'no mask for 1 of the 16 test images: {TEST[0]}' in err and '--missing empty' in err
  assert score.main([str(folder), '--workdir', workdir, '--missing', 'empty']) == 0
  assert '1 missing (scored empty), 1 unmatched files (not_an_image_of_test.png)' in (
      capsys.readouterr().out)
  with open(folder / 'eval' / 'test_summary.json') as f:
    summary = json.load(f)
  assert summary['missing_ids'] == [TEST[0]] and summary['count'] == 16
  assert summary['unmatched_names'] == ['not_an_image_of_test.png']
  scored = _rows(folder / 'eval' / 'test_per_image.csv')
  assert scored[TEST[0]]['pred_px_seg'] == '0'


# Run as `python -I -c BLOCKER`: imports of these fail, and the loader must not need them.
_BLOCKER = """
import importlib.abc, runpy, sys
BLOCKED = ('cers_jax', 'flax', 'orbax', 'transformers', 'optax', 'ml_collections', 'grain')
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'the exported predictor must not import {name}')
sys.meta_path.insert(0, Block())
sys.path.extend(p for p in sys.argv[1].split(':') if p)  # where flatbuffers lies
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED]
"""


def test_exported_predictor_runs_without_the_package_and_matches(run, tmp_path):
  flatbuffers = pytest.importorskip('flatbuffers', reason='jax.export serializes with it')
  workdir, _ = run
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  summary = loop.train_and_evaluate(config, workdir, mode='export')
  folder = summary['export_dir']
  with open(os.path.join(folder, 'predictor.json')) as f:
    spec = json.load(f)
  assert spec['batch_polymorphic'] and spec['inputs'][0]['shape'] == ['b', 32, 32, 3]
  assert 'cpu' in spec['platforms'] and os.path.isfile(os.path.join(folder, 'run_exported.py'))

  exp, state, meta = experiment.from_workdir(workdir, config.eval.which)
  try:
    steps = loop.scoring_context(exp, meta).steps
    data = exp.data
    rows = np.asarray(data.rows['test'])
    expected = np.concatenate([out['prob_r'] for _, out, _ in evaluate.predict_rows(
        state, steps, data, rows, 4)])
  finally:
    exp.checkpoints.close()
  t = data.tokens
  inputs = dict(image=np.asarray(data.cache.images[rows]), text_ids=t['text_ids'][rows],
                text_mask=t['text_mask'][rows], cot_ids=t['cot_no_mask_ids'][rows],
                cot_mask=t['cot_no_mask_mask'][rows], report_ids=t['report_cot_ids'][rows],
                report_mask=t['report_cot_mask'][rows])
  np.savez(tmp_path / 'inputs.npz', **inputs)
  # A batch of 16, where evaluation ran batches of 4: the batch is symbolic.
  result = subprocess.run(
      [sys.executable, '-I', '-c', _BLOCKER,
       os.path.dirname(os.path.dirname(flatbuffers.__file__)),
       os.path.join(folder, 'run_exported.py'), folder,
       str(tmp_path / 'inputs.npz'), str(tmp_path / 'probs.npy')],
      cwd=str(tmp_path), env=dict(cli_helpers.run_env(), PYTHONPATH=''),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert '16 images' in result.stdout
  probs = np.load(tmp_path / 'probs.npy')
  # The loader's texts form builds the same inputs (bicubic resize, both tokenizers).
  sys.path.insert(0, folder)
  try:
    import run_exported
  finally:
    sys.path.remove(folder)
  sample = data.cache.samples[rows[0]]
  built = run_exported.inputs_from_files(folder, spec, sample.image_path, sample.text,
                                         sample.cot_no_mask)
  for name, value in built.items():
    np.testing.assert_array_equal(value[0], inputs[name][0], err_msg=name)
  assert probs.shape == expected.shape == (16, 32, 32, 1)
  diff = float(np.abs(probs - expected).max())
  print(f'exported vs in-process: max abs difference {diff:.3g}')
  np.testing.assert_allclose(probs, expected, atol=1e-5)
