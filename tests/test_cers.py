"""Tests for cers_jax/models/cers.py: shapes, modes, gradients, parameter count."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cers_jax.models import cers
from cers_jax.models import layers
from configs import base

pytestmark = pytest.mark.slow  # Full-size and tiny cers models, compiled forward and backward passes.

K = 3  # Reference cases per query in these tests.


def tiny_config(compute_dtype='float32'):
  cfg = base.get_config().model
  cfg.encoder_depths = (1, 1, 1, 1)
  cfg.encoder_dims = (16, 32, 48, 64)
  cfg.attn_dim = 32
  cfg.decoder_dims = (32, 16, 16, 8)
  cfg.embed_dim = 16
  cfg.compute_dtype = compute_dtype
  for section in (cfg.text, cfg.cot):
    section.vocab_size = 100
    section.hidden_size = 32
    section.num_layers = 1
    section.num_heads = 2
    section.intermediate_size = 64
    section.max_position = 64
  return cfg


def _inputs(height, width, *, batch=2, length=7, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  image = jax.random.normal(keys[0], (batch, height, width, 3))
  ids = jax.random.randint(keys[1], (batch, length), 1, 100)
  mask = jnp.ones((batch, length), jnp.int32).at[0, 4:].set(0)
  retrieved = jax.random.normal(keys[2], (batch, K, height // 32, width // 32, 64))
  return image, ids, mask, retrieved


def _rngs(params=0, dropout=1):
  # 'rbg' keys compile their random ops several times faster than threefry on CPU, which
  # dominates eager initialisation here; the model takes any key implementation.
  return nnx.Rngs(params=jax.random.key(params, impl='rbg'),
                  dropout=jax.random.key(dropout, impl='rbg'))


@pytest.fixture(scope='module')
def tiny_model():
  return cers.CERS(tiny_config(), rngs=_rngs())


@pytest.mark.parametrize('height,width', [(64, 64), (64, 96)])
def test_forward_shapes(tiny_model, height, width):
  image, ids, mask, retrieved = _inputs(height, width)

  def both(model):
    return model(image, ids, mask, retrieved), model(image, ids, mask)

  for logits_r, logits_s, f4 in nnx.eval_shape(both, tiny_model):
    assert logits_r.shape == logits_s.shape == (2, height, width, 1)
    assert logits_r.dtype == logits_s.dtype == jnp.float32
    assert f4.shape == (2, height // 32, width // 32, 64)


@nnx.jit
def _eval_outputs(model, image, ids, mask, retrieved):
  encoded = model.encode(image, ids, mask)
  f4 = encoded.features[3]
  return {
      'with': model.decode(encoded, retrieved),
      'without': model.decode(encoded, None),
      'features': encoded.features,
      'attended': encoded.attended,
      'image_emb': model.image_embedding(f4),
      'cot_cls': model.cot_features(ids, mask),
      'cot_emb': model.cot_embedding(model.cot_features(ids, mask)),
  }


def test_eval_mode_outputs(tiny_model):
  model = nnx.view(tiny_model, deterministic=True, use_running_average=True)
  image, ids, mask, retrieved = _inputs(64, 96)
  out = _eval_outputs(model, image, ids, mask, retrieved)
  chex.assert_shape(list(out['features']),
                    [(2, 16, 24, 16), (2, 8, 12, 32), (2, 4, 6, 48), (2, 2, 3, 64)])
  chex.assert_trees_all_equal_shapes_and_dtypes(out['attended'], out['features'])
  logits = [*out['with'], *out['without']]
  chex.assert_shape(logits, (2, 64, 96, 1))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  # Retrieval enters D_r only.
  assert np.abs(out['with'][0] - out['without'][0]).max() > 1e-5
  np.testing.assert_array_equal(out['with'][1], out['without'][1])
  # Deterministic: the same call gives the same numbers.
  again = _eval_outputs(model, image, ids, mask, retrieved)
  chex.assert_trees_all_equal(out['with'], again['with'])
  # Unit-norm embeddings; the CLIP logit scale starts at log(1/0.07).
  chex.assert_shape([out['image_emb'], out['cot_emb'], out['cot_cls']],
                    [(2, 16), (2, 16), (2, 32)])
  np.testing.assert_allclose(np.linalg.norm(out['image_emb'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out['cot_emb'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(model.alignment.logit_scale[...], np.log(1 / 0.07), rtol=1e-6)


def test_depthwise_switch_reaches_every_depthwise_layer_and_keeps_parameters(tiny_model):
  """config.model.depthwise='shift' sets every depthwise layer (the ConvNeXt blocks', MCAM's)
  to shifted multiply-adds and leaves the parameter tree as it is (the layers' outputs and
  gradients against the grouped form: tests/test_layers.py)."""
  cfg = tiny_config()
  cfg.depthwise = 'shift'
  shifted = cers.CERS(cfg, rngs=_rngs())
  impls = {path: module.impl for path, module in nnx.iter_graph(shifted)
           if isinstance(module, layers.DepthwiseConv)}
  assert len(impls) == sum(cfg.encoder_depths) + 3 * len(cfg.decoder_dims), impls
  assert set(impls.values()) == {'shift'}
  assert {m.impl for _, m in nnx.iter_graph(tiny_model)
          if isinstance(m, layers.DepthwiseConv)} == {'conv'}  # The default.
  chex.assert_trees_all_equal(nnx.state(tiny_model, nnx.Param),
                              nnx.state(shifted, nnx.Param))
  cfg.depthwise = 'fast'
  with pytest.raises(ValueError, match='model.depthwise'):
    cers.CERS(cfg, rngs=_rngs())


def _loss(model, image, ids, mask, retrieved):
  logits_r, logits_s, f4 = model(image, ids, mask, retrieved)
  img = model.image_embedding(f4)
  cot = model.cot_embedding(model.cot_features(ids, mask))
  loss = (jnp.mean(jax.nn.sigmoid(logits_r)) + jnp.mean(jax.nn.sigmoid(logits_s))
          - jnp.mean(jnp.sum(img * cot, -1)))
  return loss, logits_r


_train_grads = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))


def test_train_mode_grads_and_dropout(tiny_model):
  image, ids, mask, retrieved = _inputs(64, 64)
  model_a, model_b = nnx.clone(tiny_model), nnx.clone(tiny_model)
  # gamma starts at 0, which would cut the text encoder off from the gradient.
  for model in (model_a, model_b):
    for att in model.cross_attns:
      att.gamma[...] = jnp.full((1,), 0.5)
  # Same key implementation as _rngs, so the second call reuses the compiled step.
  nnx.reseed(model_b, dropout=jax.random.key(11, impl='rbg'))
  (_, logits_a), grads = _train_grads(model_a, image, ids, mask, retrieved)
  (_, logits_b), _ = _train_grads(model_b, image, ids, mask, retrieved)
  # Same parameters and batch, different dropout streams -> different logits (dropout in
  # the text BERT and the fusion attention, stochastic depth in the encoder).
  assert np.abs(logits_a - logits_b).max() > 1e-4

  flat = {'/'.join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
  assert all(np.isfinite(g).all() for g in flat.values())

  def total(prefix):
    return sum(float(np.abs(g).sum()) for k, g in flat.items() if k.startswith(prefix))

  for prefix in ('decoder_r/blocks/0', 'decoder_r/head', 'decoder_s/blocks/3',
                 'decoder_s/head', 'fusion/', 'cross_attns/0', 'encoder/stem_conv',
                 'text_encoder/', 'alignment/image_proj', 'alignment/cot_proj'):
    assert total(prefix) > 0, prefix
  # The CoT BERT is frozen by default (config.model.cot.trainable=False).
  assert total('cot_encoder/') == 0
  # Train mode updated the BatchNorm running statistics.
  assert not np.allclose(model_a.decoder_s.head.bn.mean[...], 0.0)


def test_rejects_bad_image_size(tiny_model):
  image, ids, mask, _ = _inputs(64, 64)
  with pytest.raises(ValueError, match='divisible by 32'):
    tiny_model.encode(image[:, :48], ids, mask)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = tiny_config('bfloat16')
  image, ids, mask, retrieved = _inputs(64, 64)

  def build_and_run():
    model = cers.CERS(cfg, rngs=nnx.Rngs(0))
    return model, model(image, ids, mask, retrieved)

  model, (lr, ls, f4) = nnx.eval_shape(build_and_run)
  dtypes = {v.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert lr.dtype == ls.dtype == jnp.float32
  assert f4.dtype == jnp.bfloat16


@pytest.fixture(scope='module')
def full_model():
  """The default (paper-size) model, abstract: shapes only, nothing allocated."""
  cfg = base.get_config().model
  return nnx.eval_shape(lambda: cers.CERS(cfg, rngs=nnx.Rngs(0)))


def test_full_model_parameter_count(full_model):
  # The authors' count (shared/reference/cers_torch_state_dict.json 'about').
  assert cers.count_params(full_model) == 48_728_354
  assert cers.count_params(full_model, exclude=('cot_encoder', 'alignment')) == 157_620_002


def test_full_model_output_shapes_at_224(full_model):
  image = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  retrieved = jax.ShapeDtypeStruct((2, 5, 7, 7, 768), jnp.float32)
  lr, ls, f4 = nnx.eval_shape(lambda m, *a: m(*a), full_model, image, ids, ids, retrieved)
  assert lr.shape == ls.shape == (2, 224, 224, 1)
  assert f4.shape == (2, 7, 7, 768)
