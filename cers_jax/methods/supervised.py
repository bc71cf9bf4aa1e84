"""Table 1's supervised row: the ConvNeXt U-Net trained on the labeled images only.

The paper's "U-Net" baseline uses CERS's ConvNeXt backbone; here it is CERS's encoder and
standard residual U-Net decoder (`cers_jax.models.unet`), trained with CERS's supervised
loss (DiceCE, `core.losses.dice_ce_from_logits`) for CERS's whole budget: the warm-up's
passes over the labeled images, then as many labeled-only steps as CERS's semi-supervised
stage takes (stage 'train'). With `data.labeled_fraction=1.0` this is Table 1's 100% row.
"""

from __future__ import annotations

import dataclasses

from cers_jax.core import losses
from cers_jax.methods import student as st

TRAIN = 'train'


def step(state, labeled, *, graphdef, tx):
  """DiceCE on a labeled batch; the unlabeled images are never read."""
  return st.supervised_step(state, labeled, graphdef=graphdef, tx=tx,
                            loss_fn=losses.dice_ce_from_logits)


@dataclasses.dataclass(frozen=True)
class SupervisedMethod(st.StudentMethod):
  name: str = 'supervised'
  decoders: tuple[str, ...] = ('seg',)
  primary: str = 'seg'
  stage_names: tuple[str, ...] = (st.WARMUP, TRAIN)
  semi_streams: tuple[str, ...] = ('labeled',)

  def stage_steps(self, config, graphdef, tx, plan):
    one = lambda state, labeled: step(state, labeled, graphdef=graphdef, tx=tx)  # noqa: E731
    return {st.WARMUP: one, TRAIN: one}


METHOD = SupervisedMethod()
