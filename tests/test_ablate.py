"""scripts/ablate.py: its grids' commands (one warm-up continued per variant, or runs from
scratch), the study table with paired differences and the latency column, Fig. 3, and one
real grid of run.py processes on the tiny config."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import cli_helpers

_SPEC = importlib.util.spec_from_file_location(
    'ablate', os.path.join(os.path.dirname(__file__), '..', 'scripts', 'ablate.py'))
ablate = importlib.util.module_from_spec(_SPEC)
sys.modules['ablate'] = ablate  # Its dataclasses look their module up by name.
_SPEC.loader.exec_module(ablate)

IDS = [f'img{i}' for i in range(12)]
TINY = os.path.join('tests', 'run_configs', 'tiny_run.py')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_run(run, dice_r, dice_s):
  os.makedirs(os.path.join(run, 'eval'))
  with open(os.path.join(run, 'eval', 'test_per_image.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['id', 'dice_r', 'iou_r', 'dice_s', 'iou_s'])
    writer.writerows([i, r, r / (2 - r), s, s / (2 - s)]
                     for i, r, s in zip(IDS, dice_r, dice_s))
  with open(os.path.join(run, 'eval', 'test_summary.json'), 'w') as f:
    json.dump({'dice_r_mean': float(np.mean(dice_r)),
               'iou_r_mean': float(np.mean(dice_r / (2 - dice_r))),
               'dice_s_mean': float(np.mean(dice_s))}, f)


def test_forking_studies_warm_up_once_and_the_others_train_from_scratch(tmp_path, capsys):
  out = str(tmp_path)
  ablate.main(['table2', '--config', 'configs/synthetic.py', '--out', out, '--dry-run',
               '--config.train.epochs=3'])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith('warm-up run.py') and '--mode=warmup' in lines[0]
  assert '--config.pool.mode=image+cot' in lines[0]  # The default variant's flags.
  assert 'eval.which' not in lines[0]
  forks = lines[1:]
  assert len(forks) == len(ablate.MODES)
  for mode, line in zip(ablate.MODES, forks):
    # Tested at its own last state, not the shared warm-up's best checkpoint.
    assert '--config.eval.which=latest --mode=all --config.train.epochs=3' in line
    assert f'--config.pool.mode={mode} ' in line
    assert (f'--workdir={out}/default_fork/frac0.25/seed0' if mode == 'image+cot'
            else f'--workdir={out}/table2/frac0.25/seed0/{mode}') in line
  # table2's and cot_source's default rows are one run: CERS as configured, continued.
  assert (ablate.workdir(out, 'table2', 0.25, 0, 'image+cot')
          == ablate.workdir(out, 'cot_source', 0.25, 0, 'mask')
          != ablate.workdir(out, 'topk', 0.25, 0, 'k5'))
  ablate.main(['cot_source', '--config', 'configs/synthetic.py', '--out', out, '--dry-run'])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith('warm-up run.py') and len(lines) == 3
  assert '--config.pool.cot_source=no_mask --config.eval.which=latest' in lines[2]
  ablate.main(['table3', '--config', 'configs/synthetic.py', '--out', out, '--dry-run',
               '--seeds', '0,1'])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 10 and not any('warm-up' in line for line in lines)
  assert not any('eval.which' in line for line in lines)
  # Table 3's default row: CERS as configured, trained from scratch, every ablated setting
  # spelt out.
  shared = [line for line in lines if f'--workdir={out}/default/frac0.25/seed' in line]
  assert len(shared) == 2 and all('--config.model.decoder=mcam' in line for line in shared)
  assert sum('--config.model.decoder=unet' in line for line in lines) == 2
  assert sum('--config.model.mcam.multi_scale=False' in line for line in lines) == 2
  with pytest.raises(SystemExit):
    ablate.main(['topk', '--config', 'c.py', '--out', out, '--variants', 'k4'])
  with pytest.raises(SystemExit, match='only --config'):
    ablate.main(['topk', '--config', 'c.py', '--out', out, '--epochs', '3'])


def test_table_pairs_each_variant_with_the_default_and_reads_latency(tmp_path, capsys):
  out = str(tmp_path)
  rng = np.random.default_rng(0)
  base = rng.uniform(0.4, 0.8, len(IDS))
  shifts = {'none': -0.05, 'image': -0.02, 'image+cot': 0.0}
  for mode, shift in shifts.items():
    _fake_run(ablate.workdir(out, 'table2', 0.25, 0, mode), base + shift, base - 0.1)
  latency = tmp_path / 'latency.json'
  latency.write_text(json.dumps({'modes': [
      {'mode': 'none', 'added_seconds': 0.0}, {'mode': 'image', 'added_seconds': 0.012},
      {'mode': 'image+cot', 'added_seconds': 0.02}]}))
  result = ablate.main(['table2', '--config', 'configs/synthetic.py', '--out', out,
                        '--table-only', '--variants', 'none,image,image+cot', '--latency',
                        str(latency), '--resamples', '100'])
  text = capsys.readouterr().out
  assert result['variants']['none/0.25']['paired']['diff'] == pytest.approx(-0.05)
  assert 'paired' not in result['variants']['image+cot/0.25']
  assert f'| none | `pool.mode=none` | {100 * np.mean(base - 0.05):.2f} |' in text
  assert '| -5.00 | [-5.00, -5.00] |' in text and text.count('+0.0120 |') == 1
  assert os.path.isfile(os.path.join(out, 'table2', 'table.md'))
  # Against no retrieval instead: its own files, the default's table left as it was.
  result = ablate.main(['table2', '--config', 'configs/synthetic.py', '--out', out,
                        '--table-only', '--variants', 'none,image,image+cot', '--reference',
                        'none', '--resamples', '100'])
  assert result['variants']['image/0.25']['paired']['diff'] == pytest.approx(0.03)
  assert 'paired' not in result['variants']['none/0.25']
  assert '| D_r − none |' in capsys.readouterr().out
  assert os.path.isfile(os.path.join(out, 'table2', 'table_vs_none.json'))
  with open(os.path.join(out, 'table2', 'table.json')) as f:
    assert json.load(f)['reference'] == 'image+cot'
  with pytest.raises(SystemExit):
    ablate.main(['table2', '--config', 'c.py', '--out', out, '--variants', 'image',
                 '--reference', 'none'])


def _fake_report(run, modes):
  folder = os.path.join(run, 'retrieval', 'after_warmup')
  os.makedirs(folder)
  with open(os.path.join(folder, 'report.json'), 'w') as f:
    json.dump(dict(split='val', k=5, k_coarse=50, num_queries=12, pool_size=40, modes={
        mode: dict(ref_mask_dice=dice, label_match=match)
        for mode, (dice, match) in modes.items()}), f)


def test_cot_source_reports_what_each_pools_cots_retrieve(tmp_path, capsys):
  out = str(tmp_path)
  base = np.linspace(0.3, 0.9, len(IDS))
  for name, shift, cot in (('mask', 0.0, (0.10, 0.25)), ('no_mask', 0.01, (0.20, 0.75))):
    run = ablate.workdir(out, 'cot_source', 0.25, 0, name)
    _fake_run(run, base + shift, base)
    _fake_report(run, {'random': (0.07, 0.1), 'image': (0.24, 0.63), 'cot': cot,
                       'image+cot': (cot[0] + 0.05, cot[1] - 0.05)})
  result = ablate.main(['cot_source', '--config', 'configs/synthetic.py', '--out', out,
                        '--table-only', '--resamples', '50'])
  text = capsys.readouterr().out
  assert result['variants']['no_mask/0.25']['paired']['diff'] == pytest.approx(0.01)
  retrieved = result['after_warmup']
  assert retrieved['no_mask/cot/0.25'] == dict(ref_mask_dice=[0.20], label_match=[0.75])
  assert retrieved['mask/image+cot/0.25']['label_match'] == [pytest.approx(0.20)]
  assert not any(key.split('/')[1] == 'random' for key in retrieved)
  assert '| pool.cot_source, mode | reference mask Dice | label match |' in text
  assert '| no_mask, cot | 20.00 | 75.00 |' in text and '12 val queries' in text


def test_topk_draws_fig3(tmp_path):
  out = str(tmp_path)
  for seed in (0, 1):
    for k in (1, 3, 5):
      value = np.full(len(IDS), 0.5 + 0.01 * k + 0.01 * seed)
      _fake_run(ablate.workdir(out, 'topk', 0.25, seed, f'k{k}'), value, value)
  result = ablate.main(['topk', '--config', 'configs/synthetic.py', '--out', out,
                        '--table-only', '--variants', 'k1,k3,k5', '--seeds', '0,1',
                        '--resamples', '50'])
  assert result['variants']['k1/0.25']['dice_r'] == pytest.approx([0.51, 0.52])
  with open(result['figure'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # Means 51.5 to 55.5 points, std 0.71: the error bars fill the axis,
  low, high = result['figure_ylim']
  assert low == pytest.approx(51.5 - 0.5 ** 0.5) and high == pytest.approx(55.5 + 0.5 ** 0.5)
  # but differences far smaller than a Dice point are drawn on at least 2 points.
  for seed in (0, 1):
    for k in (1, 3, 5):
      _fake_run(ablate.workdir(out, 'topk', 0.5, seed, f'k{k}'),
                np.full(len(IDS), 0.6 + 1e-4 * k), np.full(len(IDS), 0.6))
  result = ablate.main(['topk', '--config', 'configs/synthetic.py', '--out', out,
                        '--table-only', '--variants', 'k1,k3,k5', '--seeds', '0,1',
                        '--fractions', '0.5', '--resamples', '50'])
  low, high = result['figure_ylim']
  assert high - low >= ablate.FIG3_MIN_SPAN and low < 60.01 < 60.05 < high


@pytest.mark.slow
def test_real_grids_on_the_tiny_config(tmp_path, monkeypatch, capsys):
  """table2's forks continue the one warm-up; table3's ablated decoder trains from scratch."""
  for name, value in cli_helpers.run_env().items():
    monkeypatch.setenv(name, value)
  out = str(tmp_path)
  flags = ['--config', TINY, '--out', out, '--resamples', '50',
           '--config.train.epochs=1', '--config.eval.surface=False',
           '--config.eval.bootstrap_resamples=0']
  result = ablate.main(['table2', '--variants', 'none', *flags])  # + image+cot, the default.
  warm = ablate.warmup_dir(out, 0.25, 0)
  with open(os.path.join(warm, 'metrics.jsonl')) as f:
    warm_records = [json.loads(line) for line in f]
  for mode in ('none', 'image+cot'):
    run = ablate.workdir(out, 'table2', 0.25, 0, mode)
    with open(os.path.join(run, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    assert records[:len(warm_records)] == warm_records  # Continued, not retrained.
    assert any(r.get('stage') == 'semi' for r in records[len(warm_records):])
  assert result['variants']['none/0.25']['paired']['n'] > 0
  # Beside it, what each mode retrieves from the warm-up's pool (its retrieval report).
  report = result['after_warmup']
  assert set(ablate.MODES) - {'none'} <= {key.split('/')[0] for key in report}
  assert all(0 <= v <= 1 for row in report.values() for v in row['ref_mask_dice'])
  assert '| image+cot | ' in capsys.readouterr().out.split('What each mode retrieves')[1]
  # Runs again: everything is done, nothing is retrained.
  ablate.main(['table2', '--variants', 'none', *flags])
  assert capsys.readouterr().out.count('done, skipped') == 2
  # Swin widths must double: (8, 16, 32, 64) for both runs of this grid. (MCAM's parts are
  # checked at model level in test_decoders.py: one run fewer here.)
  result = ablate.main(['table3', '--variants', 'swin_unet', *flags,
                        '--config.train.warmup_epochs=1',
                        '--config.model.encoder_dims=(8,16,32,64)'])
  assert [name.split('/')[0] for name in result['variants']] == ['mcam', 'swin_unet']
  assert result['variants']['swin_unet/0.25']['paired']['n'] > 0
  capsys.readouterr()
  # cot_source's default row is table2's image+cot run, done already: no_mask continues the
  # same warm-up and builds its pool again from no-mask CoTs,
  result = ablate.main(['cot_source', *flags])
  assert capsys.readouterr().out.count('done, skipped') == 2  # The warm-up and mask.
  fork = ablate.workdir(out, 'cot_source', 0.25, 0, 'no_mask')
  with open(os.path.join(fork, 'metrics.jsonl')) as f:
    assert [json.loads(line) for line in f][:len(warm_records)] == warm_records
  # the pool a run trained with no_mask from scratch has after its warm-up, and not the
  # warm-up's.
  scratch = os.path.join(out, 'scratch_no_mask')
  subprocess.run([sys.executable, *ablate.command(
      TINY, scratch, 0.25, 0, out, ['--config.pool.cot_source=no_mask'], 'warmup',
      flags[6:])], cwd=ROOT, check=True, capture_output=True)
  reports = {name: ablate._reports([run])[0]['modes'] for name, run in (
      ('scratch', scratch), ('fork', fork), ('mask', warm))}
  for mode in ablate.COT_SOURCE_MODES:
    for key in ('ref_mask_dice', 'label_match', 'score_min', 'score_max'):
      assert reports['fork'][mode][key] == pytest.approx(reports['scratch'][mode][key],
                                                         abs=1e-6)
  assert reports['fork']['cot'] != reports['mask']['cot']
  assert reports['fork']['image'] == reports['mask']['image']  # The same warm-up.
  assert set(result['after_warmup']) == {f'{name}/{mode}/0.25' for name in ('mask', 'no_mask')
                                         for mode in ablate.COT_SOURCE_MODES}
