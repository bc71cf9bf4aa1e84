"""Dataset layouts a user has on disk, read into `Sample` records (DESIGN.md section 4).

- 'cers': the CERS flat layout: `frames/`, `masks/`, `text.csv` (image,text with the file
  name incl. extension), CoT CSVs (image,cot keyed by stem).
- 'lvit': LViT's QaTa-COV19 / MosMedData+ layout: `{Train,Val,Test}_Folder/{img,labelcol}`
  with `*_text.xlsx` (Image, Description) keyed by the MASK file name; QaTa masks are
  `mask_<image>`.
- 'brisc': BRISC 2025's Kaggle layout: `segmentation_task/{train,test}/{images,masks}`;
  report texts and CoTs come from the authors' CSVs, given by path.

Every reader takes the dataset root and optional annotation paths and returns a
`DatasetScan`: the samples sorted by id plus every problem found (missing masks, masks
without images, unknown or missing annotations, duplicates). Pixels are not decoded here.
Annotation paths: '' = the layout's default file in the root if present; a relative path
is tried from the working directory, then from the root.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Protocol

from cers_jax.data.annotations import AnnotationFile, Entry, read_annotations
from cers_jax.data.images import id_from_name, is_image_file
from cers_jax.data.records import DataError, Problem, Sample

# Default annotation files looked up in the dataset root, in order (H6's synthetic dataset
# writes cot_output_mask.csv; the authors publish cot_output_gpt5_mask.csv).
DEFAULT_FILES = {
    'text': ('text.csv',),
    'cot_mask': ('cot_output_mask.csv', 'cot_output_gpt5_mask.csv', 'cot_mask.csv'),
    'cot_no_mask': ('cot_output_no_mask.csv', 'cot_output_gpt5_no_mask.csv',
                    'cot_no_mask.csv'),
}


@dataclasses.dataclass
class DatasetScan:
  """What a layout reader found: samples sorted by id, problems, annotation file summaries."""

  layout: str
  root: str
  samples: list[Sample]
  problems: list[Problem]
  annotation_files: list[dict[str, Any]]


class LayoutReader(Protocol):

  def __call__(self, root: str, *, text_csv: str = '', cot_mask_csv: str = '',
               cot_no_mask_csv: str = '') -> DatasetScan:
    ...


@dataclasses.dataclass(frozen=True)
class _Pair:
  id: str
  image_path: str
  mask_path: str | None
  official_split: str


def _list_images(folder: str, problems: list[Problem]) -> dict[str, str]:
  """{id: path} of the image files in `folder` (sorted; a repeated stem keeps the first)."""
  found: dict[str, str] = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if not (is_image_file(name) and os.path.isfile(path)):
      continue
    sample_id = id_from_name(name)
    if sample_id in found:
      problems.append(Problem('duplicate_image', path, 0, sample_id,
                              f'same id as {found[sample_id]}; kept that one'))
      continue
    found[sample_id] = path
  return found


def _mask_candidates(image_id: str) -> tuple[str, ...]:
  return (image_id, f'mask_{image_id}', f'{image_id}_mask')


def _pair_folder(images: dict[str, str], masks: dict[str, str] | None, split: str,
                 problems: list[Problem], mask_folder: str) -> list[_Pair]:
  """Pairs images with masks by id (or 'mask_<id>', '<id>_mask'); reports leftovers."""
  pairs, used = [], set()
  for image_id, image_path in images.items():
    mask_id = None
    if masks is not None:
      mask_id = next((m for m in _mask_candidates(image_id) if m in masks), None)
    if mask_id is None:
      problems.append(Problem('missing_mask', image_path, 0, image_id,
                              f'no mask in {mask_folder}; used as unlabeled only'))
    else:
      used.add(mask_id)
    pairs.append(_Pair(image_id, image_path, masks[mask_id] if mask_id else None, split))
  for mask_id, mask_path in (masks or {}).items():
    if mask_id not in used:
      problems.append(Problem('orphan_mask', mask_path, 0, mask_id, 'no image with this id'))
  return pairs


def _resolve(configured: str, root: str, kind: str) -> str | None:
  """The annotation file to read for `kind`, or None when none is configured or found."""
  if not configured:
    return next((os.path.join(root, name) for name in DEFAULT_FILES[kind]
                 if os.path.isfile(os.path.join(root, name))), None)
  tried = [configured] if os.path.isabs(configured) else [configured,
                                                          os.path.join(root, configured)]
  for path in tried:
    if os.path.isfile(path):
      return path
  raise DataError(f'{kind} annotation file {configured!r} not found (tried {tried}). Fix '
                  f'config.data.{_CONFIG_FIELD[kind]}.')


_CONFIG_FIELD = {'text': 'text_csv', 'cot_mask': 'cot_mask_csv',
                 'cot_no_mask': 'cot_no_mask_csv'}


def _merge(files: Iterable[AnnotationFile], key_map: Callable[[str], str],
           problems: list[Problem]) -> dict[str, Entry]:
  """Entries of several files of one kind by sample id (the first file wins)."""
  merged: dict[str, Entry] = {}
  for annotation_file in files:
    for entry in annotation_file.entries.values():
      sample_id = key_map(entry.id)
      if sample_id in merged:
        first = merged[sample_id]
        problems.append(Problem('duplicate_id', entry.file, entry.line, sample_id,
                                f'first seen in {first.file} line {first.line}; kept the first'))
        continue
      merged[sample_id] = dataclasses.replace(entry, id=sample_id)
  return merged


def _assemble(layout: str, root: str, pairs: list[_Pair],
              annotation_paths: dict[str, list[str]], problems: list[Problem],
              key_map: Callable[[str], str] = lambda k: k) -> DatasetScan:
  """Joins pairs with annotations by id into samples; reports every mismatch."""
  unique: dict[str, _Pair] = {}
  for pair in pairs:
    if pair.id in unique:
      problems.append(Problem('duplicate_image', pair.image_path, 0, pair.id,
                              f'same id as {unique[pair.id].image_path}; kept that one'))
    else:
      unique[pair.id] = pair
  if not unique:
    raise DataError(f'No images found for layout {layout!r} under {root}. Check data.root '
                    f'and data.layout (choices: {sorted(LAYOUTS)}).')
  values: dict[str, dict[str, Entry]] = {}
  summaries = []
  for kind in ('text', 'cot_mask', 'cot_no_mask'):
    files = [read_annotations(path, kind) for path in annotation_paths[kind]]
    summaries.extend(f.summary() for f in files)
    values[kind] = _merge(files, key_map, problems)
    # Findings about rows of images outside the dataset stay in the file summaries only
    # (each such row is reported once, as unknown_image).
    problems.extend(p for f in files for p in f.problems
                    if not p.id or key_map(p.id) in unique)
    if not files:
      problems.append(Problem('no_annotation_file', root, 0, '',
                              f'no {kind} file configured or found; every {kind} is None'))
      continue
    for sample_id, entry in values[kind].items():
      if sample_id not in unique:
        problems.append(Problem('unknown_image', entry.file, entry.line, sample_id,
                                f'{kind} for an image that is not in the dataset'))
    for sample_id, pair in sorted(unique.items()):
      if sample_id not in values[kind]:
        problems.append(Problem(f'missing_{kind}', pair.image_path, 0, sample_id,
                                f'no {kind} in {[f.path for f in files]}'))

  def value(kind: str, sample_id: str) -> str | None:
    entry = values[kind].get(sample_id)
    return entry.value if entry else None

  samples = [Sample(id=i, image_path=p.image_path, mask_path=p.mask_path,
                    text=value('text', i), cot_mask=value('cot_mask', i),
                    cot_no_mask=value('cot_no_mask', i), group='',
                    official_split=p.official_split)
             for i, p in sorted(unique.items())]
  return DatasetScan(layout, os.path.abspath(root), samples, problems, summaries)


def _require_dir(path: str, what: str, layout: str) -> None:
  if not os.path.isdir(path):
    parent = os.path.dirname(path.rstrip(os.sep)) or '.'
    found = sorted(os.listdir(parent)) if os.path.isdir(parent) else 'nothing: no such folder'
    raise DataError(f'{path} is not a folder, but layout {layout!r} expects {what} there '
                    f'(found in {parent}: {found}). Check data.root and data.layout.')


def _configured_files(root: str, text_csv: str, cot_mask_csv: str,
                      cot_no_mask_csv: str) -> dict[str, list[str]]:
  configured = {'text': text_csv, 'cot_mask': cot_mask_csv, 'cot_no_mask': cot_no_mask_csv}
  resolved = {kind: _resolve(path, root, kind) for kind, path in configured.items()}
  return {kind: [path] if path else [] for kind, path in resolved.items()}


def read_cers(root: str, *, text_csv: str = '', cot_mask_csv: str = '',
              cot_no_mask_csv: str = '') -> DatasetScan:
  """Reads the CERS flat layout: `frames/`, `masks/`, `text.csv` and CoT CSVs in root.

  Raises:
    DataError: no frames/ folder, no images, unreadable annotation files or columns.
  """
  problems: list[Problem] = []
  frames, masks_dir = os.path.join(root, 'frames'), os.path.join(root, 'masks')
  _require_dir(frames, 'frames/ (images), masks/ and text.csv', 'cers')
  images = _list_images(frames, problems)
  masks = _list_images(masks_dir, problems) if os.path.isdir(masks_dir) else None
  pairs = _pair_folder(images, masks, '', problems, masks_dir)
  files = _configured_files(root, text_csv, cot_mask_csv, cot_no_mask_csv)
  return _assemble('cers', root, pairs, files, problems)


def _child_dir(parent: str, name: str) -> str | None:
  """`parent/name` matched case-insensitively (Train_Folder vs train_folder)."""
  if not os.path.isdir(parent):
    return None
  for entry in sorted(os.listdir(parent)):
    if entry.lower() == name.lower() and os.path.isdir(os.path.join(parent, entry)):
      return os.path.join(parent, entry)
  return None


_LVIT_SPLITS = (('Train_Folder', 'train'), ('Val_Folder', 'val'), ('Test_Folder', 'test'))


def read_lvit(root: str, *, text_csv: str = '', cot_mask_csv: str = '',
              cot_no_mask_csv: str = '') -> DatasetScan:
  """Reads LViT's layout (QaTa-COV19, MosMedData+).

  Texts come from `text_csv` when given (e.g. the CERS authors' text.csv, keyed by image
  name), else from every `*_text.xlsx` in the root and the split folders, keyed by the mask
  file name ('mask_covid_1.png' for image 'covid_1.png').

  Raises:
    DataError: none of Train/Val/Test_Folder exists, no images, bad annotation files.
  """
  problems: list[Problem] = []
  pairs: list[_Pair] = []
  mask_to_image: dict[str, str] = {}
  split_dirs = []
  for folder_name, split in _LVIT_SPLITS:
    folder = _child_dir(root, folder_name)
    if folder is None:
      continue
    split_dirs.append(folder)
    img_dir = os.path.join(folder, 'img')
    _require_dir(img_dir, 'img/ and labelcol/', 'lvit')
    mask_dir = os.path.join(folder, 'labelcol')
    masks = _list_images(mask_dir, problems) if os.path.isdir(mask_dir) else None
    folder_pairs = _pair_folder(_list_images(img_dir, problems), masks, split, problems,
                                mask_dir)
    for pair in folder_pairs:
      if pair.mask_path:
        mask_to_image[id_from_name(pair.mask_path)] = pair.id
    pairs.extend(folder_pairs)
  if not split_dirs:
    _require_dir(os.path.join(root, 'Train_Folder'),
                 'Train_Folder/, Val_Folder/, Test_Folder/ each with img/ and labelcol/',
                 'lvit')
  files = _configured_files(root, text_csv, cot_mask_csv, cot_no_mask_csv)
  if not text_csv:
    files['text'] = sorted(
        os.path.join(d, name) for d in [root, *split_dirs] for name in os.listdir(d)
        if name.lower().endswith('_text.xlsx') and not name.startswith('~$'))
  return _assemble('lvit', root, pairs, files, problems,
                   key_map=lambda key: mask_to_image.get(key, key))


def _brisc_task_dir(root: str) -> str:
  for candidate in (os.path.join(root, 'segmentation_task'), root):
    if any(os.path.isdir(os.path.join(candidate, s, 'images')) for s in ('train', 'test')):
      return candidate
  _require_dir(os.path.join(root, 'segmentation_task', 'train', 'images'),
               'segmentation_task/{train,test}/{images,masks}', 'brisc')
  raise AssertionError('unreachable: _require_dir raised')


def read_brisc(root: str, *, text_csv: str = '', cot_mask_csv: str = '',
               cot_no_mask_csv: str = '') -> DatasetScan:
  """Reads BRISC 2025's Kaggle layout (`root` may be the dataset or segmentation_task).

  Raises:
    DataError: no segmentation_task/{train,test}/images, no images, bad annotation files.
  """
  problems: list[Problem] = []
  task = _brisc_task_dir(root)
  pairs: list[_Pair] = []
  for split in ('train', 'val', 'test'):
    img_dir = os.path.join(task, split, 'images')
    if not os.path.isdir(img_dir):
      continue
    mask_dir = os.path.join(task, split, 'masks')
    masks = _list_images(mask_dir, problems) if os.path.isdir(mask_dir) else None
    pairs.extend(_pair_folder(_list_images(img_dir, problems), masks, split, problems,
                              mask_dir))
  files = _configured_files(root, text_csv, cot_mask_csv, cot_no_mask_csv)
  return _assemble('brisc', root, pairs, files, problems)


LAYOUTS: dict[str, LayoutReader] = {'cers': read_cers, 'lvit': read_lvit,
                                    'brisc': read_brisc}


def read_dataset(data_config: Any) -> DatasetScan:
  """Reads the dataset that `config.data` describes with the registered layout reader.

  Raises:
    DataError: unknown layout, missing root, or whatever the reader raises.
  """
  reader = LAYOUTS.get(data_config.layout)
  if reader is None:
    raise DataError(f'Unknown data.layout {data_config.layout!r}; choices: {sorted(LAYOUTS)}.')
  if not data_config.root or not os.path.isdir(data_config.root):
    raise DataError(f'data.root {data_config.root!r} is not a folder. Set '
                    '--config.data.root=/path/to/dataset.')
  return reader(data_config.root, text_csv=data_config.text_csv,
                cot_mask_csv=data_config.cot_mask_csv,
                cot_no_mask_csv=data_config.cot_no_mask_csv)
