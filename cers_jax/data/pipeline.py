"""The grain pipeline: cached uint8 arrays -> fixed-shape dict batches (docs/design.md section 10).

Images were decoded once into the uint8 cache and texts tokenized once into (N, L) arrays;
a split is a list of cache rows. A step only gathers rows, applies the authors' random zoom
(`augment.py`) and the per-image z-score, and stacks.

Training loaders are `source(rows).shuffle(s).batch(B, drop_remainder=True).repeat()` then
one `random_map` over the whole batch. grain reshuffles every epoch and never lets a batch
straddle two, and the zoom draws from a generator grain derives from (seed, batch index):
every batch is a pure function of (seed, step) whatever the worker count, and the iterator
state is just positions, which `get_state()` / `set_state()` restore exactly (into a loader
made with the same arguments, worker_count included).

Unlabeled loaders zero the mask: rows of the unlabeled split may have one in the cache (the
labeled fraction hides it), and it must never reach the model.

Batches (docs/design.md, habit 7): image (B,S,S,3) float32; mask (B,S,S,1) float32 {0,1};
text_ids, text_mask (B,L) int32; index (B,) int32 cache rows; is_labeled, valid (B,) bool;
plus any extra per-row arrays (e.g. CoT token ids) under their own names.
"""

from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import mmap
import os
import signal
from typing import Any

from absl import flags
from absl import logging
import grain
import numpy as np

from cers_jax.data import augment as augmentation

Batch = dict[str, np.ndarray]
_BATCH_KEYS = ('image', 'mask', 'text_ids', 'text_mask', 'index', 'is_labeled', 'valid')


@dataclasses.dataclass(frozen=True)
class PipelineArrays:
  """Every per-row array a batch is gathered from; row i is cache row i.

  `images` (N, S, S, 3) uint8 may be an np.memmap (then only its path travels to worker
  processes); `masks` (N, S, S) uint8, anything > 0 lesion; `text_ids`, `text_mask` (N, L)
  int32. Rows without `has_mask` are is_labeled=False in eval batches and refused by a
  labeled training loader. `extra` arrays (N, ...) are copied into batches under their keys.
  """
  images: np.ndarray
  masks: np.ndarray
  text_ids: np.ndarray
  text_mask: np.ndarray
  has_mask: np.ndarray | None = None
  extra: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    n = self.images.shape[0]
    if self.images.ndim != 4 or self.images.shape[3] != 3 or (
        self.images.shape[1] != self.images.shape[2]):
      raise ValueError(f'PipelineArrays.images must be (N, S, S, 3), got '
                       f'{self.images.shape}; the cache stores gray as 3 channels.')
    if self.images.dtype != np.uint8 or self.masks.dtype != np.uint8:
      raise ValueError(f'PipelineArrays.images/masks must be uint8 (the cache), got '
                       f'{self.images.dtype}/{self.masks.dtype}.')
    if self.masks.shape != self.images.shape[:3]:
      raise ValueError(f'PipelineArrays.masks {self.masks.shape} does not match images '
                       f'{self.images.shape[:3]}.')
    if self.text_ids.shape != self.text_mask.shape or self.text_ids.ndim != 2:
      raise ValueError(f'PipelineArrays.text_ids {self.text_ids.shape} and text_mask '
                       f'{self.text_mask.shape} must be equal (N, L).')
    named = {'text_ids': self.text_ids, 'has_mask': self.has_mask, **self.extra}
    for name, array in named.items():
      if array is not None and array.shape[0] != n:
        raise ValueError(f'PipelineArrays.{name} has {array.shape[0]} rows, images {n}.')
    reserved = set(_BATCH_KEYS) & set(self.extra)
    if reserved:
      raise ValueError(f'PipelineArrays.extra may not use batch keys {sorted(reserved)}.')

  @property
  def num_rows(self) -> int:
    return self.images.shape[0]


def _is_file_mapping(array: Any) -> bool:
  """True for an np.memmap that maps a whole file region (not a view of one)."""
  return (isinstance(array, np.memmap) and array.filename is not None
          and isinstance(array.base, mmap.mmap))


def _pickle_array(array: Any) -> Any:
  if _is_file_mapping(array):
    order = 'F' if array.flags.f_contiguous and not array.flags.c_contiguous else 'C'
    return ('memmap', array.filename, array.dtype.str, array.shape, array.offset, order)
  return array


def _unpickle_array(state: Any) -> Any:
  if isinstance(state, tuple) and state and state[0] == 'memmap':
    _, filename, dtype, shape, offset, order = state
    return np.memmap(filename, dtype=np.dtype(dtype), mode='r', offset=offset,
                     shape=shape, order=order)
  return state


