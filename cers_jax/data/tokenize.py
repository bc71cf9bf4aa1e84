"""Tokenizers for report texts and CoTs, and their token arrays (docs/design.md sections 3 and 10).

The report-text BERT (CXR-BERT in the paper) and the CoT BERT (Bio_ClinicalBERT) each read
their own WordPiece vocabulary. A user with a pretrained checkpoint points the config at its
local HF directory (`load_tokenizer`); without one, `train_wordpiece` builds a BERT-style
WordPiece tokenizer from the dataset's own texts, so the whole method also runs from
scratch without any download. Token ids are computed once for every cache row
(`encode_texts`) and kept as (N, L) int32 arrays that the input pipeline gathers by row.
"""

import collections
from collections.abc import Sequence
import os

from absl import logging
import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
import transformers

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # [PAD] gets id 0.
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt')


def load_tokenizer(directory: str) -> transformers.PreTrainedTokenizerFast:
  """Loads a fast tokenizer from a local Hugging Face format directory (never the hub).

  A directory with `tokenizer.json` or `tokenizer_config.json` goes through `AutoTokenizer`;
  one with only a BERT `vocab.txt` becomes a BERT WordPiece tokenizer.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f'Tokenizer directory {directory!r} does not exist; set config.tokenizer.text_dir /'
        " cot_dir to a local Hugging Face tokenizer folder, or to '' to train one.")
  present = [f for f in _TOKENIZER_FILES if os.path.exists(os.path.join(directory, f))]
  if not present:
    raise FileNotFoundError(
        f'Tokenizer directory {directory!r} has no tokenizer files (expected one of '
        f'{", ".join(_TOKENIZER_FILES)}; found {sorted(os.listdir(directory))[:10]}). Point '
        "the config at the folder of a Hugging Face BERT checkpoint, or set it to '' to "
        'train a WordPiece tokenizer on the dataset.')
  if present == ['vocab.txt']:
    # Not `BertTokenizerFast(vocab_file=...)`: transformers 5 silently ignores that file.
    tokenizer = transformers.BertTokenizerFast.from_pretrained(
        directory, local_files_only=True)
  else:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  if tokenizer.pad_token_id is None:
    raise ValueError(
        f'The tokenizer in {directory!r} defines no padding token; add "pad_token" to its '
        'tokenizer_config.json.')
  logging.info('Loaded tokenizer from %s (%d tokens).', directory, len(tokenizer))
  return tokenizer


def _wordpiece_vocab(texts, vocab_size, normalizer, pre_tokenizer) -> dict[str, int]:
  """A deterministic WordPiece vocabulary: specials, every character, then frequent words.

  The `tokenizers` WordPieceTrainer breaks frequency ties in hash-map order, so two runs on
  the same texts give different vocabularies (and a resumed run would tokenize differently
  from the one it resumes). Here ties break alphabetically. Every character is in the
  vocabulary both word-initially and as a '##' continuation, so no in-domain word becomes
  [UNK]; whole words fill the rest by frequency.
  """
  counts: collections.Counter = collections.Counter()
  for text in texts:
    words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    counts.update(word for word, _ in words)
  chars = set()
  for word in counts:
    chars.add(word[0])
    chars.update('##' + c for c in word[1:])
  pieces = list(SPECIAL_TOKENS) + sorted(chars)
  known = set(pieces)
  for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
    if len(pieces) >= vocab_size:
      break
    if word not in known:
      pieces.append(word)
      known.add(word)
  return {piece: i for i, piece in enumerate(pieces)}


def train_wordpiece(
    texts: Sequence[str], *, vocab_size: int, out_dir: str
) -> transformers.PreTrainedTokenizerFast:
  """Trains a lowercase BERT WordPiece tokenizer on texts and saves it in HF format to out_dir.

  The vocabulary starts with [PAD] (id 0), [UNK], [CLS], [SEP], [MASK] and may be smaller
  than `vocab_size`; encodings are `[CLS] text [SEP]`; None texts are skipped.
  `load_tokenizer(out_dir)` reloads it identically.
  """
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError(f'train_wordpiece got no non-empty texts for {out_dir!r}.')
  unk, cls, sep = '[UNK]', '[CLS]', '[SEP]'
  normalizer = normalizers.BertNormalizer(lowercase=True)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  vocab = _wordpiece_vocab(texts, vocab_size, normalizer, pre_tokenizer)
  tok = tokenizers.Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk))
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.WordPiece()
  tok.post_processor = processors.TemplateProcessing(
      single=f'{cls} $A {sep}',
      pair=f'{cls} $A {sep} $B:1 {sep}:1',
      special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token='[PAD]', unk_token=unk, cls_token=cls,
      sep_token=sep, mask_token='[MASK]')
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save_pretrained(out_dir)
  logging.info('Trained a %d-token WordPiece tokenizer on %d texts into %s.',
               len(tokenizer), len(texts), out_dir)
  return tokenizer


def encode_texts(
    tokenizer: transformers.PreTrainedTokenizerBase,
    texts: Sequence[str | None],
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask), each (N, L) int32, of one text per cache row padded/truncated to `max_len`.

  Truncation keeps the final [SEP]. A None text becomes all padding with an all-zero mask
  (not even [CLS]).
  """
  if max_len < 2:
    raise ValueError(f'max_len must be >= 2 ([CLS] and [SEP]), got {max_len}.')
  ids = np.full((len(texts), max_len), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  present = [i for i, t in enumerate(texts) if t is not None]
  if present:
    enc = tokenizer(
        [texts[i] for i in present], padding='max_length', truncation=True,
        max_length=max_len, return_attention_mask=True, return_token_type_ids=False,
        return_tensors='np')
    ids[present] = enc['input_ids']
    mask[present] = enc['attention_mask']
  return ids, mask
