"""Dataset layouts a user has on disk, read into `Sample` records (docs/design.md section 10).

- 'cers': the CERS flat layout: `frames/`, `masks/`, `text.csv` (image,text with the file
  name incl. extension), CoT CSVs (image,cot keyed by stem).
- 'lvit': LViT's QaTa-COV19 / MosMedData+ layout: `{Train,Val,Test}_Folder/{img,labelcol}`
  with text workbooks (Image, Description) keyed by the MASK file name; QaTa masks are
  `mask_<image>`. Workbooks are found by their columns, not their names, since LViT publishes
  them as e.g. `Train_text_for_Covid19.xlsx` or `Val_text_MosMedData+ 1.xlsx`.
- 'brisc': BRISC 2025's Kaggle layout: `segmentation_task/{train,test}/{images,masks}`;
  report texts and CoTs come from the authors' CSVs, given by path.
- 'nifti': `images/<case>.nii[.gz]` and `labels/<case>.nii[.gz]`, one sample per slice
  (`cers_jax.data.nifti`); annotations are keyed by case (one value for all its slices) or
  by slice id (`<case>_s<index:03d>`), a slice's own entry winning over its case's.

Every reader takes the dataset root and optional annotation paths and returns a
`DatasetScan`: the samples sorted by id plus every problem found (missing masks, masks
without images, unknown or missing annotations, duplicates). Pixels are not decoded here.
Annotation paths (`data.text_csv` and the CoT fields): '' = the layout's default file in the
root if present; else one path, or a comma-separated list of paths and glob patterns, each
tried from the working directory, then from the root. Several files of one kind are merged;
an id given twice keeps the first file's value and is reported.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Callable, Iterable, Protocol

from cers_jax.data import annotations
from cers_jax.data import nifti
from cers_jax.data.annotations import AnnotationFile, Entry, read_annotations
from cers_jax.data.images import id_from_name, is_image_file, list_files
from cers_jax.data.records import DataError, Problem, Sample

# Default annotation files looked up in the dataset root, in order (H6's synthetic dataset
# writes cot_output_mask.csv; the authors publish cot_output_gpt5_mask.csv).
DEFAULT_FILES = {
    'text': ('text.csv',),
    'cot_mask': ('cot_output_mask.csv', 'cot_output_gpt5_mask.csv', 'cot_mask.csv'),
    'cot_no_mask': ('cot_output_no_mask.csv', 'cot_output_gpt5_no_mask.csv',
                    'cot_no_mask.csv'),
}
_CONFIG_FIELD = {'text': 'text_csv', 'cot_mask': 'cot_mask_csv',
                 'cot_no_mask': 'cot_no_mask_csv'}
_GLOB_CHARS = '*?['
# Workbooks the 'lvit' layout inspects for report texts ('.xls' would need xlrd).
_WORKBOOK_EXTENSIONS = ('.xlsx', '.xlsm')


@dataclasses.dataclass
class DatasetScan:
  """What a layout reader found: samples sorted by id and every problem.

  `annotation_files` summarises each file read: path, kind, rows, how it was found ('config'
  | 'default' | 'content') and what its rows became (matched, duplicates, unknown);
  `annotation_search` says per kind what was looked for.
  """

  layout: str
  root: str
  samples: list[Sample]
  problems: list[Problem]
  annotation_files: list[dict[str, Any]]
  annotation_search: dict[str, str] = dataclasses.field(default_factory=dict)


class LayoutReader(Protocol):

  def __call__(self, root: str, *, text_csv: str = '', cot_mask_csv: str = '',
               cot_no_mask_csv: str = '') -> DatasetScan:
    ...


@dataclasses.dataclass(frozen=True)
class _Sources:
  """The annotation files of one kind, how they were chosen and what was looked for."""

  paths: list[str]
  found_by: str  # 'config' | 'default' | 'content'
  searched: str


@dataclasses.dataclass(frozen=True)
class _Pair:
  id: str
  image_path: str
  mask_path: str | None
  official_split: str
  # Further Sample fields (group, and a slice's volume, slice_index, spacing, ...).
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def list_images(folder: str, problems: list[Problem]) -> dict[str, str]:
  """{id: path} of the image files in `folder` (sorted; a repeated stem keeps the first)."""
  return list_files(folder, problems, accept=is_image_file, key=id_from_name, noun='id')


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


def _matches(item: str, root: str) -> tuple[list[str], list[str]]:
  """Files one path or glob pattern names (from the working directory, else from root)."""
  item = os.path.expanduser(item)
  tried = [item] if os.path.isabs(item) else [item, os.path.join(root, item)]
  for candidate in tried:
    if os.path.isfile(candidate):
      return [candidate], tried
    if any(c in item for c in _GLOB_CHARS):
      found = sorted(p for p in glob.glob(candidate) if os.path.isfile(p))
      if found:
        return found, tried
  return [], tried


def _configured(configured: str, root: str, kind: str) -> list[str]:
  """The files a config value names: one path, or a comma-separated list of paths and globs."""
  whole, _ = _matches(configured.strip(), root)
  # A single existing path wins, so a file name holding a comma still works.
  items = [configured.strip()] if whole else [i.strip() for i in configured.split(',')]
  paths: list[str] = []
  for item in filter(None, items):
    found, tried = _matches(item, root)
    if not found:
      folder = next((t for t in tried if os.path.isdir(t)), None)
      hint = (f' {folder} is a folder: name files in it, e.g. '
              f'{os.path.join(item, "*.xlsx")!r}.' if folder else '')
      raise DataError(
          f'{kind} annotation file {item!r} not found (tried {tried}).{hint} Fix '
          f'config.data.{_CONFIG_FIELD[kind]} (now {configured!r}): one path, or a '
          'comma-separated list of paths and glob patterns, relative to the working '
          'directory or data.root.')
    known = {os.path.realpath(p) for p in paths}
    paths.extend(p for p in found if os.path.realpath(p) not in known)
  return paths


def _sources(root: str, kind: str, configured: str) -> _Sources:
  """The configured files of `kind`, else the layout's default file in root (if any)."""
  field = f'config.data.{_CONFIG_FIELD[kind]}'
  if configured.strip():
    return _Sources(_configured(configured, root, kind), 'config', f'{field}={configured!r}')
  default = [os.path.join(root, n) for n in DEFAULT_FILES[kind]]
  return _Sources([p for p in default if os.path.isfile(p)][:1], 'default',
                  f'{" or ".join(default)} ({field} is empty)')


