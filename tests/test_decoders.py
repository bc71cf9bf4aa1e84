"""Tests for cers_jax/models/decoders.py against the authors' golden fixtures."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cers_jax.convert import cers_torch
from cers_jax.convert.assign import load_into
from cers_jax.models import decoders
from tests.fixture_utils import load_fixture, nhwc, rel_err


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _eval(module):
  return nnx.view(module, use_running_average=True)


def _load(module, weights, state):
  report = load_into(module, weights, ignored=cers_torch.ignored_names(state))
  assert report.ok
  return report


def _coord_gate():
  data, state = load_fixture('coord_att_gated_fusion')
  module = decoders.CoordAttGatedFusion(16, reduction=16, rngs=nnx.Rngs(0))
  report = _load(module, cers_torch.coord_gate_weights(state), state)
  assert set(report.ignored) == {'bn1.num_batches_tracked', 'out_conv.1.num_batches_tracked'}
  assert 'bn1/mean' in report.loaded and 'out_bn/var' in report.loaded
  return data, state, module


def test_coord_gate_eval_matchesload_fixture():
  data, _, module = _coord_gate()
  main, rag = _eval(module)(nhwc(data['in/main']), nhwc(data['in/rag']))
  assert rel_err(main, nhwc(data['out/y_eval'])) < 1e-5
  assert rel_err(rag, nhwc(data['out/rag_eval'])) < 1e-5


def test_coord_gate_train_mode_uses_batch_statistics():
  data, state, module = _coord_gate()
  x_main, x_rag = nhwc(data['in/main']), nhwc(data['in/rag'])
  main, rag = module(x_main, x_rag)
  assert rel_err(main, nhwc(data['out/y_train'])) < 1e-5
  assert rel_err(rag, nhwc(data['out/rag_train'])) < 1e-5
  # Running statistics moved by PyTorch's momentum 0.1 towards the batch statistics of
  # bn1's input (the pooled H and W profiles through conv1).
  z = np.concatenate([x_main, x_rag], -1)
  profiles = np.concatenate([z.mean(2, keepdims=True),
                             z.mean(1, keepdims=True).transpose(0, 2, 1, 3)], 1)
  x = np.asarray(module.conv1(profiles)).reshape(-1, 8)
  np.testing.assert_allclose(module.bn1.mean[...],
                             0.9 * state['bn1.running_mean'] + 0.1 * x.mean(0), rtol=1e-5,
                             atol=1e-6)
  # flax updates running_var with the biased batch variance (torch: unbiased, a factor
  # n/(n-1) = 28/27 here); see the module docstring.
  np.testing.assert_allclose(module.bn1.var[...],
                             0.9 * state['bn1.running_var'] + 0.1 * x.var(0), rtol=1e-5)


def _mcam_block():
  data, state = load_fixture('mcam_decoder_block')
  module = decoders.MCAMBlock(32, 16, 16, reduction=16, rngs=nnx.Rngs(0))
  _load(module, cers_torch.mcam_block_weights(state), state)
  return data, _eval(module)


def test_mcam_block_matches_fixture_with_retrieval():
  data, module = _mcam_block()
  main, rag = module(nhwc(data['in/x']), nhwc(data['in/skip']), nhwc(data['in/rag']))
  assert main.shape == (2, 8, 8, 16)
  assert rel_err(main, nhwc(data['out/main'])) < 1e-5
  assert rel_err(rag, nhwc(data['out/rag_out'])) < 1e-5


def test_mcam_block_matches_fixture_without_retrieval():
  data, module = _mcam_block()
  main, rag = module(nhwc(data['in/x']), nhwc(data['in/skip']), None)
  assert rel_err(main, nhwc(data['out/main_norag'])) < 1e-5
  assert rel_err(rag, nhwc(data['out/rag_out_norag'])) < 1e-5


def test_mcam_block_checks_skip():
  _, module = _mcam_block()
  with pytest.raises(ValueError, match='skip_channels=16'):
    module(jnp.zeros((1, 4, 4, 32)), None, None)


def test_resunet_block_matchesload_fixture():
  data, state = load_fixture('resunet_decoder_block')
  module = decoders.ResUNetBlock(32, 16, 16, rngs=nnx.Rngs(0))
  report = _load(module, cers_torch.resunet_block_weights(state), state)
  assert len(report.ignored) == 3
  y = _eval(module)(nhwc(data['in/x']), nhwc(data['in/skip']))
  assert rel_err(y, nhwc(data['out/y'])) < 1e-5


def test_unknown_torch_names_are_reported_not_dropped():
  _, state = load_fixture('resunet_decoder_block')
  state = dict(state, **{'conv3.0.weight': np.zeros((1, 1, 1, 1), np.float32)})
  weights = cers_torch.resunet_block_weights(state)
  assert 'conv3.0.weight' in weights
  report = load_into(decoders.ResUNetBlock(32, 16, 16, rngs=nnx.Rngs(0)), weights,
                     strict=False)
  assert report.unexpected == ('conv3.0.weight',)


ENC, DEC = (16, 32, 48, 64), (32, 16, 16, 8)


@pytest.fixture(scope='module')
def tiny_decoders():
  # 'rbg' keys compile their random ops faster than threefry on CPU (eager init).
  rngs = nnx.Rngs(jax.random.key(0, impl='rbg'))
  return (decoders.MCAMDecoder(ENC, DEC, reduction=16, rngs=rngs),
          decoders.ResUNetDecoder(ENC, DEC, rngs=rngs))


@nnx.jit
def _run_decoders(d_r, d_s, attended, rag):
  return d_r(attended, rag), d_r(attended, None), d_s(attended)


@pytest.mark.slow
@pytest.mark.parametrize('height,width', [(64, 64), (64, 96)])
def test_decoders_shapes(tiny_decoders, height, width):
  d_r, d_s = tiny_decoders
  keys = jax.random.split(jax.random.key(0), 5)
  attended = tuple(
      jax.random.normal(keys[i], (2, height // s, width // s, c))
      for i, (s, c) in enumerate(zip((4, 8, 16, 32), ENC)))
  rag = jax.random.normal(keys[4], (2, height // 32, width // 32, ENC[3]))
  # Deepest block first, as config.model.decoder_dims: blocks[0] consumes a4.
  assert d_r.blocks[0].conv_rag.kernel.shape == (1, 1, 64, 32)
  assert d_r.head.conv.kernel.shape == (3, 3, 16, 4)
  assert d_s.head.conv.kernel.shape == (3, 3, 8, 4)
  outs = _run_decoders(d_r, d_s, attended, rag)
  chex.assert_shape(outs, (2, height, width, 1))
  chex.assert_tree_all_finite(outs)
  # Retrieval changes D_r's output.
  assert np.abs(outs[0] - outs[1]).max() > 1e-5


def test_decoder_init():
  """Xavier-uniform weights, zero biases, BN 1/0 with running stats 0/1."""
  block = decoders.MCAMBlock(64, 0, 32, rngs=nnx.Rngs(0))
  kernel = np.asarray(block.expand_main.kernel[...])  # 1x1, 32 -> 128
  bound = np.sqrt(6 / (32 + 128))
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  assert np.all(np.asarray(block.expand_main.bias[...]) == 0)
  dw = np.asarray(block.dw_main.kernel[...])  # (7, 7, 1, 32): torch fans 49 and 32 * 49
  assert np.abs(dw).max() <= np.sqrt(6 / (49 + 32 * 49))
  bn = block.coord_gate.out_bn
  assert np.all(np.asarray(bn.scale[...]) == 1) and np.all(np.asarray(bn.bias[...]) == 0)
  assert np.all(np.asarray(bn.var[...]) == 1) and np.all(np.asarray(bn.mean[...]) == 0)


def _params(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize('coord_attention,multi_scale', [(False, True), (True, False),
                                                         (False, False)])
def test_mcam_ablations_build_what_the_paper_describes(coord_attention, multi_scale):
  """Table 3's MCAM parts: the gate becomes a 1x1 fusion, the 7x7/5x5 kernels 1x1."""
  full = decoders.MCAMBlock(24, 8, 16, rngs=nnx.Rngs(0))
  block = decoders.MCAMBlock(24, 8, 16, coord_attention=coord_attention,
                             multi_scale=multi_scale, rngs=nnx.Rngs(0))
  gate_type = decoders.CoordAttGatedFusion if coord_attention else decoders.PlainFusion
  assert isinstance(block.coord_gate, gate_type)
  kernels = {name: getattr(block, name).kernel.shape[:2]
             for name in ('dw_main', 'dw_rag', 'dw_shared')}
  assert kernels == ({'dw_main': (7, 7), 'dw_rag': (7, 7), 'dw_shared': (5, 5)}
                     if multi_scale else dict.fromkeys(kernels, (1, 1)))
  assert _params(block) < _params(full)

  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(keys[0], (2, 4, 4, 24))
  skip = jax.random.normal(keys[1], (2, 4, 4, 8))
  rag = jax.random.normal(keys[2], (2, 4, 4, 24))
  main_out, rag_out = block(x, skip, rag)
  chex.assert_shape((main_out, rag_out), (2, 8, 8, 16))
  chex.assert_tree_all_finite((main_out, rag_out))

  def loss(module, rag):
    main, r = module(x, skip, rag)
    return jnp.sum(main ** 2) + jnp.sum(r ** 2)

  param_grads, rag_grad = nnx.grad(loss, argnums=(0, 1))(block, rag)
  assert float(jnp.abs(rag_grad).max()) > 0  # The retrieval stream still reaches the output.
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(param_grads)
             if g.ndim > 1)  # Every weight matrix learns.


