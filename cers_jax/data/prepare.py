"""Validate a dataset once; write its report, split and cache (docs/design.md sections 10, 12).

`prepare(config, workdir)` reads the dataset with the configured layout, decodes every
image and mask once (checking each file) and writes report.json, split.json (the split
every later run reuses) and the resized arrays (`cers_jax.data.cache`). A second call with
the same config reuses split.json (after checking protocol, seed and fractions) and the
arrays row by row: sources.json records each row's files (path, size, mtime, SHA-1), a file
whose size or mtime changed is hashed again, and rows whose content changed are decoded
again and reported; a touched or copied file keeps its row. A cache without that record,
of another size or other images, is built anew, and so is one of NIfTI slices decoded with
other `data.nifti` settings (decoding.json). Changed pixels never change split.json.

Every file that makes the dataset unusable is listed in report.json before a `DataError`
names them. A dataset without report texts in its training images (every CERS model reads
one per image) is refused before any image is decoded; so is, with data.require_text, a
single image without one, and with data.require_cot, one without the CoT its split role
queries with. A split without labeled training images is refused before split.json is
written.
"""

from __future__ import annotations

import collections
from concurrent import futures
import dataclasses
import datetime
import hashlib
import json
import multiprocessing
import os
from typing import Any, Iterator

from absl import logging
import numpy as np
import tqdm

from cers_jax.data import images as images_lib
from cers_jax.data import layouts
from cers_jax.data import nifti
from cers_jax.data import splits
from cers_jax.data.cache import Cache, load_cache, read_samples
from cers_jax.data.records import SPLIT_NAMES, DataError, Problem, Sample, sample_to_dict

_ARRAYS = ('images', 'masks', 'has_mask')
_SOURCES = 'sources.json'  # Per row: the image and mask files the arrays were decoded from.
# How slices of volumes were decoded (data.nifti): other settings decode the cache anew.
_DECODING = 'decoding.json'
_LISTED = 5  # File names or ids quoted in a log line or error.


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """The result of `prepare`: the opened cache, split.json and report.json contents, and the
  cache rows (int32) of each split keyed by SPLIT_NAMES.
  """

  cache_dir: str
  cache: Cache
  manifest: dict[str, Any]
  report: dict[str, Any]
  rows: dict[str, np.ndarray]


def resolve_cache_dir(config: Any, workdir: str) -> str:
  """config.data.cache_dir, or <workdir>/data when it is ''."""
  return config.data.cache_dir or os.path.join(workdir, 'data')


def _decode_task(task: tuple) -> list[tuple]:
  """The decode_pair results of one image, or of the slices of one volume (read once)."""
  if task[0] == 'volume':
    return nifti.decode_volume(*task[1:])
  return [images_lib.decode_pair(*task[1:])]


def _decode_tasks(samples: list[Sample], size: int, settings: nifti.NiftiSettings
                  ) -> tuple[list[tuple], list[list[int]]]:
  """One task per image and per volume (its slices together), and the sample positions
  each task's results belong to."""
  tasks: list[tuple] = []
  positions: list[list[int]] = []
  volume_task: dict[tuple, int] = {}
  for position, s in enumerate(samples):
    if s.slice_index < 0:
      tasks.append(('image', s.image_path, s.mask_path, size))
      positions.append([position])
      continue
    key = (s.image_path, s.mask_path)
    if key not in volume_task:
      volume_task[key] = len(tasks)
      tasks.append(('volume', s.image_path, s.mask_path, [], size, settings))
      positions.append([])
    tasks[volume_task[key]][3].append(s.slice_index)
    positions[volume_task[key]].append(position)
  return tasks, positions


def _decoded(samples: list[Sample], size: int, processes: int,
             settings: nifti.NiftiSettings | None = None) -> Iterator[tuple]:
  """decode_pair results in sample order, from a process pool when processes > 1."""
  tasks, positions = _decode_tasks(samples, size, settings or nifti.NiftiSettings())
  if processes > 1:
    # 'spawn': forking a process that has started JAX's threads can deadlock. An executor
    # (unlike multiprocessing.Pool) fails instead of respawning workers that cannot start.
    with futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context('spawn')) as pool:
      yield from _in_order(positions, pool.map(_decode_task, tasks, chunksize=8))
  else:
    yield from _in_order(positions, map(_decode_task, tasks))


