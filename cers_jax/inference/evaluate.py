"""Evaluation on a split of the manifest: per-image Dice and IoU (DESIGN.md section 5).

Masks are thresholded at `config.eval.threshold`; an image whose prediction and ground truth
are both empty scores 1 (the authors' rule), and the number of such images is reported.
Both decoders are scored: D_r with retrieval (the CERS result) and D_s.
`evaluate_checkpoint` writes `<workdir>/eval/<split>_per_image.csv` and
`<workdir>/eval/<split>_summary.json`.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
from absl import logging
from tqdm import tqdm

from cers_jax import sharding
from cers_jax.data import pipeline

EMPTY_RULE = 'an image whose thresholded prediction and mask are both empty scores 1'


def predict_rows(exp, rows: np.ndarray, *, desc: str = 'evaluating'):
  """Yields (cache rows, eval outputs as numpy) for every real row, padding removed."""
  batches = pipeline.make_eval_batches(exp.data.arrays(), rows,
                                       batch_size=exp.config.train.eval_batch_size)
  total = -(-len(rows) // exp.config.train.eval_batch_size)
  for batch in tqdm(batches, total=total, desc=desc, leave=False):
    valid = np.asarray(batch['valid'])
    out = exp.to_host(exp.steps.evaluate(exp.state, exp.global_batch(batch), True))
    out = {k: v[valid] for k, v in out.items()}
    yield np.asarray(batch['index'])[valid], out, {k: np.asarray(v)[valid]
                                                    for k, v in batch.items()}


def _per_image(exp, rows: np.ndarray) -> list[dict]:
  records = []
  for index, out, batch in predict_rows(exp, rows):
    empty = batch['mask'].reshape(len(index), -1).sum(axis=1) == 0
    for i, row in enumerate(index):
      records.append(dict(
          id=exp.data.cache.samples[row].id, row=int(row), mask_empty=bool(empty[i]),
          dice_r=float(out['dice_r'][i]), iou_r=float(out['iou_r'][i]),
          dice_s=float(out['dice_s'][i]), iou_s=float(out['iou_s'][i])))
  return records


def summarize(records: list[dict]) -> dict:
  summary: dict = dict(count=len(records),
                       empty_masks=sum(r['mask_empty'] for r in records),
                       empty_rule=EMPTY_RULE)
  for key in ('dice_r', 'iou_r', 'dice_s', 'iou_s'):
    values = np.array([r[key] for r in records], np.float64)
    summary[f'{key}_mean'] = float(values.mean()) if len(values) else float('nan')
    summary[f'{key}_std'] = float(values.std()) if len(values) else float('nan')
  return summary


def evaluate_rows(exp, rows: np.ndarray) -> dict:
  """Summary (means, stds, counts) over `rows` with the current state."""
  return summarize(_per_image(exp, rows))


def _write(out_dir: str, split: str, records: list[dict], summary: dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{split}_per_image.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
  with open(os.path.join(out_dir, f'{split}_summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)


def evaluate_checkpoint(exp, *, split: str = 'test', which: str | None = None,
                        meta: dict | None = None) -> dict:
  """Scores `split` with the best (or latest) checkpoint, writes CSV + JSON.

  `meta` given: exp.state already holds the weights to score (`train.restore_for_eval`:
  a checkpoint, or the authors' imported weights) and `meta` describes them.
  """
  which = which or exp.config.eval.which
  if meta is None:
    exp.state, meta = exp.checkpoints.restore(which, exp.state)
  rows = exp.data.rows[split]
  if len(rows) == 0:
    raise ValueError(f'The {split!r} split of the manifest is empty: nothing to evaluate.')
  records = _per_image(exp, rows)
  summary = summarize(records)
  summary.update(split=split, checkpoint=meta.get('checkpoint', which),
                 step=int(exp.state.step),
                 epoch=meta.get('epoch'), stage=meta.get('stage'),
                 retrieval_mode=exp.config.pool.mode, threshold=exp.config.eval.threshold)
  if sharding.is_main_process():
    _write(os.path.join(exp.workdir, 'eval'), split, records, summary)
  logging.info(
      '%s (%s checkpoint, %d images, %d empty masks; %s): Dice D_r %.4f +- %.4f, '
      'IoU D_r %.4f +- %.4f; Dice D_s %.4f +- %.4f, IoU D_s %.4f +- %.4f', split, which,
      summary['count'], summary['empty_masks'], EMPTY_RULE, summary['dice_r_mean'],
      summary['dice_r_std'], summary['iou_r_mean'], summary['iou_r_std'],
      summary['dice_s_mean'], summary['dice_s_std'], summary['iou_s_mean'],
      summary['iou_s_std'])
  return summary
