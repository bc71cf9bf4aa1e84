"""configs/base.py's resume classes: one for every field, and the same ones workdir.py kept.

The rules themselves (what each class may change in which mode) are in test_workdir.py.
"""

import pytest

from cers_jax.training import workdir
from configs import base
from tests.test_configs import _leaves

# workdir.py's own registries before the classes moved beside the fields (issue 21).
FIXED = (
    'seed', 'data.layout', 'data.root', 'data.text_csv', 'data.cot_mask_csv',
    'data.cot_no_mask_csv', 'data.cache_dir', 'data.image_size', 'data.split_protocol',
    'data.split_ratios', 'data.val_fraction', 'data.labeled_fraction', 'data.group_regex',
    'data.max_text_len', 'data.max_cot_len', 'synthetic.num_images', 'synthetic.image_size',
    'tokenizer.text_dir', 'tokenizer.cot_dir', 'tokenizer.vocab_size', 'pool.cot_space')
MODEL_FREE = (
    'model.encoder_weights', 'model.text.weights', 'model.cot.weights', 'model.checkpoint',
    'model.layer_scale_init', 'model.logit_scale_init', 'model.compute_dtype',
    'model.drop_path_rate', 'model.text.dropout', 'model.cot.dropout', 'model.fusion_dropout')
DERIVED = ('model.text.vocab_size', 'model.cot.vocab_size')
RETRIEVAL = ('pool.mode', 'pool.k_coarse', 'pool.k', 'pool.exclude_self', 'pool.momentum',
             'pool.update_rule', 'pool.centre_cot')
TRAINING = ('train.batch_size', 'data.num_workers')


def _before(field):
  """workdir._kind as it was: the registries above, model.* fixed unless MODEL_FREE."""
  for kind, names in (('derived', DERIVED), ('retrieval', RETRIEVAL),
                      ('training', TRAINING)):
    if field in names:
      return kind
  if field in FIXED or (field.startswith('model.') and field not in MODEL_FREE):
    return 'fixed'
  return 'free'


def test_every_field_is_declared_once_and_every_declaration_is_a_field():
  fields = list(_leaves(base.get_config().to_dict()))
  assert len(fields) == len(set(fields)) > 100
  assert set(base.RESUME) == set(fields)  # _resume refuses a field declared twice.
  assert set(base.RESUME.values()) == set(base.CLASSES)


def test_a_field_declared_twice_is_refused():
  base.get_config()
  with pytest.raises(ValueError, match='declared both'):
    base._resume('pool', free=('k',))
  with pytest.raises(ValueError, match='Resume class'):
    base._resume('pool', sometimes=('k',))
  assert base.resume_class('pool.k') == 'retrieval'


@pytest.mark.parametrize('field, kind', [
    ('seed', 'fixed'), ('data.image_size', 'fixed'), ('data.split_ratios', 'fixed'),
    ('tokenizer.vocab_size', 'fixed'), ('model.encoder_dims', 'fixed'),
    ('model.text.num_layers', 'fixed'), ('model.cot.pooling', 'fixed'),
    ('model.scan_blocks', 'fixed'), ('pool.cot_space', 'fixed'),
    ('pool.cot_source', 'pool_build'),
    ('data.nifti.window', 'fixed'), ('data.nifti.axis', 'fixed'),
    ('pool.mode', 'retrieval'), ('pool.k', 'retrieval'), ('pool.update_rule', 'retrieval'),
    ('train.batch_size', 'training'), ('data.num_workers', 'training'),
    ('model.text.vocab_size', 'derived'), ('model.cot.vocab_size', 'derived'),
    ('train.epochs', 'free'), ('train.learning_rate', 'free'), ('model.compute_dtype', 'free'),
    ('model.checkpoint', 'free'), ('data.zoom_prob', 'free'), ('pool.shard_rows', 'free'),
    ('eval.surface', 'free'), ('eval.bootstrap_resamples', 'free'), ('checkpoint.keep', 'free'),
    ('mesh.data_parallel', 'free'),
])
def test_representative_fields(field, kind):
  assert base.resume_class(field) == workdir._kind(field) == kind


def test_every_field_keeps_its_class_from_before():
  """Fields the old registries named, and every other field but the new data.nifti.*
  (fixed now: prepare decodes the cache anew when they differ) and the new `method` and
  `train.optimizer` (fixed: they decide the train state's structure), `pool.cot_source`
  (pool_build: it decides the pool's CoT rows, built again where it may change),
  `model.depthwise` (free: it chooses the arithmetic only, as compute_dtype) and the new
  `data.labeled_count` and `data.split_file` (fixed: they decide the split), keep their
  class."""
  config_fields = set(_leaves(base.get_config().to_dict()))
  assert set(FIXED + MODEL_FREE + DERIVED + RETRIEVAL + TRAINING) <= config_fields
  changed = {f: (_before(f), workdir._kind(f)) for f in sorted(config_fields)
             if _before(f) != workdir._kind(f)}
  assert changed == {'method': ('free', 'fixed'), 'train.optimizer': ('free', 'fixed'),
                     'pool.cot_source': ('free', 'pool_build'),
                     'model.depthwise': ('fixed', 'free'),
                     'data.labeled_count': ('free', 'fixed'),
                     'data.split_file': ('free', 'fixed'),
                     **{f'data.nifti.{name}': ('free', 'fixed')
                        for name in ('axis', 'window', 'percentiles', 'empty_margin')}}


def test_undeclared_fields_follow_the_old_default():
  """A field a custom config file adds: fixed under model.*, free elsewhere."""
  assert base.resume_class('model.new_width') == 'fixed'
  assert base.resume_class('train.new_knob') == 'free'