def _in_order(positions: list[list[int]], results: Iterator[list[tuple]]) -> Iterator[tuple]:
  """Task results re-ordered by sample position; holds only the tasks not yet used up
  (one volume at a time when its slices are consecutive samples, as sorted ids make them)."""
  pending: dict[int, tuple] = {}
  task_results = zip(positions, results)
  for position in range(sum(map(len, positions))):
    while position not in pending:
      task_positions, outputs = next(task_results)
      pending.update(zip(task_positions, outputs))
    yield pending.pop(position)


def _tmp(cache_dir: str, name: str) -> str:
  return os.path.join(cache_dir, f'{name}.tmp.npy')


def _open_tmp_arrays(cache_dir: str, n: int, size: int) -> dict[str, np.ndarray]:
  shapes = {'images': ((n, size, size, 3), np.uint8), 'masks': ((n, size, size), np.uint8),
            'has_mask': ((n,), np.bool_)}
  return {name: np.lib.format.open_memmap(_tmp(cache_dir, name), 'w+', dtype, shape)
          for name, (shape, dtype) in shapes.items()}


def _decode_rows(out: dict[str, np.ndarray], samples: list[Sample], rows: list[int],
                 size: int, processes: int,
                 settings: nifti.NiftiSettings | None = None) -> list[Problem]:
  """Decodes the samples at `rows` into the arrays `out`; returns the fatal problems (a bad
  volume once, not once per slice)."""
  problems, named = [], set()
  results = _decoded([samples[r] for r in rows], size, processes, settings)
  for row, (image, mask, info) in zip(
      rows, tqdm.tqdm(results, total=len(rows), desc='decoding images', unit='img')):
    if info['error_kind']:
      if (info['error_kind'], info['file']) not in named:
        named.add((info['error_kind'], info['file']))
        problems.append(Problem(str(info['error_kind']), str(info['file']), 0,
                                samples[row].id, str(info['error'])))
      continue
    out['images'][row] = image
    out['has_mask'][row] = mask is not None
    out['masks'][row] = mask if mask is not None else 0
  for array in out.values():
    array.flush()
  return problems


def _build_arrays(cache_dir: str, samples: list[Sample], size: int, processes: int,
                  rows: list[int] | None = None,
                  settings: nifti.NiftiSettings | None = None) -> list[Problem]:
  """Decodes samples into temporary .npy files; returns the fatal problems found.

  rows=None decodes every sample; otherwise the current arrays are copied and only `rows`
  are decoded again (a reader of the old files keeps seeing them until they are replaced).
  """
  out = _open_tmp_arrays(cache_dir, len(samples), size)
  if rows is not None:
    for name, array in out.items():
      array[:] = np.load(os.path.join(cache_dir, f'{name}.npy'), mmap_mode='r')
  problems = _decode_rows(out, samples, list(range(len(samples))) if rows is None else rows,
                          size, processes, settings)
  del out
  return problems


def _sha1(path: str) -> str:
  digest = hashlib.sha1()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _signature(path: str | None, known: dict | None) -> dict | None:
  """{path, size, mtime_ns, sha1} of a file; the known hash is kept while path, size and
  mtime are unchanged (hashing every file on every run would read the whole dataset)."""
  if path is None:
    return None
  try:
    stat = os.stat(path)
  except OSError:  # Gone since the scan: a changed row, whose decoding reports it.
    return dict(path=path, size=-1, mtime_ns=-1, sha1='')
  if (known and known.get('path') == path and known.get('size') == stat.st_size
      and known.get('mtime_ns') == stat.st_mtime_ns):
    return known
  return dict(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns, sha1=_sha1(path))


def _sources(samples: list[Sample], known: list[dict] | None = None) -> list[dict]:
  known = known or [{}] * len(samples)
  signed: dict[str | None, dict | None] = {}  # The slices of a volume share its file.

  def signature(path: str | None, old: dict | None) -> dict | None:
    if path not in signed:
      signed[path] = _signature(path, old)
    return signed[path]

  return [{'image': signature(s.image_path, k.get('image')),
           'mask': signature(s.mask_path, k.get('mask'))} for s, k in zip(samples, known)]


