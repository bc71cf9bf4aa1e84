"""Where a run stands: its stage, its epoch in that stage, the best validation so far.

A run goes INIT (nothing trained) -> WARMUP -> SEMI -> DONE; the pool is built between
warm-up and the semi-supervised stage. `Progress` is the frozen record the stage runner
passes along and returns, and what every checkpoint saves beside the state as its `meta`
JSON (`to_meta` / `from_meta`, with the keys checkpoints have always had, so older
checkpoints resume).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

INIT, WARMUP, SEMI, DONE = 'init', 'warmup', 'semi', 'done'
STAGES = (INIT, WARMUP, SEMI, DONE)
EPOCH_STAGES = (WARMUP, SEMI)  # The stages that run epochs and write their records.


@dataclasses.dataclass(frozen=True)
class Partial:
  """The part of an epoch that a preempted invocation ran: resumed from its next step."""

  stage: str
  epoch: int
  steps: int  # Steps of the epoch done.
  sums: Mapping[str, float]  # Metric sums over those steps.
  seconds: float

  def as_done(self) -> dict[str, Any]:
    """What `epoch.run_epoch` takes as `done`."""
    return dict(steps=self.steps, sums=dict(self.sums), seconds=self.seconds)


@dataclasses.dataclass(frozen=True)
class Progress:
  """The run's position; `epoch` counts the epochs of `stage` done."""

  stage: str = INIT
  epoch: int = 0
  best_dice: float = -1.0  # Best val Dice of D_r so far (the best checkpoint's).
  best_epoch: int = -1
  bad_epochs: int = 0  # Epochs since the best one, for early stopping.
  # The warm-up's best val Dice and epoch (-1: warm-up did not validate), recorded when the
  # last stage starts: the run's semi-minus-warm-up gain is best_dice - warmup_best_dice.
  warmup_best_dice: float = -1.0
  warmup_best_epoch: int = -1
  # Each train loader's position, one entry per process (sharding.gather_json).
  iterators: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  partial: Partial | None = None
  workdir: str | None = None  # Where it was saved: lets a copied workdir's paths compare.

  def replace(self, **changes) -> Progress:
    return dataclasses.replace(self, **changes)

  def partial_of(self, stage: str) -> Partial | None:
    """The preempted part of the current epoch of `stage`, if any."""
    partial = self.partial
    if partial and partial.stage == stage and partial.epoch == self.epoch:
      return partial
    return None

  def after_validation(self, dice: float, *, patience: int,
                       epochs: int) -> tuple[Progress, bool, bool]:
    """The progress once a semi-supervised epoch scored val Dice `dice`.

    Returns:
      (progress, improved, stopping): the epoch counted, the best updated when `dice`
      beats it, DONE when `patience` epochs went without a better one (`stopping`) or the
      last epoch ran.
    """
    epoch = self.epoch + 1
    improved = dice > self.best_dice
    if improved:
      best = dict(best_dice=dice, best_epoch=epoch, bad_epochs=0)
    else:
      best = dict(bad_epochs=self.bad_epochs + 1)
    stopping = best.get('bad_epochs', 0) >= patience
    stage = DONE if stopping or epoch >= epochs else self.stage
    return self.replace(epoch=epoch, stage=stage, **best), improved, stopping

  def to_meta(self) -> dict[str, Any]:
    """The checkpoint's `meta` JSON."""
    meta = dict(stage=self.stage, epoch=self.epoch, best_dice=self.best_dice,
                best_epoch=self.best_epoch, bad_epochs=self.bad_epochs,
                iterators=dict(self.iterators))
    if self.warmup_best_epoch >= 0:
      meta.update(warmup_best_dice=self.warmup_best_dice,
                  warmup_best_epoch=self.warmup_best_epoch)
    if self.partial is not None:
      meta['partial'] = dataclasses.asdict(self.partial)
    if self.workdir is not None:
      meta['workdir'] = self.workdir
    return meta

  @classmethod
  def from_meta(cls, meta: Mapping[str, Any]) -> Progress:
    """The progress a checkpoint's `meta` JSON records (unknown keys are ignored)."""
    partial = meta.get('partial')
    known = {f.name for f in dataclasses.fields(cls)} - {'partial'}
    return cls(**{k: v for k, v in meta.items() if k in known},
               partial=Partial(**partial) if partial else None)
