"""Why a decoder predicts nothing: the numbers behind each CERS decoder of a checkpoint.

  python scripts/decoder_health.py WORKDIR [--which latest] [--split val] [--batches 4]

For D_r and D_s of the run's `which` checkpoint, on the first batches of `split`:

  dice_eval / dice_batch   mean Dice with BatchNorm's running statistics (how the run is
                           scored) and with the batch's own statistics: a gap says the
                           running statistics lag the weights
  fg_pred / fg_true        share of pixels predicted above the threshold, and of true lesion
  p50 / p99 / max          quantiles of the predicted probabilities
  head_bias                the bias of the decoder's last 1x1 convolution
  bn_shift                 mean over the decoder's BatchNorm channels of
                           |batch mean - running mean| / sqrt(running var), on the batch
  grad_norm                norm of d DiceCE(decoder) / d (its parameters) on a labeled train
                           batch (warm-up loss terms, one batch)

Prints a table and writes `<workdir>/decoder_health.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cers_jax import metrics as metrics_lib
from cers_jax.core import losses
from cers_jax.core import steps as ts
from cers_jax.core.state import merge_model
from cers_jax.data import pipeline
from cers_jax.training import experiment

DECODERS = {'r': 'decoder_r', 's': 'decoder_s'}


def _forward(model, batch, state, cfg):
  encoded = model.encode(batch['image'], batch['text_ids'], batch['text_mask'])
  retrieved = None
  if cfg.mode_spec.retrieves:
    retrieved = ts._retrieve(encoded.features[-1], batch, state.pool, state.tables, cfg).feat
  return model.decode(encoded, retrieved)


def _probe_bn(model, name: str, batch, state, cfg) -> float:
  """Mean |batch mean - running mean| / sqrt(running var) over the decoder's BN layers."""
  running = {path: (bn.mean[...], bn.var[...])
             for path, bn in nnx.iter_graph(getattr(model, name))
             if isinstance(bn, nnx.BatchNorm)}
  train = nnx.view(model, deterministic=True, use_running_average=False)
  _forward(train, batch, state, cfg)  # Moves running stats by (1 - momentum) of the batch's.
  shifts = []
  for path, bn in nnx.iter_graph(getattr(train, name)):
    if isinstance(bn, nnx.BatchNorm) and path in running:
      old_mean, old_var = running[path]
      momentum = bn.momentum
      batch_mean = (bn.mean[...] - momentum * old_mean) / (1 - momentum)
      shifts.append(jnp.mean(jnp.abs(batch_mean - old_mean) / jnp.sqrt(old_var + bn.epsilon)))
  return float(np.mean([float(s) for s in shifts])) if shifts else float('nan')


def _grad_norms(graphdef, state, batch, cfg) -> dict[str, float]:
  def loss_fn(params, which):
    model = merge_model(graphdef, state, params, copy=True)
    encoded = model.encode(batch['image'], batch['text_ids'], batch['text_mask'])
    logits_r, logits_s = model.decode(encoded, None)
    logits = logits_r if which == 'r' else logits_s
    return losses.dice_ce_from_logits(logits, batch['mask'])

  out = {}
  for d, name in DECODERS.items():
    grads = jax.grad(loss_fn)(state.params, d)
    out[d] = float(optax.global_norm(grads[name]))
  return out


def diagnose(workdir: str, which: str, split: str, batches: int) -> dict:
  exp, state, meta = experiment.from_workdir(workdir, which)
  exp.checkpoints.close()
  config, data = exp.config, exp.data
  cfg = ts.StepConfig.from_config(config)
  model = merge_model(exp.graphdef, state)
  eval_model = nnx.view(model, deterministic=True, use_running_average=True)
  batch_model = nnx.view(merge_model(exp.graphdef, state), deterministic=True,
                         use_running_average=False)
  threshold = config.eval.threshold
  rows = data.rows[split]
  size = config.train.eval_batch_size
  acc = {d: dict(dice_eval=[], dice_batch=[], probs=[], bn_shift=[]) for d in DECODERS}
  truth = []
  for i, batch in enumerate(pipeline.make_eval_batches(data.arrays(), rows, batch_size=size)):
    if i >= batches:
      break
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    valid = np.asarray(batch['valid'], bool)
    truth.append(np.asarray(batch['mask'])[valid])
    for mode, net in (('eval', eval_model), ('batch', batch_model)):
      logits = dict(zip(DECODERS, _forward(net, batch, state, cfg)))
      for d in DECODERS:
        prob = jax.nn.sigmoid(logits[d])
        dice, _ = metrics_lib.dice_iou_per_image(prob, batch['mask'], threshold)
        acc[d][f'dice_{mode}'].extend(np.asarray(dice)[valid].tolist())
        if mode == 'eval':
          acc[d]['probs'].append(np.asarray(prob)[valid].ravel())
    for d, name in DECODERS.items():
      acc[d]['bn_shift'].append(_probe_bn(merge_model(exp.graphdef, state), name, batch,
                                          state, cfg))
  train_batch = next(iter(pipeline.make_eval_batches(
      data.arrays(), data.rows['train_labeled'], batch_size=config.train.batch_size)))
  grads = _grad_norms(exp.graphdef, state, {k: jnp.asarray(v) for k, v in train_batch.items()},
                      cfg)
  fg_true = float(np.mean(np.concatenate([t.ravel() for t in truth]) > 0.5))
  report = dict(workdir=workdir, which=which, split=split, stage=meta.get('stage'),
                epoch=meta.get('epoch'), step=int(jax.device_get(state.step)),
                images=len(acc['r']['dice_eval']), fg_true=fg_true, decoders={})
  for d, name in DECODERS.items():
    probs = np.concatenate(acc[d]['probs'])
    head_bias = float(np.asarray(getattr(model, name).head.out.bias[...]).ravel()[0])
    report['decoders'][d] = dict(
        dice_eval=float(np.mean(acc[d]['dice_eval'])),
        dice_batch=float(np.mean(acc[d]['dice_batch'])),
        fg_pred=float(np.mean(probs > threshold)), p50=float(np.quantile(probs, 0.5)),
        p99=float(np.quantile(probs, 0.99)), max=float(probs.max()), head_bias=head_bias,
        bn_shift=float(np.mean(acc[d]['bn_shift'])), grad_norm=grads[d])
  return report


def format_report(report: dict) -> str:
  keys = ('dice_eval', 'dice_batch', 'fg_pred', 'p50', 'p99', 'max', 'head_bias', 'bn_shift',
          'grad_norm')
  lines = [f'{report["workdir"]} ({report["which"]}: {report["stage"]} epoch '
           f'{report["epoch"]}, step {report["step"]}), {report["images"]} {report["split"]} '
           f'images, true lesion share {report["fg_true"]:.4f}',
           'decoder  ' + '  '.join(f'{k:>10}' for k in keys)]
  for d, row in report['decoders'].items():
    lines.append(f'D_{d:<6} ' + '  '.join(f'{row[k]:>10.4f}' for k in keys))
  return '\n'.join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir')
  parser.add_argument('--which', default='latest')
  parser.add_argument('--split', default='val')
  parser.add_argument('--batches', type=int, default=4)
  args = parser.parse_args(argv)
  report = diagnose(os.path.abspath(args.workdir), args.which, args.split, args.batches)
  print(format_report(report))
  with open(os.path.join(args.workdir, 'decoder_health.json'), 'w') as f:
    json.dump(report, f, indent=2)
  return report


if __name__ == '__main__':
  sys.exit(main() and 0)
