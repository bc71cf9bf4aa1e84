"""Evaluation of a split, with numpy stand-ins for the jitted eval step."""

import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from cers_jax import sharding
from cers_jax.data.cache import Cache
from cers_jax.data.dataset import Data
from cers_jax.data.records import Sample
from cers_jax.inference import evaluate
from configs import base

S, N, BATCH = 8, 7, 3


@dataclasses.dataclass
class StepOnly:
  """What evaluation reads of a TrainState besides passing it to the step: its step."""

  step: np.int32


class ScoreByRow:
  """Eval outputs that name the row they were computed for: dice_r = row / 10, ..."""

  def __init__(self):
    self.mesh = sharding.make_mesh()
    self.batches = []

  def evaluate(self, state, batch):
    index = np.asarray(batch['index']).astype(np.float32)
    self.batches.append(len(index))
    prob = np.zeros((len(index), S, S, 1), np.float32)
    return dict(prob_r=prob, prob_s=prob, dice_r=index / 10, iou_r=index / 20,
                dice_s=index / 40, iou_s=index / 80)


def _data() -> Data:
  masks = np.zeros((N, S, S), np.uint8)
  masks[[1, 2, 4, 5], 2:5, 2:5] = 1  # Rows 0, 3 and 6 have empty masks.
  samples = [Sample(id=f'img{r}', image_path=f'img{r}.png', mask_path=f'm{r}.png', text='t',
                    cot_mask=None, cot_no_mask=None) for r in range(N)]
  cache = Cache('unused', np.zeros((N, S, S, 3), np.uint8), masks, np.ones(N, bool), samples,
                {})
  rows = dict(val=np.array([6, 0, 3, 5, 1], np.int32), test=np.array([], np.int32))
  return Data(cache=cache, rows=rows,
              tokens=dict(text_ids=np.ones((N, 4), np.int32),
                          text_mask=np.ones((N, 4), np.int32)),
              text_tokenizer=None, cot_tokenizer=None)


def test_per_image_scores_follow_their_rows_and_drop_padding():
  steps, data = ScoreByRow(), _data()
  records = evaluate.per_image('state', steps, data, data.rows['val'], BATCH)
  assert steps.batches == [BATCH, BATCH]  # 5 rows: the second batch is padded.
  assert [r['row'] for r in records] == [6, 0, 3, 5, 1]
  assert [r['id'] for r in records] == ['img6', 'img0', 'img3', 'img5', 'img1']
  assert [r['dice_r'] for r in records] == pytest.approx([0.6, 0.0, 0.3, 0.5, 0.1])
  assert [r['mask_empty'] for r in records] == [True, True, True, False, False]


def test_summary_means_stds_and_empty_masks():
  summary = evaluate.evaluate_rows('state', ScoreByRow(), _data(), _data().rows['val'], BATCH)
  dice = np.array([0.6, 0.0, 0.3, 0.5, 0.1])
  assert summary['count'] == 5 and summary['empty_masks'] == 3
  assert summary['dice_r_mean'] == pytest.approx(dice.mean())
  assert summary['dice_r_std'] == pytest.approx(dice.std())
  assert summary['iou_s_mean'] == pytest.approx(dice.mean() / 8)
  assert 'both empty scores 1' in summary['empty_rule']
  assert summary['dice_r_per_image_mean'] == summary['dice_r_mean']
  assert summary['dice_r_per_image_median'] == pytest.approx(np.median(dice))
  lo, hi = summary['dice_r_per_image_ci95']
  assert lo <= dice.mean() <= hi
  # The probabilities are all 0: no predicted pixel, so pooled over rows 5 and 1's lesions 0.
  assert summary['dice_r_pooled'] == 0.0 and summary['iou_s_pooled'] == 0.0
  assert 'hd95_r_mean' not in summary  # Surface metrics are evaluate_split's (eval.surface).


def test_evaluate_split_writes_the_csv_and_summary(tmp_path):
  config = base.get_config()
  config.train.eval_batch_size = BATCH
  data = _data()
  summary = evaluate.evaluate_split(StepOnly(np.int32(12)), ScoreByRow(), data, config, split='val',
                                    out_dir=str(tmp_path),
                                    meta=dict(stage='semi', epoch=4, checkpoint='best'))
  with open(tmp_path / 'val_summary.json') as f:
    assert json.load(f) == summary
  assert summary['step'] == 12 and summary['epoch'] == 4 and summary['checkpoint'] == 'best'
  with open(tmp_path / 'val_per_image.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['id'] for r in rows] == ['img6', 'img0', 'img3', 'img5', 'img1']
  assert float(rows[0]['dice_r']) == pytest.approx(0.6)
  assert int(rows[3]['gt_px']) == 9 and int(rows[3]['pred_px_r']) == 0
  assert rows[0]['surface_case_r'] == 'both_empty' and rows[3]['surface_case_r'] == 'pred_empty'
  assert summary['surface_unit'] == 'px' and summary['surface_cases_r'] == dict(
      both_present=0, both_empty=3, pred_empty=2, gt_empty=0)
  assert float(rows[3]['hd95_r']) == pytest.approx(np.hypot(S, S))
  with pytest.raises(ValueError, match="'test' split of the manifest is empty"):
    evaluate.evaluate_split(StepOnly(np.int32(0)), ScoreByRow(), data, config, split='test',
                            out_dir=str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['val_per_image.csv', 'val_summary.json']
