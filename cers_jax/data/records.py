"""Plain records shared by the readers, `prepare` and the pipeline (docs/design.md section 10).

A `Sample` is one image with whatever annotations the layout found; a `Problem` is one
thing wrong with the data, kept for report.json rather than silently dropped. `DataError`
is the single exception type of `cers_jax.data`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SPLIT_NAMES = ('train_labeled', 'train_unlabeled', 'val', 'test')


class DataError(ValueError):
  """A dataset, annotation file, split manifest or cache that cannot be used as is.

  The message names the file (or folder) at fault and what to do about it.
  """


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of a dataset and its annotations (docs/design.md section 10)."""

  id: str  # Stem of the image file name, the join key everywhere.
  image_path: str
  mask_path: str | None  # None when the layout has no mask for it.
  text: str | None  # Report text.
  cot_mask: str | None  # CoT written with the mask shown (used for labeled images).
  cot_no_mask: str | None  # CoT written without the mask (all other images).
  group: str = ''  # Patient/volume/case id for the 'grouped' protocol ('' = id).
  official_split: str = ''  # 'train' | 'val' | 'test' | '' from the layout's own folders.
  # Slices of a volume (layout 'nifti'); the defaults mean a plain 2-D image.
  volume: str = ''  # Case the slice belongs to ('' = not a slice).
  slice_index: int = -1  # Position along the slicing axis of that volume.
  spacing: tuple[float, float] | None = None  # (row, col) mm per pixel at data.image_size.
  slice_thickness: float = 0.0  # mm between slices (the pixdim along the slicing axis).


SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Sample))


def sample_to_dict(sample: Sample, row: int) -> dict[str, Any]:
  """The samples.json entry of `sample`, stored at cache row `row`."""
  return {**dataclasses.asdict(sample), 'row': row}


def sample_from_dict(entry: dict[str, Any]) -> Sample:
  """Inverse of `sample_to_dict` (the 'row' key and unknown keys are ignored; missing
  optional keys, as in a samples.json written before they existed, take their defaults)."""
  values = {name: entry[name] for name in SAMPLE_FIELDS if name in entry}
  if isinstance(values.get('spacing'), list):  # JSON has no tuples.
    values['spacing'] = tuple(values['spacing'])
  return Sample(**values)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One finding about the data, reported in report.json.

  `kind` is e.g. 'missing_mask', 'truncated_cot', 'duplicate_id'; `line` is the 1-based line
  of a CSV record (its first physical line) or spreadsheet row, 0 when not about a line; `id`
  is '' when unknown.
  """

  kind: str
  file: str = ''
  line: int = 0
  id: str = ''
  detail: str = ''

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

