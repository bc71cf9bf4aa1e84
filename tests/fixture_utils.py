"""Loading the authors' golden fixtures (tests/fixtures/*.npz) and comparing against them."""

import os

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


def load_fixture(name: str):
  """(npz data, {torch state_dict key: array}) of fixtures/<name>.npz."""
  data = np.load(os.path.join(FIXTURES, f'{name}.npz'))
  state = {k[len('state/'):]: data[k] for k in data.files if k.startswith('state/')}
  return data, state


def nhwc(x):
  """The fixtures store spatial arrays NCHW (PyTorch); JAX code is NHWC."""
  return np.transpose(x, (0, 2, 3, 1))


def rel_err(got, want) -> float:
  """Max absolute error relative to the largest reference magnitude."""
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))