def test_plain_fusion_is_a_1x1_conv_of_the_sum_and_passes_rag_through():
  fusion = decoders.PlainFusion(8, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(2), 2)
  main = jax.random.normal(keys[0], (2, 5, 5, 8))
  rag = jax.random.normal(keys[1], (2, 5, 5, 8))
  out_main, out_rag = _eval(fusion)(main, rag)
  kernel = np.asarray(fusion.out_conv.kernel[...])[0, 0]  # (8, 8)
  pre = np.einsum('bhwc,cd->bhwd', np.asarray(main + rag), kernel)
  pre = pre / np.sqrt(1.0 + fusion.out_bn.epsilon)  # BN at its initial running stats 0 / 1.
  expected = 0.5 * pre * (1.0 + jax.scipy.special.erf(pre / np.sqrt(2.0)))
  np.testing.assert_allclose(out_main, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out_rag, rag)


def test_config_switches_reach_the_model_and_refuse_the_authors_weights():
  from cers_jax.errors import ConfigError
  from cers_jax.methods import cers as cers_method
  from cers_jax.models.cers import CERS
  from cers_jax.models.swin import SwinUNetDecoder
  from tests.train_helpers import tiny_config

  config = tiny_config()
  config.model.mcam.coord_attention = False
  config.model.mcam.multi_scale = False
  model = nnx.eval_shape(lambda: CERS(config.model, rngs=nnx.Rngs(0)))
  assert all(isinstance(b.coord_gate, decoders.PlainFusion) for b in model.decoder_r.blocks)
  assert model.decoder_r.blocks[0].dw_shared.kernel.shape[:2] == (1, 1)
  config.model.decoder = 'unet'
  model = nnx.eval_shape(lambda: CERS(config.model, rngs=nnx.Rngs(0)))
  assert isinstance(model.decoder_r, decoders.RetrievalUNetDecoder)
  config.model.decoder = 'swin_unet'  # tiny_config's widths (8, 16, 24, 32) do not double.
  with pytest.raises(ConfigError, match=r'encoder_dims=\(8, 16, 24, 32\)'):
    CERS(config.model, rngs=nnx.Rngs(0))
  config.model.encoder_dims = (8, 16, 32, 64)
  model = nnx.eval_shape(lambda: CERS(config.model, rngs=nnx.Rngs(0)))
  assert isinstance(model.decoder_r, SwinUNetDecoder)
  config.model.decoder = 'unet'
  config.model.checkpoint = 'cers_authors.pth'
  with pytest.raises(ConfigError,
                     match='coord_attention=False.*multi_scale=False.*decoder=unet'):
    cers_method.build_model(config.model, seed=0)


