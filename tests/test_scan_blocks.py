"""Tests for cers_jax/models/stack.py: scanned ConvNeXt stages and BERT layers (config
model.scan_blocks) compute what the unrolled loops compute, with the same parameter tree."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cers_jax.models import cers
from cers_jax.models import stack
from cers_jax.models.bert import BertEncoder
from cers_jax.models.convnext import ConvNeXt
from configs import base
from tests.test_cers import tiny_config

DEPTHS = (2, 2, 3, 2)
DIMS = (8, 16, 24, 32)


def _convnext(scan, rate=0.0, dtype=None):
  # Layer scale 1 (not 1e-6): residual branches, and so dropped ones, show in the output.
  return ConvNeXt(depths=DEPTHS, dims=DIMS, drop_path_rate=rate, layer_scale_init=1.0,
                  dtype=dtype, scan_blocks=scan, rngs=nnx.Rngs(params=0, dropout=1))


def _bert(scan, dropout=0.1, dtype=None):
  return BertEncoder(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2,
                     intermediate_size=32, max_position=16, dropout=dropout, dtype=dtype,
                     scan_blocks=scan, rngs=nnx.Rngs(params=0, dropout=1))


def _image():
  return jax.random.normal(jax.random.key(1), (2, 32, 32, 3))


def _tokens():
  ids = jax.random.randint(jax.random.key(2), (2, 7), 1, 50)
  mask = jnp.ones((2, 7), jnp.int32).at[0, 4:].set(0)  # Padding in the first sequence.
  return ids, mask


def _eval_loss_and_grads(model, *inputs, **view):
  """Eval-mode outputs and d(sum of outputs)/d(params), under jit."""
  view = dict(deterministic=True, **view)
  graphdef, params, rest = nnx.split(nnx.view(model, **view), nnx.Param, ...)

  @jax.jit
  def run(params, rest, inputs):
    def loss(params):
      outs = nnx.merge(graphdef, params, rest)(*inputs)
      outs = outs if isinstance(outs, tuple) else (outs,)
      return sum(jnp.sum(o.astype(jnp.float32)) for o in outs), outs
    return jax.grad(loss, has_aux=True)(params)

  grads, outs = run(params, rest, inputs)
  return outs, grads


def _train_forward(model, *inputs, seed=5):
  """Training-mode outputs and RNG state after one jitted call, dropout reseeded as the
  train step does (`steps._training_model`)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, inputs):
    module = nnx.merge(graphdef, state)
    nnx.reseed(module, dropout=jax.random.key(seed))
    outs = module(*inputs)
    return outs, nnx.state(module, nnx.RngState)

  return run(state, inputs)


def _assert_trees_close(a, b, atol=1e-5):
  """Leafwise allclose, atol scaled by the leaf's largest magnitude: float32 sums of
  terms up to ~30 (layer scale 1) reassociate differently once XLA sees a loop body."""
  def close(x, y):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    scale = max(1.0, float(np.abs(y).max(initial=0.0)))
    np.testing.assert_allclose(x, y, atol=atol * scale, rtol=1e-5)
  jax.tree.map(close, a, b)


def _key_data(rng_state):
  """{path: raw uint32 key data or count} of an RNG state."""
  def raw(x):
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return {path: np.asarray(raw(v[...])) for path, v in nnx.to_flat_state(rng_state)}


def _tree_paths_and_shapes(model):
  return [(path, value.shape, value.dtype) for path, value in
          nnx.to_flat_state(nnx.state(model))]


@pytest.mark.parametrize('rate', [0.0, 0.3])
def test_convnext_scan_matches_the_loop(rate):
  loop, scan = _convnext(False, rate), _convnext(True, rate)
  assert _tree_paths_and_shapes(loop) == _tree_paths_and_shapes(scan)
  out_loop, grads_loop = _eval_loss_and_grads(loop, _image())
  out_scan, grads_scan = _eval_loss_and_grads(scan, _image())
  _assert_trees_close(out_loop, out_scan)
  _assert_trees_close(grads_loop, grads_scan)
  assert jax.tree.structure(grads_loop) == jax.tree.structure(grads_scan)


