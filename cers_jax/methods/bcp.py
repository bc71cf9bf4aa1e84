"""BCP, Bidirectional Copy-Paste (Bai et al., CVPR 2023), as its authors' 2-D script trains.

Follows DeepMed-Lab-ECNU/BCP `code/ACDC_BCP_train.py` on the ConvNeXt U-Net
(`cers_jax.models.unet`); the operations and their transcription of that script are in
`cers_jax.methods.bcp_ops` (its docstring lists their hyperparameters and procedure). Each
labeled and unlabeled batch is split in halves, as their `img_a`/`img_b` and
`uimg_a`/`uimg_b`:

  warmup (their pre-train)  x = mix(img_a, img_b, M) with one random box M per step,
                            `mix_loss` with weight 1 on both regions;
  semi (their self-train)   the teacher starts as the student; per step the teacher, in
                            training mode, pseudo-labels uimg_a and uimg_b (z > 0, largest
                            connected component); the student learns the inward mix
                            mix(uimg_a, img_a, M) and the outward mix mix(img_b, uimg_b, M),
                            pseudo-labelled regions weighted `bcp.u_weight`; then the
                            teacher's parameters and BatchNorm statistics move by EMA 0.99.

Their stage recipe (core/optim.py RECIPES, docs/design.md section 9): a constant rate,
a new optimizer for self-training, which starts from pre-training's best weights by
validation Dice (when warm-up validates, train.validate_warmup; otherwise its last), and
the best checkpoint chosen among self-training epochs. The EMA teacher is scored on val too
(`val_dice_teacher_mean`). Differences, forced by this project's shared protocol: the
optimizer, peak rate, batch and budget are the run's (train.*), where theirs is SGD at 0.01
for 10,000 + 30,000 iterations.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cers_jax.core import losses
from cers_jax.errors import ConfigError
from cers_jax.methods import bcp_ops
from cers_jax.methods import student as st

SEMI = 'semi'


@dataclasses.dataclass(frozen=True)
class Hyper:
  """The method's settings (config section `bcp`), fixed for the jitted steps."""

  u_weight: float = 0.5
  ema_decay: float = 0.99
  patch_ratio: float = 2 / 3

  @classmethod
  def from_config(cls, config) -> 'Hyper':
    return st.settings(cls, config.bcp)


def _halves(x):
  """Their a and b sub-batches: the first and the second half of the batch."""
  half = x.shape[0] // 2
  return x[:half], x[half:]


def pretrain_step(state, labeled, *, graphdef, tx, hyper: Hyper):
  """Their pre-train step: one labeled half pasted into the other, both regions weight 1."""
  student_key, box_key = st.step_keys(state, 2)
  img_a, img_b = _halves(labeled['image'])
  lab_a, lab_b = _halves(labeled['mask'])
  box = bcp_ops.copy_paste_mask(box_key, img_a.shape[1], hyper.patch_ratio)

  def loss_fn(params):
    model = st.student(graphdef, state, params, student_key)
    logits = model(bcp_ops.mix(img_a, img_b, box))[0]
    loss = bcp_ops.mix_loss(logits, lab_a, lab_b, box, image_weight=1.0, patch_weight=1.0)
    return loss, st.written_state(model)

  (loss, written), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return st.apply_gradients(tx, state, grads, written), {'loss': loss}


