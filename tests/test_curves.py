"""curves.png, the TensorBoard events and metrics.jsonl reading (cers_jax/training/curves.py).

The records are the loop's own shapes: warm-up records with the warm-up loss terms, semi
records with the semi loss terms and validation Dice, older records without
`learning_rate` / `consistency_weight`, and a NaN.
"""

import glob
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cers_jax.training import curves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records() -> list[dict]:
  records = []
  step = 0
  for epoch in range(3):
    step += 6
    records.append(dict(clip=2.3 - 0.1 * epoch, loss=3.8 - 0.3 * epoch,
                        seg_r=1.2 - 0.1 * epoch, seg_s=1.3 - 0.1 * epoch, stage='warmup',
                        epoch=epoch, step=step, seconds=2.0, images_per_s=25.0,
                        learning_rate=0.01 * (1 - step / 100)))
  for epoch in range(4):
    step += 18
    weight = 0.003 * math.exp(-5 * (1 - (epoch + 1) / 4) ** 2)
    record = dict(consistency=2000.0 - 100 * epoch, loss=1.6 - 0.1 * epoch,
                  seg=1.5 - 0.1 * epoch, stage='semi', epoch=epoch, step=step, seconds=5.0,
                  images_per_s=30.0, val_dice_r_mean=0.4 + 0.1 * epoch,
                  val_iou_r_mean=0.3 + 0.1 * epoch, val_dice_s_mean=0.3 + 0.05 * epoch,
                  val_iou_s_mean=0.2, best_val_dice_r=0.4 + 0.1 * epoch,
                  learning_rate=0.01 * (1 - step / 100), consistency_weight=weight,
                  consistency_weighted=weight * (2000.0 - 100 * epoch),
                  unsup_weight=weight, unsup_share=weight * (2000.0 - 100 * epoch) / 1.6,
                  pseudo_fg=0.02 + 0.01 * epoch, labeled_fg=0.05)
    records.append(record)
  records[-2]['val_dice_s_mean'] = float('nan')
  # A record of an older run: none of the keys the loop added later.
  for key in ('learning_rate', 'consistency_weight', 'consistency_weighted'):
    del records[3][key]
  return records


def _write_jsonl(workdir, records, tail=''):
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in records) + tail)


def test_read_records_round_trips_nan_and_skips_a_cut_last_line(tmp_path):
  records = _records()
  _write_jsonl(tmp_path, records, tail='{"loss": 1.2, "sta')
  read = curves.read_records(str(tmp_path))
  assert len(read) == len(records)
  assert math.isnan(read[-2]['val_dice_s_mean'])
  assert read[0] == records[0]


def test_read_records_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='No metrics.jsonl in'):
    curves.read_records(str(tmp_path))
  (tmp_path / 'metrics.jsonl').write_text('{"loss": 1}\nnot json\n{"loss": 2}\n')
  with pytest.raises(ValueError, match='line 2 is not JSON'):
    curves.read_records(str(tmp_path))


def test_epoch_axis_is_continuous_and_keeps_the_last_of_a_repeated_epoch():
  records = _records()
  repeated = dict(records[4], loss=9.0)
  ordered, x, warmup = curves.epoch_axis(records[::-1] + [repeated])
  assert warmup == 3
  assert x == [1, 2, 3, 4, 5, 6, 7]
  assert [r['stage'] for r in ordered] == ['warmup'] * 3 + ['semi'] * 4
  assert ordered[4]['loss'] == 9.0


def _pixels_near(image: np.ndarray, colour: str, tolerance: int = 12) -> int:
  rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
  return int((np.abs(image[..., :3].astype(int) - rgb).max(-1) <= tolerance).sum())