def test_convnext_scans_every_stage_but_a_rate_zero_first_block():
  model = nnx.view(_convnext(True, 0.3), deterministic=True)
  jaxpr = str(jax.make_jaxpr(lambda x: model(x))(_image()))
  # Stage 1's first block has rate 0 and no RNG stream: it runs alone, its second block
  # alone too; stages 2-4 are one scan each.
  assert jaxpr.count('scan[') == 3
  model = nnx.view(_convnext(True, 0.0), deterministic=True)
  assert str(jax.make_jaxpr(lambda x: model(x))(_image())).count('scan[') == 4


def test_convnext_training_mode_drops_per_block_like_the_loop():
  loop, scan = _convnext(False, 0.5), _convnext(True, 0.5)
  out_loop, rng_loop = _train_forward(loop, _image())
  out_scan, rng_scan = _train_forward(scan, _image())
  # Each block draws from its own stream, scanned or not: the same masks, the same counts.
  _assert_trees_close(out_loop, out_scan)
  np.testing.assert_equal(_key_data(rng_scan), _key_data(rng_loop))
  counts = [c for p, c in nnx.to_flat_state(rng_scan) if p[-1] == 'count']
  assert len(counts) == sum(DEPTHS) - 1  # The rate-0 first block has no stream.
  assert all(int(c[...]) == 1 for c in counts)  # One draw per block in this call.
  keys = [tuple(np.asarray(jax.random.key_data(k[...])).ravel())
          for p, k in nnx.to_flat_state(rng_scan) if p[-1] == 'key']
  assert len(set(keys)) == len(keys)  # Independent keys per block.
  out_eval, _ = _eval_loss_and_grads(scan, _image())
  assert not np.allclose(out_scan[-1], out_eval[-1], atol=1e-4)
  # Another step's key gives other masks.
  out_other, _ = _train_forward(scan, _image(), seed=6)
  assert not np.allclose(out_scan[-1], out_other[-1], atol=1e-4)


def test_convnext_rngs_are_written_back_to_the_blocks():
  model = _convnext(True, 0.5)
  nnx.reseed(model, dropout=jax.random.key(3))
  model(_image())
  counts = [int(c[...]) for p, c in nnx.to_flat_state(nnx.state(model, nnx.RngState))
            if p[-1] == 'count']
  assert counts == [1] * (sum(DEPTHS) - 1)
  before = _key_data(nnx.state(model, nnx.RngState))
  nnx.view(model, deterministic=True)(_image())  # Eval mode draws nothing.
  np.testing.assert_equal(_key_data(nnx.state(model, nnx.RngState)), before)


def test_bert_scan_matches_the_loop():
  loop, scan = _bert(False), _bert(True)
  assert _tree_paths_and_shapes(loop) == _tree_paths_and_shapes(scan)
  ids, mask = _tokens()
  out_loop, grads_loop = _eval_loss_and_grads(loop, ids, mask)
  out_scan, grads_scan = _eval_loss_and_grads(scan, ids, mask)
  _assert_trees_close(out_loop, out_scan)
  _assert_trees_close(grads_loop, grads_scan)
  model = nnx.view(scan, deterministic=True)
  assert 'scan[' in str(jax.make_jaxpr(lambda i, m: model(i, m))(ids, mask))


def test_bert_training_mode_dropout_like_the_loop():
  ids, mask = _tokens()
  out_loop, rng_loop = _train_forward(_bert(False, dropout=0.3), ids, mask)
  out_scan, rng_scan = _train_forward(_bert(True, dropout=0.3), ids, mask)
  _assert_trees_close(out_loop, out_scan)
  np.testing.assert_equal(_key_data(rng_scan), _key_data(rng_loop))
  counts = {p: int(c[...]) for p, c in nnx.to_flat_state(rng_scan) if p[-1] == 'count'}
  # Per layer: attention dropout once, hidden dropout twice; the embedding dropout once.
  assert sorted(counts.values()) == [1] * 4 + [2] * 3
  out_eval, _ = _eval_loss_and_grads(_bert(True, dropout=0.3), ids, mask)
  assert not np.allclose(out_scan, out_eval[0], atol=1e-3)


