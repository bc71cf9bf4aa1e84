"""Command line of cers_jax: prepare data, train, evaluate and predict.

  python run.py --config configs/synthetic.py --workdir runs/synthetic
  python run.py --config configs/brisc.py --config.data.root=/data/brisc2025 \
      --workdir runs/brisc --mode all

Modes: prepare | warmup | train | eval | predict | all (default). `train` runs warm-up
first when it has not finished; every mode resumes from what `--workdir` already holds.
Any config field can be overridden with `--config.section.field=value`; the config is
locked, so a misspelt field is an error.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cers_jax import train
from cers_jax.convert.assign import WeightLoadError
from cers_jax.data.records import DataError

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/synthetic.py', 'Config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory: checkpoints, metrics, reports. Defaults to '
    'runs/<config file name>.')
_MODE = flags.DEFINE_enum('mode', 'all', train.MODES, 'What to run.')


def _quiet_library_info(record) -> bool:
  """Drops orbax's per-save INFO chatter; its warnings and errors still show."""
  return record.levelno > logging.converter.STANDARD_INFO or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_library_info)
  workdir = train.default_workdir(_WORKDIR.value, flags.FLAGS['config'].config_filename)
  try:
    train.train_and_evaluate(_CONFIG.value, workdir, mode=_MODE.value)
  except (DataError, WeightLoadError, train.NonFiniteLossError, FileNotFoundError) as error:
    # Problems with the user's inputs or the run: the message says what to do; a
    # traceback into our code would only hide it.
    logging.error('%s', error)
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  app.run(main)
