"""The environment of the `run.py` subprocesses that the end-to-end tests start."""

import os


def run_env(compilation_cache: str) -> dict[str, str]:
  """CPU only, no progress bars, and the test session's compilation cache (conftest.py), so
  that only the first process to compile a program pays for it."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TQDM_DISABLE='1')
  if compilation_cache:
    env['JAX_COMPILATION_CACHE_DIR'] = compilation_cache
  return env
