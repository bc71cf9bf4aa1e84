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
"""

from __future__ import annotations

import datetime
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
               labeled_fraction: float = 0.25, group_regex: str = '', layout: str = ''
               ) -> dict[str, list[str]]:
  """Splits samples into train_labeled, train_unlabeled, val and test ids (each sorted).

  `ratios` serve 'paper' and 'grouped', `val_fraction` 'official'. `labeled_fraction` of
  train (images with masks) stays labeled, at least one image when > 0. `layout` is only
  named in error messages.
  """
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
  train = sorted(train)
  order = [train[i] for i in _rng(seed, _LABELED_STREAM).permutation(len(train))]
  n_labeled = int(round(labeled_fraction * len(train)))
  if labeled_fraction > 0 and train:
    n_labeled = max(n_labeled, 1)
  return {
      'train_labeled': sorted(order[:n_labeled]),
      'train_unlabeled': sorted(order[n_labeled:] + without_mask),
      'val': sorted(val),
      'test': sorted(test),
  }


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
  return {'protocol': split_protocol(data_config), 'seed': int(seed),
          'labeled_fraction': float(data_config.labeled_fraction),
          'ratios': [float(r) for r in data_config.split_ratios],
          'val_fraction': float(data_config.val_fraction),
          'group_regex': data_config.group_regex}


def _relevant(settings: dict[str, Any]) -> dict[str, Any]:
  """Settings that matter for the stored protocol (ratios do not matter for 'official')."""
  keys = ['protocol', 'seed', 'labeled_fraction']
  keys += {'paper': ['ratios'], 'official': ['val_fraction'],
           'grouped': ['ratios', 'group_regex']}.get(settings['protocol'], [])
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
  return {**settings, 'dataset_root': dataset_root, 'layout': layout,
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
