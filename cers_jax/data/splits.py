"""Train/val/test split and labeled subset, written once as split.json (docs/design.md section 10).

Protocols (registry `PROTOCOLS`):
- 'paper': the paper's 8:1:1 random split (data.split_ratios) seeded by config.seed;
- 'official': the layout's own train/test (and val, if it has one; otherwise val is carved
  from train by data.val_fraction);
- 'grouped': like 'paper' but whole groups (patients, volumes, cases: data.group_regex's
  first group applied to the id, else Sample.group, else the id) go to one side only.
  Layouts of slices (`GROUPED_LAYOUTS`: 'nifti', whose Sample.group is the volume) take
  'grouped' where 'paper' is configured: a random split of slices would put neighbouring
  slices of one case on both sides, and test would score slices trained on.
Then a labeled fraction of train keeps its masks. The labeled subset is a prefix of one
seeded permutation of train, so the 25% subset lies inside the 50% subset for the same
seed, and it uses its own random stream, so changing the fraction never moves images
between train, val and test. Images without a mask can only be unlabeled training images;
under 'official', those of the val/test folders are in no split (never trained on).
Ids are sorted before shuffling, so the split depends on the seed and the ids only, never
on the order a file system lists them.

`data.labeled_count` asks for a number of labeled training images instead of a fraction
(the way BCP and others publish "7 cases", not "10%"). `data.split_file` takes a published
split instead of drawing one (`read_split_file`: a folder of plain lists, a CSV or a JSON);
the labeled ids come from the file when it lists them, else from the same seeded prefix.
The manifest records where its split came from (`source`).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import math
import os
import re
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

from cers_jax.data.records import SPLIT_NAMES, DataError, Sample

# Stream ids mixed into the seed: one for the split, one for the labeled subset.
_SPLIT_STREAM, _LABELED_STREAM = 0, 1
# Layouts whose samples are slices of volumes: 'paper' means 'grouped' by volume for them.
GROUPED_LAYOUTS = ('nifti',)


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), stream])


def _counts(n: int, ratios: Sequence[float]) -> tuple[int, int, int]:
  """Train/val/test sizes for n items; a non-zero ratio gets at least one item if n >= 3."""
  if len(ratios) != 3 or min(ratios) < 0 or not math.isclose(sum(ratios), 1.0,
                                                               abs_tol=1e-6):
    raise DataError(f'data.split_ratios {tuple(ratios)} must be three non-negative '
                    'train/val/test fractions summing to 1, e.g. (0.8, 0.1, 0.1).')
  n_val, n_test = (int(round(r * n)) for r in ratios[1:])
  if n >= 3:
    n_val = max(n_val, 1) if ratios[1] > 0 else 0
    n_test = max(n_test, 1) if ratios[2] > 0 else 0
  n_val, n_test = min(n_val, n), min(n_test, max(n - n_val, 0))
  return n - n_val - n_test, n_val, n_test


def _split_paper(ids: list[str], samples: dict[str, Sample], *, seed: int,
                 ratios: Sequence[float], **_: Any) -> tuple[list[str], list[str], list[str]]:
  order = [ids[i] for i in _rng(seed, _SPLIT_STREAM).permutation(len(ids))]
  n_train, n_val, _ = _counts(len(ids), ratios)
  return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def _split_official(ids: list[str], samples: dict[str, Sample], *, seed: int,
                    val_fraction: float, layout: str = '', **_: Any
                    ) -> tuple[list[str], list[str], list[str]]:
  by_split: dict[str, list[str]] = {'train': [], 'val': [], 'test': [], '': []}
  for i in ids:
    by_split.setdefault(samples[i].official_split, []).append(i)
  if not by_split['test'] or by_split['']:
    raise DataError(
        f'split_protocol="official" needs the layout\'s own train/test folders, but layout '
        f'{layout!r} gave {len(by_split[""])} images without one and {len(by_split["test"])} '
        'test images. Use --config.data.split_protocol=paper (or grouped).')
  train, val = by_split['train'], by_split['val']
  if not val:
    if not 0 < val_fraction < 1:
      raise DataError(f'data.val_fraction={val_fraction} must be in (0, 1): the layout has '
                      'no val folder, so val is carved from the official train set.')
    order = [train[i] for i in _rng(seed, _SPLIT_STREAM).permutation(len(train))]
    n_val = max(1, int(round(val_fraction * len(train))))
    train, val = order[n_val:], order[:n_val]
  return train, val, by_split['test']


def group_of(sample: Sample, group_regex: str) -> str:
  """The group of a sample: group_regex's first group on its id, else Sample.group or id."""
  if group_regex:
    match = re.search(group_regex, sample.id)
    if match is None:
      raise DataError(f'data.group_regex {group_regex!r} does not match sample id '
                      f'{sample.id!r}; write one that matches every id, e.g. r"^(.*)_\\d+$".')
    return match.group(1) if match.groups() else match.group(0)
  return sample.group or sample.id


