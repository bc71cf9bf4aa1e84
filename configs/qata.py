"""QaTa-COV19 (chest X-ray COVID-19 infection), the paper's protocol.

Data: LViT's release of QaTa-COV19 (`{Train,Val,Test}_Folder/{img,labelcol}` with
`*_text.xlsx`, masks named `mask_<image>`). The CERS authors published only report texts for
QaTa (no CoT CSVs): generate CoTs first with `python -m cers_jax.cot.generate` (README,
"CoT generation") and pass them as data.cot_mask_csv / data.cot_no_mask_csv.

  python run.py --config configs/qata.py --workdir runs/qata \
    --config.data.root=/data/QaTa-COV19 \
    --config.data.cot_mask_csv=/data/qata_cot_mask.csv \
    --config.data.cot_no_mask_csv=/data/qata_cot_no_mask.csv \
    --config.tokenizer.text_dir=/models/cxr-bert --config.model.text.weights=/models/cxr-bert \
    --config.tokenizer.cot_dir=/models/bio-clinicalbert \
    --config.model.cot.weights=/models/bio-clinicalbert \
    --config.model.encoder_weights=/models/convnext_tiny.safetensors

Expected (paper, ConvNeXt-T, 25/50/100% labeled): Dice/IoU 80.52/70.52, 81.23/71.42,
81.40/71.60. Runtime: not measured here yet.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.layout = 'lvit'
  return config
