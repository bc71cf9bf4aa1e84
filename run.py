"""Command line of cers_jax: prepare data, train, evaluate and predict.

  python run.py --config configs/synthetic.py --workdir runs/synthetic
  python run.py --config configs/brisc.py --config.data.root=/data/brisc2025 \
      --workdir runs/brisc --mode all

Multi-host: the same command on every host, with --distributed.

Modes: prepare | warmup | train | eval | retrieval | predict | export | all (default).
`train` runs warm-up first when it has not finished; `retrieval` reports what retrieval
finds (after warm-up at the latest); `export` writes the predictor as a jax.export file
(docs/interop.md); every mode resumes from what `--workdir` already holds.
Any config field can be overridden with `--config.section.field=value`; the config is
locked, so a misspelt field is an error.

A mistake in the flags, the config, the workdir or the dataset ends with one line,
`error: <what is wrong and what to do>`, and a non-zero exit status (README "Failure
modes"). SIGTERM during training saves a checkpoint at the next step and exits with
status 143; the same command resumes.

Compiled programs are kept in a persistent cache (--compilation_cache, by default
~/.cache/cers_jax/jax), so a second run of the same config starts without compiling.
"""

import sys

import jax
from absl import app
from absl import flags
from absl import logging

# First of ours: quiets library start-up lines before the data code imports transformers.
from cers_jax import cli
from cers_jax.convert.assign import WeightLoadError
from cers_jax.data.records import DataError
from cers_jax.errors import ConfigError, WorkdirError
from cers_jax.training import loop as train
from cers_jax.training.checkpoints import DamagedCheckpointError

_CONFIG = cli.define_config_file('config', 'configs/synthetic.py',
                                 'Config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory: checkpoints, metrics, reports. Defaults to '
    'runs/<config file name>.')
_MODE = flags.DEFINE_enum('mode', 'all', train.MODES, 'What to run.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Multi-host: run the same command on every host. Calls '
    'jax.distributed.initialize(), which detects SLURM, Open MPI, Kubernetes and Cloud TPU '
    'clusters by itself; elsewhere give the three flags below.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'With --distributed: host:port of process 0 (default: '
    'detected, or $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'With --distributed: number of processes (default: detected).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'With --distributed: this process\'s index, 0 on the host that '
    'writes the files (default: detected).')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None,
    'JAX persistent compilation cache: a later run with the same config reads the '
    'compiled steps from this folder instead of compiling them again (default: '
    f'{cli.default_compilation_cache()}, skipped if not writable). --compilation_cache= '
    'turns it off.')


def _quiet_library_info(record) -> bool:
  """Drops orbax's per-save INFO chatter and its notice that a checkpoint folder opened
  read-only (which is how checkpoints are read) is read-only; its other warnings and errors
  still show."""
  if 'orbax' not in record.pathname:
    return True
  if record.getMessage().startswith('Given directory is read only'):
    return False
  return record.levelno > logging.converter.STANDARD_INFO


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_library_info)
  if _DISTRIBUTED.value:
    # Before anything asks for devices.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
    logging.info('Process %d of %d; %d of %d devices are local.', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  cache = cli.enable_compilation_cache(_COMPILATION_CACHE.value)
  logging.info('Compilation cache: %s', cache or 'off')
  config = cli.config_value(_CONFIG)
  workdir = train.default_workdir(_WORKDIR.value, flags.FLAGS['config'].config_filename)
  try:
    train.train_and_evaluate(config, workdir, mode=_MODE.value)
  except train.Preempted as stopped:
    print(f'preempted: {stopped}', file=sys.stderr)
    sys.exit(train.Preempted.EXIT_STATUS)
  except (DataError, ConfigError, WorkdirError, WeightLoadError, train.NonFiniteLossError,
          DamagedCheckpointError, FileNotFoundError) as error:
    # Problems with the user's inputs or the run: the message says what to do; a
    # traceback into our code would only hide it.
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
