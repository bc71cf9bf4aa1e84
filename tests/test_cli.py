"""User errors through the real command lines (cers_jax/cli.py, run.py, benchmarks/*.py).

Every mistake a new user makes with flags, configs, workdirs or datasets must end in one
line, `error: <the problem and the fix>`, a non-zero exit status and no traceback, and must
leave nothing half-written. Each call is a fresh process, as a user would run it; none of
them trains.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # Every test starts run.py or a benchmark as a process.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join('tests', 'run_configs', 'tiny_run.py')
# PYTHONPATH: a benchmark run as a script must import this checkout's cers_jax too.
ENV = dict(os.environ, JAX_PLATFORMS='cpu', TQDM_DISABLE='1', PYTHONPATH=REPO)


def _run(*args, prefix=(), timeout=600):
  return subprocess.run([*prefix, sys.executable, *args], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def _run_py(workdir, *flags, **kwargs):
  return _run('run.py', f'--config={CONFIG}', f'--workdir={workdir}', *flags, **kwargs)


def _one_error_line(result) -> str:
  """The single `error:` line of a failed run (and no traceback)."""
  assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-4000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, result.stderr[-4000:]
  return errors[0]


@pytest.mark.parametrize('script', ['run.py', 'benchmarks/train_step.py',
                                    'benchmarks/input_pipeline.py', 'benchmarks/retrieval.py'])
def test_help_exits_zero(script):
  result = _run(script, '--help')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'usage' in (result.stdout + result.stderr).lower() or '--' in result.stdout


@pytest.mark.parametrize('flag,expected', [
    ('--config.train.learning_rat=0.1',
     '--config.train.learning_rat: no such field: \'learning_rat\' Did you mean '
     '"learning_rate"'),
    ('--config.trian.epochs=3', '--config.trian.epochs: no such field'),
    ('--config.train.batch_size=four', "--config.train.batch_size=four: invalid literal"),
])
def test_a_misspelt_config_field_is_one_line(tmp_path, flag, expected):
  result = _run_py(tmp_path / 'w', '--mode=prepare', flag)
  line = _one_error_line(result)
  assert expected in line
  assert not (tmp_path / 'w').exists()


def test_a_config_file_that_does_not_exist_is_one_line(tmp_path):
  result = _run('run.py', '--config=configs/nope.py', f'--workdir={tmp_path / "w"}')
  assert 'configs/nope.py' in _one_error_line(result)


def test_a_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'runs'
  path.write_text('not a directory')
  line = _one_error_line(_run_py(path, '--mode=prepare'))
  assert f'--workdir {path} is a file, not a directory' in line
  assert path.read_text() == 'not a directory'


def _without_root_override() -> tuple[str, ...]:
  """A command prefix under which root, too, is refused writing to a read-only folder."""
  if os.geteuid() != 0:
    return ()
  setpriv = shutil.which('setpriv')
  if setpriv is None:
    pytest.skip('running as root without setpriv: file permissions do not apply to root')
  return (setpriv, '--bounding-set=-dac_override', '--inh-caps=-dac_override', '--')


def test_a_read_only_workdir(tmp_path):
  workdir = tmp_path / 'finished_run'
  workdir.mkdir()
  workdir.chmod(0o555)
  try:
    line = _one_error_line(_run_py(workdir, '--mode=prepare', prefix=_without_root_override()))
  finally:
    workdir.chmod(0o755)
  assert f'--workdir {workdir} is not a writable directory (Permission denied)' in line
  assert os.listdir(workdir) == []


def test_no_labeled_images_is_one_line_and_writes_no_split(tmp_path):
  workdir = tmp_path / 'w'
  line = _one_error_line(_run_py(workdir, '--mode=prepare',
                                 '--config.data.labeled_fraction=0'))
  assert 'labeled_fraction=0.0 leaves none of the' in line
  assert 'raise --config.data.labeled_fraction' in line
  assert not (workdir / 'data' / 'split.json').exists()
  assert not (workdir / 'config.json').exists()


def _dataset(root, *, texts=True):
  """A CERS flat-layout folder of 12 images whose lesions are drawn in pure red, with
  report texts (unless texts=False) and CoTs written without the mask only."""
  (root / 'frames').mkdir(parents=True)
  (root / 'masks').mkdir()
  rng = np.random.default_rng(0)
  rows_text, rows_cot = [], []
  for i in range(12):
    Image.fromarray(rng.integers(0, 255, (32, 32), np.uint8)).save(
        root / 'frames' / f'case{i}.png')
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[8:20, 8:20] = (255, 0, 0)  # Grey level 76: under the threshold if read as grey.
    Image.fromarray(mask).save(root / 'masks' / f'case{i}.png')
    rows_text.append(f'case{i}.png,lesion number {i} in the upper left')
    rows_cot.append(f'case{i},"Texture: t{i}\nBoundary: b\nContext: c\nSummary: s"')
  if texts:
    (root / 'text.csv').write_text('image,text\n' + '\n'.join(rows_text) + '\n')
  (root / 'cot_output_no_mask.csv').write_text('image,cot\n' + '\n'.join(rows_cot) + '\n')


def _bump_mtime(path):
  """An edit within the file system's mtime resolution must still be noticed."""
  stat = os.stat(path)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def test_prepare_reads_colour_masks_counts_missing_cots_and_notices_edits(tmp_path):
  """Three `--mode=prepare` runs: red masks are lesions, images without their CoT are
  counted (refused with data.require_cot), files edited in place are decoded again and
  the split stays as it was."""
  root, workdir = tmp_path / 'ds', tmp_path / 'w'
  _dataset(root)
  flags = ('--mode=prepare', '--config.synthetic.num_images=0', f'--config.data.root={root}')
  first = _run_py(workdir, *flags)
  assert first.returncode == 0, first.stderr[-4000:]
  data = workdir / 'data'
  report, split = _read_json(data / 'report.json'), (data / 'split.json').read_bytes()
  labeled = json.loads(split)['ids']['train_labeled']
  row = {s['id']: s['row'] for s in _read_json(data / 'samples.json')}
  masks = np.load(data / 'masks.npy')
  assert report['counts']['empty_masks'] == 0 and all(m.any() for m in masks)
  # No CoT written with the mask: the labeled images query with an all-padding CoT.
  assert report['counts']['without_query_cot'] == {
      'train_labeled': len(labeled), 'train_unlabeled': 0, 'val': 0, 'test': 0}
  assert f'{len(labeled)} images have no CoT for their role' in first.stderr

  # Edited in place (same paths): one mask emptied, one image inverted.
  edited_mask, edited_image = root / 'masks' / f'{labeled[0]}.png', root / 'frames' / 'case5.png'
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(edited_mask)
  Image.fromarray(255 - np.asarray(Image.open(edited_image))).save(edited_image)
  _bump_mtime(edited_mask)
  _bump_mtime(edited_image)
  second = _run_py(workdir, *flags)
  assert second.returncode == 0, second.stderr[-4000:]
  report = _read_json(data / 'report.json')
  assert report['reused'] == {'split': True, 'cache': False}
  assert sorted(report['cache_rows_rebuilt']) == sorted([labeled[0], 'case5'])
  assert sorted(report['cache_changed_files']) == sorted([str(edited_mask), str(edited_image)])
  assert (data / 'split.json').read_bytes() == split
  masks = np.load(data / 'masks.npy')
  untouched = next(i for i in row if i not in (labeled[0], 'case5'))
  assert not masks[row[labeled[0]]].any() and masks[row[untouched]].any()

  line = _one_error_line(_run_py(workdir, *flags, '--config.data.require_cot=True'))
  assert f'{len(labeled)} images have no CoT for their role' in line
  assert '--config.data.cot_mask_csv' in line


