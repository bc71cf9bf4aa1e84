"""Generates chain-of-thought (CoT) CSVs with any OpenAI-compatible vision chat model.

Paper Sec. 3.1: every image gets a CoT in four parts (Texture, Boundary, Context, Summary).
A labeled image is sent with its mask blended on it in colour and the mask prompt; any other
image is sent plain with the no-mask prompt (``prompts.py``). Temperature 0.

Output is the published ``image,cot`` CSV, one row per image keyed by file stem. Rows are
flushed as replies arrive, so an interrupted run loses nothing and a rerun skips the ids
already written. Images that fail for good go to a failures CSV (``image,error``, rewritten
each run), never into the CoT CSV. Replies lacking one of the four parts are still written
(the published CSVs have truncated ones too) and counted as ``incomplete``.

  export OPENAI_API_KEY=...   # read from the environment only; never written anywhere
  python -m cers_jax.cot.generate --images data/frames --masks data/masks \\
      --text-csv data/text.csv --out data/cot_mask.csv \\
      --base-url https://api.openai.com/v1 --model gpt-4o

The published pair of files comes from one run with ``--masks`` over the labeled images
(the mask CSV) and one without over all images (the no-mask CSV).
"""

import argparse
import base64
import concurrent.futures
import csv
import dataclasses
import io
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
import tqdm

from cers_jax.cot import client as client_lib
from cers_jax.cot import prompts
from cers_jax.data.images import IMAGE_EXTENSIONS

OVERLAY_COLOR = (255, 0, 0)
OVERLAY_COLOR_NAME = 'red'
OVERLAY_ALPHA = 0.45
CSV_HEADER = ('image', 'cot')
FAILURES_HEADER = ('image', 'error')

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class CotRequest:
  """One image to describe; ``mask_path`` is set for a labeled image (sent as an overlay)."""

  image_id: str
  image_path: PathLike
  mask_path: PathLike | None
  report_text: str


@dataclasses.dataclass(frozen=True)
class CotSummary:
  """What one ``generate_cots`` run did; ``skipped`` were already in the output CSV."""

  total: int
  skipped: int
  written: int
  failed: int
  incomplete: int


def overlay_mask(image: Image.Image, mask: Image.Image, *,
                 color: tuple[int, int, int] = OVERLAY_COLOR,
                 alpha: float = OVERLAY_ALPHA) -> Image.Image:
  """Blends ``color`` onto the mask's foreground of ``image``; returns RGB.

  Foreground is >= 128 for 0/255 masks (noisy JPEG-like masks included) and > 0 for 0/1
  masks; the mask is resized (nearest) to the image if sizes differ.
  """
  rgb = np.asarray(image.convert('RGB'), np.float32)
  mask = mask.convert('L')
  if mask.size != image.size:
    mask = mask.resize(image.size, Image.Resampling.NEAREST)
  m = np.asarray(mask)
  fg = (m >= 128) if m.max() > 1 else (m > 0)
  blended = (1.0 - alpha) * rgb + alpha * np.asarray(color, np.float32)
  out = np.where(fg[..., None], blended, rgb)
  return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), 'RGB')


def png_data_url(image: Image.Image, max_side: int | None = None) -> str:
  """A ``data:image/png;base64,...`` URL of ``image``, downscaled to ``max_side`` if larger."""
  if max_side and max(image.size) > max_side:
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def build_messages(request: CotRequest, *, max_side: int | None = 1024
                   ) -> list[dict[str, Any]]:
  """The one-message chat list for an image: prompt text plus the (overlaid) image.

  Raises OSError when the image or mask cannot be read.
  """
  with Image.open(request.image_path) as img:
    image = img.convert('RGB')
  with_mask = request.mask_path is not None
  if with_mask:
    with Image.open(request.mask_path) as mask:
      image = overlay_mask(image, mask)
  text = prompts.build_prompt(request.report_text, with_mask=with_mask,
                              color=OVERLAY_COLOR_NAME)
  return [{'role': 'user', 'content': [
      {'type': 'text', 'text': text},
      {'type': 'image_url', 'image_url': {'url': png_data_url(image, max_side)}},
  ]}]


