"""The training-method protocol: what a method gives the run (docs/design.md section 15).

A method (CERS, or a baseline of the paper's Table 1) is one object chosen by the config
field `method`. It builds its network, its train state and its jitted steps from the
config and the prepared data (`Method.build` -> `Built`), and lists its training stages
(`Stage`: epochs of one jitted step over named train streams). The run — stage runner,
checkpoints, resume checks, curves, evaluation and prediction — reads only this protocol
and never a method's name:

  * the train state is any pytree with a scalar `step` (checkpoints save and restore it
    whole, into the `Built.state` target);
  * `Built.steps.evaluate(state, batch)` returns `prob_<d>` (B, H, W, 1) for every decoder
    `d` in `Method.decoders` and, when the batch has a mask, `dice_<d>` and `iou_<d>` (B,);
    a method that retrieves adds `retrieved_ids` and `retrieved_scores` (B, k);
  * model selection (the best checkpoint, early stopping) reads the val Dice of
    `Method.primary`, and predictions write that decoder's masks.

`resolve(name)` finds a method: a name of `METHODS` ('cers'), or 'package.module:ATTR' for
a method defined elsewhere (a research project's, or one in tests/).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Protocol

import jax
import ml_collections
import optax

from cers_jax.data.dataset import Data
from cers_jax.errors import ConfigError

Batch = Mapping[str, jax.Array]
# One training step: (state, {stream: batch on the mesh}) -> (state, {metric: scalar}).
StepFn = Callable[[Any, Mapping[str, Batch]], tuple[Any, Mapping[str, jax.Array]]]

# Registered methods: name -> 'module:attribute', imported on first use (so this floor
# imports no method, and a method may import anything below the training loop).
METHODS = {name: f'cers_jax.methods.{name}:METHOD'
           for name in ('cers', 'supervised', 'mean_teacher', 'ucmt', 'bcp')}
DEFAULT = 'cers'  # The method of a config without the field (those before it existed).


class EvalSteps(Protocol):
  """What evaluation and prediction call of any method's jitted steps."""

  mesh: jax.sharding.Mesh  # The data mesh batches are placed on.
  # (state, batch) -> {'prob_<d>': (B, H, W, 1), 'dice_<d>', 'iou_<d>': (B,), ...}.
  evaluate: Callable[[Any, Batch], Mapping[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: `epochs` epochs of `steps_per_epoch` steps of one step function.

  The stage runner draws one batch from each train stream in `streams` per step ('labeled':
  the labeled train rows; 'unlabeled': the unlabeled ones, or a second stream of labeled
  rows when every image is labeled), places them on the mesh and calls the epoch's step.
  """

  name: str  # Recorded in metrics.jsonl and the checkpoints' progress; unique per method.
  epochs: int
  steps_per_epoch: int
  streams: tuple[str, ...]  # Train streams each step draws a batch from.
  # epoch -> (the step of that epoch, fields its metrics.jsonl record adds, e.g. a ramp).
  epoch_step: Callable[[int], tuple[StepFn, Mapping[str, Any]]]
  images_per_step: int  # For images/s.
  validates: bool = False  # Val Dice after every epoch: best checkpoint, early stopping.
  validation_steps: EvalSteps | None = None  # Steps validation uses here (None: Built's).
  # (decoder name, steps whose eval step scores that decoder) also scored on val after each
  # validated epoch and recorded (`val_dice_<name>_mean`), never selected on: e.g. an EMA
  # teacher beside the student that model selection reads.
  monitors: tuple[tuple[str, EvalSteps], ...] = ()
  start: Callable[[Any], Any] | None = None  # state -> state before a fresh run's first epoch.
  # (state, progress of the next stage) -> state once the last epoch ran, before the save.
  finish: Callable[[Any, Any], Any] | None = None
  after_epoch: Callable[[Any], Any] | None = None  # state -> state after each epoch.
  # (state, progress, the settings changed since the checkpoint {field: (checkpoint's,
  # now)}) -> state, when a run resumes in this stage with some changed (the changes its
  # resume classes allow, training/workdir.py): e.g. CERS rebuilds its pool.
  resumed: Callable[[Any, Any, Mapping[str, tuple[Any, Any]]], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Built:
  """What a method builds for one run; the state travels separately once training starts."""

  graphdef: Any  # The network's nnx graph definition (what the steps close over).
  state: Any  # The fresh train state, placed on the mesh: also every restore's target.
  steps: EvalSteps  # The method's jitted steps: `.mesh`, `.evaluate` and its own.
  schedule: optax.Schedule  # The learning rate by optimizer step (logged per epoch).
  stages: tuple[Stage, ...]


class Method(Protocol):
  """A training method (see the module docstring)."""

  name: str
  decoders: tuple[str, ...]  # Decoders the eval step scores, e.g. ('r', 's').
  primary: str  # The decoder of model selection and predictions.
  stage_names: tuple[str, ...]  # Its stages, in order (known before building).
  # The stage whose steps retrieve from a knowledge pool built before it, or None for a
  # method without retrieval (then --mode retrieval is refused).
  retrieval_stage: str | None

  def check(self, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for settings it cannot run, before any data is prepared."""

  def build(self, config: ml_collections.ConfigDict, data: Data, workdir: str,
            mesh: jax.sharding.Mesh) -> Built:
    """The network, fresh state, jitted steps and stages for `config` and `data`."""

  def imported_state(self, exp, state) -> tuple[Any, dict] | None:
    """A state to evaluate where the workdir has no checkpoint (weights imported from
    elsewhere, e.g. the authors' CERS state dict) and its meta, or None: nothing to import.
    `exp`: the run's `training.experiment.Experiment`."""


def resolve(name: str) -> Method:
  """The method a config's `method` field names (see the module docstring)."""
  target = METHODS.get(name, name)
  if ':' not in target:
    raise ConfigError(f"--config.method={name!r}: choose one of {tuple(METHODS)} or give "
                      "'package.module:ATTRIBUTE' of a method object.")
  module_name, attribute = target.split(':', 1)
  try:
    method = getattr(importlib.import_module(module_name), attribute)
  except (ImportError, AttributeError) as error:
    raise ConfigError(f'--config.method={name!r}: cannot load {target} ({error}).') from None
  missing = [field for field in ('name', 'decoders', 'primary', 'stage_names',
                                 'retrieval_stage', 'check', 'build', 'imported_state')
             if not hasattr(method, field)]
  if missing:
    raise ConfigError(f'--config.method={name!r}: {target} is not a training method (it '
                      f'lacks {", ".join(missing)}; cers_jax/core/method.py says what one '
                      'provides).')
  if method.primary not in method.decoders:
    raise ConfigError(f'{target}: primary decoder {method.primary!r} is not one of its '
                      f'decoders {method.decoders}.')
  return method


def stages_before_retrieval(method: Method) -> tuple[str, ...]:
  """The stages that run before `method`'s knowledge pool exists (CERS: ('warmup',));
  () for a method that does not retrieve."""
  names = tuple(method.stage_names)
  if method.retrieval_stage not in names:
    return ()
  return names[:names.index(method.retrieval_stage)]


def of_config(config) -> Method:
  """The method of `config` (its `method` field; configs older than the field: DEFAULT)."""
  return resolve(config.get('method', DEFAULT))


def default() -> Method:
  """The method of configs that do not name one."""
  return resolve(DEFAULT)
