"""Prediction with the evidence the model used: masks, overlays and one HTML page per image.

docs/design.md sections 5 and 11 (retrieval, evaluation). `predict(state, steps, data, config,
workdir)` runs the trained CERS on

  * a folder of images (`config.eval.predict_dir`): the images directly in it or in a
    `frames/` or `images/` subfolder, `text.csv` (image,text; names with or without
    extension) and a CoT CSV written without the mask (`cot.csv`,
    `cot_output_no_mask.csv` or `cot_output_gpt5_no_mask.csv`; image,cot keyed by stem).
    Masks are optional (`masks/<same stem>.*`); with one, the page also reports Dice/IoU.
    The report text is always required (the text cross-attention reads it); the CoT is
    required where retrieval ranks by it (pool modes 'cot' and 'image+cot'). A missing
    required annotation is refused before any model work, naming the images and the CSV.
  * or, when `predict_dir` is empty, the first TEST_ROWS rows of the manifest's test split,
    read from the prepared cache (what `--mode=all` on the synthetic default shows).

Folder images are decoded, resized and z-scored exactly as the cache and the input pipeline
do for evaluation; their retrieval queries (CoT and report-text embeddings) are computed with
the frozen CoT BERT as training computes them for cache rows (`retrieval.embed`). The pictures
and pages are drawn by `inference.pages`.

Output `<workdir>/predictions/` (folder input: `<workdir>/predictions/<folder name>/`):
  images/<id>.png    the input image as decoded (what the pages show)
  masks/<id>.png     D_r's mask (the CERS result), 0/255, at the original image size
  overlays/<id>.png  the image with the predicted mask (red tint and outline) and, when a
                     mask was given, the ground-truth outline (green)
  refs/<id>.png      thumbnails of the retrieved reference cases with their masks
  pages/<id>.html    the image, overlay, mask, Dice of both decoders, report text, query
                     CoT and the k reference cases in rank order with score and CoT
  index.html         links to every page;  predictions.csv  one row per image
  volumes/<case>_pred.nii.gz  for slices of NIfTI volumes (no predict_dir): D_r's label
                     volume of every test-split volume (`inference.nifti_out`)
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from cers_jax import sharding
from cers_jax.core import embed
from cers_jax.core.method import EvalSteps
from cers_jax.core.state import TrainState
from cers_jax.core.steps import Steps
from cers_jax.data import annotations
from cers_jax.data import augment
from cers_jax.data import images as images_lib
from cers_jax.data import layouts
from cers_jax.data import tokenize
from cers_jax.data.dataset import Data
from cers_jax.data.records import DataError
from cers_jax.inference import nifti_out
from cers_jax.inference import pages
from cers_jax.retrieval import search

IMAGE_SUBFOLDERS = ('frames', 'images')  # Looked up in this order before the folder itself.
MASK_SUBFOLDER = 'masks'
TEXT_CSV = 'text.csv'
COT_CSVS = ('cot.csv', 'cot_output_no_mask.csv', 'cot_output_gpt5_no_mask.csv')
TEST_ROWS = 16  # Test-split rows predicted when no predict_dir is given.
MAX_LISTED = 10  # Ids named in an error message.



@dataclasses.dataclass(frozen=True)
class PredictItem:
  """One image to predict: where its pixels come from and the texts it is queried with."""

  id: str
  image_path: str | None  # None: a cache row without a readable original file.
  mask_path: str | None
  text: str | None
  cot: str | None  # The query CoT (written without the mask).
  row: int = -1  # Cache row; -1 for an image from a predict folder.


@dataclasses.dataclass
class _Loaded:
  original: np.ndarray  # (H, W, 3) uint8 as decoded.
  truth: np.ndarray | None  # (H, W) uint8 {0, 1}, or None without a mask.
  resized: np.ndarray  # (S, S, 3) uint8, as the cache stores images.
  resized_truth: np.ndarray | None  # (S, S) uint8 {0, 1}.


def _image_folder(root: str) -> str:
  for name in IMAGE_SUBFOLDERS:
    folder = os.path.join(root, name)
    if os.path.isdir(folder):
      return folder
  return root


def _list_files(folder: str) -> dict[str, str]:
  """{id: path} of the image files in `folder`, listed as dataset folders are."""
  if not os.path.isdir(folder):
    return {}
  problems: list = []
  found = layouts.list_images(folder, problems)
  for problem in problems:
    logging.warning('predict: %s: %s', problem.file, problem.detail)
  return found


def _listed(ids: Sequence[str]) -> str:
  more = f' and {len(ids) - MAX_LISTED} more' if len(ids) > MAX_LISTED else ''
  return f'{len(ids)} image(s) ({", ".join(ids[:MAX_LISTED])}{more})'


def _read_entries(path: str, kind: str) -> dict[str, str]:
  parsed = annotations.read_annotations(path, kind)
  if parsed.problems:
    logging.warning('predict: %s: %s', path, parsed.summary()['problems'])
  return {k: e.value for k, e in parsed.entries.items()}


def read_predict_folder(root: str, mode: str) -> list[PredictItem]:
  """Finds the images of a predict folder and their annotations; checks what `mode` needs.

  Args:
    root: the folder (`config.eval.predict_dir`).
    mode: the retrieval mode (`config.pool.mode`); modes that rank by the CoT require one.

  Returns:
    One PredictItem per image, sorted by id.

  Raises:
    DataError: no images, an unreadable CSV, or a required report text or CoT missing
      (naming the images, their count and the CSV expected).
  """
  if not os.path.isdir(root):
    raise DataError(f'Predict folder {root} does not exist: fix --config.eval.predict_dir.')
  image_dir = _image_folder(root)
  files = _list_files(image_dir)
  if not files:
    raise DataError(
        f'No images ({", ".join(images_lib.IMAGE_EXTENSIONS)}) in {image_dir}: put the images in '
        f'{root} or its {"/ or ".join(IMAGE_SUBFOLDERS)}/ subfolder.')
  ids = sorted(files)
  masks = _list_files(os.path.join(root, MASK_SUBFOLDER))

  text_path = os.path.join(root, TEXT_CSV)
  texts = _read_entries(text_path, 'text') if os.path.isfile(text_path) else {}
  missing = [i for i in ids if i not in texts]
  if missing:
    raise DataError(
        f'No report text for {_listed(missing)} in {text_path}'
        f'{"" if os.path.isfile(text_path) else " (the file does not exist)"}. The text '
        'cross-attention needs one per image: add rows "image,text" (the image name with '
        'or without extension) to that CSV.')

  cot_path = next((os.path.join(root, n) for n in COT_CSVS
                   if os.path.isfile(os.path.join(root, n))), None)
  cots = _read_entries(cot_path, 'cot_no_mask') if cot_path else {}
  missing = [i for i in ids if i not in cots]
  if missing and search.mode_spec(mode).uses('cot'):
    expected = cot_path or os.path.join(root, COT_CSVS[1])
    raise DataError(
        f'No CoT for {_listed(missing)} in {expected}'
        f'{"" if cot_path else " (no CoT CSV: looked for " + ", ".join(COT_CSVS) + ")"}. '
        f'Retrieval mode {mode!r} ranks reference cases by the CoT: add rows "image,cot" '
        '(written without the mask, e.g. with cers_jax.cot.generate) or set '
        "--config.pool.mode to 'image'.")
  if missing:
    logging.info('predict: no CoT for %s; retrieval mode %r does not need one.',
                 _listed(missing), mode)
  return [PredictItem(id=i, image_path=files[i], mask_path=masks.get(i), text=texts[i],
                      cot=cots.get(i)) for i in ids]


def _cache_items(data: Data, rows: np.ndarray) -> list[PredictItem]:
  """Items of cache rows; a labeled training row queries with its mask CoT, as in training."""
  labeled = set(np.asarray(data.rows.get('train_labeled', [])).tolist())
  cache = data.cache
  items = []
  for row in np.asarray(rows).tolist():
    s = cache.samples[row]
    cot = s.cot_mask if row in labeled else s.cot_no_mask
    items.append(PredictItem(id=s.id, image_path=s.image_path,
                             mask_path=s.mask_path if cache.has_mask[row] else None,
                             text=s.text, cot=cot, row=row))
  return items


def _resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
  if mask.shape == (height, width):
    return np.asarray(mask, np.uint8)
  return np.asarray(Image.fromarray(np.asarray(mask, np.uint8)).resize(
      (width, height), Image.Resampling.NEAREST))


def _rgb(pixels: np.ndarray) -> np.ndarray:
  return np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels


def _load_folder_item(item: PredictItem, size: int) -> _Loaded:
  pixels = images_lib.read_image(item.image_path)
  truth = None
  if item.mask_path is not None:
    truth = images_lib.read_mask(item.mask_path)
    if truth.shape != pixels.shape[:2]:
      raise DataError(
          f'Mask {item.mask_path} is {truth.shape[1]}x{truth.shape[0]} but its image '
          f'{item.image_path} is {pixels.shape[1]}x{pixels.shape[0]} (width x height). Fix '
          'the pair or remove the mask.')
  return _Loaded(original=_rgb(pixels), truth=truth,
                 resized=images_lib.resize_image(pixels, size),
                 resized_truth=None if truth is None else images_lib.resize_mask(truth, size))


def _load_cache_item(cache, item: PredictItem) -> _Loaded:
  """The model sees the cache arrays (as in evaluation); pages show the original file
  when it is still readable, else the cached pixels."""
  resized = np.asarray(cache.images[item.row])
  resized_truth = np.asarray(cache.masks[item.row]) if item.mask_path is not None else None
  try:
    original = _rgb(images_lib.read_image(item.image_path))
  except DataError:
    original = resized
  truth = None
  if resized_truth is not None:
    height, width = original.shape[:2]
    try:
      truth = images_lib.read_mask(item.mask_path)
    except DataError:
      truth = None
    if truth is None or truth.shape != (height, width):
      truth = _resize_nearest(resized_truth, height, width)
  return _Loaded(original=original, truth=truth, resized=resized,
                 resized_truth=resized_truth)


def _query_embeddings(state: TrainState, steps: Steps, data: Data, config,
                      items: list[PredictItem]) -> tuple[np.ndarray, np.ndarray]:
  """(query_cot, query_text), each (n, E); only what the retrieval mode reads is computed."""
  mode = search.mode_spec(config.pool.mode)
  none = [None] * len(items)
  cots = [it.cot for it in items] if mode.uses('cot') else none
  texts = [it.text for it in items] if mode.uses('text') else none
  return tuple(embed.embed_texts(state, steps, data.cot_tokenizer, queries, config)
               for queries in (cots, texts))


def _make_batch(data: Data, config, items: list[PredictItem], loaded: list[_Loaded],
                queries: tuple[np.ndarray, np.ndarray] | None, *,
                from_folder: bool) -> dict[str, np.ndarray]:
  """An eval batch padded to eval_batch_size; keys as the pipeline's (docs/design.md, habit 7)."""
  batch_size = config.train.eval_batch_size
  size = loaded[0].resized.shape[0]
  resized = np.stack([x.resized for x in loaded])  # (b, S, S, 3) uint8
  truth = np.stack([x.resized_truth if x.resized_truth is not None
                    else np.zeros((size, size), np.uint8) for x in loaded])
  if not from_folder:  # Cache rows: token arrays and query tables are indexed by row.
    rows = np.asarray([it.row for it in items], np.int32)
    text_ids, text_mask = data.tokens['text_ids'][rows], data.tokens['text_mask'][rows]
    index = rows
  else:
    text_ids, text_mask = tokenize.encode_texts(
        data.text_tokenizer, [it.text for it in items], config.data.max_text_len)
    index = np.full(len(items), -1, np.int32)  # Not a cache row: self-exclusion never hits.
  batch = dict(
      image=augment.zscore(resized),  # (B, S, S, 3) float32
      mask=truth[..., None].astype(np.float32),  # (B, S, S, 1); zeros without a mask
      text_ids=np.asarray(text_ids, np.int32),  # (B, L)
      text_mask=np.asarray(text_mask, np.int32),  # (B, L)
      index=index,  # (B,)
      is_labeled=np.asarray([x.resized_truth is not None for x in loaded]),  # (B,) has mask
      valid=np.ones(len(items), bool))  # (B,)
  if queries is not None:
    batch['query_cot'], batch['query_text'] = queries  # (B, E) each
  batch = {k: sharding.pad_rows(np.asarray(v), batch_size) for k, v in batch.items()}
  batch['valid'][len(items):] = False
  batch['is_labeled'][len(items):] = False
  return batch


