"""Tests for cers_jax.data.augment and cers_jax.data.pipeline."""

import csv
import os
import signal
import time

import numpy as np
from PIL import Image
import pytest

from cers_jax.data import augment
from cers_jax.data import pipeline
from cers_jax.data import synthetic
from cers_jax.data import tokenize

N, S, L = 44, 16, 6


def _arrays(tmp_path=None, *, has_mask=None, extra=None):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, S, S, 3), dtype=np.uint8)
  if tmp_path is not None:  # As the cache serves them: memory-mapped .npy.
    np.save(tmp_path / 'images.npy', images)
    images = np.load(tmp_path / 'images.npy', mmap_mode='r')
  masks = (rng.random((N, S, S)) > 0.6).astype(np.uint8)
  text_ids = np.arange(N * L, dtype=np.int32).reshape(N, L)
  text_mask = np.ones((N, L), np.int32)
  return pipeline.PipelineArrays(images, masks, text_ids, text_mask, has_mask=has_mask,
                                 extra=extra or {})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# --- augment ------------------------------------------------------------------------


def _smooth_image():
  rng = np.random.default_rng(1)
  small = Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8))
  return np.asarray(small.resize((40, 40), Image.BILINEAR))


@pytest.mark.parametrize('zoom, new, pad', [(1.2, 48, -4), (1.1, 44, -2), (0.95, 38, 1)])
def test_zoom_matches_pillow_resize_then_centre_crop_or_pad(zoom, new, pad):
  image = _smooth_image()
  ours = augment.zoom_image(image[..., None], zoom)[..., 0]
  resized = np.asarray(Image.fromarray(image).resize((new, new), Image.BICUBIC), np.float32)
  if pad < 0:
    expected = resized[-pad:-pad + 40, -pad:-pad + 40]
    np.testing.assert_allclose(ours, expected, atol=1.5)  # Pillow rounds to uint8 twice.
  else:
    np.testing.assert_allclose(ours[pad:pad + new, pad:pad + new], resized, atol=1.5)
    assert not ours[:pad].any() and not ours[:, :pad].any() and not ours[-pad:].any()
  mask = (_smooth_image() > 128).astype(np.uint8)
  ours_mask = augment.zoom_mask(mask, zoom)
  resized_mask = np.asarray(Image.fromarray(mask).resize((new, new), Image.NEAREST))
  if pad < 0:
    expected_mask = resized_mask[-pad:-pad + 40, -pad:-pad + 40]
  else:
    expected_mask = np.zeros_like(mask)
    expected_mask[pad:pad + new, pad:pad + new] = resized_mask
  # Ties at exact half-pixel positions may round either way: allow a thin seam.
  assert (ours_mask != expected_mask).mean() < 0.01


def test_zoom_one_is_identity_and_mask_stays_binary():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
  mask = (rng.random((S, S)) > 0.5).astype(np.uint8)
  np.testing.assert_allclose(augment.zoom_image(image, 1.0), image, atol=1e-4)
  np.testing.assert_array_equal(augment.zoom_mask(mask, 1.0), mask)
  for zoom in (0.95, 1.07, 1.2):
    assert set(np.unique(augment.zoom_mask(mask, zoom))) <= {0, 1}
    out = augment.zoom_image(image, zoom)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255


def test_random_zoom_probability():
  rng = np.random.default_rng(0)
  image = np.tile(np.arange(S, dtype=np.uint8)[None, :, None] * 10, (S, 1, 3))
  mask = np.zeros((S, S), np.uint8)
  changed = sum(
      not np.array_equal(augment.random_zoom(image, mask, rng, prob=0.3,
                                             zoom_range=(1.1, 1.2))[0], image)
      for _ in range(400))
  assert 80 < changed < 160
  never = [augment.random_zoom(image, mask, rng, prob=0.0, zoom_range=(1.1, 1.2))[0]
           for _ in range(20)]
  assert all(np.array_equal(x, image) for x in never)


