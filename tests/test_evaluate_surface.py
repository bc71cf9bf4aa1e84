"""Evaluation beyond the step's Dice: host masks, pooled Dice, surface metrics, spacing,
the empty-case counts and the on_batch hook (numpy stand-ins for the jitted eval step)."""

import csv
import dataclasses
import json
import math
import types

import numpy as np
import pytest

from cers_jax import sharding
from cers_jax import stats
from cers_jax import surface
from cers_jax.data.cache import Cache
from cers_jax.data.dataset import Data
from cers_jax.errors import ConfigError
from cers_jax.inference import evaluate
from configs import base

S, N, BATCH = 16, 6, 4
ROWS = np.array([5, 0, 3, 1, 4], np.int32)


def _masks() -> np.ndarray:
  masks = np.zeros((N, S, S), np.uint8)
  for r in (1, 2, 4, 5):  # Rows 0 and 3 have empty masks.
    masks[r, 3:3 + r + 2, 4:10] = 1
  return masks


def _pred_r(row: int) -> np.ndarray:
  """D_r: the mask shifted right by one pixel; row 3 gets a false lesion, row 1 none."""
  pred = np.roll(_masks()[row], 1, axis=1).astype(bool)
  if row == 3:
    pred[10:13, 10:13] = True
  if row == 1:
    pred[:] = False
  return pred


class MaskStep:
  """An eval step whose D_r predicts `_pred_r` and D_s predicts nothing; Dice from numpy."""

  def __init__(self):
    self.mesh = sharding.make_mesh()

  def evaluate(self, state, batch):
    index = np.asarray(batch['index'])
    gt = np.asarray(batch['mask'])[..., 0] > 0.5
    prob_r = np.stack([_pred_r(r) for r in index]).astype(np.float32) * 0.9
    prob_s = np.full_like(prob_r, 0.2)
    out = dict(prob_r=prob_r[..., None], prob_s=prob_s[..., None])
    for d, prob in (('r', prob_r), ('s', prob_s)):
      pred = prob > 0.5
      inter = (pred & gt).sum((1, 2))
      total = pred.sum((1, 2)) + gt.sum((1, 2))
      union = total - inter
      out[f'dice_{d}'] = np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))
      out[f'iou_{d}'] = np.where(total == 0, 1.0, inter / np.maximum(union, 1))
    return out


@dataclasses.dataclass
class StepOnly:
  step: np.int32


def _data(spacing=None) -> Data:
  # Samples are read by id and, when present, `spacing`.
  samples = [types.SimpleNamespace(id=f'img{r}', spacing=None if spacing is None
                                   else spacing[r]) for r in range(N)]
  cache = Cache('unused', np.zeros((N, S, S, 3), np.uint8), _masks(), np.ones(N, bool),
                samples, {})
  return Data(cache=cache, rows=dict(val=ROWS), tokens=dict(
      text_ids=np.ones((N, 4), np.int32), text_mask=np.ones((N, 4), np.int32)),
              text_tokenizer=None, cot_tokenizer=None)


def test_records_carry_pixel_counts_and_surface_metrics_of_the_host_masks():
  seen = []
  options = evaluate.EvalOptions(surface=True, tolerance=1.0, bootstrap_resamples=100)
  records = evaluate.per_image('state', MaskStep(), _data(), ROWS, BATCH, options=options,
                               on_batch=lambda *a: seen.append(a))
  assert [r['row'] for r in records] == ROWS.tolist()
  # The hook saw each batch without its padding: 4 rows, then 1.
  assert [a[0].tolist() for a in seen] == [[5, 0, 3, 1], [4]]
  rows, pred_r, pred_s, gt = seen[0]
  assert pred_r.shape == (4, S, S) and pred_r.dtype == bool and not pred_s.any()
  assert (gt == _masks()[rows].astype(bool)).all()
  assert (pred_r[0] == _pred_r(5)).all()
  masks = _masks().astype(bool)
  for r in records:
    row, gt = r['row'], masks[r['row']]
    assert r['gt_px'] == gt.sum() and r['pred_px_r'] == _pred_r(row).sum()
    assert r['inter_px_r'] == (gt & _pred_r(row)).sum() and r['pred_px_s'] == 0
    expected = surface.surface_metrics(_pred_r(row), gt, tolerance=1.0)
    assert (r['hd95_r'], r['assd_r'], r['nsd_r'], r['surface_case_r']) == (
        expected['hd95'], expected['assd'], expected['nsd'], expected['case'])
    assert r['surface_unit'] == 'px'
  by_row = {r['row']: r for r in records}
  assert by_row[0]['surface_case_r'] == 'both_empty' and by_row[3]['surface_case_r'] == 'gt_empty'
  assert by_row[1]['surface_case_r'] == 'pred_empty'
  assert by_row[1]['hd95_r'] == pytest.approx(math.hypot(S, S))
  # A one-pixel shift of a 6-wide box: the left and right edges are 1 away, rows 0 away.
  assert by_row[5]['hd95_r'] == pytest.approx(1.0) and by_row[5]['nsd_r'] == 1.0


