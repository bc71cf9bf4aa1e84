"""The evidence of a prediction: overlays and HTML pages (what `predict` writes).

Every page shows the image, its overlay and mask, the Dice of both decoders where a mask was
given, the report text and query CoT, and the reference cases fused into the retrieval-aware
decoder in rank order with their scores and CoTs.
"""

from __future__ import annotations

import html
import os
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from cers_jax.retrieval import search

PRED_COLOUR = np.array((230, 40, 40), np.float32)  # Prediction: red tint and outline.
TRUTH_COLOUR = np.array((40, 220, 60), np.float32)  # Ground truth: green outline.
TINT_ALPHA = 0.35
Reference = tuple[int, str, float]  # (cache row, sample id, score)


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


def save_png(path: str, pixels: np.ndarray) -> None:
  Image.fromarray(pixels).save(path)


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


# How a page names a decoder; any other is 'D_<name>'.
DECODER_LABELS = {'r': 'D_r (with retrieval)', 's': 'D_s (standard decoder)'}


def _label(decoder: str, primary: str) -> str:
  label = DECODER_LABELS.get(decoder, f'D_{decoder}')
  return f'{label}, this mask' if decoder == primary else label


def _metrics_html(record: dict, decoders: Sequence[str], primary: str) -> str:
  if record[f'dice_{primary}'] == '':
    return '<p>No ground-truth mask given: no Dice.</p>'
  rows = ''.join(f'<tr><td>{_esc(_label(d, primary))}</td><td>{record[f"dice_{d}"]:.4f}</td>'
                 f'<td>{record[f"iou_{d}"]:.4f}</td></tr>' for d in decoders)
  return f'<table><tr><th>decoder</th><th>Dice</th><th>IoU</th></tr>{rows}</table>'


def _references_html(refs: list[Reference], mode: str, samples: Sequence) -> str:
  if mode == 'none':
    return ("<p>Retrieval is off (<code>pool.mode = 'none'</code>): the retrieval-aware "
            'decoder used no reference cases.</p>')
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


def render_page(item, record: dict, refs: list[Reference], *, mode: str,
                samples: Sequence, decoders: Sequence[str] = ('r', 's'),
                primary: str = 'r') -> str:
  """The HTML evidence page of one `PredictItem` (links are relative to pages/).

  `mode`: the retrieval mode ('none' for a method that does not retrieve); `samples`: the
  cache's samples, which `refs` index; `decoders`: those scored in `record` (`dice_<d>`),
  `primary` the one whose mask the page shows.
  """
  truth_legend = ('<span style="color:#28dc3c">&#9632; ground truth</span>'
                  if record[f'dice_{primary}'] != '' else '')
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
<p class="legend"><span style="color:#e62828">&#9632; prediction (D_{_esc(primary)})</span>
{truth_legend}
 mean probability {record['mean_prob']:.4f}</p>
{_metrics_html(record, decoders, primary)}
<h2>Report text</h2>
{_text_block(item.text)}
<h2>Query CoT</h2>
{_text_block(item.cot)}
<h2>Retrieved reference cases</h2>
{_references_html(refs, mode, samples)}
</body></html>
"""


def render_index(records: list[dict], title: str, curves_href: str | None = None, *,
                 decoders: Sequence[str] = ('r', 's')) -> str:
  """index.html: one table row per image, linking its page; `curves_href` links the
  training curves (curves.png) above the table."""
  dice_header = ' / '.join(f'D_{_esc(d)}' for d in decoders)
  rows = []
  for r in records:
    dice = ('' if r[f'dice_{decoders[0]}'] == ''
            else ' / '.join(f'{r[f"dice_{d}"]:.4f}' for d in decoders))
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
{f'<p><a href="{_esc(curves_href)}">Training curves</a> of the model that predicted these '
 f'masks.</p>' if curves_href else ''}
<table><tr><th>id</th><th>overlay</th><th>mean prob</th><th>Dice {dice_header}</th>
<th>retrieved ids (best first)</th></tr>
{''.join(rows)}
</table>
</body></html>
"""


def write_reference(cache, out_dir: str, row: int, ref_id: str, written: set[int]) -> None:
  """refs/<id>.png: a reference case with its mask outlined, once per run."""
  if row in written:
    return
  truth = np.asarray(cache.masks[row]) if cache.has_mask[row] else None
  image = np.asarray(cache.images[row])
  thumb = image if truth is None else overlay(image, np.zeros_like(truth), truth)
  save_png(os.path.join(out_dir, 'refs', f'{ref_id}.png'), thumb)
  written.add(row)
