"""The synthetic default shrunk for the end-to-end CLI tests: 64 images of 32x32, a CERS
with one block per stage and one-layer BERTs, 2 warm-up + 2 semi-supervised epochs."""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.synthetic.num_images = 64
  config.synthetic.image_size = 32
  config.data.image_size = 32
  config.data.max_text_len = 16
  config.data.max_cot_len = 32
  config.tokenizer.vocab_size = 200
  synthetic.tiny_cers(config)
  for bert in (config.model.text, config.model.cot):
    bert.max_position = 32
  config.pool.k_coarse = 6
  config.pool.k = 3
  config.train.batch_size = 4
  config.train.eval_batch_size = 4
  config.train.warmup_epochs = 2
  config.train.epochs = 2
  config.train.consistency_rampup = 2
  config.train.log_every = 2
  return config