class _LoadBatch:
  """Gathers, augments and normalises one batch of cache rows (a grain random_map).

  Pickles memory-mapped arrays by file reference, so spawned grain workers reopen the
  cache instead of receiving a copy of it.
  """

  def __init__(self, arrays: PipelineArrays, *, is_labeled: bool, augment_prob: float,
               zoom_range: Sequence[float]):
    self._arrays = arrays
    self._is_labeled = is_labeled
    self._augment_prob = augment_prob
    self._zoom_range = tuple(zoom_range)

  def __getstate__(self):
    state = dict(self.__dict__)
    a = self._arrays
    state['_arrays'] = dict(
        images=_pickle_array(a.images), masks=_pickle_array(a.masks),
        text_ids=a.text_ids, text_mask=a.text_mask, has_mask=a.has_mask,
        extra={k: _pickle_array(v) for k, v in a.extra.items()})
    return state

  def __setstate__(self, state):
    fields = state.pop('_arrays')
    self.__dict__.update(state)
    self._arrays = PipelineArrays(
        images=_unpickle_array(fields['images']), masks=_unpickle_array(fields['masks']),
        text_ids=fields['text_ids'], text_mask=fields['text_mask'],
        has_mask=fields['has_mask'],
        extra={k: _unpickle_array(v) for k, v in fields['extra'].items()})

  def __call__(self, rows: np.ndarray, rng: np.random.Generator | None = None) -> Batch:
    rows = np.asarray(rows, np.int64)
    return _gather(self._arrays, rows, valid=np.ones(len(rows), bool),
                   is_labeled=self._is_labeled, rng=rng, augment_prob=self._augment_prob,
                   zoom_range=self._zoom_range)


def _gather(arrays: PipelineArrays, rows: np.ndarray, *, valid: np.ndarray,
            is_labeled: bool | np.ndarray, rng: np.random.Generator | None,
            augment_prob: float, zoom_range: Sequence[float]) -> Batch:
  """Builds one batch dict from cache rows (the shared core of train and eval)."""
  # Reading memmap rows in ascending order keeps the disk access sequential.
  order = np.argsort(rows, kind='stable')
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  images = np.asarray(arrays.images[rows[order]])[inverse]  # (B, S, S, 3) uint8
  masks = (np.asarray(arrays.masks[rows[order]])[inverse] > 0).astype(np.float32)
  if rng is not None and augment_prob > 0:
    out_images = np.empty(images.shape, np.float32)
    for i in range(len(rows)):
      out_images[i], masks[i] = augmentation.random_zoom(
          images[i], masks[i], rng, prob=augment_prob, zoom_range=zoom_range)
    images = out_images
  labeled = np.broadcast_to(np.asarray(is_labeled, bool), rows.shape) & valid
  masks[~labeled] = 0.0  # Never show the model a mask it is not supposed to have.
  batch = {
      'image': augmentation.zscore(images),  # (B, S, S, 3)
      'mask': masks[..., None],  # (B, S, S, 1)
      'text_ids': np.asarray(arrays.text_ids[rows], np.int32),  # (B, L)
      'text_mask': np.asarray(arrays.text_mask[rows], np.int32),  # (B, L)
      'index': rows.astype(np.int32),  # (B,)
      'is_labeled': np.array(labeled),  # (B,)
      'valid': valid,  # (B,)
  }
  for name, array in arrays.extra.items():
    batch[name] = np.asarray(array[rows])
  return batch


def _derived_seed(seed: int, *stream: int) -> int:
  """A 32-bit seed for one use; independent streams rather than seed, seed + 1, ..."""
  return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


def _check_rows(arrays: PipelineArrays, rows: Sequence[int], what: str) -> np.ndarray:
  rows = np.asarray(rows)
  if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
    raise ValueError(f'{what}: rows must be a 1-D integer array of cache rows, got '
                     f'shape {rows.shape} dtype {rows.dtype}.')
  if rows.size and (rows.min() < 0 or rows.max() >= arrays.num_rows):
    raise ValueError(f'{what}: rows must lie in [0, {arrays.num_rows}) (the cache rows), '
                     f'got [{rows.min()}, {rows.max()}]; was the cache rebuilt after the '
                     'split was made?')
  return rows.astype(np.int64)


