"""The authors' checkpoint, evaluated and used for prediction through the real CLI.

`--config.model.checkpoint=FILE` in a workdir without an orbax checkpoint: `--mode eval`
and `--mode predict` score the imported weights (the CERS method's imported_state builds the
CoT tables and the pool, which their state dict lacks) and write no checkpoint.

The state dict is the authors' model as tests/fixtures/cers_torch_state_dict.json lists it
(ConvNeXt-T widths, cross-attention, fusion, both decoders), with one ConvNeXt block per
stage instead of (3, 3, 9, 3) and a one-layer BERT of the tiny run's width as its text
encoder (their CERS takes any depth and any BertModel; the full depths would only make the
test slower to compile), random weights, and heads whose output is known: D_r's last
conv has zero weights and bias +20 (every pixel lesion), D_s's bias -20 (none). The
scores are then a function of the ground-truth masks alone, which proves that the
imported weights, not a fresh initialisation, were evaluated.
"""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from cers_jax.data import tokenize
from tests import cli_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join('tests', 'run_configs', 'tiny_run.py')
MANIFEST = os.path.join(os.path.dirname(__file__), 'fixtures', 'cers_torch_state_dict.json')
# The authors' network around the tiny run's data, tokenizers and one-layer BERTs.
AUTHORS_MODEL = ('--config.model.encoder_depths=(1,1,1,1)',
                 '--config.model.encoder_dims=(96,192,384,768)',
                 '--config.model.attn_dim=256', '--config.model.attn_heads=8',
                 '--config.model.decoder_dims=(384,192,96,48)')
TEXT = dict(hidden=16, intermediate=32, positions=32)  # tiny_run's text BERT.
LOGIT = 20.0

pytestmark = pytest.mark.slow  # Three run.py processes, the model compiled for evaluation.


def _authors_state_dict(vocab_size: int) -> dict[str, np.ndarray]:
  with open(MANIFEST) as f:
    shapes = json.load(f)['state_dict']
  # BERT-base sizes -> the tiny BERT's; only its first layer.
  sizes = {768: TEXT['hidden'], 3072: TEXT['intermediate'], 512: TEXT['positions'],
           30522: vocab_size}
  rng = np.random.default_rng(0)
  sd = {}
  for name, shape in shapes.items():
    block = re.match(r'encoder\.stage\d\.1\.(\d+)\.', name)
    if block and int(block.group(1)) > 0:
      continue  # One ConvNeXt block per stage.
    if name.startswith('text_encoder.bert.'):
      layer = re.search(r'\.layer\.(\d+)\.', name)
      if layer and int(layer.group(1)) > 0:
        continue
      shape = [sizes.get(d, d) for d in shape]
    elif re.fullmatch(r'cross_attns\.\d\.[kv]_proj\.weight', name):
      shape = [shape[0], TEXT['hidden']]  # Linear(H_text -> 256).
    if name.endswith('num_batches_tracked'):
      sd[name] = np.asarray(7, np.int64)
    elif name.endswith('running_var'):
      sd[name] = 1.0 + np.abs(rng.standard_normal(shape, dtype=np.float32))
    else:
      sd[name] = 0.02 * rng.standard_normal(shape, dtype=np.float32)
  for head, bias in (('final_conv_left', LOGIT), ('final_conv_right', -LOGIT)):
    sd[f'{head}.3.weight'] = np.zeros_like(sd[f'{head}.3.weight'])
    sd[f'{head}.3.bias'] = np.full_like(sd[f'{head}.3.bias'], bias)
  return sd


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """(cli, workdir, state dict path) after `--mode prepare` (data and tokenizers)."""
  env = cli_helpers.run_env()
  workdir = str(tmp_path_factory.mktemp('authors') / 'run')
  path = str(tmp_path_factory.mktemp('weights') / 'cers_authors.safetensors')

  def cli(*flags):
    result = subprocess.run(
        [sys.executable, 'run.py', f'--config={CONFIG}', f'--workdir={workdir}', *AUTHORS_MODEL,
         f'--config.model.checkpoint={path}', *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return result

  save_file({'placeholder': np.zeros(1, np.float32)}, path)  # Replaced below.
  cli('--mode=prepare')
  vocab = len(tokenize.load_tokenizer(os.path.join(workdir, 'tokenizers', 'text')))
  save_file(_authors_state_dict(vocab), path)
  return cli, workdir, path


def _saved_steps(workdir):
  """Checkpoint steps saved under <workdir>/checkpoints (orbax names them by step)."""
  root = os.path.join(workdir, 'checkpoints')
  return [step for which in ('latest', 'best') if os.path.isdir(os.path.join(root, which))
          for step in os.listdir(os.path.join(root, which)) if step.isdigit()]


def _test_masks(workdir):
  with open(os.path.join(workdir, 'data', 'split.json')) as f:
    test_ids = json.load(f)['ids']['test']
  with open(os.path.join(workdir, 'data', 'samples.json')) as f:
    row = {s['id']: s['row'] for s in json.load(f)}
  masks = np.load(os.path.join(workdir, 'data', 'masks.npy'))
  return {i: masks[row[i]] > 0 for i in test_ids}


def test_eval_scores_the_imported_weights_without_a_checkpoint(imported):
  cli, workdir, path = imported
  result = cli('--mode=eval')
  assert "Evaluating the authors' weights from" in result.stderr
  with open(os.path.join(workdir, 'eval', 'test_summary.json')) as f:
    summary = json.load(f)
  assert summary['stage'] == 'imported' and summary['checkpoint'] == path
  # D_r says lesion everywhere, D_s nowhere: the scores follow from the masks.
  masks = _test_masks(workdir)
  area = {i: m.sum() / m.size for i, m in masks.items()}
  dice_r = [2 * a / (1 + a) for a in area.values()]
  dice_s = [1.0 if a == 0 else 0.0 for a in area.values()]
  assert summary['count'] == len(masks)
  assert summary['dice_r_mean'] == pytest.approx(np.mean(dice_r), abs=1e-5)
  assert summary['iou_r_mean'] == pytest.approx(np.mean(list(area.values())), abs=1e-5)
  assert summary['dice_s_mean'] == pytest.approx(np.mean(dice_s), abs=1e-5)
  assert not _saved_steps(workdir)  # Evaluation writes no checkpoint.


def test_predict_retrieves_from_a_pool_built_with_the_imported_encoder(imported):
  cli, workdir, _ = imported
  cli('--mode=predict')
  with open(os.path.join(workdir, 'predictions', 'predictions.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  with open(os.path.join(workdir, 'data', 'split.json')) as f:
    split = json.load(f)['ids']
  assert [r['id'] for r in rows] == split['test'][:16]
  for r in rows:
    assert float(r['mean_prob']) > 0.999  # sigmoid(+20): the imported D_r head.
    refs = r['retrieved_ids'].split(';')
    assert len(refs) == 3 and set(refs) <= set(split['train_labeled'])
  assert not _saved_steps(workdir)
