"""A trained run's predictor as a `jax.export` artefact that runs with jax alone (docs/interop.md).

`python run.py --mode export --workdir RUN` (with the run's --config) writes `RUN/export/`:

  predictor.jaxexport  the serialized `jax.export.Exported` (StableHLO, CPU and, when it
                       lowers, CUDA): (weights..., image, text_ids, text_mask, cot_ids,
                       cot_mask, report_ids, report_mask) -> D_r's probabilities
  weights.npz          its first inputs, `w0000`, `w0001`, ... in order: the eval-mode
                       parameters, batch statistics, the knowledge pool and the embedding
                       tables of the checkpoint (no optimizer state). The pool is an input,
                       not baked in: swap it by replacing those arrays (same shapes).
  predictor.json       the input signature (names, shapes with `b` for the batch, dtypes),
                       the preprocessing in words, the tokenizers' padding and lengths,
                       the output, threshold and checkpoint
  tokenizers/text/, tokenizers/cot/  the run's tokenizers (Hugging Face `tokenizer.json`)

The exported function does in-graph what evaluation does around the eval step: the
per-image per-channel z-score of the uint8 image, the CoT and report-text query embeddings
from their token ids (the frozen CoT BERT and the projection), then the eval step itself
with those queries (no self-exclusion: the image is not a pool row). Tokenization stays
outside (token ids in, as `cers_jax.data.tokenize.encode_texts` makes them):
`examples/run_exported.py` reads the ids from a file, or tokenizes texts with the
`tokenizers` package when it is installed. The batch dimension is symbolic when the model
lowers that way (`batch_polymorphic` in predictor.json), else fixed to eval_batch_size.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cers_jax.errors import ConfigError

FORMAT = 1
FILES = ('predictor.jaxexport', 'weights.npz', 'predictor.json')
INPUTS = ('image', 'text_ids', 'text_mask', 'cot_ids', 'cot_mask', 'report_ids', 'report_mask')
PREPROCESSING = (
    'image: the file decoded to RGB (gray replicated) uint8 and resized to S x S with PIL '
    'bicubic (cers_jax.data.images.resize_image); the z-score per image and channel is done '
    'inside. text_ids/text_mask: the report text tokenized with tokenizers/text, [CLS] ... '
    '[SEP], padded with pad_id and truncated to text_len (mask 1 on tokens). cot_ids/cot_mask: '
    'the CoT written without the mask, with tokenizers/cot, to cot_len. report_ids/'
    'report_mask: the report text with tokenizers/cot, to cot_len (the text query). A '
    'missing text: all pad ids and an all-zero mask.')
_ZSCORE_EPS = 1e-8


def zscore(image: jax.Array) -> jax.Array:
  """`cers_jax.data.augment.zscore` in jnp: (B, S, S, 3) uint8 -> float32."""
  x = image.astype(jnp.float32)
  mean = x.mean(axis=(1, 2), keepdims=True)
  centred = x - mean
  std = jnp.sqrt((centred * centred).mean(axis=(1, 2), keepdims=True))
  return centred / (std + _ZSCORE_EPS)


def _is_key(leaf) -> bool:
  return jax.dtypes.issubdtype(getattr(leaf, 'dtype', np.float32), jax.dtypes.prng_key)


def eval_weights(state) -> tuple[list[np.ndarray], list[str | None], object]:
  """(host arrays, key impl per array or None, treedef) of the state evaluation reads."""
  leaves, treedef = jax.tree.flatten(state.replace(opt_state=None))
  arrays, impls = [], []
  for leaf in leaves:
    if _is_key(leaf):
      arrays.append(np.asarray(jax.random.key_data(leaf)))
      impls.append(str(jax.random.key_impl(leaf)))
    else:
      arrays.append(np.asarray(leaf))
      impls.append(None)
  return arrays, impls, treedef


def predictor_fn(steps, treedef, impls, *, retrieves: bool, primary: str = 'r'):
  """f(weights, image, text_ids, text_mask, cot_ids, cot_mask, report_ids, report_mask)
  -> (B, S, S, 1) float32 probabilities of the primary decoder."""

  def predict(weights, image, text_ids, text_mask, cot_ids, cot_mask, report_ids,
              report_mask):
    leaves = [jax.random.wrap_key_data(w, impl=impl) if impl else w
              for w, impl in zip(weights, impls)]
    state = jax.tree.unflatten(treedef, leaves)
    batch = dict(image=zscore(image), text_ids=text_ids, text_mask=text_mask,
                 index=jnp.full(image.shape[:1], -1, jnp.int32))
    if retrieves:
      batch['query_cot'] = steps.project(state, steps.cot_cls(state, cot_ids, cot_mask))
      batch['query_text'] = steps.project(state, steps.cot_cls(state, report_ids,
                                                               report_mask))
    return steps.evaluate(state, batch)[f'prob_{primary}']

  return predict


def _input_specs(batch, size: int, text_len: int, cot_len: int):
  tokens = lambda n: jax.ShapeDtypeStruct((batch, n), jnp.int32)
  return (jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8), tokens(text_len),
          tokens(text_len), tokens(cot_len), tokens(cot_len), tokens(cot_len), tokens(cot_len))


def _export(fn, weight_specs, input_specs):
  """Exports for CPU and CUDA; CPU only when CUDA does not lower here."""
  for platforms in (('cpu', 'cuda'), None):
    try:
      return jax.export.export(jax.jit(fn), platforms=platforms)(weight_specs, *input_specs)
    except Exception as error:  # pylint: disable=broad-except  (lowering errors vary)
      if platforms is None:
        raise
      logging.info('Exporting for %s failed (%s); exporting for this platform only.',
                   platforms, str(error).splitlines()[0] if str(error) else error)
  raise AssertionError('unreachable')


def _pad_id(tokenizer) -> int:
  return int(getattr(tokenizer, 'pad_token_id', 0) or 0)


def export_predictor(state, steps, data, config, out_dir: str, *, retrieves: bool = True,
                     primary: str = 'r', meta: dict | None = None) -> dict:
  """Writes the export folder (see the module docstring); returns predictor.json's content.

  Raises:
    ConfigError: the `flatbuffers` package, which jax.export serializes with, is missing.
  """
  try:
    import flatbuffers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ConfigError('--mode export serializes with jax.export, which needs the '
                      '`flatbuffers` package: pip install flatbuffers') from None
  os.makedirs(out_dir, exist_ok=True)
  arrays, impls, treedef = eval_weights(state)
  fn = predictor_fn(steps, treedef, impls, retrieves=retrieves, primary=primary)
  size = int(config.data.image_size)
  text_len, cot_len = int(config.data.max_text_len), int(config.data.max_cot_len)
  weight_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
  try:
    (b,) = jax.export.symbolic_shape('b')
    exported = _export(fn, weight_specs, _input_specs(b, size, text_len, cot_len))
    polymorphic = True
  except Exception as error:  # pylint: disable=broad-except  (shape polymorphism errors)
    logging.warning('The predictor does not export with a symbolic batch (%s); it takes '
                    'batches of %d.', str(error).splitlines()[0] if str(error) else error,
                    config.train.eval_batch_size)
    b = int(config.train.eval_batch_size)
    exported = _export(fn, weight_specs, _input_specs(b, size, text_len, cot_len))
    polymorphic = False
  with open(os.path.join(out_dir, 'predictor.jaxexport'), 'wb') as f:
    f.write(exported.serialize())
  np.savez(os.path.join(out_dir, 'weights.npz'),
           **{f'w{i:04d}': a for i, a in enumerate(arrays)})
  batch = 'b' if polymorphic else b
  shapes = dict(image=[batch, size, size, 3], text_ids=[batch, text_len],
                text_mask=[batch, text_len], cot_ids=[batch, cot_len],
                cot_mask=[batch, cot_len], report_ids=[batch, cot_len],
                report_mask=[batch, cot_len])
  dtypes = dict(image='uint8', **{k: 'int32' for k in INPUTS[1:]})
  for kind in ('text', 'cot'):
    tokenizer = getattr(data, f'{kind}_tokenizer')
    tokenizer.save_pretrained(os.path.join(out_dir, 'tokenizers', kind))
  spec = dict(
      format=FORMAT, jax_version=jax.__version__, platforms=list(exported.platforms),
      batch_polymorphic=polymorphic, weights=len(arrays),
      inputs=[dict(name=n, shape=shapes[n], dtype=dtypes[n]) for n in INPUTS],
      output=dict(name=f'prob_{primary}', shape=[batch, size, size, 1], dtype='float32',
                  meaning=f'D_{primary} probability of lesion per pixel at S x S; the mask '
                  f'is prob > threshold'),
      threshold=float(config.eval.threshold), image_size=size, text_len=text_len,
      cot_len=cot_len, pad_id=dict(text=_pad_id(data.text_tokenizer),
                                   cot=_pad_id(data.cot_tokenizer)),
      retrieval=dict(mode=config.pool.mode if retrieves else 'none',
                     pool='an input: arrays of weights.npz (the checkpoint\'s pool), not '
                     'baked into the function'),
      preprocessing=PREPROCESSING, method=config.get('method', 'cers'),
      checkpoint={k: (meta or {}).get(k) for k in ('checkpoint', 'stage', 'epoch')})
  with open(os.path.join(out_dir, 'predictor.json'), 'w', encoding='utf-8') as f:
    json.dump(spec, f, indent=1)
  loader = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), 'examples', 'run_exported.py')
  if os.path.isfile(loader):  # Beside the artefact, so the folder is self-contained.
    shutil.copy(loader, os.path.join(out_dir, 'run_exported.py'))
  logging.info('Exported the predictor (%d weight arrays, batch %s, %s) into %s',
               len(arrays), batch, '/'.join(exported.platforms), out_dir)
  return spec
