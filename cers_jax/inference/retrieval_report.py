"""The retrieval report: do the retrieved references resemble the query? (docs/design.md section 5)

For every image of a split (val by default) it retrieves k reference cases from the
knowledge pool under every mode of `search.MODE_TABLE` — the model's modes plus two
reference rows, `random` and `oracle` (the k pool masks closest to the query's own mask: the
headroom) — and measures, per mode:

  ref_mask_dice     mean Dice between the query's mask and each reference's mask (both
                    resized to eval.report_mask_size; two empty masks score 1)
  label_match       share of references with the query's group label (eval.label_regex on
                    the image id, or eval.label_csv); per group in label_match_by_group
  tie_share         share of adjacent ranks 1..k+1 whose final-stage scores are exactly
                    equal although the pool entries differ: a space that does not rank
  score_range       mean over queries of the spread of the k+1 best final-stage scores
  changed_vs_image  (modes with a fine stage) share of references outside image-only top k

`write_report` writes report.json, references.csv (every query's references) and report.png
(a bar chart), and logs the table; `ranking_problems` names the modes that do not rank.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cers_jax import sharding
from cers_jax.core.state import TrainState
from cers_jax.core.steps import Steps
from cers_jax.data import annotations
from cers_jax.data import pipeline
from cers_jax.data.dataset import Data
from cers_jax.data.records import DataError
from cers_jax.retrieval import pool as kp
from cers_jax.retrieval import search

REPORT_MODES = ('random', 'image', 'cot', 'text', 'image+text', 'image+cot', 'oracle')
MAX_TIE_SHARE = 0.01  # Above this, a mode's ranking is called tied.
MIN_SCORE_RANGE = 1e-4  # Below this mean spread of the k+1 best scores, it is called flat.
_QUERY_CHUNK = 256  # Queries retrieved per call (bounds the (queries, N) score matrix).


@dataclasses.dataclass(frozen=True)
class GroupLabels:
  """Group labels of every cache row: one column per label group ('' = unknown)."""

  names: tuple[str, ...]  # Group names, e.g. ('tumour', 'plane').
  values: np.ndarray  # (N, G) str.
  source: str  # Where they came from, for the report.


def group_labels(eval_config, sample_ids: Sequence[str]) -> GroupLabels | None:
  """Labels from `eval.label_regex` (its groups, on each id) or `eval.label_csv`, or None.

  Raises:
    DataError: an invalid regex, or an unreadable CSV / missing column.
  """
  if eval_config.label_regex:
    try:
      pattern = re.compile(eval_config.label_regex)
    except re.error as error:
      raise DataError(f'--config.eval.label_regex={eval_config.label_regex!r} is not a '
                      f'valid regex: {error}.') from error
    count = max(pattern.groups, 1)
    by_index = {i: n for n, i in pattern.groupindex.items()}
    names = tuple(by_index.get(i, f'group{i}') for i in range(1, count + 1))
    values = np.full((len(sample_ids), count), '', dtype=object)
    for row, sample_id in enumerate(sample_ids):
      match = pattern.search(sample_id)
      if match:
        values[row] = match.groups() if pattern.groups else (match.group(0),)
    return GroupLabels(names, values.astype(str), f'regex {eval_config.label_regex!r} on ids')
  if eval_config.label_csv:
    column = eval_config.label_column
    by_id = annotations.read_label_column(eval_config.label_csv, column)
    values = np.asarray([[by_id.get(i, '')] for i in sample_ids], dtype=str)
    return GroupLabels((column,), values, f'column {column!r} of {eval_config.label_csv}')
  return None


def resized_masks(masks: np.ndarray, size: int) -> np.ndarray:
  """(n, S, S) {0, 1} masks -> (n, size*size) float32 {0, 1} (bilinear, then >= 0.5)."""
  masks = np.asarray(masks, np.float32)
  if masks.shape[1] != size:
    masks = np.asarray(jax.image.resize(masks, (masks.shape[0], size, size), 'linear'))
  return (masks >= 0.5).reshape(masks.shape[0], -1).astype(np.float32)


def mask_dice_matrix(query: np.ndarray, pool: np.ndarray) -> np.ndarray:
  """(Q, P) x (N, P) binary masks -> (Q, N) Dice; two empty masks score 1 (evaluation's rule)."""
  inter = query @ pool.T
  total = query.sum(1)[:, None] + pool.sum(1)[None, :]
  return np.where(total > 0, 2.0 * inter / np.maximum(total, 1.0), 1.0)


@dataclasses.dataclass(frozen=True)
class Ranking:
  """The ranked references of every query under one mode."""

  rows: np.ndarray  # (Q, r) int pool rows, best first; r = k + 1 where the pool allows.
  scores: np.ndarray  # (Q, r) float32 final-stage scores.
  entries: np.ndarray | None  # (N, E) what the final stage compares (exact-tie check).


def _top(scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
  """Highest `count` per row with top_k's order (ties: lowest row first)."""
  values, rows = jax.lax.top_k(jnp.asarray(scores, jnp.float32), count)
  return np.asarray(rows), np.asarray(values)


def rank_references(mode: str, *, pool: kp.KnowledgePool, query_feat: np.ndarray,
                    query_cot: np.ndarray, query_text: np.ndarray, dice: np.ndarray,
                    barred: np.ndarray, exclude: np.ndarray | None, count: int,
                    k_coarse: int, rng: np.random.Generator,
                    centre: bool = False) -> Ranking:
  """Ranks the pool for every query under `mode` (MODE_TABLE), `count` references deep.

  Model modes run `search.retrieve`, exactly as the model retrieves; `random`
  draws uniform scores and `oracle` ranks by `dice` (the query's own mask).

  Args:
    mode: a name in MODE_TABLE other than 'none'.
    pool: the knowledge pool (N rows).
    query_feat: (Q, h, w, C) query f4 maps.
    query_cot: (Q, E) query CoT embeddings.
    query_text: (Q, E') query report-text embeddings.
    dice: (Q, N) Dice of each query's mask with each pool row's mask.
    barred: (Q, N) bool, pool rows a query may not retrieve (its own row, padding).
    exclude: (Q,) the queries' own ids (self-exclusion, as `retrieve` takes it), or None.
    count: references per query.
    k_coarse: first-stage candidates of modes with a fine stage.
    rng: draws the random mode's scores.
    centre: `retrieve`'s centre (config pool.centre_cot).
  """
  spec = search.mode_spec(mode, report=True)
  if spec.first_stage == 'random':
    scores = np.where(barred, -np.inf, rng.random(dice.shape, dtype=np.float32))
    return Ranking(*_top(scores, count), entries=None)
  if spec.first_stage == 'mask':
    return Ranking(*_top(np.where(barred, -np.inf, dice), count), entries=None)
  if spec.fine_stage is not None:
    count = min(count, k_coarse)  # The fine stage ranks only the K candidates.
  rows, scores = [], []
  # `retrieve` bars padding and own rows itself, as `barred` does for the rows above.
  for start in range(0, len(query_feat), _QUERY_CHUNK):
    part = slice(start, start + _QUERY_CHUNK)
    out = search.retrieve(pool, jnp.asarray(query_feat[part]), jnp.asarray(query_cot[part]),
                      jnp.asarray(query_text[part]), mode=mode, k_coarse=k_coarse, k=count,
                      exclude=None if exclude is None else jnp.asarray(exclude[part]),
                      centre=centre)
    rows.append(np.asarray(out.rows))
    scores.append(np.asarray(out.scores))
  final = spec.fine_stage or spec.first_stage
  entries = None if final == 'image' else np.asarray(getattr(pool, final))
  return Ranking(np.concatenate(rows), np.concatenate(scores), entries)


def mode_metrics(ranking: Ranking, k: int, dice: np.ndarray, query_labels: np.ndarray | None,
                 pool_labels: np.ndarray | None, label_names: Sequence[str],
                 image_rows: np.ndarray | None = None) -> dict:
  """Metrics of one mode (module docstring); references are the first k ranks."""
  refs = ranking.rows[:, :k]
  ref_dice = np.take_along_axis(dice, refs, axis=1)
  per_query = ref_dice.mean(axis=1)
  out = dict(ref_mask_dice=float(per_query.mean()),
             ref_mask_dice_sem=float(per_query.std() / np.sqrt(max(len(per_query), 1))))
  if query_labels is not None:
    ref_labels = pool_labels[refs]  # (Q, k, G)
    same = (ref_labels == query_labels[:, None, :]) & (query_labels[:, None, :] != '')
    out['label_match'] = float(same.all(axis=-1).mean())
    out['label_match_by_group'] = {name: float(same[..., g].mean())
                                   for g, name in enumerate(label_names)}
  scores = ranking.scores.astype(np.float64)
  finite = np.isfinite(scores)
  equal = (scores[:, 1:] == scores[:, :-1]) & finite[:, 1:] & finite[:, :-1]
  if ranking.entries is None:
    same_entry = np.zeros_like(equal)
  else:
    entries = ranking.entries[ranking.rows]  # (Q, r, E)
    same_entry = np.all(entries[:, 1:] == entries[:, :-1], axis=-1)
  pairs = max(equal.size, 1)
  out['tie_share'] = float((equal & ~same_entry).sum() / pairs)
  out['duplicate_share'] = float(same_entry.sum() / pairs)
  spread = np.where(finite.all(axis=1), scores[:, 0] - scores[:, -1], np.nan)
  out['score_range'] = float(np.nanmean(spread)) if np.isfinite(spread).any() else 0.0
  out['score_min'] = float(scores[finite].min()) if finite.any() else float('nan')
  out['score_max'] = float(scores[finite].max()) if finite.any() else float('nan')
  if image_rows is not None:
    kept = (refs[:, :, None] == image_rows[:, None, :k]).any(axis=-1)
    out['changed_vs_image'] = float(1.0 - kept.mean())
  return out


def ranking_problems(modes: dict[str, dict]) -> list[str]:
  """One line per retrieval mode whose scores do not rank (ties or a flat score range)."""
  problems = []
  for mode, m in modes.items():
    if search.mode_spec(mode, report=True).first_stage in ('random', 'mask'):
      continue
    if m['tie_share'] > MAX_TIE_SHARE:
      problems.append(f'{mode}: {m["tie_share"]:.1%} of adjacent ranks are exact ties between '
                      'different pool entries; the ranking among them is arbitrary.')
    if m['score_range'] < MIN_SCORE_RANGE:
      problems.append(f'{mode}: the k+1 best scores of a query lie within '
                      f'{m["score_range"]:.2e} of each other on average; the space barely '
                      'separates the pool entries.')
  return problems


def format_table(report: dict) -> str:
  """The report as a fixed-width text table."""
  has_labels = any('label_match' in m for m in report['modes'].values())
  head = f'{"mode":<10} {"ref_mask_dice":>17} {"label_match":>11} {"tie_share":>9} ' \
         f'{"score_range":>11} {"changed":>7}'
  lines = [head, '-' * len(head)]
  for mode, m in report['modes'].items():
    dice = f'{m["ref_mask_dice"]:.3f} +- {m["ref_mask_dice_sem"]:.3f}'
    label = f'{m["label_match"]:.3f}' if has_labels else '-'
    changed = f'{m["changed_vs_image"]:.2f}' if 'changed_vs_image' in m else ''
    lines.append(f'{mode:<10} {dice:>17} {label:>11} {m["tie_share"]:>9.3f} '
                 f'{m["score_range"]:>11.2e} {changed:>7}')
  return '\n'.join(lines)


def plot_report(report: dict, path: str) -> None:
  """A bar chart of ref_mask_dice (with standard errors) and label_match per mode."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  modes = list(report['modes'])
  panels = [('ref_mask_dice', 'Dice(query mask, reference mask)')]
  if any('label_match' in m for m in report['modes'].values()):
    panels.append(('label_match', 'share of references with the query\'s label'))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
  colours = ['#9e9e9e' if search.mode_spec(m, report=True).first_stage in ('random', 'mask')
             else '#3b73b9' for m in modes]
  flat = {p.split(':')[0] for p in report['problems']}
  for ax, (key, title) in zip(axes[0], panels):
    values = [report['modes'][m].get(key, 0.0) for m in modes]
    errors = ([report['modes'][m]['ref_mask_dice_sem'] for m in modes]
              if key == 'ref_mask_dice' else [0.0] * len(modes))
    ax.bar(modes, values, yerr=errors if key == 'ref_mask_dice' else None, color=colours,
           capsize=3)
    for i, (mode, v, e) in enumerate(zip(modes, values, errors)):
      label = f'{v:.2f}' + ('\nno ranking' if mode in flat else '')
      ax.text(i, v + e + 0.01, label, ha='center', va='bottom', fontsize=8,
              color='#c62828' if mode in flat else 'black')
    ax.set_ylim(0, 1.15)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis='x', labelrotation=30, labelsize=8)
  fig.suptitle(f'Retrieval report: {report["num_queries"]} {report["split"]} queries, '
               f'k={report["k"]}, pool of {report["pool_size"]}', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def query_features(state: TrainState, steps: Steps, data: Data, rows: np.ndarray,
                   batch_size: int) -> np.ndarray:
  """(len(rows), h, w, C) eval-mode f4 maps of cache rows."""
  batches = pipeline.make_eval_batches(data.arrays(), rows, batch_size=batch_size)
  return np.concatenate([f4 for _, f4 in sharding.host_outputs(steps.features, state,
                                                                 batches, steps.mesh)])


def build_report(state: TrainState, steps: Steps, data: Data, config,
                 split: str) -> tuple[dict, list[dict]]:
  """Ranks every query of `split` under every report mode; returns (report, CSV rows)."""
  rows = np.asarray(data.rows[split])
  if not len(rows):
    raise DataError(f'The {split!r} split of the manifest is empty: choose another with '
                    '--config.eval.split.')
  # A local copy: the report ranks on one device whatever the mesh (host-sized pools).
  pool = jax.tree.map(jnp.asarray, sharding.to_host(state.pool))
  pool_ids = np.asarray(pool.ids)
  real = pool_ids >= 0
  k, k_coarse = config.pool.k, config.pool.k_coarse
  exclude = rows if config.pool.exclude_self else None
  barred = ~real[None, :] | ((exclude is not None) & (pool_ids[None, :] == rows[:, None]))
  count = min(k + 1, int((~barred).sum(axis=1).min()), pool.size - (exclude is not None))
  if count < k:
    raise DataError(f'The pool offers {count} references to some {split} images, fewer '
                    f'than pool.k={k}: label more images or lower pool.k.')
  size = min(config.eval.report_mask_size, data.cache.image_size)
  masks = np.asarray(data.cache.masks)
  pool_rows_cache = np.where(real, pool_ids, 0)
  dice = mask_dice_matrix(resized_masks(masks[rows], size),
                          resized_masks(masks[pool_rows_cache], size))
  labels = group_labels(config.eval, [s.id for s in data.cache.samples])
  query_labels = pool_labels = None
  if labels is not None:
    query_labels, pool_labels = labels.values[rows], labels.values[pool_rows_cache]
    pool_labels = np.where(real[:, None], pool_labels, '')
  tables = sharding.to_host(state.tables)
  query = dict(query_feat=query_features(state, steps, data, rows,
                                          config.train.eval_batch_size), query_cot=tables.query_cot[rows],
               query_text=tables.query_text[rows])
  rng = np.random.default_rng(config.seed)
  rankings: dict[str, Ranking] = {}
  for mode in REPORT_MODES:
    rankings[mode] = rank_references(mode, pool=pool, dice=dice, barred=barred,
                                     exclude=exclude, count=count, k_coarse=k_coarse,
                                     rng=rng, centre=config.pool.centre_cot, **query)
  modes = {}
  for mode, ranking in rankings.items():
    fine = search.mode_spec(mode, report=True).fine_stage
    modes[mode] = mode_metrics(
        ranking, k, dice, query_labels, pool_labels, labels.names if labels else (),
        image_rows=rankings['image'].rows if fine else None)
  report = dict(split=split, k=k, k_coarse=k_coarse, num_queries=int(len(rows)),
                pool_size=int(real.sum()), mask_size=size,
                labels=labels.source if labels else None,
                cot=dict(pooling=config.model.cot.pooling, space=config.pool.cot_space,
                         centre=config.pool.centre_cot,
                         weights=config.model.cot.weights or '(random init)'),
                modes=modes, problems=ranking_problems(modes))
  return report, _reference_rows(rankings, rows, k, pool_ids, dice, data.cache.samples,
                                 query_labels, pool_labels)


def _reference_rows(rankings: dict[str, Ranking], rows: np.ndarray, k: int,
                    pool_ids: np.ndarray, dice: np.ndarray, samples, query_labels,
                    pool_labels) -> list[dict]:
  """references.csv: one row per (mode, query, rank) with its score and mask Dice."""
  records = []
  for mode, ranking in rankings.items():
    for q, row in enumerate(rows):
      for rank in range(k):
        ref = int(pool_ids[ranking.rows[q, rank]])
        record = dict(query=samples[row].id, mode=mode, rank=rank + 1, reference=samples[ref].id,
                      score=f'{ranking.scores[q, rank]:.6f}',
                      ref_mask_dice=f'{dice[q, ranking.rows[q, rank]]:.4f}')
        if query_labels is not None:
          record.update(query_label='/'.join(query_labels[q]),
                        reference_label='/'.join(pool_labels[ranking.rows[q, rank]]))
        records.append(record)
  return records


def write_report(state: TrainState, steps: Steps, data: Data, config, split: str, out_dir: str,
                 **context) -> dict:
  """Builds the report of `split` (the state holds a built pool), writes report.json,
  references.csv and report.png into `out_dir`, logs it. `context`: extra JSON fields."""
  report, records = build_report(state, steps, data, config, split)
  report.update(context)
  if sharding.is_main_process():
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'report.json'), 'w') as f:
      json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, 'references.csv'), 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=list(records[0]))
      writer.writeheader()
      writer.writerows(records)
    plot_report(report, os.path.join(out_dir, 'report.png'))
  logging.info('Retrieval report (%s, %d queries, k=%d, pool of %d) in %s:\n%s', split,
               report['num_queries'], report['k'], report['pool_size'], out_dir,
               format_table(report))
  for problem in report['problems']:
    logging.warning('Retrieval does not rank: %s', problem)
  return report