def test_zscore_per_image_per_channel():
  rng = np.random.default_rng(0)
  x = rng.normal(5, 3, (2, S, S, 3)).astype(np.float32) * np.array([1, 10, 100])
  z = augment.zscore(x)
  np.testing.assert_allclose(z.mean(axis=(1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(z.std(axis=(1, 2)), 1, atol=1e-4)
  assert not augment.zscore(np.full((S, S, 3), 7.0)).any()  # Constant: zeros, not NaN.


# --- pipeline -----------------------------------------------------------------------


def test_train_batches_contract_and_epochs():
  arrays = _arrays()
  rows = np.arange(4, 4 + 30)
  it = pipeline.make_train_loader(arrays, rows, batch_size=8, seed=0, is_labeled=True,
                                  augment=False)
  batches = _take(it, 6)
  b = batches[0]
  expected = {'image': ((8, S, S, 3), np.float32), 'mask': ((8, S, S, 1), np.float32),
              'text_ids': ((8, L), np.int32), 'text_mask': ((8, L), np.int32),
              'index': ((8,), np.int32), 'is_labeled': ((8,), np.bool_),
              'valid': ((8,), np.bool_)}
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == expected
  assert b['is_labeled'].all() and b['valid'].all()
  # Contents follow the index: z-scored image, binary mask, text of that row.
  np.testing.assert_allclose(b['image'], augment.zscore(arrays.images[b['index']]),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(b['mask'][..., 0], arrays.masks[b['index']])
  np.testing.assert_array_equal(b['text_ids'], arrays.text_ids[b['index']])
  # 30 rows at B=8: 3 batches per epoch, 24 distinct rows, the remainder dropped.
  for epoch in (batches[:3], batches[3:]):
    seen = np.concatenate([x['index'] for x in epoch])
    assert len(set(seen.tolist())) == 24 and set(seen.tolist()) <= set(rows.tolist())
  assert not np.array_equal(batches[0]['index'], batches[3]['index'])  # Reshuffled.


def test_unlabeled_loader_hides_masks():
  arrays = _arrays()
  it = pipeline.make_train_loader(arrays, np.arange(N), batch_size=8, seed=0,
                                  is_labeled=False)
  for b in _take(it, 3):
    assert not b['mask'].any() and not b['is_labeled'].any() and b['valid'].all()


def test_same_seed_same_batches_other_seed_other_order():
  arrays = _arrays()
  make = lambda seed: pipeline.make_train_loader(
      arrays, np.arange(N), batch_size=8, seed=seed, is_labeled=True, augment_prob=0.5)
  a, b, c = _take(make(3), 7), _take(make(3), 7), _take(make(4), 7)
  _assert_batches_equal(a, b)
  assert any(not np.array_equal(x['index'], y['index']) for x, y in zip(a, c))
  # The zoom did run (augment_prob=0.5): some images differ from the plain z-score.
  zoomed = sum(not np.allclose(b_['image'][i], augment.zscore(arrays.images[idx]), atol=1e-5)
               for b_ in a for i, idx in enumerate(b_['index']))
  assert 0 < zoomed < 7 * 8


def test_labeled_and_unlabeled_orders_independent():
  arrays = _arrays()
  lab = pipeline.make_train_loader(arrays, np.arange(N), batch_size=8, seed=0,
                                   is_labeled=True)
  unl = pipeline.make_train_loader(arrays, np.arange(N), batch_size=8, seed=0,
                                   is_labeled=False)
  assert not np.array_equal(next(lab)['index'], next(unl)['index'])


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_in_process(prefetch):
  arrays = _arrays()
  make = lambda: pipeline.make_train_loader(arrays, np.arange(N), batch_size=8, seed=1,
                                            is_labeled=True, augment_prob=0.5,
                                            prefetch=prefetch)
  it = make()
  _take(it, 3)
  state = it.get_state()
  after = _take(it, 2)
  restored = make()
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 2), after)


@pytest.mark.slow
def test_resume_with_two_workers_matches_in_process(tmp_path):
  arrays = _arrays(tmp_path)  # Memory-mapped images: workers reopen the file.
  kwargs = dict(batch_size=8, seed=1, is_labeled=True, augment_prob=0.5)
  reference = _take(pipeline.make_train_loader(arrays, np.arange(N), **kwargs), 5)
  it = pipeline.make_train_loader(arrays, np.arange(N), worker_count=2, **kwargs)
  try:
    first = _take(it, 3)
    state = it.get_state()
    after = _take(it, 2)
  finally:
    it.close()
  _assert_batches_equal(first + after, reference)  # Worker count does not change batches.
  restored = pipeline.make_train_loader(arrays, np.arange(N), worker_count=2, **kwargs)
  try:
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 2), after)
  finally:
    restored.close()


def _spawned_workers() -> set[int]:
  """The pids of this process's multiprocessing workers (Linux /proc): its children started
  by `spawn_main`, not multiprocessing's resource tracker."""
  pids = set()
  for task in os.listdir(f'/proc/{os.getpid()}/task'):
    with open(f'/proc/{os.getpid()}/task/{task}/children') as f:
      pids.update(int(p) for p in f.read().split())
  workers = set()
  for pid in pids:
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        if b'spawn_main' in f.read():
          workers.add(pid)
    except FileNotFoundError:  # Exited since.
      pass
  return workers


