"""The last thing to run before any device call: the call itself, dry, in a simulated GPU image.

  python scripts/gpu_preflight.py                 # about 5-8 minutes on a 2-core CPU
  python scripts/gpu_preflight.py --without grain # must fail: a package the image lacks

A device machine is lent rarely and briefly, starts bare, and has no network: a call that
dies on an import or loses its results to a time limit costs the whole lease. This script
runs what the device call runs (`bash scripts/gpu_run.sh --quick`: the env check, the
train-step and retrieval benchmarks, the GPU tests, a BRISC-layout run of run.py and its
summary) on this machine's CPU, in an environment that imports only what the image has:

1. the wheels of scripts/gpu_wheels.txt, at those versions, built for this Python, are
   installed by scripts/_gpu_env.sh exactly as on the device (pip install --no-index
   --target), from a folder that stands in for the carried `.whl`;
2. every process of the run starts with scripts/image_sim/sitecustomize.py, which refuses any
   module of a distribution that scripts/gpu_image.txt (the image's package list) lacks;
3. a stand-in BRISC pack (synthetic images in BRISC's Kaggle layout with the CSVs' names,
   packed by scripts/pack_brisc.py) replaces .brisc_pack;
4. the backend check expects `cpu` (CERS_EXPECT_BACKEND) instead of `gpu`.

Then it checks what the device would bring back: the run's exit status, every expected file
in $OUT with the JSON complete, $OUT within the tool's limits (at most 8 files, 2 folders
deep, plain names, 16 MiB a file, 64 MiB in all), the whole run within --limit-s (the
device's 600 s per command), and the working tree that would travel within 64 MiB.

What it cannot simulate: the image's own versions of the packages (jax 0.11.2 there; the
registry here stops at an older one) and anything the GPU itself does (TF32 matmuls,
memory). The device call's env.json reports the former at its first second.

`--without NAME` removes NAME from both the image list and the wheels, for the test that
the pre-flight fails when a package is missing. Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, 'scripts')
IMAGE_LIST = os.path.join(SCRIPTS, 'gpu_image.txt')
WHEEL_LIST = os.path.join(SCRIPTS, 'gpu_wheels.txt')
# What the device tool brings back from $OUT.
OUT_MAX_FILES, OUT_MAX_DEPTH = 8, 2
OUT_MAX_FILE_BYTES, OUT_MAX_BYTES = 16 * 2**20, 64 * 2**20
OUT_NAME = re.compile(r'^[A-Za-z0-9._-]+$')
TREE_MAX_BYTES = 64 * 2**20
EXPECTED = ('gpu_run.log', 'env.json', 'train_step.json', 'retrieval.json',
            'brisc_summary.txt', 'brisc_run.tar.gz')
EXPECTED_IN_RUN = ('gpu_brisc.log', 'metrics.jsonl', 'summary.json', 'config.json',
                   'eval/test_summary.json', 'retrieval/after_warmup/report.json')
# Rows of train_step.json per compute dtype: semi-supervised, warm-up, eval, retrieval.
STEPS_PER_DTYPE = 4


def _requirements(path: str) -> list[str]:
  lines = []
  with open(path) as f:
    for line in f:
      line = line.split('#', 1)[0].strip()
      if line:
        lines.append(line)
  return lines


def _name(requirement: str) -> str:
  return re.sub(r'[-_.]+', '-', re.split(r'[=<>!~ \[;]', requirement, 1)[0]).lower()


def fetch_wheels(dest: str, without: set[str]) -> list[str]:
  """The travelling wheels' versions, built for this interpreter, into `dest` (a pip cache
  keeps the download to once per machine)."""
  wanted = [r for r in _requirements(WHEEL_LIST) if _name(r) not in without]
  os.makedirs(dest, exist_ok=True)
  if wanted:
    subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps',
                    '--only-binary=:all:', '-d', dest, *wanted], check=True)
  return wanted


def image_list(dest: str, without: set[str]) -> str:
  """scripts/gpu_image.txt less `without`, written to `dest`."""
  kept = [r for r in _requirements(IMAGE_LIST) if _name(r) not in without]
  with open(dest, 'w') as f:
    f.write('\n'.join(kept) + '\n')
  return dest


def stand_in_pack(work: str, *, num_images: int = 100, size: int = 32) -> str:
  """A BRISC-layout pack of synthetic images: what .brisc_pack is to the real call."""
  sys.path.insert(0, REPO)
  sys.path.insert(0, SCRIPTS)
  from cers_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  import pack_brisc  # pylint: disable=g-import-not-at-top

  flat = os.path.join(work, 'synthetic')
  synthetic.generate_synthetic(flat, num_images=num_images, image_size=size)
  source = os.path.join(work, 'brisc_source')
  for sub in ('images', 'masks'):
    shutil.copytree(os.path.join(flat, 'frames' if sub == 'images' else 'masks'),
                    os.path.join(source, 'segmentation_task', 'train', sub))
  # The synthetic CSVs under the names of the authors' BRISC CSVs.
  for ours, theirs in zip(('text.csv', 'cot_output_mask.csv', 'cot_output_no_mask.csv'),
                          pack_brisc.CSV_FILES):
    shutil.copy(os.path.join(flat, ours), os.path.join(source, theirs))
  pack = os.path.join(work, 'brisc_pack')
  pack_brisc.pack(source, pack, size=size, progress=False)
  return pack


def check_out(out: str) -> list[str]:
  """What would not come back, or not as expected, from the device's $OUT."""
  problems, files, total = [], [], 0
  for root, dirs, names in os.walk(out):
    depth = os.path.relpath(root, out).count(os.sep) + (root != out)
    for name in dirs + names:
      if not OUT_NAME.match(name):
        problems.append(f'{os.path.join(root, name)}: a name the device tool does not copy')
    for name in names:
      path = os.path.join(root, name)
      files.append(os.path.relpath(path, out))
      size = os.path.getsize(path)
      total += size
      if depth > OUT_MAX_DEPTH:
        problems.append(f'{path}: more than {OUT_MAX_DEPTH} folders down')
      if size > OUT_MAX_FILE_BYTES:
        problems.append(f'{path}: {size / 2**20:.1f} MiB, over 16 MiB')
  if len(files) > OUT_MAX_FILES:
    problems.append(f'$OUT holds {len(files)} files, over {OUT_MAX_FILES}: {sorted(files)}')
  if total > OUT_MAX_BYTES:
    problems.append(f'$OUT holds {total / 2**20:.1f} MiB, over 64 MiB')
  for name in EXPECTED:
    if name not in files:
      problems.append(f'$OUT/{name} is missing')
  problems += _check_json(out)
  tar_path = os.path.join(out, 'brisc_run.tar.gz')
  if os.path.exists(tar_path):
    with tarfile.open(tar_path) as tar:
      held = set(tar.getnames())
    problems += [f'brisc_run.tar.gz lacks {name}' for name in EXPECTED_IN_RUN
                 if name not in held]
  return problems