@dataclasses.dataclass(frozen=True)
class Heads:
  """What the method's eval step predicts: its decoders (`prob_<d>`, `dice_<d>`), the one
  whose masks are written, and whether it retrieves references (CERS: all three)."""

  decoders: tuple[str, ...] = ('r', 's')
  primary: str = 'r'
  retrieves: bool = True

  def csv_fields(self) -> tuple[str, ...]:
    return ('id', 'mask', 'mean_prob',
            *(f'{m}_{d}' for d in self.decoders for m in ('dice', 'iou')),
            'retrieved_ids', 'retrieved_scores')

  def mode(self, config) -> str:
    """The retrieval mode predictions are made with ('none' without retrieval)."""
    return config.pool.mode if self.retrieves else 'none'


def _items_and_output(data: Data, config, workdir: str, heads: Heads,
                      split: str) -> tuple[list[PredictItem], str, bool]:
  """(items, output directory, whether items come from a folder)."""
  predictions = os.path.join(workdir, 'predictions')
  folder = config.eval.predict_dir
  if folder:
    items = read_predict_folder(folder, heads.mode(config))
    name = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    return items, os.path.join(predictions, name), True
  rows = np.asarray(data.rows[split])[:TEST_ROWS]
  if not len(rows):
    raise DataError(f'The {split} split of the manifest is empty and --config.eval.'
                    'predict_dir is not set: give a folder of images to predict on.')
  return _cache_items(data, rows), predictions, False


