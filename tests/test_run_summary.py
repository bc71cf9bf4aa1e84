"""scripts/run_summary.py: speed, Dice and retrieval of a workdir, or what is missing."""

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
    'run_summary', os.path.join(REPO, 'scripts', 'run_summary.py'))
run_summary = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run_summary)


def _mode(dice):
  return dict(ref_mask_dice=dice, ref_mask_dice_sem=0.01, label_match=0.5, tie_share=0.0,
              score_range=0.1)


def test_summary_of_a_finished_run(tmp_path):
  records = [dict(stage='warmup', epoch=e, seconds=s, images_per_s=r, loss=1.0)
             for e, s, r in ((0, 30.0, 20.0), (1, 3.0, 250.0), (2, 3.2, 240.0))]
  records += [dict(stage='semi', epoch=e, seconds=s, images_per_s=r, loss=0.5,
                   val_dice_r_mean=d, val_dice_s_mean=d / 2)
              for e, s, r, d in ((0, 60.0, 70.0, 0.3), (1, 16.0, 300.0, 0.4))]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  (tmp_path / 'eval').mkdir()
  (tmp_path / 'eval' / 'test_summary.json').write_text(json.dumps(dict(
      count=393, checkpoint='best', dice_r_mean=0.41, dice_s_mean=0.2, iou_r_mean=0.3,
      iou_s_mean=0.1)))
  report_dir = tmp_path / 'retrieval' / 'after_warmup'
  report_dir.mkdir(parents=True)
  (report_dir / 'report.json').write_text(json.dumps(dict(
      split='val', k=5, k_coarse=50, num_queries=393, pool_size=787, cot={},
      modes=dict(image=_mode(0.22), oracle=_mode(0.69)), problems=['cot: ties'])))
  text = run_summary.summary(str(tmp_path))
  assert 'epochs 2-3: median 245.0 images/s, 3.1 s an epoch, so about 27 s of compiling' in text
  assert 'semi-supervised (2B images a step): epoch 1 70.0 images/s' in text
  assert 'epoch 2: median 300.0' in text
  assert '0.4000        0.2000' in text  # Epoch 2: val Dice D_r and D_s.
  assert 'Dice D_r 0.4100, D_s 0.2000' in text
  assert '393 val queries' in text and 'oracle' in text and 'problem: cot: ties' in text


def test_summary_of_a_run_stopped_early(tmp_path):
  text = run_summary.summary(str(tmp_path))
  assert 'warm-up: no epoch finished' in text
  assert 'Test: not evaluated' in text and 'warm-up did not finish' in text
  assert run_summary.main(['run_summary.py', str(tmp_path / 'nothing')]) == 1
