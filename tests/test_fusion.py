"""Tests for cers_jax/models/fusion.py against the authors' golden fixtures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cers_jax.convert import cers_torch
from cers_jax.convert.assign import load_into
from cers_jax.models import fusion
from tests.fixture_utils import load_fixture, nhwc, rel_err


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _loaded_text_attention():
  data, state = load_fixture('cross_attention_block')
  module = fusion.TextCrossAttention(24, 32, 16, 4, rngs=nnx.Rngs(0))
  report = load_into(module, cers_torch.text_cross_attention_weights(state, num_heads=4))
  assert report.ok and not report.ignored
  return data, module


def test_text_cross_attention_matchesload_fixture():
  data, module = _loaded_text_attention()
  y = module(nhwc(data['in/feat']), data['in/text'], data['in/text_mask'])
  assert rel_err(y, nhwc(data['out/y'])) < 1e-5


def test_text_cross_attention_ignores_padding_tokens():
  data, module = _loaded_text_attention()
  mask = data['in/text_mask']
  assert (mask == 0).any(), 'the fixture should contain padding'
  text = data['in/text'].copy()
  text[mask == 0] = 1e3 * np.random.default_rng(0).normal(size=text[mask == 0].shape)
  feat = nhwc(data['in/feat'])
  np.testing.assert_allclose(module(feat, text, mask),
                             module(feat, data['in/text'], mask), rtol=1e-5, atol=1e-5)
  # ... while a real token does change the output.
  text = data['in/text'].copy()
  text[0, 0] += 1.0
  assert np.abs(module(feat, text, mask) - module(feat, data['in/text'], mask)).max() > 1e-4


@pytest.mark.slow
def test_text_cross_attention_starts_as_layer_norm():
  """gamma is initialised to 0, so a fresh block is LayerNorm(f)."""
  module = fusion.TextCrossAttention(8, 12, 16, 2, rngs=nnx.Rngs(1))
  feat = jax.random.normal(jax.random.key(0), (2, 4, 3, 8))
  text = jax.random.normal(jax.random.key(1), (2, 5, 12))
  y = module(feat, text, jnp.ones((2, 5), jnp.int32))
  mu = feat.mean(-1, keepdims=True)
  var = feat.var(-1, keepdims=True)
  np.testing.assert_allclose(y, (feat - mu) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
  assert float(module.gamma[...][0]) == 0.0


def _loaded_retrieval_fusion(rngs=None):
  data, state = load_fixture('spatial_rag_fusion')
  module = fusion.RetrievalFusion(32, 4, dropout=0.1, rngs=rngs or nnx.Rngs(0))
  report = load_into(module, cers_torch.retrieval_fusion_weights(state, num_heads=4))
  assert report.ok
  # rag_flat holds each retrieved (C, H, W) map flattened C-major.
  retrieved = data['in/rag_flat'].reshape(2, 3, 32, 4, 4).transpose(0, 1, 3, 4, 2)
  return data, module, retrieved


def test_retrieval_fusion_matchesload_fixture():
  data, module, retrieved = _loaded_retrieval_fusion()
  module = nnx.view(module, deterministic=True)
  y = module(nhwc(data['in/curr']), retrieved)
  assert rel_err(y, nhwc(data['out/y'])) < 1e-5


def test_retrieval_fusion_dropout_only_in_training():
  data, module, retrieved = _loaded_retrieval_fusion(nnx.Rngs(params=0, dropout=1))
  _, other, _ = _loaded_retrieval_fusion(nnx.Rngs(params=0, dropout=2))
  curr = nhwc(data['in/curr'])
  train_a, train_b = module(curr, retrieved), other(curr, retrieved)
  assert np.abs(train_a - train_b).max() > 1e-4
  assert np.abs(module(curr, retrieved) - train_a).max() > 1e-4  # fresh mask per call
  ev = nnx.view(module, deterministic=True)
  np.testing.assert_array_equal(ev(curr, retrieved), ev(curr, retrieved))
  np.testing.assert_allclose(ev(curr, retrieved), nhwc(data['out/y']), rtol=1e-4,
                             atol=1e-5)


def test_retrieval_fusion_key_tokens_are_order_free():
  """Keys/values are a set: permuting the k reference maps changes nothing."""
  data, module, retrieved = _loaded_retrieval_fusion()
  module = nnx.view(module, deterministic=True)
  curr = nhwc(data['in/curr'])
  np.testing.assert_allclose(module(curr, retrieved[:, ::-1]), module(curr, retrieved),
                             rtol=1e-5, atol=1e-6)


def test_retrieval_fusion_rejects_flat_references():
  _, module, _ = _loaded_retrieval_fusion()
  with pytest.raises(ValueError, match='retrieved must be'):
    module(jnp.zeros((2, 4, 4, 32)), jnp.zeros((2, 3, 512)))


def test_attention_init_matches_torch_fans():
  """Xavier-uniform as torch: in-projections bounded by sqrt(6/(E+3E)), out by sqrt(6/2E)."""
  e = 64
  module = fusion.RetrievalFusion(e, 4, rngs=nnx.Rngs(0))
  q = np.asarray(module.cross_attn.query.kernel[...])
  out = np.asarray(module.cross_attn.out.kernel[...])
  in_bound, out_bound = np.sqrt(6 / (4 * e)), np.sqrt(6 / (2 * e))
  assert np.abs(q).max() <= in_bound and np.abs(q).max() > 0.9 * in_bound
  assert np.abs(out).max() <= out_bound and np.abs(out).max() > 0.9 * out_bound
  assert np.all(np.asarray(module.cross_attn.query.bias[...]) == 0)
  gate = np.asarray(module.gate.kernel[...])
  assert np.abs(gate).max() <= np.sqrt(6 / (3 * e))
