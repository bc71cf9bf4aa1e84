"""Tests for cers_jax.models.convnext and cers_jax.convert.convnext.

The reference is transformers' PyTorch `ConvNextModel` (same computation as torchvision's
convnext_tiny); torchvision- and timm-named state dicts are built by renaming its keys.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import ConvNextConfig, ConvNextModel

from cers_jax.convert.assign import WeightLoadError
from cers_jax.convert.convnext import convnext_weights, load_convnext
from cers_jax.models.convnext import ConvNeXt

DEPTHS = (1, 1, 2, 1)
DIMS = (8, 16, 24, 32)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture(scope='module')
def hf_model():
  torch.manual_seed(0)
  model = ConvNextModel(ConvNextConfig(hidden_sizes=list(DIMS), depths=list(DEPTHS),
                                       layer_scale_init_value=1e-6)).eval()
  # Random values everywhere (layer scales of order 1, norms away from 1/0) so every
  # tensor visibly shapes the output.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('layer_scale_parameter'):
        p.copy_(torch.rand_like(p) + 0.5)
      elif 'layernorm' in name or 'downsampling_layer.0' in name:
        p.add_(0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def hf_sd(hf_model):
  return {k: v.numpy().copy() for k, v in hf_model.state_dict().items()}


def _tiny(seed=0):
  return ConvNeXt(depths=DEPTHS, dims=DIMS, rngs=nnx.Rngs(seed))


def _flat(module):
  return {'/'.join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _to_torchvision(sd):
  """HF ConvNextModel names -> torchvision convnext names (+ its classifier)."""
  out = {}
  for k, v in sd.items():
    k2 = k
    k2 = k2.replace('embeddings.patch_embeddings.', 'features.0.0.')
    k2 = k2.replace('embeddings.layernorm.', 'features.0.1.')
    m = re.match(r'encoder\.stages\.(\d)\.downsampling_layer\.(\d)\.(.*)', k2)
    if m:
      k2 = f'features.{2 * int(m.group(1))}.{m.group(2)}.{m.group(3)}'
    m = re.match(r'encoder\.stages\.(\d)\.layers\.(\d+)\.(\w+)\.?(\w*)', k2)
    if m:
      s, b, mod, p = m.groups()
      base = f'features.{2 * int(s) + 1}.{b}'
      if mod == 'layer_scale_parameter':
        k2, v = f'{base}.layer_scale', v.reshape(-1, 1, 1)
      else:
        idx = {'dwconv': 0, 'layernorm': 2, 'pwconv1': 3, 'pwconv2': 5}[mod]
        k2 = f'{base}.block.{idx}.{p}'
    if k2.startswith('layernorm.'):
      k2 = k2.replace('layernorm.', 'classifier.0.')
    out[k2] = v
  out['classifier.2.weight'] = np.zeros((10, DIMS[-1]), np.float32)
  out['classifier.2.bias'] = np.zeros((10,), np.float32)
  return out


def _to_timm(sd):
  """HF ConvNextModel names -> timm convnext names (+ its head)."""
  out = {}
  for k, v in sd.items():
    k2 = k.replace('embeddings.patch_embeddings.', 'stem.0.')
    k2 = k2.replace('embeddings.layernorm.', 'stem.1.')
    k2 = re.sub(r'encoder\.stages\.(\d)\.downsampling_layer\.', r'stages.\1.downsample.', k2)
    k2 = re.sub(r'encoder\.stages\.(\d)\.layers\.', r'stages.\1.blocks.', k2)
    k2 = k2.replace('.dwconv.', '.conv_dw.').replace('.layernorm.', '.norm.')
    k2 = k2.replace('.pwconv1.', '.mlp.fc1.').replace('.pwconv2.', '.mlp.fc2.')
    k2 = k2.replace('.layer_scale_parameter', '.gamma')
    k2 = re.sub(r'^layernorm\.', 'head.norm.', k2)
    out[k2] = v
  out['head.fc.weight'] = np.zeros((10, DIMS[-1]), np.float32)
  return out


@pytest.mark.slow
@pytest.mark.parametrize('height,width', [(64, 64), (64, 96)])
def test_matches_transformers_convnext(hf_model, hf_sd, height, width):
  model = _tiny()
  report = load_convnext(model, hf_sd)
  assert report.ok and not report.missing
  assert set(report.ignored) == {'layernorm.weight', 'layernorm.bias'}
  x = np.random.RandomState(height + width).randn(2, 3, height, width).astype(np.float32)
  with torch.no_grad():
    hidden = hf_model(torch.from_numpy(x), output_hidden_states=True).hidden_states
  feats = jax.jit(lambda m, v: m(v))(nnx.view(model, deterministic=True),
                                     jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert len(feats) == 4
  for i, (got, want) in enumerate(zip(feats, hidden[1:])):
    want = want.numpy().transpose(0, 2, 3, 1)
    stride = 4 * 2**i
    assert got.shape == (2, height // stride, width // stride, DIMS[i])
    rel = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert rel < 1e-5, f'stage {i + 1}: relative error {rel}'


def test_torchvision_timm_and_prefixed_names_load_identically(hf_sd):
  reference = _tiny(1)
  load_convnext(reference, hf_sd)
  want = _flat(reference)
  cases = {
      'torchvision': (_to_torchvision(hf_sd), {'classifier.0.weight', 'classifier.0.bias',
                                               'classifier.2.weight', 'classifier.2.bias'}),
      'timm': (_to_timm(hf_sd), {'head.norm.weight', 'head.norm.bias', 'head.fc.weight'}),
      'hf_classifier': ({**{'convnext.' + k: v for k, v in hf_sd.items()},
                         'classifier.weight': np.zeros((3, DIMS[-1]), np.float32)},
                        {'convnext.layernorm.weight', 'convnext.layernorm.bias',
                         'classifier.weight'}),
  }
  for name, (sd, ignored) in cases.items():
    model = _tiny(2)
    report = load_convnext(model, sd)
    assert set(report.ignored) == ignored, name
    assert len(report.loaded) == len(want), name
    got = _flat(model)
    for path, arr in want.items():
      np.testing.assert_array_equal(got[path], arr, err_msg=f'{name}: {path}')


def test_converter_paths_and_layouts(hf_sd):
  w = convnext_weights(hf_sd)
  assert w['stem_conv/kernel'].shape == (4, 4, 3, DIMS[0])
  assert w['stages/2/1/dwconv/kernel'].shape == (7, 7, 1, DIMS[2])
  assert w['stages/0/0/pwconv1/kernel'].shape == (DIMS[0], 4 * DIMS[0])
  assert w['downsample_convs/0/kernel'].shape == (2, 2, DIMS[0], DIMS[1])
  np.testing.assert_array_equal(
      w['downsample_norms/2/scale'], hf_sd['encoder.stages.3.downsampling_layer.0.weight'])
  np.testing.assert_array_equal(
      w['stages/3/0/layer_scale'], hf_sd['encoder.stages.3.layers.0.layer_scale_parameter'])


@pytest.mark.slow
def test_unknown_or_missing_names_fail_strict(hf_sd):
  sd = dict(hf_sd)
  sd['encoder.stages.0.layers.0.extra.weight'] = np.zeros(3, np.float32)
  del sd['encoder.stages.2.layers.1.pwconv2.bias']
  with pytest.raises(WeightLoadError) as err:
    load_convnext(_tiny(), sd)
  assert 'encoder.stages.0.layers.0.extra.weight' in str(err.value)
  assert 'stages/2/1/pwconv2/bias' in str(err.value)
  with pytest.raises(WeightLoadError, match='no ConvNeXt'):
    load_convnext(_tiny(), {'foo.weight': np.zeros(2, np.float32)})
  # A checkpoint of another size is a shape mismatch, not a silent partial load.
  with pytest.raises(WeightLoadError, match='shape mismatch'):
    load_convnext(ConvNeXt(depths=DEPTHS, dims=(8, 16, 24, 40), rngs=nnx.Rngs(0)), hf_sd)


@pytest.mark.slow
def test_full_size_convnext_t_shapes_and_schedule():
  model = nnx.eval_shape(lambda: ConvNeXt(rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  # torchvision convnext_tiny without its classifier (LayerNorm2d + Linear(768, 1000)).
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == 27_818_592
  graphdef, state = nnx.split(nnx.view(model, deterministic=True))
  shapes = jax.eval_shape(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), state,
                          jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert [s.shape for s in shapes] == [(2, 56, 56, 96), (2, 28, 28, 192), (2, 14, 14, 384),
                                       (2, 7, 7, 768)]
  rates = [b.drop_path.rate for stage in model.stages for b in stage]
  assert len(rates) == 18
  np.testing.assert_allclose(rates, 0.1 * np.arange(18) / 17)


@pytest.mark.slow
def test_init_and_training_mode():
  model = _tiny()
  w = np.asarray(model.stages[2][0].pwconv1.kernel[...])
  assert abs(w.std() - 0.02) < 0.004
  assert not np.asarray(model.stem_conv.bias[...]).any()
  np.testing.assert_allclose(model.stages[1][0].layer_scale[...], 1e-6)
  model = ConvNeXt(depths=DEPTHS, dims=DIMS, drop_path_rate=0.5, layer_scale_init=1.0,
                   rngs=nnx.Rngs(params=0, dropout=1))
  x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32))
  a, b = model(x)[-1], model(x)[-1]
  assert not np.allclose(a, b)  # stochastic depth draws new masks
  ev = nnx.view(model, deterministic=True)
  np.testing.assert_array_equal(ev(x)[-1], ev(x)[-1])


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  model = ConvNeXt(depths=DEPTHS, dims=DIMS, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  feats = nnx.view(model, deterministic=True)(jnp.ones((1, 32, 32, 3)))
  assert all(f.dtype == jnp.bfloat16 for f in feats)
