"""What the baselines of Table 1 share (docs/design.md section 16).

Each baseline trains a ConvNeXt U-Net student (`cers_jax.models.unet`), most of them beside
an EMA teacher of the same shape. This module holds their one train state, the student and
teacher forward passes inside a jitted step, the teacher's EMA update, the eval step, and
`StudentMethod`: the protocol object (`cers_jax.core.method`) a baseline subclasses by
naming its decoders and writing one jitted step per stage.

Every baseline spends the budget CERS spends (`cers_jax.methods.budget`): a 'warmup' stage
of `train.warmup_epochs` passes over the labeled images, then `train.epochs` epochs of its
second stage. Report text and CoTs are in the batches but no baseline reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from cers_jax import metrics as metrics_lib
from cers_jax import sharding
from cers_jax.core import optim
from cers_jax.core.method import Built, Stage
from cers_jax.data.dataset import Data
from cers_jax.methods import budget
from cers_jax.models import cers as cers_model
from cers_jax.models.unet import ConvNeXtUNet

Batch = Mapping[str, jax.Array]
WARMUP = 'warmup'


@flax.struct.dataclass
class Teacher:
  """An EMA teacher: parameters averaged from the student's, and its BatchNorm statistics."""

  params: nnx.State
  batch_stats: nnx.State


@flax.struct.dataclass
class StudentState:
  step: jax.Array  # () int32, optimizer steps taken over all stages.
  params: nnx.State  # The student's trainable nnx.Param leaves.
  batch_stats: nnx.State  # The student's BatchNorm running statistics.
  rng_state: nnx.State  # Module RNG streams (stochastic depth); reseeded every step.
  opt_state: optax.OptState
  teacher: Teacher | None  # The EMA teacher, or None for a method without one.
  rng: jax.Array  # Root key; per-step keys are fold_in(rng, step).


def settings(cls, section):
  """A frozen settings dataclass `cls` from a config section (e.g. `config.bcp`), each field
  cast to its default's type, so the jitted steps never close over the mutable ConfigDict."""
  return cls(**{field.name: type(field.default)(section[field.name])
                for field in dataclasses.fields(cls)})


def build_network(config, num_decoders: int) -> ConvNeXtUNet:
  """The student network, with the pretrained ConvNeXt the config points to."""
  from cers_jax.convert import convnext as convnext_convert

  model = ConvNeXtUNet(config.model, num_decoders=num_decoders,
                       rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
  if config.model.encoder_weights:
    convnext_convert.load_convnext(model.encoder, config.model.encoder_weights)
  logging.info('ConvNeXt U-Net with %d decoder(s): %s parameters.', num_decoders,
               f'{cers_model.count_params(model, exclude=()):,}')
  return model


def create_state(model: ConvNeXtUNet, tx: optax.GradientTransformation, *, rng: jax.Array,
                 with_teacher: bool) -> tuple[Any, StudentState]:
  """(graphdef, fresh state); the teacher starts as a copy of the student."""
  graphdef, params, batch_stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  teacher = None
  if with_teacher:
    teacher = Teacher(params=jax.tree.map(jnp.copy, params),
                      batch_stats=jax.tree.map(jnp.copy, batch_stats))
  return graphdef, StudentState(step=jnp.zeros((), jnp.int32), params=params,
                                batch_stats=batch_stats, rng_state=rng_state,
                                opt_state=tx.init(params), teacher=teacher, rng=rng)


def step_keys(state: StudentState, count: int) -> jax.Array:
  """`count` keys for this step: the first reseeds the student's stochastic depth."""
  return jax.random.split(jax.random.fold_in(state.rng, state.step), count)


def student(graphdef, state: StudentState, params, key: jax.Array) -> ConvNeXtUNet:
  """The student in training mode, as a copy (its BatchNorm writes must not reach `state`)."""
  model = nnx.merge(graphdef, params, state.batch_stats, state.rng_state, copy=True)
  nnx.reseed(model, dropout=key)
  return model


def teacher_logits(graphdef, state: StudentState, image: jax.Array, key: jax.Array, *,
                   train_mode: bool) -> tuple[jax.Array, ...]:
  """The teacher's logits per decoder, without gradient.

  `train_mode=True` is a PyTorch teacher left in `.train()` (SSL4MIS, BCP): BatchNorm
  normalises by the batch and stochastic depth is on; the statistics it would write are
  dropped, since a teacher in training mode never reads them.
  """
  teacher = state.teacher
  model = nnx.merge(graphdef, teacher.params, teacher.batch_stats, state.rng_state,
                    copy=True)
  nnx.reseed(model, dropout=key)
  if not train_mode:
    model = nnx.view(model, deterministic=True, use_running_average=True)
  return tuple(jax.lax.stop_gradient(x) for x in model(image))


def teacher_pass(graphdef, state: StudentState, image: jax.Array, key: jax.Array
                 ) -> tuple[tuple[jax.Array, ...], nnx.State]:
  """The teacher in training mode, keeping the BatchNorm statistics it writes: a PyTorch
  teacher left in `.train()` updates its running statistics in every forward pass, even
  under no_grad (SSL4MIS's ema_model), and eval mode reads them.

  Returns:
    (its logits per decoder, without gradient; its new batch_stats).
  """
  teacher = state.teacher
  model = nnx.merge(graphdef, teacher.params, teacher.batch_stats, state.rng_state,
                    copy=True)
  nnx.reseed(model, dropout=key)
  logits = tuple(jax.lax.stop_gradient(x) for x in model(image))
  return logits, nnx.state(model, nnx.BatchStat)


def written_state(model: ConvNeXtUNet) -> tuple[nnx.State, nnx.State]:
  """BatchNorm statistics and RNG state a training forward pass wrote."""
  return nnx.state(model, nnx.BatchStat), nnx.state(model, nnx.RngState)


def apply_gradients(tx: optax.GradientTransformation, state: StudentState, grads,
                    written: tuple[nnx.State, nnx.State]) -> StudentState:
  batch_stats, rng_state = written
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state, batch_stats=batch_stats, rng_state=rng_state)


