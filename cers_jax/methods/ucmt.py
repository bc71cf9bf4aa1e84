"""UCMT (Shen et al., IJCAI 2023) as its authors' 2-D script trains, on the ConvNeXt U-Net.

Follows Senyh/UCMT `train.py`; the operations, their transcription and the authors'
procedure and hyperparameters are in `cers_jax.methods.ucmt_ops` (read its docstring).
Three separate ConvNeXt U-Nets (`cers_jax.models.unet`, one sigmoid logit per pixel: the
authors' 2-class softmax in the form ucmt_ops explains): students S1 and S2, trained, and a
teacher T, an EMA of both. The trained network (`Students`) holds the two students, so
`StudentState.params` is both students' parameters and one optimizer updates them; the
teacher's parameters and BatchNorm statistics are `StudentState.teacher`. Per step:

  warmup  sup = dsc(S1(x), y) + dsc(S2(x), y), one update; T(x) in training mode (its
          BatchNorm statistics); then the collaborative EMA of the teacher.
  semi    one UCMT iteration on a labeled (x, y) and an unlabeled (u) batch, their step 1
          and step 2, two updates:
          1. S1, S2 on x and on u, T on x and on u (training mode, one pass per batch
             and network, x before u as theirs); loss sup + lambda * alpha * (cps + cmt)
             with the teacher's and students' hard pseudo labels (`ucmt_ops.ucmt_loss`);
             update; collaborative EMA.
          2. UMIX of x and y by the uncertainty of step 1's (pre-update) predictions
             (S1, T) and (S2, T), and of u and the teacher's pseudo label by those on u; the
             updated students on the mixed images, the same loss; update; EMA again.
  eval    the teacher in eval mode (its running statistics): decoder 'seg'.

The teacher's EMA is over parameters only, t <- d t + c (1 - d) S1 + (1 - c) (1 - d) S2,
d = min(1 - 1/(i + 1), ema_decay), i the iteration index, the same for both updates of an
iteration (theirs); its BatchNorm statistics come from its own training-mode passes.

Differences from their code, and why:
  * Network and optimizer: the project's ConvNeXt U-Net and the run's optimizer and peak
    rate (train.*), as for every method of Table 1; theirs DeepLabv3+ on ResNet-50 and
    AdamW at 1e-4. The rate is constant by default, as theirs (train.lr_schedule=auto,
    docs/design.md section 9); a decaying schedule spans the run's optimizer steps:
    warm-up steps + 2 per semi step, so UCMT spends more optimizer steps than the other
    methods on the same batches (their iteration has two updates). One optax optimizer
    over both students equals their two per-student AdamW (or SGD): every update rule of
    `core.optim` acts leaf by leaf (no global-norm clipping) and both of their optimizers
    step together, so even Adam's bias-correction count is the same.
  * Initialisation: each student is initialised apart (seeds `seed` and `seed + 2`), and
    both encoders load `model.encoder_weights` when set (theirs: the same ImageNet
    backbone, heads re-initialised apart). The teacher starts as a copy of student 1 with
    fresh BatchNorm statistics; their random teacher is replaced outright by the first
    EMA (d = 0 at iteration 0), and its predictions before that (iteration 0) fall in our
    warm-up, where they are unused, so the two are equivalent.
  * A warm-up stage (the shared budget: `train.warmup_epochs` labeled-only epochs) that
    theirs lacks: their step 1 without the unlabeled half, whose weight lambda is near 0
    at their start anyway (sigmoid_rampup(0) = e^-5), and without step 2 (UMIX). The
    teacher runs on x in training mode as in their step 1, so its running statistics
    follow its current weights; theirs also sees u. The EMA's iteration index counts
    the warm-up steps, then the semi iterations; the ramp lambda counts semi iterations
    from the stage's start and spans `ucmt.rampup` of them (theirs: 5 of 25 epochs,
    from their first iteration).
  * Views: the pipeline gives one augmented image per row, used for every view: their
    uA1 (S1), uA2 (S2) and u (T) are one image, and the labeled UMIX mixes x itself (their
    xA1). Their views differ by photometric augmentation (colour jitter, posterize,
    equalize, blur) of 8-bit RGB; our images are z-scored per image and channel, which
    undoes brightness and contrast jitter and leaves no 8-bit image to posterize or
    equalize, so no jitter is added. The students still differ by their weights (as in
    cross pseudo supervision, where both see one image).
  * Data: the unlabeled stream is the run's unlabeled rows (theirs: the whole train set,
    labeled images included), batches of `train.batch_size` each.
  * Model selection: the teacher's val Dice (the run's best checkpoint); theirs keeps the
    teacher of the lowest mean step-2 training loss. Masks threshold the teacher's
    sigmoid at `eval.threshold` (0.5 = their argmax).
  * Stochastic depth (`model.drop_path_rate`) is on in every training-mode pass, the
    teacher's included, as their dropout in a network left in train().
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from cers_jax import sharding
from cers_jax.core import losses
from cers_jax.core import optim
from cers_jax.core.method import Built
from cers_jax.errors import ConfigError
from cers_jax.methods import budget
from cers_jax.methods import student as st
from cers_jax.methods import ucmt_ops
from cers_jax.models import cers as cers_model
from cers_jax.models.unet import ConvNeXtUNet

SEMI = 'semi'
DECODER = 'seg'


@dataclasses.dataclass(frozen=True)
class Hyper:
  """The method's settings (config section `ucmt`), fixed for the jitted steps."""

  alpha: float = ucmt_ops.UNSUP_ALPHA
  rampup: float = 0.2
  ema_decay: float = ucmt_ops.EMA_DECAY
  coefficient: float = ucmt_ops.EMA_COEFFICIENT
  grid: int = ucmt_ops.UMIX_GRID
  topk: int = ucmt_ops.UMIX_TOPK

  @classmethod
  def from_config(cls, config) -> 'Hyper':
    return st.settings(cls, config.ucmt)


