"""Prediction with the evidence the model used: masks, overlays and one HTML page per image.

DESIGN.md sections 2 (retrieval) and 5 (evaluation). `predict(exp)` runs the trained CERS on

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
the frozen CoT BERT and the alignment projection, as `train.build_pool` does for cache rows.

Output `<workdir>/predictions/` (folder input: `<workdir>/predictions/<folder name>/`):
  images/<id>.png    the input image as decoded (what the pages show)
  masks/<id>.png     D_r's mask (the CERS result), 0/255, at the original image size
  overlays/<id>.png  the image with the predicted mask (red tint and outline) and, when a
                     mask was given, the ground-truth outline (green)
  refs/<id>.png      thumbnails of the retrieved reference cases with their masks
  pages/<id>.html    the image, overlay, mask, Dice of both decoders, report text, query
                     CoT and the k reference cases in rank order with score and CoT
  index.html         links to every page;  predictions.csv  one row per image
"""

from __future__ import annotations

import csv
import dataclasses
import html
import os
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from cers_jax.training import experiment
from cers_jax.retrieval import search
from cers_jax import sharding
from cers_jax.data import annotations
from cers_jax.data import augment
from cers_jax.data import images as images_lib
from cers_jax.data import tokenize
from cers_jax.data.records import DataError

PREDICT_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
IMAGE_SUBFOLDERS = ('frames', 'images')  # Looked up in this order before the folder itself.
MASK_SUBFOLDER = 'masks'
TEXT_CSV = 'text.csv'
COT_CSVS = ('cot.csv', 'cot_output_no_mask.csv', 'cot_output_gpt5_no_mask.csv')
TEST_ROWS = 16  # Test-split rows predicted when no predict_dir is given.
MAX_LISTED = 10  # Ids named in an error message.

PRED_COLOUR = np.array((230, 40, 40), np.float32)  # Prediction: red tint and outline.
TRUTH_COLOUR = np.array((40, 220, 60), np.float32)  # Ground truth: green outline.
TINT_ALPHA = 0.35


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


# --- inputs ----------------------------------------------------------------------------


def _image_folder(root: str) -> str:
  for name in IMAGE_SUBFOLDERS:
    folder = os.path.join(root, name)
    if os.path.isdir(folder):
      return folder
  return root


def _list_files(folder: str) -> dict[str, str]:
  """{id: path} of the image files in `folder`; a repeated stem keeps the first name."""
  found: dict[str, str] = {}
  if not os.path.isdir(folder):
    return found
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if (os.path.splitext(name)[1].lower() not in PREDICT_EXTENSIONS or name.startswith('.')
        or not os.path.isfile(path)):
      continue
    sample_id = images_lib.id_from_name(name)
    if sample_id in found:
      logging.warning('predict: %s has the same id as %s; using the latter.', path,
                      found[sample_id])
      continue
    found[sample_id] = path
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
        f'No images ({", ".join(PREDICT_EXTENSIONS)}) in {image_dir}: put the images in '
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


def _cache_items(exp, rows: np.ndarray) -> list[PredictItem]:
  """Items of cache rows; a labeled training row queries with its mask CoT, as in training."""
  labeled = set(np.asarray(exp.data.rows.get('train_labeled', [])).tolist())
  cache = exp.data.cache
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


def _load_cache_item(exp, item: PredictItem) -> _Loaded:
  """The model sees the cache arrays (as in evaluation); pages show the original file
  when it is still readable, else the cached pixels."""
  cache = exp.data.cache
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


# --- model inputs ----------------------------------------------------------------------


def _pad(array: np.ndarray, batch_size: int) -> np.ndarray:
  """Pads the batch axis to `batch_size` by repeating the last row (static shapes)."""
  missing = batch_size - len(array)
  return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)]) if missing else array


def _embed(exp, texts: Sequence[str | None]) -> np.ndarray:
  """Unit-norm retrieval embeddings (n, E) of texts through the frozen CoT BERT, as the
  pool's (config pool.cot_space); zero rows where a text is None (that query is not used by
  the configured retrieval mode)."""
  config = exp.config
  out = np.zeros((len(texts), experiment.retrieval_embed_dim(config)), np.float32)
  present = np.asarray([i for i, t in enumerate(texts) if t is not None], np.int64)
  if not len(present):
    return out
  ids, mask = tokenize.encode_texts(exp.data.cot_tokenizer, [texts[i] for i in present],
                                    config.data.max_cot_len)
  batch_size = config.train.eval_batch_size
  for start in range(0, len(present), batch_size):
    real = min(batch_size, len(present) - start)
    cls = exp.steps.cot_cls(
        exp.state, exp.replicated(_pad(ids[start:start + real], batch_size)),
        exp.replicated(_pad(mask[start:start + real], batch_size)))
    emb = exp.to_host(exp.steps.project(exp.state, cls))[:real]
    out[present[start:start + real]] = emb
  return out


