"""The device call's dry run (scripts/gpu_preflight.py) and the checks it is built from: the
simulated image (scripts/image_sim), what comes back from $OUT, the backend check."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, 'scripts')


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


preflight = _script('gpu_preflight')


def _in_image(code, image_list, tmp_path):
  """Runs `code` in a fresh interpreter that may import only what `image_list` names."""
  listing = tmp_path / 'image.txt'
  listing.write_text('\n'.join(image_list) + '\n')
  env = dict(os.environ, PYTHONPATH=os.path.join(SCRIPTS, 'image_sim'),
             CERS_IMAGE_PACKAGES=str(listing))
  return subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)


def test_the_simulated_image_refuses_what_its_list_lacks(tmp_path):
  code = ('import numpy\n'
          'try:\n'
          '  import nibabel\n'
          'except ModuleNotFoundError as e:\n'
          '  print("refused:", e)\n'
          'else:\n'
          '  print("imported nibabel")\n')
  result = _in_image(code, ['numpy==2.5.2', '# a comment', 'packaging'], tmp_path)
  assert result.returncode == 0, result.stderr
  assert "refused: No module named 'nibabel' (the GPU image has no nibabel" in result.stdout
  # With the package on the list, the same import works: the refusal is the list's.
  result = _in_image(code, ['numpy', 'nibabel', 'packaging'], tmp_path)
  assert 'imported nibabel' in result.stdout, result.stderr
  # The standard library needs no listing.
  assert _in_image('import json, sqlite3', [], tmp_path).returncode == 0


def test_the_project_imports_in_the_simulated_image(tmp_path):
  """What gpu_env_check.py imports first, in the image less the travelling wheels' packages:
  exactly those are refused (grain, ml-collections), nothing else."""
  env = dict(os.environ, PYTHONPATH=os.path.join(SCRIPTS, 'image_sim') + os.pathsep + REPO,
             CERS_IMAGE_PACKAGES=preflight.IMAGE_LIST, CERS_EXPECT_BACKEND='cpu',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'gpu_env_check.py')],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 4, result.stdout + result.stderr
  failed = result.stderr.split('cannot import ')[1]
  assert "No module named 'grain'" in failed and "No module named 'ml_collections'" in failed
  for module in ('nibabel', 'tensorboardX', 'openpyxl', 'monai'):
    assert f"No module named '{module}'" not in failed, failed


def test_the_backend_check_stops_a_cpu_fallback(tmp_path):
  env = dict(os.environ, CERS_EXPECT_BACKEND='gpu', JAX_PLATFORMS='cpu', OUT=str(tmp_path))
  result = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'gpu_env_check.py')],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 3, result.stdout + result.stderr
  assert "JAX runs on 'cpu', not 'gpu'" in result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('== python ') and lines[1].startswith('   jax: ')  # First.
  report = json.loads((tmp_path / 'env.json').read_text())
  assert report['backend'] == 'cpu' and report['versions']['flax']


def _complete_out(out):
  out.mkdir()
  for name in ('gpu_run.log', 'brisc_summary.txt'):
    (out / name).write_text('log\n')
  (out / 'env.json').write_text(json.dumps(dict(failed_imports=[])))
  rows = [dict(step='semi-supervised')] * 4
  (out / 'train_step.json').write_text(json.dumps(
      dict(meta=dict(dtypes=['bfloat16']), items=rows, complete=True)))
  (out / 'retrieval.json').write_text(json.dumps(dict(meta={}, items=[{}], complete=True)))
  run = out.parent / 'run'
  for name in preflight.EXPECTED_IN_RUN:
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).write_text('{}')
  subprocess.run(['tar', '-czf', str(out / 'brisc_run.tar.gz'), '-C', str(run),
                  *preflight.EXPECTED_IN_RUN], check=True)


def test_what_would_not_come_back_from_out_is_named(tmp_path):
  out = tmp_path / 'out'
  _complete_out(out)
  assert preflight.check_out(str(out)) == []
  (out / 'train_step.json').write_text(json.dumps(
      dict(meta=dict(dtypes=['bfloat16', 'float32']), items=[{}] * 5, complete=False)))
  (out / 'a' / 'b' / 'c').mkdir(parents=True)
  (out / 'a' / 'b' / 'c' / 'deep.txt').write_text('x')
  (out / 'odd name.txt').write_text('x')
  (out / 'retrieval.json').unlink()
  problems = '\n'.join(preflight.check_out(str(out)))
  assert 'train_step.json: 5 rows, complete=False (expected 8+ rows' in problems
  assert 'deep.txt: more than 2 folders down' in problems
  assert "odd name.txt: a name the device tool does not copy" in problems
  assert '$OUT/retrieval.json is missing' in problems
  for i in range(4):
    (out / f'extra{i}.txt').write_text('x')
  assert 'over 8' in '\n'.join(preflight.check_out(str(out)))


@pytest.mark.slow
def test_the_preflight_fails_when_the_image_lacks_a_package(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'gpu_preflight.py'),
                           '--work', str(tmp_path), '--without', 'grain'], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-4000:]
  assert "No module named 'grain' (the GPU image has no grain" in output
  assert 'FAILED: gpu_run.sh ended with 4' in output  # The import check, in seconds.
  assert 'FAILED: $OUT/train_step.json is missing' in output


@pytest.mark.slow
def test_the_preflight_passes(tmp_path):
  """The device call, dry, as the last step before any device call: every stage passes and
  every file lands in $OUT within the device's 600 s per command."""
  result = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'gpu_preflight.py'),
                           '--work', str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-6000:]
  assert '== pre-flight passed' in output
  for stage in ('train_step', 'tests', 'retrieval', 'brisc'):
    assert f'== {stage}: exit 0 after' in output, stage
  assert sorted(os.listdir(tmp_path / 'out')) == sorted(preflight.EXPECTED)
  summary = (tmp_path / 'out' / 'brisc_summary.txt').read_text()
  assert 'Test (' in summary and 'Retrieval report after_warmup' in summary
