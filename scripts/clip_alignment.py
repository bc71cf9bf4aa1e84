"""Does the warm-up's CLIP alignment align? Image -> CoT retrieval on held-out pairs.

  python scripts/clip_alignment.py WORKDIR [--which latest] [--split val] [--batch 16]

For every image of `split` (never trained on), its image embedding (the alignment
projection of its mean f4, as the CLIP loss sees it) ranks the CoT embeddings (the
projection of the frozen CoT BERT's feature of the CoT written with the mask, the one warm-up
aligns with) of all images of the split; top-1 and top-5 accuracy say how often its own CoT
comes first / among the first five, beside chance (1/N, 5/N). The same within random
batches of `--batch` pairs (the CLIP loss's setting; chance 1/B, 5/B). Also prints the
warm-up's last CLIP loss from metrics.jsonl beside ln B. Writes `<workdir>/clip_alignment.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cers_jax import sharding
from cers_jax.core.state import merge_model
from cers_jax.data import pipeline
from cers_jax.training import curves
from cers_jax.training import experiment


def _accuracy(similarity: np.ndarray, k: int) -> float:
  """Share of rows whose own column (the diagonal) is among their k largest."""
  own = np.diag(similarity)[:, None]
  rank = np.sum(similarity > own, axis=1)  # Strictly better columns.
  return float(np.mean(rank < k))


def _batched_accuracy(similarity: np.ndarray, batch: int, k: int, seed: int = 0) -> float:
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(similarity))
  scores = [_accuracy(similarity[np.ix_(b, b)], k)
            for b in np.array_split(order, max(len(order) // batch, 1))]
  return float(np.mean(scores))


def embeddings(exp, state, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(image embeddings, CoT embeddings) of cache rows, each (n, E) unit-norm."""
  model = nnx.view(merge_model(exp.graphdef, state), deterministic=True,
                   use_running_average=True)

  def image_step(state, batch):
    del state
    encoded = model.encode(batch['image'], batch['text_ids'], batch['text_mask'])
    return model.image_embedding(encoded.features[-1])

  batches = pipeline.make_eval_batches(exp.data.arrays(), rows,
                                       batch_size=exp.config.train.eval_batch_size)
  image = np.concatenate([out for _, out in sharding.host_outputs(
      image_step, state, batches, exp.steps.mesh)])
  cot = np.asarray(model.cot_embedding(jnp.asarray(state.tables.cot_cls)[rows]))
  return image, cot


def measure(workdir: str, which: str, split: str, batch: int) -> dict:
  exp, state, meta = experiment.from_workdir(workdir, which)
  exp.checkpoints.close()
  rows = exp.data.rows[split]
  image, cot = embeddings(exp, state, rows)
  similarity = image @ cot.T
  n = len(rows)
  warmup = [r for r in curves.read_records(workdir) if r.get('stage') == 'warmup']
  return dict(
      workdir=workdir, which=which, stage=meta.get('stage'), epoch=meta.get('epoch'),
      split=split, pairs=n, top1=_accuracy(similarity, 1), top5=_accuracy(similarity, 5),
      chance_top1=1 / n, chance_top5=min(5 / n, 1.0), batch=batch,
      batch_top1=_batched_accuracy(similarity, batch, 1),
      batch_top5=_batched_accuracy(similarity, batch, 5),
      batch_chance_top1=1 / batch, batch_chance_top5=min(5 / batch, 1.0),
      last_warmup_clip=warmup[-1]['clip'] if warmup else None,
      ln_train_batch=math.log(exp.config.train.batch_size),
      logit_scale=float(np.exp(np.asarray(
          merge_model(exp.graphdef, state).alignment.logit_scale[...]))))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir')
  parser.add_argument('--which', default='latest')
  parser.add_argument('--split', default='val')
  parser.add_argument('--batch', type=int, default=16)
  args = parser.parse_args(argv)
  report = measure(os.path.abspath(args.workdir), args.which, args.split, args.batch)
  print(f'{report["workdir"]} ({report["which"]}: {report["stage"]} epoch {report["epoch"]})'
        f': last warm-up CLIP loss {report["last_warmup_clip"]:.4f} (ln B = '
        f'{report["ln_train_batch"]:.4f}), logit scale {report["logit_scale"]:.2f}')
  print(f'  image -> CoT over all {report["pairs"]} {args.split} pairs: top-1 '
        f'{report["top1"]:.4f} (chance {report["chance_top1"]:.4f}), top-5 '
        f'{report["top5"]:.4f} (chance {report["chance_top5"]:.4f})')
  print(f'  within batches of {args.batch}: top-1 {report["batch_top1"]:.4f} (chance '
        f'{report["batch_chance_top1"]:.4f}), top-5 {report["batch_top5"]:.4f} (chance '
        f'{report["batch_chance_top5"]:.4f})')
  with open(os.path.join(args.workdir, 'clip_alignment.json'), 'w') as f:
    json.dump(report, f, indent=2)
  return report


if __name__ == '__main__':
  main()
