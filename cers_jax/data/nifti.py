"""NIfTI volumes read as 2D slice samples (layout 'nifti'; README "Datasets").

A volume `images/<case>.nii[.gz]` and its label volume `labels/<case>.nii[.gz]` become one
sample per slice along `data.nifti.axis` (default the last voxel axis), with id
`<case>_s<index:03d>`. A slice keeps the remaining two voxel axes in their stored order:
its rows run along the first of them, its columns along the second, without the transpose
a viewer applies, so that a predicted slice goes back into the volume where it came from
(`cers_jax.inference.nifti_out`).

Intensities become the uint8 image the cache stores through a window: `data.nifti.window`
= (center, width) in the volume's units (e.g. Hounsfield units for CT), else the volume's
own `data.nifti.percentiles` (0.5 and 99.5 by default) as black and white. The window is
per volume, not per slice, so every slice of a case shares one contrast. A label voxel > 0
is lesion (every foreground class counts); labels must hold integers.

Spacing is recorded at the cached resolution (`data.image_size`): the header's in-plane
pixdim scaled by original size / cached size, because every metric downstream sees the
resized slice. The pixdim along the slicing axis is kept as `Sample.slice_thickness`.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any

import numpy as np

from cers_jax.data import images as images_lib
from cers_jax.data.records import DataError, Problem

NIFTI_EXTENSIONS = ('.nii.gz', '.nii')


def nibabel():
  """The nibabel module, imported only where volumes are read or written: a run on PNG or
  JPEG layouts never needs it (the GPU image, for one, lacks it).

  Raises:
    DataError: nibabel is not installed; the message says how to install it.
  """
  try:
    import nibabel as nib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f'NIfTI volumes need the nibabel package, which cannot be imported '
                    f'here ({e}); install it with `pip install "nibabel>=5.2,<6"`.') from e
  return nib


def _read_errors() -> tuple[type[BaseException], ...]:
  """What nibabel raises on a broken or truncated file (its gzip reader: OSError/EOFError)."""
  return (nibabel().filebasedimages.ImageFileError, OSError, EOFError, ValueError,
          zlib.error)


@dataclasses.dataclass(frozen=True)
class NiftiSettings:
  """How volumes are sliced and windowed (the `data.nifti` config fields)."""

  axis: int = -1  # Voxel axis the volume is sliced along (-1: the last).
  window: tuple[float, ...] = ()  # (center, width) in the volume's units; () = percentiles.
  percentiles: tuple[float, float] = (0.5, 99.5)  # Per-volume black and white points.
  empty_margin: int = -1  # >= 0: drop slices farther than this from any lesion slice.

  @classmethod
  def from_config(cls, data_config: Any) -> 'NiftiSettings':
    """The settings of `config.data` (the defaults where it has no `nifti` block)."""
    block = data_config.get('nifti') if hasattr(data_config, 'get') else None
    if block is None:
      return cls()
    settings = cls(axis=int(block.axis), window=tuple(float(v) for v in block.window),
                   percentiles=tuple(float(v) for v in block.percentiles),
                   empty_margin=int(block.empty_margin))
    settings.check()
    return settings

  def check(self) -> None:
    if self.axis not in (-3, -2, -1, 0, 1, 2):
      raise DataError(f'data.nifti.axis={self.axis} must name a voxel axis of a 3-D volume: '
                      '0, 1, 2 (or -3..-1).')
    if self.window and (len(self.window) != 2 or self.window[1] <= 0):
      raise DataError(f'data.nifti.window={self.window} must be () or (center, width) with '
                      'width > 0, e.g. (40, 400) for a CT soft-tissue window.')
    lo, hi = self.percentiles
    if not 0 <= lo < hi <= 100:
      raise DataError(f'data.nifti.percentiles={self.percentiles} must be (low, high) with '
                      '0 <= low < high <= 100.')

  @property
  def axis3(self) -> int:
    """The slicing axis as 0, 1 or 2."""
    return self.axis % 3


def case_of(name: str) -> str:
  """The case name of a volume file name or path ('a/case1.nii.gz' -> 'case1').

  Names without a NIfTI extension are annotation keys: their image stem is kept.
  """
  base = os.path.basename(str(name).strip().replace('\\', '/'))
  for ext in NIFTI_EXTENSIONS:
    if base.lower().endswith(ext) and len(base) > len(ext):
      return base[:-len(ext)]
  return images_lib.id_from_name(base)


def is_nifti_file(name: str) -> bool:
  return name.lower().endswith(NIFTI_EXTENSIONS) and not name.startswith('.')


def slice_id(case: str, index: int) -> str:
  """The sample id of slice `index` of `case`."""
  return f'{case}_s{index:03d}'


def list_volumes(folder: str, problems: list[Problem]) -> dict[str, str]:
  """{case: path} of the NIfTI files in `folder` (sorted; a repeated case keeps the first)."""
  return images_lib.list_files(folder, problems, accept=is_nifti_file, key=case_of,
                               noun='case')


def _open(path: str):
  nib = nibabel()
  try:
    return nib.load(path)
  except _read_errors() as e:
    raise DataError(f'Cannot read NIfTI volume {path}: {e}. The file is corrupt or not a '
                    'NIfTI volume; replace or remove it.') from e


def _shape3(shape: tuple[int, ...], path: str) -> tuple[int, int, int]:
  """A volume's shape as three axes (trailing singleton axes dropped, 2-D as one slice)."""
  shape = tuple(int(s) for s in shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) == 2:
    shape = (*shape, 1)
  if len(shape) != 3:
    raise DataError(f'NIfTI volume {path} has shape {shape}; a 3-D volume (one channel, one '
                    'time point) is expected. Split it into 3-D volumes.')
  return shape  # type: ignore[return-value]


