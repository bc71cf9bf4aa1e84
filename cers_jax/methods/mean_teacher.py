"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) as SSL4MIS trains it in 2-D.

Follows HiLab-git/SSL4MIS `code/train_mean_teacher_2D.py`, on the ConvNeXt U-Net
(`cers_jax.models.unet`) with one sigmoid logit per pixel instead of their softmax over
classes (for two classes the same probabilities):

  * the student sees the labeled and the unlabeled batch in one forward pass (BatchNorm
    statistics over both, as their concatenated `volume_batch`);
  * supervised loss 0.5 * (Dice + CE) on the labeled rows, their `DiceLoss`: the mean over
    background and foreground of 1 - (2 sum(p t) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5),
    summed over the whole batch (`two_class_dice_loss`);
  * the teacher, an EMA of the student left in training mode, sees the unlabeled batch plus
    noise clamp(N(0, 0.1^2), -0.2, 0.2);
  * consistency: the mean squared difference of student and teacher probabilities on the
    unlabeled rows (their mean over two softmax channels of the squared difference equals
    the sigmoid's), weighted by 0.1 * sigmoid_rampup;
  * after each step the teacher's parameters (not its BatchNorm statistics, as theirs)
    become alpha * teacher + (1 - alpha) * student, alpha = min(1 - 1/(t + 1), 0.99); its
    statistics are those its own training-mode passes write (as a torch module in
    train()), read only when the teacher is scored on val (`val_dice_teacher_mean`).

Their schedule on this project's budget (`mean_teacher` in configs/base.py): their
consistency is 0 for the first 1000 of 30,000 iterations, then ramps over all 30,000
(`sigmoid_rampup(iter // 150, 200)`). Here the warm-up stage is that consistency-free
phase (supervised steps on the labeled batch, the teacher following by EMA), and the ramp
spans `mean_teacher.rampup` of the 'semi' stage, smoothly rather than in 150-step stairs.
The optimizer and peak rate are the run's (train.*), as for every method; the schedule is
one decay over both stages as their poly decay over all iterations (`single_cosine`,
docs/design.md section 9). The teacher's input noise is added to z-scored images here,
to [0, 1]-scaled ones in SSL4MIS: relative to the image, the same 0.1 is smaller here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cers_jax.core import losses
from cers_jax.methods import student as st

SEMI = 'semi'
_SSL4MIS_DICE_SMOOTH = 1e-5


@dataclasses.dataclass(frozen=True)
class Hyper:
  """The method's settings (config section `mean_teacher`), fixed for the jitted steps."""

  ema_decay: float = 0.99
  consistency: float = 0.1
  rampup: float = 1.0
  noise_std: float = 0.1
  noise_clip: float = 0.2

  @classmethod
  def from_config(cls, config) -> 'Hyper':
    return st.settings(cls, config.mean_teacher)


def two_class_dice_loss(prob: jax.Array, target: jax.Array) -> jax.Array:
  """SSL4MIS's `DiceLoss(2)` on foreground probabilities (B, H, W, 1): batch-wide sums,
  squared denominators, averaged over the background and foreground classes."""

  def one_class(score, truth):
    intersect = jnp.sum(score * truth)
    denominator = jnp.sum(score * score) + jnp.sum(truth * truth)
    return 1.0 - (2.0 * intersect + _SSL4MIS_DICE_SMOOTH) / (denominator
                                                              + _SSL4MIS_DICE_SMOOTH)

  return 0.5 * (one_class(1.0 - prob, 1.0 - target) + one_class(prob, target))


def supervised_loss(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """0.5 * (Dice + CE), SSL4MIS's supervised loss, for one-logit binary segmentation."""
  return 0.5 * (two_class_dice_loss(jax.nn.sigmoid(logits), mask)
                + losses.bce_from_logits(logits, mask))


def ema_alpha(step: jax.Array, decay: float) -> jax.Array:
  """SSL4MIS's `update_ema_variables`: the true average until it is older than `decay`."""
  return jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), decay)


def teacher_noise(key: jax.Array, shape, std: float, clip: float) -> jax.Array:
  """clamp(randn * std, -clip, clip): the noise added to the teacher's input."""
  return jnp.clip(jax.random.normal(key, shape) * std, -clip, clip)


