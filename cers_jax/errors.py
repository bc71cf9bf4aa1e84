"""The user errors that `run.py` reports as one line instead of a traceback.

Each message names what is wrong (a flag, a file, a folder) and what to do about it.
Dataset problems have their own type, `cers_jax.data.records.DataError`; weight files
`cers_jax.convert.assign.WeightLoadError`.
"""


class ConfigError(ValueError):
  """A config value this run cannot use; the message names the --config flag to change."""


class WorkdirError(ValueError):
  """A --workdir this invocation cannot use as asked: not a writable directory, no
  checkpoint to evaluate, or a checkpoint trained with settings this invocation changes."""
