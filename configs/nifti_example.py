"""A CT dataset of NIfTI volumes, sliced into 2-D samples (README "Datasets", NIfTI volumes).

  python run.py --config configs/nifti_example.py --workdir runs/ct \
      --config.data.root=/data/ct

expects `/data/ct/images/<case>.nii.gz`, `/data/ct/labels/<case>.nii.gz` and `text.csv`
(plus CoT CSVs) keyed by case (`<case>` or `<case>.nii.gz`: one text for all its slices) or
by slice (`<case>_s012`). Axial slices (the last voxel axis) in a soft-tissue CT window,
only those within two slices of a lesion, split by volume. Not yet run on real data: no
expected result is recorded.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.layout = 'nifti'
  config.data.split_protocol = 'grouped'  # What 'paper' means for slices; explicit here.
  config.data.nifti.window = (40.0, 400.0)  # Soft tissue: -160 HU black, 240 HU white.
  config.data.nifti.empty_margin = 2
  return config
