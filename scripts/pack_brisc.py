"""Packs BRISC 2025 small enough to travel with the repository to a GPU machine.

  python scripts/pack_brisc.py SRC_DIR OUT_DIR [--csv-dir DIR] [--size 224] [--quality 75]
                               [--max-mib 40]

SRC_DIR holds BRISC's Kaggle layout, `segmentation_task/{train,test}/{images,masks}` (or is
that `segmentation_task` folder), e.g. ../shared/data/brisc2025_train256. OUT_DIR receives
the same layout and, at its root, the authors' three CSVs copied byte for byte (text.csv,
cot_output_gpt5_mask.csv, cot_output_gpt5_no_mask.csv, from --csv-dir, default SRC_DIR),
where the 'brisc' layout finds them without any --config.data.*_csv flag, plus
`pack.json` (settings, counts, sizes). What changes versus the source:

- images: resized to --size x --size (bicubic, as `prepare` resizes them) and re-encoded as
  JPEG at --quality; grey stays one-channel grey, and an RGB image whose channels agree
  within 8 grey levels everywhere (a grey MRI slice saved as RGB) is stored grey too, which
  `prepare` replicates back to three channels;
- masks: binarised with the rule `prepare` uses (>= 128; `cers_jax.data.images.read_mask`),
  resized nearest-neighbour to --size and written as 1-bit PNG: exactly the masks `prepare`
  makes from the source at image_size = --size.

The total size is printed; over --max-mib the script fails (lower --quality or --size). An
image without its mask, or a file that does not decode, stops it with the file's name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image
import tqdm

from cers_jax.data.images import id_from_name, is_image_file, read_image, read_mask
from cers_jax.data.records import DataError

CSV_FILES = ('text.csv', 'cot_output_gpt5_mask.csv', 'cot_output_gpt5_no_mask.csv')
SPLITS = ('train', 'val', 'test')
MANIFEST = 'pack.json'
# An RGB image whose channels differ by at most this many levels anywhere is stored grey
# (JPEG chroma noise on a grey slice stays within a few levels).
GREY_TOLERANCE = 8


class PackError(ValueError):
  """Input the packer cannot use; the message names the file and what to do."""


def _task_dir(src: str) -> str:
  for candidate in (os.path.join(src, 'segmentation_task'), src):
    if any(os.path.isdir(os.path.join(candidate, s, 'images')) for s in SPLITS):
      return candidate
  raise PackError(f'{src} has no segmentation_task/train/images (BRISC 2025\'s Kaggle '
                  'layout, segmentation_task/{train,test}/{images,masks}); give the folder '
                  'that holds segmentation_task/.')


def _pairs(task: str) -> list[tuple[str, str, str]]:
  """(split, image path, mask path) of every image, in name order; every image needs a mask."""
  pairs = []
  for split in SPLITS:
    img_dir = os.path.join(task, split, 'images')
    if not os.path.isdir(img_dir):
      continue
    mask_dir = os.path.join(task, split, 'masks')
    masks = {}
    if os.path.isdir(mask_dir):
      masks = {id_from_name(n): os.path.join(mask_dir, n)
               for n in os.listdir(mask_dir) if is_image_file(n)}
    images = sorted(n for n in os.listdir(img_dir) if is_image_file(n))
    if not images:
      raise PackError(f'{img_dir} holds no image files; remove the empty folder or fill it.')
    for name in images:
      mask = masks.pop(id_from_name(name), None)
      if mask is None:
        raise PackError(f'Image {os.path.join(img_dir, name)} has no mask '
                        f'{os.path.join(mask_dir, id_from_name(name))}.png: add the mask or '
                        'remove the image (a pack keeps every image with its mask).')
      pairs.append((split, os.path.join(img_dir, name), mask))
    if masks:
      orphan = sorted(masks.values())[0]
      raise PackError(f'Mask {orphan} has no image in {img_dir} ({len(masks)} such masks): '
                      'add the image or remove the mask.')
  return pairs


def _grey_if_grey(pixels: np.ndarray) -> np.ndarray:
  """(H, W) for grey content, else the (H, W, 3) pixels unchanged."""
  if pixels.ndim == 2:
    return pixels
  wide = pixels.astype(np.int16)
  if int(np.abs(wide - wide[..., :1]).max()) <= GREY_TOLERANCE:
    return np.asarray(Image.fromarray(pixels).convert('L'))
  return pixels


def pack_pair(image_path: str, mask_path: str, image_out: str, mask_out: str, *, size: int,
              quality: int) -> bool:
  """Writes one resized JPEG image and 1-bit PNG mask; returns whether it was stored grey.

  Raises:
    PackError: the image or mask does not decode, or the mask is not binary-like.
  """
  try:
    pixels = read_image(image_path)
    mask = read_mask(mask_path)
  except DataError as e:
    raise PackError(str(e)) from e
  if mask.shape != pixels.shape[:2]:
    raise PackError(f'Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image '
                    f'{image_path} is {pixels.shape[1]}x{pixels.shape[0]}: fix the pair.')
  pixels = _grey_if_grey(pixels)
  image = Image.fromarray(pixels)
  if image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BICUBIC)
  image.save(image_out, 'JPEG', quality=quality, optimize=True)
  binary = Image.fromarray(mask.astype(bool))  # Mode '1': one bit a pixel.
  if binary.size != (size, size):
    binary = binary.resize((size, size), Image.Resampling.NEAREST)
  binary.save(mask_out, 'PNG', optimize=True)
  return pixels.ndim == 2


def _folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
             for f in files)


def _prepare_out(out: str) -> None:
  if os.path.isfile(out):
    raise PackError(f'{out} is a file; give a folder for the pack.')
  if os.path.isdir(out) and os.listdir(out):
    if not os.path.isfile(os.path.join(out, MANIFEST)):
      raise PackError(f'{out} is not empty and holds no {MANIFEST} (not an earlier pack): '
                      'give a new or empty folder.')
    shutil.rmtree(out)  # An earlier pack: replaced whole, so no stale file survives.
  os.makedirs(out, exist_ok=True)


def pack(src: str, out: str, *, csv_dir: str = '', size: int = 224, quality: int = 75,
         max_mib: float = 40.0, progress: bool = True) -> dict:
  """Writes the compact copy of `src` into `out`; returns the manifest (also pack.json).

  Raises:
    PackError: bad input (named), or a pack larger than `max_mib` (it is left in `out`).
  """
  if size < 8 or not 1 <= quality <= 95:
    raise PackError(f'--size={size} / --quality={quality}: need size >= 8 and quality in '
                    '1..95.')
  start = time.perf_counter()
  task = _task_dir(src)
  csv_dir = csv_dir or src
  csvs = [os.path.join(csv_dir, name) for name in CSV_FILES]
  missing = [p for p in csvs if not os.path.isfile(p)]
  if missing:
    raise PackError(f'Missing CSV(s) {missing}: give the folder of the authors\' brisc2025 '
                    f'CSVs ({", ".join(CSV_FILES)}) with --csv-dir.')
  pairs = _pairs(task)
  _prepare_out(out)
  counts: dict[str, int] = {}
  grey = 0
  for split, image_path, mask_path in tqdm.tqdm(pairs, desc='packing', unit='img',
                                                disable=not progress):
    if counts.get(split) is None:
      for kind in ('images', 'masks'):
        os.makedirs(os.path.join(out, 'segmentation_task', split, kind), exist_ok=True)
    stem = id_from_name(image_path)
    split_dir = os.path.join(out, 'segmentation_task', split)
    grey += pack_pair(image_path, mask_path, os.path.join(split_dir, 'images', stem + '.jpg'),
                      os.path.join(split_dir, 'masks', stem + '.png'), size=size,
                      quality=quality)
    counts[split] = counts.get(split, 0) + 1
  for path in csvs:
    shutil.copyfile(path, os.path.join(out, os.path.basename(path)))
  manifest = dict(
      source=os.path.abspath(src), csv_dir=os.path.abspath(csv_dir), size=size,
      quality=quality, images=counts, stored_grey=grey,
      source_mib=round(sum(os.path.getsize(p) + os.path.getsize(m)
                           for _, p, m in pairs) / 2**20, 2),
      images_mib=round(_folder_bytes(os.path.join(out, 'segmentation_task')) / 2**20, 2),
      csv_mib=round(sum(os.path.getsize(p) for p in csvs) / 2**20, 2),
      seconds=round(time.perf_counter() - start, 1))
  with open(os.path.join(out, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=2)
  total = _folder_bytes(out)
  manifest['total_mib'] = round(total / 2**20, 2)
  if total > max_mib * 2**20:
    raise PackError(f'The pack in {out} is {total / 2**20:.3g} MiB, over '
                    f'--max-mib={max_mib:g}: lower --quality (now {quality}) or --size (now '
                    f'{size}), or raise --max-mib if the transfer allows it.')
  return manifest


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('src', help='BRISC folder holding segmentation_task/')
  parser.add_argument('out', help='pack folder to write (new, empty or an earlier pack)')
  parser.add_argument('--csv-dir', default='', help='folder of the three brisc2025 CSVs '
                      '(default: SRC)')
  parser.add_argument('--size', type=int, default=224, help='image and mask side (px)')
  parser.add_argument('--quality', type=int, default=75, help='JPEG quality of the images')
  parser.add_argument('--max-mib', type=float, default=40.0,
                      help='fail when the pack is larger (MiB)')
  args = parser.parse_args(argv)
  try:
    manifest = pack(args.src, args.out, csv_dir=args.csv_dir, size=args.size,
                    quality=args.quality, max_mib=args.max_mib)
  except PackError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{sum(manifest["images"].values())} images {manifest["images"]} '
        f'({manifest["stored_grey"]} stored grey) at {manifest["size"]} px, JPEG quality '
        f'{manifest["quality"]}: {manifest["images_mib"]:.1f} MiB of images and masks (source '
        f'{manifest["source_mib"]:.1f} MiB) + {manifest["csv_mib"]:.1f} MiB of CSVs = '
        f'{manifest["total_mib"]:.1f} MiB in {args.out}, {manifest["seconds"]:.0f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
