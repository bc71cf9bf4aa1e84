"""The real CLI on a tiny synthetic dataset: every mode, resume and eval from checkpoints.

Each `run.py` call is a fresh process, as a user would run it. They share a persistent JAX
compilation cache so that only the first one pays for compiling the steps.
"""

import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import cli_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # Every test starts run.py processes.
CONFIG = os.path.join('tests', 'run_configs', 'tiny_run.py')


@pytest.fixture(scope='module')
def cli():
  env = cli_helpers.run_env()

  def run(workdir, *flags, expect_ok=True):
    result = subprocess.run(
        [sys.executable, 'run.py', f'--config={CONFIG}', f'--workdir={workdir}', *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if expect_ok:
      assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return result

  run.env = env
  return run


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _comparable(records):
  drop = {'seconds', 'images_per_s'}
  return [{k: v for k, v in r.items() if k not in drop} for r in records]


@pytest.fixture(scope='module')
def uninterrupted(cli, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  cli(workdir)  # --mode=all: train, eval, predict.
  return workdir


def test_all_mode_writes_every_artifact(uninterrupted):
  w = uninterrupted
  for path in ('synthetic/text.csv', 'data/split.json', 'data/report.json',
               'tokenizers/text/tokenizer.json', 'metrics.jsonl', 'summary.json',
               'eval/test_per_image.csv', 'eval/test_summary.json',
               'predictions/index.html', 'predictions/predictions.csv', 'config.json',
               'curves.png'):
    assert os.path.exists(os.path.join(w, path)), path
  assert any(name.startswith('events.out.tfevents')
             for name in os.listdir(os.path.join(w, 'tensorboard')))
  with open(os.path.join(w, 'predictions', 'index.html'), encoding='utf-8') as f:
    assert 'href="../curves.png"' in f.read()
  records = _metrics(w)
  assert [(r['stage'], r['epoch']) for r in records] == [
      ('warmup', 0), ('warmup', 1), ('semi', 0), ('semi', 1)]
  assert all(np.isfinite(r['loss']) for r in records)
  # CERS's recipe (docs/design.md section 9; the rate recorded is the next step's): warm-up
  # at the peak, then a cosine over the semi stage alone, from the peak to 0. (Before issue
  # 35 one cosine fell over both stages, and this asserted four falling rates.)
  rates = [r['learning_rate'] for r in records]
  assert rates[:2] == pytest.approx([0.01, 0.01])
  assert rates[1] > rates[2] > rates[3] and rates[3] == pytest.approx(0.0, abs=1e-9)
  # The consistency term beside its weight (per step: the epoch's mean), and the
  # diagnostics every semi-supervised record carries.
  for r in records[2:]:
    assert 0 < r['consistency_weight'] and np.isfinite(r['consistency_raw'])
    assert 0 <= r['unsup_share'] and r['unsup_weight'] == pytest.approx(r['consistency_weight'])
    assert 0 <= r['pseudo_fg'] <= 1 and 0 < r['labeled_fg'] < 1
  # The ramp spans the 2-epoch semi stage (train.consistency_rampup_share=1): its second
  # epoch's mean weight is well above the first's.
  assert records[3]['consistency_weight'] > 3 * records[2]['consistency_weight']
  assert 0.0 <= records[-1]['val_dice_r_mean'] <= 1.0
  with open(os.path.join(w, 'eval', 'test_summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(w, 'data', 'split.json')) as f:
    split = json.load(f)
  assert summary['count'] == len(split['ids']['test'])
  assert 'both empty scores 1' in summary['empty_rule']
  with open(os.path.join(w, 'eval', 'test_per_image.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == summary['count']
  assert np.isclose(np.mean([float(r['dice_r']) for r in rows]), summary['dice_r_mean'])
  pages = os.listdir(os.path.join(w, 'predictions', 'pages'))
  assert len(pages) == min(16, summary['count'])


def _latest_meta(workdir):
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  step = max((d for d in os.listdir(latest) if d.isdigit()), key=int)
  with open(os.path.join(latest, step, 'meta', 'metadata')) as f:
    return json.load(f)


def _error_line(result):
  """The one `error:` line of a refused run, which printed no traceback."""
  assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-4000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, result.stderr[-4000:]
  return errors[0]


def _sigterm_once_training(cli, workdir, log_path, *flags):
  """Runs `run.py --mode=train` and sends it SIGTERM once its loaders exist (the handler
  is in place by then, before the first step); returns (exit status, output)."""
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(
        [sys.executable, 'run.py', f'--config={CONFIG}', f'--workdir={workdir}',
         '--mode=train', *flags], cwd=REPO, env=cli.env, stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + 600
      while proc.poll() is None and time.time() < deadline:
        if 'Unlabeled train loader' in log_path.read_text():
          proc.send_signal(signal.SIGTERM)
          break
        time.sleep(0.1)
      returncode = proc.wait(timeout=600)
    finally:
      proc.kill()
  return returncode, log_path.read_text()


def test_sigterm_to_the_process_group_with_grain_workers_saves_and_summarises(cli, tmp_path):
  """What `timeout` does at gpu_brisc.sh's time limit: SIGTERM to the whole process group,
  grain's worker processes included, mid-training. The run saves its checkpoint, writes a
  summary.json saying how far it got, leaves no worker behind, and resumes to the end.
  (tests/test_pipeline.py checks that the workers outlive the signal deterministically.)"""
  workdir = tmp_path / 'workers'
  log_path = tmp_path / 'workers.log'
  command = [sys.executable, 'run.py', f'--config={CONFIG}', f'--workdir={workdir}',
             '--mode=train', '--config.data.num_workers=2']
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(command, cwd=REPO, env=cli.env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
      deadline = time.time() + 600
      metrics = workdir / 'metrics.jsonl'
      # After the first epoch record the workers are running and feeding batches.
      while proc.poll() is None and time.time() < deadline and not (
          metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.1)
      assert proc.poll() is None, log_path.read_text()[-4000:]
      os.killpg(proc.pid, signal.SIGTERM)
      returncode = proc.wait(timeout=300)
    finally:
      proc.kill()
  output = log_path.read_text()
  assert returncode == 143, output[-4000:]
  assert 'Traceback' not in output and 'terminated unexpectedly' not in output, output[-4000:]
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert summary['preempted'].startswith('Stopped by SIGTERM')
  assert summary['latest_checkpoint']['stage'] in ('warmup', 'semi')
  assert summary['seconds'] > 0
  time.sleep(2)  # A worker's exit may trail its parent's.
  with pytest.raises(ProcessLookupError):
    os.killpg(proc.pid, 0)  # Nobody is left in the group.
  report = subprocess.run([sys.executable, 'scripts/run_summary.py', str(workdir)], cwd=REPO,
                          env=cli.env, capture_output=True, text=True, timeout=120)
  assert 'stopped by SIGTERM' in report.stdout, report.stdout + report.stderr
  cli(str(workdir), '--mode=train', '--config.data.num_workers=2')
  assert [(r['stage'], r['epoch']) for r in _metrics(str(workdir))] == [
      ('warmup', 0), ('warmup', 1), ('semi', 0), ('semi', 1)]
  with open(workdir / 'summary.json') as f:
    assert 'preempted' not in json.load(f)


def test_interrupted_run_resumes_to_the_same_metrics(cli, uninterrupted, tmp_path):
  """Resumes after `stop_after_epochs` and after a real SIGTERM mid-epoch; a resumed config
  that changes the data, the model or (once used) retrieval is refused; evaluation and
  prediction leave config.json as trained."""
  workdir = str(tmp_path / 'resumed')
  cli(workdir, '--mode=train', '--config.train.stop_after_epochs=1')  # warm-up epoch 1
  assert [r['epoch'] for r in _metrics(workdir)] == [0]
  # A checkpoint from before the pool exists is tested as warm-up validates: without
  # retrieval (not with references of zeros from the empty pool).
  cli(workdir, '--mode=eval', '--config.eval.which=latest')
  with open(os.path.join(workdir, 'eval', 'test_summary.json')) as f:
    summary = json.load(f)
  assert (summary['stage'], summary['retrieval_mode']) == ('warmup', 'none')
  # The same scores as that checkpoint asked for without retrieval (the empty pool's
  # references of zeros would change D_r's).
  with open(os.path.join(workdir, 'eval', 'test_per_image.csv')) as f:
    first = [row['dice_r'] for row in csv.DictReader(f)]
  cli(workdir, '--mode=eval', '--config.eval.which=latest', '--config.pool.mode=none')
  with open(os.path.join(workdir, 'eval', 'test_per_image.csv')) as f:
    assert [row['dice_r'] for row in csv.DictReader(f)] == first
  images = os.path.join(workdir, 'data', 'images.npy')
  stamp = os.stat(images).st_mtime_ns
  line = _error_line(cli(workdir, '--mode=train', '--config.data.image_size=48',
                         '--config.model.encoder_dims=(8,16,24,48)', expect_ok=False))
  assert 'change the data, the parameters or the pool' in line
  assert 'data.image_size: 32 in the checkpoint, 48 now' in line
  assert 'model.encoder_dims: [8, 16, 24, 32] in the checkpoint, [8, 16, 24, 48] now' in line
  assert os.stat(images).st_mtime_ns == stamp  # Refused before the cache was touched.
  cli(workdir, '--mode=train', '--config.train.stop_after_epochs=2')  # warm-up 2, semi 1

  # Semi epoch 2, stopped by SIGTERM: a checkpoint of the step it stopped at.
  returncode, output = _sigterm_once_training(cli, workdir, tmp_path / 'preempted.log')
  assert returncode == 143, output[-4000:]
  assert 'Traceback' not in output
  assert 'preempted: Stopped by SIGTERM after step' in output
  assert 'Run the same command again to resume from that step.' in output
  meta = _latest_meta(workdir)
  steps_per_epoch = 39 // 4  # max(labeled, unlabeled) // batch of the tiny run.
  assert (meta['stage'], meta['epoch']) == ('semi', 1)
  assert meta['partial']['stage'] == 'semi' and meta['partial']['epoch'] == 1
  assert 1 <= meta['partial']['steps'] < steps_per_epoch, meta['partial']
  assert len(_metrics(workdir)) == 3  # The stopped epoch is not logged yet.
  # Retrieval has trained into this checkpoint: its settings may no longer change, nor the
  # batch size its data positions count in.
  line = _error_line(cli(workdir, '--mode=train', '--config.pool.mode=image',
                         '--config.train.batch_size=2', expect_ok=False))
  assert "pool.mode: 'image+cot' in the checkpoint, 'image' now" in line
  assert 'train.batch_size: 4 in the checkpoint, 2 now' in line
  # Nor the CoT its pool was built from (which a run right after warm-up builds again).
  line = _error_line(cli(workdir, '--mode=train', '--config.pool.cot_source=no_mask',
                         expect_ok=False))
  assert "change what the pool is built from, and this checkpoint's pool has" in line
  assert "pool.cot_source: 'mask' in the checkpoint, 'no_mask' now" in line

  cli(workdir, '--mode=train')  # The rest of semi epoch 2, from the saved step.
  assert 'partial' not in _latest_meta(workdir)
  resumed, reference = _comparable(_metrics(workdir)), _comparable(_metrics(uninterrupted))
  assert len(resumed) == len(reference)
  for got, want in zip(resumed, reference):
    assert got.keys() == want.keys()
    for key, value in want.items():
      if isinstance(value, float):
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, got, want)
      else:
        assert got[key] == value

  # Evaluation restores the best checkpoint in a new process and reproduces the scores.
  cli(workdir, '--mode=eval')
  with open(os.path.join(workdir, 'eval', 'test_summary.json')) as f:
    got = json.load(f)
  with open(os.path.join(uninterrupted, 'eval', 'test_summary.json')) as f:
    want = json.load(f)
  for key in ('count', 'dice_r_mean', 'iou_r_mean', 'dice_s_mean', 'iou_s_mean'):
    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6)

  # Prediction on a folder of new images with texts and CoTs, no masks.
  folder = tmp_path / 'new_images'
  folder.mkdir()
  source = os.path.join(uninterrupted, 'synthetic')
  with open(os.path.join(source, 'text.csv'), newline='') as f:
    texts = list(csv.reader(f))[1:4]
  with open(os.path.join(source, 'cot_output_no_mask.csv'), newline='') as f:
    cots = {row[0]: row[1] for row in list(csv.reader(f))[1:]}
  with open(folder / 'text.csv', 'w', newline='') as f:
    csv.writer(f).writerows([('image', 'text')] + texts)
  with open(folder / 'cot.csv', 'w', newline='') as f:
    stems = [os.path.splitext(name)[0] for name, _ in texts]
    csv.writer(f).writerows([('image', 'cot')] + [(s, cots[s]) for s in stems])
  for name, _ in texts:
    os.link(os.path.join(source, 'frames', name), folder / name)
  with open(os.path.join(workdir, 'config.json')) as f:
    trained = json.load(f)
  cli(workdir, '--mode=predict', f'--config.eval.predict_dir={folder}')
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == trained  # The config as trained, not this invocation's.
  with open(os.path.join(workdir, 'invocations.jsonl')) as f:
    last = json.loads(f.readlines()[-1])
  assert last['mode'] == 'predict'
  assert last['changed'] == {'eval.predict_dir': ['', str(folder)]}
  out = os.path.join(workdir, 'predictions', 'new_images')
  for stem in stems:
    assert os.path.exists(os.path.join(out, 'masks', f'{stem}.png'))
    with open(os.path.join(out, 'pages', f'{stem}.html')) as f:
      assert 'reference' in f.read().lower()

  # A required CoT missing: refused, naming the image, before any model work.
  os.remove(folder / 'cot.csv')
  result = cli(workdir, '--mode=predict', f'--config.eval.predict_dir={folder}',
               expect_ok=False)
  assert result.returncode != 0
  assert 'cot' in (result.stdout + result.stderr).lower()


def _copy_run(uninterrupted, tmp_path, name):
  workdir = str(tmp_path / name)
  shutil.copytree(uninterrupted, workdir)
  return workdir


def _truncate_steps(workdir, which, steps):
  """Cuts the array files of those checkpoint steps to 10 bytes (a partial copy, a full
  disk)."""
  for step in steps:
    files = glob.glob(os.path.join(workdir, 'checkpoints', which, str(step), 'state',
                                   'ocdbt.process_*', 'd', '*'))
    assert files
    for path in files:
      os.truncate(path, 10)


def _steps(workdir, which):
  folder = os.path.join(workdir, 'checkpoints', which)
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _files(workdir):
  """Every file of the workdir with its size and mtime."""
  found = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      stat = os.stat(os.path.join(root, name))
      found[os.path.relpath(os.path.join(root, name), workdir)] = (stat.st_size,
                                                                   stat.st_mtime_ns)
  return found


def test_one_writer_per_workdir_and_a_reader_beside_it(cli, uninterrupted, tmp_path):
  """A second writer stops at once naming the holder and writes nothing; eval reads beside
  the writer; a lock left by a process that is gone is taken over."""
  workdir = _copy_run(uninterrupted, tmp_path, 'locked')
  # The first writer: a process holding the workdir's lock as run.py's writing modes do.
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys\nfrom cers_jax.training import lock\n'
       f'with lock.WorkdirLock({workdir!r}, "train"):\n'
       '  print("held", flush=True); sys.stdin.read()'],
      cwd=REPO, env=cli.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    before = _files(workdir)
    for mode in ('train', 'prepare', 'predict'):
      line = _error_line(cli(workdir, f'--mode={mode}', expect_ok=False))
      assert f'is in use by another run (pid {holder.pid} on host' in line, line
      assert 'mode train, started' in line and 'another --workdir' in line
    assert _files(workdir) == before  # Not even invocations.jsonl was appended to.

    reader = cli(workdir, '--mode=eval')
    assert 'Traceback' not in reader.stderr
    with open(os.path.join(workdir, 'eval', 'test_summary.json')) as f:
      assert json.load(f)['count'] > 0
    assert holder.poll() is None  # The writer still holds the workdir.
  finally:
    holder.communicate('', timeout=60)

  with open(os.path.join(workdir, '.lock'), 'w') as f:  # As a process killed with -9 leaves it.
    json.dump(dict(host='node-7', pid=4242, mode='train', started='2026-01-01T00:00:00'), f)
  taken = cli(workdir, '--mode=prepare')
  assert 'Taking over the lock' in taken.stderr and 'pid 4242 on host node-7' in taken.stderr
  with open(os.path.join(workdir, '.lock')) as f:
    assert f.read() == ''  # Released at the end of the run.


def test_a_damaged_checkpoint_costs_one_checkpoint_not_the_run(cli, uninterrupted, tmp_path):
  workdir = _copy_run(uninterrupted, tmp_path, 'damaged')
  older, newest = _steps(workdir, 'latest')
  _truncate_steps(workdir, 'latest', [newest])

  result = cli(workdir, '--mode=eval', '--config.eval.which=latest')
  assert 'Traceback' not in result.stderr
  assert f"The 'latest' checkpoint of step {newest} is damaged (array " in result.stderr
  assert f"Using the 'latest' checkpoint of step {older} instead" in result.stderr
  with open(os.path.join(workdir, 'eval', 'test_summary.json')) as f:
    assert json.load(f)['step'] == older

  reference = _comparable(_metrics(uninterrupted))
  result = cli(workdir, '--mode=train')  # Resumes from the older step and finishes.
  assert 'Traceback' not in result.stderr
  assert (f'Resuming from step {older} (semi epoch 1) instead of step {newest}, whose '
          f'checkpoint is damaged: the {newest - older} steps in between run again'
          in result.stderr)
  redone = _comparable(_metrics(workdir))
  assert len(redone) == len(reference) + 1  # The last epoch ran again.
  for key, value in reference[-1].items():
    if isinstance(value, float):
      assert redone[-1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    else:
      assert redone[-1][key] == value, key
  assert _latest_meta(workdir)['stage'] == 'done'
  with open(os.path.join(workdir, 'invocations.jsonl')) as f:
    events = [json.loads(line) for line in f]
  damaged = [e for e in events if e.get('event') == 'damaged_checkpoint']
  assert [(e['mode'], e['which'], e['step']) for e in damaged] == [
      ('eval', 'latest', newest), ('train', 'latest', newest)]
  assert 'OUT_OF_RANGE' in damaged[0]['error']

  # Every step damaged: one line each, nothing deleted.
  _truncate_steps(workdir, 'latest', _steps(workdir, 'latest'))
  _truncate_steps(workdir, 'best', _steps(workdir, 'best'))
  kept = {which: _steps(workdir, which) for which in ('latest', 'best')}
  line = _error_line(cli(workdir, '--mode=train', expect_ok=False))
  assert "No intact 'latest' checkpoint is left" in line and 'Nothing was deleted' in line
  line = _error_line(cli(workdir, '--mode=eval', expect_ok=False))
  assert "No intact 'best' checkpoint is left" in line
  assert '--config.eval.which=latest' in line
  assert {which: _steps(workdir, which) for which in ('latest', 'best')} == kept


def test_prepare_mode_and_locked_config(cli, tmp_path):
  workdir = str(tmp_path / 'prepared')
  cli(workdir, '--mode=prepare')
  assert os.path.exists(os.path.join(workdir, 'data', 'split.json'))
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', 'latest'))
  result = cli(workdir, '--mode=prepare', '--config.train.batchsize=3', expect_ok=False)
  assert result.returncode != 0 and 'batchsize' in result.stderr

  # The retrieval report of a workdir without a pool runs warm-up first.
  cli(workdir, '--mode=retrieval', '--config.train.warmup_epochs=1')
  report = _report(os.path.join(workdir, 'retrieval'))
  assert (report['stage'], report['epoch']) == ('semi', 0)
  assert [(r['stage'], r['epoch']) for r in _metrics(workdir)] == [('warmup', 0)]

  # scripts/ablate.py table2 continues a warmed-up run in another pool mode: warm-up never
  # retrieves, so the resume check allows it (epochs=0: the check, not the training).
  cli(workdir, '--mode=train', '--config.train.warmup_epochs=1', '--config.pool.mode=image',
      '--config.train.epochs=0')
  with open(os.path.join(workdir, 'invocations.jsonl')) as f:
    last = json.loads(f.readlines()[-1])
  assert last['changed'] == {'pool.mode': ['image+cot', 'image'], 'train.epochs': [2, 0]}


def _report(folder):
  with open(os.path.join(folder, 'report.json')) as f:
    return json.load(f)


def test_retrieval_report_after_warmup_and_from_the_best_checkpoint(cli, uninterrupted):
  with open(os.path.join(uninterrupted, 'data', 'split.json')) as f:
    split = json.load(f)['ids']
  after_warmup = _report(os.path.join(uninterrupted, 'retrieval', 'after_warmup'))
  assert after_warmup['split'] == 'val' and after_warmup['stage'] == 'semi'
  assert after_warmup['num_queries'] == len(split['val'])
  assert after_warmup['pool_size'] == len(split['train_labeled'])

  cli(uninterrupted, '--mode=retrieval', '--config.eval.split=test')
  folder = os.path.join(uninterrupted, 'retrieval')
  report = _report(folder)
  assert report['split'] == 'test' and report['num_queries'] == len(split['test'])
  assert list(report['modes']) == ['random', 'image', 'cot', 'text', 'image+text', 'image+cot',
                                   'oracle']
  assert 'lesion_class' in report['labels']  # The synthetic generator's lesion kind.
  # Mean-pooled CoT features rank: no exact ties, scores spread out.
  assert report['problems'] == [], report['problems']
  for mode, m in report['modes'].items():
    assert 0.0 <= m['ref_mask_dice'] <= 1.0 and 0.0 <= m['label_match'] <= 1.0, mode
  oracle = report['modes']['oracle']['ref_mask_dice']
  assert all(m['ref_mask_dice'] <= oracle + 1e-9 for m in report['modes'].values())
  with open(os.path.join(folder, 'references.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(split['test']) * len(report['modes']) * report['k']
  assert {r['query'] for r in rows} == set(split['test'])
  assert not {r['reference'] for r in rows} - set(split['train_labeled'])
  with open(os.path.join(folder, 'report.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(uninterrupted, 'summary.json')) as f:
    summary = json.load(f)['retrieval']
  assert summary['image+cot']['ref_mask_dice'] == report['modes']['image+cot']['ref_mask_dice']
  assert list(summary) == list(report['modes'])


_EXAMPLES = """
import json, runpy, sys
sys.path.insert(0, {repo!r})
from tests.run_configs import tiny_run
workdir, image, report, cot, scratch = sys.argv[1:]
summary = runpy.run_path('examples/evaluate_checkpoint.py')['main'](workdir, 'test')
references = runpy.run_path('examples/retrieve_references.py')['main'](workdir, image, report,
                                                                       cot)
history = runpy.run_path('examples/custom_loop.py')['main'](scratch, '2',
                                                            config=tiny_run.get_config())
print('RESULT', json.dumps(dict(summary=summary, references=references, history=history)))
"""


def test_examples_restore_evaluate_retrieve_and_train(cli, uninterrupted, tmp_path):
  """The scripts in examples/ (the README's research-API snippets) run as written."""
  with open(os.path.join(uninterrupted, 'data', 'split.json')) as f:
    split = json.load(f)['ids']
  query = split['test'][0]
  synthetic = os.path.join(uninterrupted, 'synthetic')
  with open(os.path.join(synthetic, 'text.csv'), newline='') as f:
    report = {r['image']: r['text'] for r in csv.DictReader(f)}[f'{query}.png']
  with open(os.path.join(synthetic, 'cot_output_no_mask.csv'), newline='') as f:
    cot = {r['image']: r['cot'] for r in csv.DictReader(f)}[query]
  image = os.path.join(synthetic, 'frames', f'{query}.png')
  result = subprocess.run(
      [sys.executable, '-c', _EXAMPLES.format(repo=REPO), uninterrupted, image, report, cot,
       str(tmp_path / 'custom_loop')], cwd=REPO, env=cli.env, capture_output=True, text=True,
      timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
  out = json.loads(result.stdout.split('RESULT ', 1)[1])
  with open(os.path.join(uninterrupted, 'eval', 'test_summary.json')) as f:
    scored = json.load(f)
  # The best checkpoint, restored by the example, scores the test split as --mode=eval did.
  assert out['summary']['count'] == scored['count']
  assert np.isclose(out['summary']['dice_r_mean'], scored['dice_r_mean'], atol=1e-6)
  # A test image retrieves k labeled training images, as in the model.
  assert len(out['references']) == 3
  assert {ref for ref, _ in out['references']} <= set(split['train_labeled'])
  stages = [h['stage'] for h in out['history']]
  assert stages == ['warmup', 'warmup', 'semi', 'semi']
  assert all(np.isfinite(h['loss']) for h in out['history'])
  assert 'consistency_weighted' in out['history'][-1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _predictions(workdir):
  with open(os.path.join(workdir, 'predictions', 'predictions.csv'), newline='') as f:
    return list(csv.DictReader(f))


def test_two_processes_run_the_job_as_one_host_would(cli, tmp_path):
  """Multi-host through `run.py --distributed`: two processes with one CPU device each
  train, evaluate and predict. Files are written once, each process's data position is
  checkpointed, and the model they trained predicts in one process as it did in two."""
  workdir = str(tmp_path / 'two_processes')
  port = _free_port()
  procs = []
  for process_id in (1, 0):
    log = open(tmp_path / f'process_{process_id}.log', 'w')
    procs.append((process_id, log, subprocess.Popen(
        [sys.executable, 'run.py', f'--config={CONFIG}', f'--workdir={workdir}',
         '--distributed', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
         f'--process_id={process_id}', '--config.train.warmup_epochs=1',
         '--config.train.epochs=1'],
        cwd=REPO, env=cli.env, stdout=log, stderr=subprocess.STDOUT)))
  for process_id, log, proc in procs:
    try:
      proc.wait(timeout=900)
    finally:
      proc.kill()
      log.close()
    with open(log.name) as f:
      assert proc.returncode == 0, f'process {process_id}:\n' + f.read()[-6000:]

  assert [(r['stage'], r['epoch']) for r in _metrics(workdir)] == [('warmup', 0),
                                                                   ('semi', 0)]
  with open(os.path.join(workdir, 'data', 'split.json')) as f:
    split = json.load(f)
  with open(os.path.join(workdir, 'eval', 'test_per_image.csv')) as f:
    evaluated = [row['id'] for row in csv.DictReader(f)]
  assert sorted(evaluated) == sorted(split['ids']['test'])  # None lost, none twice.
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  with open(os.path.join(latest, max(os.listdir(latest), key=int), 'meta', 'metadata')) as f:
    iterators = json.load(f)['iterators']
  assert {name: len(states) for name, states in iterators.items()} == {'labeled': 2,
                                                                       'unlabeled': 2}

  two = _predictions(workdir)
  cli(workdir, '--mode=predict')  # One process, same best checkpoint.
  one = _predictions(workdir)
  assert [r['id'] for r in one] == [r['id'] for r in two] and len(one) > 0
  for a, b in zip(one, two):
    assert a['retrieved_ids'] == b['retrieved_ids']
    assert float(a['mean_prob']) == pytest.approx(float(b['mean_prob']), rel=1e-5)