def test_workers_outlive_a_sigterm_their_parent_survives(tmp_path):
  """`timeout` and SLURM signal the whole process group: the workers must keep feeding
  batches until the main process, which got the same signal, stops at a step boundary."""
  arrays = _arrays(tmp_path)
  before = _spawned_workers()
  it = pipeline.make_train_loader(arrays, np.arange(N), batch_size=8, seed=1,
                                  is_labeled=True, worker_count=2)
  try:
    _take(it, 2)
    workers = _spawned_workers() - before
    assert len(workers) == 2, workers
    for pid in workers:
      os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)  # A worker killed by it would be gone by now.
    assert len(_take(it, 12)) == 12  # More batches than the workers had buffered.
  finally:
    it.close()


def test_eval_batches_in_order_padded():
  has_mask = np.ones(N, bool)
  has_mask[[5, 6]] = False
  cot = np.arange(N * 3, dtype=np.int32).reshape(N, 3)
  arrays = _arrays(has_mask=has_mask, extra={'cot_ids': cot})
  rows = np.array([9, 2, 5, 30, 31, 32, 33, 40, 41, 0, 1])
  batches = list(pipeline.make_eval_batches(arrays, rows, batch_size=4))
  assert len(batches) == 3
  assert all(b['image'].shape == (4, S, S, 3) for b in batches)  # Static shapes.
  valid = np.concatenate([b['valid'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  assert valid.tolist() == [True] * 11 + [False]
  np.testing.assert_array_equal(index[:11], rows)
  labeled = np.concatenate([b['is_labeled'] for b in batches])
  assert labeled.tolist() == [True, True, False] + [True] * 8 + [False]
  b = batches[0]
  np.testing.assert_allclose(b['image'], augment.zscore(arrays.images[rows[:4]]),
                             rtol=1e-6, atol=1e-6)  # No augmentation.
  np.testing.assert_array_equal(b['mask'][[0, 1, 3], ..., 0], arrays.masks[[9, 2, 30]])
  assert not b['mask'][2].any()  # Row 5 has no mask.
  np.testing.assert_array_equal(b['cot_ids'], cot[rows[:4]])
  _assert_batches_equal(batches, list(pipeline.make_eval_batches(arrays, rows,
                                                                 batch_size=4)))


def test_errors_name_the_problem():
  arrays = _arrays(has_mask=np.arange(N) % 2 == 0)
  with pytest.raises(ValueError, match='fewer than batch_size'):
    pipeline.make_train_loader(arrays, np.arange(0, 10, 2), batch_size=8, seed=0,
                               is_labeled=True)
  with pytest.raises(ValueError, match='without a mask'):
    pipeline.make_train_loader(arrays, np.arange(N), batch_size=8, seed=0, is_labeled=True)
  with pytest.raises(ValueError, match='cache rows'):
    list(pipeline.make_eval_batches(arrays, [0, N], batch_size=2))
  with pytest.raises(ValueError, match='masks'):
    pipeline.PipelineArrays(arrays.images, arrays.masks[:, :4], arrays.text_ids,
                            arrays.text_mask)


def test_synthetic_dataset_through_tokenizer_and_pipeline(tmp_path):
  """The H6 pieces together, without the cache: PNGs -> arrays -> tokens -> batches."""
  root = str(tmp_path / 'syn')
  synthetic.generate_synthetic(root, num_images=24, image_size=32, seed=0)
  with open(os.path.join(root, 'text.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  stems = [r['image'][:-4] for r in rows]
  images = np.stack([np.repeat(np.asarray(Image.open(
      os.path.join(root, 'frames', s + '.png')))[..., None], 3, axis=-1) for s in stems])
  masks = np.stack([(np.asarray(Image.open(os.path.join(root, 'masks', s + '.png'))) > 0)
                    .astype(np.uint8) for s in stems])
  tok = tokenize.train_wordpiece([r['text'] for r in rows], vocab_size=200,
                                 out_dir=str(tmp_path / 'tok'))
  ids, mask = tokenize.encode_texts(tok, [r['text'] for r in rows], 16)
  arrays = pipeline.PipelineArrays(images, masks, ids, mask)
  batch = next(pipeline.make_train_loader(arrays, np.arange(24), batch_size=8, seed=0,
                                          is_labeled=True))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['text_ids'].shape == (8, 16)
  np.testing.assert_array_equal(batch['text_ids'], ids[batch['index']])
  assert set(np.unique(batch['mask'])) <= {0.0, 1.0} and batch['mask'].any()
