"""Optional file formats and loggers are imported where used (issue 36): a run that does not
read NIfTI or write TensorBoard events needs neither nibabel nor tensorboardX, and one that
does but lacks them gets one clear line, not a traceback."""

import logging as std_logging
import os
import subprocess
import sys

import pytest

from cers_jax.data import nifti
from cers_jax.data.records import DataError
from cers_jax.training import curves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def without(monkeypatch):
  """Makes `import NAME` raise ImportError for the names given, as on a machine without them."""
  def block(*names):
    for name in names:
      monkeypatch.setitem(sys.modules, name, None)
  return block


def test_the_run_and_its_evaluators_import_without_nibabel_or_tensorboardx():
  # A fresh interpreter: this one has imported both long ago.
  code = ('import sys\n'
          'sys.modules["nibabel"] = None\n'
          'sys.modules["tensorboardX"] = None\n'
          'import run\n'
          'from cers_jax.training import loop\n'
          'from cers_jax.inference import predict, evaluators\n'
          'from cers_jax.data import prepare, layouts\n'
          'print("imported")\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'imported' in result.stdout


def test_nifti_without_nibabel_is_one_named_error(without, tmp_path):
  without('nibabel')
  path = tmp_path / 'case.nii.gz'
  path.write_bytes(b'not read')
  with pytest.raises(DataError, match=r'nibabel.*pip install "nibabel'):
    nifti.volume_header(str(path))


def test_tensorboard_without_tensorboardx_warns_once_and_writes_nothing(without, tmp_path,
                                                                         caplog):
  without('tensorboardX')
  logdir = tmp_path / 'tensorboard'
  record = dict(stage='warmup', step=6, epoch=0, loss=3.8)
  with caplog.at_level(std_logging.WARNING):
    with curves.TensorBoardWriter(str(logdir)) as writer:
      writer.write(record)
      writer.write(dict(record, step=12))
  warnings = [r for r in caplog.records if 'tensorboardX' in r.getMessage()]
  assert len(warnings) == 1
  assert 'pip install' in warnings[0].getMessage()
  assert not logdir.exists()
