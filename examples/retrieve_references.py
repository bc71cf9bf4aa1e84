"""Retrieve the reference cases a trained CERS fuses for a new image, as the model does.

  python examples/retrieve_references.py runs/synthetic IMAGE.png "report text" "CoT text"

The query is the image's f4 map (encoder + report text) and the CoT's retrieval embedding;
the pool, the mode and K/k are the run's own (config pool.*).
"""

import sys

import numpy as np

from cers_jax import sharding
from cers_jax.core import embed
from cers_jax.core import method
from cers_jax.data import augment
from cers_jax.data import images
from cers_jax.data import tokenize
from cers_jax.retrieval import search
from cers_jax.training import experiment


def main(workdir: str, image_path: str, report: str, cot: str) -> list[tuple[str, float]]:
  exp, state, meta = experiment.from_workdir(workdir, 'best')
  if meta.get('stage') in method.stages_before_retrieval(exp.method):
    exp.checkpoints.close()
    raise SystemExit(f'{workdir}: its best checkpoint is from {meta["stage"]} epoch '
                     f'{meta.get("epoch")}, before the knowledge pool was built, so there is '
                     'nothing to retrieve from; use a run whose best checkpoint is later, or '
                     'from_workdir(workdir, "latest") once training is done.')
  config, data, steps = exp.config, exp.data, exp.steps
  exp.checkpoints.close()
  size, batch_size = config.data.image_size, config.train.eval_batch_size
  pixels = images.resize_image(images.read_image(image_path), size)  # (S, S, 3) uint8
  text_ids, text_mask = tokenize.encode_texts(data.text_tokenizer, [report],
                                              config.data.max_text_len)
  # Steps take fixed batch shapes: pad the one image to a batch.
  batch = dict(image=augment.zscore(pixels[None]), text_ids=text_ids, text_mask=text_mask)
  batch = {k: sharding.pad_rows(np.asarray(v), batch_size) for k, v in batch.items()}
  f4 = steps.features(state, sharding.global_batch(batch, steps.mesh))[:1]  # (1, h, w, C)
  query_cot = embed.embed_texts(state, steps, data.cot_tokenizer, [cot], config)
  query_text = embed.embed_texts(state, steps, data.cot_tokenizer, [report], config)
  retrieved = search.retrieve(state.pool, f4, query_cot, query_text, mode=config.pool.mode,
                              k_coarse=config.pool.k_coarse, k=config.pool.k,
                              centre=config.pool.centre_cot)
  ids, scores = sharding.to_host((retrieved.ids[0], retrieved.scores[0]))
  references = [(data.cache.samples[i].id, float(s)) for i, s in zip(ids, scores)]
  for rank, (ref_id, score) in enumerate(references, 1):
    print(f'{rank}. {ref_id}  score {score:.4f}')
  return references


if __name__ == '__main__':
  main(*sys.argv[1:])
