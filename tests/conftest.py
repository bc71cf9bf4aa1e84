"""One persistent JAX compilation cache for the whole test session and its run.py processes.

Tests that build the same model compile the same programs; with the cache, only the first
pays. It is run.py's default folder (`cli.default_compilation_cache`), so a second run of the
suite on a machine starts warm; CERS_TEST_COMPILATION_CACHE names another folder, or turns
it off when empty.

The float32 equivalence tests (the golden fixtures, the numpy references) hold to 1e-5 and
closer. On a GPU, JAX's default matmul precision lets cuBLAS use TF32 (a 10-bit mantissa,
errors near 1e-3), so the session asks for full float32 products: what these tests assume
(scripts/gpu_run.sh runs some of them there). On the CPU it changes nothing.
"""

import os

import jax

from cers_jax import cli

jax.config.update('jax_default_matmul_precision', 'highest')


def _writable(directory: str) -> bool:
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return False
  return os.access(directory, os.W_OK)


def _enable_compilation_cache() -> None:
  directory = os.environ.get('CERS_TEST_COMPILATION_CACHE', cli.default_compilation_cache())
  # Where the folder cannot be written (a read-only home), the tests run without the cache.
  directory = cli.enable_compilation_cache(directory if directory and _writable(directory)
                                           else '')
  if directory:  # Every subprocess (run.py, several-device workers) inherits these.
    os.environ.update(JAX_COMPILATION_CACHE_DIR=directory,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')


_enable_compilation_cache()
