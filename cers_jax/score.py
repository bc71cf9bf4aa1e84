"""Scores a folder of masks made anywhere with this project's metric rules.

  python -m cers_jax.score PRED_DIR --workdir runs/cers [--split test] [--decoder seg]
  python -m cers_jax.score PRED_DIR --cache_dir runs/cers/data [--pixel_spacing_mm 0.5]

PRED_DIR holds one binary mask per image of the split (PNG or any image format that
`cers_jax.data.images` reads, 0/1 or 0/255; or NIfTI label volumes `<case>.nii.gz` /
`<case>_pred.nii.gz` for datasets of volume slices), directly or in a `masks/` subfolder
(what `--mode predict` writes). A file is matched to an image by its name without folders
and extension, also with a `_pred`, `_mask` or `_seg` suffix dropped (LViT's, nnU-Net's and
our own predict output all match).

The masks are scored exactly as `--mode eval` scores a decoder (`inference.evaluate`): each
is resized to the prepared resolution (`data.image_size`) by nearest neighbour, as the
ground truth was; Dice/IoU with the same jitted rule (an image whose mask and prediction
are both empty scores 1); HD95/ASSD/NSD with the run's spacing, tolerance and empty-mask
rules; the same pooled Dice and bootstrap intervals; per-volume 3D scores for slices. With
`--workdir` every rule is read from that run's config.json, so the numbers pair with it.

Written to `--out` (default PRED_DIR): `eval/<split>_per_image.csv` and
`eval/<split>_summary.json` in the format of a run's `eval/`, so that
`python -m cers_jax.compare runs/cers PRED_DIR --decoders r --decoders-b seg` pairs them.

A split image without a mask file is an error that names it (`--missing empty` scores it as
an empty prediction instead, counted in the summary); files matching no image of the split
are named and counted in the summary (`unmatched_files`), never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from typing import Sequence

import ml_collections
import numpy as np

from cers_jax.data import cache as cache_lib
from cers_jax.data import images as images_lib
from cers_jax.data import nifti
from cers_jax.data.records import DataError
from cers_jax.errors import WorkdirError
from cers_jax.inference import evaluate
from cers_jax.inference import volumes as volumes_lib

SUFFIXES = ('_pred', '_prediction', '_mask', '_seg', '_segmentation')
SHOWN = 10  # Names listed in a message before "... and N more".


def _listed(names: Sequence[str]) -> str:
  names = sorted(names)
  more = f' ... and {len(names) - SHOWN} more' if len(names) > SHOWN else ''
  return ', '.join(names[:SHOWN]) + more


def _candidates(stem: str) -> list[str]:
  out = [stem]
  for suffix in SUFFIXES:
    if stem.lower().endswith(suffix) and len(stem) > len(suffix):
      out.append(stem[:-len(suffix)])
  return out


def list_mask_files(pred_dir: str) -> dict[str, str]:
  """{file stem: path} of the mask files of PRED_DIR (or of its masks/ subfolder)."""
  if not os.path.isdir(pred_dir):
    raise DataError(f'{pred_dir} is not a folder of predicted masks.')
  folder = os.path.join(pred_dir, 'masks')
  folder = folder if os.path.isdir(folder) else pred_dir
  files = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith('.') or not os.path.isfile(path):
      continue
    if images_lib.is_image_file(name) or nifti.is_nifti_file(name):
      stem = nifti.case_of(name)
      if stem in files:
        raise DataError(f'{folder} holds two masks of {stem!r}: {os.path.basename(files[stem])}'
                        f' and {name}. Keep one.')
      files[stem] = path
  if not files:
    raise DataError(f'{folder} holds no mask files (PNG/JPEG/TIFF... or .nii.gz).')
  return files


def match_files(files: dict[str, str], ids: Sequence[str], volumes: dict[str, list[str]]
                ) -> tuple[dict[str, str], dict[str, str], list[str]]:
  """(image id -> 2-D mask file, volume case -> label volume file, unmatched file names).

  `volumes`: case -> the ids of the split's slices of it (empty for 2-D datasets).
  """
  wanted, by_image, by_volume, unmatched = set(ids), {}, {}, []
  for stem, path in files.items():
    is_volume = nifti.is_nifti_file(os.path.basename(path))
    pool = volumes if is_volume else wanted
    match = next((c for c in _candidates(stem) if c in pool), None)
    found = by_volume if is_volume else by_image
    if match is None:
      unmatched.append(os.path.basename(path))
    elif match in found:
      raise DataError(f'Two masks of {match!r}: {found[match]} and {path}. Keep one.')
    else:
      found[match] = path
  return by_image, by_volume, unmatched


def _read_volume_slices(path: str, samples, axis: int, size: int) -> dict[str, np.ndarray]:
  volume = nifti.read_label_volume(path)
  out = {}
  for s in samples:
    if s.slice_index >= volume.shape[axis % 3]:
      raise DataError(f'{path} has {volume.shape[axis % 3]} slices along axis {axis}, but '
                      f'{s.id} is slice {s.slice_index}: a label volume of another shape.')
    out[s.id] = images_lib.resize_mask(nifti.take_slice(volume, axis, s.slice_index), size)
  return out


def load_config(workdir: str | None) -> ml_collections.ConfigDict | None:
  if not workdir:
    return None
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise WorkdirError(f'{path} does not exist: give a training workdir, or --cache_dir '
                       'with the metric flags instead.')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


def options_of(config, args) -> evaluate.EvalOptions:
  """The run's eval options (as `--mode eval` uses them), else the flags'."""
  decoders = (args.decoder,)
  if config is not None:
    return evaluate.EvalOptions.from_config(config, decoders)
  default = evaluate.EvalOptions()
  return evaluate.EvalOptions(decoders=decoders, surface=not args.no_surface,
                              pixel_spacing_mm=args.pixel_spacing_mm,
                              tolerance=args.tolerance, empty_rule=default.empty_rule)


def _overlap(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Dice and IoU of (N, S, S) {0, 1} masks with the eval step's own jitted rule."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cers_jax import metrics  # pylint: disable=g-import-not-at-top
  dice, iou = metrics.dice_iou_per_image(jnp.asarray(pred[..., None], jnp.float32),
                                         jnp.asarray(gt[..., None], jnp.float32), 0.5)
  return np.asarray(dice), np.asarray(iou)


def score(pred_dir: str, cache_dir: str, *, split: str, options: evaluate.EvalOptions,
          out_dir: str, missing: str = 'error', nifti_axis: int = -1) -> dict:
  """Scores PRED_DIR's masks on `split` of the prepared dataset in `cache_dir`, writes
  `<out_dir>/eval/<split>_per_image.csv` and `_summary.json`; returns the summary."""
  cache = cache_lib.load_cache(cache_dir)
  rows = cache.split_rows(split)
  if len(rows) == 0:
    raise DataError(f'The {split!r} split of {cache_dir}/split.json is empty.')
  samples = [cache.samples[r] for r in rows]
  ids = [s.id for s in samples]
  volumes: dict[str, list] = {}
  for s in samples:
    if s.volume:
      volumes.setdefault(s.volume, []).append(s)
  by_image, by_volume, unmatched = match_files(list_mask_files(pred_dir), ids, volumes)
  size = cache.image_size
  preds: dict[str, np.ndarray] = {}
  for case, path in by_volume.items():
    preds.update(_read_volume_slices(path, volumes[case], nifti_axis, size))
  for ident, path in by_image.items():
    preds.setdefault(ident, images_lib.resize_mask(images_lib.read_mask(path), size))
  absent = [i for i in ids if i not in preds]
  if absent and missing != 'empty':
    raise DataError(f'{pred_dir} has no mask for {len(absent)} of the {len(ids)} {split} '
                    f'images: {_listed(absent)}. Predict them, or pass --missing empty to '
                    'score them as empty predictions (counted in the summary).')
  pred = np.stack([preds.get(i, np.zeros((size, size), np.uint8)) for i in ids]) > 0
  gt = np.asarray(cache.masks[rows]) > 0
  dice, iou = _overlap(pred, gt)
  shim = types.SimpleNamespace(cache=cache)
  spacings, unit = (evaluate.row_spacings(shim, rows, options) if options.surface
                    else ([None] * len(rows), 'px'))
  d = options.decoders[0]
  masks = {d: pred, 'gt': gt}
  records = [evaluate.image_record(ids[i], int(rows[i]),
                                   {f'dice_{d}': dice[i], f'iou_{d}': iou[i]}, masks, i,
                                   spacings[i], unit, options) for i in range(len(rows))]
  per_volume = volumes_lib.accumulator_for(cache.samples, rows, options.empty_rule,
                                           decoders=options.decoders)
  if per_volume is not None:
    per_volume.add(np.asarray(rows), pred, gt)
  summary = evaluate.summarize(records, options)
  eval_dir = os.path.join(out_dir, 'eval')
  os.makedirs(eval_dir, exist_ok=True)
  if per_volume is not None:
    summary.update(per_volume.write(eval_dir, split))
  summary.update(split=split, checkpoint=f'masks {os.path.abspath(pred_dir)}',
                 step=None, epoch=None, stage=None, retrieval_mode=None,
                 threshold=options.threshold, cache_dir=os.path.abspath(cache_dir),
                 missing_predictions=len(absent), missing_ids=sorted(absent),
                 unmatched_files=len(unmatched), unmatched_names=sorted(unmatched))
  evaluate.write_records(eval_dir, split, records, summary)
  return summary


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m cers_jax.score', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('pred_dir', help='Folder of predicted masks (or its masks/ subfolder).')
  parser.add_argument('--workdir', help='A run whose prepared data and eval rules to use.')
  parser.add_argument('--cache_dir', help='A prepared dataset folder (split.json, masks.npy);'
                      ' default <workdir>/data or the run\'s data.cache_dir.')
  parser.add_argument('--split', default='test')
  parser.add_argument('--decoder', default='seg', help='Column suffix of the scores '
                      '(dice_<decoder>, ...); compare pairs it with --decoders-b.')
  parser.add_argument('--out', help='Where eval/ is written (default PRED_DIR).')
  parser.add_argument('--missing', choices=('error', 'empty'), default='error')
  parser.add_argument('--nifti_axis', type=int, default=None,
                      help='Slicing axis of label volumes (default the run\'s, else -1).')
  parser.add_argument('--pixel_spacing_mm', type=float, default=0.0,
                      help='Without --workdir: mm per pixel at the prepared size (0: px).')
  parser.add_argument('--tolerance', type=float, default=2.0,
                      help='Without --workdir: NSD tolerance.')
  parser.add_argument('--no_surface', action='store_true',
                      help='Without --workdir: Dice/IoU only.')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if not args.workdir and not args.cache_dir:
      raise WorkdirError('Give --workdir RUN (its data and eval rules) or --cache_dir DIR.')
    config = load_config(args.workdir)
    cache_dir = args.cache_dir or (config.data.get('cache_dir') if config else '') or (
        os.path.join(args.workdir, 'data'))
    axis = args.nifti_axis
    if axis is None:
      axis = int(config.data.nifti.axis) if config and 'nifti' in config.data else -1
    summary = score(args.pred_dir, cache_dir, split=args.split,
                    options=options_of(config, args), out_dir=args.out or args.pred_dir,
                    missing=args.missing, nifti_axis=axis)
  except (DataError, WorkdirError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  d = args.decoder
  print(f'{args.split}: {summary["count"]} images, Dice {summary[f"dice_{d}_mean"]:.4f}, '
        f'IoU {summary[f"iou_{d}_mean"]:.4f}; {summary["missing_predictions"]} missing '
        f'(scored empty), {summary["unmatched_files"]} unmatched files'
        + (f' ({_listed(summary["unmatched_names"])})' if summary['unmatched_files'] else '')
        + f'; written to {os.path.join(args.out or args.pred_dir, "eval")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