def _split_grouped(ids: list[str], samples: dict[str, Sample], *, seed: int,
                   ratios: Sequence[float], group_regex: str, **_: Any
                   ) -> tuple[list[str], list[str], list[str]]:
  members: dict[str, list[str]] = {}
  for i in ids:
    members.setdefault(group_of(samples[i], group_regex), []).append(i)
  groups = sorted(members)
  order = [groups[i] for i in _rng(seed, _SPLIT_STREAM).permutation(len(groups))]
  _, want_val, want_test = _counts(len(ids), ratios)
  test, val, train = [], [], []
  # Fill test, then val, up to their image counts with whole groups; the rest is train.
  for group in order:
    if len(test) < want_test:
      test.extend(members[group])
    elif len(val) < want_val:
      val.extend(members[group])
    else:
      train.extend(members[group])
  return train, val, test


PROTOCOLS: dict[str, Callable[..., tuple[list[str], list[str], list[str]]]] = {
    'paper': _split_paper, 'official': _split_official, 'grouped': _split_grouped,
}


def make_split(samples: Sequence[Sample], *, protocol: str, seed: int,
               ratios: Sequence[float] = (0.8, 0.1, 0.1), val_fraction: float = 0.1,
               labeled_fraction: float = 0.25, group_regex: str = '', layout: str = '',
               labeled_count: int = 0, split_file: str = '') -> dict[str, list[str]]:
  """Splits samples into train_labeled, train_unlabeled, val and test ids (each sorted).

  `ratios` serve 'paper' and 'grouped', `val_fraction` 'official'. `labeled_fraction` of
  train (images with masks) stays labeled, at least one image when > 0. `layout` is only
  named in error messages. `labeled_count` > 0 asks for that many labeled images instead
  of a fraction; `split_file` reads the split from a file (`read_split_file`).
  """
  if split_file:
    return split_from_file(split_file, samples, seed=seed, labeled_fraction=labeled_fraction,
                           labeled_count=labeled_count)
  split_fn = PROTOCOLS.get(protocol)
  if split_fn is None:
    raise DataError(f'Unknown data.split_protocol {protocol!r}; choices: {sorted(PROTOCOLS)}.')
  if not 0 <= labeled_fraction <= 1:
    raise DataError(f'data.labeled_fraction={labeled_fraction} must be in [0, 1].')
  by_id = {s.id: s for s in samples}
  with_mask = sorted(i for i, s in by_id.items() if s.mask_path is not None)
  # 'official': no image of the val/test folders may reach training, not even unlabeled.
  held_out = ('val', 'test') if protocol == 'official' else ()
  without_mask = sorted(i for i, s in by_id.items()
                        if s.mask_path is None and s.official_split not in held_out)
  if not with_mask:
    raise DataError('No image has a mask, so there is nothing to validate or test on. '
                    'Check the masks folder of the dataset.')
  train, val, test = split_fn(with_mask, by_id, seed=seed, ratios=ratios,
                              val_fraction=val_fraction, group_regex=group_regex,
                              layout=layout)
  labeled, unlabeled = _labeled_prefix(train, seed=seed, labeled_fraction=labeled_fraction,
                                       labeled_count=labeled_count)
  return {
      'train_labeled': labeled,
      'train_unlabeled': sorted(unlabeled + without_mask),
      'val': sorted(val),
      'test': sorted(test),
  }