def read_done_ids(out_csv: PathLike) -> set[str]:
  """Image ids already in a CoT CSV (empty if the file is missing or empty).

  Raises ValueError when the file is not an ``image,cot`` CSV or its last row was cut off.
  """
  path = pathlib.Path(out_csv)
  if not path.exists() or path.stat().st_size == 0:
    return set()
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) != b'\n':
      raise ValueError(f'{path}: the last row is incomplete (an interrupted write?); '
                       'delete that partial row and rerun to resume.')
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header[:2]] != list(CSV_HEADER):
      raise ValueError(f'{path}: expected the header "image,cot", found {header!r}; '
                       'pass another --out or move this file away.')
    return {row[0] for row in reader if row}


def _open_csv_for_append(path: pathlib.Path, header: Sequence[str], *, truncate: bool):
  """Opens a CSV for writing rows, writing the header when the file starts empty."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fresh = truncate or not path.exists() or path.stat().st_size == 0
  f = open(path, 'w' if truncate else 'a', newline='', encoding='utf-8')
  writer = csv.writer(f)
  if fresh:
    writer.writerow(header)
    f.flush()
  return f, writer


def _describe(chat: client_lib.ChatClient, request: CotRequest, *, temperature: float,
              max_tokens: int | None, max_side: int | None) -> str:
  try:
    messages = build_messages(request, max_side=max_side)
  except OSError as e:
    raise client_lib.ChatError(f'cannot read the image or mask: {e}') from None
  return chat.complete(messages, temperature=temperature, max_tokens=max_tokens,
                       label=request.image_id).strip()


def _check_unique_ids(items: Sequence[CotRequest]) -> None:
  ids = [item.image_id for item in items]
  if len(set(ids)) != len(ids):
    dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
    raise ValueError(f'duplicate image ids in the requests, e.g. {dupes}; ids key the '
                     'CSV rows and must be unique.')


def _api_key(api_key_env: str | None) -> str | None:
  """The key from `api_key_env`; None when no variable is named (a server without keys)."""
  if not api_key_env:
    return None
  api_key = os.environ.get(api_key_env)
  if not api_key:
    raise ValueError(f'environment variable {api_key_env} is not set: export your API key '
                     'there, or pass an empty api_key_env (--api-key-env "") for a server '
                     'that needs none.')
  return api_key


def _collect(futures: dict, out, failures, *, progress: bool) -> dict[str, int]:
  """Writes each finished request's CoT (or its failure) as it completes; the counts.

  Only this thread writes, so rows never interleave and need no lock; every row is flushed
  at once, so an interrupted run keeps all that finished.
  """
  (out_file, out_writer), (fail_file, fail_writer) = out, failures
  counts = dict(written=0, failed=0, incomplete=0)
  bar = tqdm.tqdm(total=len(futures), desc='CoT', unit='img', disable=not progress)
  for future in concurrent.futures.as_completed(futures):
    item = futures[future]
    try:
      cot = future.result()
    except client_lib.ChatError as e:
      fail_writer.writerow((item.image_id, str(e)))
      fail_file.flush()
      counts['failed'] += 1
      logging.warning('%s: failed: %s', item.image_id, e)
    else:
      out_writer.writerow((item.image_id, cot))
      out_file.flush()
      counts['written'] += 1
      missing = prompts.missing_sections(cot)
      if missing:
        counts['incomplete'] += 1
        logging.warning('%s: CoT lacks %s (written anyway).', item.image_id,
                        ', '.join(missing))
    bar.update(1)
  bar.close()
  return counts


def generate_cots(items: Sequence[CotRequest], *, out_csv: PathLike,
                  failures_csv: PathLike, base_url: str, model: str,
                  api_key_env: str | None = 'OPENAI_API_KEY', concurrency: int = 4,
                  max_retries: int = 5, timeout_s: float = 60.0, temperature: float = 0.0,
                  max_tokens: int | None = None, max_side: int | None = 1024,
                  backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                  retry_after_max_s: float = 300.0, progress: bool = True) -> CotSummary:
  """Asks the model for a CoT per image and appends them to ``out_csv``, resumably.

  Args:
    items: the images; ``image_id`` values must be unique.
    out_csv: ``image,cot`` CSV; created if absent, else resumed (its ids skipped).
    failures_csv: ``image,error`` CSV of this run's failures (rewritten each run).
    api_key_env: environment variable holding the API key; None or '' sends no key.
    max_retries: retries per image after the first attempt.
    max_side: images are downscaled to this longest side before upload.
    backoff_base_s: first retry delay (doubles each retry, with jitter).
    backoff_max_s: cap on one computed retry delay.
    retry_after_max_s: cap on a server-requested Retry-After.

  Raises:
    ValueError: duplicate ids, a bad argument, an unusable output file, or the key's
      environment variable is unset.
  """
  if concurrency < 1:
    raise ValueError(f'concurrency must be >= 1, got {concurrency}.')
  _check_unique_ids(items)
  chat = client_lib.ChatClient(
      base_url=base_url, model=model, api_key=_api_key(api_key_env), timeout_s=timeout_s,
      max_retries=max_retries, backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
      retry_after_max_s=retry_after_max_s)

  out_path = pathlib.Path(out_csv)
  done = read_done_ids(out_path)
  pending = [item for item in items if item.image_id not in done]
  skipped = len(items) - len(pending)
  logging.info('CoT generation: %d images, %d already in %s, %d to send to %s (%s).',
               len(items), skipped, out_path, len(pending), chat.url, model)

  out_file, out_writer = _open_csv_for_append(out_path, CSV_HEADER, truncate=False)
  fail_file, fail_writer = _open_csv_for_append(pathlib.Path(failures_csv),
                                                FAILURES_HEADER, truncate=True)
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency,
                                                   thread_name_prefix='cot')
  try:
    futures = {
        executor.submit(_describe, chat, item, temperature=temperature,
                        max_tokens=max_tokens, max_side=max_side): item
        for item in pending}
    counts = _collect(futures, (out_file, out_writer), (fail_file, fail_writer),
                      progress=progress)
  finally:
    # On Ctrl-C: drop queued requests, let the few in flight finish, keep what is written.
    executor.shutdown(wait=True, cancel_futures=True)
    out_file.close()
    fail_file.close()

  summary = CotSummary(total=len(items), skipped=skipped, **counts)
  logging.info('CoT generation done: %s', summary)
  return summary


def _files_by_stem(folder: pathlib.Path, what: str) -> dict[str, pathlib.Path]:
  """Image files of a folder keyed by stem; two files with one stem are an error."""
  if not folder.is_dir():
    raise ValueError(f'{what} folder {folder} does not exist.')
  found: dict[str, pathlib.Path] = {}
  for path in sorted(folder.iterdir()):
    if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
      continue
    if path.stem in found:
      raise ValueError(f'{what} folder {folder} has two files for "{path.stem}": '
                       f'{found[path.stem].name} and {path.name}; keep one.')
    found[path.stem] = path
  return found


def read_text_csv(text_csv: PathLike) -> dict[str, str]:
  """``{stem: text}`` of an ``image,text`` CSV (``image`` values may carry an extension)."""
  path = pathlib.Path(text_csv)
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    columns = {(name or '').strip().lower(): name for name in reader.fieldnames or []}
    if 'image' not in columns or 'text' not in columns:
      raise ValueError(f'{path}: needs "image" and "text" columns, found '
                       f'{reader.fieldnames}.')
    texts = {}
    for row in reader:
      name = (row[columns['image']] or '').strip()
      if not name:
        continue
      stem = pathlib.Path(name).stem if name.lower().endswith(IMAGE_EXTENSIONS) else name
      texts[stem] = row[columns['text']] or ''
  return texts


def collect_requests(images_dir: PathLike, text_csv: PathLike,
                     masks_dir: PathLike | None = None, *,
                     allow_missing_text: bool = False) -> list[CotRequest]:
  """One ``CotRequest`` per image of a folder, sorted by image id.

  Masks are matched by stem or ``mask_<stem>``; images with a mask become labeled requests.
  Raises ValueError for an unusable folder, or images without report text unless
  ``allow_missing_text`` (then they are sent with an empty report).
  """
  images = _files_by_stem(pathlib.Path(images_dir), 'images')
  if not images:
    raise ValueError(f'images folder {images_dir} holds no {"/".join(IMAGE_EXTENSIONS)} '
                     'files.')
  masks = _files_by_stem(pathlib.Path(masks_dir), 'masks') if masks_dir else {}
  texts = read_text_csv(text_csv)
  missing = [stem for stem in images if stem not in texts]
  if missing and not allow_missing_text:
    raise ValueError(f'{len(missing)} images have no row in {text_csv}, e.g. '
                     f'{missing[:5]}; add them or pass --allow-missing-text.')
  requests = []
  for stem, path in images.items():
    mask = masks.get(stem) or masks.get('mask_' + stem)
    requests.append(CotRequest(image_id=stem, image_path=path, mask_path=mask,
                               report_text=texts.get(stem, '')))
  labeled = sum(r.mask_path is not None for r in requests)
  logging.info('%d images, %d with a mask (overlay + mask prompt), %d without.',
               len(requests), labeled, len(requests) - labeled)
  return requests


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m cers_jax.cot.generate',
      description='Generate CERS chain-of-thought CSVs with an OpenAI-compatible API.')
  parser.add_argument('--images', required=True, help='Folder of images.')
  parser.add_argument('--masks', default=None,
                      help='Folder of masks (by stem); images with one get the overlay.')
  parser.add_argument('--text-csv', required=True, help='image,text CSV of reports.')
  parser.add_argument('--out', required=True, help='CoT CSV to write or resume.')
  parser.add_argument('--failures', default=None,
                      help='Failures CSV (default: <out>.failures.csv).')
  parser.add_argument('--base-url', required=True,
                      help='API root, e.g. https://api.openai.com/v1.')
  parser.add_argument('--model', required=True, help='Model name.')
  parser.add_argument('--api-key-env', default='OPENAI_API_KEY',
                      help='Environment variable with the API key ("" = none).')
  parser.add_argument('--concurrency', type=int, default=4, help='Requests in flight.')
  parser.add_argument('--max-retries', type=int, default=5, help='Retries per image.')
  parser.add_argument('--timeout', type=float, default=60.0, help='Seconds per attempt.')
  parser.add_argument('--temperature', type=float, default=0.0, help='Sampling temperature.')
  parser.add_argument('--max-tokens', type=int, default=None, help='Reply length cap.')
  parser.add_argument('--max-side', type=int, default=1024,
                      help='Longest image side uploaded, in pixels.')
  parser.add_argument('--limit', type=int, default=None,
                      help='Only the first N images (a trial run).')
  parser.add_argument('--allow-missing-text', action='store_true',
                      help='Send images without a report row with an empty report.')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit status (1 if any image failed)."""
  args = _parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    requests = collect_requests(args.images, args.text_csv, args.masks,
                                allow_missing_text=args.allow_missing_text)
    if args.limit is not None:
      requests = requests[:args.limit]
    failures = args.failures or str(pathlib.Path(args.out)) + '.failures.csv'
    summary = generate_cots(
        requests, out_csv=args.out, failures_csv=failures, base_url=args.base_url,
        model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
        max_retries=args.max_retries, timeout_s=args.timeout,
        temperature=args.temperature, max_tokens=args.max_tokens, max_side=args.max_side)
  except ValueError as e:
    sys.stderr.write(f'error: {e}\n')
    return 2
  print(f'written {summary.written}, skipped {summary.skipped} (already done), '
        f'failed {summary.failed} (see {failures}), incomplete {summary.incomplete}')
  return 1 if summary.failed else 0


if __name__ == '__main__':
  sys.exit(main())
