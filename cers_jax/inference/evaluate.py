"""Per-image scores of both decoders on a split, and their summary (docs/design.md section 11).

Masks are thresholded at `config.eval.threshold`. Dice and IoU come from the eval step; an
image whose prediction and ground truth are both empty scores 1 (the authors' rule), and the
number of such images is reported. Beside that per-image mean (the paper's convention) the
summary gives the dataset-level Dice/IoU pooled over all pixels, from the per-image
intersection and size counts, and medians and bootstrap 95% CIs (`cers_jax.stats`).
With `eval.surface`, HD95, ASSD and NSD of every image (`cers_jax.surface`) in mm when the
pixel spacing is known, else in pixels; the empty-mask rules are config fields and the
summary counts the images under each case. D_r (with retrieval) is the CERS result; D_s is
scored beside it. The host masks come from the same eval step outputs: one pass.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Callable

import numpy as np
from absl import logging
from tqdm import tqdm

from cers_jax import sharding
from cers_jax import stats
from cers_jax import surface as surface_lib
from cers_jax.core.method import EvalSteps
from cers_jax.data import pipeline
from cers_jax.data.dataset import Data
from cers_jax.errors import ConfigError
from cers_jax.inference import volumes as volumes_lib

EMPTY_RULE = 'an image whose thresholded prediction and mask are both empty scores 1'
DECODERS = ('r', 's')  # CERS's (the default method): D_r with retrieval, D_s standard.


def overlap_keys(decoders) -> tuple[str, ...]:
  """The eval step's per-image scores of `decoders`: ('dice_r', 'iou_r', 'dice_s', ...)."""
  return tuple(f'{m}_{d}' for d in decoders for m in ('dice', 'iou'))


def surface_keys(decoders) -> tuple[str, ...]:
  return tuple(f'{m}_{d}' for d in decoders for m in surface_lib.KEYS)


SCORES = overlap_keys(DECODERS)
SURFACE_SCORES = surface_keys(DECODERS)
# (rows, *preds, gt): cache rows (B,), then binary masks (B, H, W) of each decoder (in the
# method's order) and of the truth, for one batch.
BatchHook = Callable[..., None]


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """What `per_image` and `summarize` compute beyond the step's Dice and IoU.

  The defaults are the cheap set that per-epoch validation needs: no surface metrics.
  `from_config` gives what `eval/<split>_summary.json` holds.
  """

  threshold: float = 0.5  # Host masks: prob > threshold, as the eval step thresholds.
  surface: bool = False  # HD95, ASSD, NSD per image.
  pixel_spacing_mm: float = 0.0  # For samples without their own spacing; 0 = pixels.
  tolerance: float = 2.0  # NSD tolerance in the surface unit.
  empty_rule: surface_lib.EmptyRule = surface_lib.EmptyRule()
  bootstrap_resamples: int = 2000
  bootstrap_seed: int = 0
  decoders: tuple[str, ...] = DECODERS  # What the method's eval step scores (prob_<d>).

  @classmethod
  def from_config(cls, config, decoders: tuple[str, ...] = DECODERS) -> 'EvalOptions':
    """The options of `config.eval` (fields missing from an older config keep defaults)
    for a method scoring `decoders`."""
    ev, d = config.eval, cls()
    return cls(decoders=tuple(decoders), threshold=float(ev.get('threshold', d.threshold)),
               surface=bool(ev.get('surface', True)),
               pixel_spacing_mm=float(ev.get('pixel_spacing_mm', d.pixel_spacing_mm)),
               tolerance=float(ev.get('surface_tolerance', d.tolerance)),
               empty_rule=surface_lib.EmptyRule(
                   both_empty=ev.get('surface_both_empty', d.empty_rule.both_empty),
                   one_empty=ev.get('surface_one_empty', d.empty_rule.one_empty)),
               bootstrap_resamples=int(ev.get('bootstrap_resamples', d.bootstrap_resamples)),
               bootstrap_seed=int(ev.get('bootstrap_seed', d.bootstrap_seed)))