def _check_json(out: str) -> list[str]:
  problems = []
  path = os.path.join(out, 'env.json')
  if os.path.exists(path):
    with open(path) as f:
      env = json.load(f)
    if env.get('failed_imports'):
      problems.append(f'env.json: failed imports {env["failed_imports"]}')
  for name in ('train_step.json', 'retrieval.json'):
    path = os.path.join(out, name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      result = json.load(f)
    rows = STEPS_PER_DTYPE * len(result['meta']['dtypes']) if name == 'train_step.json' else 1
    if not result.get('complete') or len(result.get('items', [])) < rows:
      problems.append(f'{name}: {len(result.get("items", []))} rows, complete='
                      f'{result.get("complete")} (expected {rows}+ rows, complete)')
  return problems


def travelling_tree_bytes(carry: list[str]) -> int:
  """Bytes of what a device call sends: tracked and untracked-not-ignored files, and carry."""
  listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others',
                           '--exclude-standard'], cwd=REPO, capture_output=True, check=True)
  paths = [os.path.join(REPO, p) for p in listed.stdout.decode().split('\0') if p]
  total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
  for folder in carry:
    for root, _, names in os.walk(folder):
      total += sum(os.path.getsize(os.path.join(root, n)) for n in names)
  return total


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--work', default='', help='folder for the dry run (default: a new '
                      'temporary one, removed afterwards unless --keep)')
  parser.add_argument('--keep', action='store_true', help='keep the work folder')
  parser.add_argument('--limit-s', type=int, default=600,
                      help="the device's limit for one command (s)")
  parser.add_argument('--without', action='append', default=[],
                      help='a distribution to take out of the simulated image (repeatable)')
  args = parser.parse_args(argv)
  without = {_name(n) for n in args.without}
  work = args.work or tempfile.mkdtemp(prefix='cers_preflight_')
  os.makedirs(work, exist_ok=True)
  try:
    return _dry_run(work, args.limit_s, without)
  finally:
    if not args.keep and not args.work:
      shutil.rmtree(work, ignore_errors=True)


