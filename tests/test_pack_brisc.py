"""scripts/pack_brisc.py: a compact BRISC copy that `prepare` reads as it reads the source."""

import importlib.util
import json
import os

import numpy as np
from PIL import Image
import pytest

from cers_jax.data import images as image_lib
from cers_jax.data import layouts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'scripts',
                                                                   f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


pack_brisc = _script('pack_brisc')


def _kaggle(root, n=4, side=40):
  """A tiny BRISC-like dataset: grey PNG, grey-as-RGB JPEG and colour images; noisy masks."""
  rng = np.random.default_rng(0)
  task = root / 'segmentation_task' / 'train'
  (task / 'images').mkdir(parents=True)
  (task / 'masks').mkdir()
  ids = []
  for i in range(n):
    stem = f'brisc2025_train_{i:05d}_gl_ax_t1'
    grey = rng.integers(0, 256, (side, side), dtype=np.uint8)
    if i % 3 == 0:
      Image.fromarray(grey).save(task / 'images' / f'{stem}.png')
    elif i % 3 == 1:
      Image.fromarray(np.stack([grey] * 3, -1)).save(task / 'images' / f'{stem}.jpg',
                                                     quality=95)
    else:
      colour = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
      Image.fromarray(colour).save(task / 'images' / f'{stem}.jpg', quality=95)
    mask = np.zeros((side, side), np.uint8) + rng.integers(0, 6, (side, side), dtype=np.uint8)
    mask[5:20, 8:30] = 250  # BRISC's masks: noise near 0 and near 255.
    Image.fromarray(mask).save(task / 'masks' / f'{stem}.png')
    ids.append(stem)
  for name in pack_brisc.CSV_FILES:
    column = 'text' if name == 'text.csv' else 'cot'
    (root / name).write_text(f'image,{column}\n' + ''.join(
        f'{stem}.jpg,a scan {j}\n' for j, stem in enumerate(ids)))
  return ids


def test_pack_layout_sizes_masks_and_csvs(tmp_path):
  ids = _kaggle(tmp_path / 'src')
  out = tmp_path / 'pack'
  manifest = pack_brisc.pack(str(tmp_path / 'src'), str(out), size=32, progress=False)
  assert manifest['images'] == {'train': 4}
  task = out / 'segmentation_task' / 'train'
  assert sorted(os.listdir(task / 'images')) == sorted(f'{i}.jpg' for i in ids)
  assert sorted(os.listdir(task / 'masks')) == sorted(f'{i}.png' for i in ids)
  modes = {}
  for stem in ids:
    with Image.open(task / 'images' / f'{stem}.jpg') as im:
      assert im.size == (32, 32) and im.format == 'JPEG'
      modes[stem] = im.mode
    with Image.open(task / 'masks' / f'{stem}.png') as im:
      assert im.size == (32, 32) and im.mode == '1'
    source = image_lib.read_mask(str(tmp_path / 'src' / 'segmentation_task' / 'train' /
                                     'masks' / f'{stem}.png'))
    np.testing.assert_array_equal(image_lib.read_mask(str(task / 'masks' / f'{stem}.png')),
                                  image_lib.resize_mask(source, 32))
  # Grey stays grey (PNG grey and grey saved as RGB); colour stays colour.
  assert [modes[i] for i in ids] == ['L', 'L', 'RGB', 'L']
  assert manifest['stored_grey'] == 3
  for name in pack_brisc.CSV_FILES:
    assert (out / name).read_bytes() == (tmp_path / 'src' / name).read_bytes()
  assert json.loads((out / 'pack.json').read_text())['quality'] == 75
  # The 'brisc' layout reads the pack with its default CSV names: texts and CoTs all found.
  scan = layouts.read_brisc(str(out))
  assert [s.id for s in scan.samples] == ids
  assert all(s.mask_path and s.text and s.cot_mask and s.cot_no_mask for s in scan.samples)


def test_an_earlier_pack_is_replaced_but_no_other_folder(tmp_path):
  _kaggle(tmp_path / 'src', n=2)
  out = tmp_path / 'pack'
  pack_brisc.pack(str(tmp_path / 'src'), str(out), size=16, progress=False)
  (out / 'stale.txt').write_text('x')
  pack_brisc.pack(str(tmp_path / 'src'), str(out), size=16, progress=False)
  assert not (out / 'stale.txt').exists()
  other = tmp_path / 'mine'
  other.mkdir()
  (other / 'notes.txt').write_text('keep me')
  with pytest.raises(pack_brisc.PackError, match='not empty'):
    pack_brisc.pack(str(tmp_path / 'src'), str(other), progress=False)
  assert (other / 'notes.txt').exists()


def test_size_limit_fails_with_the_fix(tmp_path, capsys):
  _kaggle(tmp_path / 'src', n=2)
  status = pack_brisc.main([str(tmp_path / 'src'), str(tmp_path / 'pack'), '--size=16',
                            '--max-mib=0.001'])
  assert status == 1
  err = capsys.readouterr().err
  assert 'over --max-mib=0.001' in err and '--quality' in err


def test_missing_mask_names_the_image(tmp_path):
  ids = _kaggle(tmp_path / 'src', n=3)
  mask = tmp_path / 'src' / 'segmentation_task' / 'train' / 'masks' / f'{ids[1]}.png'
  mask.unlink()
  with pytest.raises(pack_brisc.PackError, match=f'{ids[1]}.jpg has no mask'):
    pack_brisc.pack(str(tmp_path / 'src'), str(tmp_path / 'pack'), progress=False)


def test_bad_files_are_named(tmp_path):
  ids = _kaggle(tmp_path / 'src', n=2)
  task = tmp_path / 'src' / 'segmentation_task' / 'train'
  (task / 'images' / f'{ids[0]}.png').write_bytes(b'not an image')
  with pytest.raises(pack_brisc.PackError, match=f'Cannot decode .*{ids[0]}.png'):
    pack_brisc.pack(str(tmp_path / 'src'), str(tmp_path / 'pack'), progress=False)
  _kaggle(tmp_path / 'src2', n=2)
  grey_photo = np.random.default_rng(1).integers(0, 256, (40, 40), dtype=np.uint8)
  Image.fromarray(grey_photo).save(
      tmp_path / 'src2' / 'segmentation_task' / 'train' / 'masks' / f'{ids[1]}.png')
  with pytest.raises(pack_brisc.PackError, match=f'{ids[1]}.png is not binary-like'):
    pack_brisc.pack(str(tmp_path / 'src2'), str(tmp_path / 'pack2'), progress=False)


def test_missing_csvs_and_layout_say_what_to_give(tmp_path):
  _kaggle(tmp_path / 'src', n=1)
  (tmp_path / 'src' / 'text.csv').unlink()
  with pytest.raises(pack_brisc.PackError, match='text.csv.*--csv-dir'):
    pack_brisc.pack(str(tmp_path / 'src'), str(tmp_path / 'pack'), progress=False)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(pack_brisc.PackError, match='segmentation_task'):
    pack_brisc.pack(str(tmp_path / 'empty'), str(tmp_path / 'pack'), progress=False)