def test_summary_pooled_dice_cis_and_empty_case_counts():
  options = evaluate.EvalOptions(surface=True, bootstrap_resamples=200)
  records = evaluate.per_image('state', MaskStep(), _data(), ROWS, BATCH, options=options)
  summary = evaluate.summarize(records, options)
  inter = np.array([r['inter_px_r'] for r in records])
  pred = np.array([r['pred_px_r'] for r in records])
  gt = np.array([r['gt_px'] for r in records])
  assert summary['dice_r_pooled'] == pytest.approx(2 * inter.sum() / (pred.sum() + gt.sum()))
  assert summary['iou_r_pooled'] == pytest.approx(
      inter.sum() / (pred.sum() + gt.sum() - inter.sum()))
  dice = np.array([r['dice_r'] for r in records])
  assert summary['dice_r_mean'] == summary['dice_r_per_image_mean'] == pytest.approx(
      dice.mean())
  assert summary['dice_r_per_image_median'] == pytest.approx(np.median(dice))
  assert summary['dice_r_per_image_ci95'] == stats.bootstrap_ci(dice, resamples=200)
  assert summary['dice_r_pooled_ci95'] == stats.pooled_ci(inter, pred, gt, resamples=200)
  # D_s predicts nothing: pooled Dice 0, the two empty masks score 1 per image.
  assert summary['dice_s_pooled'] == 0.0 and summary['dice_s_mean'] == pytest.approx(2 / 5)
  assert summary['surface_cases_r'] == dict(both_present=2, both_empty=1, pred_empty=1,
                                            gt_empty=1)
  assert summary['surface_cases_s'] == dict(both_present=0, both_empty=2, pred_empty=3,
                                            gt_empty=0)
  # Worst case counts in the mean: a missed lesion never leaves the average.
  hd95 = np.array([r['hd95_r'] for r in records])
  assert summary['hd95_r_mean'] == pytest.approx(hd95.mean()) and summary['hd95_r_count'] == 5
  assert summary['surface_unit'] == 'px' and 'image diagonal' in summary['surface_empty_rule']


def test_nan_rules_leave_images_out_and_count_them():
  rule = surface.EmptyRule(both_empty='nan', one_empty='nan')
  options = evaluate.EvalOptions(surface=True, empty_rule=rule, bootstrap_resamples=50)
  summary = evaluate.evaluate_rows('state', MaskStep(), _data(), ROWS, BATCH, options=options)
  assert summary['hd95_r_count'] == 2 and summary['nsd_s_count'] == 0
  assert math.isnan(summary['nsd_s_mean'])
  assert summary['surface_cases_r']['pred_empty'] == 1


def test_spacing_from_the_sample_else_the_config_else_pixels():
  spacing = [(0.5, 2.0)] * N
  options = evaluate.EvalOptions(surface=True, bootstrap_resamples=10)
  mm = evaluate.per_image('state', MaskStep(), _data(spacing), ROWS, BATCH, options=options)
  px = evaluate.per_image('state', MaskStep(), _data(), ROWS, BATCH, options=options)
  assert {r['surface_unit'] for r in mm} == {'mm'}
  # Row 5's prediction is shifted along columns, 2 mm wide.
  assert mm[0]['hd95_r'] == pytest.approx(2.0) and px[0]['hd95_r'] == pytest.approx(1.0)
  assert mm[3]['hd95_r'] == pytest.approx(math.hypot(S * 0.5, S * 2.0))  # Row 1: missed.
  fallback = dataclasses.replace(options, pixel_spacing_mm=0.25)
  scaled = evaluate.per_image('state', MaskStep(), _data(), ROWS, BATCH, options=fallback)
  assert scaled[0]['hd95_r'] == pytest.approx(0.25) and scaled[0]['surface_unit'] == 'mm'
  mixed = [(0.5, 0.5)] * (N - 1) + [None]
  with pytest.raises(ConfigError, match='1 of 5 images have no pixel spacing.*'
                                        'eval.pixel_spacing_mm'):
    evaluate.per_image('state', MaskStep(), _data(mixed), ROWS, BATCH, options=options)
  # With a fallback every image has a spacing: no error.
  evaluate.per_image('state', MaskStep(), _data(mixed), ROWS, BATCH, options=fallback)


def test_evaluate_split_reads_the_eval_config_and_writes_the_new_columns(tmp_path):
  config = base.get_config()
  config.train.eval_batch_size = BATCH
  config.eval.surface_tolerance = 1.0
  config.eval.surface_one_empty = 'nan'
  config.eval.bootstrap_resamples = 30
  seen = []
  summary = evaluate.evaluate_split(StepOnly(np.int32(3)), MaskStep(), _data(), config,
                                    split='val', out_dir=str(tmp_path),
                                    on_batch=lambda rows, *_: seen.append(rows.tolist()))
  assert seen == [[5, 0, 3, 1], [4]]
  assert summary['surface_tolerance'] == 1.0 and summary['bootstrap_resamples'] == 30
  assert summary['hd95_r_count'] == 3  # Both-empty row 0 and rows 5, 4; 3 and 1 left out.
  with open(tmp_path / 'val_summary.json') as f:
    saved = json.load(f)
  assert saved['surface_cases_r'] == summary['surface_cases_r']
  with open(tmp_path / 'val_per_image.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  for column in ('inter_px_r', 'pred_px_r', 'inter_px_s', 'pred_px_s', 'gt_px', 'hd95_r',
                 'assd_r', 'nsd_r', 'surface_case_r', 'hd95_s', 'assd_s', 'nsd_s',
                 'surface_case_s', 'surface_unit'):
    assert column in rows[0]
  assert math.isnan(float(rows[3]['hd95_r']))  # Row 1: a missed lesion under 'nan'.
  line = evaluate.log_line(summary)
  assert 'pooled' in line and 'HD95' in line and 'pred_empty 1' in line


def test_options_from_the_base_config_and_an_older_config():
  options = evaluate.EvalOptions.from_config(base.get_config())
  assert options.surface and options.tolerance == 2.0 and options.bootstrap_resamples == 2000
  assert options.empty_rule == surface.EmptyRule('zero', 'worst')
  older = base.get_config()
  with older.unlocked():
    del older.eval['surface_tolerance']
  assert evaluate.EvalOptions.from_config(older).tolerance == 2.0
  # Validation's default: no surface metrics.
  assert not evaluate.EvalOptions().surface
