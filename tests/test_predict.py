"""Tests for cers_jax.inference.predict without a model (tests/test_end_to_end.py runs one).

`predict(state, steps, data, config, workdir)` gets a real `Data` (Cache, WordPiece
tokenizers), the real base config and numpy stand-ins for the jitted steps that record their
calls.
"""

import csv
import dataclasses
import html
import os
import re

import numpy as np
import pytest
from PIL import Image

from cers_jax import sharding
from cers_jax.data import augment
from cers_jax.data import tokenize
from cers_jax.data.cache import Cache
from cers_jax.data.dataset import Data
from cers_jax.data.records import DataError, Sample
from cers_jax.inference import predict
from configs import base

S = 16  # Model input size.
K = 3
EMBED = 8
COT_HIDDEN = 12
BATCH = 4
RETRIEVED = (4, 0, 2)  # Cache rows the fake retrieval returns, best first.
N_CACHE = 6

SENTENCES = [
    'a round lesion with a sharp boundary in the left lobe',
    'texture: heterogeneous. boundary: irregular. context: near the wall. summary: tumour',
    'no lesion is visible in this slice',
    'a small bright nodule & an ill defined margin <b> tag </b>',
]

# Folder images: id -> (width, height, mode, extension, has mask).
FOLDER = {
    'case_a': (30, 20, 'RGB', '.png', True),
    'case_b': (24, 40, 'L', '.jpg', False),
    'case_c': (16, 16, 'L', '.bmp', True),
    'case_d': (50, 33, 'RGB', '.tif', False),
    'case_e': (17, 23, 'L', '.png', False),
}


def _ref_cot(row: int) -> str | None:
  return f'Texture: <row {row}> & "quoted" Summary: ref{row}' if row % 2 == 0 else None


def _ref_cot_no_mask(row: int) -> str:
  return f'Boundary: fallback <{row}> & no-mask CoT'


@pytest.fixture(scope='module')
def tokenizers(tmp_path_factory):
  root = tmp_path_factory.mktemp('tok')
  return (tokenize.train_wordpiece(SENTENCES, vocab_size=120, out_dir=str(root / 'text')),
          tokenize.train_wordpiece(SENTENCES, vocab_size=120, out_dir=str(root / 'cot')))


class FakeSteps:
  """Numpy stand-ins for Steps.evaluate / cot_cls / project, recording every call."""

  def __init__(self, mode: str):
    self.mode = mode
    self.mesh = sharding.make_mesh()
    self.calls: list[tuple[str, object]] = []

  def evaluate(self, state, batch):
    batch = {k: np.asarray(v) for k, v in batch.items()}
    self.calls.append(('evaluate', batch))
    b, s = batch['image'].shape[:2]
    prob_r = np.full((b, s, s, 1), 0.1, np.float32)
    prob_r[:, s // 4:3 * s // 4, s // 4:3 * s // 4] = 0.9
    out = dict(prob_r=prob_r, prob_s=prob_r * 0.5)
    if 'mask' in batch:
      out.update(dice_r=np.full(b, 0.625, np.float32), iou_r=np.full(b, 0.5, np.float32),
                 dice_s=np.full(b, 0.375, np.float32), iou_s=np.full(b, 0.25, np.float32))
    if self.mode != 'none':
      out['retrieved_ids'] = np.tile(np.asarray(RETRIEVED, np.int32), (b, 1))
      out['retrieved_scores'] = np.tile(np.asarray([0.9, 0.8, 0.7], np.float32), (b, 1))
    return out

  def cot_cls(self, state, ids, mask):
    ids, mask = np.asarray(ids), np.asarray(mask)
    self.calls.append(('cot_cls', (ids, mask)))
    return np.tile(mask.sum(axis=1, keepdims=True).astype(np.float32), (1, COT_HIDDEN))

  def project(self, state, cls):
    cls = np.asarray(cls)
    self.calls.append(('project', cls))
    emb = np.tile(cls[:, :1], (1, EMBED))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _cache(tmp_path) -> Cache:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N_CACHE, S, S, 3), dtype=np.uint8)
  masks = np.zeros((N_CACHE, S, S), np.uint8)
  masks[:, 4:10, 5:12] = 1
  has_mask = np.ones(N_CACHE, bool)
  has_mask[5] = False
  masks[5] = 0
  samples = [Sample(id=f'ref{r}', image_path=str(tmp_path / 'gone' / f'ref{r}.png'),
                    mask_path=str(tmp_path / 'gone' / f'm{r}.png') if has_mask[r] else None,
                    text=f'report of row {r}', cot_mask=_ref_cot(r),
                    cot_no_mask=_ref_cot_no_mask(r)) for r in range(N_CACHE)]
  manifest = dict(ids=dict(train_labeled=['ref0', 'ref1', 'ref2', 'ref4'],
                           train_unlabeled=[], val=[], test=['ref3', 'ref5']))
  return Cache(str(tmp_path / 'cache'), images, masks, has_mask, samples, manifest)


