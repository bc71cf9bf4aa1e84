"""What an invocation may do with a --workdir: write to it, evaluate it, resume it.

Checked before any data is prepared or model built, so a mistake costs seconds and leaves
the workdir as it was:

* `ensure_writable` — the workdir (and the cache directory) is a directory this process
  can write;
* `check_resume` — the config of this invocation against the one the workdir's checkpoint
  was trained with (`checkpoints/latest`, else `checkpoints/best`), by the resume class
  each field is declared with beside it in configs/base.py (`base.resume_class`). Fields
  that change the data, the parameters or the pool ('fixed') are refused in every mode:
  the checkpoint would not load, or would be scored on other data. Retrieval settings
  ('retrieval') may change only where no retrieval has been trained with yet (the stages
  are the method's, `core.method`; for CERS:) during
  warm-up, at the end of warm-up (stage 'semi', epoch 0, before its first step: how
  `scripts/ablate.py table2` continues one warmed-up run with several pool modes), after
  training is done, and in the evaluation-only modes; 'training' fields only where nothing
  trains. What the pool is built from ('pool_build': `pool.cot_source`) may change only
  where training goes on from before the first retrieving step (during warm-up, or right
  after it, where the method builds the pool again: `scripts/ablate.py cot_source`), and
  never where nothing trains (the checkpoint's pool would be read, not the flag).
  Everything else ('free': epochs, learning rate, logging, eval.*) may change; the
  differences are logged ('derived' ones are not);
* `log_invocation` — appends this invocation's mode, config and differences to
  `<workdir>/invocations.jsonl`, so `config.json` can stay the config as trained.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from typing import Any

from absl import logging

from cers_jax.core import method as method_lib
from cers_jax.core.progress import DONE
from cers_jax.errors import WorkdirError
from cers_jax.training import checkpoints as checkpointing
from configs import base as base_config


def ensure_writable(path: str, flag: str) -> None:
  """Creates `path` if missing and checks that files can be written in it.

  Raises:
    WorkdirError: a file is in the way, or the directory cannot be created or written.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'{flag} {path} is a file, not a directory: give the path of a '
                       'directory (it is created if missing).')
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as error:
    raise WorkdirError(f'{flag} {path} is not a writable directory ({error.strerror}): '
                       'choose a directory you can write, or copy the run there.') from error


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = list(value) if isinstance(value, tuple) else value
  return out


def _relative(value: Any, workdir: str | None) -> Any:
  """Paths inside a workdir relative to it: a copied workdir (cp -r) still matches."""
  if workdir and isinstance(value, str) and value.startswith(workdir.rstrip('/') + '/'):
    return '<workdir>' + value[len(workdir.rstrip('/')):]
  return value


def _saved_workdir(saved: dict[str, Any], meta: dict) -> str | None:
  # Checkpoints written before meta['workdir'] existed: the default cache is <workdir>/data.
  cache_dir = saved.get('data.cache_dir') or ''
  fallback = os.path.dirname(cache_dir) if os.path.basename(cache_dir) == 'data' else None
  return meta.get('workdir') or fallback


def _kind(field: str) -> str:
  """'fixed', 'retrieval', 'pool_build', 'training', 'derived' or 'free': configs/base.py's
  declaration."""
  return base_config.resume_class(field)


def _trains(mode: str, meta: dict, method: method_lib.Method) -> bool:
  """Whether this invocation runs training steps from the checkpoint's position: train and
  all until the run is done, warmup in the method's first stage, retrieval in the stages
  before its pool exists."""
  stage, names = meta.get('stage'), tuple(method.stage_names)
  if mode in ('train', 'all'):
    return stage != DONE
  if mode == 'warmup':
    return stage == names[0]
  if mode == 'retrieval':
    return stage in method_lib.stages_before_retrieval(method)
  return False


def _retrieval_trained(meta: dict, method: method_lib.Method) -> bool:
  """Whether steps that retrieve (the method's retrieval stage) have run into this
  checkpoint."""
  return (method.retrieval_stage is not None and meta.get('stage') == method.retrieval_stage
          and (meta.get('epoch', 0) > 0 or bool(meta.get('partial'))))


def _pool_not_retrieved_from(meta: dict, method: method_lib.Method) -> bool:
  """Whether no step has retrieved from this checkpoint's pool yet (it does not exist yet,
  or it was just built): a run going on from here may build it again."""
  stage = meta.get('stage')
  return (stage in method_lib.stages_before_retrieval(method)
          or (stage == method.retrieval_stage and not _retrieval_trained(meta, method)))