def _query_embeddings(exp, items: list[PredictItem]) -> tuple[np.ndarray, np.ndarray]:
  """(query_cot, query_text), each (n, E); only what the retrieval mode reads is computed."""
  mode = search.mode_spec(exp.config.pool.mode)
  none = [None] * len(items)
  cots = [it.cot for it in items] if mode.uses('cot') else none
  texts = [it.text for it in items] if mode.uses('text') else none
  return _embed(exp, cots), _embed(exp, texts)


def _make_batch(exp, items: list[PredictItem], loaded: list[_Loaded],
                queries: tuple[np.ndarray, np.ndarray] | None) -> dict[str, np.ndarray]:
  """An eval batch padded to eval_batch_size; keys as the input pipeline's (STYLE habit 7)."""
  config = exp.config
  batch_size = config.train.eval_batch_size
  size = loaded[0].resized.shape[0]
  resized = np.stack([x.resized for x in loaded])  # (b, S, S, 3) uint8
  truth = np.stack([x.resized_truth if x.resized_truth is not None
                    else np.zeros((size, size), np.uint8) for x in loaded])
  if queries is None:  # Cache rows: token arrays and query tables are indexed by row.
    rows = np.asarray([it.row for it in items], np.int32)
    text_ids, text_mask = exp.data.tokens['text_ids'][rows], exp.data.tokens['text_mask'][rows]
    index = rows
  else:
    text_ids, text_mask = tokenize.encode_texts(
        exp.data.text_tokenizer, [it.text for it in items], config.data.max_text_len)
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
  batch = {k: _pad(np.asarray(v), batch_size) for k, v in batch.items()}
  batch['valid'][len(items):] = False
  batch['is_labeled'][len(items):] = False
  return batch


# --- pictures --------------------------------------------------------------------------


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
  """Pixels of `mask` within `width` pixels of its border (4-neighbour erosion)."""
  inside = mask.astype(bool)
  inner = inside
  for _ in range(width):
    p = np.pad(inner, 1, constant_values=False)
    inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return inside & ~inner


def overlay(image: np.ndarray, prediction: np.ndarray,
            truth: np.ndarray | None = None) -> np.ndarray:
  """The image with a predicted mask (tint and outline) and optionally the ground truth.

  Args:
    image: (H, W, 3) uint8.
    prediction: (H, W) {0, 1} mask drawn in PRED_COLOUR.
    truth: (H, W) {0, 1} mask outlined in TRUTH_COLOUR, or None.

  Returns:
    (H, W, 3) uint8.
  """
  out = image.astype(np.float32)
  pred = prediction.astype(bool)
  width = max(1, round(min(image.shape[:2]) / 200))
  out[pred] = (1 - TINT_ALPHA) * out[pred] + TINT_ALPHA * PRED_COLOUR
  out[_outline(pred, width)] = PRED_COLOUR
  if truth is not None:
    out[_outline(truth, width)] = TRUTH_COLOUR
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _save_png(path: str, pixels: np.ndarray) -> None:
  Image.fromarray(pixels).save(path)


