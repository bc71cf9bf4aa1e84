"""QaTa-COV19 (chest X-ray COVID-19 infection) on the dataset's own Train/Val/Test folders.

Data: LViT's release of QaTa-COV19 (`{Train,Val,Test}_Folder/{img,labelcol}`, masks named
`mask_<image>`) with LViT's text workbooks as downloaded, `Train_text_for_Covid19.xlsx`
(train and val rows) and `Test_text_for_Covid19.xlsx`, in the dataset folder or the
`*_Folder`s: they are found by their Image/Description columns whatever their names (or
name them: `--config.data.text_csv='/data/QaTa-COV19/*.xlsx'`). The CERS authors published
only report texts for QaTa (no CoT CSVs): generate CoTs first with
`python -m cers_jax.cot.generate` (README, "CoT generation") and pass them as
data.cot_mask_csv / data.cot_no_mask_csv.

  python run.py --config configs/qata.py --workdir runs/qata \
    --config.data.root=/data/QaTa-COV19 \
    --config.data.cot_mask_csv=/data/qata_cot_mask.csv \
    --config.data.cot_no_mask_csv=/data/qata_cot_no_mask.csv \
    --config.tokenizer.text_dir=/models/cxr-bert --config.model.text.weights=/models/cxr-bert \
    --config.tokenizer.cot_dir=/models/bio-clinicalbert \
    --config.model.cot.weights=/models/bio-clinicalbert \
    --config.model.encoder_weights=/models/convnext_tiny.safetensors

Split: 'official', the dataset's own folders (Train_Folder trains, Val_Folder selects the
checkpoint, Test_Folder is scored), as every published QaTa result uses; without a
Val_Folder, val is carved from Train_Folder by data.val_fraction. The paper's numbers below
came from the authors' random 8:1:1 split of all images (their code), which puts Test_Folder
images into training: `--config.data.split_protocol=paper` reproduces that protocol.

Expected (paper, authors' 8:1:1 split, ConvNeXt-T, 25/50/100% labeled): Dice/IoU
80.52/70.52, 81.23/71.42, 81.40/71.60. Runtime: not measured here yet.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.layout = 'lvit'
  config.data.split_protocol = 'official'
  return config