def _changed_files(old: dict, new: dict) -> list[str]:
  """The files of one row whose content differs from when the row was decoded."""
  sha1 = lambda source: None if source is None else source['sha1']  # noqa: E731
  return [(new[f] or old[f])['path'] for f in ('image', 'mask') if sha1(old[f]) != sha1(new[f])]


@dataclasses.dataclass(frozen=True)
class _CachePlan:
  """What `prepare` does with the arrays already in the cache directory."""

  stale_rows: list[int] | None  # Rows to decode again; None: build every row anew.
  sources: list[dict] | None  # Signatures of the current files (None: after the build).
  why: str  # Why the cache is built anew ('' otherwise).
  changed: tuple[str, ...] = ()  # The files behind stale_rows.


def _plan_cache(cache_dir: str, samples: list[Sample], size: int) -> _CachePlan:
  """Compares the cache with the dataset's files, row by row."""
  paths = [os.path.join(cache_dir, f'{name}.npy') for name in _ARRAYS]
  samples_path = os.path.join(cache_dir, 'samples.json')
  sources_path = os.path.join(cache_dir, _SOURCES)
  if not all(os.path.isfile(p) for p in [*paths, samples_path]):
    return _CachePlan(None, None, '')
  try:
    cached = read_samples(samples_path)
    images = np.load(paths[0], mmap_mode='r')
    with open(sources_path, encoding='utf-8') as f:
      known = json.load(f)
  except FileNotFoundError:
    return _CachePlan(None, None, f'it has no {_SOURCES} (a record of its source files, '
                      'added after it was made), so changed files could go unnoticed')
  except (DataError, OSError, ValueError) as error:
    return _CachePlan(None, None, f'it cannot be read ({error})')
  if images.shape != (len(samples), size, size, 3):
    return _CachePlan(None, None, f'it holds {images.shape[0]} images of {images.shape[1]}'
                      f'x{images.shape[2]}, the dataset {len(samples)} at {size}x{size}')
  if [s.id for s in cached] != [s.id for s in samples] or len(known) != len(samples):
    return _CachePlan(None, None, 'the dataset has other images now')
  current = _sources(samples, known)
  changed = [_changed_files(old, new) for old, new in zip(known, current)]
  return _CachePlan([row for row, files in enumerate(changed) if files], current, '',
                    tuple(dict.fromkeys(f for files in changed for f in files)))


def _decoding(samples: list[Sample], settings: nifti.NiftiSettings) -> dict[str, Any]:
  """The settings the cached pixels depend on beyond image_size ({} without volumes)."""
  if not any(s.slice_index >= 0 for s in samples):
    return {}
  return {'nifti': json.loads(json.dumps(dataclasses.asdict(settings)))}


def _plan(cache_dir: str, samples: list[Sample], size: int,
          decoding: dict[str, Any]) -> _CachePlan:
  """`_plan_cache`, and a new build when the cache was decoded with other settings."""
  plan = _plan_cache(cache_dir, samples, size)
  if plan.stale_rows is None:
    return plan
  try:
    with open(os.path.join(cache_dir, _DECODING), encoding='utf-8') as f:
      stored = json.load(f)
  except FileNotFoundError:
    stored = {}
  except (OSError, ValueError):
    stored = None
  if stored != decoding:
    return _CachePlan(None, None, f'it was decoded with {stored}, the config asks for '
                      f'{decoding}')
  return plan


def _write_decoding(cache_dir: str, decoding: dict[str, Any]) -> None:
  path = os.path.join(cache_dir, _DECODING)
  if decoding:
    splits.write_json(path, decoding)
  elif os.path.exists(path):
    os.remove(path)


