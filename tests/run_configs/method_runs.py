"""What the end-to-end tests of training methods share: the tiny run of a method and its
metrics.jsonl records without the timings (which differ between otherwise equal runs)."""

import json
import os

from tests.run_configs import tiny_run


def method_config(method: str, *, warmup_epochs: int, epochs: int, **train):
  """tiny_run with `method`, the given epochs, no surface metrics or bootstrap, and any
  further train.* overrides (e.g. stop_after_epochs=1)."""
  config = tiny_run.get_config()
  config.method = method
  config.train.warmup_epochs = warmup_epochs
  config.train.epochs = epochs
  config.eval.surface = False
  config.eval.bootstrap_resamples = 0
  for key, value in train.items():
    config.train[key] = value
  return config


def records(workdir: str) -> list[dict]:
  """The run's metrics.jsonl records, 'seconds' and 'images_per_s' left out."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items()
             if k not in ('seconds', 'images_per_s')} for line in f]