def volume_header(path: str) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
  """(shape, voxel size in mm) of a volume, from its header only."""
  image = _open(path)
  shape = _shape3(image.shape, path)
  zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
  zooms = (*zooms, *(1.0,) * (3 - len(zooms)))
  return shape, zooms  # type: ignore[return-value]


def _read_array(path: str, as_float: bool) -> np.ndarray:
  image = _open(path)
  shape = _shape3(image.shape, path)
  try:
    data = image.get_fdata(dtype=np.float32) if as_float else np.asanyarray(image.dataobj)
  except _read_errors() as e:
    raise DataError(f'Cannot read the voxels of NIfTI volume {path}: {e}. The file is '
                    'truncated or corrupt; replace or remove it.') from e
  return np.asarray(data).reshape(shape)


def read_image_volume(path: str) -> np.ndarray:
  """The intensities of a volume as float32 (X, Y, Z), header scaling applied."""
  return _read_array(path, as_float=True)


def label_to_mask(labels: np.ndarray, path: str = '<array>') -> np.ndarray:
  """uint8 {0, 1} of a label volume: every label > 0 is lesion; refuses non-integers."""
  if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype,
                                                                       np.bool_):
    values = labels.astype(np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
      example = values[bad].flat[0]
      raise DataError(
          f'Label volume {path} holds non-integer values ({int(bad.sum())} voxels, e.g. '
          f'{example:g}): is it an image, or a resampled label map? Labels must be integer '
          'classes (0 = background); resample labels by nearest neighbour or fix the file.')
  return (labels > 0).astype(np.uint8)


def read_label_volume(path: str) -> np.ndarray:
  """A label volume as uint8 {0, 1} (X, Y, Z)."""
  return label_to_mask(_read_array(path, as_float=False), path)


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
  """Slice `index` along `axis` as a C-contiguous 2-D array."""
  return np.ascontiguousarray(np.take(volume, index, axis=axis))


def window_bounds(volume: np.ndarray, settings: NiftiSettings) -> tuple[float, float]:
  """(black, white) intensities: the configured window, else the volume's percentiles."""
  if settings.window:
    center, width = settings.window
    return center - width / 2.0, center + width / 2.0
  finite = volume[np.isfinite(volume)]
  if not finite.size:
    return 0.0, 0.0
  lo, hi = np.percentile(finite, settings.percentiles)
  return float(lo), float(hi)


def to_uint8(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Clips to [lo, hi] and scales to 0..255 (a constant window gives 0)."""
  if hi <= lo:
    return np.zeros(pixels.shape, np.uint8)
  values = np.nan_to_num(pixels.astype(np.float64), nan=lo)
  scaled = (np.clip(values, lo, hi) - lo) * (255.0 / (hi - lo))
  return np.round(scaled).astype(np.uint8)


def in_plane(shape: tuple[int, int, int], zooms: tuple[float, float, float], axis: int,
             size: int) -> tuple[tuple[int, int], tuple[float, float], float]:
  """((rows, cols) of a slice, (row, col) spacing in mm at `size` px, slice thickness)."""
  kept = [a for a in range(3) if a != axis % 3]
  rows, cols = shape[kept[0]], shape[kept[1]]
  spacing = (zooms[kept[0]] * rows / size, zooms[kept[1]] * cols / size)
  return (rows, cols), spacing, float(zooms[axis % 3])


def kept_slices(mask: np.ndarray, axis: int, margin: int) -> list[int]:
  """Slices within `margin` slices of one with lesion (all when margin < 0)."""
  count = mask.shape[axis]
  if margin < 0:
    return list(range(count))
  other = tuple(a for a in range(mask.ndim) if a != axis % mask.ndim)
  lesion = np.flatnonzero(mask.any(axis=other))
  return [i for i in range(count) if lesion.size and np.abs(lesion - i).min() <= margin]


def scan_volume(case: str, image_path: str, label_path: str | None, settings: NiftiSettings,
                size: int, problems: list[Problem]) -> list[dict[str, Any]]:
  """The slice samples' fields of one volume (id, volume, slice_index, spacing, ...).

  A volume whose header cannot be read gives one placeholder slice, whose decoding then
  reports the file as prepare reports any unreadable image.
  """
  try:
    shape, zooms = volume_header(image_path)
  except DataError:
    return [dict(id=slice_id(case, 0), volume=case, slice_index=0)]
  _, spacing, thickness = in_plane(shape, zooms, settings.axis, size)
  indices = list(range(shape[settings.axis3]))
  if settings.empty_margin >= 0 and label_path is not None:
    try:
      labels = read_label_volume(label_path)
    except DataError:
      labels = None  # Decoding reports the file.
    if labels is not None and labels.shape == shape:
      indices = kept_slices(labels, settings.axis3, settings.empty_margin)
      dropped = shape[settings.axis3] - len(indices)
      if dropped:
        problems.append(Problem(
            'dropped_slices', label_path, 0, case,
            f'{dropped} of {shape[settings.axis3]} slices are farther than '
            f'data.nifti.empty_margin={settings.empty_margin} slices from any lesion; '
            'not used'))
  return [dict(id=slice_id(case, i), volume=case, slice_index=i, spacing=spacing,
               slice_thickness=thickness) for i in indices]


def _failed(kind: str, path: str, error: Exception, count: int) -> list[tuple]:
  every = f' (every one of its {count} slices)' if count > 1 else ''
  info = {'error_kind': kind, 'error': f'{error}{every}', 'file': path, 'empty_mask': False}
  return [(None, None, dict(info)) for _ in range(count)]


def _read_pair(image_path: str, label_path: str | None
               ) -> tuple[np.ndarray, np.ndarray | None]:
  """Both volumes, checked against each other; DataErrors carry a `kind` attribute."""
  try:
    volume = read_image_volume(image_path)
  except DataError as e:
    e.kind, e.file = 'unreadable_image', image_path
    raise
  if label_path is None:
    return volume, None
  try:
    raw = _read_array(label_path, as_float=False)
  except DataError as e:
    e.kind, e.file = 'unreadable_mask', label_path
    raise
  if raw.shape != volume.shape:
    error = DataError(f'Label volume {label_path} has shape {raw.shape} but its image '
                      f'{image_path} has {volume.shape}. Fix the pair (same voxel grid).')
    error.kind, error.file = 'size_mismatch', label_path
    raise error
  try:
    return volume, label_to_mask(raw, label_path)
  except DataError as e:
    e.kind, e.file = 'non_integer_label', label_path
    raise


def decode_volume(image_path: str, label_path: str | None, slices: list[int], size: int,
                  settings: NiftiSettings) -> list[tuple]:
  """Decodes the slices `slices` of one volume, as `images.decode_pair` decodes one image.

  Returns one (image (S, S, 3) uint8 | None, mask (S, S) uint8 | None, info) per slice, in
  the order given; a bad volume gives its error to every slice (prepare names it once).
  """
  try:
    volume, labels = _read_pair(image_path, label_path)
  except DataError as e:
    return _failed(e.kind, e.file, e, len(slices))  # type: ignore[attr-defined]
  lo, hi = window_bounds(volume, settings)
  axis, out = settings.axis3, []
  for index in slices:
    info: dict[str, Any] = {'error_kind': '', 'error': '', 'file': '', 'empty_mask': False}
    if not 0 <= index < volume.shape[axis]:
      info.update(error_kind='unreadable_image', file=image_path, error=(
          f'{image_path} has {volume.shape[axis]} slices along axis {axis}, not slice '
          f'{index}: the file changed since it was scanned. Prepare again.'))
      out.append((None, None, info))
      continue
    mask = None
    if labels is not None:
      raw = take_slice(labels, axis, index)
      info['empty_mask'] = not raw.any()
      mask = images_lib.resize_mask(raw, size)
    pixels = to_uint8(take_slice(volume, axis, index), lo, hi)
    out.append((images_lib.resize_image(pixels, size), mask, info))
  return out