def _merge(files: Iterable[AnnotationFile], key_map: Callable[[str], str], known: set[str],
           problems: list[Problem]) -> tuple[dict[str, Entry], list[dict[str, int]]]:
  """Entries of several files of one kind by sample id (the first file wins).

  Also returns per file how many entries gave an image its value ('matched'), repeated an id
  given before ('duplicates'), or named no image ('unknown').
  """
  merged: dict[str, Entry] = {}
  counts = []
  for annotation_file in files:
    count = {'matched': 0, 'duplicates': 0, 'unknown': 0}
    for entry in annotation_file.entries.values():
      sample_id = key_map(entry.id)
      first = merged.get(sample_id)
      if first is not None:
        count['duplicates'] += 1
        if sample_id in known:  # Rows of other images are counted in the summary only.
          same = 'same' if first.value == entry.value else 'different'
          problems.append(Problem('duplicate_id', entry.file, entry.line, sample_id,
                                  f'already given by {first.file} line {first.line} '
                                  f'({same} value); kept the first'))
        continue
      merged[sample_id] = dataclasses.replace(entry, id=sample_id)
      count['matched' if sample_id in known else 'unknown'] += 1
    counts.append(count)
  return merged, counts


def _fan_out(values: dict[str, Entry], members: dict[str, list[str]]) -> dict[str, Entry]:
  """Gives a group's entry (a volume's) to each member without an entry of its own."""
  out = {k: v for k, v in values.items() if k not in members}
  for group, entry in values.items():
    for member in members.get(group, ()):
      out.setdefault(member, dataclasses.replace(entry, id=member))
  return out


def _assemble(layout: str, root: str, pairs: list[_Pair], sources: dict[str, _Sources],
              problems: list[Problem], key_map: Callable[[str], str] = lambda k: k,
              members: dict[str, list[str]] | None = None) -> DatasetScan:
  """Joins pairs with annotations by id into samples; reports every mismatch.

  `members` maps a key that annotations may use for several samples (a volume) to their ids.
  """
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
  members = members or {}
  known = set(unique) | set(members)
  values: dict[str, dict[str, Entry]] = {}
  summaries = []
  for kind in ('text', 'cot_mask', 'cot_no_mask'):
    files = [read_annotations(path, kind) for path in sources[kind].paths]
    values[kind], counts = _merge(files, key_map, known, problems)
    values[kind] = _fan_out(values[kind], members)
    summaries.extend({**f.summary(), 'found_by': sources[kind].found_by, **count}
                     for f, count in zip(files, counts))
    # Findings about rows of images outside the dataset stay in the file summaries only
    # (each such row is reported once, as unknown_image).
    problems.extend(p for f in files for p in f.problems
                    if not p.id or key_map(p.id) in known)
    if not files:
      problems.append(Problem('no_annotation_file', root, 0, '',
                              f'no {kind} file: looked for {sources[kind].searched}; every '
                              f'{kind} is None'))
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
                    cot_no_mask=value('cot_no_mask', i),
                    official_split=p.official_split, **{'group': '', **p.extra})
             for i, p in sorted(unique.items())]
  return DatasetScan(layout, os.path.abspath(root), samples, problems, summaries,
                     {kind: source.searched for kind, source in sources.items()})


