"""The authors' training-time preprocessing, on the host in numpy (DESIGN.md section 4).

CERS applies to every training image a random zoom (factor in 0.95-1.2, probability 0.1)
before the per-image per-channel z-score; validation and test images get only the z-score.
The images arrive already resized to S x S and replicated to 3 channels by the cache, so
the zoom here keeps the size S: it scales about the image centre, as a `RandomZoom` that
resizes the image by the factor and then centre-crops (zoom in) or zero-pads (zoom out)
back to S does. We compute that map in one step, as separable per-axis resampling taps,
instead of resize-then-crop, so no rounding of the intermediate size enters (the tests
check it against Pillow's resize + crop/pad).

The image uses bicubic interpolation (Keys kernel with a = -0.5, Pillow's BICUBIC, the
filter the cache was resized with) with Pillow's antialiasing support widening when the
factor shrinks the image; the mask uses nearest neighbour, so it stays binary. Pixels whose
source falls outside the image (zoom out) are zero in both.

Pure numpy; no JAX, so the functions run inside grain worker processes.
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
  """Source pixels and weights of a centred bicubic zoom along one axis.

  Output pixel i is sum_t weights[i, t] * x[cols[i, t]]; out-of-image output pixels (zoom
  out) have all-zero weights.

  Args:
    size: side length S (input and output).
    zoom: scale factor; > 1 magnifies (the border is cropped), < 1 shrinks (zero border).

  Returns:
    (cols (S, T) int, weights (S, T) float32).
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
  """Zooms an (S, S, C) image about its centre keeping its size; bicubic, clipped to [0, 255].

  Args:
    image: (S, S, C) array (uint8 or float), values in [0, 255].
    zoom: scale factor.

  Returns:
    float32 (S, S, C).
  """
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
  """With probability `prob`, zooms image and mask by one factor drawn from zoom_range.

  Args:
    image: (S, S, C) image, values in [0, 255].
    mask: (S, S) mask.
    rng: numpy generator (the pipeline passes a per-batch seeded one).
    prob: probability of zooming.
    zoom_range: (low, high) of the uniform zoom factor.

  Returns:
    (image float32 (S, S, C), mask (S, S) of mask's dtype).
  """
  if rng.random() < prob:
    zoom = float(rng.uniform(zoom_range[0], zoom_range[1]))
    return zoom_image(image, zoom), zoom_mask(mask, zoom)
  return image.astype(np.float32), mask


def zscore(images: np.ndarray) -> np.ndarray:
  """Per-image, per-channel z-score over H and W (population std, eps 1e-8), in float32.

  Args:
    images: (..., H, W, C) array.

  Returns:
    float32 array of the same shape; a constant channel becomes all zeros.
  """
  x = images.astype(np.float32)
  # Flatten H, W into one contiguous axis: reductions over it are several times faster
  # than over two axes of a channels-last array.
  flat = x.reshape(*x.shape[:-3], -1, x.shape[-1])
  centred = flat - flat.mean(axis=-2, keepdims=True)
  var = np.einsum('...nc,...nc->...c', centred, centred)[..., None, :] / flat.shape[-2]
  centred /= np.sqrt(var) + _ZSCORE_EPS
  return centred.reshape(x.shape)
