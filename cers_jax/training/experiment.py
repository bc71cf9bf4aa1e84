"""Assembles a run from its config: data, the training method's network, state and steps.

The same functions serve `run.py`, the benchmarks and research code:

  exp, state = experiment.create(config, 'runs/demo')  # data, model, jitted steps; state
  state, meta = exp.checkpoints.restore('best', state)
  out = exp.steps.evaluate(state, sharding.global_batch(batch, exp.steps.mesh))

What is built depends on the config's `method` (`cers_jax.core.method`); this module only
prepares the data, makes the mesh and hands both to the method. `resolve_config` fills the
fields a run derives (dataset location for the synthetic default, vocabulary sizes of
trained tokenizers) into an unlocked copy, which is what checkpoints store.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import ml_collections
import optax

from cers_jax import sharding
from cers_jax.core import method as method_lib
from cers_jax.data.dataset import Data, prepare_data_once
from cers_jax.errors import WorkdirError
from cers_jax.training import checkpoints as checkpointing


def resolve_config(config: ml_collections.ConfigDict, workdir: str):
  """An unlocked copy of `config` with the run's derived fields filled in."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.synthetic.num_images > 0 and not config.data.root:
    root = os.path.join(workdir, 'synthetic')
    config.data.root = root
    config.data.text_csv = config.data.text_csv or os.path.join(root, 'text.csv')
    config.data.cot_mask_csv = config.data.cot_mask_csv or os.path.join(
        root, 'cot_output_mask.csv')
    config.data.cot_no_mask_csv = config.data.cot_no_mask_csv or os.path.join(
        root, 'cot_output_no_mask.csv')
    # The generator's latent lesion kind: the retrieval report's group label.
    config.eval.label_csv = config.eval.label_csv or os.path.join(root, 'attributes.csv')
  if not config.data.cache_dir:
    config.data.cache_dir = os.path.join(workdir, 'data')
  return config


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a run is built from, fixed once created; the train state travels separately."""

  config: ml_collections.ConfigDict  # Resolved (unlocked) copy.
  workdir: str
  data: Data
  method: method_lib.Method
  graphdef: Any
  steps: Any  # The method's jitted steps; `steps.mesh` is the data mesh they run on.
  checkpoints: checkpointing.Checkpoints
  stages: tuple[method_lib.Stage, ...]  # The method's training stages, in order.
  schedule: optax.Schedule  # The learning rate by step (logged with every epoch).
  # Settings this invocation changed from its workdir's checkpoint, {field: (checkpoint's,
  # now)} (workdir.check_resume): a stage resumed with some may redo its work (Stage.resumed).
  changes: Mapping[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)


def create(config, workdir: str, *, read_only: bool = False,
           changes: Mapping[str, tuple[Any, Any]] | None = None) -> tuple[Experiment, Any]:
  """Prepares data, builds the method's model and returns (experiment, fresh state);
  restore is separate (`exp.checkpoints.restore`). `read_only`: checkpoints are only read
  (a run that evaluates, possibly beside the run that trains in `workdir`). `changes`:
  what `workdir.check_resume` allowed this invocation to change from the checkpoint."""
  method = method_lib.of_config(config)
  method.check(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = resolve_config(config, workdir)
  data = prepare_data_once(config, workdir)
  with config.unlocked():
    config.model.text.vocab_size = len(data.text_tokenizer)
    config.model.cot.vocab_size = len(data.cot_tokenizer)

  mesh = sharding.make_mesh(config.mesh.data_parallel)
  sharding.check_batch_size(config.train.batch_size, mesh)
  sharding.check_batch_size(config.train.eval_batch_size, mesh, 'train.eval_batch_size')
  built = method.build(config, data, workdir, mesh)
  names = tuple(stage.name for stage in built.stages)
  if names != tuple(method.stage_names):
    raise RuntimeError(f'Method {method.name!r} built the stages {names}, but declares '
                       f'{tuple(method.stage_names)}.')
  exp = Experiment(config=config, workdir=workdir, data=data, method=method,
                   graphdef=built.graphdef, steps=built.steps,
                   checkpoints=checkpointing.Checkpoints(workdir, keep=config.checkpoint.keep,
                                                        read_only=read_only),
                   stages=built.stages, schedule=built.schedule, changes=dict(changes or {}))
  return exp, built.state


def from_workdir(workdir: str, which: str = 'best') -> tuple[Experiment, Any, dict]:
  """A finished (or running) run's experiment and its `which` checkpoint: (exp, state, meta).

  Reads the config the run was trained with (`<workdir>/config.json`), so research code
  needs neither the config file nor its overrides. Its checkpoints are opened read-only,
  so this may run beside the training run; a damaged newest step falls back to the newest
  intact one, with a warning.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise WorkdirError(f'{path} does not exist: {workdir} is not a training workdir (run '
                       '`python run.py --config ... --workdir ...` first).')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  exp, state = create(config, workdir, read_only=True)
  if exp.checkpoints.latest_step(which) is None:
    exp.checkpoints.close()
    raise WorkdirError(f'No {which!r} checkpoint in {os.path.join(workdir, "checkpoints")}.')
  state, meta = exp.checkpoints.restore(which, state)
  return exp, state, meta


def config_json(config) -> str:
  return json.dumps(json.loads(config.to_json_best_effort()), indent=2)