def ema(teacher_tree, student_tree, alpha: jax.Array | float):
  """teacher <- alpha * teacher + (1 - alpha) * student, leaf by leaf."""
  return jax.tree.map(lambda t, s: alpha * t + (1.0 - alpha) * s, teacher_tree, student_tree)


def supervised_step(state: StudentState, labeled: Batch, *, graphdef,
                    tx: optax.GradientTransformation, loss_fn: Callable[..., jax.Array]):
  """One step on labeled images only: `loss_fn(logits, mask)` summed over the decoders."""

  def total(params):
    model = student(graphdef, state, params, step_keys(state, 1)[0])
    loss = sum(loss_fn(logits, labeled['mask']) for logits in model(labeled['image']))
    return loss, written_state(model)

  (loss, written), grads = jax.value_and_grad(total, has_aux=True)(state.params)
  return apply_gradients(tx, state, grads, written), {'loss': loss}


def eval_step(state: StudentState, batch: Batch, *, graphdef, decoders: tuple[str, ...],
              threshold: float):
  """The student in eval mode: `prob_<d>` per decoder, and `dice_<d>`, `iou_<d>` with a mask.

  Decoders are named in `decoders` in the network's order.
  """
  model = nnx.view(nnx.merge(graphdef, state.params, state.batch_stats, state.rng_state),
                   deterministic=True, use_running_average=True)
  out = {}
  for name, logits in zip(decoders, model(batch['image']), strict=True):
    prob = jax.nn.sigmoid(logits)
    out[f'prob_{name}'] = prob
    if 'mask' in batch:
      out[f'dice_{name}'], out[f'iou_{name}'] = metrics_lib.dice_iou_per_image(
          prob, batch['mask'], threshold)
  return out


