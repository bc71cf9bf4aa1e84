"""Validate a dataset once, write its report, split manifest and uint8 cache (DESIGN.md 4, 6).

`prepare(config, workdir)` reads the dataset with the configured layout, decodes every
image and mask once (checking each file), and writes into the cache directory:
report.json (counts and every problem found), split.json (the split every later run
reuses) and the decoded, resized arrays (see `cers_jax.data.cache`). A second call with the
same config reuses split.json (after checking that it was made with the same protocol,
seed and fractions) and the arrays (when image size and files are unchanged).
Files that make the dataset unusable (unreadable images, mask/image size mismatches, masks
that are not binary-like) are all listed in report.json, then a `DataError` names them. So
is a dataset without report texts (every CERS model reads one per image), or whose training
images have none, before any image is decoded; with data.require_text, a single image
without one is an error too.
"""

from __future__ import annotations

import collections
from concurrent import futures
import dataclasses
import datetime
import multiprocessing
import os
from typing import Any, Iterator

from absl import logging
import numpy as np
import tqdm

from cers_jax.data import images as images_lib
from cers_jax.data import layouts
from cers_jax.data import splits
from cers_jax.data.cache import Cache, load_cache, read_samples
from cers_jax.data.records import SPLIT_NAMES, DataError, Problem, Sample, sample_to_dict

_ARRAYS = ('images', 'masks', 'has_mask')


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """The result of `prepare`.

  Attributes:
    cache_dir: the cache directory.
    cache: the opened cache (arrays memory-mapped).
    manifest: split.json content.
    report: report.json content.
    rows: cache rows (int32) of each split, keyed by SPLIT_NAMES.
  """

  cache_dir: str
  cache: Cache
  manifest: dict[str, Any]
  report: dict[str, Any]
  rows: dict[str, np.ndarray]


def resolve_cache_dir(config: Any, workdir: str) -> str:
  """config.data.cache_dir, or <workdir>/data when it is ''."""
  return config.data.cache_dir or os.path.join(workdir, 'data')


def _decode_task(task: tuple[str, str | None, int]):
  return images_lib.decode_pair(*task)


def _decoded(samples: list[Sample], size: int, processes: int) -> Iterator[tuple]:
  """decode_pair results in sample order, from a process pool when processes > 1."""
  tasks = [(s.image_path, s.mask_path, size) for s in samples]
  if processes > 1:
    # 'spawn': forking a process that has started JAX's threads can deadlock. An executor
    # (unlike multiprocessing.Pool) fails instead of respawning workers that cannot start.
    with futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context('spawn')) as pool:
      yield from pool.map(_decode_task, tasks, chunksize=8)
  else:
    yield from map(_decode_task, tasks)


def _tmp(cache_dir: str, name: str) -> str:
  return os.path.join(cache_dir, f'{name}.tmp.npy')


def _build_arrays(cache_dir: str, samples: list[Sample], size: int,
                  processes: int) -> list[Problem]:
  """Decodes every sample into temporary .npy files; returns the fatal problems found."""
  n = len(samples)
  out = {
      'images': np.lib.format.open_memmap(_tmp(cache_dir, 'images'), 'w+', np.uint8,
                                          (n, size, size, 3)),
      'masks': np.lib.format.open_memmap(_tmp(cache_dir, 'masks'), 'w+', np.uint8,
                                         (n, size, size)),
      'has_mask': np.lib.format.open_memmap(_tmp(cache_dir, 'has_mask'), 'w+', np.bool_,
                                            (n,)),
  }
  problems = []
  results = _decoded(samples, size, processes)
  for row, (sample, (image, mask, info)) in enumerate(
      zip(samples, tqdm.tqdm(results, total=n, desc='decoding images', unit='img'))):
    if info['error_kind']:
      problems.append(Problem(str(info['error_kind']), str(info['file']), 0, sample.id,
                              str(info['error'])))
      continue
    out['images'][row] = image
    out['has_mask'][row] = mask is not None
    out['masks'][row] = mask if mask is not None else 0
  for array in out.values():
    array.flush()
  del out
  return problems


def _cache_matches(cache_dir: str, samples: list[Sample], size: int) -> bool:
  """Whether the arrays in cache_dir hold exactly these files at this size."""
  paths = [os.path.join(cache_dir, f'{name}.npy') for name in _ARRAYS]
  samples_path = os.path.join(cache_dir, 'samples.json')
  if not all(os.path.isfile(p) for p in [*paths, samples_path]):
    return False
  try:
    cached = read_samples(samples_path)
    images = np.load(paths[0], mmap_mode='r')
  except (DataError, OSError, ValueError):
    return False
  key = lambda s: (s.id, s.image_path, s.mask_path)
  return (images.shape == (len(samples), size, size, 3)
          and [key(s) for s in cached] == [key(s) for s in samples])


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
      layout=scan.layout)
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