def self_train_step(state, labeled, unlabeled, *, graphdef, tx, hyper: Hyper):
  """Their self-train step (module docstring): the bidirectional copy-paste."""
  student_key, box_key, teacher_key_a, teacher_key_b = st.step_keys(state, 4)
  img_a, img_b = _halves(labeled['image'])
  lab_a, lab_b = _halves(labeled['mask'])
  uimg_a, uimg_b = _halves(unlabeled['image'])
  box = bcp_ops.copy_paste_mask(box_key, img_a.shape[1], hyper.patch_ratio)
  # Two teacher passes, as theirs: BatchNorm statistics of each half on its own.
  plab_a = bcp_ops.pseudo_label(
      st.teacher_logits(graphdef, state, uimg_a, teacher_key_a, train_mode=True)[0])
  plab_b = bcp_ops.pseudo_label(
      st.teacher_logits(graphdef, state, uimg_b, teacher_key_b, train_mode=True)[0])
  inward = bcp_ops.mix(uimg_a, img_a, box)
  outward = bcp_ops.mix(img_b, uimg_b, box)

  def loss_fn(params):
    model = st.student(graphdef, state, params, student_key)
    logits_in, logits_out = model(inward)[0], model(outward)[0]
    unl = bcp_ops.mix_loss(logits_in, plab_a, lab_a, box,
                           image_weight=hyper.u_weight, patch_weight=1.0)
    lab = bcp_ops.mix_loss(logits_out, lab_b, plab_b, box,
                           image_weight=1.0, patch_weight=hyper.u_weight)
    # Diagnostics: the pseudo-labelled regions' loss at weight 1 (inward: around the box;
    # outward: the box), which the loss weighs by u_weight.
    pseudo_raw = jax.lax.stop_gradient(
        bcp_ops.mix_loss(logits_in, plab_a, lab_a, box, image_weight=1.0, patch_weight=0.0)
        + bcp_ops.mix_loss(logits_out, lab_b, plab_b, box, image_weight=0.0,
                           patch_weight=1.0))
    pseudo = jnp.concatenate([plab_a, plab_b])
    metrics = dict(loss=unl + lab, inward=unl, outward=lab, pseudo_foreground=jnp.mean(pseudo),
                   pseudo_raw=pseudo_raw, pseudo_weighted=hyper.u_weight * pseudo_raw,
                   **losses.unsup_diagnostics(
                       loss=unl + lab, unsup_weighted=hyper.u_weight * pseudo_raw,
                       weight=hyper.u_weight, pseudo=pseudo, labeled_mask=labeled['mask']))
    return unl + lab, (metrics, st.written_state(model))

  (_, (metrics, written)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = st.apply_gradients(tx, state, grads, written)
  teacher = st.Teacher(
      params=bcp_ops.ema_update(state.teacher.params, state.params, hyper.ema_decay),
      batch_stats=bcp_ops.ema_update(state.teacher.batch_stats, state.batch_stats,
                                     hyper.ema_decay))
  return state.replace(teacher=teacher), metrics


def teacher_from_student(state):
  """Their self-train start: the teacher loads the student's (pre-trained) weights."""
  return state.replace(teacher=st.Teacher(params=jax.tree.map(jnp.copy, state.params),
                                          batch_stats=jax.tree.map(jnp.copy,
                                                                   state.batch_stats)))


@dataclasses.dataclass(frozen=True)
class BCPMethod(st.StudentMethod):
  name: str = 'bcp'
  decoders: tuple[str, ...] = ('seg',)
  primary: str = 'seg'
  stage_names: tuple[str, ...] = (st.WARMUP, SEMI)
  with_teacher: bool = True
  monitor_teacher: bool = True

  def check(self, config) -> None:
    super().check(config)
    if config.train.batch_size < 2 or config.train.batch_size % 2:
      raise ConfigError(f'--config.train.batch_size={config.train.batch_size}: BCP splits '
                        'each batch into two halves (img_a, img_b); give an even size >= 2.')
    bcp_ops.patch_side(config.data.image_size, float(config.bcp.patch_ratio))

  def stage_steps(self, config, graphdef, tx, plan):
    hyper = Hyper.from_config(config)
    return {
        st.WARMUP: lambda state, labeled: pretrain_step(state, labeled, graphdef=graphdef,
                                                        tx=tx, hyper=hyper),
        SEMI: lambda state, labeled, unlabeled: self_train_step(
            state, labeled, unlabeled, graphdef=graphdef, tx=tx, hyper=hyper),
    }

  def stage_start(self, stage: str):
    return teacher_from_student if stage == SEMI else None


METHOD = BCPMethod()
