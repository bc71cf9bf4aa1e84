"""Statistics over per-image scores: medians, bootstrap CIs, pooled Dice, paired tests.

Plain numpy (and scipy.stats for the Wilcoxon test). A bootstrap resamples images with
replacement from a generator seeded with `seed`, so the same scores and seed give the same
interval; the interval is the percentile interval (2.5th and 97.5th percentiles of the
resampled statistic). Non-finite scores (images an empty-mask rule left out) are dropped
before any statistic: callers count them.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

CHUNK = 256  # Resamples drawn at once: bounds memory at CHUNK x images indices.
EXACT_MAX = 50  # Wilcoxon: exact p-values up to this many nonzero differences (no ties).


def finite(values) -> np.ndarray:
  """`values` as float64 without its nan/inf entries."""
  values = np.asarray(values, np.float64).reshape(-1)
  return values[np.isfinite(values)]


def resample_indices(n: int, resamples: int, seed: int):
  """Yields (chunk, n) arrays of image indices drawn with replacement, `resamples` rows in
  all; the sequence depends only on (n, resamples, seed)."""
  rng = np.random.default_rng(seed)
  for start in range(0, resamples, CHUNK):
    yield rng.integers(0, n, size=(min(CHUNK, resamples - start), n))


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, *, resamples: int = 2000,
              seed: int = 0, level: float = 0.95) -> list[float]:
  """Percentile bootstrap interval [lo, hi] of `statistic` over resampled image indices.

  `statistic` maps an (R, n) index array to R values. Returns [nan, nan] for no images or
  no resamples.
  """
  if n == 0 or resamples <= 0:
    return [float('nan'), float('nan')]
  values = np.concatenate([statistic(idx) for idx in resample_indices(n, resamples, seed)])
  tail = 50.0 * (1.0 - level)
  lo, hi = np.percentile(values, [tail, 100.0 - tail])
  return [float(lo), float(hi)]


def bootstrap_ci(values, *, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> list[float]:
  """Bootstrap interval of the mean of `values` (non-finite entries dropped)."""
  values = finite(values)
  return bootstrap(lambda idx: values[idx].mean(axis=1), len(values), resamples=resamples,
                   seed=seed, level=level)


def pooled_dice(inter, pred, gt) -> float:
  """Dataset-level Dice: 2 sum(|P n G|) / (sum |P| + sum |G|) over all images' pixels.

  Arguments are per-image pixel counts; 1 when every prediction and mask is empty.
  """
  total = float(np.sum(pred, dtype=np.float64) + np.sum(gt, dtype=np.float64))
  return 1.0 if total == 0 else 2.0 * float(np.sum(inter, dtype=np.float64)) / total


def pooled_iou(inter, pred, gt) -> float:
  """Dataset-level IoU: sum(|P n G|) / sum(|P u G|); 1 when everything is empty."""
  inter_sum = float(np.sum(inter, dtype=np.float64))
  union = float(np.sum(pred, dtype=np.float64) + np.sum(gt, dtype=np.float64)) - inter_sum
  return 1.0 if union == 0 else inter_sum / union


def _pooled_ratio(inter: np.ndarray, pred: np.ndarray, gt: np.ndarray, iou: bool):
  """(R, n) indices -> R pooled Dice (or IoU) values, 1 where a resample is all empty."""
  def statistic(idx):
    i, p, g = inter[idx].sum(axis=1), pred[idx].sum(axis=1), gt[idx].sum(axis=1)
    denom = p + g - i if iou else p + g
    numer = i if iou else 2.0 * i
    return np.where(denom == 0, 1.0, numer / np.where(denom == 0, 1.0, denom))
  return statistic


def pooled_ci(inter, pred, gt, *, iou: bool = False, resamples: int = 2000, seed: int = 0,
              level: float = 0.95) -> list[float]:
  """Bootstrap interval of the pooled Dice (or IoU) over images resampled with their counts."""
  arrays = [np.asarray(a, np.float64).reshape(-1) for a in (inter, pred, gt)]
  return bootstrap(_pooled_ratio(*arrays, iou=iou), len(arrays[0]), resamples=resamples,
                   seed=seed, level=level)


def describe(values, *, resamples: int = 2000, seed: int = 0) -> dict:
  """mean, std, median, ci95 ([lo, hi] of the mean) and count of the finite `values`."""
  kept = finite(values)
  nan = float('nan')
  return dict(mean=float(kept.mean()) if len(kept) else nan,
              std=float(kept.std()) if len(kept) else nan,
              median=float(np.median(kept)) if len(kept) else nan,
              ci95=bootstrap_ci(kept, resamples=resamples, seed=seed), count=int(len(kept)))


def paired(a, b) -> tuple[np.ndarray, np.ndarray]:
  """The pairs of `a` and `b` (aligned by image) where both are finite."""
  a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f'paired scores differ in length: {a.shape[0]} and {b.shape[0]}.')
  keep = np.isfinite(a) & np.isfinite(b)
  return a[keep], b[keep]


def paired_bootstrap_diff(a, b, *, resamples: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict:
  """Mean of a - b over images and its bootstrap interval (images resampled as pairs)."""
  a, b = paired(a, b)
  diff = a - b
  ci = bootstrap(lambda idx: diff[idx].mean(axis=1), len(diff), resamples=resamples,
                 seed=seed, level=level)
  return dict(diff=float(diff.mean()) if len(diff) else float('nan'), ci95=ci,
              count=int(len(diff)))


def wilcoxon_p(a, b) -> float:
  """Two-sided Wilcoxon signed-rank p-value of the paired scores a and b.

  Zero differences are dropped (the 'wilcox' rule); 1.0 when every difference is zero
  (nothing tells the two apart), nan without pairs. The exact null distribution for up to
  EXACT_MAX differences without ties, else the normal approximation (tie-corrected):
  scipy's default falls back to a permutation test on ties, which takes seconds per call.
  """
  a, b = paired(a, b)
  if len(a) == 0:
    return float('nan')
  diff = a - b
  diff = diff[diff != 0]
  if len(diff) == 0:
    return 1.0
  exact = len(diff) <= EXACT_MAX and len(np.unique(np.abs(diff))) == len(diff)
  # Imported here: scipy.stats takes about a second to import, which every run.py start
  # would pay for one function that only `compare` calls.
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  p = scipy_stats.wilcoxon(diff, alternative='two-sided',
                           method='exact' if exact else 'approx').pvalue
  return float(p) if math.isfinite(p) else float('nan')
