"""Tests for cers_jax/convert/cers_torch.py: the authors' whole-model state dict.

The manifest tests/fixtures/cers_torch_state_dict.json (a copy of
shared/reference/cers_torch_state_dict.json) lists every tensor name and shape of the
authors' model; a random state dict built from it must load into the full-size CERS with
nothing missing or left over. The per-module numerics are checked against the golden
fixtures in test_fusion.py and test_decoders.py.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from cers_jax.convert import cers_torch
from cers_jax.convert.assign import WeightLoadError
from cers_jax.models import cers
from configs import base

pytestmark = pytest.mark.slow  # The authors' full-size state dict.

MANIFEST = os.path.join(os.path.dirname(__file__), 'fixtures', 'cers_torch_state_dict.json')


@pytest.fixture(scope='module')
def authors_sd():
  with open(MANIFEST) as f:
    shapes = json.load(f)['state_dict']
  rng = np.random.default_rng(0)
  sd = {}
  for name, shape in shapes.items():
    if name.endswith('num_batches_tracked'):
      sd[name] = np.asarray(7, np.int64)
    else:
      sd[name] = rng.standard_normal(shape, dtype=np.float32)
  return sd


@pytest.fixture(scope='module')
def full_model():
  """The default (paper-size) CERS, abstract until loaded (nothing allocated).

  Shared by the tests: a failing strict load changes nothing, and loading twice is fine.
  """
  cfg = base.get_config().model
  return nnx.eval_shape(lambda: cers.CERS(cfg, rngs=nnx.Rngs(0)))


def _value(model, path):
  obj = model
  for part in path.split('/'):
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  return np.asarray(obj[...])


def test_manifest_exact_state_dict_loads_strictly(authors_sd, full_model, tmp_path):
  # Through a safetensors file, as a user would (read_state_dict, no torch).
  path = os.fspath(tmp_path / 'cers.safetensors')
  save_file(authors_sd, path)
  model = full_model
  report = cers_torch.load_authors_checkpoint(model, path)
  assert report.ok
  assert not report.missing and not report.unexpected and not report.shape_mismatch
  counters = [k for k in authors_sd if k.endswith('num_batches_tracked')]
  assert sorted(report.ignored) == sorted(counters) and len(counters) == 22
  # Every tensor of the manifest landed somewhere: one nnx variable per torch tensor,
  # except the packed attention in-projections (6 variables each: q/k/v kernels + biases
  # from 2 tensors) and the out-projections (unchanged count).
  n_mha = sum(1 for k in authors_sd if k.endswith('in_proj_weight'))
  assert len(report.loaded) == len(authors_sd) - len(counters) + 4 * n_mha
  # Spot checks of layouts and destinations.
  sd = authors_sd
  np.testing.assert_array_equal(
      _value(model, 'encoder/downsample_convs/0/kernel'),
      sd['encoder.stage2.0.1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_value(model, 'encoder/stages/2/4/layer_scale'),
                                sd['encoder.stage3.1.4.layer_scale'].reshape(-1))
  np.testing.assert_array_equal(
      _value(model, 'text_encoder/word_embeddings/embedding'),
      sd['text_encoder.bert.embeddings.word_embeddings.weight'])
  w = sd['cross_attns.2.mha.in_proj_weight']
  np.testing.assert_array_equal(_value(model, 'cross_attns/2/mha/value/kernel'),
                                w[512:].T.reshape(256, 8, 32))
  np.testing.assert_array_equal(_value(model, 'cross_attns/2/gamma'),
                                sd['cross_attns.2.gamma'])
  np.testing.assert_array_equal(_value(model, 'fusion/gate/kernel'),
                                sd['fusion_module.gate.0.weight'].T)
  # decoder_left4 is the deepest block, blocks[0]; BN running stats -> BatchStat.
  np.testing.assert_array_equal(_value(model, 'decoder_r/blocks/0/coord_gate/bn1/var'),
                                sd['decoder_left4.CAGF.bn1.running_var'])
  np.testing.assert_array_equal(_value(model, 'decoder_r/blocks/3/dw_shared/kernel'),
                                sd['decoder_left1.out_conv_shared_1.weight']
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_value(model, 'decoder_r/head/out/kernel'),
                                sd['final_conv_left.3.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_value(model, 'decoder_s/blocks/1/shortcut_bn/mean'),
                                sd['decoder_right3.shortcut.1.running_mean'])
  np.testing.assert_array_equal(_value(model, 'decoder_s/head/bn/scale'),
                                sd['final_conv_right.1.weight'])
  assert isinstance(model.decoder_s.head.bn.mean, nnx.BatchStat)
  # The parts the authors' model lacks keep their (abstract) initialisation.
  assert isinstance(model.alignment.image_proj.kernel.get_value(), jax.ShapeDtypeStruct)
  assert isinstance(model.cot_encoder.word_embeddings.embedding.get_value(),
                    jax.ShapeDtypeStruct)


def test_missing_tensor_fails_naming_it(authors_sd, full_model):
  sd = dict(authors_sd)
  del sd['decoder_left2.CAGF.conv_h.weight']
  with pytest.raises(WeightLoadError, match='decoder_r/blocks/2/coord_gate/conv_h/kernel'):
    cers_torch.load_authors_checkpoint(full_model, sd)


def test_extra_tensor_fails_naming_it(authors_sd, full_model):
  sd = dict(authors_sd)
  sd['decoder_left1.extra_proj.weight'] = np.zeros((4, 4), np.float32)
  sd['clip_head.weight'] = np.zeros((4, 4), np.float32)
  with pytest.raises(WeightLoadError) as err:
    cers_torch.load_authors_checkpoint(full_model, sd)
  assert 'decoder_left1.extra_proj.weight' in str(err.value)
  assert 'clip_head.weight' in str(err.value)


def test_misshaped_tensor_fails_naming_it(authors_sd, full_model):
  sd = dict(authors_sd)
  sd['fusion_module.out_proj.weight'] = np.zeros((768, 384, 1, 1), np.float32)
  with pytest.raises(WeightLoadError, match='fusion/out_proj/kernel'):
    cers_torch.load_authors_checkpoint(full_model, sd)


def test_absent_parts_reported_only_when_asked(authors_sd, full_model):
  with pytest.raises(WeightLoadError, match='alignment/image_proj/kernel'):
    cers_torch.load_authors_checkpoint(full_model, authors_sd, include_absent=True)
  report = cers_torch.load_authors_checkpoint(full_model, authors_sd, strict=False,
                                              include_absent=True)
  assert report.missing
  assert {m.split('/')[0] for m in report.missing} == {'alignment', 'cot_encoder'}
  assert not report.unexpected and not report.shape_mismatch


def test_cers_weights_names(authors_sd):
  weights = cers_torch.cers_weights(authors_sd)
  tops = {k.split('/')[0] for k in weights}
  assert tops == set(cers_torch.AUTHORS_SUBMODULES)
  assert 'encoder/stem_conv/kernel' in weights
  assert weights['encoder/stem_conv/kernel'].shape == (4, 4, 3, 96)
  assert weights['text_encoder/layers/11/attention/query/kernel'].shape == (768, 12, 64)
  assert not any(k.endswith('num_batches_tracked') for k in weights)
  # A BERT pooler in the checkpoint is skipped and reported, not unexpected.
  sd = dict(authors_sd)
  sd['text_encoder.bert.pooler.dense.weight'] = np.zeros((768, 768), np.float32)
  assert 'text_encoder.bert.pooler.dense.weight' in cers_torch.ignored_names(sd)
  assert len(cers_torch.cers_weights(sd)) == len(weights)


def test_authors_pool_rows_become_our_feature_maps():
  """Their pool rows flatten NCHW f4 maps, (C, h, w) order; ours keep (h, w, C) maps."""
  rng = np.random.default_rng(0)
  ours = rng.standard_normal((5, 2, 3, 4)).astype(np.float32)  # (N, h, w, C)
  theirs = ours.transpose(0, 3, 1, 2).reshape(5, -1)  # torch: f4.flatten(1) of NCHW.
  converted = cers_torch.authors_pool_feat(theirs, (2, 3, 4))
  np.testing.assert_array_equal(converted, ours)
  assert not np.array_equal(theirs.reshape(5, 2, 3, 4), ours)  # A plain reshape is wrong.
  # Cosines between rows, hence image retrieval, do not depend on the order.
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(unit(theirs) @ unit(theirs).T,
                             unit(ours.reshape(5, -1)) @ unit(ours.reshape(5, -1)).T,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r'not \(N, C\*h\*w\) = \(N, 24\)'):
    cers_torch.authors_pool_feat(theirs[:, :-1], (2, 3, 4))