def test_unet_decoder_r_takes_the_retrieval_stream_at_the_bottleneck():
  rngs = nnx.Rngs(jax.random.key(0, impl='rbg'))
  d_r = decoders.RetrievalUNetDecoder(ENC, DEC, rngs=rngs)
  keys = jax.random.split(jax.random.key(3), 5)
  attended = tuple(jax.random.normal(keys[i], (2, 32 // s, 32 // s, c))
                   for i, (s, c) in enumerate(zip((4, 8, 16, 32), ENC)))
  rag = jax.random.normal(keys[4], (2, 1, 1, ENC[3]))
  with_rag, without = d_r(attended, rag), d_r(attended, None)
  chex.assert_shape((with_rag, without), (2, 32, 32, 1))
  assert np.abs(with_rag - without).max() > 1e-5
  # Without retrieval the bottleneck reads [a4 ; a4].
  np.testing.assert_allclose(without, d_r(attended, attended[3]), rtol=1e-6, atol=1e-6)
  assert d_r.fuse.kernel.shape == (1, 1, 2 * ENC[3], ENC[3])


def test_full_size_parameter_counts_of_each_decoder_r():
  """Beside the paper's Table 3 (48.49 M MCAM, 51.36 M U-Net); README explains the gap.

  Only D_r is built (abstractly): the rest of the full-size network is the same for all.
  """
  from configs import base
  from cers_jax.errors import ConfigError
  from cers_jax.models.cers import CERS, count_params
  from cers_jax.models.swin import SwinUNetDecoder

  model = base.get_config().model
  enc, dec = tuple(model.encoder_dims), tuple(model.decoder_dims)
  builders = {
      'mcam': lambda: decoders.MCAMDecoder(enc, dec, rngs=nnx.Rngs(0)),
      'unet': lambda: decoders.RetrievalUNetDecoder(enc, dec, rngs=nnx.Rngs(0)),
      'swin_unet': lambda: SwinUNetDecoder(enc, rngs=nnx.Rngs(0)),
      'no_coord': lambda: decoders.MCAMDecoder(enc, dec, coord_attention=False,
                                               rngs=nnx.Rngs(0)),
      'no_multi_scale': lambda: decoders.MCAMDecoder(enc, dec, multi_scale=False,
                                                     rngs=nnx.Rngs(0)),
  }
  rest = 48_728_354 - 6_741_301  # The authors' whole count (design.md section 7) less MCAM.
  totals = {name: rest + count_params(nnx.eval_shape(build), exclude=())
            for name, build in builders.items()}
  assert totals == dict(mcam=48_728_354, unet=49_829_270, swin_unet=49_923_751,
                        no_coord=47_109_350, no_multi_scale=48_641_954)
  model.decoder = 'swin'
  with pytest.raises(ConfigError, match="model.decoder='swin'"):
    CERS(model, rngs=nnx.Rngs(0))
