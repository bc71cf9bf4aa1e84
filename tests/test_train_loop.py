"""Host-side pieces of the training loop that need no model."""

import types

import numpy as np
import pytest

from cers_jax import train


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


def test_padded_row_batches():
  batches = list(train._padded_row_batches(np.arange(7), 3))
  assert [real for _, real in batches] == [3, 3, 1]
  np.testing.assert_array_equal(batches[-1][0], [6, 6, 6])


def test_default_workdir():
  assert train.default_workdir(None, 'configs/brisc.py') == 'runs/brisc'
  assert train.default_workdir('/x', 'configs/brisc.py') == '/x'