def _labeled_prefix(train: Sequence[str], *, seed: int, labeled_fraction: float,
                    labeled_count: int = 0) -> tuple[list[str], list[str]]:
  """(labeled, unlabeled) ids of train: a prefix of one seeded permutation, of
  `labeled_count` images when > 0, else of `labeled_fraction` of them (at least one)."""
  train = sorted(train)
  order = [train[i] for i in _rng(seed, _LABELED_STREAM).permutation(len(train))]
  if labeled_count < 0 or labeled_count > len(train):
    raise DataError(f'data.labeled_count={labeled_count} must be between 0 and the '
                    f'{len(train)} masked training images of the split.')
  if labeled_count:
    n_labeled = int(labeled_count)
  else:
    if not 0 <= labeled_fraction <= 1:
      raise DataError(f'data.labeled_fraction={labeled_fraction} must be in [0, 1].')
    n_labeled = int(round(labeled_fraction * len(train)))
    if labeled_fraction > 0 and train:
      n_labeled = max(n_labeled, 1)
  return sorted(order[:n_labeled]), sorted(order[n_labeled:])


# --- published splits -----------------------------------------------------------------------

# Names a published split gives each part -> ours. 'labeled' lists are a subset of train.
_PART_NAMES = {
    'train': 'train', 'training': 'train', 'val': 'val', 'valid': 'val',
    'validation': 'val', 'test': 'test', 'testing': 'test', 'labeled': 'labeled',
    'labelled': 'labeled', 'train_labeled': 'labeled', 'unlabeled': 'unlabeled',
    'unlabelled': 'unlabeled', 'train_unlabeled': 'unlabeled',
}
_LIST_SUFFIXES = ('.txt', '.list', '.lst', '.csv', '')


def _read_lines(path: str) -> list[str]:
  with open(path, encoding='utf-8-sig') as f:
    return [line.strip() for line in f if line.strip() and not line.startswith('#')]


def _parts_from_folder(folder: str) -> dict[str, list[str]]:
  """train.txt / val.list / test.txt / labeled.txt ... (one id or file name a line)."""
  parts: dict[str, list[str]] = {}
  for name in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(name)
    part = _PART_NAMES.get(stem.lower())
    if part and ext.lower() in _LIST_SUFFIXES and os.path.isfile(os.path.join(folder, name)):
      parts.setdefault(part, []).extend(_read_lines(os.path.join(folder, name)))
  return parts


def _parts_from_csv(path: str) -> dict[str, list[str]]:
  """Rows of id,split (header names: id/image/name/case and split/fold/set); a split
  value of 'labeled'/'train_labeled' marks a labeled training image, and an optional
  'labeled' column (1/true/yes) does the same for rows of 'train'."""
  with open(path, encoding='utf-8-sig', newline='') as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise DataError(f'Split file {path} has no rows; write a header "id,split" and a row '
                    'per image.')
  fields = {k.strip().lower(): k for k in rows[0]}
  id_key = next((fields[k] for k in ('id', 'image', 'name', 'case', 'filename') if k in fields),
                None)
  split_key = next((fields[k] for k in ('split', 'fold', 'set', 'subset') if k in fields), None)
  if id_key is None or split_key is None:
    raise DataError(f'Split file {path} needs an id column (id/image/name/case) and a split '
                    f'column (split/fold/set); its header is {list(rows[0])}.')
  labeled_key = fields.get('labeled') or fields.get('labelled')
  parts: dict[str, list[str]] = {}
  for row in rows:
    value = (row[split_key] or '').strip().lower()
    part = _PART_NAMES.get(value)
    if part is None:
      raise DataError(f'Split file {path}: split {row[split_key]!r} of {row[id_key]!r} is '
                      f'not one of {sorted(_PART_NAMES)}.')
    ident = row[id_key].strip()
    if part == 'labeled':
      parts.setdefault('train', []).append(ident)
    if part in ('unlabeled',):
      parts.setdefault('train', []).append(ident)
    parts.setdefault(part, []).append(ident)
    flag = (row.get(labeled_key) or '').strip().lower() if labeled_key else ''
    if part == 'train' and flag in ('1', 'true', 'yes', 'y'):
      parts.setdefault('labeled', []).append(ident)
  return parts


