"""MosMedData+ (lung CT COVID-19 lesions) on the dataset's own Train/Val/Test folders.

Data: LViT's release of MosMedData+ (`{Train,Val,Test}_Folder/{img,labelcol}`, masks named
like their images) with LViT's text workbooks as downloaded (`Train_text_MosMedData+ 1.xlsx`,
`Val_text_MosMedData+ 1.xlsx`, `Test_text_MosMedData+.xlsx`) in the dataset folder or the
`*_Folder`s: they are found by their Image/Description columns whatever their names (or name
them: `--config.data.text_csv='/data/MosMedDataPlus/*.xlsx'`). CoT CSVs as the CERS authors
published them (`MosMedData/cot_output_gpt5_mask.csv`, `cot_output_gpt5_no_mask.csv`).

  python run.py --config configs/mosmed.py --workdir runs/mosmed \
    --config.data.root=/data/MosMedDataPlus \
    --config.data.cot_mask_csv=/data/cers_cot/MosMedData/cot_output_gpt5_mask.csv \
    --config.data.cot_no_mask_csv=/data/cers_cot/MosMedData/cot_output_gpt5_no_mask.csv \
    --config.tokenizer.text_dir=/models/cxr-bert --config.model.text.weights=/models/cxr-bert \
    --config.tokenizer.cot_dir=/models/bio-clinicalbert \
    --config.model.cot.weights=/models/bio-clinicalbert \
    --config.model.encoder_weights=/models/convnext_tiny.safetensors

Split: 'official', the dataset's own folders (Train_Folder trains, Val_Folder selects the
checkpoint, Test_Folder is scored), as every published MosMedData+ result uses. The paper's
numbers below came from the authors' random 8:1:1 split of all images (their code), which
puts Test_Folder slices into training: `--config.data.split_protocol=paper` reproduces that
protocol, and `--config.data.split_protocol=grouped` (with data.group_regex) is that split
with every CT volume kept on one side.

Expected (paper, authors' 8:1:1 split, ConvNeXt-T, 25/50/100% labeled): Dice/IoU
74.73/63.39, 78.26/66.87, 79.21/68.53. Runtime: not measured here yet.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.layout = 'lvit'
  config.data.split_protocol = 'official'
  return config