# --- pages -----------------------------------------------------------------------------

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
img { image-rendering: pixelated; border: 1px solid #ccc; }
.figs img { height: 256px; margin-right: 0.5em; }
.ref img { width: 128px; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: 0.6em; max-width: 70em; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ddd; padding: 0.4em; vertical-align: top; text-align: left; }
.legend span { padding: 0 0.4em; }
"""


def _esc(text: Any) -> str:
  return html.escape(str(text), quote=True)


def _href(folder: str, sample_id: str, ext: str = '.png') -> str:
  return f'{folder}/{urllib.parse.quote(sample_id + ext)}'


def _text_block(text: str | None) -> str:
  return f'<pre>{_esc(text)}</pre>' if text else '<p><em>(none)</em></p>'


def _metrics_html(record: dict) -> str:
  if record['dice_r'] == '':
    return '<p>No ground-truth mask given: no Dice.</p>'
  return ('<table><tr><th>decoder</th><th>Dice</th><th>IoU</th></tr>'
          f'<tr><td>D_r (with retrieval; this mask)</td><td>{record["dice_r"]:.4f}</td>'
          f'<td>{record["iou_r"]:.4f}</td></tr>'
          f'<tr><td>D_s (standard decoder)</td><td>{record["dice_s"]:.4f}</td>'
          f'<td>{record["iou_s"]:.4f}</td></tr></table>')


def _references_html(exp, refs: list[tuple[int, str, float]]) -> str:
  mode = exp.config.pool.mode
  if mode == 'none':
    return ("<p>Retrieval is off (<code>pool.mode = 'none'</code>): the retrieval-aware "
            'decoder used no reference cases.</p>')
  samples = exp.data.cache.samples
  rows = []
  for rank, (row, ref_id, score) in enumerate(refs, 1):
    sample = samples[row]
    cot = sample.cot_mask or sample.cot_no_mask
    rows.append(
        f'<tr class="ref"><td>{rank}</td><td><img src="../{_href("refs", ref_id)}" '
        f'alt="{_esc(ref_id)}"></td><td>{_esc(ref_id)}<br><small>cache row {row}</small>'
        f'</td><td>{score:.4f}</td><td>{_text_block(cot)}</td></tr>')
  return (f'<p>Mode <code>{_esc(mode)}</code>: the {len(refs)} reference cases fused into '
          f'the retrieval-aware decoder, best first; score = {_esc(search.mode_spec(mode).score)}.'
          '</p><table><tr><th>rank</th><th>reference (mask in green)</th><th>id</th>'
          f'<th>score</th><th>CoT</th></tr>{"".join(rows)}</table>')


def render_page(exp, item: PredictItem, record: dict,
                refs: list[tuple[int, str, float]]) -> str:
  """The HTML evidence page of one image (links are relative to pages/)."""
  truth_legend = ('<span style="color:#28dc3c">&#9632; ground truth</span>'
                  if record['dice_r'] != '' else '')
  return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{_esc(item.id)}</title><style>{_STYLE}</style></head>
<body>
<p><a href="../index.html">&larr; all images</a></p>
<h1>{_esc(item.id)}</h1>
<div class="figs">
<img src="../{_href('images', item.id)}" alt="image">
<img src="../{_href('overlays', item.id)}" alt="overlay">
<img src="../{_href('masks', item.id)}" alt="predicted mask">
</div>
<p class="legend"><span style="color:#e62828">&#9632; prediction (D_r)</span>{truth_legend}
 mean probability {record['mean_prob']:.4f}</p>
{_metrics_html(record)}
<h2>Report text</h2>
{_text_block(item.text)}
<h2>Query CoT</h2>
{_text_block(item.cot)}
<h2>Retrieved reference cases</h2>
{_references_html(exp, refs)}
</body></html>
"""


def render_index(records: list[dict], title: str) -> str:
  """index.html: one table row per image, linking its page."""
  rows = []
  for r in records:
    dice = '' if r['dice_r'] == '' else f'{r["dice_r"]:.4f} / {r["dice_s"]:.4f}'
    rows.append(
        f'<tr><td><a href="{_href("pages", r["id"], ".html")}">{_esc(r["id"])}</a></td>'
        f'<td><a href="{_href("pages", r["id"], ".html")}"><img src="'
        f'{_href("overlays", r["id"])}" style="height:96px" alt="overlay"></a></td>'
        f'<td>{r["mean_prob"]:.4f}</td><td>{dice}</td>'
        f'<td>{_esc(r["retrieved_ids"])}</td></tr>')
  return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{_esc(title)}</h1>
<table><tr><th>id</th><th>overlay</th><th>mean prob</th><th>Dice D_r / D_s</th>
<th>retrieved ids (best first)</th></tr>
{''.join(rows)}
</table>
</body></html>
"""


# --- the run ---------------------------------------------------------------------------

_CSV_FIELDS = ('id', 'mask', 'mean_prob', 'dice_r', 'iou_r', 'dice_s', 'iou_s',
               'retrieved_ids', 'retrieved_scores')


def _write_ref(exp, out_dir: str, row: int, ref_id: str, written: set[int]) -> None:
  if row in written:
    return
  cache = exp.data.cache
  truth = np.asarray(cache.masks[row]) if cache.has_mask[row] else None
  image = np.asarray(cache.images[row])
  thumb = image if truth is None else overlay(image, np.zeros_like(truth), truth)
  _save_png(os.path.join(out_dir, 'refs', f'{ref_id}.png'), thumb)
  written.add(row)


def _items_and_output(exp) -> tuple[list[PredictItem], str, bool]:
  """(items, output directory, whether items come from a folder)."""
  config = exp.config
  predictions = os.path.join(exp.workdir, 'predictions')
  folder = config.eval.predict_dir
  if folder:
    items = read_predict_folder(folder, config.pool.mode)
    name = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    return items, os.path.join(predictions, name), True
  rows = np.asarray(exp.data.rows['test'])[:TEST_ROWS]
  if not len(rows):
    raise DataError('The test split of the manifest is empty and --config.eval.predict_dir '
                    'is not set: give a folder of images to predict on.')
  return _cache_items(exp, rows), predictions, False


def predict(exp, *, restore: bool = True) -> str:
  """Predicts masks with the best (or latest) checkpoint and writes the evidence pages.

  Args:
    exp: an `experiment.Experiment` (config, workdir, data, state, steps, checkpoints,
      global_batch, replicated, to_host).
    restore: restore config eval.which first; False: exp.state already holds the weights
      (`train.restore_for_eval`: a checkpoint, or the authors' imported weights).

  Returns:
    The output directory.

  Raises:
    DataError: bad predict folder or a required report text/CoT missing (before any
      checkpoint is restored or model step runs).
  """
  config = exp.config
  items, out_dir, from_folder = _items_and_output(exp)
  if restore:
    exp.state, _ = exp.checkpoints.restore(config.eval.which, exp.state)
  writes = sharding.is_main_process()  # Every process computes; the main one writes.
  if writes:
    for sub in ('images', 'masks', 'overlays', 'refs', 'pages'):
      os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  size = config.data.image_size
  threshold = config.eval.threshold
  samples = exp.data.cache.samples
  batch_size = config.train.eval_batch_size
  records: list[dict] = []
  refs_written: set[int] = set()
  for start in tqdm(range(0, len(items), batch_size), desc='predicting', leave=False,
                    total=-(-len(items) // batch_size)):
    chunk = items[start:start + batch_size]
    if from_folder:
      loaded = [_load_folder_item(it, size) for it in chunk]
      queries = _query_embeddings(exp, chunk)
    else:
      loaded = [_load_cache_item(exp, it) for it in chunk]
      queries = None
    batch = _make_batch(exp, chunk, loaded, queries)
    out = exp.to_host(exp.steps.evaluate(exp.state, exp.global_batch(batch), True))
    out = {k: v[:len(chunk)] for k, v in out.items()}
    if not writes:
      continue
    for i, (item, x) in enumerate(zip(chunk, loaded)):
      height, width = x.original.shape[:2]
      prob = out['prob_r'][i, ..., 0]
      pred = _resize_nearest((prob >= threshold).astype(np.uint8), height, width)
      refs = []
      if 'retrieved_ids' in out:
        refs = [(int(r), samples[int(r)].id, float(s))
                for r, s in zip(out['retrieved_ids'][i], out['retrieved_scores'][i])
                if r >= 0]
      for row, ref_id, _ in refs:
        _write_ref(exp, out_dir, row, ref_id, refs_written)
      _save_png(os.path.join(out_dir, 'images', f'{item.id}.png'), x.original)
      _save_png(os.path.join(out_dir, 'masks', f'{item.id}.png'), pred * 255)
      _save_png(os.path.join(out_dir, 'overlays', f'{item.id}.png'),
                overlay(x.original, pred, x.truth))
      has_truth = x.truth is not None
      record = dict(
          id=item.id, mask=f'masks/{item.id}.png', mean_prob=float(prob.mean()),
          **{k: float(out[k][i]) if has_truth else ''
             for k in ('dice_r', 'iou_r', 'dice_s', 'iou_s')},
          retrieved_ids=';'.join(r[1] for r in refs),
          retrieved_scores=';'.join(f'{r[2]:.6f}' for r in refs))
      with open(os.path.join(out_dir, 'pages', f'{item.id}.html'), 'w',
                encoding='utf-8') as f:
        f.write(render_page(exp, item, record, refs))
      records.append(record)
  if not writes:
    return out_dir
  title = (f'CERS predictions: {config.eval.predict_dir}' if from_folder
           else f'CERS predictions: first {len(items)} test images')
  with open(os.path.join(out_dir, 'index.html'), 'w', encoding='utf-8') as f:
    f.write(render_index(records, title))
  with open(os.path.join(out_dir, 'predictions.csv'), 'w', newline='',
            encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=list(_CSV_FIELDS))
    writer.writeheader()
    writer.writerows(records)
  scored = [r['dice_r'] for r in records if r['dice_r'] != '']
  logging.info('Predicted %d images into %s%s', len(records), out_dir,
               f' (mean Dice D_r {np.mean(scored):.4f} over {len(scored)} with masks)'
               if scored else '')
  return out_dir