def _manifest(path: str, scan: layouts.DatasetScan, settings: dict[str, Any],
              image_size: int) -> tuple[dict[str, Any], bool]:
  """The stored split (checked) or a new one; and whether it was reused."""
  known = {s.id for s in scan.samples}
  if os.path.isfile(path):
    manifest = splits.read_manifest(path)
    splits.check_manifest(manifest, settings, path, known)
    unmasked = {s.id for s in scan.samples if s.mask_path is None}
    needs_mask = sorted(i for name in ('train_labeled', 'val', 'test')
                        for i in manifest['ids'][name] if i in unmasked)
    if needs_mask:
      raise DataError(f'{path} puts {len(needs_mask)} images that now have no mask in a '
                      f'labeled/val/test split (e.g. {needs_mask[:5]}). Restore their '
                      f'masks, or delete {path} to make a new split.')
    return manifest, True
  ids = splits.make_split(
      scan.samples, protocol=settings['protocol'], seed=settings['seed'],
      ratios=settings['ratios'], val_fraction=settings['val_fraction'],
      labeled_fraction=settings['labeled_fraction'], group_regex=settings['group_regex'],
      layout=scan.layout, labeled_count=settings['labeled_count'],
      split_file=settings.get('split_file', ''))
  return splits.build_manifest(ids, settings, dataset_root=scan.root, layout=scan.layout,
                               image_size=image_size), False


def _text_files_read(scan: layouts.DatasetScan) -> str:
  files = [f for f in scan.annotation_files if f['kind'] == 'text']
  if not files:
    return 'No such file was found.'
  return 'Read ' + '; '.join(f"{f['path']} ({f['rows']} rows, {f['matched']} matched an "
                             'image)' for f in files) + '.'


def _text_gap(scan: layouts.DatasetScan, require_text: bool,
              train_ids: set[str]) -> str | None:
  """Why the report texts make the dataset unusable, or None when they do not."""
  missing = [s.id for s in scan.samples if s.text is None]
  # The text tokenizer learns from the training images' texts alone.
  untrained = bool(train_ids) and train_ids.issubset(missing)
  if not missing or (len(missing) < len(scan.samples) and not untrained
                     and not require_text):
    return None
  looked = (f"Looked for {scan.annotation_search.get('text', 'no text file')}. "
            f'{_text_files_read(scan)}')
  files = ("one path, a comma-separated list or glob patterns (e.g. "
           "'/data/QaTa-COV19/*.xlsx'), with an image column holding the image file names "
           '(LViT workbooks: the mask file names) and a text column')
  if len(missing) == len(scan.samples):
    return (f'None of the {len(missing)} images under {scan.root} has a report text, and '
            f'CERS reads one per image. {looked} Point --config.data.text_csv at the '
            f'report-text files: {files}.')
  if untrained:
    return (f'None of the {len(train_ids)} training images under {scan.root} has a report '
            f'text ({len(scan.samples) - len(missing)} other images do), and the text '
            f'tokenizer and encoder learn from them. {looked} Point --config.data.text_csv at '
            f'the files for all splits: {files}.')
  return (f'{len(missing)} of {len(scan.samples)} images under {scan.root} have no report '
          f'text (e.g. {missing[:5]}) and data.require_text is True. {looked} Add their '
          f'texts (--config.data.text_csv: {files}), or set --config.data.require_text=False '
          'to use them without text (all-padding tokens).')


def _unsplit_detail(sample: Sample, manifest: dict[str, Any], split_path: str) -> str:
  """Why an image of the dataset is in no split of the manifest."""
  if (manifest['protocol'] == 'official' and sample.mask_path is None
      and sample.official_split in ('val', 'test')):
    return (f'no mask, in the official {sample.official_split} folder: neither scored nor '
            'trained on')
  return f'added after {split_path} was made; used by no split'


def _empty_mask_problems(cache_dir: str, samples: list[Sample], size: int) -> list[Problem]:
  masks = np.load(os.path.join(cache_dir, 'masks.npy'), mmap_mode='r')
  has_mask = np.load(os.path.join(cache_dir, 'has_mask.npy'))
  problems = []
  for start in range(0, len(samples), 1024):  # Chunks keep memory flat on big datasets.
    nonempty = masks[start:start + 1024].any(axis=(1, 2))
    for offset in np.flatnonzero(has_mask[start:start + 1024] & ~nonempty):
      sample = samples[start + offset]
      problems.append(Problem('empty_mask', sample.mask_path or '', 0, sample.id,
                              f'all zero at {size}x{size} (no lesion, or one smaller than '
                              'a pixel after resizing)'))
  return problems


