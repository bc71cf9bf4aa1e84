"""The authors' training-time preprocessing, on the host in numpy (docs/design.md section 10).

Every training image gets a random zoom (factor in 0.95-1.2, probability 0.1) before the
per-image per-channel z-score; validation and test images get only the z-score. Images
arrive already S x S, so the zoom keeps the size, like a `RandomZoom` that resizes by the
factor and then centre-crops or zero-pads back to S. That map is computed in one step, as
separable per-axis resampling taps, so no rounding of the intermediate size enters (the
tests check it against Pillow's resize + crop/pad).

The image uses bicubic (Keys, a = -0.5: Pillow's BICUBIC, which the cache was resized with)
with Pillow's antialiasing support widening when the image shrinks; the mask uses nearest
neighbour, so it stays binary. Pixels whose source is outside the image are zero in both.
No JAX here, so the functions run inside grain worker processes.
"""

from collections.abc import Sequence

import numpy as np

_BICUBIC_A = -0.5  # Pillow's BICUBIC (torch and OpenCV use -0.75).
_ZSCORE_EPS = 1e-8


def _cubic_kernel(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.5."""
  a = _BICUBIC_A
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _source_coords(size: int, zoom: float) -> np.ndarray:
  """Continuous source coordinate of every output pixel centre for a centred zoom."""
  centre = size / 2
  return (np.arange(size) + 0.5 - centre) / zoom + centre - 0.5


def bicubic_zoom_taps(size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
  """(cols, weights), each (S, T), of a centred bicubic zoom along one axis of size S.

  Output pixel i is sum_t weights[i, t] * x[cols[i, t]]; zoom > 1 magnifies (the border is
  cropped), < 1 shrinks, and out-of-image output pixels then have all-zero weights.
  """
  if zoom <= 0:
    raise ValueError(f'zoom must be positive, got {zoom}.')
  src = _source_coords(size, zoom)
  # When shrinking, widen the kernel like Pillow does, so the zoom does not alias.
  scale = min(zoom, 1.0)
  support = 2.0 / scale
  taps = np.arange(-int(np.ceil(support)), int(np.ceil(support)) + 2)
  cols = np.floor(src).astype(np.int64)[:, None] + taps[None, :]
  weights = _cubic_kernel((cols - src[:, None]) * scale)
  # Like Pillow, drop taps outside the image and renormalise what is left.
  weights = np.where((cols >= 0) & (cols < size), weights, 0.0)
  total = weights.sum(axis=1, keepdims=True)
  weights /= np.where(total == 0, 1.0, total)
  inside = (src >= -0.5) & (src <= size - 0.5)
  weights[~inside] = 0.0
  return np.clip(cols, 0, size - 1), weights.astype(np.float32)


def nearest_zoom_indices(size: int, zoom: float) -> np.ndarray:
  """Source index of every output pixel for a centred nearest-neighbour zoom; -1 = outside."""
  src = _source_coords(size, zoom)
  idx = np.floor(src + 0.5).astype(np.int64)
  inside = (src >= -0.5) & (src <= size - 0.5)
  return np.where(inside, np.clip(idx, 0, size - 1), -1)


def zoom_image(image: np.ndarray, zoom: float) -> np.ndarray:
  """Zooms an (S, S, C) image in [0, 255] about its centre keeping its size; float32."""
  size = image.shape[0]
  if image.ndim != 3 or image.shape[1] != size:
    raise ValueError(f'zoom_image expects a square (S, S, C) image, got {image.shape}.')
  cols, weights = bicubic_zoom_taps(size, zoom)
  x = image.astype(np.float32)
  # Separable and banded: a few shifted gathers per axis. Dense (S, S) matmuls would lean
  # on BLAS threads, which contend with grain workers and the training step.
  rows = np.zeros_like(x)
  for t in range(cols.shape[1]):
    rows += weights[:, t, None, None] * x[cols[:, t]]
  out = np.zeros_like(x)
  for t in range(cols.shape[1]):
    out += weights[None, :, t, None] * rows[:, cols[:, t]]
  return np.clip(out, 0.0, 255.0)


def zoom_mask(mask: np.ndarray, zoom: float) -> np.ndarray:
  """Zooms an (S, S) mask about its centre keeping its size; nearest, zeros outside."""
  size = mask.shape[0]
  idx = nearest_zoom_indices(size, zoom)
  valid = idx >= 0
  safe = np.where(valid, idx, 0)
  out = mask[safe][:, safe]
  return np.where(valid[:, None] & valid[None, :], out, np.zeros_like(out))


def random_zoom(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    prob: float,
    zoom_range: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
  """With probability `prob`, zooms image (S, S, C) and mask (S, S) by one factor.

  The factor is uniform in `zoom_range`. Returns a float32 image and a mask of mask's dtype.
  """
  if rng.random() < prob:
    zoom = float(rng.uniform(zoom_range[0], zoom_range[1]))
    return zoom_image(image, zoom), zoom_mask(mask, zoom)
  return image.astype(np.float32), mask


def zscore(images: np.ndarray) -> np.ndarray:
  """Per-image, per-channel z-score over H and W of (..., H, W, C), in float32.

  Population std, eps 1e-8: a constant channel becomes all zeros.
  """
  x = images.astype(np.float32)
  # Flatten H, W into one contiguous axis: reductions over it are several times faster
  # than over two axes of a channels-last array.
  flat = x.reshape(*x.shape[:-3], -1, x.shape[-1])
  centred = flat - flat.mean(axis=-2, keepdims=True)
  var = np.einsum('...nc,...nc->...c', centred, centred)[..., None, :] / flat.shape[-2]
  centred /= np.sqrt(var) + _ZSCORE_EPS
  return centred.reshape(x.shape)
