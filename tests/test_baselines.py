"""Every baseline of Table 1 through the real run (`loop.train_and_evaluate`): it trains,
its loss falls, it evaluates and predicts with its decoder 'seg', and a run stopped after
every epoch and resumed gives the same records and test scores as one that never stopped.
Tiny shapes: 32x32 synthetic images, batch 4, one warm-up and two semi-supervised epochs."""

import csv
import os

import pytest

from cers_jax.core import method as method_lib
from cers_jax.training import loop
from tests.run_configs import method_runs

BASELINES = ('supervised', 'mean_teacher', 'bcp', 'ucmt')
# The record field that must fall between the two semi-supervised epochs: UCMT's whole loss
# rises with its ramp (lambda 0.70 -> 1.0 here), so its supervised part is compared.
LEARNING = {'ucmt': 'sup'}
# What every semi-supervised record carries (docs/design.md section 9, "Diagnostics").
DIAGNOSTICS = {'unsup_weight', 'unsup_share', 'pseudo_fg', 'labeled_fg'}


def _config(name, **train):
  return method_runs.method_config(name, warmup_epochs=1, epochs=2, **train)


_records = method_runs.records


def test_every_baseline_is_registered_with_its_decoder():
  for name in BASELINES:
    method = method_lib.resolve(name)
    assert (method.name, method.decoders, method.primary) == (name, ('seg',), 'seg')
    assert method.retrieval_stage is None and len(method.stage_names) == 2


@pytest.mark.slow
@pytest.mark.parametrize('name', BASELINES)
def test_baseline_trains_evaluates_predicts_and_resumes_to_the_same_scores(name, tmp_path):
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  summary = loop.train_and_evaluate(_config(name), whole, mode='all')
  test = summary['test']
  assert summary['stage'] == 'done' and test['decoders'] == ['seg']
  assert 0 <= test['dice_seg_mean'] <= 1

  records = _records(whole)
  stages = method_lib.resolve(name).stage_names
  assert [(r['stage'], r['epoch']) for r in records] == [
      (stages[0], 0), (stages[1], 0), (stages[1], 1)]
  key = LEARNING.get(name, 'loss')
  assert records[2][key] < records[1][key]  # It learns (one stage, one loss form).
  assert all('val_dice_seg_mean' in r for r in records[1:])
  if name != 'supervised':
    assert all(DIAGNOSTICS <= r.keys() for r in records[1:]), records[1].keys()
    assert all(0 <= r['pseudo_fg'] <= 1 and 0 < r['labeled_fg'] < 1 for r in records[1:])
  # The EMA teacher beside the selected student (UCMT's teacher is the one evaluated).
  assert ('val_dice_teacher_mean' in records[1]) == (name in ('mean_teacher', 'bcp'))
  if name in ('mean_teacher', 'bcp'):
    assert all(0 <= r['val_dice_teacher_mean'] <= 1 for r in records[1:])

  for _ in range(3):  # Stopped after every epoch, resumed.
    loop.train_and_evaluate(_config(name, stop_after_epochs=1), split, mode='train')
  for got, want in zip(_records(split), records, strict=True):
    assert got == {k: pytest.approx(v, rel=1e-5) if isinstance(v, float) else v
                   for k, v in want.items()}
  resumed = loop.train_and_evaluate(_config(name), split, mode='eval')['test']
  assert resumed['dice_seg_mean'] == pytest.approx(test['dice_seg_mean'], abs=1e-6)

  with open(os.path.join(whole, 'predictions', 'predictions.csv')) as f:
    rows = list(csv.DictReader(f))
  assert rows and rows[0]['dice_seg'] != '' and rows[0]['retrieved_ids'] == ''


@pytest.mark.slow
def test_bcp_self_trains_from_the_best_pretraining_and_selects_among_semi_epochs(tmp_path):
  """BCP's recipe (docs/design.md section 9): constant rate, a fresh optimizer and the
  best pre-training weights at the semi stage (warm-up validated), the best checkpoint from
  semi epochs, the warm-up's best in the summary; stopped after every epoch and resumed, the
  same records (the start of the semi stage is not repeated on resume)."""
  config = lambda **train: method_runs.method_config(  # noqa: E731
      'bcp', warmup_epochs=2, epochs=2, validate_warmup=True, **train)
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  summary = loop.train_and_evaluate(config(), whole, mode='train')
  records = _records(whole)
  assert [(r['stage'], r['epoch']) for r in records] == [
      ('warmup', 0), ('warmup', 1), ('semi', 0), ('semi', 1)]
  assert len({r['learning_rate'] for r in records}) == 1  # BCP: constant.
  warmup_best = max(r['val_dice_seg_mean'] for r in records[:2])
  assert summary['warmup_best_val_dice'] == pytest.approx(warmup_best)
  # Selection restarted with the semi stage: its first epoch is the best so far, whatever
  # the warm-up scored.
  assert records[2]['best_val_dice_seg'] == pytest.approx(records[2]['val_dice_seg_mean'])
  semi_best = max(r['val_dice_seg_mean'] for r in records[2:])
  assert summary['best_val_dice_seg'] == pytest.approx(semi_best)
  assert summary['best_epoch'] in (1, 2)
  assert summary['semi_minus_warmup'] == pytest.approx(semi_best - warmup_best)

  for _ in range(4):
    loop.train_and_evaluate(config(stop_after_epochs=1), split, mode='train')
  for got, want in zip(_records(split), records, strict=True):
    assert got == {k: pytest.approx(v, rel=1e-5) if isinstance(v, float) else v
                   for k, v in want.items()}
