"""Tests for cers_jax.models.bert and cers_jax.convert.bert against HF PyTorch BertModel."""

import importlib.util
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
from transformers import BertConfig, BertForMaskedLM, BertModel

from cers_jax.convert.assign import WeightLoadError
from cers_jax.convert.bert import bert_weights, load_bert
from cers_jax.models.bert import BertEncoder

VOCAB, HIDDEN, LAYERS, HEADS, INTER, MAXPOS = 99, 32, 2, 4, 37, 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _hf_config():
  return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=INTER,
                    max_position_embeddings=MAXPOS, type_vocab_size=2,
                    attn_implementation='eager')


@pytest.fixture(scope='module')
def hf_model():
  torch.manual_seed(0)
  model = BertModel(_hf_config()).eval()
  with torch.no_grad():  # Norms away from 1/0 so their loading is visible.
    for name, p in model.named_parameters():
      if 'LayerNorm' in name:
        p.add_(0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def hf_sd(hf_model):
  return {k: v.numpy().copy() for k, v in hf_model.state_dict().items()}


def _encoder(seed=0, **kw):
  return BertEncoder(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                     intermediate_size=INTER, max_position=MAXPOS, rngs=nnx.Rngs(seed), **kw)


def _inputs():
  rng = np.random.RandomState(3)
  ids = rng.randint(1, VOCAB, (3, 12))
  mask = np.ones((3, 12), np.int64)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = 0
  types = np.zeros_like(ids)
  types[:, 4:] = 1
  return ids, mask, types


def _hf_out(model, ids, mask, types):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 token_type_ids=torch.from_numpy(types)).last_hidden_state.numpy()


def _run(model, ids, mask, types=None):
  ev = nnx.view(model, deterministic=True)
  return np.asarray(jax.jit(lambda m, *a: m(*a))(
      ev, jnp.asarray(ids), jnp.asarray(mask), None if types is None else jnp.asarray(types)))


def _assert_close(got, want, where):
  rel = np.abs(got[where] - want[where]).max() / np.abs(want[where]).max()
  assert rel < 1e-5, rel


@pytest.mark.slow
def test_matches_hf_bert_via_safetensors(hf_model, hf_sd, tmp_path):
  path = tmp_path / 'bert.safetensors'
  save_file(hf_sd, str(path))
  model = _encoder()
  report = load_bert(model, path)
  assert report.ok and set(report.ignored) == {'pooler.dense.weight', 'pooler.dense.bias'}
  ids, mask, types = _inputs()
  got, want = _run(model, ids, mask, types), _hf_out(hf_model, ids, mask, types)
  assert got.shape == (3, 12, HIDDEN)
  _assert_close(got, want, mask.astype(bool))
  # Padded positions follow HF too (they attend to the real tokens).
  _assert_close(got, want, ~mask.astype(bool))