@dataclasses.dataclass
class Run:
  steps: FakeSteps
  data: Data
  config: object
  workdir: str


def _predict(run: Run) -> str:
  return predict.predict('state', run.steps, run.data, run.config, run.workdir)


def _exp(tmp_path, tokenizers, *, mode='image+cot', predict_dir=''):
  config = base.get_config()
  config.data.image_size = S
  config.data.max_text_len = 16
  config.data.max_cot_len = 24
  config.model.embed_dim = EMBED
  config.model.cot.hidden_size = COT_HIDDEN
  config.train.eval_batch_size = BATCH
  config.pool.mode = mode
  config.pool.k = K
  config.eval.predict_dir = predict_dir
  cache = _cache(tmp_path)
  text_tok, cot_tok = tokenizers
  text_ids, text_mask = tokenize.encode_texts(text_tok, [s.text for s in cache.samples],
                                              config.data.max_text_len)
  rows = {name: cache.rows_of(cache.manifest['ids'][name]) for name in cache.manifest['ids']}
  data = Data(cache=cache, rows=rows, tokens=dict(text_ids=text_ids, text_mask=text_mask),
              text_tokenizer=text_tok, cot_tokenizer=cot_tok)
  return Run(steps=FakeSteps(mode), data=data, config=config, workdir=str(tmp_path / 'work'))


