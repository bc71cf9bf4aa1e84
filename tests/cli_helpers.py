"""The environment of the `run.py` subprocesses that the end-to-end tests start."""

import os


def run_env(compilation_cache: str) -> dict[str, str]:
  """CPU only, no progress bars, and a persistent compilation cache shared by every
  process of a test module, so that only its first process pays for compiling the steps."""
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=compilation_cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1', TQDM_DISABLE='1')
