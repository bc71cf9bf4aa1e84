"""scripts/table1.py on fabricated run folders: its commands, its skipping of finished
runs, Table 1's layout (mean ± std over seeds) and the paired differences to CERS."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    'table1', os.path.join(os.path.dirname(__file__), '..', 'scripts', 'table1.py'))
table1 = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(table1)

IDS = [f'img{i}' for i in range(10)]


def _fake_run(run, decoder, dice):
  os.makedirs(os.path.join(run, 'eval'))
  with open(os.path.join(run, 'eval', 'test_per_image.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['id', f'dice_{decoder}', f'iou_{decoder}'])
    writer.writerows([i, d, d / (2 - d)] for i, d in zip(IDS, dice))
  with open(os.path.join(run, 'eval', 'test_summary.json'), 'w') as f:
    json.dump({f'dice_{decoder}_mean': float(np.mean(dice)),
               f'iou_{decoder}_mean': float(np.mean(dice / (2 - dice)))}, f)


def test_table_layout_and_paired_differences(tmp_path, capsys):
  out = str(tmp_path)
  rng = np.random.default_rng(0)
  base = rng.uniform(0.5, 0.8, len(IDS))
  for seed, shift in ((0, 0.0), (1, 0.02)):
    _fake_run(table1.workdir(out, 0.25, seed, 'cers'), 'r', base + shift)
    _fake_run(table1.workdir(out, 0.25, seed, 'supervised'), 'seg', base + shift - 0.1)
  result = table1.main(['--config', 'configs/brisc_small.py', '--out', out, '--methods',
                        'cers,supervised', '--seeds', '0,1', '--table-only',
                        '--resamples', '100'])
  text = capsys.readouterr().out
  cers = [np.mean(base), np.mean(base + 0.02)]
  want = f'{100 * np.mean(cers):.2f} ± {100 * np.std(cers, ddof=1):.2f}'
  assert f'| cers | {want} |' in text
  paired = result['paired_to_cers']
  assert len(paired) == 1 and paired[0]['method'] == 'supervised'
  assert paired[0]['diff'] == pytest.approx(-0.1) and paired[0]['n'] == len(IDS)
  assert '| 0.25 | supervised | 10 | -10.00 |' in text
  assert os.path.isfile(os.path.join(out, 'table1.md'))


def test_commands_skip_finished_runs_and_refuse_strays(tmp_path, capsys):
  out = str(tmp_path)
  _fake_run(table1.workdir(out, 0.25, 0, 'cers'), 'r', np.full(len(IDS), 0.5))
  table1.main(['--config', 'configs/synthetic.py', '--out', out, '--methods',
               'cers,bcp', '--dry-run', '--config.train.epochs=3'])
  text = capsys.readouterr().out
  assert 'cers: done, skipped' in text
  assert ('--config.method=bcp --config.seed=0 --config.data.labeled_fraction=0.25' in text
          and text.rstrip().endswith('--mode=all --config.train.epochs=3'))
  with pytest.raises(SystemExit, match='only --config'):
    table1.main(['--config', 'c.py', '--out', out, '--epochs', '3'])
  with pytest.raises(Exception, match='nope'):
    table1.main(['--config', 'c.py', '--out', out, '--methods', 'nope', '--dry-run'])
