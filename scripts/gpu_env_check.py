"""The first seconds of every device command: the stack's versions, its imports, the backend.

  python3 scripts/gpu_env_check.py [MODULE ...]        # run by scripts/_gpu_env.sh

1. Prints (and writes to $OUT/env.json where OUT is set) the Python version and the
   version of every distribution the project runs on, `pip show`-style, with a warning for
   each one outside pyproject.toml's tested range: the GPU image's versions were never read
   before its first call, so they come back with it.
2. Imports the libraries, the project's own entry points (what run.py, the benchmarks and
   the evaluators import) and each MODULE given, and stops naming every one that fails.
3. Stops unless JAX's backend is $CERS_EXPECT_BACKEND (default `gpu`): a machine whose
   CUDA plugin did not load would otherwise run everything on its CPU and time that.
   scripts/gpu_preflight.py sets it to `cpu` for the dry run.

Exit status: 0 when all is well, 3 on a wrong backend, 4 on a failed import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the device commands use, in the order a reader looks for them.
DISTRIBUTIONS = (
    'jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'jax-cuda12-plugin',
    'jax-cuda12-pjrt', 'flax', 'optax', 'orbax-checkpoint', 'chex', 'grain',
    'array-record', 'ml-collections', 'absl-py', 'transformers', 'tokenizers',
    'safetensors', 'numpy', 'scipy', 'pillow', 'pandas', 'matplotlib', 'tqdm', 'nibabel',
    'tensorboardX', 'pytest', 'torch')
LIBRARIES = ('jax', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'chex', 'ml_collections',
             'absl', 'transformers', 'tokenizers', 'safetensors', 'PIL', 'matplotlib', 'tqdm',
             'scipy')
# The project's own entry points: a module that imports an absent package fails here, in
# seconds, rather than minutes into the call.
PROJECT = ('run', 'cers_jax.training.loop', 'cers_jax.inference.predict',
           'cers_jax.inference.evaluators', 'cers_jax.data.prepare', 'configs.brisc_gpu')
WRONG_BACKEND, FAILED_IMPORT = 3, 4


def _tested_ranges() -> dict[str, object]:
  """{canonical name: SpecifierSet} of pyproject.toml's runtime dependencies."""
  try:
    import tomllib  # pylint: disable=g-import-not-at-top
    from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
    from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top
  except ImportError:  # Python < 3.11 or no packaging: versions are still printed.
    return {}
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  ranges = {}
  for line in project['dependencies']:
    requirement = Requirement(line)
    ranges[canonicalize_name(requirement.name)] = requirement.specifier
  return ranges


def versions() -> tuple[dict[str, str | None], list[str]]:
  """({distribution: version or None when absent}, warnings for versions out of range)."""
  ranges = _tested_ranges()
  found, warnings = {}, []
  for name in DISTRIBUTIONS:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
      continue
    key = name.lower().replace('_', '-')
    if key in ranges and not ranges[key].contains(found[name], prereleases=True):
      warnings.append(f'{name} {found[name]} is outside the tested range {ranges[key]} '
                      '(pyproject.toml)')
  return found, warnings


def failed_imports(modules) -> list[str]:
  failed = []
  for name in modules:
    try:  # Import, not just find: a wheel whose own requirement is absent fails here.
      importlib.import_module(name)
    except Exception as error:  # pylint: disable=broad-except
      failed.append(f'{name} ({type(error).__name__}: {error})')
  return failed


def main(argv: list[str]) -> int:
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  found, warnings = versions()
  print(f'== python {platform.python_version()} ({sys.executable}), '
        f'{platform.machine()}', flush=True)
  for name, version in found.items():
    print(f'   {name}: {version or "(not installed)"}')
  for warning in warnings:
    print(f'warning: {warning}')
  failed = failed_imports((*LIBRARIES, *PROJECT, *argv[1:]))
  report = dict(python=platform.python_version(), versions=found, warnings=warnings,
                failed_imports=failed)
  status = 0
  if failed:
    print(f'error: cannot import {failed}; bring the missing packages as wheels '
          '(scripts/gpu_wheels.txt, benchmarks/README.md "The device call")', file=sys.stderr)
    status = FAILED_IMPORT
  else:
    import jax  # pylint: disable=g-import-not-at-top
    expected = os.environ.get('CERS_EXPECT_BACKEND', 'gpu')
    report.update(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()])
    print(f'== backend {jax.default_backend()}, devices {jax.devices()}', flush=True)
    if jax.default_backend() != expected:
      print(f'error: JAX runs on {jax.default_backend()!r}, not {expected!r}: its CUDA plugin '
            'did not load (see the warnings above), so every timing would be the CPU\'s. '
            'Set CERS_EXPECT_BACKEND=cpu only for a dry run.', file=sys.stderr)
      status = WRONG_BACKEND
  if os.environ.get('OUT'):
    with open(os.path.join(os.environ['OUT'], 'env.json'), 'w') as f:
      json.dump(report, f, indent=2)
  return status


if __name__ == '__main__':
  sys.exit(main(sys.argv))
