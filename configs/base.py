"""Every configuration field of cers_jax, each with a one-line comment.

Dataset configs (`qata.py`, `mosmed.py`, `brisc.py`, `synthetic.py`) import this file and
override only what differs. The defaults are the paper's settings (docs/design.md sections 2-9)
with the full-size ConvNeXt-T / BERT-base network.

Override any field on the command line, e.g. `--config.train.batch_size=8`; the config is
locked, so a misspelt field is an error rather than a silently ignored flag.

Each section is followed by the resume class of each of its fields (`_resume`): what a run
that goes on from a checkpoint in its --workdir may change (cers_jax/training/workdir.py):

* fixed: refused whenever it differs from the checkpoint's: it decides the split, the
  cache, the token ids, the parameter shapes or the pool's shape;
* retrieval: how training retrieves and updates the pool: may differ until semi-supervised
  steps (which retrieve) have run into the checkpoint, and wherever nothing trains;
* pool_build: what the pool is built from at the end of warm-up: may differ only where
  training goes on from before the pool's first retrieving step (during warm-up, or right
  after it: the pool is then built again under the new value), never where nothing
  trains (an evaluation would read the checkpoint's pool, not the flag);
* training: the checkpoint's data-iterator positions count batches of it: may differ only
  where nothing trains;
* derived: filled in from other fields (and compared through those); never reported;
* free: may change on any resume; the difference is logged.
"""

import ml_collections

CLASSES = ('fixed', 'retrieval', 'pool_build', 'training', 'derived', 'free')
# {'data.image_size': 'fixed', ...}: every field's resume class, filled by get_config().
RESUME: dict[str, str] = {}


def _resume(section: str, **names: tuple[str, ...]) -> None:
  """Declares the resume class (a keyword of CLASSES) of each named field of `section`."""
  for kind, fields in names.items():
    if kind not in CLASSES:
      raise ValueError(f'Resume class {kind!r}: use one of {CLASSES}.')
    for name in fields:
      field = f'{section}.{name}' if section else name
      if RESUME.setdefault(field, kind) != kind:
        raise ValueError(f'{field} is declared both {RESUME[field]!r} and {kind!r}.')