def _listing(changes: dict[str, tuple[Any, Any]]) -> str:
  return '; '.join(f'{k}: {a!r} in the checkpoint, {b!r} now' for k, (a, b) in changes.items())


def compare(saved_config: dict, meta: dict, config: dict, workdir: str
            ) -> dict[str, tuple[Any, Any]]:
  """Fields whose value differs: {field: (checkpoint's value, this invocation's)}."""
  saved, now = _flatten(saved_config), _flatten(config)
  old_workdir = _saved_workdir(saved, meta)
  return {k: (saved[k], now[k]) for k in sorted(set(saved) & set(now))
          if _relative(saved[k], old_workdir) != _relative(now[k], workdir)}


def refused_changes(changes: dict[str, tuple[Any, Any]], mode: str, meta: dict,
                    method: method_lib.Method | None = None) -> dict[str, tuple[Any, Any]]:
  """The differences `mode` cannot go on with from a checkpoint at `meta`'s position, for
  the run's method (default: `method_lib.DEFAULT`)."""
  method = method or method_lib.default()
  trains = _trains(mode, meta, method)
  refused = {}
  for field, values in changes.items():
    kind = _kind(field)
    if (kind == 'fixed' or (kind == 'training' and trains)
        or (kind == 'retrieval' and trains and _retrieval_trained(meta, method))
        or (kind == 'pool_build' and not (trains and _pool_not_retrieved_from(meta, method)))):
      refused[field] = values
  return refused


def check_resume(workdir: str, config, mode: str) -> dict[str, tuple[Any, Any]]:
  """Checks this invocation's config against the workdir's checkpoint.

  Args:
    workdir: the absolute workdir.
    config: the resolved config (experiment.resolve_config) of this invocation.
    mode: the run.py mode.

  Returns:
    The allowed differences, {field: (checkpoint's value, this invocation's)}; {} when
    there is no checkpoint yet.

  Raises:
    WorkdirError: a difference that this mode cannot continue or evaluate with, naming
      every such field with both values.
  """
  saved = checkpointing.read_saved(workdir, checkpointing.LATEST)
  if saved is None:
    saved = checkpointing.read_saved(workdir, checkpointing.BEST)
  if saved is None:
    return {}
  saved_config, meta = saved
  changes = compare(saved_config, meta, json.loads(config.to_json_best_effort()), workdir)
  refused = refused_changes(changes, mode, meta, method_lib.of_config(config))
  if refused:
    why = ('change the data, the parameters or the pool the checkpoint was trained with'
           if any(_kind(f) == 'fixed' for f in refused) else
           'change what the pool is built from, and this checkpoint\'s pool has been '
           'retrieved from already (or this mode does not train, so it would be read as it '
           'is)' if any(_kind(f) == 'pool_build' for f in refused) else
           'change how training retrieves and reads its batches, and this checkpoint has '
           'trained with them already')
    raise WorkdirError(
        f'{workdir} was trained with other settings, which {why}: {_listing(refused)}. '
        f'Drop these overrides (the settings it was trained with are in '
        f'{os.path.join(workdir, "config.json")}), or use a new --workdir.')
  changes = {k: v for k, v in changes.items() if _kind(k) != 'derived'}
  if changes:
    logging.info('Settings that differ from the checkpoint (allowed here, stage %s, epoch '
                 '%s): %s.', meta.get('stage'), meta.get('epoch'), _listing(changes))
  return changes


def log_invocation(workdir: str, mode: str, config, changes: dict) -> None:
  """Appends this invocation to <workdir>/invocations.jsonl (config.json is not touched)."""
  record = dict(
      time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      mode=mode, changed={k: list(v) for k, v in changes.items()},
      config=json.loads(config.to_json_best_effort()))
  with open(os.path.join(workdir, 'invocations.jsonl'), 'a') as f:
    f.write(json.dumps(record) + '\n')


def log_damaged(workdir: str, mode: str, damaged) -> None:
  """Appends each checkpoint step that failed to restore (`checkpoints.Damage`) to
  <workdir>/invocations.jsonl; the steps themselves stay on disk."""
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  with open(os.path.join(workdir, 'invocations.jsonl'), 'a') as f:
    for damage in damaged:
      f.write(json.dumps(dict(time=now, mode=mode, event='damaged_checkpoint',
                              **damage.record())) + '\n')
