"""Restore a trained run's best checkpoint and score a split with both decoders.

  python examples/evaluate_checkpoint.py runs/synthetic          # the val split
  python examples/evaluate_checkpoint.py runs/synthetic test
"""

import sys

from cers_jax.inference import evaluate
from cers_jax.training import experiment
from cers_jax.training import loop


def main(workdir: str, split: str = 'val') -> dict:
  exp, state, meta = experiment.from_workdir(workdir, 'best')  # config.json + checkpoint
  # The steps the checkpoint is scored with: the method's, or, for a checkpoint from before
  # the pool exists (a best one from warm-up), those its stage validated with.
  steps = loop.scoring_context(exp, meta).steps
  try:
    summary = evaluate.evaluate_rows(state, steps, exp.data, exp.data.rows[split],
                                     exp.config.train.eval_batch_size)
  finally:
    exp.checkpoints.close()
  print(f'{split}: {summary["count"]} images, checkpoint of {meta["stage"]} epoch '
        f'{meta["epoch"]}: Dice D_r {summary["dice_r_mean"]:.4f} '
        f'(D_s {summary["dice_s_mean"]:.4f})')
  return summary


if __name__ == '__main__':
  main(*sys.argv[1:])
