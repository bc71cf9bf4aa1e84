"""Tests for cers_jax.convert.io (reading checkpoints), .assign (load_into) and .layout."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

from cers_jax.convert import layout
from cers_jax.convert.assign import LoadReport, WeightLoadError, load_into, nnx_paths
from cers_jax.convert.io import read_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- io -----------------------------------------------------------------------------

def test_safetensors_half_precision_becomes_float32(tmp_path):
  path = tmp_path / 'w.safetensors'
  save_torch_file({'bf': torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
                   'fp16': torch.tensor([0.5, 3.0], dtype=torch.float16),
                   'ids': torch.arange(3)}, str(path))
  sd = read_state_dict(path)
  assert sd['bf'].dtype == np.float32 and sd['fp16'].dtype == np.float32
  np.testing.assert_array_equal(sd['bf'], [1.5, -2.25])
  np.testing.assert_array_equal(sd['fp16'], [0.5, 3.0])
  assert sd['ids'].dtype == np.int64


@pytest.mark.parametrize('wrapper', [None, 'state_dict', 'model'])
def test_torch_pickles_are_unwrapped(tmp_path, wrapper):
  tensors = {'a.weight': torch.ones(2, 3), 'b': torch.zeros(4, dtype=torch.bfloat16)}
  obj = tensors if wrapper is None else {wrapper: tensors, 'epoch': 7}
  path = tmp_path / 'ckpt.pth'
  torch.save(obj, path)
  sd = read_state_dict(str(path))
  assert sorted(sd) == ['a.weight', 'b']
  assert sd['b'].dtype == np.float32
  np.testing.assert_array_equal(sd['a.weight'], np.ones((2, 3)))


def test_hf_directories(tmp_path):
  single = tmp_path / 'single'
  single.mkdir()
  save_file({'x': np.ones(2, np.float32)}, str(single / 'model.safetensors'))
  assert list(read_state_dict(single)) == ['x']

  sharded = tmp_path / 'sharded'
  sharded.mkdir()
  save_file({'a': np.ones(2, np.float32)}, str(sharded / 'model-00001-of-00002.safetensors'))
  save_file({'b': np.zeros(3, np.float32)}, str(sharded / 'model-00002-of-00002.safetensors'))
  (sharded / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {
      'a': 'model-00001-of-00002.safetensors', 'b': 'model-00002-of-00002.safetensors'}}))
  sd = read_state_dict(sharded)
  assert sorted(sd) == ['a', 'b'] and sd['b'].shape == (3,)

  pickled = tmp_path / 'pickled'
  pickled.mkdir()
  torch.save({'c': torch.ones(1)}, pickled / 'pytorch_model.bin')
  assert list(read_state_dict(pickled)) == ['c']


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere.safetensors'):
    read_state_dict(tmp_path / 'nowhere.safetensors')
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='no weights found.*model.safetensors'):
    read_state_dict(empty)
  odd = tmp_path / 'weights.npz'
  odd.write_bytes(b'')
  with pytest.raises(ValueError, match='unknown checkpoint type'):
    read_state_dict(odd)


def test_bin_without_torch_names_the_fix(tmp_path):
  path = tmp_path / 'pytorch_model.bin'
  torch.save({'c': torch.ones(1)}, path)
  script = textwrap.dedent(f"""
      import sys
      sys.modules['torch'] = None
      from cers_jax.convert.io import read_state_dict
      try:
        read_state_dict({str(path)!r})
      except ImportError as e:
        print('MESSAGE:', e)
      """)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                        env=env, timeout=120, check=False)
  assert 'MESSAGE:' in proc.stdout, proc.stderr[-2000:]
  assert str(path) in proc.stdout
  assert 'pip install torch' in proc.stdout and 'safetensors' in proc.stdout


# --- assign -------------------------------------------------------------------------

class _Net(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(4, 2, rngs=rngs), nnx.Linear(4, 5, rngs=rngs)])
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.gamma = nnx.Param(jnp.zeros(()))


def _full_weights():
  rng = np.random.RandomState(0)
  return {path: np.asarray(rng.randn(*shape), np.float32)
          for path, shape in nnx_paths(_Net(nnx.Rngs(0))).items()}


@pytest.mark.slow
def test_nnx_paths_lists_params_and_stats_but_not_rngs():
  paths = nnx_paths(_Net(nnx.Rngs(0)))
  assert paths['conv/kernel'] == (3, 3, 3, 4)
  assert paths['heads/1/kernel'] == (4, 5)
  assert paths['norm/mean'] == (4,) and paths['gamma'] == ()
  assert not [p for p in paths if 'rngs' in p]


def test_load_into_fills_everything():
  net = _Net(nnx.Rngs(1))
  weights = _full_weights()
  report = load_into(net, weights)
  assert isinstance(report, LoadReport) and report.ok
  assert len(report.loaded) == len(weights)
  np.testing.assert_array_equal(net.heads[1].kernel[...], weights['heads/1/kernel'])
  np.testing.assert_array_equal(net.norm.var[...], weights['norm/var'])
  assert float(net.gamma[...]) == float(weights['gamma'])
  assert net.conv.kernel[...].dtype == jnp.float32


def test_load_into_float64_input_keeps_param_dtype():
  net = _Net(nnx.Rngs(1))
  load_into(net, {k: v.astype(np.float64) for k, v in _full_weights().items()})
  assert net.conv.kernel[...].dtype == jnp.float32


def test_strict_failures_name_every_problem():
  weights = _full_weights()
  del weights['heads/0/bias']
  weights['heads/7/kernel'] = np.zeros((4, 2), np.float32)
  weights['conv/kernel'] = np.zeros((3, 3, 3, 5), np.float32)
  net = _Net(nnx.Rngs(2))
  before = np.asarray(net.norm.scale[...]).copy()
  with pytest.raises(WeightLoadError) as err:
    load_into(net, weights, source='ckpt.safetensors')
  msg = str(err.value)
  for needle in ('ckpt.safetensors', 'heads/0/bias', 'heads/7/kernel', 'conv/kernel',
                 '(3, 3, 3, 5)', 'missing', 'unexpected', 'shape mismatch'):
    assert needle in msg, needle
  np.testing.assert_array_equal(net.norm.scale[...], before)  # nothing loaded

  report = load_into(net, weights, strict=False, source='ckpt.safetensors')
  assert report.missing == ('heads/0/bias',)
  assert report.unexpected == ('heads/7/kernel',)
  assert [m[0] for m in report.shape_mismatch] == ['conv/kernel']
  assert len(report.loaded) == len(weights) - 2
  np.testing.assert_array_equal(net.norm.scale[...], weights['norm/scale'])
  assert np.asarray(net.conv.kernel[...]).any()  # kept its init, not the zeros


def test_error_lists_are_capped():
  weights = _full_weights()
  weights.update({f'extra/{i}': np.zeros(1, np.float32) for i in range(30)})
  with pytest.raises(WeightLoadError, match=r'unexpected in the checkpoint \(30\).*10 more'):
    load_into(_Net(nnx.Rngs(0)), weights)


# --- layout -------------------------------------------------------------------------

@pytest.mark.slow
def test_conv_and_linear_layouts_match_torch():
  x = np.random.RandomState(0).randn(2, 3, 9, 9).astype(np.float32)
  conv = torch.nn.Conv2d(3, 5, 3, padding=1)
  dw = torch.nn.Conv2d(3, 3, 7, padding=3, groups=3)
  lin = torch.nn.Linear(3, 6)
  jconv = nnx.Conv(3, 5, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
  jdw = nnx.Conv(3, 3, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=3,
                 rngs=nnx.Rngs(0))
  jlin = nnx.Linear(3, 6, rngs=nnx.Rngs(0))
  load_into(jconv, {'kernel': layout.conv_kernel(conv.weight.detach().numpy()),
                    'bias': conv.bias.detach().numpy()})
  load_into(jdw, {'kernel': layout.conv_kernel(dw.weight.detach().numpy()),
                  'bias': dw.bias.detach().numpy()})
  load_into(jlin, {'kernel': layout.linear_kernel(lin.weight.detach().numpy()),
                   'bias': lin.bias.detach().numpy()})
  xt, xj = torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))
  with torch.no_grad():
    np.testing.assert_allclose(jconv(xj), conv(xt).numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(jdw(xj), dw(xt).numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(jlin(xj), lin(xt.permute(0, 2, 3, 1)).numpy(), atol=1e-5)
  assert layout.channel_vector(np.ones((7, 1, 1))).shape == (7,)
  with pytest.raises(ValueError):
    layout.channel_vector(np.ones((7, 2)))


@pytest.mark.slow
@pytest.mark.parametrize('kdim', [None, 12])
def test_mha_from_torch_matches_nn_multihead_attention(kdim):
  e, heads = 16, 4
  torch.manual_seed(0)
  attn = torch.nn.MultiheadAttention(e, heads, batch_first=True, kdim=kdim, vdim=kdim).eval()
  with torch.no_grad():
    attn.in_proj_bias.normal_()
    attn.out_proj.bias.normal_()
  sd = {k: v.numpy() for k, v in attn.state_dict().items()}
  in_proj = (sd['in_proj_weight'] if kdim is None
             else (sd['q_proj_weight'], sd['k_proj_weight'], sd['v_proj_weight']))
  weights = layout.mha_from_torch(in_proj, sd['in_proj_bias'], sd['out_proj.weight'],
                                  sd['out_proj.bias'], num_heads=heads)
  jattn = nnx.MultiHeadAttention(heads, e, in_kv_features=kdim or e, decode=False,
                                 deterministic=True, rngs=nnx.Rngs(0))
  assert load_into(jattn, weights).ok
  rng = np.random.RandomState(1)
  q = rng.randn(2, 5, e).astype(np.float32)
  kv = rng.randn(2, 7, kdim or e).astype(np.float32)
  pad = np.zeros((2, 7), bool)
  pad[1, 4:] = True  # torch: True = ignore this key
  with torch.no_grad():
    want = attn(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv),
                key_padding_mask=torch.from_numpy(pad))[0].numpy()
  with jax.default_matmul_precision('highest'):
    got = jattn(jnp.asarray(q), jnp.asarray(kv), mask=jnp.asarray(~pad)[:, None, None, :])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mha_from_torch_packed_split_and_no_bias():
  e, heads = 8, 2
  w = np.random.RandomState(0).randn(3 * e, e).astype(np.float32)
  out_w = np.random.RandomState(1).randn(e, e).astype(np.float32)
  packed = layout.mha_from_torch(w, None, out_w, None, num_heads=heads)
  split = layout.mha_from_torch(tuple(np.split(w, 3)), None, out_w, None, num_heads=heads)
  assert sorted(packed) == ['key/kernel', 'out/kernel', 'query/kernel', 'value/kernel']
  for k in packed:
    np.testing.assert_array_equal(packed[k], split[k])
  np.testing.assert_array_equal(packed['value/kernel'][:, 1, :], w[2 * e + 4:, :].T)
  with pytest.raises(ValueError, match='num_heads'):
    layout.mha_from_torch(w, None, out_w, None, num_heads=3)
