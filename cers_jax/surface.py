"""Surface distances of binary masks: HD95, ASSD and normalised surface Dice (N-D).

Plain numpy/scipy, for 2D images and 3D volumes alike; `spacing` gives the size of a pixel
(voxel) along each axis, so distances come out in that unit (millimetres), or in pixels
without it. The definitions are MONAI's (`monai.metrics`, checked in tests/test_surface.py):

- the surface of a mask is its pixels that a one-step erosion with the cross-shaped
  (face-connected) element removes; outside the array counts as background, so a lesion
  touching the image edge has a surface there;
- d(A -> B) is, for every surface pixel of A, the exact Euclidean distance to the nearest
  surface pixel of B (a distance transform of B's surface, sampled with `spacing`);
- HD95 = max(p95(d(P -> G)), p95(d(G -> P))), percentiles linearly interpolated;
- ASSD = the mean of the distances of both directions pooled (not the mean of two means);
- NSD (Nikolov et al. 2021, without sub-voxel surface areas) = the share of both
  surfaces' pixels within `tolerance` of the other surface.

A prediction or ground truth without any foreground has no surface, so these metrics are
undefined for it; `EmptyRule` says what to score instead, and the case is returned so that
callers can count the images under each rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

BOTH_PRESENT = 'both_present'
BOTH_EMPTY = 'both_empty'
PRED_EMPTY = 'pred_empty'  # A lesion in the ground truth that the prediction missed.
GT_EMPTY = 'gt_empty'  # A prediction on an image without a lesion.
CASES = (BOTH_PRESENT, BOTH_EMPTY, PRED_EMPTY, GT_EMPTY)
BOTH_EMPTY_RULES = ('zero', 'nan')
ONE_EMPTY_RULES = ('worst', 'nan')
KEYS = ('hd95', 'assd', 'nsd')


@dataclasses.dataclass(frozen=True)
class EmptyRule:
  """What an image scores when the prediction, the ground truth or both are empty.

  both_empty: 'zero' (HD95 = ASSD = 0, NSD = 1: nothing to find and nothing found) or
    'nan' (the image is left out of the surface averages, and counted).
  one_empty: 'worst' (HD95 = ASSD = the image diagonal in the unit in use, NSD = 0: a
    missed lesion or a false one costs the most a distance can) or 'nan' (left out,
    counted).
  """

  both_empty: str = 'zero'
  one_empty: str = 'worst'

  def __post_init__(self):
    if self.both_empty not in BOTH_EMPTY_RULES:
      raise ValueError(f'both_empty={self.both_empty!r}: expected one of {BOTH_EMPTY_RULES}.')
    if self.one_empty not in ONE_EMPTY_RULES:
      raise ValueError(f'one_empty={self.one_empty!r}: expected one of {ONE_EMPTY_RULES}.')

  def describe(self) -> str:
    """One line for summaries and logs."""
    both = ('HD95 = ASSD = 0, NSD = 1' if self.both_empty == 'zero'
            else 'left out (nan)')
    one = ('HD95 = ASSD = image diagonal, NSD = 0' if self.one_empty == 'worst'
           else 'left out (nan)')
    return f'prediction and mask both empty: {both}; exactly one empty: {one}'


def _spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
  if spacing is None:
    return np.ones(ndim)
  spacing = np.asarray(spacing, np.float64).reshape(-1)
  if spacing.shape != (ndim,) or not np.all(spacing > 0):
    raise ValueError(f'spacing {tuple(spacing)} must give one positive size per axis of '
                     f'a {ndim}-D mask.')
  return spacing


def diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
  """The length of the array's diagonal in the unit of `spacing`: the worst-case distance."""
  extent = np.asarray(shape, np.float64) * _spacing(spacing, len(shape))
  return float(math.sqrt(np.sum(extent ** 2)))


def surface(mask: np.ndarray) -> np.ndarray:
  """The pixels of `mask` that a face-connected one-step erosion removes (MONAI's edges)."""
  mask = np.asarray(mask, bool)
  return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _crop(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both masks cut to the bounding box of their union plus one pixel.

  Distances between surfaces do not depend on the array around them, so the distance
  transforms run on the box only (what keeps 3D volumes cheap). The extra pixel keeps the
  erosion's view of the background; outside the array scipy reads background anyway.
  """
  coords = np.argwhere(pred | gt)
  lo = np.maximum(coords.min(axis=0) - 1, 0)
  hi = coords.max(axis=0) + 2
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  return pred[box], gt[box]


def directed_distances(from_surface: np.ndarray, to_surface: np.ndarray,
                       spacing: np.ndarray) -> np.ndarray:
  """For every pixel of `from_surface`, the distance to the nearest pixel of `to_surface`."""
  field = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
  return field[from_surface]


def _empty_case(pred_any: bool, gt_any: bool) -> str:
  if pred_any and gt_any:
    return BOTH_PRESENT
  if not pred_any and not gt_any:
    return BOTH_EMPTY
  return PRED_EMPTY if gt_any else GT_EMPTY


def _empty_scores(case: str, rule: EmptyRule, worst: float) -> dict[str, float]:
  nan = float('nan')
  if case == BOTH_EMPTY:
    return (dict(hd95=0.0, assd=0.0, nsd=1.0) if rule.both_empty == 'zero'
            else dict(hd95=nan, assd=nan, nsd=nan))
  return (dict(hd95=worst, assd=worst, nsd=0.0) if rule.one_empty == 'worst'
          else dict(hd95=nan, assd=nan, nsd=nan))


def surface_metrics(pred: np.ndarray, gt: np.ndarray, *,
                    spacing: Sequence[float] | None = None, tolerance: float = 2.0,
                    empty_rule: EmptyRule | None = None) -> dict:
  """HD95, ASSD and NSD of one binary prediction against its ground truth (any N-D).

  Args:
    pred: binary mask (nonzero = foreground), e.g. (H, W) or (D, H, W).
    gt: binary mask of the same shape.
    spacing: size of a pixel along each axis (e.g. mm); None = 1 (distances in pixels).
    tolerance: NSD tolerance, in the unit of `spacing`.
    empty_rule: what an empty prediction and/or ground truth scores (default EmptyRule()).

  Returns:
    dict(hd95=, assd=, nsd=, case=), `case` one of CASES: which empty case applied
    ('both_present' when the metrics are the surface distances themselves).
  """
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  if pred.shape != gt.shape:
    raise ValueError(f'prediction {pred.shape} and ground truth {gt.shape} differ in shape.')
  if tolerance < 0 or not math.isfinite(tolerance):
    raise ValueError(f'tolerance {tolerance} must be finite and >= 0.')
  step = _spacing(spacing, pred.ndim)
  case = _empty_case(bool(pred.any()), bool(gt.any()))
  if case != BOTH_PRESENT:
    rule = empty_rule or EmptyRule()
    return dict(_empty_scores(case, rule, diagonal(pred.shape, step)), case=case)
  pred_edge, gt_edge = (surface(m) for m in _crop(pred, gt))
  d_pred = directed_distances(pred_edge, gt_edge, step)
  d_gt = directed_distances(gt_edge, pred_edge, step)
  hd95 = max(np.percentile(d_pred, 95), np.percentile(d_gt, 95))
  both = np.concatenate([d_pred, d_gt])
  return dict(hd95=float(hd95), assd=float(both.mean()),
              nsd=float(np.mean(both <= tolerance)), case=case)