def test_padding_is_masked(hf_sd):
  model = _encoder()
  load_bert(model, hf_sd)
  ids, mask, _ = _inputs()
  other = ids.copy()
  other[mask == 0] = 5  # Different tokens in the padding ...
  a, b = _run(model, ids, mask), _run(model, other, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(a[real], b[real], rtol=1e-6, atol=1e-6)  # ... change nothing.
  # Without the mask the same change is visible.
  full = np.ones_like(mask)
  assert np.abs(_run(model, ids, full)[real] - _run(model, other, full)[real]).max() > 1e-3


def test_matches_hf_bert_via_torch_bin(hf_model, tmp_path):
  path = tmp_path / 'pytorch_model.bin'
  torch.save(hf_model.state_dict(), path)
  model = _encoder(1)
  assert load_bert(model, tmp_path).ok  # an HF-style directory holding the .bin
  ids, mask, types = _inputs()
  _assert_close(_run(model, ids, mask, types), _hf_out(hf_model, ids, mask, types),
                mask.astype(bool))


def test_nested_checkpoint_reports_ignored(hf_model):
  torch.manual_seed(1)
  mlm = BertForMaskedLM(_hf_config()).eval()
  mlm.bert.load_state_dict(hf_model.state_dict(), strict=False)
  sd = {k: v.numpy().copy() for k, v in mlm.state_dict().items()}
  sd['bert.embeddings.position_ids'] = np.arange(MAXPOS)[None]  # old checkpoints carry it
  model = _encoder(2)
  report = load_bert(model, sd)
  assert report.ok
  assert 'bert.embeddings.position_ids' in report.ignored
  assert {k for k in sd if k.startswith('cls.')} <= set(report.ignored)
  assert not [k for k in report.ignored if k.startswith('bert.encoder')]
  ids, mask, types = _inputs()
  _assert_close(_run(model, ids, mask, types), _hf_out(hf_model, ids, mask, types),
                mask.astype(bool))


def test_prefix_detection_and_ambiguity(hf_sd):
  sd = {f'text_encoder.bert.{k}': v for k, v in hf_sd.items()}
  sd['text_encoder.proj.weight'] = np.zeros((4, HIDDEN), np.float32)
  report = load_bert(_encoder(), sd)
  assert report.ok and 'text_encoder.proj.weight' in report.ignored
  both = {**sd, **{f'cot_encoder.bert.{k}': v for k, v in hf_sd.items()}}
  with pytest.raises(WeightLoadError, match='several BERTs'):
    load_bert(_encoder(), both)
  assert load_bert(_encoder(), both, prefix='cot_encoder.bert.').ok
  with pytest.raises(WeightLoadError, match='not a BERT'):
    load_bert(_encoder(), {'encoder.weight': np.zeros(3, np.float32)})


def test_converter_layouts_and_tf_names(hf_sd):
  w = bert_weights(hf_sd, num_heads=HEADS)
  q = hf_sd['encoder.layer.1.attention.self.query.weight']
  np.testing.assert_array_equal(w['layers/1/attention/query/kernel'],
                                q.T.reshape(HIDDEN, HEADS, HIDDEN // HEADS))
  assert w['layers/0/attention/out/kernel'].shape == (HEADS, HIDDEN // HEADS, HIDDEN)
  assert w['layers/0/intermediate/kernel'].shape == (HIDDEN, INTER)
  # TF-era names (LayerNorm.gamma/beta) map to the same parameters.
  tf = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias',
                                                                  'LayerNorm.beta'): v
        for k, v in hf_sd.items()}
  assert sorted(bert_weights(tf, num_heads=HEADS)) == sorted(w)


def test_wrong_size_fails_strict(hf_sd):
  model = BertEncoder(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=3, num_heads=HEADS,
                      intermediate_size=INTER, max_position=MAXPOS, rngs=nnx.Rngs(0))
  with pytest.raises(WeightLoadError, match='layers/2/'):
    load_bert(model, hf_sd)
  report = load_bert(model, hf_sd, strict=False)
  assert len(report.missing) > 0 and all(m.startswith('layers/2/') for m in report.missing)


@pytest.mark.slow
def test_safetensors_path_never_imports_torch(hf_sd, tmp_path):
  path = tmp_path / 'model.safetensors'
  save_file(hf_sd, str(path))
  script = textwrap.dedent(f"""
      import sys
      sys.modules['torch'] = None  # any 'import torch' now raises ImportError
      from flax import nnx
      from cers_jax.convert.io import read_state_dict
      from cers_jax.convert.bert import load_bert
      from cers_jax.models.bert import BertEncoder
      sd = read_state_dict({str(path)!r})
      assert len(sd) == {len(hf_sd)}, len(sd)
      m = BertEncoder(vocab_size={VOCAB}, hidden_size={HIDDEN}, num_layers={LAYERS},
                      num_heads={HEADS}, intermediate_size={INTER}, max_position={MAXPOS},
                      rngs=nnx.Rngs(0))
      assert load_bert(m, {str(tmp_path)!r}).ok
      assert sys.modules['torch'] is None
      print('TORCH_FREE_OK')
      """)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                        env=env, timeout=120, check=False)
  assert 'TORCH_FREE_OK' in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
def test_from_config_and_dropout():
  spec = importlib.util.spec_from_file_location('base_config',
                                                os.path.join(REPO, 'configs', 'base.py'))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  cfg = base.get_config().model.cot
  with cfg.unlocked():
    cfg.update(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
               intermediate_size=24, max_position=20, dropout=0.5)
  model = BertEncoder.from_config(cfg, dtype=None, rngs=nnx.Rngs(params=0, dropout=1))
  assert model.word_embeddings.embedding.shape == (50, 16)
  assert model.position_embeddings.embedding.shape == (20, 16)
  assert len(model.layers) == 1 and model.layers[0].attention.num_heads == 2
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 8)))
  mask = jnp.ones((2, 8), jnp.int32)
  a, b = model(ids, mask), model(ids, mask)
  assert not np.allclose(a, b)  # training mode: dropout active
  ev = nnx.view(model, deterministic=True)
  np.testing.assert_array_equal(ev(ids, mask), ev(ids, mask))
  with pytest.raises(ValueError, match='max_position'):
    ev(jnp.zeros((1, 21), jnp.int32), jnp.ones((1, 21), jnp.int32))
