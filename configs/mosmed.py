"""MosMedData+ (lung CT COVID-19 lesions), the paper's protocol.

Data: LViT's release of MosMedData+ (`{Train,Val,Test}_Folder/{img,labelcol}` with
`*_text.xlsx`); CoT CSVs as the CERS authors published them
(`MosMedData/cot_output_gpt5_mask.csv`, `cot_output_gpt5_no_mask.csv`).

  python run.py --config configs/mosmed.py --workdir runs/mosmed \
    --config.data.root=/data/MosMedDataPlus \
    --config.data.cot_mask_csv=/data/cers_cot/MosMedData/cot_output_gpt5_mask.csv \
    --config.data.cot_no_mask_csv=/data/cers_cot/MosMedData/cot_output_gpt5_no_mask.csv \
    --config.tokenizer.text_dir=/models/cxr-bert --config.model.text.weights=/models/cxr-bert \
    --config.tokenizer.cot_dir=/models/bio-clinicalbert \
    --config.model.cot.weights=/models/bio-clinicalbert \
    --config.model.encoder_weights=/models/convnext_tiny.safetensors

Expected (paper, ConvNeXt-T, 25/50/100% labeled): Dice/IoU 74.73/63.39, 78.26/66.87,
79.21/68.53. Runtime: not measured here yet. `--config.data.split_protocol=grouped` keeps
every CT volume on one side of the split.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.layout = 'lvit'
  return config