def _without_query_cot(samples: list[Sample], manifest: dict[str, Any]) -> dict[str, list]:
  """Per split, the ids without the CoT that split queries with (training with it too).

  Labeled training images align with and query by the CoT written with the mask; every
  other image queries by the one written without (`retrieval.embed.with_text_features`).
  """
  by_id = {s.id: s for s in samples}
  missing = {}
  for name in SPLIT_NAMES:
    field = 'cot_mask' if name == 'train_labeled' else 'cot_no_mask'
    missing[name] = [i for i in manifest['ids'][name] if getattr(by_id[i], field) is None]
  return missing


def _cot_gap(missing: dict[str, list], require_cot: bool) -> str | None:
  total = sum(len(ids) for ids in missing.values())
  if not total or not require_cot:
    return None
  ids = [i for name in SPLIT_NAMES for i in missing[name]]
  counts = ', '.join(f'{name} {len(ids)}' for name, ids in missing.items() if ids)
  return (f'{total} images have no CoT for their role ({counts}; e.g. {ids[:_LISTED]}) and '
          'data.require_cot is True. Labeled training images need the CoT written with the '
          'mask (--config.data.cot_mask_csv), all others the one written without '
          '(--config.data.cot_no_mask_csv): add them (python -m cers_jax.cot.generate '
          'writes them), or set --config.data.require_cot=False to query with an '
          'all-padding CoT.')


def _report(scan: layouts.DatasetScan, problems: list[Problem], manifest: dict | None,
            cache_dir: str, size: int, reused: dict[str, bool],
            rebuilt: list[str] | None = None,
            changed_files: tuple[str, ...] = ()) -> dict[str, Any]:
  samples = scan.samples
  kinds = collections.Counter(p.kind for p in problems)
  counts = {
      'images': len(samples),
      'with_mask': sum(s.mask_path is not None for s in samples),
      'with_text': sum(s.text is not None for s in samples),
      'with_cot_mask': sum(s.cot_mask is not None for s in samples),
      'with_cot_no_mask': sum(s.cot_no_mask is not None for s in samples),
      'empty_masks': kinds.get('empty_mask', 0),
      'official_split': dict(collections.Counter(s.official_split or '-' for s in samples)),
  }
  if manifest is not None:
    counts['split'] = {name: len(manifest['ids'][name]) for name in SPLIT_NAMES}
    missing = _without_query_cot(samples, manifest)
    counts['without_query_cot'] = {name: len(ids) for name, ids in missing.items()}
  return {
      'dataset_root': scan.root, 'layout': scan.layout, 'cache_dir': os.path.abspath(cache_dir),
      'image_size': size, 'reused': reused, 'cache_rows_rebuilt': rebuilt or [],
      'cache_changed_files': list(changed_files),
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'counts': counts, 'problem_counts': dict(sorted(kinds.items())),
      'annotation_files': scan.annotation_files,
      'annotation_search': scan.annotation_search,
      'problems': [p.to_dict() for p in problems],
  }


def _log_summary(report: dict[str, Any], report_path: str) -> None:
  c = report['counts']
  no_text = c['images'] - c['with_text']
  text_gap = (f' ({no_text} without: missing_text in report.json; '
              '--config.data.require_text=True makes that an error)' if no_text else '')
  logging.info('Dataset %s (layout %s): %d images, %d with masks, %d with text%s, CoTs %d '
               'with mask / %d without.', report['dataset_root'], report['layout'],
               c['images'], c['with_mask'], c['with_text'], text_gap, c['with_cot_mask'],
               c['with_cot_no_mask'])
  for f in report['annotation_files']:
    logging.info('%s file %s (found by %s): %d rows, %d matched an image, %d repeated an '
                 'earlier id, %d named no image.', f['kind'], f['path'], f['found_by'],
                 f['rows'], f['matched'], f['duplicates'], f['unknown'])
  if 'split' in c:
    logging.info('Split: %s (%s).', ', '.join(f'{k} {v}' for k, v in c['split'].items()),
                 'reused' if report['reused']['split'] else 'new')
  no_cot = {k: v for k, v in c.get('without_query_cot', {}).items() if v}
  if no_cot:
    logging.warning(
        '%d images have no CoT for their role (%s): they are queried (and labeled ones '
        'pooled) with an all-padding CoT, which says nothing about them (README "Failure '
        'modes"); --config.data.require_cot=True makes that an error.', sum(no_cot.values()),
        ', '.join(f'{k} {v}' for k, v in no_cot.items()))
  rebuilt = report['cache_rows_rebuilt']
  state = ('reused' if report['reused']['cache'] else
           f'{len(rebuilt)} rows decoded again' if rebuilt else 'built')
  logging.info('Cache %s: %dx%d, %s.', report['cache_dir'], report['image_size'],
               report['image_size'], state)
  if report['problem_counts']:
    logging.warning('Data problems (details in %s): %s.', report_path, ', '.join(
        f'{k} {v}' for k, v in report['problem_counts'].items()))


