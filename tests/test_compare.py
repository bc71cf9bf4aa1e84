"""Paired comparison of runs from fabricated per-image CSVs."""

import csv
import json
import math
import os

import numpy as np
import pytest

from cers_jax import compare
from cers_jax import stats
from cers_jax.errors import WorkdirError

COLUMNS = ('dice_r', 'iou_r', 'hd95_r', 'assd_r', 'nsd_r', 'dice_s', 'iou_s')


def _write(workdir, rows, split='test'):
  os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
  with open(os.path.join(workdir, 'eval', f'{split}_per_image.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return str(workdir)


def _rows(seed, shift=0.0, ids=None, unit='px'):
  rng = np.random.default_rng(seed)
  ids = ids or [f'img{i}' for i in range(12)]
  rows = []
  for image in ids:
    dice = float(np.clip(rng.uniform(0.4, 0.9) + shift, 0, 1))
    rows.append(dict(id=image, row=len(rows), mask_empty=False, dice_r=dice,
                     iou_r=dice / (2 - dice), hd95_r=10 * (1 - dice), assd_r=3 * (1 - dice),
                     nsd_r=dice, dice_s=dice - 0.01, iou_s=dice / 2, surface_case_r='both_present',
                     surface_unit=unit))
  return rows


def test_compare_tables_by_hand(tmp_path):
  a = compare.read_side(_write(tmp_path / 'a', _rows(0, shift=0.05)))
  b = compare.read_side(_write(tmp_path / 'b', _rows(0)))
  rows = compare.compare_tables(a, b, resamples=200)
  assert [r['metric'] for r in rows] == ['dice_r', 'iou_r', 'hd95_r', 'assd_r', 'nsd_r']
  dice = rows[0]
  va = np.array([a[i]['dice_r'] for i in sorted(a)])
  vb = np.array([b[i]['dice_r'] for i in sorted(b)])
  assert dice['n'] == 12 and dice['mean_a'] == pytest.approx(va.mean())
  assert dice['diff'] == pytest.approx((va - vb).mean())
  assert dice['ci95'] == stats.paired_bootstrap_diff(va, vb, resamples=200)['ci95']
  assert dice['p'] == pytest.approx(stats.wilcoxon_p(va, vb))
  assert rows[2]['better'] == 'lower' and rows[2]['unit'] == 'px' and rows[0]['unit'] == ''
  both = compare.compare_tables(a, b, decoders=('r', 's'), resamples=50)
  assert [r['metric'] for r in both][-2:] == ['dice_s', 'iou_s']
  # Lists of rows work as well as {id: row} tables.
  listed = compare.compare_tables([dict(id=k, **v) for k, v in a.items()], b, resamples=200)
  assert listed == rows


def test_seeds_are_averaged_per_image_before_pairing(tmp_path):
  a0 = _write(tmp_path / 'a0', _rows(1))
  a1 = _write(tmp_path / 'a1', _rows(2))
  pooled = compare.read_side(f'{a0},{a1}')
  one, two = compare.read_per_image(a0), compare.read_per_image(a1)
  assert pooled['img3']['dice_r'] == pytest.approx((one['img3']['dice_r'] +
                                                    two['img3']['dice_r']) / 2)
  assert pooled['img3']['surface_case_r'] == 'both_present'


def test_nan_scores_leave_the_pair(tmp_path):
  rows_a, rows_b = _rows(0), _rows(0)
  rows_a[0]['hd95_r'] = math.nan
  a = compare.read_side(_write(tmp_path / 'a', rows_a))
  b = compare.read_side(_write(tmp_path / 'b', rows_b))
  hd95 = {r['metric']: r for r in compare.compare_tables(a, b, resamples=20)}['hd95_r']
  assert hd95['n'] == 11 and hd95['diff'] == 0.0 and hd95['p'] == 1.0


def test_mismatched_images_are_an_error_naming_the_workdir_and_ids(tmp_path):
  a = _write(tmp_path / 'a', _rows(0))
  b = _write(tmp_path / 'b', _rows(0, ids=[f'img{i}' for i in range(1, 13)]))
  with pytest.raises(WorkdirError, match=r'b scored other images than .*a: missing 1 '
                                         r'\(img0\); extra 1 \(img12\)'):
    compare.compare_tables(compare.read_side(a), compare.read_side(b), names=(a, b))
  c = _write(tmp_path / 'c', _rows(0, ids=[f'img{i}' for i in range(5)]))
  with pytest.raises(WorkdirError, match=r'c scored other images than .*a: missing 7 '
                                         r'\(img10, img11, img5, img6, img7 and 2 more\)'):
    compare.read_side(f'{a},{c}')
  with pytest.raises(WorkdirError, match='no eval/test_per_image.csv'):
    compare.read_side(str(tmp_path / 'nothing'))
  mm = _write(tmp_path / 'mm', _rows(0, unit='mm'))
  with pytest.raises(WorkdirError, match='surfaces in px'):
    compare.compare_tables(compare.read_side(a), compare.read_side(mm))


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
  a = _write(tmp_path / 'a', _rows(0, shift=0.05), split='val')
  b = _write(tmp_path / 'b', _rows(0), split='val')
  out = tmp_path / 'cmp.json'
  rows = compare.main([a, b, '--split', 'val', '--decoders', 'r,s', '--json', str(out),
                       '--resamples', '100'])
  text = capsys.readouterr().out
  assert 'val: 12 images, paired' in text and 'Dice D_r' in text and 'HD95 D_r (px)' in text
  assert 'Wilcoxon p' in text and 'IoU D_s' in text
  with open(out) as f:
    saved = json.load(f)
  assert saved['rows'] == json.loads(json.dumps(rows)) and saved['images'] == 12
  with pytest.raises(SystemExit, match='error: .*no eval/test_per_image.csv'):
    compare.main([a, b])
  with pytest.raises(SystemExit, match='error: .*/a has no decoder x: its per-image scores '
                     'name r, s'):
    compare.main([a, b, '--split', 'val', '--decoders', 'x'])
  with pytest.raises(SystemExit, match="error: --decoders=''"):
    compare.main([a, b, '--decoders', ''])


def test_runs_of_two_methods_pair_their_own_decoders(tmp_path, capsys):
  cers = _write(tmp_path / 'cers', _rows(0, shift=0.05))
  baseline_rows = [{k.replace('_r', '_seg'): v for k, v in row.items()
                    if not k.endswith('_s')} for row in _rows(0)]
  baseline = _write(tmp_path / 'unet', baseline_rows)
  rows = compare.main([cers, baseline, '--decoders', 'r', '--decoders-b', 'seg',
                       '--resamples', '50'])
  dice = next(r for r in rows if r['metric'] == 'dice_r-dice_seg')
  want_a = np.mean([r['dice_r'] for r in _rows(0, shift=0.05)])
  want_b = np.mean([r['dice_r'] for r in _rows(0)])
  assert dice['mean_a'] == pytest.approx(want_a) and dice['mean_b'] == pytest.approx(want_b)
  assert dice['diff'] == pytest.approx(want_a - want_b)
  assert 'Dice r vs seg' in capsys.readouterr().out
  with pytest.raises(SystemExit, match='unet has no decoder r: its per-image scores name seg'):
    compare.main([cers, baseline, '--decoders', 'r'])
  with pytest.raises(SystemExit, match='pair them one to one'):
    compare.main([cers, baseline, '--decoders', 'r,s', '--decoders-b', 'seg'])