@dataclasses.dataclass(frozen=True)
class StudentSteps:
  """A baseline's jitted steps: `evaluate` (the EvalSteps protocol) and one per stage."""

  mesh: jax.sharding.Mesh
  evaluate: Callable[..., Any]  # (state, batch) -> {'prob_<d>', 'dice_<d>', 'iou_<d>'}.
  # Stage name -> jitted (state, labeled, unlabeled) -> (state, metrics); the labeled-only
  # stages take (state, labeled).
  train: Mapping[str, Callable[..., Any]]


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a baseline's stage steps may depend on: the budget and the first stage's length."""

  warmup_steps_per_epoch: int
  semi_steps_per_epoch: int
  warmup_total: int  # Optimizer steps of the warm-up stage: the second stage starts here.
  semi_total: int  # Optimizer steps of the second stage.


@dataclasses.dataclass(frozen=True)
class StudentMethod:
  """A baseline on the ConvNeXt U-Net: subclasses set the fields and `stage_steps`.

  Its stages are 'warmup' (labeled batches) and `stage_names[1]`, whose steps draw from
  `semi_streams`.
  """

  name: str
  decoders: tuple[str, ...]
  primary: str
  stage_names: tuple[str, ...]
  retrieval_stage: str | None = None
  semi_streams: tuple[str, ...] = ('labeled', 'unlabeled')
  with_teacher: bool = False
  # Whether the EMA teacher is scored on val in the semi stage (`val_dice_teacher_mean`)
  # beside the student that model selection reads (Mean Teacher, BCP). Its BatchNorm
  # statistics must be kept for that: BCP's EMA of them, Mean Teacher's own passes.
  monitor_teacher: bool = False

  def check(self, config) -> None:
    optim.check(config)
    optim.recipe(config, self)

  def stage_steps(self, config, graphdef, tx, plan: Plan) -> dict[str, Callable[..., Any]]:
    """Stage name -> the un-jitted step (state, labeled[, unlabeled]) -> (state, metrics)."""
    raise NotImplementedError

  def stage_start(self, stage: str) -> Callable[[StudentState], StudentState] | None:
    """state -> state run before a fresh run's first epoch of `stage` (None: nothing)."""
    return None

  def build(self, config, data: Data, workdir: str, mesh) -> Built:
    del workdir  # Baselines write nothing of their own.
    warmup_spe, semi_spe = budget.steps_per_epoch(config, data)
    plan = Plan(warmup_steps_per_epoch=warmup_spe, semi_steps_per_epoch=semi_spe,
                warmup_total=config.train.warmup_epochs * warmup_spe,
                semi_total=config.train.epochs * semi_spe)
    total = plan.warmup_total + plan.semi_total
    recipe, tx, rate = optim.method_optimizer(config, self, total_steps=total,
                                              warmup_steps=plan.warmup_total)
    graphdef, state = create_state(build_network(config, len(self.decoders)), tx,
                                   rng=jax.random.key(config.seed),
                                   with_teacher=self.with_teacher)
    threshold = config.eval.threshold
    train = {name: jax.jit(step, donate_argnums=0)
             for name, step in self.stage_steps(config, graphdef, tx, plan).items()}
    steps = StudentSteps(
        mesh=mesh, train=train,
        evaluate=jax.jit(lambda s, b: eval_step(s, b, graphdef=graphdef,
                                                decoders=self.decoders, threshold=threshold)))
    warmup_name, semi_name = self.stage_names
    monitors = ()
    if self.monitor_teacher:
      monitors = (('teacher', StudentSteps(mesh=mesh, train={}, evaluate=jax.jit(
          lambda s, b: eval_step(as_teacher(s), b, graphdef=graphdef, decoders=('teacher',),
                                 threshold=threshold)))),)
    stages = (
        _stage(warmup_name, config.train.warmup_epochs, warmup_spe, ('labeled',),
               train[warmup_name], config, start=self.stage_start(warmup_name),
               validates=bool(config.train.get('validate_warmup', False))),
        _stage(semi_name, config.train.epochs, semi_spe, self.semi_streams, train[semi_name],
               config, start=optim.semi_start(tx, recipe, self.stage_start(semi_name)),
               validates=True, monitors=monitors),
    )
    return Built(graphdef=graphdef, state=sharding.replicate(state, mesh), steps=steps,
                 schedule=rate, stages=stages)

  def imported_state(self, exp, state):
    return None  # Baselines import no whole-network weights (model.encoder_weights aside).


def as_teacher(state: StudentState) -> StudentState:
  """`state` with the teacher's parameters and statistics in the student's place."""
  return state.replace(params=state.teacher.params, batch_stats=state.teacher.batch_stats)


def _stage(name: str, epochs: int, steps_per_epoch: int, streams: tuple[str, ...], step,
           config, *, start, validates: bool, monitors=()) -> Stage:
  def run(state, batches):
    return step(state, *(batches[stream] for stream in streams))

  return Stage(name=name, epochs=epochs, steps_per_epoch=steps_per_epoch, streams=streams,
               epoch_step=lambda epoch: (run, {}),
               images_per_step=len(streams) * config.train.batch_size, validates=validates,
               start=start, monitors=monitors)