def _remove_tmp(cache_dir: str) -> None:
  for name in _ARRAYS:
    if os.path.exists(_tmp(cache_dir, name)):
      os.remove(_tmp(cache_dir, name))


def _cache_dir_ready(config: Any, workdir: str) -> tuple[str, int]:
  """(cache directory, created if needed; the cached image size), or a DataError."""
  size = int(config.data.image_size)
  if size <= 0:
    raise DataError(f'data.image_size={size} must be positive.')
  cache_dir = resolve_cache_dir(config, workdir)
  try:
    os.makedirs(cache_dir, exist_ok=True)
  except OSError as error:
    raise DataError(f'Cannot create the cache directory {cache_dir} ({error.strerror}): set '
                    '--config.data.cache_dir (or --workdir) to a folder you can write.'
                    ) from error
  return cache_dir, size


def _checked_split(config: Any, scan: layouts.DatasetScan, problems: list[Problem],
                   cache_dir: str, size: int) -> tuple[dict[str, Any], bool]:
  """The split manifest and whether it was reused; refuses a split without labeled
  images and missing texts or CoTs (report.json written first), and adds a problem for
  every image the split does not list."""
  data = config.data
  split_path = os.path.join(cache_dir, 'split.json')
  report_path = os.path.join(cache_dir, 'report.json')
  manifest, split_reused = _manifest(split_path, scan, splits.split_settings(data, config.seed),
                                     size)
  if not manifest['ids']['train_labeled']:
    written = (f'delete {split_path}, made with it' if split_reused else
               f'{split_path} was not written')
    raise DataError(
        f'data.labeled_fraction={data.labeled_fraction} leaves none of the '
        f'{len(manifest["ids"]["train_unlabeled"])} training images labeled, and CERS '
        'starts from labeled images (warm-up, the knowledge pool): raise '
        f'--config.data.labeled_fraction (e.g. 0.25); {written}.')
  train_ids = {i for name in ('train_labeled', 'train_unlabeled')
               for i in manifest['ids'][name]}
  text_gap = _text_gap(scan, bool(data.require_text), train_ids)
  if text_gap:
    report = _report(scan, problems, None, cache_dir, size, {'split': False, 'cache': False})
    splits.write_json(report_path, {**report, 'error': text_gap})
    raise DataError(f'{text_gap} Details in {report_path}.')
  cot_gap = _cot_gap(_without_query_cot(scan.samples, manifest), bool(data.get('require_cot')))
  if cot_gap:
    report = _report(scan, problems, manifest, cache_dir, size,
                     {'split': split_reused, 'cache': False})
    splits.write_json(report_path, {**report, 'error': cot_gap})
    raise DataError(f'{cot_gap} Details in {report_path}.')
  listed = {i for name in SPLIT_NAMES for i in manifest['ids'][name]}
  problems.extend(Problem('not_in_split', s.image_path, 0, s.id,
                          _unsplit_detail(s, manifest, split_path))
                  for s in scan.samples if s.id not in listed)
  return manifest, split_reused


