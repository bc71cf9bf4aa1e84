"""Evaluators: built from the config, given a state and a split, they return named metrics
and the files they wrote (docs/design.md section 11).

In the spirit of big_vision's evaluators: each is a small object made by `build(name,
context)` from the run's `Context` (its config, data, jitted steps, workdir and what the
method's eval step predicts); `run(state, split)` returns a `Result`. Every one walks its
eval batches through the one eval-batch loop, `sharding.host_outputs`.

  validation   per-image mean Dice/IoU of every decoder: model selection (no files)
  segmentation eval/<split>_per_image.csv and _summary.json: the paper's scores, pooled
               Dice, surface metrics, bootstrap CIs (and per volume for NIfTI slices)
  retrieval    the retrieval report (methods with a knowledge pool only)
  predictions  masks, overlays and evidence pages (`inference.predict`)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Protocol

import jax
import ml_collections

from cers_jax.core import method as method_lib
from cers_jax.data.dataset import Data
from cers_jax.errors import ConfigError
from cers_jax.inference import evaluate as evaluate_lib
from cers_jax.inference import predict as predict_lib
from cers_jax.inference import retrieval_report


@dataclasses.dataclass(frozen=True)
class Result:
  """What an evaluator returns: its named metrics and the paths of the files it wrote."""

  metrics: Mapping[str, Any]
  files: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Context:
  """What evaluators are built from: one run's config, data, steps and method outputs."""

  config: ml_collections.ConfigDict
  workdir: str
  data: Data
  steps: Any  # The method's jitted steps (`.evaluate`, `.mesh`; `.features` to retrieve).
  heads: predict_lib.Heads  # The decoders the eval step scores, the primary one, retrieval.

  @classmethod
  def of(cls, exp) -> Context:
    """The context of a `training.experiment.Experiment`."""
    method = exp.method
    heads = predict_lib.Heads(decoders=tuple(method.decoders), primary=method.primary,
                              retrieves=method.retrieval_stage is not None)
    return cls(config=exp.config, workdir=exp.workdir, data=exp.data, steps=exp.steps,
               heads=heads)


class Evaluator(Protocol):
  name: str

  def run(self, state, split: str, **context) -> Result:
    """Scores `state` on `split`; `context`: what the run knows of the state (its meta)."""


@dataclasses.dataclass(frozen=True)
class Validation:
  """Per-image mean Dice/IoU of every decoder: what model selection and early stopping read.

  No surface metrics and no bootstrap every epoch; its keys are `<split>_<score>_mean`
  (`val_dice_r_mean`, ...), the keys of metrics.jsonl.
  """

  context: Context
  name: str = 'validation'

  def run(self, state, split: str = 'val', **_) -> Result:
    ctx = self.context
    options = evaluate_lib.EvalOptions(threshold=ctx.config.eval.threshold,
                                       bootstrap_resamples=0, decoders=ctx.heads.decoders)
    summary = evaluate_lib.evaluate_rows(state, ctx.steps, ctx.data, ctx.data.rows[split],
                                         ctx.config.train.eval_batch_size, options=options)
    return Result({f'{split}_{k}_mean': summary[f'{k}_mean']
                   for k in evaluate_lib.overlap_keys(ctx.heads.decoders)})


@dataclasses.dataclass(frozen=True)
class Segmentation:
  """The scores of every image of a split and their summary, written under eval/."""

  context: Context
  name: str = 'segmentation'

  def run(self, state, split: str = 'test', *, meta: dict | None = None, **_) -> Result:
    ctx = self.context
    out_dir = os.path.join(ctx.workdir, 'eval')
    summary = evaluate_lib.evaluate_split(state, ctx.steps, ctx.data, ctx.config, split=split,
                                          out_dir=out_dir, meta=meta,
                                          decoders=ctx.heads.decoders,
                                          retrieval_mode=ctx.heads.mode(ctx.config))
    names = [f'{split}_per_image.csv', f'{split}_summary.json']
    if 'volume_count' in summary:
      names.append(f'{split}_per_volume.csv')
    return Result(summary, tuple(os.path.join(out_dir, n) for n in names))


@dataclasses.dataclass(frozen=True)
class Retrieval:
  """The retrieval report of a split into <workdir>/retrieval[/<name>]."""

  context: Context
  name: str = 'retrieval'

  def run(self, state, split: str = 'val', *, folder: str = '', stage: str | None = None,
          epoch: int | None = None, **_) -> Result:
    """`folder`: a subfolder of retrieval/ ('after_warmup'); `stage`, `epoch`: where the
    state's run stood, recorded in report.json."""
    ctx = self.context
    out_dir = os.path.normpath(os.path.join(ctx.workdir, 'retrieval', folder))
    report = retrieval_report.write_report(
        state, ctx.steps, ctx.data, ctx.config, split, out_dir, stage=stage, epoch=epoch,
        step=int(jax.device_get(state.step)))
    names = ('report.json', 'references.csv', 'report.png')
    return Result(report, tuple(os.path.join(out_dir, n) for n in names))


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Masks, overlays and an evidence page per image (config eval.predict_dir, or the first
  images of the split)."""

  context: Context
  name: str = 'predictions'

  def run(self, state, split: str = 'test', *, curves_png: str | None = None,
          **_) -> Result:
    ctx = self.context
    out_dir = predict_lib.predict(state, ctx.steps, ctx.data, ctx.config, ctx.workdir,
                                  curves_png=curves_png, heads=ctx.heads, split=split)
    return Result({'predict_dir': out_dir}, (out_dir,))


def _retrieval(context: Context) -> Retrieval:
  if not context.heads.retrieves:
    name = context.config.get('method', method_lib.DEFAULT)
    raise ConfigError(f'--config.method={name!r} does not retrieve: it has no retrieval '
                      'report (--mode retrieval).')
  return Retrieval(context)


EVALUATORS: dict[str, Callable[[Context], Evaluator]] = dict(
    validation=Validation, segmentation=Segmentation, retrieval=_retrieval,
    predictions=Predictions)


def build(name: str, context: Context) -> Evaluator:
  """The evaluator `name` (one of EVALUATORS) for a run's context."""
  if name not in EVALUATORS:
    raise ConfigError(f'Unknown evaluator {name!r}; choose one of {tuple(EVALUATORS)}.')
  return EVALUATORS[name](context)
