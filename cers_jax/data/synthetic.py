"""A synthetic dataset in the CERS flat layout where chain-of-thought retrieval matters.

It stands in for the paper's datasets (docs/design.md section 10) in tests and the CPU demo, and is
built to exercise the paper's premise (section 1): cases that look alike in the image but
differ diagnostically, where a CoT names the deciding attribute and retrieving reference
cases by CoT similarity therefore finds the right references.

Design. Every image is a grey "axial scan": an elliptical body with a bright outer boundary,
smooth background texture, a bias field and noise. Most images hold one or two lesions;
each lesion is a bright core (homogeneous or mottled) surrounded by a faint hyperintense
rim. Each lesion-bearing image has a latent class:

* `contained` — the rim is perilesional oedema; the mask is the bright core only;
* `infiltrative` — the rim is tumour extension; the mask is the core and the rim.

Both classes draw core and rim intensities, sizes, shapes, textures and positions from
the same distributions, so the images are ambiguous at a glance: the only image cue is the
rim's outer profile (fading gradually vs. ending in a crisper edge), blended in with weight
`rim_cue` (0 = no cue at all) and buried in noise. The masks, however, differ
systematically (the infiltrative mask is about twice the area). The report text (`text.csv`)
gives only count, size and location, as the authors' texts do, and never the class. Both CoTs
name the class in their Boundary and Summary parts (with synonyms, so an embedding must
capture the meaning rather than one word): the mask CoT always correctly, the no-mask CoT
(the one an LLM writes without seeing the mask, used for unlabeled and test images) wrongly
with probability `cot_error_rate`. Some images have no lesion (empty mask) and some carry a
bright distractor focus that is never part of the mask.

Why CoT retrieval helps here: coarse retrieval by image features finds references with
similar size/location/appearance but of either class (they look alike); re-ranking by CoT
similarity keeps those of the query's class, whose features come with the right mask
extent, so the retrieval-aware decoder can learn whether to include the rim. Retrieval by
report text cannot do this (the text lacks the class), and image-only retrieval can only
as far as the faint `rim_cue` allows — the ablation modes of the paper's Table 2 separate.

Files (see the `README.txt` written next to them): `frames/<id>.png` (8-bit grey),
`masks/<id>.png` (0/255), `text.csv` (image,text; image is the file name with extension),
`cot_output_mask.csv` and `cot_output_no_mask.csv` (image,cot keyed by id; four parts
"Texture: ...\\nBoundary: ...\\nContext: ...\\nSummary: ..."), `attributes.csv` (the latent
attributes, for analysis only; never an input of the method). The same seed writes
byte-identical files; each image draws from its own generator seeded by (seed, index), so
the first n images do not depend on num_images.
"""

import csv
import dataclasses
import os

from absl import logging
import numpy as np
from PIL import Image

CONTAINED = 'contained'
INFILTRATIVE = 'infiltrative'
CLASSES = (CONTAINED, INFILTRATIVE)

_README_MARKER = 'cers_jax synthetic dataset'
_SIZES = (('small', 0.050, 0.068), ('medium-sized', 0.075, 0.095), ('large', 0.100, 0.125))
_COUNT_WORDS = {1: 'one', 2: 'two'}
_ROWS = ('upper', '', 'lower')
_COLS = ('left', 'central', 'right')

# Synonym pools: the class is stated in varied words, so CoT similarity has to capture it.
_CLASS_WORDS = {
    CONTAINED: ('contained', 'well-circumscribed', 'encapsulated'),
    INFILTRATIVE: ('infiltrative', 'invasive', 'infiltrating'),
}
_RIM_WORDS = {
    CONTAINED: ('perilesional oedema', 'a reactive oedematous halo', 'surrounding oedema'),
    INFILTRATIVE: ('tumour extension', 'infiltrated tissue', 'an invasive margin'),
}


@dataclasses.dataclass(frozen=True)
class _Lesion:
  cy: float  # Centre, pixels.
  cx: float
  radius: float  # Core radius, pixels.
  rim: float  # Rim width, pixels.


