"""Host-side pieces of the training loop that need no model."""

import types

import numpy as np
import pytest

from cers_jax.training import loop as train


def _fake_exp(log_every=3, step=10):
  config = types.SimpleNamespace(train=types.SimpleNamespace(log_every=log_every,
                                                             batch_size=2))
  return types.SimpleNamespace(config=config, state=types.SimpleNamespace(step=step))


def test_non_finite_loss_names_the_exact_step():
  exp = _fake_exp()
  losses = iter([1.0, 0.5, 0.4, 0.3, float('nan'), 0.2])
  with pytest.raises(train.NonFiniteLossError, match='at step 14'):
    train._run_epoch(exp, train.WARMUP, 0, 6, lambda: {'loss': next(losses)}, 'test')


def test_epoch_means_and_rate():
  exp = _fake_exp(log_every=4)
  values = iter([1.0, 2.0, 3.0, 4.0, 5.0])
  record = train._run_epoch(exp, train.SEMI, 3, 5, lambda: {'loss': next(values)}, 'test')
  assert record['loss'] == pytest.approx(3.0)
  assert record['stage'] == train.SEMI and record['epoch'] == 3
  assert record['images_per_s'] > 0


class _RecordedLoss:
  """A step's loss that remembers how many steps had been dispatched when it was read."""

  def __init__(self, step: int, dispatched: list[int], reads: dict):
    self.step, self.dispatched, self.reads = step, dispatched, reads

  def __float__(self):
    self.reads.setdefault(self.step, self.dispatched[0])
    return 1.0


@pytest.mark.parametrize('log_every,num_steps', [(3, 10), (4, 8), (1, 5)])
def test_epoch_reads_each_loss_a_whole_chunk_after_its_step(log_every, num_steps):
  """The host never waits on a just-dispatched step: a step's metrics are read only once
  the following chunk of `log_every` steps has been dispatched (or the epoch is over)."""
  exp = _fake_exp(log_every=log_every, step=0)
  dispatched, reads = [0], {}

  def step_fn():
    step = dispatched[0]
    dispatched[0] += 1
    return {'loss': _RecordedLoss(step, dispatched, reads)}

  train._run_epoch(exp, train.WARMUP, 0, num_steps, step_fn, 'test')
  assert sorted(reads) == list(range(num_steps))
  for step, dispatched_then in reads.items():
    chunk_end = (step // log_every + 1) * log_every
    assert dispatched_then >= min(chunk_end + log_every, num_steps), (step, dispatched_then)


def test_padded_row_batches():
  batches = list(train._padded_row_batches(np.arange(7), 3))
  assert [real for _, real in batches] == [3, 3, 1]
  np.testing.assert_array_equal(batches[-1][0], [6, 6, 6])


def test_default_workdir():
  assert train.default_workdir(None, 'configs/brisc.py') == 'runs/brisc'
  assert train.default_workdir('/x', 'configs/brisc.py') == '/x'