def test_bfloat16_training_forward_matches_the_loop():
  ids, mask = _tokens()
  for make, inputs in ((lambda s: _convnext(s, 0.3, jnp.bfloat16), (_image(),)),
                       (lambda s: _bert(s, 0.1, jnp.bfloat16), (ids, mask))):
    out_loop, _ = _train_forward(make(False), *inputs)
    out_scan, _ = _train_forward(make(True), *inputs)
    assert all(o.dtype == jnp.bfloat16 for o in jax.tree.leaves(out_scan))
    _assert_trees_close(out_loop, out_scan, atol=1e-2)


def _tiny_cers_config(scan):
  """test_cers's tiny CERS with two blocks in two stages and two-layer BERTs to scan."""
  cfg = tiny_config()
  cfg.encoder_depths = (2, 1, 2, 1)
  cfg.scan_blocks = scan
  for section in (cfg.text, cfg.cot):
    section.num_layers = 2
  return cfg


@pytest.mark.slow
def test_cers_scan_matches_the_loop_with_one_state_tree():
  loop = cers.CERS(_tiny_cers_config(False), rngs=nnx.Rngs(params=0, dropout=1))
  scan = cers.CERS(_tiny_cers_config(True), rngs=nnx.Rngs(params=0, dropout=1))
  assert _tree_paths_and_shapes(loop) == _tree_paths_and_shapes(scan)
  keys = jax.random.split(jax.random.key(0), 3)
  image = jax.random.normal(keys[0], (2, 64, 64, 3))
  ids = jax.random.randint(keys[1], (2, 7), 1, 100)
  mask = jnp.ones((2, 7), jnp.int32).at[0, 4:].set(0)
  retrieved = jax.random.normal(keys[2], (2, 3, 2, 2, 64))
  inputs = (image, ids, mask, retrieved)
  out_loop, grads_loop = _eval_loss_and_grads(loop, *inputs, use_running_average=True)
  out_scan, grads_scan = _eval_loss_and_grads(scan, *inputs, use_running_average=True)
  _assert_trees_close(out_loop, out_scan, atol=1e-4)  # Logits sum many terms.
  _assert_trees_close(grads_loop, grads_scan, atol=1e-4)


@pytest.mark.slow
def test_the_switch_reaches_both_encoders_and_old_configs_do_not_scan():
  assert not base.get_config().model.scan_blocks  # No compile-time gain measured on CPU.
  cfg = _tiny_cers_config(True)
  old = cfg.to_dict()
  del old['scan_blocks']  # A workdir's config.json written before the switch.
  model = nnx.eval_shape(lambda: cers.CERS(ml_collections.ConfigDict(old),
                                           rngs=nnx.Rngs(0)))
  assert not model.encoder.scan_blocks and not model.text_encoder.scan_blocks
  model = nnx.eval_shape(lambda: cers.CERS(cfg, rngs=nnx.Rngs(0)))
  assert model.encoder.scan_blocks and model.text_encoder.scan_blocks


class _NormBlock(nnx.Module):

  def __init__(self, width, rngs):
    self.linear = nnx.Linear(4, width, rngs=rngs)
    self.norm = nnx.BatchNorm(width, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.linear(x))


def test_scan_blocks_refuses_what_it_cannot_scan():
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match='identical graph definitions'):
    stack.scan_blocks([nnx.Linear(4, 4, rngs=nnx.Rngs(0)),
                       nnx.Linear(4, 4, use_bias=False, rngs=nnx.Rngs(0))], x,
                      lambda block, carry, _: block(carry))
  blocks = [_NormBlock(4, nnx.Rngs(i)) for i in range(2)]
  with pytest.raises(NotImplementedError, match='BatchNorm'):
    stack.scan_blocks(blocks, x, lambda block, carry, _: block(carry))
  eval_blocks = [nnx.view(b, use_running_average=True) for b in blocks]
  out = stack.scan_blocks(eval_blocks, x, lambda block, carry, _: block(carry))
  np.testing.assert_allclose(out, eval_blocks[1](eval_blocks[0](x)), atol=1e-6)