@pytest.mark.slow
def test_curves_png_from_a_workdir(tmp_path):
  _write_jsonl(tmp_path, _records())
  result = subprocess.run([sys.executable, '-m', 'cers_jax.training.curves', str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-3000:]
  path = tmp_path / 'curves.png'
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert image.size == (1500, 700)
    pixels = np.asarray(image.convert('RGB'))
  assert not list(tmp_path.glob('.*tmp*'))
  # Drawn, not blank: the D_r, D_s, learning-rate and consistency-weight lines are there,
  # and the diagnostics: the unsupervised share and the pseudo-labels' foreground.
  for colour in ('#3b73b9', '#e08a2c', '#455a64', '#6a1b9a', '#c62828', '#2e7d32'):
    assert _pixels_near(pixels, colour) > 50, colour


def test_diagnostics_are_not_drawn_as_loss_terms():
  keys = curves._loss_keys(_records())
  assert 'consistency_weighted' in keys and 'seg' in keys
  assert not {'unsup_weight', 'unsup_share', 'pseudo_fg', 'labeled_fg'} & set(keys)


def test_curves_png_of_warmup_only_records_without_new_keys(tmp_path):
  records = [{k: v for k, v in r.items() if k != 'learning_rate'} for r in _records()[:2]]
  path = tmp_path / 'sub' / 'curves.png'
  curves.write_curves(records, str(path))
  with Image.open(path) as image:
    assert image.size == (1500, 700)
    pixels = np.asarray(image.convert('RGB'))
  assert _pixels_near(pixels, '#3b73b9') == 0  # No validation in warm-up.


def test_curves_cli_without_metrics_is_one_error_line(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'cers_jax.training.curves', str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f'error: No metrics.jsonl in {tmp_path}: give the --workdir of a run that has trained '
      'at least one epoch.']


def _read_events(logdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} parsed from the TFRecord framing of every event file."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars: dict[str, list[tuple[int, float]]] = {}
  files = sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*')))
  assert files, os.listdir(logdir)
  for path in files:
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_tensorboard_events_hold_every_numeric_value(tmp_path):
  records = _records()
  logdir = str(tmp_path / 'tensorboard')
  with curves.TensorBoardWriter(logdir) as writer:
    for record in records:
      writer.write(record, record['step'])
  scalars = _read_events(logdir)
  expected = {f'{r["stage"]}/{k}' for r in records for k, v in r.items()
              if k not in ('stage', 'step')}
  assert set(scalars) == expected
  assert {'warmup/loss', 'warmup/clip', 'semi/val_dice_r_mean', 'semi/consistency_weight',
          'semi/learning_rate', 'warmup/learning_rate'} <= expected
  assert [s for s, _ in scalars['warmup/loss']] == [6, 12, 18]
  assert scalars['semi/val_dice_r_mean'] == [
      (r['step'], pytest.approx(r['val_dice_r_mean'])) for r in records[3:]]
  assert scalars['semi/consistency_weight'] == [
      (r['step'], pytest.approx(r['consistency_weight'])) for r in records[4:]]
  nan_step = records[-2]['step']
  assert math.isnan(dict(scalars['semi/val_dice_s_mean'])[nan_step])

  try:
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  accumulator = event_accumulator.EventAccumulator(logdir)
  accumulator.Reload()
  assert set(accumulator.Tags()['scalars']) == expected
  assert [e.value for e in accumulator.Scalars('warmup/loss')] == pytest.approx(
      [r['loss'] for r in records[:3]])


def test_tensorboard_writer_step_defaults_to_the_record_step(tmp_path):
  writer = curves.TensorBoardWriter(str(tmp_path))
  writer.write(_records()[0])
  writer.close()
  writer.close()  # Closing twice is harmless (a finally after an early close).
  assert _read_events(str(tmp_path))['warmup/loss'] == [(6, pytest.approx(3.8))]


def test_run_curves_draws_at_the_first_record_then_when_due_and_at_close(tmp_path):
  records = _records()
  path = tmp_path / 'curves.png'
  with curves.RunCurves(str(tmp_path), min_interval_s=3600) as run:
    _write_jsonl(tmp_path, records[:1])
    run.write(records[0])
    first = path.stat().st_mtime_ns
    _write_jsonl(tmp_path, records)
    for record in records[1:]:
      run.write(record)
    assert path.stat().st_mtime_ns == first  # Not due yet.
  with Image.open(path) as image:
    pixels = np.asarray(image.convert('RGB'))
  assert _pixels_near(pixels, '#3b73b9') > 50  # Redrawn at close: the semi records' Dice.
  assert len(_read_events(str(tmp_path / 'tensorboard'))['warmup/loss']) == 3