@dataclasses.dataclass(frozen=True)
class _Case:
  """Latent attributes of one image."""
  id: str
  lesion_class: str  # CONTAINED | INFILTRATIVE | '' (no lesion).
  size: str
  lesions: tuple[_Lesion, ...]
  core_texture: str  # 'homogeneous' | 'mottled'.
  distractor: tuple[float, float, float] | None  # (cy, cx, radius) of a bright focus.
  no_mask_cot_class: str  # The class the no-mask CoT states (wrong with cot_error_rate).


def _location(cy: float, cx: float, size: int) -> str:
  row = _ROWS[min(int(3 * cy / size), 2)]
  col = _COLS[min(int(3 * cx / size), 2)]
  return f'{row} {col}' if row else col


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
  t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
  return t * t * (3 - 2 * t)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def _sinusoid_field(rng, yy, xx, size, wavelengths, terms) -> np.ndarray:
  """Sum of random plane waves, normalised to about [-1, 1]: smooth random texture."""
  field = np.zeros_like(yy)
  for _ in range(terms):
    wavelength = rng.uniform(*wavelengths) * size
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    field += np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / wavelength
                    + phase)
  return field / np.sqrt(terms)


def _rim_profile(t: np.ndarray, lesion_class: str, rim_cue: float) -> np.ndarray:
  """Rim brightness (1 at the core border) against t = 0 at the core border, 1 at the rim's
  outer edge. The shared part fades over the rim; the class part is the subtle cue."""
  shared = 1.0 - _smoothstep(0.3, 1.3, t)
  if lesion_class == INFILTRATIVE:
    cue = _sigmoid((1.0 - t) * 8.0) / _sigmoid(8.0)  # Plateau, then a crisp outer edge.
  else:
    cue = 1.0 - _smoothstep(0.0, 1.7, t)  # Fades gradually past the rim.
  return np.where(t < 0, 1.0, (1 - rim_cue) * shared + rim_cue * cue)


def _sample_case(index: int, seed: int, size: int, empty_fraction: float,
                 two_fraction: float, distractor_fraction: float,
                 cot_error_rate: float) -> tuple[_Case, np.random.Generator]:
  rng = np.random.default_rng([seed, index])
  has_lesion = rng.random() >= empty_fraction
  lesion_class = CLASSES[int(rng.integers(2))] if has_lesion else ''
  count = (2 if rng.random() < two_fraction else 1) if has_lesion else 0
  size_name, r_lo, r_hi = _SIZES[int(rng.integers(len(_SIZES)))]
  lesions = []
  for _ in range(count):
    # Rejection-sample a place clear of the other lesion; a second lesion that does not
    # fit (large ones in a small body) is dropped, so masks never merge.
    for _ in range(50):
      radius = rng.uniform(r_lo, r_hi) * size
      rim = rng.uniform(0.55, 0.9) * radius
      reach = max(0.38 * size - radius - rim, 0.0)  # Clear of the bright body boundary.
      ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1)) * reach
      cand = _Lesion(size / 2 + rad * np.sin(ang), size / 2 + rad * np.cos(ang), radius,
                     rim)
      if all(np.hypot(cand.cy - o.cy, cand.cx - o.cx) > cand.radius + cand.rim + o.radius
             + o.rim + 2 for o in lesions):
        lesions.append(cand)
        break
  distractor = None
  if rng.random() < (distractor_fraction if has_lesion else 2 * distractor_fraction):
    for _ in range(50):
      ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3) * size
      cy, cx = size / 2 + rad * np.sin(ang), size / 2 + rad * np.cos(ang)
      r = rng.uniform(0.02, 0.032) * size
      if all(np.hypot(cy - o.cy, cx - o.cx) > r + o.radius + o.rim + 2 for o in lesions):
        distractor = (cy, cx, r)
        break
  core_texture = 'mottled' if rng.random() < 0.5 else 'homogeneous'
  stated = lesion_class
  if has_lesion and rng.random() < cot_error_rate:
    stated = CLASSES[1 - CLASSES.index(lesion_class)]
  case = _Case(id=f'syn_{index:04d}', lesion_class=lesion_class, size=size_name,
               lesions=tuple(lesions), core_texture=core_texture, distractor=distractor,
               no_mask_cot_class=stated)
  return case, rng