def test_a_dataset_without_report_texts_is_one_line(tmp_path):
  _dataset(tmp_path / 'ds', texts=False)
  result = _run_py(tmp_path / 'w', '--mode=train', '--config.synthetic.num_images=0',
                   f'--config.data.root={tmp_path / "ds"}')
  line = _one_error_line(result)
  assert 'None of the 12 images' in line and '--config.data.text_csv' in line
  assert not (tmp_path / 'w' / 'checkpoints').exists()


@pytest.mark.parametrize('mode', ['eval', 'predict'])
def test_evaluating_an_empty_workdir_refuses_before_any_work(tmp_path, mode):
  workdir = tmp_path / 'never_trained'
  line = _one_error_line(_run_py(workdir, f'--mode={mode}'))
  assert "No 'best' checkpoint in" in line and 'train first (--mode=train)' in line
  # Refused before the synthetic data, the split or the tokenizers were made.
  assert not workdir.exists()


# Start-up lines of libraries that say nothing about the run (cers_jax/cli.py
# quiet_library_start_up; the orbax save warning is gone with synchronous saves).
_LIBRARY_NOISE = ("PyTorch was not found", "Unable to initialize backend",
                  'Waiting for previous save to complete')
# run.py as a user without torch runs it (the test extra installs torch, and transformers
# prints its line only without it), letting JAX probe every platform (no JAX_PLATFORMS).
_WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                  "runpy.run_path('run.py', run_name='__main__')")


def test_a_run_prints_our_lines_and_no_library_start_up_noise(tmp_path):
  env = {k: v for k, v in ENV.items()
         if k not in ('JAX_PLATFORMS', 'TRANSFORMERS_NO_ADVISORY_WARNINGS')}
  # The control: without run.py, the same interpreter set-up does print transformers' line.
  control = subprocess.run(
      [sys.executable, '-c', "import sys; sys.modules['torch'] = None; import transformers"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert 'PyTorch was not found' in control.stderr, control.stderr[-2000:]

  workdir, cache = tmp_path / 'w', tmp_path / 'cache'
  result = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TORCH, 'run.py', f'--config={CONFIG}',
       f'--workdir={workdir}', '--mode=prepare', f'--compilation_cache={cache}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  output = result.stdout + result.stderr
  for noise in _LIBRARY_NOISE:
    assert noise not in output, output[-4000:]
  for ours in (f'Compilation cache: {cache}', 'Split: train_labeled', 'WordPiece tokenizer',
               'Data problems'):
    assert ours in output, (ours, output[-4000:])
  assert cache.is_dir()


def test_the_compilation_cache_can_be_turned_off(tmp_path):
  result = _run_py(tmp_path / 'w', '--mode=prepare', '--compilation_cache=')
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'Compilation cache: off' in result.stderr


def test_an_unwritable_default_cache_runs_without_it(tmp_path):
  """A home whose cache folder cannot be created must not stop a run; a folder the user
  names explicitly is an error there."""
  blocker = tmp_path / 'cache_home'
  blocker.write_text('a file where the cache folder would go')
  env = dict(os.environ, XDG_CACHE_HOME=str(blocker), JAX_PLATFORMS='cpu')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  result = subprocess.run([sys.executable, 'run.py', f'--config={CONFIG}',
                           f'--workdir={tmp_path / "w"}', '--mode=prepare'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'No compilation cache' in result.stderr and 'Compilation cache: off' in result.stderr
  named = subprocess.run([sys.executable, 'run.py', f'--config={CONFIG}',
                          f'--workdir={tmp_path / "w2"}', '--mode=prepare',
                          f'--compilation_cache={blocker / "jax"}'],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert named.returncode == 2 and 'cannot write there' in named.stderr, named.stderr[-2000:]