def _report(scan: layouts.DatasetScan, problems: list[Problem], manifest: dict | None,
            cache_dir: str, size: int, reused: dict[str, bool]) -> dict[str, Any]:
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
  return {
      'dataset_root': scan.root, 'layout': scan.layout, 'cache_dir': os.path.abspath(cache_dir),
      'image_size': size, 'reused': reused,
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
  logging.info('Cache %s: %dx%d, %s.', report['cache_dir'], report['image_size'],
               report['image_size'], 'reused' if report['reused']['cache'] else 'built')
  if report['problem_counts']:
    logging.warning('Data problems (details in %s): %s.', report_path, ', '.join(
        f'{k} {v}' for k, v in report['problem_counts'].items()))


def _remove_tmp(cache_dir: str) -> None:
  for name in _ARRAYS:
    if os.path.exists(_tmp(cache_dir, name)):
      os.remove(_tmp(cache_dir, name))


def prepare(config: Any, workdir: str, *, processes: int | None = None) -> PreparedData:
  """Validates the configured dataset and writes report, split manifest and cache.

  Args:
    config: the full config (uses config.seed and config.data.*).
    workdir: the run's folder; the cache goes to <workdir>/data unless data.cache_dir is set.
    processes: decoding processes (> 1 uses a spawn pool); None = config.data's
      'prepare_workers' if the config has that field, else 0.

  Returns:
    PreparedData with the opened cache, the manifest, the report and each split's rows.

  Raises:
    DataError: an unusable dataset (after writing report.json where possible), one
      without report texts in its train split (any image without one when
      data.require_text), a stored split
      that does not fit the config or the dataset, or a bad config value.
  """
  data = config.data
  size = int(data.image_size)
  if size <= 0:
    raise DataError(f'data.image_size={size} must be positive.')
  cache_dir = resolve_cache_dir(config, workdir)
  os.makedirs(cache_dir, exist_ok=True)
  if processes is None:
    processes = int(data.get('prepare_workers', 0) or 0)
  scan = layouts.read_dataset(data)
  problems = list(scan.problems)
  split_path = os.path.join(cache_dir, 'split.json')
  report_path = os.path.join(cache_dir, 'report.json')
  settings = splits.split_settings(data, config.seed)
  manifest, split_reused = _manifest(split_path, scan, settings, size)
  train_ids = {i for name in ('train_labeled', 'train_unlabeled')
               for i in manifest['ids'][name]}
  text_gap = _text_gap(scan, bool(data.require_text), train_ids)
  if text_gap:
    report = _report(scan, problems, None, cache_dir, size, {'split': False, 'cache': False})
    splits.write_json(report_path, {**report, 'error': text_gap})
    raise DataError(f'{text_gap} Details in {report_path}.')
  listed = {i for name in SPLIT_NAMES for i in manifest['ids'][name]}
  problems.extend(Problem('not_in_split', s.image_path, 0, s.id,
                          _unsplit_detail(s, manifest, split_path))
                  for s in scan.samples if s.id not in listed)

  cache_reused = _cache_matches(cache_dir, scan.samples, size)
  if not cache_reused:
    try:
      fatal = _build_arrays(cache_dir, scan.samples, size, processes)
    except BaseException:
      _remove_tmp(cache_dir)
      raise
    if fatal:
      _remove_tmp(cache_dir)
      problems.extend(fatal)
      report = _report(scan, problems, None, cache_dir, size,
                       {'split': split_reused, 'cache': False})
      splits.write_json(report_path, report)
      _log_summary(report, report_path)
      listing = '\n'.join(f'  {p.kind}: {p.detail}' for p in fatal[:5])
      raise DataError(f'{len(fatal)} files make the dataset unusable (all listed in '
                      f'{report_path}), e.g.:\n{listing}')
    for name in _ARRAYS:
      os.replace(_tmp(cache_dir, name), os.path.join(cache_dir, f'{name}.npy'))
  splits.write_json(os.path.join(cache_dir, 'samples.json'),
                    [sample_to_dict(s, row) for row, s in enumerate(scan.samples)])
  if not split_reused:
    splits.write_json(split_path, manifest)
  problems.extend(_empty_mask_problems(cache_dir, scan.samples, size))
  report = _report(scan, problems, manifest, cache_dir, size,
                   {'split': split_reused, 'cache': cache_reused})
  splits.write_json(report_path, report)
  _log_summary(report, report_path)
  cache = load_cache(cache_dir)
  rows = {name: cache.split_rows(name) for name in SPLIT_NAMES}
  return PreparedData(cache_dir, cache, manifest, report, rows)