def _render(case: _Case, rng: np.random.Generator, size: int,
            rim_cue: float) -> tuple[np.ndarray, np.ndarray]:
  """Draws the uint8 image and the {0, 255} mask of one case."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
  # Body: a rotated ellipse with a soft edge and a bright outer boundary ("skull").
  cy, cx = size / 2 + rng.normal(0, 0.02 * size, 2)
  ay, ax = rng.uniform(0.40, 0.47, 2) * size
  theta = rng.uniform(-0.4, 0.4)
  u = (np.cos(theta) * (xx - cx) + np.sin(theta) * (yy - cy)) / ax
  v = (-np.sin(theta) * (xx - cx) + np.cos(theta) * (yy - cy)) / ay
  body_r = np.sqrt(u * u + v * v)
  body = _sigmoid((1.0 - body_r) * size * 0.35)
  boundary = np.exp(-((body_r - 0.95) / 0.035) ** 2)
  tissue = rng.uniform(70, 100)
  image = 12 + (tissue - 12) * body + rng.uniform(50, 80) * boundary
  image += body * rng.uniform(4, 12) * _sinusoid_field(rng, yy, xx, size, (0.2, 0.6), 4)

  mask = np.zeros((size, size), bool)
  core_delta = rng.uniform(70, 110)
  for lesion in case.lesions:
    phi = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.75, 1.0)
    du, dv = xx - lesion.cx, yy - lesion.cy
    pu = np.cos(phi) * du + np.sin(phi) * dv
    pv = (-np.sin(phi) * du + np.cos(phi) * dv) / aspect
    angle = np.arctan2(pv, pu)
    wobble = 1.0 + sum(rng.uniform(0, 0.08) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                       for k in (2, 3, 4))
    dist = np.hypot(pu, pv) / wobble  # Pixels, the core border at lesion.radius.
    t = (dist - lesion.radius) / lesion.rim
    rim_delta = rng.uniform(22, 38)
    image += rim_delta * _rim_profile(t, case.lesion_class, rim_cue)
    core = _sigmoid((lesion.radius - dist) / 0.6)
    mottle = 0.03 if case.core_texture == 'homogeneous' else 0.14
    texture = 1.0 + mottle * _sinusoid_field(rng, yy, xx, size, (0.05, 0.1), 3)
    image += core_delta * core * texture
    extent = lesion.radius + (lesion.rim if case.lesion_class == INFILTRATIVE else 0.0)
    mask |= dist <= extent
  if case.distractor is not None:
    dy, dx, dr = case.distractor
    image += core_delta * 0.9 * _sigmoid((dr - np.hypot(yy - dy, xx - dx)) / 0.4)

  gain = 1.0 + rng.uniform(-0.08, 0.08) * (xx - size / 2) / size
  image = image * gain + rng.normal(0, rng.uniform(3, 8), (size, size))
  image_u8 = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return image_u8, mask.astype(np.uint8) * 255


def _report_text(case: _Case, size: int) -> str:
  if not case.lesions:
    return 'A synthetic axial scan with no visible lesion.'
  count = len(case.lesions)
  plural = 's' if count > 1 else ''
  places = [_location(l.cy, l.cx, size) for l in case.lesions]
  where = places[0] if len(set(places)) == 1 else ' and '.join(places)
  return (f'A synthetic axial scan with {_COUNT_WORDS[count]} {case.size} lesion{plural} '
          f'in the {where} region{"s" if len(set(places)) > 1 else ""}.')


def _cot(case: _Case, rng: np.random.Generator, size: int, *, with_mask: bool) -> str:
  """Four-part CoT; the mask CoT is sure and right, the no-mask CoT hedges (and may err)."""
  pick = lambda options: options[int(rng.integers(len(options)))]
  noise = pick(('mild image noise', 'slight noise', 'moderate background noise'))
  distractor = ''
  if case.distractor is not None:
    where = _location(case.distractor[0], case.distractor[1], size)
    distractor = (f' A small bright focus in the {where} region mimics lesion signal but is '
                  f'not part of the lesion.')
  if not case.lesions:
    return '\n'.join((
        f'Texture: Homogeneous background tissue with {noise}; no focal abnormal signal.',
        'Boundary: No lesion margin is identified.',
        f'Context: The bright outer boundary of the body can mimic lesion signal.{distractor}',
        'Summary: No lesion; the expected segmentation is empty.'))
  cls = case.lesion_class if with_mask else case.no_mask_cot_class
  word, rim_word = pick(_CLASS_WORDS[cls]), pick(_RIM_WORDS[cls])
  count = len(case.lesions)
  cores = 'cores' if count > 1 else 'core'
  texture = ('mottled, heterogeneous' if case.core_texture == 'mottled' else
             'homogeneous')
  places = list(dict.fromkeys(_location(l.cy, l.cx, size) for l in case.lesions))
  where = f'{" and ".join(places)} region{"s" if len(places) > 1 else ""}'
  verb = 'represents' if with_mask else pick(
      ('likely represents', 'probably represents', 'appears to be'))
  hedge = '' if with_mask else pick(('likely ', 'probably ', 'presumably '))
  lesions = f'{hedge}{word} lesion{"s" if count > 1 else ""}'
  if cls == CONTAINED:
    boundary = (f'The bright {cores} {"have" if count > 1 else "has"} a well-defined margin; '
                f'the faint rim fades gradually into the tissue and {verb} {rim_word}')
    summary = f'{lesions}: segment the bright {cores} only and exclude the faint halo.'
  else:
    boundary = (f'The faint rim ends in a comparatively crisp outer margin and {verb} '
                f'{rim_word}')
    summary = f'{lesions}: segment the bright {cores} together with the faint rim.'
  if with_mask:
    boundary += ('; the annotation includes it.' if cls == INFILTRATIVE else
                 '; the annotation excludes it.')
  else:
    boundary += '.'
  summary = summary[0].upper() + summary[1:]
  return '\n'.join((
      f'Texture: {texture.capitalize()} bright {cores} within a faint hyperintense rim; '
      f'{noise}.',
      f'Boundary: {boundary}',
      f'Context: {case.size.capitalize()} lesion{"s" if count > 1 else ""} in the {where}; '
      f'the bright outer boundary of the body can mimic lesion signal.{distractor}',
      f'Summary: {summary}'))


def _write_csv(path: str, header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(header)
    writer.writerows(rows)


def _readme(num_images: int, image_size: int, seed: int, rim_cue: float,
            cot_error_rate: float) -> str:
  return f"""{_README_MARKER} (seed {seed}, {num_images} images of {image_size}x{image_size})
