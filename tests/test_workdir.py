"""Tests for cers_jax/workdir.py: which config changes a checkpoint can go on with.

The same rules through the real CLI, on real checkpoints (refused data, model, retrieval
and batch-size changes; scripts/ablate.py table2's pool mode after one warm-up), are checked
in test_end_to_end.py.
"""

import pytest

from cers_jax.training import workdir
from cers_jax.errors import WorkdirError
from configs import base

WARMED_UP = dict(stage='semi', epoch=0)  # Right after the pool build.
MID_SEMI = dict(stage='semi', epoch=3)
PREEMPTED = dict(stage='semi', epoch=0, partial=dict(stage='semi', epoch=0, steps=2))
DONE = dict(stage='done', epoch=10)
IN_WARMUP = dict(stage='warmup', epoch=1)


def _config(**overrides):
  config = base.get_config()
  config.data.cache_dir = '/runs/a/data'
  for path, value in overrides.items():
    *sections, field = path.split('.')
    node = config
    for part in sections:
      node = node[part]
    node[field] = value
  return config.to_dict()


def _refused(mode, meta, **overrides):
  changes = workdir.compare(_config(), {'workdir': '/runs/a'}, _config(**overrides),
                            '/runs/a')
  assert set(changes) == set(overrides)
  return set(workdir.refused_changes(changes, mode, meta))


@pytest.mark.parametrize('mode', ['prepare', 'warmup', 'train', 'all', 'eval', 'predict',
                                  'retrieval'])
@pytest.mark.parametrize('meta', [IN_WARMUP, WARMED_UP, MID_SEMI, DONE])
def test_data_parameters_and_pool_shape_are_refused_everywhere(mode, meta):
  fields = {'data.image_size': 48, 'model.encoder_dims': (8, 16, 24, 48), 'seed': 3,
            'model.text.num_layers': 2, 'pool.cot_space': 'features',
            'data.labeled_fraction': 0.5, 'tokenizer.vocab_size': 100}
  assert _refused(mode, meta, **fields) == set(fields)


@pytest.mark.parametrize('mode', ['warmup', 'train', 'all', 'eval', 'predict', 'retrieval'])
@pytest.mark.parametrize('meta', [IN_WARMUP, WARMED_UP, MID_SEMI, DONE])
def test_schedule_logging_evaluation_and_initial_weights_may_change(mode, meta):
  assert not _refused(mode, meta, **{
      'train.epochs': 3, 'train.stop_after_epochs': 1, 'train.log_every': 1,
      'train.learning_rate': 0.1, 'eval.split': 'test', 'eval.which': 'latest',
      'eval.predict_dir': '/new/images', 'checkpoint.keep': 5, 'model.checkpoint': '/x.pth',
      'model.compute_dtype': 'bfloat16', 'data.zoom_prob': 0.5})


RETRIEVAL = {'pool.mode': 'image', 'pool.k_coarse': 20, 'pool.k': 2,
             'pool.update_rule': 'epoch_refresh'}


@pytest.mark.parametrize('mode', ['train', 'all'])
def test_retrieval_settings_may_change_until_retrieval_has_trained(mode):
  assert not _refused(mode, IN_WARMUP, **RETRIEVAL)
  assert not _refused(mode, WARMED_UP, **RETRIEVAL)  # scripts/ablate.py table2
  assert _refused(mode, MID_SEMI, **RETRIEVAL) == set(RETRIEVAL)
  assert _refused(mode, PREEMPTED, **RETRIEVAL) == set(RETRIEVAL)
  assert not _refused(mode, DONE, **RETRIEVAL)  # Nothing left to train.


@pytest.mark.parametrize('mode', ['train', 'all', 'warmup'])
def test_the_pools_cot_may_change_only_where_training_builds_the_pool_again(mode):
  """During warm-up and right after it (CERS rebuilds the CoT tables and the pool:
  scripts/ablate.py cot_source); never once the pool has been retrieved from."""
  source = {'pool.cot_source': 'no_mask'}
  assert not _refused(mode, IN_WARMUP, **source)
  if mode == 'warmup':  # Warm-up alone does not go on past the pool build.
    assert _refused(mode, WARMED_UP, **source) == set(source)
  else:
    assert not _refused(mode, WARMED_UP, **source)
  for meta in (MID_SEMI, PREEMPTED, DONE):
    assert _refused(mode, meta, **source) == set(source)


@pytest.mark.parametrize('mode', ['eval', 'predict', 'retrieval'])
@pytest.mark.parametrize('meta', [IN_WARMUP, WARMED_UP, MID_SEMI, DONE])
def test_modes_that_do_not_train_read_the_pool_as_it_was_built(mode, meta):
  """They would use the checkpoint's pool, not the flag: refused, even where retrieval
  settings are not. ('retrieval' in warm-up trains the warm-up to its end: allowed.)"""
  refused = _refused(mode, meta, **{'pool.cot_source': 'no_mask'})
  assert refused == (set() if mode == 'retrieval' and meta is IN_WARMUP
                     else {'pool.cot_source'})


@pytest.mark.parametrize('mode', ['eval', 'predict', 'retrieval', 'warmup'])
def test_modes_that_do_not_train_may_retrieve_otherwise(mode):
  assert not _refused(mode, MID_SEMI, **RETRIEVAL, **{'train.batch_size': 4})


def test_batch_size_and_workers_are_refused_where_training_goes_on():
  iterators = {'train.batch_size': 4, 'data.num_workers': 2}
  assert _refused('train', MID_SEMI, **iterators) == set(iterators)
  assert _refused('warmup', IN_WARMUP, **iterators) == set(iterators)
  assert not _refused('all', DONE, **iterators)
  assert not _refused('eval', MID_SEMI, **iterators)


def test_a_copied_workdir_compares_its_own_paths():
  """cp -r of a run: paths inside the old workdir match the same paths in the new one."""
  saved = _config(**{'data.root': '/runs/a/synthetic', 'data.cache_dir': '/runs/a/data'})
  now = _config(**{'data.root': '/runs/b/synthetic', 'data.cache_dir': '/runs/b/data'})
  assert not workdir.compare(saved, {'workdir': '/runs/a'}, now, '/runs/b')
  # Checkpoints that predate meta['workdir']: found from the default cache folder.
  assert not workdir.compare(saved, {}, now, '/runs/b')
  moved = _config(**{'data.root': '/data/other', 'data.cache_dir': '/runs/b/data'})
  assert set(workdir.compare(saved, {}, moved, '/runs/b')) == {'data.root'}


def test_ensure_writable(tmp_path):
  workdir.ensure_writable(str(tmp_path / 'new' / 'run'), '--workdir')
  assert (tmp_path / 'new' / 'run').is_dir()
  (tmp_path / 'file').write_text('x')
  with pytest.raises(WorkdirError, match='is a file, not a directory'):
    workdir.ensure_writable(str(tmp_path / 'file'), '--workdir')
