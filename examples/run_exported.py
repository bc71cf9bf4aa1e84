"""Run a predictor exported by `python run.py --mode export` with jax and numpy alone.

  python examples/run_exported.py RUN/export inputs.npz probs.npy
  python examples/run_exported.py RUN/export --image x.png --text "report" --cot "CoT" probs.npy

inputs.npz holds the arrays predictor.json names (image uint8 (B, S, S, 3), text_ids, ...).
The second form builds them from one image and its texts; it needs Pillow and `tokenizers`
(`pip install pillow tokenizers`), and nothing of cers_jax, flax, orbax or transformers.
"""

import json
import os
import sys

import jax
import numpy as np


def load(folder):
  """(call, spec): call(**inputs) -> probabilities (B, S, S, 1) as numpy."""
  with open(os.path.join(folder, 'predictor.json')) as f:
    spec = json.load(f)
  with open(os.path.join(folder, 'predictor.jaxexport'), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(folder, 'weights.npz')) as npz:
    weights = [npz[f'w{i:04d}'] for i in range(spec['weights'])]

  def call(**inputs):
    args = [np.asarray(inputs[x['name']], x['dtype']) for x in spec['inputs']]
    return np.asarray(exported.call(weights, *args))

  return call, spec


def _tokens(folder, kind, text, length, pad_id):
  from tokenizers import Tokenizer  # Only for the texts form.
  tok = Tokenizer.from_file(os.path.join(folder, 'tokenizers', kind, 'tokenizer.json'))
  tok.enable_truncation(length)
  tok.enable_padding(length=length, pad_id=pad_id)
  enc = tok.encode(text)
  return np.asarray([enc.ids], np.int32), np.asarray([enc.attention_mask], np.int32)


def inputs_from_files(folder, spec, image_path, text, cot):
  """One image and its texts as the predictor's inputs (see predictor.json preprocessing)."""
  from PIL import Image  # Only for the texts form.
  size = spec['image_size']
  image = Image.open(image_path).convert('RGB').resize((size, size), Image.BICUBIC)
  inputs = dict(image=np.asarray(image, np.uint8)[None])
  pad = spec['pad_id']
  inputs['text_ids'], inputs['text_mask'] = _tokens(folder, 'text', text, spec['text_len'],
                                                    pad['text'])
  inputs['cot_ids'], inputs['cot_mask'] = _tokens(folder, 'cot', cot, spec['cot_len'],
                                                  pad['cot'])
  inputs['report_ids'], inputs['report_mask'] = _tokens(folder, 'cot', text, spec['cot_len'],
                                                        pad['cot'])
  return inputs


def main(argv):
  folder, out = argv[0], argv[-1]
  call, spec = load(folder)
  if argv[1] == '--image':
    named = dict(zip(argv[1:-1:2], argv[2:-1:2]))
    inputs = inputs_from_files(folder, spec, named['--image'], named['--text'],
                               named['--cot'])
  else:
    with np.load(argv[1]) as npz:
      inputs = {k: npz[k] for k in npz.files}
  probs = call(**inputs)
  np.save(out, probs)
  print(f'{probs.shape[0]} images: mean probability {probs.mean():.4f}, '
        f'{int((probs > spec["threshold"]).sum())} pixels above {spec["threshold"]}')


if __name__ == '__main__':
  main(sys.argv[1:])