def _require_dir(path: str, what: str, layout: str) -> None:
  if not os.path.isdir(path):
    parent = os.path.dirname(path.rstrip(os.sep)) or '.'
    found = sorted(os.listdir(parent)) if os.path.isdir(parent) else 'nothing: no such folder'
    raise DataError(f'{path} is not a folder, but layout {layout!r} expects {what} there '
                    f'(found in {parent}: {found}). Check data.root and data.layout.')


def _configured_files(root: str, text_csv: str, cot_mask_csv: str,
                      cot_no_mask_csv: str) -> dict[str, _Sources]:
  configured = {'text': text_csv, 'cot_mask': cot_mask_csv, 'cot_no_mask': cot_no_mask_csv}
  return {kind: _sources(root, kind, value) for kind, value in configured.items()}


def read_cers(root: str, *, text_csv: str = '', cot_mask_csv: str = '',
              cot_no_mask_csv: str = '') -> DatasetScan:
  """Reads the CERS flat layout: `frames/`, `masks/`, `text.csv` and CoT CSVs in root."""
  problems: list[Problem] = []
  frames, masks_dir = os.path.join(root, 'frames'), os.path.join(root, 'masks')
  _require_dir(frames, 'frames/ (images), masks/ and text.csv', 'cers')
  images = list_images(frames, problems)
  masks = list_images(masks_dir, problems) if os.path.isdir(masks_dir) else None
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


def _text_workbooks(folders: list[str], problems: list[Problem]) -> list[str]:
  """Workbooks directly in `folders` that have a sheet of image names and report texts."""
  found = []
  for folder in folders:
    for name in sorted(os.listdir(folder)):
      path = os.path.join(folder, name)
      # '~$x.xlsx' is the lock file Excel keeps next to an open workbook, not data.
      if (name.startswith(('~$', '.')) or not os.path.isfile(path)
          or os.path.splitext(name)[1].lower() not in _WORKBOOK_EXTENSIONS):
        continue
      try:
        headers = annotations.sheet_headers(path)
      except DataError as e:
        problems.append(Problem('unreadable_workbook', path, 0, '', f'{e} Not used for text.'))
        continue
      if any(annotations.has_columns(header, 'text') for header in headers.values()):
        found.append(path)
      else:
        problems.append(Problem('ignored_workbook', path, 0, '',
                                f'no sheet with an image-name and a text column (sheets and '
                                f'columns: {headers}); not used for text'))
  return found


def _lvit_text_sources(root: str, split_dirs: list[str], default: _Sources,
                       problems: list[Problem]) -> _Sources:
  """The text workbooks found by content in root and the split folders, else `default`."""
  keys, values = annotations.KIND_COLUMNS['text']
  searched = (f'workbooks ({", ".join(_WORKBOOK_EXTENSIONS)}, any name) with a sheet holding '
              f'an image-name column (one of {list(keys)}) and a text column (one of '
              f'{list(values)}) in {[root, *split_dirs]}; else {default.searched}')
  workbooks = _text_workbooks([root, *split_dirs], problems)
  if workbooks:
    return _Sources(workbooks, 'content', searched)
  return dataclasses.replace(default, searched=searched)