def _built_cache(scan: layouts.DatasetScan, problems: list[Problem], cache_dir: str,
                 size: int, processes: int, nifti_settings, decoding, split_reused: bool):
  """Decodes what the cache lacks (all of it, or the rows whose files changed) and moves
  the new arrays in place; returns (plan, whether the cache was reused whole, the ids of
  rebuilt rows). Files that make the dataset unusable end in a DataError."""
  plan = _plan(cache_dir, scan.samples, size, decoding)
  cache_reused = plan.stale_rows == []
  rebuilt = []
  if plan.why:
    logging.info('Building the cache in %s anew: %s.', cache_dir, plan.why)
  if plan.stale_rows:
    rebuilt = [scan.samples[r].id for r in plan.stale_rows]
    logging.warning('%d cached rows are out of date: their files changed since the cache '
                    'was built (%s%s); decoding them again.', len(rebuilt),
                    ', '.join(plan.changed[:_LISTED]),
                    ', ...' if len(plan.changed) > _LISTED else '')
  if cache_reused:
    return plan, cache_reused, rebuilt
  try:
    fatal = _build_arrays(cache_dir, scan.samples, size, processes, plan.stale_rows,
                          nifti_settings)
  except BaseException:
    _remove_tmp(cache_dir)
    raise
  if fatal:
    _remove_tmp(cache_dir)
    problems.extend(fatal)
    report_path = os.path.join(cache_dir, 'report.json')
    report = _report(scan, problems, None, cache_dir, size,
                     {'split': split_reused, 'cache': False})
    splits.write_json(report_path, report)
    _log_summary(report, report_path)
    listing = ' | '.join(f'{p.kind}: {p.detail}' for p in fatal[:_LISTED])
    # One line: run.py prints it as the error line.
    raise DataError(f'{len(fatal)} files make the dataset unusable (all listed in '
                    f'{report_path}), e.g. {listing}')
  for name in _ARRAYS:
    os.replace(_tmp(cache_dir, name), os.path.join(cache_dir, f'{name}.npy'))
  return plan, cache_reused, rebuilt


def prepare(config: Any, workdir: str, *, processes: int | None = None) -> PreparedData:
  """Validates the configured dataset and writes report, split manifest and cache.

  The cache goes to <workdir>/data unless data.cache_dir is set. `processes` > 1 decodes in a
  spawn pool; None takes config.data.prepare_workers if the config has it, else 0. Raises
  DataError for an unusable dataset (after writing report.json where possible), missing
  report texts (any at all with data.require_text), a stored split that does not fit the
  config or the dataset, or a bad config value.
  """
  data = config.data
  cache_dir, size = _cache_dir_ready(config, workdir)
  if processes is None:
    processes = int(data.get('prepare_workers', 0) or 0)
  scan = layouts.read_dataset(data)
  problems = list(scan.problems)
  manifest, split_reused = _checked_split(config, scan, problems, cache_dir, size)
  nifti_settings = nifti.NiftiSettings.from_config(data)
  decoding = _decoding(scan.samples, nifti_settings)
  plan, cache_reused, rebuilt = _built_cache(scan, problems, cache_dir, size, processes,
                                             nifti_settings, decoding, split_reused)
  # After the arrays: a run stopped in between decodes those rows again next time.
  splits.write_json(os.path.join(cache_dir, _SOURCES),
                    plan.sources if plan.stale_rows is not None else _sources(scan.samples))
  _write_decoding(cache_dir, decoding)
  splits.write_json(os.path.join(cache_dir, 'samples.json'),
                    [sample_to_dict(s, row) for row, s in enumerate(scan.samples)])
  if not split_reused:
    splits.write_json(os.path.join(cache_dir, 'split.json'), manifest)
  problems.extend(_empty_mask_problems(cache_dir, scan.samples, size))
  report = _report(scan, problems, manifest, cache_dir, size,
                   {'split': split_reused, 'cache': cache_reused}, rebuilt, plan.changed)
  report_path = os.path.join(cache_dir, 'report.json')
  splits.write_json(report_path, report)
  _log_summary(report, report_path)
  cache = load_cache(cache_dir)
  rows = {name: cache.split_rows(name) for name in SPLIT_NAMES}
  return PreparedData(cache_dir, cache, manifest, report, rows)
