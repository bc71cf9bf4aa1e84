r"""Input-pipeline throughput: training images per second against grain worker count.

Measures `cers_jax.data.pipeline.make_train_loader` alone (no model): gather rows from the
memory-mapped uint8 cache, random zoom (augment on, the authors' p = 0.1), per-image
z-score, stack into a batch. Without --cache_dir it writes a cache of random 224x224 images
to a temporary folder first, so the numbers measure the pipeline, not a particular dataset.

  python benchmarks/input_pipeline.py                       # ~30 s on 2 CPU cores
  python benchmarks/input_pipeline.py --cache_dir=/path/to/workdir/data --workers=0,2,4

Startup is the time to the first batch (worker processes are spawned, so it includes
Python and grain imports in each); throughput is measured after two warm-up batches. Prints
a markdown table.
"""

from collections.abc import Sequence
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from cers_jax import cli
from cers_jax.data import pipeline

_CACHE_DIR = flags.DEFINE_string(
    'cache_dir', '', 'Prepared cache (images.npy, masks.npy); empty = random images.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 256, 'Random images to generate.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Side of the random images.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Batch size.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker counts to measure.')
_BATCHES = flags.DEFINE_integer('batches', 40, 'Batches timed per worker count.')
_ZOOM_PROB = flags.DEFINE_float('zoom_prob', 0.1, 'Random zoom probability.')
_PREFETCH = flags.DEFINE_integer('prefetch', 2, 'Prefetch buffer (per worker).')
_TEXT_LEN = 64  # config.data.max_text_len; token arrays are only gathered.


def _random_cache(folder: str, num: int, size: int) -> None:
  rng = np.random.default_rng(0)
  images = np.lib.format.open_memmap(os.path.join(folder, 'images.npy'), 'w+', np.uint8,
                                     (num, size, size, 3))
  for start in range(0, num, 64):  # In chunks, to keep memory flat for big caches.
    stop = min(start + 64, num)
    images[start:stop] = rng.integers(0, 256, (stop - start, size, size, 3), np.uint8)
  images.flush()
  np.save(os.path.join(folder, 'masks.npy'),
          (rng.random((num, size, size)) > 0.5).astype(np.uint8))


def _load_arrays(folder: str) -> pipeline.PipelineArrays:
  images = np.load(os.path.join(folder, 'images.npy'), mmap_mode='r')
  masks = np.load(os.path.join(folder, 'masks.npy'), mmap_mode='r')
  n = images.shape[0]
  text = np.zeros((n, _TEXT_LEN), np.int32)
  return pipeline.PipelineArrays(images, masks, text, text.copy())


def _measure(arrays: pipeline.PipelineArrays, workers: int) -> tuple[float, float]:
  """Returns (seconds to the first batch, images per second after warm-up)."""
  start = time.perf_counter()
  it = pipeline.make_train_loader(
      arrays, np.arange(arrays.num_rows), batch_size=_BATCH_SIZE.value, seed=0,
      is_labeled=True, augment_prob=_ZOOM_PROB.value, worker_count=workers,
      prefetch=_PREFETCH.value)
  try:
    next(it)
    startup = time.perf_counter() - start
    next(it)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    if workers:
      it.close()
  return startup, _BATCHES.value * _BATCH_SIZE.value / seconds


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Keep the table readable.
  with tempfile.TemporaryDirectory() as tmp:
    folder = _CACHE_DIR.value
    if not folder:
      folder = tmp
      _random_cache(folder, _NUM_IMAGES.value, _IMAGE_SIZE.value)
    arrays = _load_arrays(folder)
    size = arrays.images.shape[1]
    print(f'\nInput pipeline, {arrays.num_rows} cached images of {size}x{size}, batch '
          f'{_BATCH_SIZE.value}, zoom p={_ZOOM_PROB.value}, prefetch {_PREFETCH.value}, '
          f'{os.cpu_count()} CPUs\n')
    print('| workers | startup (s) | images/s | ms/batch |')
    print('|--------:|------------:|---------:|---------:|')
    for workers in (int(w) for w in _WORKERS.value):
      startup, rate = _measure(arrays, workers)
      print(f'| {workers} | {startup:.2f} | {rate:.0f} | '
            f'{1000 * _BATCH_SIZE.value / rate:.1f} |', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