def predict_rows(state, steps: EvalSteps, data: Data, rows: np.ndarray, batch_size: int, *,
                 desc: str = 'evaluating'):
  """Yields (cache rows, eval outputs, batch) as numpy for every real row, padding removed."""
  batches = pipeline.make_eval_batches(data.arrays(), rows, batch_size=batch_size)
  batches = tqdm(batches, total=-(-len(rows) // batch_size), desc=desc, leave=False)
  for batch, out in sharding.host_outputs(steps.evaluate, state, batches, steps.mesh):
    yield batch['index'], out, batch


def row_spacings(data: Data, rows: np.ndarray, options: EvalOptions) -> tuple[list, str]:
  """Per-row pixel spacing (a tuple, or None for pixels) and the unit: 'mm' or 'px'.

  A sample's own `spacing` (in-plane (row, col) mm at the cached resolution, NIfTI data)
  wins; else `eval.pixel_spacing_mm` when > 0. Millimetres and pixels in one average would
  mean nothing, so a split where only some samples carry a spacing is refused.
  """
  fallback = options.pixel_spacing_mm
  spacings = []
  for row in rows:
    own = getattr(data.cache.samples[row], 'spacing', None)
    if own is not None:
      spacings.append(tuple(float(s) for s in own))
    else:
      spacings.append((fallback, fallback) if fallback > 0 else None)
  missing = sum(s is None for s in spacings)
  if 0 < missing < len(spacings):
    raise ConfigError(f'{missing} of {len(spacings)} images have no pixel spacing and the '
                      'others do: set --config.eval.pixel_spacing_mm to score them in mm.')
  return spacings, 'px' if missing else 'mm'


def _binary(x: np.ndarray, threshold: float) -> np.ndarray:
  """(B, H, W[, 1]) probabilities or masks -> (B, H, W) bool."""
  x = np.asarray(x)
  return (x[..., 0] if x.shape[-1] == 1 else x) > threshold


def _surface_fields(pred: np.ndarray, gt: np.ndarray, suffix: str, spacing,
                    options: EvalOptions) -> dict:
  scores = surface_lib.surface_metrics(pred, gt, spacing=spacing, tolerance=options.tolerance,
                                       empty_rule=options.empty_rule)
  fields = {f'{m}_{suffix}': scores[m] for m in surface_lib.KEYS}
  fields[f'surface_case_{suffix}'] = scores['case']
  return fields


def image_record(sample_id: str, row: int, scores: dict, masks: dict, i: int, spacing,
                 unit: str, options: EvalOptions) -> dict:
  """One CSV row: id, the step's Dice/IoU (`scores`: 'dice_r' -> value of this image), pixel
  counts for pooling and surface metrics of masks[<decoder>][i] against masks['gt'][i].
  `cers_jax.score` builds its rows of masks made elsewhere with it too."""
  gt = masks['gt'][i]
  record = dict(id=sample_id, row=int(row), mask_empty=not gt.any(),
                **{key: float(scores[key]) for key in overlap_keys(options.decoders)})
  for d in options.decoders:
    pred = masks[d][i]
    record[f'inter_px_{d}'] = int(np.count_nonzero(pred & gt))
    record[f'pred_px_{d}'] = int(np.count_nonzero(pred))
  record['gt_px'] = int(np.count_nonzero(gt))
  if options.surface:
    for d in options.decoders:
      record.update(_surface_fields(masks[d][i], gt, d, spacing, options))
    record['surface_unit'] = unit
  return record


def per_image(state, steps: EvalSteps, data: Data, rows: np.ndarray, batch_size: int, *,
              options: EvalOptions | None = None,
              on_batch: BatchHook | None = None) -> list[dict]:
  """One record per row: id, cache row, whether its mask is empty, the four scores, the
  pixel counts (`inter_px_r`, `pred_px_r`, ..., `gt_px`) and, with `options.surface`, the
  surface metrics of both decoders.

  on_batch: called with (cache rows, pred_r, pred_s, gt) of each batch, as (B, H, W) bool
    masks without padding, e.g. to gather the slices of a 3D volume.
  """
  options = options or EvalOptions()
  spacings, unit = (row_spacings(data, rows, options) if options.surface
                    else ([None] * len(rows), 'px'))
  spacing_of = {int(r): s for r, s in zip(rows, spacings)}
  records = []
  for index, out, batch in predict_rows(state, steps, data, rows, batch_size):
    masks = {d: _binary(out[f'prob_{d}'], options.threshold) for d in options.decoders}
    masks['gt'] = _binary(batch['mask'], 0.5)
    if on_batch is not None:
      on_batch(np.asarray(index), *(masks[d] for d in options.decoders), masks['gt'])
    for i, row in enumerate(index):
      records.append(image_record(data.cache.samples[row].id, row,
                                  {k: out[k][i] for k in overlap_keys(options.decoders)},
                                  masks, i, spacing_of[int(row)], unit, options))
  return records


def _column(records: list[dict], key: str) -> np.ndarray:
  return np.array([r[key] for r in records], np.float64)


def _overlap_summary(records: list[dict], options: EvalOptions) -> dict:
  """Per-image mean/std (the legacy keys), median and CI; pooled Dice/IoU and their CI."""
  boot = dict(resamples=options.bootstrap_resamples, seed=options.bootstrap_seed)
  out = {}
  for key in overlap_keys(options.decoders):
    desc = stats.describe(_column(records, key), **boot)
    out[f'{key}_mean'], out[f'{key}_std'] = desc['mean'], desc['std']
    out[f'{key}_per_image_mean'] = desc['mean']
    out[f'{key}_per_image_median'] = desc['median']
    out[f'{key}_per_image_ci95'] = desc['ci95']
  if records and 'gt_px' in records[0]:
    gt = _column(records, 'gt_px')
    for d in options.decoders:
      inter, pred = _column(records, f'inter_px_{d}'), _column(records, f'pred_px_{d}')
      for name, iou in (('dice', False), ('iou', True)):
        pooled = stats.pooled_iou if iou else stats.pooled_dice
        out[f'{name}_{d}_pooled'] = pooled(inter, pred, gt)
        out[f'{name}_{d}_pooled_ci95'] = stats.pooled_ci(inter, pred, gt, iou=iou, **boot)
  return out


def _surface_summary(records: list[dict], options: EvalOptions) -> dict:
  """Mean/std/median/CI of each surface metric over the images a rule did not leave out,
  how many those are, and how many images fell under each empty case."""
  out = dict(surface_unit=records[0]['surface_unit'], surface_tolerance=options.tolerance,
             surface_empty_rule=options.empty_rule.describe())
  boot = dict(resamples=options.bootstrap_resamples, seed=options.bootstrap_seed)
  for key in surface_keys(options.decoders):
    for name, value in stats.describe(_column(records, key), **boot).items():
      out[f'{key}_{name}'] = value
  for d in options.decoders:
    cases = [r[f'surface_case_{d}'] for r in records]
    out[f'surface_cases_{d}'] = {c: cases.count(c) for c in surface_lib.CASES}
  return out


def summarize(records: list[dict], options: EvalOptions | None = None) -> dict:
  """Image count, empty-mask count, per-image mean/std/median/CI of every score, pooled
  Dice/IoU and, when the records carry them, the surface metrics and their empty cases."""
  options = options or EvalOptions()
  summary: dict = dict(count=len(records), empty_masks=sum(r['mask_empty'] for r in records),
                       empty_rule=EMPTY_RULE)
  summary.update(_overlap_summary(records, options))
  if records and 'surface_unit' in records[0]:
    summary.update(_surface_summary(records, options))
  summary.update(bootstrap_resamples=options.bootstrap_resamples,
                 bootstrap_seed=options.bootstrap_seed, decoders=list(options.decoders))
  return summary


def evaluate_rows(state, steps: EvalSteps, data: Data, rows: np.ndarray, batch_size: int, *,
                  options: EvalOptions | None = None,
                  on_batch: BatchHook | None = None) -> dict:
  """The summary of `rows` scored with `state` (see `per_image` for the keywords)."""
  options = options or EvalOptions()
  return summarize(per_image(state, steps, data, rows, batch_size, options=options,
                             on_batch=on_batch), options)


def write_records(out_dir: str, split: str, records: list[dict], summary: dict) -> None:
  """`<split>_per_image.csv` and `<split>_summary.json` in `out_dir` (what compare reads)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{split}_per_image.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
  with open(os.path.join(out_dir, f'{split}_summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)


_NAMES = dict(dice='Dice', iou='IoU')


def _ci(pair) -> str:
  return f'[{pair[0]:.4f}, {pair[1]:.4f}]'


def log_line(summary: dict) -> str:
  """The summary as one log line: per-image and pooled Dice/IoU, then surface metrics."""
  parts = [f'{summary["split"]} ({summary["checkpoint"]}, {summary["count"]} images, '
           f'{summary["empty_masks"]} empty masks; {EMPTY_RULE})']
  decoders = summary.get('decoders', DECODERS)
  for d in decoders:
    for m in ('dice', 'iou'):
      k = f'{m}_{d}'
      parts.append(f'{_NAMES[m]} D_{d} per image '
                   f'{summary[f"{k}_mean"]:.4f} +- {summary[f"{k}_std"]:.4f} '
                   f'(median {summary[f"{k}_per_image_median"]:.4f}, 95% CI '
                   f'{_ci(summary[f"{k}_per_image_ci95"])}), pooled '
                   f'{summary[f"{k}_pooled"]:.4f} {_ci(summary[f"{k}_pooled_ci95"])}')
  if 'surface_unit' in summary:
    for d in decoders:
      cases = summary[f'surface_cases_{d}']
      parts.append(
          f'D_{d} HD95 {summary[f"hd95_{d}_mean"]:.3f}, ASSD {summary[f"assd_{d}_mean"]:.3f} '
          f'{summary["surface_unit"]}, NSD@{summary["surface_tolerance"]:g} '
          f'{summary[f"nsd_{d}_mean"]:.4f} (' + ', '.join(f'{c} {n}' for c, n in
                                                     cases.items()) + ')')
  return '; '.join(parts)


def evaluate_split(state, steps: EvalSteps, data: Data, config, *, split: str, out_dir: str,
                   meta: dict | None = None, on_batch: BatchHook | None = None,
                   decoders: tuple[str, ...] = DECODERS,
                   retrieval_mode: str | None = None) -> dict:
  """Scores every image of `split`, writes `<split>_per_image.csv` and `<split>_summary.json`
  into `out_dir` and returns the summary. `meta`: the checkpoint's (which, stage, epoch);
  `on_batch`: see `per_image`; `decoders`: those the method's eval step scores;
  `retrieval_mode`: how `steps` retrieve, for the summary (default config pool.mode)."""
  rows = data.rows[split]
  if len(rows) == 0:
    raise ValueError(f'The {split!r} split of the manifest is empty: nothing to evaluate.')
  meta = meta or {}
  options = EvalOptions.from_config(config, decoders)
  # Slices of NIfTI volumes are scored per volume in 3D too (README "Datasets").
  per_volume = volumes_lib.accumulator_for(data.cache.samples, rows, options.empty_rule,
                                           decoders=options.decoders)
  records = per_image(state, steps, data, rows, config.train.eval_batch_size,
                      options=options, on_batch=volumes_lib.chain(on_batch, per_volume))
  summary = summarize(records, options)
  if per_volume is not None:
    summary.update(per_volume.write(out_dir, split) if sharding.is_main_process()
                   else per_volume.summary())
  summary.update(split=split, checkpoint=meta.get('checkpoint', config.eval.which),
                 step=int(sharding.to_host(state.step)), epoch=meta.get('epoch'),
                 stage=meta.get('stage'),
                 retrieval_mode=config.pool.mode if retrieval_mode is None else retrieval_mode,
                 threshold=config.eval.threshold)
  if sharding.is_main_process():
    write_records(out_dir, split, records, summary)
  logging.info('%s', log_line(summary))
  return summary