def read_lvit(root: str, *, text_csv: str = '', cot_mask_csv: str = '',
              cot_no_mask_csv: str = '') -> DatasetScan:
  """Reads LViT's layout (QaTa-COV19, MosMedData+).

  Texts come from `text_csv` when given (e.g. the CERS authors' text.csv, or LViT's workbooks
  as a list or glob), else from every workbook in the root and the split folders with an
  image-name and a text column, else from text.csv in the root. Workbook rows are keyed by
  the mask file name ('mask_covid_1.png' for image 'covid_1.png') or the image name.
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
    masks = list_images(mask_dir, problems) if os.path.isdir(mask_dir) else None
    folder_pairs = _pair_folder(list_images(img_dir, problems), masks, split, problems,
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
  if not text_csv.strip():
    files['text'] = _lvit_text_sources(root, split_dirs, files['text'], problems)
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
  """Reads BRISC 2025's Kaggle layout (`root` may be the dataset or segmentation_task)."""
  problems: list[Problem] = []
  task = _brisc_task_dir(root)
  pairs: list[_Pair] = []
  for split in ('train', 'val', 'test'):
    img_dir = os.path.join(task, split, 'images')
    if not os.path.isdir(img_dir):
      continue
    mask_dir = os.path.join(task, split, 'masks')
    masks = list_images(mask_dir, problems) if os.path.isdir(mask_dir) else None
    pairs.extend(_pair_folder(list_images(img_dir, problems), masks, split, problems,
                              mask_dir))
  files = _configured_files(root, text_csv, cot_mask_csv, cot_no_mask_csv)
  return _assemble('brisc', root, pairs, files, problems)


def _volume_pairs(case: str, image_path: str, label_path: str | None,
                  settings: nifti.NiftiSettings, size: int, problems: list[Problem]
                  ) -> list[_Pair]:
  slices = nifti.scan_volume(case, image_path, label_path, settings, size, problems)
  return [_Pair(s.pop('id'), image_path, label_path, '', {'group': case, **s})
          for s in slices]


def read_nifti(root: str, *, text_csv: str = '', cot_mask_csv: str = '',
               cot_no_mask_csv: str = '', settings: nifti.NiftiSettings | None = None,
               image_size: int = 224) -> DatasetScan:
  """Reads `images/<case>.nii[.gz]` and `labels/<case>.nii[.gz]` as one sample per slice.

  Volumes are joined by case name; headers are read here, voxels only when `settings`
  drops empty slices (the labels) and when prepare decodes. Each slice's group is its case,
  so the 'grouped' split keeps a volume on one side. `image_size` (data.image_size) scales
  the header's spacing to the cached resolution.
  """
  settings = settings or nifti.NiftiSettings()
  problems: list[Problem] = []
  images_dir, labels_dir = os.path.join(root, 'images'), os.path.join(root, 'labels')
  _require_dir(images_dir, 'images/<case>.nii[.gz] and labels/<case>.nii[.gz]', 'nifti')
  images = nifti.list_volumes(images_dir, problems)
  labels = nifti.list_volumes(labels_dir, problems) if os.path.isdir(labels_dir) else {}
  pairs: list[_Pair] = []
  members: dict[str, list[str]] = {}
  for case, image_path in images.items():
    label_path = labels.get(case)
    if label_path is None:
      problems.append(Problem('missing_mask', image_path, 0, case,
                              f'no label volume {case}.nii[.gz] in {labels_dir}; its slices '
                              'are used as unlabeled only'))
    volume_pairs = _volume_pairs(case, image_path, label_path, settings, image_size,
                                 problems)
    members[case] = [p.id for p in volume_pairs]
    pairs.extend(volume_pairs)
  for case, label_path in labels.items():
    if case not in images:
      problems.append(Problem('orphan_mask', label_path, 0, case,
                              f'no image volume {case}.nii[.gz] in {images_dir}'))
  files = _configured_files(root, text_csv, cot_mask_csv, cot_no_mask_csv)
  return _assemble('nifti', root, pairs, files, problems, key_map=nifti.case_of,
                   members=members)


LAYOUTS: dict[str, LayoutReader] = {'cers': read_cers, 'lvit': read_lvit,
                                    'brisc': read_brisc, 'nifti': read_nifti}
# Readers that take more of config.data than the annotation paths: {layout: kwargs of it}.
_LAYOUT_OPTIONS: dict[str, Callable[[Any], dict[str, Any]]] = {
    'nifti': lambda data: {'settings': nifti.NiftiSettings.from_config(data),
                           'image_size': int(data.image_size)},
}


def read_dataset(data_config: Any) -> DatasetScan:
  """Reads the dataset that `config.data` describes with its registered layout reader."""
  reader = LAYOUTS.get(data_config.layout)
  if reader is None:
    raise DataError(f'Unknown data.layout {data_config.layout!r}; choices: {sorted(LAYOUTS)}.')
  if not data_config.root or not os.path.isdir(data_config.root):
    raise DataError(f'data.root {data_config.root!r} is not a folder. Set '
                    '--config.data.root=/path/to/dataset.')
  options = _LAYOUT_OPTIONS.get(data_config.layout, lambda _: {})(data_config)
  return reader(data_config.root, text_csv=data_config.text_csv,
                cot_mask_csv=data_config.cot_mask_csv,
                cot_no_mask_csv=data_config.cot_no_mask_csv, **options)