def _parts_from_json(path: str) -> dict[str, list[str]]:
  """{"train": [...], "val": [...], "test": [...], "labeled": [...]}, this project's
  split.json ({"ids": {...}}), or nnU-Net's splits_final.json (a list of folds: the first
  fold's "train"/"val"; test is then needed as a key of a dict around it)."""
  with open(path, encoding='utf-8') as f:
    content = json.load(f)
  if isinstance(content, list) and content and isinstance(content[0], dict):
    content = content[0]  # nnU-Net: folds; fold 0.
  if isinstance(content, dict) and isinstance(content.get('ids'), dict):
    content = content['ids']
  if not isinstance(content, dict):
    raise DataError(f'Split file {path} must hold an object of id lists per split, e.g. '
                    '{"train": [...], "val": [...], "test": [...], "labeled": [...]}.')
  parts: dict[str, list[str]] = {}
  for key, values in content.items():
    part = _PART_NAMES.get(str(key).lower())
    if part is None:
      continue
    if not isinstance(values, list):
      raise DataError(f'Split file {path}: "{key}" must be a list of ids.')
    parts.setdefault(part, []).extend(str(v) for v in values)
  if 'labeled' in parts or 'unlabeled' in parts:
    parts['train'] = parts.get('train', []) + parts.get('labeled', []) + parts.get(
        'unlabeled', [])
  return parts


def read_split_file(path: str) -> dict[str, list[str]]:
  """The parts a published split lists: 'train', 'val', 'test' and maybe 'labeled' and
  'unlabeled', each a list of ids or file names as written.

  Formats: a folder of plain lists (train.txt / train.list, val, test, labeled; one id or
  file name a line: BCP, UniMatch, LViT-style), a CSV of id,split rows, or a JSON object of
  lists (also this project's split.json and nnU-Net's splits_final.json, fold 0).
  """
  if not os.path.exists(path):
    raise DataError(f'data.split_file {path} does not exist; give a folder of train/val/test '
                    'lists, a CSV (id,split) or a JSON file.')
  try:
    if os.path.isdir(path):
      parts = _parts_from_folder(path)
    elif path.lower().endswith('.json'):
      parts = _parts_from_json(path)
    elif path.lower().endswith('.csv'):
      parts = _parts_from_csv(path)
    else:
      raise DataError(f'data.split_file {path}: name a folder of lists, a .csv or a .json.')
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f'Cannot read split file {path}: {e}.') from e
  for name in ('train', 'test'):
    if not parts.get(name):
      raise DataError(f'Split file {path} lists no {name!r} ids (found: '
                      f'{sorted(parts) or "nothing"}); it needs train and test (val '
                      'optional, then carved from train by data.val_fraction).')
  return parts


def _id_resolver(known: set[str]) -> Callable[[str], str | None]:
  """Maps a listed name to a dataset id: as written, else without folders and image
  extensions ('images/case_1.png' -> 'case_1'), case-sensitive."""
  def resolve(name: str) -> str | None:
    candidates = [name, name.replace('\\', '/').rsplit('/', 1)[-1]]
    stem = candidates[-1]
    while True:
      stem_next, ext = os.path.splitext(stem)
      if not ext or len(ext) > 8:
        break
      stem = stem_next
      candidates.append(stem)
    return next((c for c in candidates if c in known), None)
  return resolve


