"""Tests for cers_jax.data.tokenize: loading, training and encoding."""

import numpy as np
import pytest

from cers_jax.data import tokenize

_VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'lesion', 'is', 'small',
          'bright', '##s', 'a', 'rim', '.', ',']
_TEXTS = [
    'A synthetic axial scan with one small lesion in the upper left region.',
    'A synthetic axial scan with two medium-sized lesions in the central region.',
    'Texture: Mottled bright core within a faint hyperintense rim; mild noise.',
    'Boundary: The faint rim fades gradually into the tissue.',
    'Summary: Contained lesion: segment the bright core only.',
] * 4


@pytest.fixture
def vocab_dir(tmp_path):
  (tmp_path / 'vocab.txt').write_text('\n'.join(_VOCAB) + '\n')
  return str(tmp_path)


def test_load_vocab_txt_directory_tokenizes_real_words(vocab_dir):
  tok = tokenize.load_tokenizer(vocab_dir)
  ids = tok('The lesions is bright.')['input_ids']
  vocab = {w: i for i, w in enumerate(_VOCAB)}
  expected = [vocab[w] for w in ('[CLS]', 'the', 'lesion', '##s', 'is', 'bright', '.',
                                 '[SEP]')]
  assert ids == expected  # Lowercased, WordPiece-split, no [UNK].
  assert tok.unk_token_id not in ids
  assert tok.pad_token_id == 0


def test_load_errors_name_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    tokenize.load_tokenizer(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match='empty.*no tokenizer files'):
    tokenize.load_tokenizer(str(tmp_path / 'empty'))


def test_train_wordpiece_round_trips(tmp_path):
  out = str(tmp_path / 'tok')
  tok = tokenize.train_wordpiece(_TEXTS + [None], vocab_size=300, out_dir=out)
  assert [tok.convert_tokens_to_ids(t) for t in tokenize.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  reloaded = tokenize.load_tokenizer(out)
  probe = _TEXTS[:5] + ['An UNSEEN word: zygomatic lesions!']
  assert reloaded(probe)['input_ids'] == tok(probe)['input_ids']
  assert len(reloaded) == len(tok)
  ids = tok('the faint rim of the lesion')['input_ids']
  assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
  assert tok.unk_token_id not in ids
  assert tok('LESION')['input_ids'] == tok('lesion')['input_ids']  # Lowercasing.


def test_train_wordpiece_rejects_no_texts(tmp_path):
  with pytest.raises(ValueError, match='no non-empty texts'):
    tokenize.train_wordpiece([None, ''], vocab_size=100, out_dir=str(tmp_path))


def test_encode_texts_pads_truncates_and_blanks_none(tmp_path):
  tok = tokenize.train_wordpiece(_TEXTS, vocab_size=300, out_dir=str(tmp_path))
  ids, mask = tokenize.encode_texts(tok, [_TEXTS[0], None, 'lesion', _TEXTS[2]], 8)
  assert ids.shape == mask.shape == (4, 8)
  assert ids.dtype == mask.dtype == np.int32
  # Truncated row: full mask, ends with [SEP].
  assert mask[0].tolist() == [1] * 8 and ids[0, -1] == tok.sep_token_id
  # None: all padding, not even [CLS].
  assert (ids[1] == tok.pad_token_id).all() and (mask[1] == 0).all()
  # Short row: [CLS] lesion [SEP] then padding.
  assert mask[2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
  assert ids[2, 0] == tok.cls_token_id and ids[2, 2] == tok.sep_token_id
  assert (ids[2, 3:] == tok.pad_token_id).all()
  all_none_ids, all_none_mask = tokenize.encode_texts(tok, [None, None], 5)
  assert all_none_ids.shape == (2, 5) and not all_none_mask.any()


def test_trained_vocabulary_is_deterministic(tmp_path):
  """Two runs on the same texts must tokenize identically (resume, reproducibility)."""
  texts = ['An axial MRI scan with one small glioma lesion.',
           'Texture: heterogeneous. Boundary: blurred rim. Summary: infiltrative lesion.',
           'A coronal scan with two lesions; margins well defined.'] * 3
  first = tokenize.train_wordpiece(texts, vocab_size=60, out_dir=str(tmp_path / 'a'))
  second = tokenize.train_wordpiece(texts, vocab_size=60, out_dir=str(tmp_path / 'b'))
  assert first.get_vocab() == second.get_vocab()
  assert len(first) == 60
  assert '[UNK]' not in first.tokenize('glioma lesions with blurred margins')