def _dry_run(work: str, limit_s: int, without: set[str]) -> int:
  start = time.perf_counter()
  wheels = os.path.join(work, 'whl')
  print(f'== pre-flight in {work}: wheels {fetch_wheels(wheels, without)}'
        f'{", without " + ", ".join(sorted(without)) if without else ""}', flush=True)
  pack = stand_in_pack(work)
  out = os.path.join(work, 'out')
  os.makedirs(out, exist_ok=True)
  env = dict(
      os.environ,
      # The venv's python3 first: the scripts call `python3`, as the image's is called.
      PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''),
      PYTHONPATH=os.path.join(SCRIPTS, 'image_sim'),
      CERS_IMAGE_PACKAGES=image_list(os.path.join(work, 'image.txt'), without),
      CERS_WHEELS=wheels, CERS_SITE=os.path.join(work, 'site'),
      CERS_EXPECT_BACKEND='cpu', JAX_PLATFORMS='cpu', OUT=out,
      WORKDIR=os.path.join(work, 'brisc_run'))
  env.pop('PYTHONSTARTUP', None)
  print(f'== bash scripts/gpu_run.sh --quick {pack} (limit {limit_s} s)', flush=True)
  run_start = time.perf_counter()
  try:
    status = subprocess.run(['bash', os.path.join(SCRIPTS, 'gpu_run.sh'), '--quick', pack],
                            cwd=REPO, env=env, timeout=limit_s).returncode
  except subprocess.TimeoutExpired:
    status = 'timed out'
  seconds = time.perf_counter() - run_start
  problems = [] if status == 0 else [f'gpu_run.sh ended with {status}']
  if seconds > limit_s:
    problems.append(f'the run took {seconds:.0f} s, over the {limit_s} s limit')
  problems += check_out(out)
  tree = travelling_tree_bytes([p for p in (os.path.join(REPO, '.whl'),
                                            os.path.join(REPO, '.brisc_pack'))
                                if os.path.isdir(p)])
  if tree > TREE_MAX_BYTES:
    problems.append(f'the tree a device call sends is {tree / 2**20:.1f} MiB, over 64 MiB')
  print(f'== pre-flight: gpu_run.sh {seconds:.0f} s (limit {limit_s}), all '
        f'{time.perf_counter() - start:.0f} s; tree to send {tree / 2**20:.1f} MiB; $OUT: '
        f'{sorted(os.listdir(out))}')
  for problem in problems:
    print(f'FAILED: {problem}')
  print('== pre-flight ' + ('FAILED' if problems else 'passed'))
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