def split_from_file(path: str, samples: Sequence[Sample], *, seed: int,
                    labeled_fraction: float = 0.25, labeled_count: int = 0,
                    val_fraction: float = 0.1) -> dict[str, list[str]]:
  """The split a published file lists (`read_split_file`), resolved to dataset ids.

  Every listed name must be an image of the dataset, and val/test images need masks: a list
  naming others is refused, naming them. The labeled ids are the file's when it lists them
  (then labeled_fraction and labeled_count are ignored), else a seeded prefix of train as for
  a drawn split. A file without val gives val from train by `val_fraction`.
  """
  parts = read_split_file(path)
  by_id = {s.id: s for s in samples}
  resolve = _id_resolver(set(by_id))
  resolved: dict[str, list[str]] = {}
  unknown = []
  for part, names in parts.items():
    ids: dict[str, None] = {}  # ordered and without repeats
    for name in names:
      ident = resolve(name)
      if ident is None:
        unknown.append(name)
      else:
        ids[ident] = None
    resolved[part] = list(ids)
  if unknown:
    raise DataError(f'Split file {path} names {len(unknown)} images that are not in the '
                    f'dataset: {unknown[:10]}{" ..." if len(unknown) > 10 else ""}. Fix the '
                    'list or data.root (names match an id, or a file name without folders and '
                    'extension).')
  train, test = resolved['train'], resolved['test']
  val = resolved.get('val', [])
  if not val:
    order = [train[i] for i in _rng(seed, _SPLIT_STREAM).permutation(len(train))]
    n_val = max(1, int(round(val_fraction * len(train))))
    train, val = sorted(order[n_val:]), sorted(order[:n_val])
  overlap = sorted((set(train) & set(val)) | (set(train) & set(test)) | (set(val) & set(test)))
  if overlap:
    raise DataError(f'Split file {path} puts {len(overlap)} images in more than one of '
                    f'train/val/test: {overlap[:10]}. Each image belongs to one split.')
  unmasked = sorted(i for i in val + test if by_id[i].mask_path is None)
  if unmasked:
    raise DataError(f'Split file {path} puts {len(unmasked)} images without a mask in val/'
                    f'test: {unmasked[:10]}. Add their masks or move them to train.')
  with_mask = [i for i in train if by_id[i].mask_path is not None]
  without_mask = [i for i in train if by_id[i].mask_path is None]
  if resolved.get('labeled'):
    labeled = set(resolved['labeled'])
    strays = sorted(labeled - set(train))
    no_mask = sorted(i for i in labeled if by_id[i].mask_path is None)
    if strays or no_mask:
      raise DataError(f'Split file {path}: labeled ids must be masked training images; '
                      f'{strays[:10]} are not in train and {no_mask[:10]} have no mask.')
    labeled_ids = sorted(labeled)
    unlabeled_ids = sorted(i for i in with_mask if i not in labeled)
  else:
    labeled_ids, unlabeled_ids = _labeled_prefix(with_mask, seed=seed,
                                                 labeled_fraction=labeled_fraction,
                                                 labeled_count=labeled_count)
  return {'train_labeled': labeled_ids,
          'train_unlabeled': sorted(unlabeled_ids + without_mask),
          'val': sorted(val), 'test': sorted(test)}