@nnx.jit
def forward(net: ConvNeXtUNet, image: jax.Array) -> jax.Array:
  """One training-mode pass of a student or the teacher: its logits (B, H, W, 1).

  A jit of its own, because every BatchNorm write asks the traced value for its sharding,
  and the tracer's message for the missing attribute walks the whole trace so far: in one
  trace of the semi step's ten passes that made tracing quadratic (23 s for the tiny
  test network, 2 s with a fresh trace per pass). XLA inlines the nested jit, so the
  compiled step is the same. The BatchNorm statistics and RNG counts it writes reach `net`.
  """
  return net(image)[0]


class Students(nnx.Module):
  """UCMT's two students: separate ConvNeXt U-Nets with one decoder each."""

  def __init__(self, cfg, *, seeds: tuple[int, int]):
    self.students = nnx.List([
        ConvNeXtUNet(cfg, num_decoders=1, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
        for seed in seeds])

  def __call__(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each student's logits (B, H, W, 1) on `image`, one pass each (S1 first)."""
    return tuple(forward(net, image) for net in self.students)


class Graphs(NamedTuple):
  """The graph definitions the steps close over: the students' and the teacher's."""

  students: Any  # Of `Students`; merges with `StudentState.params`.
  teacher: Any  # Of one ConvNeXtUNet; merges with `StudentState.teacher.params`.


def build_students(config) -> Students:
  """Both students, each with the pretrained ConvNeXt encoder the config points to."""
  from cers_jax.convert import convnext as convnext_convert

  model = Students(config.model, seeds=(config.seed, config.seed + 2))
  if config.model.encoder_weights:
    for net in model.students:
      convnext_convert.load_convnext(net.encoder, config.model.encoder_weights)
  logging.info('UCMT: two ConvNeXt U-Net students and a teacher of %s parameters each.',
               f'{cers_model.count_params(model.students[0], exclude=()):,}')
  return model


def create_state(config, tx) -> tuple[Graphs, st.StudentState]:
  """(graphs, fresh state); the teacher is a copy of student 1 (module docstring)."""
  model = build_students(config)
  teacher_graphdef, teacher_params, teacher_stats, _ = nnx.split(
      model.students[0], nnx.Param, nnx.BatchStat, ...)
  graphdef, state = st.create_state(model, tx, rng=jax.random.key(config.seed),
                                    with_teacher=False)
  teacher = st.Teacher(params=jax.tree.map(jnp.copy, teacher_params),
                       batch_stats=jax.tree.map(jnp.copy, teacher_stats))
  return Graphs(students=graphdef, teacher=teacher_graphdef), state.replace(teacher=teacher)


def student_params(params, index: int):
  """Student `index`'s parameters, shaped as the teacher's."""
  return params['students'][index]


def _teacher_rng_state(state: st.StudentState):
  # The teacher's RNG streams are reseeded before every pass, so it borrows student 1's
  # RNG state, which has its shape, rather than carrying its own. Without stochastic depth
  # the students have no RNG state at all, and neither has the teacher.
  rng_state = state.rng_state
  return rng_state['students'][0] if 'students' in rng_state else rng_state


def teacher_passes(graphs: Graphs, state: st.StudentState, images, key: jax.Array):
  """The teacher in training mode, one pass per image batch, in order.

  Unlike `student.teacher_logits`, keeps the BatchNorm statistics the passes write: their
  teacher's running statistics come from these passes (and are what eval mode reads).

  Returns:
    (logits (B, H, W, 1) per batch, without gradient; the teacher's new batch_stats).
  """
  model = nnx.merge(graphs.teacher, state.teacher.params, state.teacher.batch_stats,
                    _teacher_rng_state(state), copy=True)
  nnx.reseed(model, dropout=key)
  logits = tuple(jax.lax.stop_gradient(forward(model, image)) for image in images)
  return logits, nnx.state(model, nnx.BatchStat)


def teacher_update(state: st.StudentState, batch_stats, iteration: jax.Array,
                   hyper: Hyper) -> st.StudentState:
  """The teacher after an update: the collaborative EMA of the students' new parameters
  (`ucmt_ops.collaborative_ema_update`, step = `iteration`) and `batch_stats`."""
  params = ucmt_ops.collaborative_ema_update(
      state.teacher.params, student_params(state.params, 0), student_params(state.params, 1),
      hyper.ema_decay, iteration, coefficient=hyper.coefficient)
  return state.replace(teacher=st.Teacher(params=params, batch_stats=batch_stats))


def ramp(semi_iteration: jax.Array, *, semi_total: int, rampup: float) -> jax.Array:
  """lambda: sigmoid_rampup over `rampup * semi_total` iterations of the semi stage."""
  return losses.sigmoid_rampup(semi_iteration, float(rampup * semi_total))


class Schedule(NamedTuple):
  """What both updates of one UCMT iteration share (theirs: one `iteration` index)."""

  ema_index: jax.Array  # The EMA's step: warm-up steps, then UCMT iterations, from 0.
  ramp: jax.Array  # lambda of this iteration.


def iteration_schedule(step: jax.Array, *, warmup_total: int, semi_total: int,
                       rampup: float) -> Schedule:
  """The schedule of the iteration that starts at optimizer step `step` (semi stage)."""
  semi_iteration = (step - warmup_total) // 2  # Two optimizer steps per iteration.
  return Schedule(ema_index=warmup_total + semi_iteration,
                  ramp=ramp(semi_iteration, semi_total=semi_total, rampup=rampup))


def warmup_step(state, labeled, *, graphs: Graphs, tx, hyper: Hyper):
  """Both students' supervised Dice, one update, the teacher's pass on x and its EMA."""
  student_key, teacher_key = st.step_keys(state, 2)
  _, teacher_stats = teacher_passes(graphs, state, (labeled['image'],), teacher_key)

  def loss_fn(params):
    model = st.student(graphs.students, state, params, student_key)
    loss = sum(ucmt_ops.dsc_loss_from_logits(logits, labeled['mask'])
               for logits in model(labeled['image']))
    return loss, st.written_state(model)

  (loss, written), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  iteration = state.step
  state = st.apply_gradients(tx, state, grads, written)
  return teacher_update(state, teacher_stats, iteration, hyper), {'loss': loss}


class FirstPass(NamedTuple):
  """Step 1's detached logits, which step 2's UMIX reads (pre-update, as theirs)."""

  labeled: tuple[jax.Array, jax.Array, jax.Array]  # S1(x), S2(x), T(x).
  unlabeled: tuple[jax.Array, jax.Array, jax.Array]  # S1(u), S2(u), T(u).


def first_update(state, labeled, unlabeled, schedule: Schedule, *, graphs: Graphs, tx,
                 hyper: Hyper):
  """Their step 1 (module docstring): returns (state, FirstPass, metrics)."""
  student_key, teacher_key = st.step_keys(state, 2)
  x, u = labeled['image'], unlabeled['image']
  (teacher_x, teacher_u), teacher_stats = teacher_passes(graphs, state, (x, u), teacher_key)

  def loss_fn(params):
    model = st.student(graphs.students, state, params, student_key)
    s1_x, s2_x = model(x)
    s1_u, s2_u = model(u)  # Their views uA1 and uA2 are one image here (docstring).
    loss, terms = ucmt_ops.ucmt_loss(s1_x, s2_x, labeled['mask'], s1_u, s2_u,
                                     ucmt_ops.hard_pseudo_label(teacher_u),
                                     ramp=schedule.ramp, alpha=hyper.alpha)
    passes = jax.lax.stop_gradient(((s1_x, s2_x), (s1_u, s2_u)))
    return loss, (terms, passes, st.written_state(model))

  (loss, (terms, passes, written)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = st.apply_gradients(tx, state, grads, written)
  state = teacher_update(state, teacher_stats, schedule.ema_index, hyper)
  first = FirstPass(labeled=(*passes[0], teacher_x), unlabeled=(*passes[1], teacher_u))
  # Diagnostics of step 1 (step 2's terms are logged with a suffix 2): lambda * alpha
  # weighs cps + cmt.
  diagnostics = losses.unsup_diagnostics(
      loss=loss, unsup_weighted=schedule.ramp * terms['unsup'],
      weight=schedule.ramp * hyper.alpha, pseudo=ucmt_ops.hard_pseudo_label(teacher_u),
      labeled_mask=labeled['mask'])
  return state, first, dict(loss1=loss, ramp=schedule.ramp,
                            unsup_weighted=schedule.ramp * terms['unsup'], **terms,
                            **diagnostics)


def umix(logits: tuple[jax.Array, jax.Array, jax.Array], arrays, hyper: Hyper):
  """UMIX of `arrays` by the uncertainty of (S1, T) and (S2, T) from `logits`."""
  p1, p2, pt = (jax.nn.sigmoid(z) for z in logits)
  indices = ucmt_ops.umix_indices(ucmt_ops.mean_entropy_uncertainty(p1, pt),
                                  ucmt_ops.mean_entropy_uncertainty(p2, pt),
                                  grid=hyper.grid, topk=hyper.topk)
  return tuple(ucmt_ops.apply_umix(a, indices, grid=hyper.grid) for a in arrays)


def second_update(state, labeled, unlabeled, first: FirstPass, schedule: Schedule, *,
                  graphs: Graphs, tx, hyper: Hyper):
  """Their step 2 (module docstring) on the state after step 1: (state, metrics)."""
  x_mix, y_mix = umix(first.labeled, (labeled['image'], labeled['mask']), hyper)
  teacher_label = ucmt_ops.hard_pseudo_label(first.unlabeled[2])
  u_mix, yt_mix = umix(first.unlabeled, (unlabeled['image'], teacher_label), hyper)
  student_key = st.step_keys(state, 1)[0]  # state.step moved on: not step 1's key.

  def loss_fn(params):
    model = st.student(graphs.students, state, params, student_key)
    s1_x, s2_x = model(x_mix)
    s1_u, s2_u = model(u_mix)  # Their y1, y2: the students' own labels on u_mix.
    loss, terms = ucmt_ops.ucmt_loss(s1_x, s2_x, y_mix, s1_u, s2_u, yt_mix,
                                     ramp=schedule.ramp, alpha=hyper.alpha)
    return loss, (terms, st.written_state(model))

  (loss, (terms, written)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = st.apply_gradients(tx, state, grads, written)
  # The teacher does not run in step 2: its statistics stay those step 1 wrote.
  state = teacher_update(state, state.teacher.batch_stats, schedule.ema_index, hyper)
  return state, dict(loss2=loss, **{f'{name}2': value for name, value in terms.items()})


def semi_step(state, labeled, unlabeled, *, graphs: Graphs, tx, hyper: Hyper,
              warmup_total: int, semi_total: int):
  """One UCMT iteration: step 1 then step 2, two optimizer updates (`state.step` += 2)."""
  schedule = iteration_schedule(state.step, warmup_total=warmup_total,
                                semi_total=semi_total, rampup=hyper.rampup)
  kwargs = dict(graphs=graphs, tx=tx, hyper=hyper)
  state, first, metrics = first_update(state, labeled, unlabeled, schedule, **kwargs)
  state, second = second_update(state, labeled, unlabeled, first, schedule, **kwargs)
  # 'loss' is the iteration's (both updates), so the run's NaN check sees either.
  return state, dict(loss=metrics['loss1'] + second['loss2'], **metrics, **second)


def eval_step(state, batch, *, graphs: Graphs, threshold: float):
  """The teacher in eval mode: `prob_seg`, and `dice_seg`, `iou_seg` with a mask."""
  teacher = state.teacher
  as_student = state.replace(params=teacher.params, batch_stats=teacher.batch_stats,
                             rng_state=_teacher_rng_state(state))
  return st.eval_step(as_student, batch, graphdef=graphs.teacher, decoders=(DECODER,),
                      threshold=threshold)


def check_umix(config) -> None:
  """Refuses a UMIX grid that does not tile the image, or a topk outside the grid."""
  size, grid, topk = config.data.image_size, int(config.ucmt.grid), int(config.ucmt.topk)
  if grid < 1 or size % grid:
    raise ConfigError(f'--config.ucmt.grid={grid}: UMIX cuts the {size}x{size} image into '
                      'grid x grid patches; give a divisor of data.image_size.')
  if not 1 <= topk <= grid * grid:
    raise ConfigError(f'--config.ucmt.topk={topk}: give 1 to {grid * grid} patches.')


@dataclasses.dataclass(frozen=True)
class UCMTMethod(st.StudentMethod):
  """UCMT (module docstring): the teacher is the decoder 'seg' evaluated."""

  name: str = 'ucmt'
  decoders: tuple[str, ...] = (DECODER,)
  primary: str = DECODER
  stage_names: tuple[str, ...] = (st.WARMUP, SEMI)
  with_teacher: bool = True

  def check(self, config) -> None:
    super().check(config)
    check_umix(config)

  def stage_steps(self, config, graphs, tx, plan: st.Plan):
    hyper = Hyper.from_config(config)
    kwargs = dict(graphs=graphs, tx=tx, hyper=hyper, warmup_total=plan.warmup_total,
                  semi_total=plan.semi_total)
    return {
        st.WARMUP: lambda state, labeled: warmup_step(state, labeled, graphs=graphs, tx=tx,
                                                      hyper=hyper),
        SEMI: lambda state, labeled, unlabeled: semi_step(state, labeled, unlabeled,
                                                          **kwargs),
    }

  def build(self, config, data, workdir: str, mesh) -> Built:
    del workdir  # UCMT writes nothing of its own.
    plan = make_plan(config, data)
    total = optimizer_steps(plan)
    recipe, tx, rate = optim.method_optimizer(config, self, total_steps=total,
                                              warmup_steps=plan.warmup_total)
    graphs, state = create_state(config, tx)
    train = {name: jax.jit(step, donate_argnums=0)
             for name, step in self.stage_steps(config, graphs, tx, plan).items()}
    threshold = config.eval.threshold
    steps = st.StudentSteps(
        mesh=mesh, train=train,
        evaluate=jax.jit(lambda s, b: eval_step(s, b, graphs=graphs, threshold=threshold)))
    stages = (
        st._stage(st.WARMUP, config.train.warmup_epochs, plan.warmup_steps_per_epoch,
                  ('labeled',), train[st.WARMUP], config, start=None,
                  validates=bool(config.train.get('validate_warmup', False))),
        st._stage(SEMI, config.train.epochs, plan.semi_steps_per_epoch, self.semi_streams,
                  train[SEMI], config, start=optim.semi_start(tx, recipe), validates=True),
    )
    return Built(graphdef=graphs, state=sharding.replicate(state, mesh), steps=steps,
                 schedule=rate, stages=stages)


def make_plan(config, data) -> st.Plan:
  """The shared budget (`methods.budget`): semi_total counts UCMT iterations."""
  warmup_spe, semi_spe = budget.steps_per_epoch(config, data)
  return st.Plan(warmup_steps_per_epoch=warmup_spe, semi_steps_per_epoch=semi_spe,
                 warmup_total=config.train.warmup_epochs * warmup_spe,
                 semi_total=config.train.epochs * semi_spe)


def optimizer_steps(plan: st.Plan) -> int:
  """Optimizer steps of the run: one per warm-up step, two per UCMT iteration."""
  return plan.warmup_total + 2 * plan.semi_total


METHOD = UCMTMethod()