Written by cers_jax.data.synthetic.generate_synthetic; the module docstring explains the design.

frames/<id>.png          8-bit grey synthetic scans.
masks/<id>.png           lesion masks, 0 (background) / 255 (lesion); all 0 when no lesion.
text.csv                 image,text - report text keyed by the image FILE NAME (with .png), as
                         in the CERS authors' text.csv; gives lesion count, size and location only.
cot_output_mask.csv      image,cot - CoT written "with the mask shown", keyed by id (no
                         extension); four lines Texture/Boundary/Context/Summary; always names
                         the lesion class correctly.
cot_output_no_mask.csv   image,cot - CoT written "without the mask"; names the class wrongly
                         for about {cot_error_rate:.0%} of lesion images.
attributes.csv           latent attributes per image (for analysis only, never a model input).

Lesion classes: 'contained' (mask = bright core only; the faint rim is oedema) and
'infiltrative' (mask = core + faint rim). Both look alike in the image; the only image cue is
the rim's outer profile, blended in with weight rim_cue = {rim_cue}. The class is stated in the
CoTs but never in text.csv, so retrieving reference cases by CoT similarity finds cases with
the right mask extent where retrieval by image or report text cannot.
"""


def _clear_previous(out_dir: str) -> None:
  """Removes the PNGs of an earlier synthetic dataset; refuses to touch anything else."""
  pngs = [os.path.join(out_dir, sub, f) for sub in ('frames', 'masks')
          if os.path.isdir(os.path.join(out_dir, sub))
          for f in os.listdir(os.path.join(out_dir, sub)) if f.endswith('.png')]
  if not pngs:
    return
  readme = os.path.join(out_dir, 'README.txt')
  ours = os.path.exists(readme) and open(readme, encoding='utf-8').read().startswith(
      _README_MARKER)
  if not ours:
    raise FileExistsError(
        f'{out_dir!r} already holds images that are not a synthetic dataset written by '
        'cers_jax; choose an empty folder for generate_synthetic.')
  for path in pngs:
    os.remove(path)


def _write_annotations(out_dir: str, texts, cots_mask, cots_no_mask, attributes) -> None:
  """text.csv, the two CoT CSVs and attributes.csv (each image's drawn properties)."""
  _write_csv(os.path.join(out_dir, 'text.csv'), ('image', 'text'), texts)
  _write_csv(os.path.join(out_dir, 'cot_output_mask.csv'), ('image', 'cot'), cots_mask)
  _write_csv(os.path.join(out_dir, 'cot_output_no_mask.csv'), ('image', 'cot'),
             cots_no_mask)
  with open(os.path.join(out_dir, 'attributes.csv'), 'w', newline='',
            encoding='utf-8') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(('image', 'lesion_class', 'num_lesions', 'size', 'core_texture',
                     'distractor', 'no_mask_cot_class', 'mask_fraction'))
    writer.writerows(attributes)


def generate_synthetic(
    out_dir: str,
    *,
    num_images: int = 240,
    image_size: int = 64,
    seed: int = 0,
    empty_fraction: float = 0.1,
    two_lesion_fraction: float = 0.25,
    distractor_fraction: float = 0.3,
    rim_cue: float = 0.3,
    cot_error_rate: float = 0.1,
) -> dict:
  """Writes the synthetic CERS-layout dataset described in the module docstring.

  An earlier synthetic dataset in `out_dir` is replaced. Geometry scales with `image_size`
  (>= 32 advised). `distractor_fraction` is doubled for lesion-free images. `rim_cue` 0 makes
  the two classes identically distributed in the image. Returns a summary dict (class counts,
  empty masks, two-lesion images, no-mask CoT errors...).
  """
  if num_images < 1 or image_size < 16:
    raise ValueError(f'generate_synthetic needs num_images >= 1 and image_size >= 16, got '
                     f'{num_images} and {image_size}.')
  if not 0 <= rim_cue <= 1:
    raise ValueError(f'rim_cue must lie in [0, 1], got {rim_cue}.')
  os.makedirs(out_dir, exist_ok=True)
  _clear_previous(out_dir)
  for sub in ('frames', 'masks'):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

  texts, cots_mask, cots_no_mask, attributes = [], [], [], []
  counts = {CONTAINED: 0, INFILTRATIVE: 0, 'empty': 0, 'two_lesions': 0,
            'no_mask_cot_errors': 0}
  for index in range(num_images):
    case, rng = _sample_case(index, seed, image_size, empty_fraction, two_lesion_fraction,
                             distractor_fraction, cot_error_rate)
    image, mask = _render(case, rng, image_size, rim_cue)
    # Pillow writes no timestamps into PNGs, so equal arrays give equal bytes.
    Image.fromarray(image, mode='L').save(os.path.join(out_dir, 'frames', f'{case.id}.png'))
    Image.fromarray(mask, mode='L').save(os.path.join(out_dir, 'masks', f'{case.id}.png'))
    texts.append((f'{case.id}.png', _report_text(case, image_size)))
    cots_mask.append((case.id, _cot(case, rng, image_size, with_mask=True)))
    cots_no_mask.append((case.id, _cot(case, rng, image_size, with_mask=False)))
    attributes.append((
        case.id, case.lesion_class or 'none', str(len(case.lesions)),
        case.size if case.lesions else '', case.core_texture if case.lesions else '',
        str(case.distractor is not None), case.no_mask_cot_class or 'none',
        f'{float((mask > 0).mean()):.4f}'))
    counts[case.lesion_class or 'empty'] += 1
    counts['two_lesions'] += len(case.lesions) == 2
    counts['no_mask_cot_errors'] += case.no_mask_cot_class != case.lesion_class

  _write_annotations(out_dir, texts, cots_mask, cots_no_mask, attributes)
  with open(os.path.join(out_dir, 'README.txt'), 'w', encoding='utf-8') as f:
    f.write(_readme(num_images, image_size, seed, rim_cue, cot_error_rate))

  summary = dict(out_dir=out_dir, num_images=num_images, image_size=image_size, seed=seed,
                 **counts)
  logging.info('Synthetic dataset: %s', summary)
  return summary
