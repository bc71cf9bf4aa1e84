"""The run's progress record: its checkpoint JSON, the preempted epoch, early stopping."""

import dataclasses
import json

import numpy as np
import pytest

from cers_jax import sharding
from cers_jax.core import progress as progress_lib
from cers_jax.core.progress import DONE, SEMI, WARMUP, Partial, Progress


def test_meta_json_round_trip_keeps_the_keys_checkpoints_have_always_had():
  progress = Progress(stage=SEMI, epoch=3, best_dice=0.7, best_epoch=2, bad_epochs=1,
                      iterators={'labeled': [{'pos': 7}]},
                      partial=Partial(SEMI, 3, steps=5, sums={'loss': 2.5}, seconds=1.5),
                      workdir='/runs/a')
  meta = json.loads(json.dumps(progress.to_meta()))
  assert set(meta) == {'stage', 'epoch', 'best_dice', 'best_epoch', 'bad_epochs',
                       'iterators', 'partial', 'workdir'}
  assert meta['partial'] == dict(stage=SEMI, epoch=3, steps=5, sums={'loss': 2.5},
                                 seconds=1.5)
  assert Progress.from_meta(meta) == progress
  # A fresh run saves no partial and no workdir until it is saved somewhere.
  assert set(Progress().to_meta()) == {'stage', 'epoch', 'best_dice', 'best_epoch',
                                       'bad_epochs', 'iterators'}
  assert Progress.from_meta({**Progress().to_meta(), 'unknown': 1}) == Progress()


def test_the_record_is_frozen_and_replace_returns_a_new_one():
  progress = Progress()
  with pytest.raises(dataclasses.FrozenInstanceError):
    progress.epoch = 1  # type: ignore[misc]
  moved = progress.replace(stage=WARMUP, epoch=2)
  assert (progress.stage, progress.epoch) == ('init', 0) and (moved.stage, moved.epoch) == (
      WARMUP, 2)
  assert progress_lib.STAGES == ('init', 'warmup', 'semi', 'done')


def test_partial_of_only_the_current_epoch_of_that_stage():
  partial = Partial(SEMI, 2, steps=4, sums={'loss': 1.0}, seconds=3.0)
  progress = Progress(stage=SEMI, epoch=2, partial=partial)
  assert progress.partial_of(SEMI) == partial
  assert partial.as_done() == dict(steps=4, sums={'loss': 1.0}, seconds=3.0)
  assert progress.partial_of(WARMUP) is None
  assert progress.replace(epoch=3).partial_of(SEMI) is None


def test_after_validation_counts_the_epoch_keeps_the_best_and_stops_early():
  progress = Progress(stage=SEMI, epoch=0)
  progress, improved, stopping = progress.after_validation(0.5, patience=2, epochs=10)
  assert improved and not stopping
  assert (progress.epoch, progress.best_dice, progress.best_epoch, progress.bad_epochs) == (
      1, 0.5, 1, 0)
  progress, improved, stopping = progress.after_validation(0.4, patience=2, epochs=10)
  assert not improved and not stopping and progress.bad_epochs == 1
  assert progress.stage == SEMI and progress.best_epoch == 1
  progress, improved, stopping = progress.after_validation(0.5, patience=2, epochs=10)
  assert not improved and stopping and progress.stage == DONE  # Equal is not better.
  # The last epoch ends the stage without early stopping.
  last, improved, stopping = Progress(stage=SEMI, epoch=4).after_validation(
      0.9, patience=5, epochs=5)
  assert improved and not stopping and last.stage == DONE and last.epoch == 5


def test_host_outputs_cuts_padding_from_the_batch_and_the_outputs():
  mesh = sharding.make_mesh(1)
  batches = [dict(index=np.array([3, 4, 0, 0]), valid=np.array([1, 1, 0, 0], bool)),
             dict(index=np.array([5, 6, 7, 8]), valid=np.ones(4, bool))]

  def step(state, batch):
    return {'doubled': batch['index'] * 2 + state, 'same': batch['index']}

  got = list(sharding.host_outputs(step, 1, batches, mesh))
  assert [b['index'].tolist() for b, _ in got] == [[3, 4], [5, 6, 7, 8]]
  assert [o['doubled'].tolist() for _, o in got] == [[7, 9], [11, 13, 15, 17]]
  assert all(isinstance(o['same'], np.ndarray) for _, o in got)
