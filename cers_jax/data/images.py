"""Decode, binarise and resize images and masks with Pillow (docs/design.md section 10).

The authors resize to 224, bicubic for images and nearest for masks, and replicate gray to
three channels. Masks are binarised at >= 128 (BRISC 2025's PNG masks hold noisy values
such as 0-7 and 249-255). Any Pillow mode is accepted: 16-bit and float images are min-max
scaled to uint8, which loses nothing the model sees since every image is z-scored later.

Colour masks are read by their brightest channel, not by luminance: a lesion drawn in pure
red (255, 0, 0) has luminance 76, under the threshold, and would become an empty label. A
mask whose brightest pixels are clearly above the noise but all under 128 (a lesion drawn
in a dark shade, or labels stored as 0/100) is refused, naming the file, rather than read
as empty.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
from PIL import Image

from cers_jax.data.records import DataError, Problem

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.gif', '.webp')

# A mask pixel is "near 0" below LOW_BAND and "near 255" above HIGH_BAND; pixels in between
# come from interpolation or compression at edges. A mask is rejected when it has more than
# MAX_MID_LEVELS distinct in-between values covering more than MAX_MID_FRACTION of pixels
# (a gray photo given as a mask has both; a noisy or JPEG-edged mask has neither).
LOW_BAND = 32
HIGH_BAND = 223
MAX_MID_LEVELS = 4
MAX_MID_FRACTION = 0.05
MASK_THRESHOLD = 128

# What Pillow raises on broken files (its PNG reader raises SyntaxError on bad chunks).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def id_from_name(name: str) -> str:
  """The sample id of a file name or path: its base name without an image extension.

  Names with other dots keep them ('case.1' stays 'case.1'), so ids are stable whether an
  annotation file writes 'x.jpg' (the authors' text.csv) or 'x' (their CoT CSVs).
  """
  base = os.path.basename(str(name).strip().replace('\\', '/'))
  stem, ext = os.path.splitext(base)
  return stem if ext.lower() in IMAGE_EXTENSIONS else base


def is_image_file(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith('.')


def _open_pixels(path: str) -> Image.Image:
  try:
    im = Image.open(path)
    im.load()
    return im
  except _DECODE_ERRORS as e:
    raise DataError(f'Cannot decode {path}: {e}. The file is corrupt or not an image; '
                    'replace or remove it.') from e


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
  """Min-max scales any numeric array to uint8 (constant arrays become 0)."""
  a = a.astype(np.float64)
  lo, hi = float(a.min()), float(a.max())
  if hi <= lo:
    return np.zeros(a.shape, np.uint8)
  return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_l_or_rgb(im: Image.Image) -> np.ndarray:
  """Pixels as uint8 (H, W) for single-channel modes or (H, W, 3) for colour modes."""
  if im.mode in ('L', 'RGB'):
    return np.asarray(im, dtype=np.uint8)
  if im.mode in ('1', 'LA', 'La'):
    return np.asarray(im.convert('L'), dtype=np.uint8)
  if im.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
    return _scale_to_uint8(np.asarray(im))
  # P, PA, RGBA, RGBa, CMYK, YCbCr, LAB, HSV: Pillow knows how to make RGB of them (alpha
  # is dropped: medical images carry no meaning in it).
  return np.asarray(im.convert('RGB'), dtype=np.uint8)


def read_image(path: str) -> np.ndarray:
  """Decodes an image of any mode to uint8 (H, W) gray or (H, W, 3) RGB."""
  with _open_pixels(path) as im:
    return _to_l_or_rgb(im)


def binarize_mask(values: np.ndarray, path: str = '<array>') -> np.ndarray:
  """Binarises a uint8 gray mask to {0, 1}: {0, 1} masks are kept, others thresholded at 128.

  Raises DataError, naming `path`, when the array is not binary-like (module constants).
  """
  levels = np.unique(values)
  if levels.size and levels.max() <= 1:
    return values.astype(np.uint8)
  if levels.size and LOW_BAND <= levels.max() < MASK_THRESHOLD:
    raise DataError(
        f'Mask {path} has pixels of value {int(levels.max())} but none reaching '
        f'{MASK_THRESHOLD}, so it would read as an empty mask (no lesion). Is the lesion '
        'drawn in a dark shade? Rewrite the mask as 0/255 (or 0/1), or remove the file.')
  mid = (values >= LOW_BAND) & (values <= HIGH_BAND)
  mid_levels = np.unique(values[mid]).size
  mid_fraction = float(mid.mean()) if values.size else 0.0
  if mid_levels > MAX_MID_LEVELS and mid_fraction > MAX_MID_FRACTION:
    raise DataError(
        f'Mask {path} is not binary-like: {mid_fraction:.1%} of its pixels take '
        f'{mid_levels} distinct values between {LOW_BAND} and {HIGH_BAND} (a binary mask '
        'has values near 0 and near 255, or exactly 0 and 1). Is this an image in the '
        'mask folder? Fix or remove the file.')
  return (values >= MASK_THRESHOLD).astype(np.uint8)


def read_mask_values(path: str) -> np.ndarray:
  """The raw uint8 (H, W) values of a mask file, not yet binarised.

  Palette masks give their indices when those are {0, 1}; colour masks their brightest
  channel per pixel (a lesion drawn in any pure colour stays bright).
  """
  with _open_pixels(path) as im:
    if im.mode == 'P':
      indices = np.asarray(im)
      if indices.size and indices.max() <= 1:
        return indices.astype(np.uint8)
    gray = _to_l_or_rgb(im)
  if gray.ndim == 3:
    gray = gray.max(axis=-1)
  return gray


def read_mask(path: str) -> np.ndarray:
  """Decodes a mask file to uint8 (H, W) in {0, 1}; refuses one that is not binary-like."""
  return binarize_mask(read_mask_values(path), path)


def resize_image(pixels: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize to (size, size, 3) uint8; gray is replicated to three channels."""
  im = Image.fromarray(pixels)
  if im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.BICUBIC)
  out = np.asarray(im, dtype=np.uint8)
  if out.ndim == 2:
    out = np.repeat(out[..., None], 3, axis=-1)
  return out


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of a {0, 1} mask to (size, size) uint8."""
  im = Image.fromarray(mask)
  if im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.NEAREST)
  return np.asarray(im, dtype=np.uint8)


def decode_pair(image_path: str, mask_path: str | None, size: int
                ) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, str | int | bool]]:
  """Decodes, checks and resizes one image and its optional mask (a pool worker's task).

  Returns (image (S, S, 3) uint8 or None, mask (S, S) uint8 or None, info); errors go into
  info ('error_kind', 'error', 'file'), not raised, so that `prepare` can report every bad
  file of a dataset at once. info also says 'empty_mask'.
  """
  info: dict[str, str | int | bool] = {'error_kind': '', 'error': '', 'file': '',
                                       'empty_mask': False}
  try:
    pixels = read_image(image_path)
  except DataError as e:
    info.update(error_kind='unreadable_image', error=str(e), file=image_path)
    return None, None, info
  mask = None
  if mask_path is not None:
    try:
      values = read_mask_values(mask_path)
    except DataError as e:
      info.update(error_kind='unreadable_mask', error=str(e), file=mask_path)
      return None, None, info
    try:
      raw = binarize_mask(values, mask_path)
    except DataError as e:
      info.update(error_kind='non_binary_mask', error=str(e), file=mask_path)
      return None, None, info
    if raw.shape != pixels.shape[:2]:
      info.update(error_kind='size_mismatch', file=mask_path, error=(
          f'Mask {mask_path} is {raw.shape[1]}x{raw.shape[0]} but its image {image_path} '
          f'is {pixels.shape[1]}x{pixels.shape[0]} (width x height). Fix the pair.'))
      return None, None, info
    info['empty_mask'] = not raw.any()
    mask = resize_mask(raw, size)
  return resize_image(pixels, size), mask, info


def list_files(folder: str, problems: list[Problem], *, accept: Callable[[str], bool],
               key: Callable[[str], str], noun: str) -> dict[str, str]:
  """{key(name): path} of the files in `folder` whose name `accept`s (sorted by name).

  A key seen twice keeps the first file; the other is a 'duplicate_image' problem naming
  both, as image stems and volume cases are reported alike.
  """
  found: dict[str, str] = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if not (accept(name) and os.path.isfile(path)):
      continue
    item = key(name)
    if item in found:
      problems.append(Problem('duplicate_image', path, 0, item,
                              f'same {noun} as {found[item]}; kept that one'))
      continue
    found[item] = path
  return found