def file_digest(path: str) -> str:
  """sha256 of a split file, or of a folder's list files (name and content), for the
  manifest: a changed published split is then noticed."""
  digest = hashlib.sha256()
  files = ([os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path)
           else [path])
  for name in files:
    if os.path.isfile(name):
      digest.update(os.path.basename(name).encode())
      with open(name, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def split_protocol(data_config: Any) -> str:
  """The protocol a split uses: the configured one, 'grouped' for 'paper' on slices."""
  protocol = data_config.split_protocol
  if protocol == 'paper' and data_config.get('layout') in GROUPED_LAYOUTS:
    logging.info('data.layout=%r: the split keeps every volume on one side '
                 "(split_protocol 'grouped', not 'paper').", data_config.layout)
    return 'grouped'
  return protocol


def split_settings(data_config: Any, seed: int) -> dict[str, Any]:
  """The config values a split depends on, as stored in and checked against split.json."""
  split_file = data_config.get('split_file', '')
  settings = {'protocol': 'file' if split_file else split_protocol(data_config),
              'seed': int(seed),
              'labeled_fraction': float(data_config.labeled_fraction),
              'labeled_count': int(data_config.get('labeled_count', 0)),
              'ratios': [float(r) for r in data_config.split_ratios],
              'val_fraction': float(data_config.val_fraction),
              'group_regex': data_config.group_regex}
  if split_file:
    settings['split_file'] = os.path.abspath(split_file)
    settings['split_file_sha256'] = (file_digest(split_file) if os.path.exists(split_file)
                                     else '')
  return settings


def split_source(settings: dict[str, Any]) -> str:
  """Where a split came from, in words, for the manifest."""
  if settings.get('split_file'):
    return f'file {settings["split_file"]} (sha256 {settings.get("split_file_sha256", "")})'
  how = (f'{settings["labeled_count"]} labeled images' if settings.get('labeled_count')
         else f'labeled_fraction {settings["labeled_fraction"]}')
  return f'drawn: protocol {settings["protocol"]!r}, seed {settings["seed"]}, {how}'


def _relevant(settings: dict[str, Any]) -> dict[str, Any]:
  """Settings that matter for the stored protocol (ratios do not matter for 'official')."""
  keys = ['protocol', 'seed', 'labeled_fraction', 'labeled_count']
  keys += {'paper': ['ratios'], 'official': ['val_fraction'],
           'grouped': ['ratios', 'group_regex'],
           'file': ['split_file_sha256', 'val_fraction']}.get(settings['protocol'], [])
  return {k: settings.get(k) for k in keys}


def check_manifest(manifest: dict[str, Any], settings: dict[str, Any], path: str,
                   known_ids: set[str]) -> None:
  """Checks a stored split against the config and the dataset (settings and ids)."""
  stored, wanted = _relevant(manifest), _relevant(settings)
  if stored['protocol'] == wanted['protocol']:
    differ = {k: (stored[k], wanted[k]) for k in wanted
              if k in stored and not _same(stored[k], wanted[k])}
  else:
    differ = {'protocol': (stored['protocol'], wanted['protocol'])}
  if differ:
    listing = ', '.join(f'{k}: split.json has {a!r}, config has {b!r}'
                        for k, (a, b) in differ.items())
    raise DataError(f'{path} was made with other settings ({listing}). Every run must use '
                    'one split: either delete that file to make a new split, or set the '
                    'config back to the stored values.')
  ids = manifest.get('ids', {})
  missing = sorted(i for name in SPLIT_NAMES for i in ids.get(name, [])
                   if i not in known_ids)
  if missing:
    raise DataError(f'{path} names {len(missing)} ids that are no longer in the dataset '
                    f'(e.g. {missing[:5]}). Restore those images, or delete {path} to make a '
                    'new split (results are then not comparable with earlier runs).')


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
  return a == b


def build_manifest(ids: dict[str, list[str]], settings: dict[str, Any], *,
                   dataset_root: str, layout: str, image_size: int) -> dict[str, Any]:
  """The split.json content (see the data contract)."""
  return {**settings, 'source': split_source(settings), 'dataset_root': dataset_root,
          'layout': layout,
          'image_size': int(image_size),
          'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec='seconds'),
          'ids': {name: list(ids[name]) for name in SPLIT_NAMES}}


def read_manifest(path: str) -> dict[str, Any]:
  """Loads split.json, checking its keys."""
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f'Cannot read split manifest {path}: {e}. Delete it to make a new one.'
                    ) from e
  if not isinstance(manifest, dict) or 'ids' not in manifest or 'protocol' not in manifest:
    raise DataError(f'{path} is not a split manifest (no "protocol"/"ids"). Delete it.')
  return manifest


def write_json(path: str, content: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file); the temporary name is this
  process's, so an eval beside a training run never writes into the other's."""
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(content, f, indent=1, ensure_ascii=False)
    f.write('\n')
  os.replace(tmp, path)