def consistency_weight(semi_step: jax.Array, semi_total: int, *, consistency: float,
                       rampup: float) -> jax.Array:
  """consistency * exp(-5 (1 - t/T)^2) with T = `rampup` of the stage's `semi_total` steps."""
  length = max(rampup * semi_total, 1e-8)
  return consistency * losses.sigmoid_rampup(semi_step.astype(jnp.float32), length)


def _with_teacher_ema(state, cfg, applied_at: jax.Array):
  """The teacher after the step that took the state to `state.step` (their iter_num is the
  step count before that update)."""
  teacher = state.teacher.replace(
      params=st.ema(state.teacher.params, state.params, ema_alpha(applied_at, cfg.ema_decay)))
  return state.replace(teacher=teacher)


def warmup_step(state, labeled, *, graphdef, tx, cfg):
  """Their consistency-free iterations: the supervised loss, then the teacher's EMA."""
  before = state.step
  state, metrics = st.supervised_step(state, labeled, graphdef=graphdef, tx=tx,
                                      loss_fn=supervised_loss)
  return _with_teacher_ema(state, cfg, before), metrics


def semi_step(state, labeled, unlabeled, *, graphdef, tx, cfg, semi_start: int,
              semi_total: int):
  """One Mean Teacher step on a labeled and an unlabeled batch (module docstring)."""
  student_key, noise_key, teacher_key = st.step_keys(state, 3)
  noisy = unlabeled['image'] + teacher_noise(noise_key, unlabeled['image'].shape,
                                             cfg.noise_std, cfg.noise_clip)
  # Their ema_model, left in train(), updates its running statistics in this pass; they
  # are kept (never read in training), so that the teacher can be scored on val.
  teacher_out, teacher_stats = st.teacher_pass(graphdef, state, noisy, teacher_key)
  teacher_prob = jax.nn.sigmoid(teacher_out[0])
  weight = consistency_weight(state.step - semi_start, semi_total,
                              consistency=cfg.consistency, rampup=cfg.rampup)
  num_labeled = labeled['image'].shape[0]

  def loss_fn(params):
    model = st.student(graphdef, state, params, student_key)
    logits = model(jnp.concatenate([labeled['image'], unlabeled['image']]))[0]
    supervised = supervised_loss(logits[:num_labeled], labeled['mask'])
    consistency = jnp.mean((jax.nn.sigmoid(logits[num_labeled:]) - teacher_prob) ** 2)
    loss = supervised + weight * consistency
    metrics = dict(loss=loss, supervised=supervised, consistency=consistency,
                   consistency_weight=weight, consistency_weighted=weight * consistency,
                   **losses.unsup_diagnostics(loss=loss, unsup_weighted=weight * consistency,
                                              weight=weight, pseudo=teacher_prob,
                                              labeled_mask=labeled['mask']))
    return loss, (metrics, st.written_state(model))

  (_, (metrics, written)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  before = state.step
  state = st.apply_gradients(tx, state, grads, written)
  state = state.replace(teacher=state.teacher.replace(batch_stats=teacher_stats))
  return _with_teacher_ema(state, cfg, before), metrics


@dataclasses.dataclass(frozen=True)
class MeanTeacherMethod(st.StudentMethod):
  name: str = 'mean_teacher'
  decoders: tuple[str, ...] = ('seg',)
  primary: str = 'seg'
  stage_names: tuple[str, ...] = (st.WARMUP, SEMI)
  with_teacher: bool = True
  monitor_teacher: bool = True

  def stage_steps(self, config, graphdef, tx, plan):
    cfg = Hyper.from_config(config)
    return {
        st.WARMUP: lambda state, labeled: warmup_step(state, labeled, graphdef=graphdef,
                                                      tx=tx, cfg=cfg),
        SEMI: lambda state, labeled, unlabeled: semi_step(
            state, labeled, unlabeled, graphdef=graphdef, tx=tx, cfg=cfg,
            semi_start=plan.warmup_total, semi_total=plan.semi_total),
    }


METHOD = MeanTeacherMethod()
