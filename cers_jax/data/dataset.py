"""The prepared dataset: the uint8 cache, the split rows and the token arrays of every row.

`prepare_data(config, workdir)` validates the dataset, writes or reuses the split manifest and
the cache (`data.prepare`), and tokenizes the report texts and CoTs with the configured
tokenizers or ones trained on the run's own texts (`data.tokenize`). `Data` is the type every
layer reads a dataset through: training, evaluation, the retrieval report and prediction.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from absl import logging

from cers_jax import sharding
from cers_jax.data import cache as cache_lib
from cers_jax.data import pipeline
from cers_jax.data import prepare as prepare_lib
from cers_jax.data import tokenize
from cers_jax.errors import ConfigError

SPLITS = ('train_labeled', 'train_unlabeled', 'val', 'test')


@dataclasses.dataclass
class Data:
  """A prepared dataset: the uint8 cache, split rows and token arrays of every row."""

  cache: cache_lib.Cache
  rows: dict[str, np.ndarray]  # split name -> cache rows (int32)
  tokens: dict[str, np.ndarray]  # text_ids/text_mask (N,L); cot_{mask,no_mask}_{ids,mask}
  text_tokenizer: Any
  cot_tokenizer: Any

  @property
  def num_samples(self) -> int:
    return len(self.cache.samples)

  def arrays(self) -> pipeline.PipelineArrays:
    """What the input pipeline indexes by cache row."""
    return pipeline.PipelineArrays(
        images=self.cache.images, masks=self.cache.masks, text_ids=self.tokens['text_ids'],
        text_mask=self.tokens['text_mask'], has_mask=self.cache.has_mask)


def _generate_synthetic_if_needed(config) -> None:
  if config.synthetic.num_images <= 0:
    return
  from cers_jax.data import synthetic  # Only the synthetic default needs it.
  marker = os.path.join(config.data.root, 'text.csv')
  if os.path.exists(marker):
    return
  logging.info('Generating %d synthetic images into %s', config.synthetic.num_images,
               config.data.root)
  synthetic.generate_synthetic(config.data.root, num_images=config.synthetic.num_images,
                               image_size=config.synthetic.image_size, seed=config.seed)


def _tokenizer(directory: str, trained_dir: str, texts: list[str], vocab_size: int):
  """A pretrained tokenizer when configured, else one trained on the run's own texts."""
  if directory:
    return tokenize.load_tokenizer(directory)
  if os.path.exists(os.path.join(trained_dir, 'tokenizer.json')):
    return tokenize.load_tokenizer(trained_dir)
  logging.info('Training a %d-token WordPiece vocabulary into %s', vocab_size, trained_dir)
  return tokenize.train_wordpiece(texts, vocab_size=vocab_size, out_dir=trained_dir)


def prepare_data(config, workdir: str) -> Data:
  """Validates the dataset, writes/reuses the split manifest and cache, tokenizes texts."""
  _generate_synthetic_if_needed(config)
  prepared = prepare_lib.prepare(config, workdir)
  cache = prepared.cache
  rows = {name: np.asarray(prepared.rows[name], np.int32) for name in SPLITS}
  if len(rows['train_labeled']) == 0:
    raise ConfigError(
        f'The split manifest {os.path.join(config.data.cache_dir, "split.json")} has no '
        'labeled training images: raise --config.data.labeled_fraction.')
  train_rows = np.concatenate([rows['train_labeled'], rows['train_unlabeled']])
  samples = cache.samples
  reports = [samples[r].text or '' for r in train_rows]
  cots = [c for r in train_rows for c in (samples[r].cot_mask, samples[r].cot_no_mask) if c]
  tok_dir = os.path.join(workdir, 'tokenizers')
  text_tok = _tokenizer(config.tokenizer.text_dir, os.path.join(tok_dir, 'text'), reports,
                        config.tokenizer.vocab_size)
  cot_tok = _tokenizer(config.tokenizer.cot_dir, os.path.join(tok_dir, 'cot'),
                       cots + reports, config.tokenizer.vocab_size)
  tokens = {}
  tokens['text_ids'], tokens['text_mask'] = tokenize.encode_texts(
      text_tok, [s.text for s in samples], config.data.max_text_len)
  for kind in ('cot_mask', 'cot_no_mask'):
    tokens[f'{kind}_ids'], tokens[f'{kind}_mask'] = tokenize.encode_texts(
        cot_tok, [getattr(s, kind) for s in samples], config.data.max_cot_len)
  tokens['report_cot_ids'], tokens['report_cot_mask'] = tokenize.encode_texts(
      cot_tok, [s.text for s in samples], config.data.max_cot_len)
  return Data(cache=cache, rows=rows, tokens=tokens, text_tokenizer=text_tok,
              cot_tokenizer=cot_tok)


def prepare_data_once(config, workdir: str) -> Data:
  """`prepare_data` on the main process first (it writes the dataset files), then on the
  others, which find and read what it wrote. One process on one host: just prepare_data.

  If the main process fails (a DataError, say), it reports why; the others wait at the
  barrier until the distributed runtime notices that it is gone.
  """
  if sharding.is_main_process():
    data = prepare_data(config, workdir)
  sharding.sync('cers_jax: data prepared')
  if not sharding.is_main_process():
    data = prepare_data(config, workdir)
  return data
