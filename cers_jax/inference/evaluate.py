"""Per-image Dice and IoU of both decoders on a split (DESIGN.md section 5).

Masks are thresholded at `config.eval.threshold`; an image whose prediction and ground truth
are both empty scores 1 (the authors' rule), and the number of such images is reported.
D_r (with retrieval) is the CERS result; D_s is scored beside it.
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
SCORES = ('dice_r', 'iou_r', 'dice_s', 'iou_s')


def predict_rows(state, steps, data, rows: np.ndarray, batch_size: int, *,
                 desc: str = 'evaluating'):
  """Yields (cache rows, eval outputs, batch) as numpy for every real row, padding removed."""
  batches = pipeline.make_eval_batches(data.arrays(), rows, batch_size=batch_size)
  for batch in tqdm(batches, total=-(-len(rows) // batch_size), desc=desc, leave=False):
    valid = np.asarray(batch['valid'])
    out = sharding.to_host(steps.evaluate(state, sharding.global_batch(batch, steps.mesh)))
    yield (np.asarray(batch['index'])[valid], {k: v[valid] for k, v in out.items()},
           {k: np.asarray(v)[valid] for k, v in batch.items()})


def per_image(state, steps, data, rows: np.ndarray, batch_size: int) -> list[dict]:
  """One record per row: id, cache row, whether its mask is empty, and the four scores."""
  records = []
  for index, out, batch in predict_rows(state, steps, data, rows, batch_size):
    empty = batch['mask'].reshape(len(index), -1).sum(axis=1) == 0
    for i, row in enumerate(index):
      records.append(dict(id=data.cache.samples[row].id, row=int(row),
                          mask_empty=bool(empty[i]),
                          **{key: float(out[key][i]) for key in SCORES}))
  return records


def summarize(records: list[dict]) -> dict:
  """Mean and standard deviation of every score, the image count and the empty-mask count."""
  summary: dict = dict(count=len(records), empty_masks=sum(r['mask_empty'] for r in records),
                       empty_rule=EMPTY_RULE)
  for key in SCORES:
    values = np.array([r[key] for r in records], np.float64)
    summary[f'{key}_mean'] = float(values.mean()) if len(values) else float('nan')
    summary[f'{key}_std'] = float(values.std()) if len(values) else float('nan')
  return summary


def evaluate_rows(state, steps, data, rows: np.ndarray, batch_size: int) -> dict:
  """The summary of `rows` scored with `state`."""
  return summarize(per_image(state, steps, data, rows, batch_size))


def _write(out_dir: str, split: str, records: list[dict], summary: dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{split}_per_image.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
  with open(os.path.join(out_dir, f'{split}_summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)


def evaluate_split(state, steps, data, config, *, split: str, out_dir: str,
                   meta: dict | None = None) -> dict:
  """Scores every image of `split`, writes `<split>_per_image.csv` and `<split>_summary.json`
  into `out_dir` and returns the summary. `meta`: the checkpoint's (which, stage, epoch)."""
  rows = data.rows[split]
  if len(rows) == 0:
    raise ValueError(f'The {split!r} split of the manifest is empty: nothing to evaluate.')
  meta = meta or {}
  records = per_image(state, steps, data, rows, config.train.eval_batch_size)
  summary = summarize(records)
  summary.update(split=split, checkpoint=meta.get('checkpoint', config.eval.which),
                 step=int(sharding.to_host(state.step)), epoch=meta.get('epoch'),
                 stage=meta.get('stage'), retrieval_mode=config.pool.mode,
                 threshold=config.eval.threshold)
  if sharding.is_main_process():
    _write(out_dir, split, records, summary)
  logging.info(
      '%s (%s, %d images, %d empty masks; %s): Dice D_r %.4f +- %.4f, IoU D_r %.4f +- %.4f; '
      'Dice D_s %.4f +- %.4f, IoU D_s %.4f +- %.4f', split, summary['checkpoint'],
      summary['count'], summary['empty_masks'], EMPTY_RULE, summary['dice_r_mean'],
      summary['dice_r_std'], summary['iou_r_mean'], summary['iou_r_std'],
      summary['dice_s_mean'], summary['dice_s_std'], summary['iou_s_mean'],
      summary['iou_s_std'])
  return summary
