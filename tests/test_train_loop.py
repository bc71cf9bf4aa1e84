"""Host-side pieces of the training loop that need no model."""

import dataclasses
import math
import re

import pytest

from cers_jax.training import epoch as epoch_lib
from cers_jax.training import loop as train


@dataclasses.dataclass
class _State:
  step: int = 10


def _epoch(step_fn, num_steps, *, log_every=3, refresh_seconds=60.0, stage=train.WARMUP):
  return epoch_lib.run_epoch(_State(), step_fn, stage=stage, epoch=3, num_steps=num_steps,
                             batch_images=2, desc='test', log_every=log_every,
                             refresh_seconds=refresh_seconds)


def _host_steps(values):
  values = iter(values)

  def step_fn(state):
    return dataclasses.replace(state, step=state.step + 1), {'loss': next(values)}

  return step_fn


def test_non_finite_loss_names_the_exact_step():
  with pytest.raises(train.NonFiniteLossError, match='at step 14'):
    _epoch(_host_steps([1.0, 0.5, 0.4, 0.3, float('nan'), 0.2]), 6)


def test_epoch_means_state_and_rate():
  state, record = _epoch(_host_steps([1.0, 2.0, 3.0, 4.0, 5.0]), 5, log_every=4,
                         stage=train.SEMI)
  assert state.step == 15 and record['step'] == 15
  assert record['loss'] == pytest.approx(3.0)
  assert record['stage'] == train.SEMI and record['epoch'] == 3
  assert record['images_per_s'] > 0 and record['steps_done'] == 5


class _DeviceLoss:
  """A step's loss that is computed only once `lag` more steps have been dispatched."""

  def __init__(self, step: int, dispatched: list[int], reads: dict, lag: int):
    self.step, self.dispatched, self.reads, self.lag = step, dispatched, reads, lag

  def is_ready(self) -> bool:
    return self.dispatched[0] > self.step + self.lag

  def __float__(self):
    self.reads.setdefault(self.step, self.dispatched[0])
    return 1.0 + self.step


def _device_steps(dispatched, reads, lag):
  def step_fn(state):
    loss = _DeviceLoss(dispatched[0], dispatched, reads, lag)
    dispatched[0] += 1
    return state, {'loss': loss}

  return step_fn


@pytest.mark.parametrize('log_every,num_steps,lag', [(3, 10, 1), (4, 8, 2), (1, 5, 0),
                                                     (10, 6, 1)])
def test_epoch_reads_only_computed_losses_until_the_end(log_every, num_steps, lag):
  """The host never waits on a step still running: a loss is read only once it is ready
  (here: `lag` steps after it), except at the epoch's end, which reads the rest."""
  dispatched, reads = [0], {}
  _epoch(_device_steps(dispatched, reads, lag), num_steps, log_every=log_every,
         refresh_seconds=0.0)
  assert sorted(reads) == list(range(num_steps))
  for step, dispatched_then in reads.items():
    assert dispatched_then > min(step + lag, num_steps - 1), (step, dispatched_then)


class _RecordingBar:
  """tqdm's interface as the loop uses it, remembering every postfix shown."""

  shown: list[tuple[int, dict]] = []

  def __init__(self, total, initial=0, **kwargs):
    self.n = initial

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def update(self, count):
    self.n += count

  def set_postfix(self, **values):
    self.shown.append((self.n, values))


def test_short_epochs_show_finished_values_before_the_end(monkeypatch):
  """6 steps and log_every=10 (the synthetic default's warm-up): the bar still shows the
  latest finished loss and a non-zero rate while the epoch runs."""
  monkeypatch.setattr(epoch_lib, 'tqdm', _RecordingBar)
  _RecordingBar.shown = []
  dispatched, reads = [0], {}
  _epoch(_device_steps(dispatched, reads, lag=1), 6, log_every=10, refresh_seconds=0.0)
  during = [(n, values) for n, values in _RecordingBar.shown if n < 6]
  assert during, _RecordingBar.shown
  for n, values in during:
    assert float(values['loss']) == pytest.approx(n)  # The loss of step n - 1 is 1 + n - 1.
    assert math.isfinite(float(values['img_s'])) and float(values['img_s']) > 0
  assert re.fullmatch(r'\d+\.\d{4}', _RecordingBar.shown[-1][1]['loss'])


def test_default_workdir():
  assert train.default_workdir(None, 'configs/brisc.py') == 'runs/brisc'
  assert train.default_workdir('/x', 'configs/brisc.py') == '/x'
