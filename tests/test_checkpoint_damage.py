"""A damaged checkpoint step is named and skipped; the newest intact one is restored.

A small pytree stands in for the TrainState (the manager saves any pytree), so these run
without a model.
"""

import glob
import json
import os

import numpy as np
import pytest

from cers_jax.training import checkpoints


def _state(value: float) -> dict:
  # Random, and large enough that OCDBT writes the array (compressed) to a data file,
  # not inline in its index.
  noise = np.random.default_rng(int(value)).standard_normal((64, 64))
  return {'params': {'w': noise.astype(np.float32),
                     'b': np.arange(5, dtype=np.float32) + value},
          'step': np.array(value, np.int32)}


def _saved(tmp_path, steps=(1, 2, 3)) -> checkpoints.Checkpoints:
  store = checkpoints.Checkpoints(str(tmp_path), keep=len(steps))
  for step in steps:
    store.save('latest', step, _state(step), dict(epoch=step), json.dumps({'seed': step}))
  return store


def _truncate_arrays(tmp_path, step: int, which: str = 'latest') -> list[str]:
  """Cuts every data file of the step to 10 bytes, as a partial copy or a full disk does."""
  files = glob.glob(str(tmp_path / 'checkpoints' / which / str(step) / 'state' /
                        'ocdbt.process_*' / 'd' / '*'))
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(10)
  return files


def test_a_truncated_newest_step_is_named_and_the_previous_one_restored(tmp_path, caplog):
  store = _saved(tmp_path)
  _truncate_arrays(tmp_path, 3)
  with caplog.at_level('WARNING'):
    state, meta = store.restore('latest', _state(0))
  assert meta == dict(epoch=2) and int(state['step']) == 2
  np.testing.assert_array_equal(state['params']['w'], _state(2)['params']['w'])
  [damage] = store.damaged
  assert damage.which == 'latest' and damage.step == 3
  assert damage.where.startswith('array params.') and os.path.join('latest', '3') in damage.where
  assert 'OUT_OF_RANGE' in damage.error
  assert "The 'latest' checkpoint of step 3 is damaged" in caplog.text
  assert 'newest intact one' in caplog.text
  # Nothing was deleted: the damaged step is still there for the user to inspect.
  assert store.latest_step() == 3
  store.close()


def test_a_named_step_is_not_replaced_by_another(tmp_path):
  store = _saved(tmp_path)
  _truncate_arrays(tmp_path, 3)
  with pytest.raises(Exception):
    store.restore('latest', _state(0), step=3)
  store.close()


def test_no_intact_step_left_is_one_error_listing_every_step(tmp_path):
  store = _saved(tmp_path, steps=(1, 2))
  for step in (1, 2):
    _truncate_arrays(tmp_path, step)
  with pytest.raises(checkpoints.DamagedCheckpointError) as error:
    store.restore('latest', _state(0))
  message = str(error.value)
  assert '\n' not in message
  assert "No intact 'latest' checkpoint" in message and 'Nothing was deleted' in message
  assert 'step 2 (array params.' in message and 'step 1 (array params.' in message
  assert [d.step for d in store.damaged] == [2, 1]
  store.close()


def test_a_missing_data_file_counts_as_damage(tmp_path):
  store = _saved(tmp_path)
  for path in _truncate_arrays(tmp_path, 3):
    os.remove(path)
  assert store.restore('latest', _state(0))[1] == dict(epoch=2)
  assert store.damaged[0].step == 3
  store.close()


def test_a_damaged_array_index_counts_as_damage(tmp_path):
  store = _saved(tmp_path)
  for path in glob.glob(str(tmp_path / 'checkpoints' / 'latest' / '3' / 'state' / 'd' / '*')):
    with open(path, 'r+b') as f:
      f.truncate(10)
  assert store.restore('latest', _state(0))[1] == dict(epoch=2)
  assert store.damaged[0].where.startswith('the array index of ')
  store.close()


def test_read_saved_skips_a_step_whose_json_is_unreadable(tmp_path):
  _saved(tmp_path).close()
  with open(tmp_path / 'checkpoints' / 'latest' / '3' / 'meta' / 'metadata', 'w') as f:
    f.write('{"epoch": ')  # Cut mid-way.
  assert checkpoints.read_saved(str(tmp_path)) == ({'seed': 2}, dict(epoch=2))


def test_a_read_only_store_sees_steps_saved_after_it_opened(tmp_path):
  writer = _saved(tmp_path, steps=(1,))
  reader = checkpoints.Checkpoints(str(tmp_path), read_only=True)
  writer.save('latest', 2, _state(2), dict(epoch=2), '{}')
  assert reader.restore('latest', _state(0))[1] == dict(epoch=2)
  writer.close()
  reader.close()
  empty = tmp_path / 'empty'
  reader = checkpoints.Checkpoints(str(empty), read_only=True)
  assert reader.latest_step('best') is None and not os.path.exists(empty / 'checkpoints')
  reader.close()
