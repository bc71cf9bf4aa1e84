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
  model = config.model
  model.encoder_depths = (1, 1, 1, 1)
  model.encoder_dims = (8, 16, 24, 32)
  for bert in (model.text, model.cot):
    bert.hidden_size = 16
    bert.num_layers = 1
    bert.num_heads = 2
    bert.intermediate_size = 32
    bert.max_position = 32
  model.attn_dim = 16
  model.attn_heads = 2
  model.decoder_dims = (16, 8, 8, 4)
  model.embed_dim = 8
  config.pool.k_coarse = 6
  config.pool.k = 3
  config.train.batch_size = 4
  config.train.eval_batch_size = 4
  config.train.warmup_epochs = 2
  config.train.epochs = 2
  config.train.consistency_rampup = 2
  config.train.log_every = 2
  return config