def resume_class(field: str) -> str:
  """The resume class of a flattened field name ('model.text.dropout' -> 'free').

  A field that base.py does not declare (one a custom config file adds) is 'fixed' under
  model.* and 'free' elsewhere.
  """
  if not RESUME:
    get_config()
  return RESUME.get(field, 'fixed' if field.startswith('model.') else 'free')


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # One seed for parameters, dropout, augmentation and the split.
  config.method = 'cers'  # Training method (cers_jax/core/method.py), or 'pkg.module:ATTR'.
  _resume('', fixed=('seed', 'method'))

  # --- data -------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.layout = 'cers'  # On-disk layout: 'cers' (flat) | 'lvit' | 'brisc' (Kaggle) | 'nifti'.
  data.root = ''  # Dataset folder; required for real data.
  data.text_csv = ''  # Report-text CSV/xlsx: comma-separated paths or globs; '' = layout default.
  data.require_text = False  # True: any image without report text is an error (all: always).
  data.require_cot = False  # True: an image without the CoT its split queries with is an error.
  data.cot_mask_csv = ''  # CoTs written with the mask shown (labeled images): image,cot.
  data.cot_no_mask_csv = ''  # CoTs written without the mask (all other images): image,cot.
  data.cache_dir = ''  # Decoded uint8 cache and split manifest; '' = <workdir>/data.
  data.image_size = 224  # Square side images and masks are resized to.
  data.split_protocol = 'paper'  # 'paper' (8:1:1 random) | 'official' | 'grouped'.
  data.split_ratios = (0.8, 0.1, 0.1)  # train/val/test fractions for the 'paper' protocol.
  data.val_fraction = 0.1  # Share of the official train set carved off as val ('official').
  data.labeled_fraction = 0.25  # Fraction of the train split that keeps its masks.
  data.labeled_count = 0  # > 0: this many labeled train images instead of labeled_fraction.
  data.split_file = ''  # Published split (folder of lists, CSV or JSON) instead of a drawn one.
  data.group_regex = ''  # 'grouped' protocol: regex whose first group names the case.
  data.nifti = nifti = ml_collections.ConfigDict()  # Layout 'nifti' (README "Datasets").
  nifti.axis = -1  # Voxel axis volumes are sliced along into 2-D samples (-1: the last).
  nifti.window = ()  # CT window (center, width) in the volume's units, e.g. (40, 400); () = below.
  nifti.percentiles = (0.5, 99.5)  # Without a window: per-volume black and white percentiles.
  nifti.empty_margin = -1  # >= 0: drop slices farther than this many slices from any lesion.
  data.zoom_prob = 0.1  # Probability of the random zoom augmentation on train images.
  data.zoom_range = (0.95, 1.2)  # Random zoom factor range (authors' augmentation).
  data.max_text_len = 64  # Report-text tokens (padded/truncated).
  data.max_cot_len = 256  # CoT tokens (padded/truncated), as in the authors' code.
  data.num_workers = 0  # grain worker processes; 0 = in the main process.
  data.prefetch = 2  # Batches prepared ahead of the device.
  _resume('data',
          fixed=('layout', 'root', 'text_csv', 'cot_mask_csv', 'cot_no_mask_csv', 'cache_dir',
                 'image_size', 'split_protocol', 'split_ratios', 'val_fraction',
                 'labeled_fraction', 'labeled_count', 'split_file', 'group_regex',
                 'max_text_len', 'max_cot_len',
                 # prepare decodes the cache anew when these differ (decoding.json), and axis
                 # and empty_margin decide which slices are samples at all.
                 'nifti.axis', 'nifti.window', 'nifti.percentiles', 'nifti.empty_margin'),
          training=('num_workers',),  # The iterator positions count per-worker batches.
          free=('require_text', 'require_cot', 'zoom_prob', 'zoom_range', 'prefetch'))

  # --- synthetic dataset (configs/synthetic.py) -------------------------------------
  config.synthetic = syn = ml_collections.ConfigDict()
  syn.num_images = 0  # > 0: generate a synthetic dataset into data.root before prepare.
  syn.image_size = 64  # Side of the generated images.
  _resume('synthetic', fixed=('num_images', 'image_size'))

  # --- tokenizers -------------------------------------------------------------------
  config.tokenizer = tok = ml_collections.ConfigDict()
  tok.text_dir = ''  # HF tokenizer directory for the report-text BERT; '' = train one.
  tok.cot_dir = ''  # HF tokenizer directory for the CoT BERT; '' = train one.
  tok.vocab_size = 2000  # WordPiece vocabulary size when training a tokenizer.
  _resume('tokenizer', fixed=('text_dir', 'cot_dir', 'vocab_size'))

  # --- model ------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.encoder_depths = (3, 3, 9, 3)  # ConvNeXt blocks per stage (ConvNeXt-T).
  model.encoder_dims = (96, 192, 384, 768)  # ConvNeXt channels per stage.
  model.drop_path_rate = 0.1  # Stochastic depth, rising linearly over the blocks.
  model.layer_scale_init = 1e-6  # ConvNeXt layer-scale initial value.
  model.encoder_weights = ''  # Pretrained ConvNeXt (torchvision/timm/HF file or dir).

  model.text = ml_collections.ConfigDict()  # Report-text BERT (CXR-BERT in the paper).
  model.text.vocab_size = 30522  # Overwritten by the tokenizer's size when one is trained.
  model.text.hidden_size = 768  # H: token feature width.
  model.text.num_layers = 12  # Transformer layers.
  model.text.num_heads = 12  # Attention heads.
  model.text.intermediate_size = 3072  # Feed-forward width.
  model.text.max_position = 512  # Position embeddings.
  model.text.type_vocab_size = 2  # Token-type embeddings.
  model.text.dropout = 0.1  # Hidden and attention dropout (training only).
  model.text.weights = ''  # Pretrained BERT (HF directory / safetensors / .bin).
  model.text.trainable = True  # Authors' default: the report-text BERT is fine-tuned.

  model.cot = ml_collections.ConfigDict()  # CoT BERT (Bio_ClinicalBERT in the paper).
  model.cot.vocab_size = 30522  # Overwritten by the tokenizer's size when one is trained.
  model.cot.hidden_size = 768  # H_cot.
  model.cot.num_layers = 12  # Transformer layers.
  model.cot.num_heads = 12  # Attention heads.
  model.cot.intermediate_size = 3072  # Feed-forward width.
  model.cot.max_position = 512  # Position embeddings.
  model.cot.type_vocab_size = 2  # Token-type embeddings.
  model.cot.dropout = 0.1  # Dropout (unused while frozen).
  model.cot.weights = ''  # Pretrained BERT for CoTs.
  model.cot.trainable = False  # Frozen: CoT features are computed once (True is refused).
  model.cot.pooling = 'cls'  # CoT feature: 'cls' token (authors) | 'mean' of real tokens.

  model.attn_dim = 256  # Text cross-attention width.
  model.attn_heads = 8  # Heads in text and retrieval cross-attention.
  model.fusion_dropout = 0.1  # Attention dropout in retrieval cross-attention.
  model.decoder_dims = (384, 192, 96, 48)  # Decoder block outputs, deepest first.
  model.coord_reduction = 16  # MCAM coordinate gate: mip = max(8, C / reduction).
  model.decoder = 'mcam'  # D_r (Table 3): 'mcam' (authors') | 'unet' | 'swin_unet'.
  model.mcam = ml_collections.ConfigDict()  # D_r's parts (paper Table 3's MCAM ablation).
  model.mcam.coord_attention = True  # False: no coordinate gate, conv1x1 fusion (PlainFusion).
  model.mcam.multi_scale = True  # False: the 7x7 / 5x5 depthwise convolutions become 1x1.
  model.embed_dim = 512  # Image/CoT alignment embedding width.
  model.logit_scale_init = 2.6592600  # log(1 / 0.07), CLIP's initial temperature.
  model.compute_dtype = 'float32'  # 'bfloat16' = mixed precision (params stay float32).
  model.scan_blocks = False  # ConvNeXt stages, BERT layers as lax.scan (benchmarks/README).
  model.depthwise = 'conv'  # Depthwise convs: 'conv' (XLA) | 'shift' (faster on CPUs, slower compile).
  model.checkpoint = ''  # The authors' whole CERS state dict (.pth/.bin/.safetensors).
  _resume('model',
          # These only initialise (the checkpoint's parameters replace them), regularise
          # training or choose the arithmetic.
          free=('encoder_weights', 'text.weights', 'cot.weights', 'checkpoint',
                'layer_scale_init', 'logit_scale_init', 'compute_dtype', 'depthwise',
                'drop_path_rate',
                'text.dropout', 'cot.dropout', 'fusion_dropout'),
          derived=('text.vocab_size', 'cot.vocab_size'),  # From the tokenizers (tokenizer.*).
          fixed=('encoder_depths', 'encoder_dims', 'attn_dim', 'attn_heads', 'decoder_dims',
                 'coord_reduction', 'decoder', 'mcam.coord_attention', 'mcam.multi_scale',
                 'embed_dim', 'scan_blocks',
                 *(f'{bert}.{name}' for bert in ('text', 'cot')
                   for name in ('hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
                                'max_position', 'type_vocab_size', 'trainable')),
                 'cot.pooling'))

  # --- knowledge pool and retrieval -------------------------------------------------
  config.pool = pool = ml_collections.ConfigDict()
  pool.mode = 'image+cot'  # 'none' | 'image' | 'cot' | 'text' | 'image+text' | 'image+cot'.
  pool.k_coarse = 50  # K: candidates kept by image similarity.
  pool.k = 5  # k: reference cases fused into the retrieval-aware decoder.
  pool.exclude_self = True  # A labeled image may not retrieve its own pool row.
  pool.momentum = 0.99  # Eq. 5 EMA momentum m.
  pool.update_rule = 'ema'  # 'ema' (in-step, Eq. 5) | 'epoch_refresh' (authors' code).
  pool.shard_rows = False  # Shard pool rows over the data mesh axis (multi-device).
  pool.cot_space = 'projection'  # CoT/text compared as: 'projection' (CLIP, authors) | 'features'.
  pool.centre_cot = False  # CoT/text cosines around the pool's mean row (False: authors').
  pool.cot_source = 'mask'  # Pool rows' CoT: 'mask' (authors': written seeing it) | 'no_mask'.
  _resume('pool',
          retrieval=('mode', 'k_coarse', 'k', 'exclude_self', 'momentum', 'update_rule',
                     'centre_cot'),
          fixed=('cot_space',),  # The pool's rows are of this space.
          pool_build=('cot_source',),  # Its CoT rows; a fork of a warm-up rebuilds them.
          free=('shard_rows',))

  # --- training ---------------------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 16  # B: labeled batch (and unlabeled batch) size per step.
  train.warmup_epochs = 20  # Supervised warm-up epochs on labeled data only.
  train.epochs = 200  # Semi-supervised epochs (the ramp-up horizon too).
  train.optimizer = 'sgd'  # 'sgd' (authors': momentum, coupled decay) | 'adamw'.
  train.learning_rate = 0.01  # Peak learning rate (cosine schedule).
  train.momentum = 0.9  # SGD momentum.
  train.weight_decay = 1e-4  # SGD: L2 added to the gradient, as torch; AdamW: decoupled.
  train.clip_weight = 0.5  # Weight of the image-CoT CLIP loss in warm-up.
  train.consistency = 0.003  # Peak consistency weight lambda.
  train.consistency_rampup = 200  # Epochs of the ramp-up, read only when the share below is 0.
  train.consistency_rampup_share = 1.0  # Ramp spans this share of the semi steps (authors': 1).
  # Each 'auto' below is the method's own default, from its public code (core/optim.py RECIPES).
  train.lr_schedule = 'auto'  # 'single_cosine' | 'semi_cosine' (CERS authors') | 'constant'.
  train.semi_optimizer = 'auto'  # At the semi stage: 'fresh' optimizer state | 'continue'.
  train.semi_init = 'auto'  # Semi starts from the warm-up's 'best' (validated) | 'last' weights.
  train.select_from = 'auto'  # Best checkpoint from the 'semi' (last stage's) epochs | 'any'.
  train.sharpen_temperature = 0.1  # sharpen(p) = p^(1/T) / (p^(1/T) + (1-p)^(1/T)).
  train.patience = 50  # Early stopping: epochs without a better val Dice.
  train.validate_warmup = False  # Also score val after warm-up epochs (best, early stop).
  train.log_every = 10  # Steps between progress-bar metric refreshes.
  train.eval_batch_size = 16  # Batch size for validation, test and prediction.
  train.steps_per_epoch = 0  # 0 = one pass over the unlabeled (or labeled) train set.
  train.stop_after_epochs = 0  # Stop this invocation after N epochs (0 = never); resume later.
  _resume('train', training=('batch_size',),  # The iterator positions count these batches.
          fixed=('optimizer',),  # The optimizer state's structure.
          free=('warmup_epochs', 'epochs', 'learning_rate', 'momentum', 'weight_decay',
                'clip_weight', 'consistency', 'consistency_rampup', 'sharpen_temperature',
                # Read by the steps and the schedule, as learning_rate; the stage-boundary
                # ones (semi_optimizer, semi_init, select_from) act once, when warm-up ends.
                'consistency_rampup_share', 'lr_schedule', 'semi_optimizer', 'semi_init',
                'select_from',
                'patience', 'validate_warmup', 'log_every', 'eval_batch_size',
                'steps_per_epoch',
                'stop_after_epochs'))

  # --- baselines of Table 1 (docs/design.md section 16), read when `method` names them ---
  # Their own authors' settings; optimizer, schedule, batch and budget are train.*'s.
  config.mean_teacher = mt = ml_collections.ConfigDict()  # SSL4MIS train_mean_teacher_2D.py
  mt.ema_decay = 0.99  # Teacher EMA decay alpha (--ema_decay).
  mt.consistency = 0.1  # Peak weight of the student-teacher MSE (--consistency).
  mt.rampup = 1.0  # Share of the semi stage the sigmoid ramp-up spans (theirs: all).
  mt.noise_std = 0.1  # Teacher input noise: clamp(N(0, std^2), -clip, clip).
  mt.noise_clip = 0.2  # Bound of that noise.
  _resume('mean_teacher', free=('ema_decay', 'consistency', 'rampup', 'noise_std',
                                'noise_clip'))

  config.bcp = bcp = ml_collections.ConfigDict()  # DeepMed-Lab-ECNU/BCP ACDC_BCP_train.py
  bcp.u_weight = 0.5  # Weight of the pseudo-labelled region in mix_loss (--u_weight).
  bcp.ema_decay = 0.99  # Teacher EMA decay, fixed (update_model_ema).
  bcp.patch_ratio = 2 / 3  # Side of the copy-paste box over the image side (generate_mask).
  _resume('bcp', free=('u_weight', 'ema_decay', 'patch_ratio'))

  config.ucmt = ucmt = ml_collections.ConfigDict()  # Senyh/UCMT train.py (2-D, ISIC)
  ucmt.alpha = 0.1  # Weight of the unsupervised terms (cps + cmt) at full ramp.
  ucmt.rampup = 0.2  # Share of the semi stage the sigmoid ramp spans (theirs: 5 of 25 epochs).
  ucmt.ema_decay = 0.99  # Teacher EMA decay (d = min(1 - 1/(t + 1), this)).
  ucmt.coefficient = 0.99  # Student 1's share of the teacher's update (student 2: the rest).
  ucmt.grid = 16  # UMIX: the image is cut into grid x grid patches.
  ucmt.topk = 2  # UMIX: patches swapped per image and direction.
  _resume('ucmt', free=('alpha', 'rampup', 'ema_decay', 'coefficient', 'grid', 'topk'))

  # --- checkpoints ------------------------------------------------------------------
  config.checkpoint = ckpt = ml_collections.ConfigDict()
  ckpt.keep = 2  # Latest checkpoints kept (the best by val Dice is kept besides).
  _resume('checkpoint', free=('keep',))

  # --- evaluation and prediction ----------------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  ev.which = 'best'  # Checkpoint to evaluate: 'best' | 'latest'.
  ev.threshold = 0.5  # Probability threshold for masks.
  ev.surface = True  # HD95, ASSD and NSD per image in eval/<split>_* (False: Dice/IoU only).
  ev.pixel_spacing_mm = 0.0  # Pixel size (mm) of samples without their own; 0 = unknown: px.
  ev.surface_tolerance = 2.0  # NSD tolerance, in the surface unit (mm, or px when unknown).
  ev.surface_both_empty = 'zero'  # Both empty: 'zero' (HD95=ASSD=0, NSD=1) | 'nan' (left out).
  ev.surface_one_empty = 'worst'  # One empty: 'worst' (diagonal, NSD=0) | 'nan' (left out).
  ev.bootstrap_resamples = 2000  # Image resamples for the 95% CIs of eval and compare; 0 = none.
  ev.bootstrap_seed = 0  # Seed of those resamples: the same scores give the same CIs.
  ev.predict_dir = ''  # Folder of images (+ text/CoT CSVs) for --mode=predict.
  ev.split = ''  # Split scored by --mode eval ('' = test) and --mode retrieval ('' = val).
  ev.retrieval_report = True  # Write the retrieval report right after the pool is built.
  ev.report_mask_size = 64  # Masks are compared at this side in the retrieval report.
  ev.label_regex = ''  # Group label of an image: this regex's groups on its id (report).
  ev.label_csv = ''  # ... or a CSV with columns image,<label_column> (report).
  ev.label_column = 'label'  # Label column of eval.label_csv.
  _resume('eval',  # What is scored and written from a checkpoint: nothing trained depends on it.
          free=('which', 'threshold', 'surface', 'pixel_spacing_mm', 'surface_tolerance',
                'surface_both_empty', 'surface_one_empty', 'bootstrap_resamples',
                'bootstrap_seed', 'predict_dir', 'split', 'retrieval_report',
                'report_mask_size', 'label_regex', 'label_csv', 'label_column'))

  # --- devices ----------------------------------------------------------------------
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data_parallel = -1  # Devices on the 'data' axis; -1 = all local devices.
  _resume('mesh', free=('data_parallel',))

  return config
