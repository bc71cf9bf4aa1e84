"""Flag parsing shared by `run.py` and the benchmarks: user mistakes end in one line.

absl exits with status 1 after printing `--help`, and a misspelt `--config.a.b=` field
surfaces as a long traceback from ml_collections. `parse_flags` (pass it to
`absl.app.run(main, flags_parser=parse_flags)`) makes help exit 0 and turns flag errors
into `error: ...` with the fix, exit status 2 (a usage error, as argparse uses).
ml_collections reads a config file at two more moments: when the flag is defined (if no
`--config` is given, the default file and the overrides are parsed right then) and when
`.value` is first read (a file that failed to load); `define_config_file` and
`config_value` cover those.

Importing this module also quiets two libraries' start-up lines that say nothing about the
run (`quiet_library_start_up`); `enable_compilation_cache` turns on JAX's persistent
compilation cache.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import flags
from absl import logging as absl_logging
import ml_collections
from ml_collections import config_flags


def quiet_library_start_up() -> None:
  """Silences start-up lines of libraries that are not about this run; warnings stay.

  - transformers prints "PyTorch was not found. Models won't be available ..." when
    imported without torch: we use it for tokenizers only. That line is its one
    "advisory" warning, which TRANSFORMERS_NO_ADVISORY_WARNINGS turns off; its other
    warnings still show. transformers reads the switch when first imported, hence this
    runs on this module's import, which run.py and the benchmarks make before they
    import the data code (cers_jax.data.tokenize imports transformers).
  - JAX logs at INFO "Unable to initialize backend 'tpu': ..." for every platform it
    probes and does not find (run.py logs at INFO). That is xla_bridge's only INFO line;
    its warnings, e.g. a GPU that a CPU-only jaxlib cannot use, still show.

  A TRANSFORMERS_NO_ADVISORY_WARNINGS already set in the environment wins.
  """
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)


quiet_library_start_up()


_HELP_FLAGS = frozenset(('help', '?', 'helpshort', 'helpfull', 'helpxml'))
USAGE_ERROR = 2  # Exit status of a command-line mistake.


def _asked_for_help(argv: list[str]) -> bool:
  return any(arg.startswith('-') and arg.lstrip('-').split('=')[0] in _HELP_FLAGS
             for arg in argv[1:])


def _one_line(error: BaseException) -> str:
  # ml_collections wraps "'field'\nDid you mean ..." in quotes and escapes the newline.
  text = str(error).replace('\\n', ' ').replace('\\\'', '\'')
  if text.startswith("'") and text.endswith('"?\''):  # ml_collections' "Did you mean".
    text = text[1:-1]
  text = re.sub(r'\s+', ' ', text).strip()
  return text if text.endswith(('.', '?', '!')) else text + '.'


def _config_override(argv: list[str], error: BaseException) -> str:
  """The --config.x.y flag an override error is about (its unknown field is quoted)."""
  match = re.search(r"'(\w+)'", str(error).replace('\\\'', '\''))
  field = match.group(1) if match else ''
  for arg in argv[1:]:
    name = arg.lstrip('-').split('=')[0]
    if name.startswith('config.') and (not field or field in name.split('.')[1:]):
      return f'--{name}'
  return '--config.*'


def _override_error(argv: list[str], error: BaseException) -> None:
  unknown = 'no such field: ' if isinstance(error, (AttributeError, KeyError)) else ''
  _fail(f'{_config_override(argv, error)}: {unknown}{_one_line(error)} The config is '
        'locked: configs/base.py lists every field with its meaning.')


def define_config_file(name: str, default: str, help_text: str):
  """`config_flags.DEFINE_config_file(..., lock_config=True)`, a bad override one line."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    _override_error(sys.argv, error)


def config_value(holder) -> ml_collections.ConfigDict:
  """The parsed config of a `define_config_file` flag; a file that failed to load ends
  the program with one line naming it."""
  value = holder.value
  try:
    value.get  # A config that failed to load raises its error on any attribute.
  except OSError as error:
    _fail(f'--{holder.name}: {_one_line(error)} Give a config file, e.g. '
          f'--{holder.name}=configs/synthetic.py.')
  return value


def parse_flags(argv: list[str]) -> list[str]:
  """Parses absl flags; on a mistake prints one `error:` line and exits.

  Args:
    argv: sys.argv as `absl.app.run` passes it.

  Returns:
    The arguments that are not flags (as absl's own parser).
  """
  try:
    return flags.FLAGS(argv)
  except SystemExit as stop:
    # absl's --help flags print the usage and exit 1: asking for help is not an error.
    if stop.code == 1 and _asked_for_help(argv):
      sys.exit(0)
    raise
  except flags.Error as error:
    _fail(f'{_one_line(error)} --help lists the flags.')
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    # ml_collections' config_flags raises these for --config.<field> overrides.
    _override_error(argv, error)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(USAGE_ERROR)


def default_compilation_cache() -> str:
  """$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/cers_jax/jax (~/.cache/...)."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(cache_home, 'cers_jax', 'jax')


def enable_compilation_cache(directory: str | None) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory`; call before compiling.

  A later process that compiles the same programs (same shapes, config, JAX version and
  devices) reads the executables from disk instead of compiling them again. JAX caches
  only programs that took >= 1 s to compile by default; a run also compiles many small
  programs (evaluation, the pool build, prediction, eager array operations), so every
  program is cached: a 1 + 1 epoch run of configs/synthetic.py writes 263 entries, 6.9 MB,
  and a second run of it took 83 s instead of 317 s on a loaded 2-core CPU.

  Args:
    directory: the cache folder (created if needed); None: `default_compilation_cache()`,
      or no cache if that folder cannot be written; '': leave the cache off.

  Returns:
    The folder in use, or None when off.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if directory == '':
    return None
  chosen = directory is not None
  directory = os.path.abspath(os.path.expanduser(directory or default_compilation_cache()))
  try:
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK):
      raise PermissionError(13, 'not writable')
  except OSError as error:
    if not chosen:  # The default folder: a read-only home must not stop a run.
      absl_logging.warning('No compilation cache: %s is not writable (%s); set '
                           '--compilation_cache=DIR to keep compiled steps.', directory,
                           error.strerror)
      return None
    _fail(f'--compilation_cache={directory}: cannot write there ({error.strerror}). Give a '
          'writable folder, or --compilation_cache= to run without the cache.')
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  return directory