def _write_item(data: Data, config, out_dir: str, item: PredictItem, x: _Loaded, out: dict,
                i: int, refs_written: set[int], heads: Heads) -> dict:
  """Writes the image, mask, overlay, references and page of batch row `i`; its record."""
  samples = data.cache.samples
  height, width = x.original.shape[:2]
  prob = out[f'prob_{heads.primary}'][i, ..., 0]
  # Strictly above, as the eval step thresholds for the Dice this page reports.
  pred = _resize_nearest((prob > config.eval.threshold).astype(np.uint8), height, width)
  refs = []
  if 'retrieved_ids' in out:
    refs = [(int(r), samples[int(r)].id, float(s))
            for r, s in zip(out['retrieved_ids'][i], out['retrieved_scores'][i]) if r >= 0]
  for row, ref_id, _ in refs:
    pages.write_reference(data.cache, out_dir, row, ref_id, refs_written)
  pages.save_png(os.path.join(out_dir, 'images', f'{item.id}.png'), x.original)
  pages.save_png(os.path.join(out_dir, 'masks', f'{item.id}.png'), pred * 255)
  pages.save_png(os.path.join(out_dir, 'overlays', f'{item.id}.png'),
                 pages.overlay(x.original, pred, x.truth))
  has_truth = x.truth is not None
  record = dict(
      id=item.id, mask=f'masks/{item.id}.png', mean_prob=float(prob.mean()),
      **{k: float(out[k][i]) if has_truth else '' for k in heads.csv_fields()[3:-2]},
      retrieved_ids=';'.join(r[1] for r in refs),
      retrieved_scores=';'.join(f'{r[2]:.6f}' for r in refs))
  with open(os.path.join(out_dir, 'pages', f'{item.id}.html'), 'w', encoding='utf-8') as f:
    f.write(pages.render_page(item, record, refs, mode=heads.mode(config), samples=samples,
                              decoders=heads.decoders, primary=heads.primary))
  return record


