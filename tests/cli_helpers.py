"""The environment of the `run.py` subprocesses that the end-to-end tests start."""

import os


def run_env() -> dict[str, str]:
  """CPU only and no progress bars; the session's compilation cache comes with os.environ
  (conftest.py exports it), so only the first process to compile a program pays for it."""
  return dict(os.environ, JAX_PLATFORMS='cpu', TQDM_DISABLE='1')