def _leave_sigterm_to_the_parent(worker_index: int, worker_count: int) -> None:
  """grain's `worker_init_fn`: a worker ignores SIGTERM while the process that started it
  lives, and exits on it once orphaned.

  `timeout`, SLURM and a shell's job control send SIGTERM to the whole process group, the
  workers included. A worker that died of it would make the main process's next batch
  fail ("Worker process was terminated unexpectedly") before `StopOnSigterm` could save its
  checkpoint at the step boundary; the main process instead decides when to stop and closes
  its workers as usual. An orphan (its parent killed outright) still exits on SIGTERM.
  """
  del worker_index, worker_count
  parent = os.getppid()

  def on_sigterm(signum, frame):
    del frame
    if os.getppid() != parent:
      os._exit(128 + signum)  # pylint: disable=protected-access

  signal.signal(signal.SIGTERM, on_sigterm)


def make_train_loader(
    arrays: PipelineArrays,
    rows: Sequence[int],
    *,
    batch_size: int,
    seed: int,
    is_labeled: bool,
    augment: bool = True,
    augment_prob: float = 0.1,
    zoom_range: Sequence[float] = (0.95, 1.2),
    worker_count: int = 0,
    prefetch: int = 2,
) -> grain.DatasetIterator:
  """An infinite, checkpointable grain iterator of training batches over cache `rows`.

  Each epoch is reshuffled and its last partial batch dropped; the same seed gives identical
  batches, and the labeled and unlabeled loaders of one run draw independent orders from it.
  `is_labeled` keeps the masks (every row must have one); False zeroes them. `augment`
  applies the random zoom. `worker_count` 0 uses a background thread of this process,
  `prefetch` 0 is synchronous. Call `close()` when done if worker_count > 0.
  """
  rows = _check_rows(arrays, rows, 'make_train_loader')
  if len(rows) < batch_size:
    raise ValueError(
        f'make_train_loader: the split has {len(rows)} rows, fewer than batch_size '
        f'{batch_size}, so no full batch exists; lower train.batch_size or raise '
        'data.labeled_fraction.')
  if is_labeled and arrays.has_mask is not None and not arrays.has_mask[rows].all():
    missing = rows[~arrays.has_mask[rows]][:5].tolist()
    raise ValueError(f'make_train_loader: labeled rows without a mask (e.g. rows '
                     f'{missing}); the labeled split must only hold images with masks.')
  if worker_count < 0 or prefetch < 0:
    raise ValueError(f'worker_count and prefetch must be >= 0, got {worker_count}, '
                     f'{prefetch}.')
  logging.info('%s train loader: %d rows, %d batches of %d per epoch, %d workers.',
               'Labeled' if is_labeled else 'Unlabeled', len(rows), len(rows) // batch_size,
               batch_size, worker_count)
  stream = int(is_labeled)
  load = _LoadBatch(arrays, is_labeled=is_labeled,
                    augment_prob=augment_prob if augment else 0.0, zoom_range=zoom_range)
  dataset = (
      grain.MapDataset.source(rows)
      .shuffle(seed=_derived_seed(seed, 0, stream))
      .batch(batch_size, drop_remainder=True)
      .repeat()
      .random_map(load, seed=_derived_seed(seed, 1, stream)))
  if worker_count == 0:
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(read))
  if not flags.FLAGS.is_parsed():
    # grain's multiprocessing reads its own absl flags; outside an absl app (tests,
    # notebooks) nobody parsed them, so take their defaults rather than fail.
    flags.FLAGS.mark_as_parsed()
  # Inside a worker the work is already parallel across processes: no extra threads.
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  iter_dataset = iter_dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count,
                                   per_worker_buffer_size=max(prefetch, 1)),
      worker_init_fn=_leave_sigterm_to_the_parent)
  return iter(iter_dataset)


def make_eval_batches(
    arrays: PipelineArrays, rows: Sequence[int], *, batch_size: int
) -> Iterator[Batch]:
  """Deterministic batches over `rows` in order, without augmentation.

  The last batch is padded to batch_size by repeating the last row with valid=False (and
  is_labeled=False), so the jitted eval step compiles once; metrics must mask with `valid`.
  is_labeled is has_mask of the row (True when arrays.has_mask is None).
  """
  rows = _check_rows(arrays, rows, 'make_eval_batches')
  has_mask = (np.ones(arrays.num_rows, bool) if arrays.has_mask is None
              else np.asarray(arrays.has_mask, bool))
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    valid = np.zeros(batch_size, bool)
    valid[:len(chunk)] = True
    padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1])])
    yield _gather(arrays, padded, valid=valid, is_labeled=has_mask[padded], rng=None,
                  augment_prob=0.0, zoom_range=(1.0, 1.0))