def _write_index(out_dir: str, records: list[dict], title: str, curves_png: str | None,
                 heads: Heads) -> None:
  """index.html (linking curves.png when it exists) and predictions.csv."""
  with open(os.path.join(out_dir, 'index.html'), 'w', encoding='utf-8') as f:
    curves_href = (os.path.relpath(curves_png, out_dir).replace(os.sep, '/')
                   if curves_png and os.path.isfile(curves_png) else None)
    f.write(pages.render_index(records, title, curves_href, decoders=heads.decoders))
  with open(os.path.join(out_dir, 'predictions.csv'), 'w', newline='',
            encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=list(heads.csv_fields()))
    writer.writeheader()
    writer.writerows(records)


def predict(state, steps: EvalSteps, data: Data, config, workdir: str, *,
            curves_png: str | None = None, heads: Heads = Heads(),
            split: str = 'test') -> str:
  """Predicts masks with `state` and writes the evidence pages; returns the output folder.

  `curves_png`: the training curves of the model, linked from index.html if the file exists;
  `heads`: what the method's eval step predicts (CERS's by default); `split`: whose first
  TEST_ROWS images are predicted when config eval.predict_dir is empty.

  Raises:
    DataError: bad predict folder or a required report text/CoT missing (before any
      model step runs).
  """
  items, out_dir, from_folder = _items_and_output(data, config, workdir, heads, split)
  writes = sharding.is_main_process()  # Every process computes; the main one writes.
  if writes:
    for sub in ('images', 'masks', 'overlays', 'refs', 'pages'):
      os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  batch_size = config.train.eval_batch_size
  records: list[dict] = []
  refs_written: set[int] = set()
  for start in tqdm(range(0, len(items), batch_size), desc='predicting', leave=False,
                    total=-(-len(items) // batch_size)):
    chunk = items[start:start + batch_size]
    if from_folder:
      loaded = [_load_folder_item(it, config.data.image_size) for it in chunk]
      queries = (_query_embeddings(state, steps, data, config, chunk) if heads.retrieves
                 else None)
    else:
      loaded = [_load_cache_item(data.cache, it) for it in chunk]
      queries = None
    batch = _make_batch(data, config, chunk, loaded, queries, from_folder=from_folder)
    # The batch's real rows are its first len(chunk) ones (padding marked not valid).
    [(_, out)] = sharding.host_outputs(steps.evaluate, state, [batch], steps.mesh)
    if writes:
      records.extend(_write_item(data, config, out_dir, item, x, out, i, refs_written, heads)
                     for i, (item, x) in enumerate(zip(chunk, loaded)))
  if not from_folder:  # Test slices of NIfTI volumes: whole predicted volumes too.
    nifti_out.write_predicted_volumes(state, steps, data, config, out_dir, write=writes,
                                      decoder=heads.primary)
  if not writes:
    return out_dir
  title = (f'Predictions: {config.eval.predict_dir}' if from_folder
           else f'Predictions: first {len(items)} {split} images')
  _write_index(out_dir, records, title, curves_png, heads)
  key = f'dice_{heads.primary}'
  scored = [r[key] for r in records if r[key] != '']
  logging.info('Predicted %d images into %s%s', len(records), out_dir,
               f' (mean Dice D_{heads.primary} {np.mean(scored):.4f} over {len(scored)} '
               'with masks)' if scored else '')
  return out_dir