def _folder(tmp_path, *, cot_missing=(), text_missing=(), with_masks=True,
            with_cot=True) -> str:
  root = tmp_path / 'new_cases'
  (root / 'frames').mkdir(parents=True)
  (root / 'masks').mkdir()
  rng = np.random.default_rng(1)
  for name, (w, h, mode, ext, has_mask) in FOLDER.items():
    shape = (h, w, 3) if mode == 'RGB' else (h, w)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
        root / 'frames' / f'{name}{ext}')
    if has_mask and with_masks:
      mask = np.zeros((h, w), np.uint8)
      mask[2:h // 2, 3:w // 2] = 255
      Image.fromarray(mask).save(root / 'masks' / f'{name}.png')
  with open(root / 'text.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'text'])
    for i, (name, (*_, ext, _)) in enumerate(FOLDER.items()):
      if name not in text_missing:  # Alternate full names and stems, as the authors' CSVs do.
        writer.writerow([name + ext if i % 2 else name, f'report for {name}: a lesion'])
  if with_cot:
    with open(root / 'cot_output_no_mask.csv', 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['image', 'cot'])
      for name in FOLDER:
        if name not in cot_missing:
          writer.writerow([name, f'Texture: query <{name}> & more.\nSummary: done'])
  return str(root)


def _calls(exp, name):
  return [c for c in exp.steps.calls if c[0] == name]


def test_folder_predictions_write_every_output(tmp_path, tokenizers):
  exp = _exp(tmp_path, tokenizers, predict_dir=_folder(tmp_path))
  out_dir = _predict(exp)

  assert out_dir == os.path.join(exp.workdir, 'predictions', 'new_cases')
  for name, (w, h, *_rest) in FOLDER.items():
    for sub in ('images', 'masks', 'overlays'):
      with Image.open(os.path.join(out_dir, sub, f'{name}.png')) as im:
        assert im.size == (w, h), (sub, name)
    mask = np.asarray(Image.open(os.path.join(out_dir, 'masks', f'{name}.png')))
    assert set(np.unique(mask)) == {0, 255}
    assert os.path.isfile(os.path.join(out_dir, 'pages', f'{name}.html'))
  for row in RETRIEVED:
    with Image.open(os.path.join(out_dir, 'refs', f'ref{row}.png')) as im:
      assert im.size == (S, S)
  assert len(os.listdir(os.path.join(out_dir, 'refs'))) == len(RETRIEVED)

  index = open(os.path.join(out_dir, 'index.html'), encoding='utf-8').read()
  for name in FOLDER:
    assert f'href="pages/{name}.html"' in index

  with open(os.path.join(out_dir, 'predictions.csv'), newline='') as f:
    rows = {r['id']: r for r in csv.DictReader(f)}
  assert sorted(rows) == sorted(FOLDER)
  assert rows['case_a']['mask'] == 'masks/case_a.png'
  assert float(rows['case_a']['dice_r']) == pytest.approx(0.625)
  assert rows['case_b']['dice_r'] == ''  # No mask given for case_b.
  assert rows['case_b']['retrieved_ids'] == ';'.join(f'ref{r}' for r in RETRIEVED)
  assert 0.1 < float(rows['case_b']['mean_prob']) < 0.9


def test_folder_batches_match_the_pipeline_contract(tmp_path, tokenizers):
  exp = _exp(tmp_path, tokenizers, predict_dir=_folder(tmp_path))
  _predict(exp)
  batches = [b for _, b in _calls(exp, 'evaluate')]
  assert len(batches) == 2  # 5 images, eval batch 4: the last one is padded.
  for batch in batches:
    assert batch['image'].shape == (BATCH, S, S, 3) and batch['image'].dtype == np.float32
    assert batch['mask'].shape == (BATCH, S, S, 1)
    assert batch['text_ids'].shape == (BATCH, 16)
    assert batch['query_cot'].shape == (BATCH, EMBED)
    assert batch['query_text'].shape == (BATCH, EMBED)
    np.testing.assert_array_equal(batch['index'], -1)
    np.testing.assert_allclose(batch['image'].mean(axis=(1, 2)), 0, atol=1e-4)
  np.testing.assert_array_equal(batches[1]['valid'], [True, False, False, False])
  # Ids sorted: case_a (mask) first, case_b (no mask) second.
  assert batches[0]['mask'][0].sum() > 0 and batches[0]['mask'][1].sum() == 0
  np.testing.assert_allclose(np.linalg.norm(batches[0]['query_cot'], axis=1), 1, rtol=1e-6)
  # Mode image+cot does not read the text query: it stays zero and costs no BERT pass.
  np.testing.assert_array_equal(batches[0]['query_text'], 0)
  ids, mask = _calls(exp, 'cot_cls')[0][1]
  assert ids.shape == (BATCH, 24) and mask.shape == (BATCH, 24)
  # The image is the z-scored bicubic resize of the file (case_c is already S x S).
  pixels = np.asarray(Image.open(os.path.join(exp.config.eval.predict_dir, 'frames',
                                              'case_c.bmp')))
  expected = augment.zscore(np.repeat(pixels[..., None], 3, axis=-1))
  np.testing.assert_allclose(batches[0]['image'][2], expected, atol=1e-5)


def test_page_shows_escaped_reference_cots_in_rank_order(tmp_path, tokenizers):
  exp = _exp(tmp_path, tokenizers, predict_dir=_folder(tmp_path))
  out_dir = _predict(exp)
  page = open(os.path.join(out_dir, 'pages', 'case_a.html'), encoding='utf-8').read()
  expected = [_ref_cot(r) or _ref_cot_no_mask(r) for r in RETRIEVED]
  positions = [page.find(html.escape(c)) for c in expected]
  assert all(p >= 0 for p in positions), positions
  assert positions == sorted(positions)
  assert _ref_cot_no_mask(0) not in page  # ref0 has a mask CoT, which wins.
  assert '<row' not in page and '<4>' not in page  # Raw CoT text never reaches the HTML.
  assert html.escape('Texture: query <case_a> & more.') in page
  assert 'report for case_a: a lesion' in page
  assert '0.6250' in page and '0.3750' in page  # Dice of D_r and D_s.
  order = [int(m) for m in re.findall(r'src="../refs/ref(\d)\.png"', page)]
  assert order == list(RETRIEVED)
  page_b = open(os.path.join(out_dir, 'pages', 'case_b.html'), encoding='utf-8').read()
  assert 'No ground-truth mask given' in page_b


def test_missing_cot_is_refused_before_any_model_work(tmp_path, tokenizers):
  folder = _folder(tmp_path, cot_missing=('case_d',))
  exp = _exp(tmp_path, tokenizers, mode='image+cot', predict_dir=folder)
  with pytest.raises(DataError) as err:
    _predict(exp)
  message = str(err.value)
  assert 'case_d' in message and 'case_a' not in message
  assert os.path.join(folder, 'cot_output_no_mask.csv') in message
  assert exp.steps.calls == []


def test_no_cot_csv_is_refused_for_mode_cot(tmp_path, tokenizers):
  folder = _folder(tmp_path, with_cot=False)
  exp = _exp(tmp_path, tokenizers, mode='cot', predict_dir=folder)
  with pytest.raises(DataError, match='5 image'):
    _predict(exp)
  assert exp.steps.calls == []


def test_missing_text_is_refused_in_every_mode(tmp_path, tokenizers):
  folder = _folder(tmp_path, text_missing=('case_b', 'case_e'))
  exp = _exp(tmp_path, tokenizers, mode='none', predict_dir=folder)
  with pytest.raises(DataError) as err:
    _predict(exp)
  message = str(err.value)
  assert 'case_b' in message and 'case_e' in message and '2 image' in message
  assert os.path.join(folder, 'text.csv') in message
  assert exp.steps.calls == []


def test_error_lists_ten_ids_and_the_count(tmp_path, tokenizers):
  root = tmp_path / 'many'
  root.mkdir()
  for i in range(12):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / f'img{i:02d}.png')
  exp = _exp(tmp_path, tokenizers, predict_dir=str(root))
  with pytest.raises(DataError) as err:
    _predict(exp)
  message = str(err.value)
  assert '12 image(s)' in message and 'img09' in message and 'img10' not in message
  assert '2 more' in message and 'does not exist' in message


def test_missing_cot_and_masks_are_fine_for_mode_image(tmp_path, tokenizers):
  folder = _folder(tmp_path, with_cot=False, with_masks=False)
  exp = _exp(tmp_path, tokenizers, mode='image', predict_dir=folder)
  out_dir = _predict(exp)
  assert _calls(exp, 'cot_cls') == []  # Mode 'image' reads no CoT or text embedding.
  assert all(np.all(b['query_cot'] == 0) for _, b in _calls(exp, 'evaluate'))
  with open(os.path.join(out_dir, 'predictions.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(FOLDER) and all(r['dice_r'] == '' for r in rows)
  page = open(os.path.join(out_dir, 'pages', 'case_a.html'), encoding='utf-8').read()
  assert 'cosine of the image features' in page
  assert html.escape(_ref_cot(4)) in page


def test_mode_text_embeds_the_report(tmp_path, tokenizers):
  exp = _exp(tmp_path, tokenizers, mode='text', predict_dir=_folder(tmp_path))
  _predict(exp)
  batch = _calls(exp, 'evaluate')[0][1]
  np.testing.assert_allclose(np.linalg.norm(batch['query_text'], axis=1), 1, rtol=1e-6)
  np.testing.assert_array_equal(batch['query_cot'], 0)


def test_mode_none_page_says_retrieval_is_off(tmp_path, tokenizers):
  exp = _exp(tmp_path, tokenizers, mode='none', predict_dir=_folder(tmp_path))
  out_dir = _predict(exp)
  page = open(os.path.join(out_dir, 'pages', 'case_a.html'), encoding='utf-8').read()
  assert 'Retrieval is off' in page and 'refs/' not in page
  assert os.listdir(os.path.join(out_dir, 'refs')) == []


def test_cache_rows_without_predict_dir(tmp_path, tokenizers):
  exp = _exp(tmp_path, tokenizers)
  # ref3's original file exists (at another size); ref5's is gone: the cache image is used.
  os.makedirs(tmp_path / 'gone')
  Image.fromarray(np.full((21, 34), 7, np.uint8)).save(tmp_path / 'gone' / 'ref3.png')
  out_dir = _predict(exp)
  assert out_dir == os.path.join(exp.workdir, 'predictions')
  (batch,) = [b for _, b in _calls(exp, 'evaluate')]
  np.testing.assert_array_equal(batch['index'][:2], [3, 5])
  assert 'query_cot' not in batch  # Cache rows query with the state's tables.
  np.testing.assert_array_equal(batch['text_ids'][:2], exp.data.tokens['text_ids'][[3, 5]])
  np.testing.assert_allclose(batch['image'][0], augment.zscore(exp.data.cache.images[3]),
                             atol=1e-5)
  with Image.open(os.path.join(out_dir, 'masks', 'ref3.png')) as im:
    assert im.size == (34, 21)
  with Image.open(os.path.join(out_dir, 'overlays', 'ref5.png')) as im:
    assert im.size == (S, S)
  with open(os.path.join(out_dir, 'predictions.csv'), newline='') as f:
    rows = {r['id']: r for r in csv.DictReader(f)}
  assert rows['ref3']['dice_r'] != '' and rows['ref5']['dice_r'] == ''  # ref5 has no mask.
  page = open(os.path.join(out_dir, 'pages', 'ref3.html'), encoding='utf-8').read()
  assert html.escape(_ref_cot_no_mask(3)) in page  # A test row queries with its no-mask CoT.
