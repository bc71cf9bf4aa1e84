"""Bootstrap intervals, pooled Dice and the paired tests of cers_jax.stats."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cers_jax import stats


def test_pooled_and_per_image_dice_by_hand():
  # Image 1: a large lesion half found; image 2: a small one half found.
  inter, pred, gt = np.array([10, 1]), np.array([10, 2]), np.array([20, 2])
  per_image = 2 * inter / (pred + gt)  # 20/30 and 2/4
  assert per_image.mean() == pytest.approx((2 / 3 + 1 / 2) / 2)
  assert stats.pooled_dice(inter, pred, gt) == pytest.approx(22 / 34)
  assert stats.pooled_iou(inter, pred, gt) == pytest.approx(11 / 23)
  # An empty image (both empty) adds nothing to the pooled sums, while per image it adds a 1.
  assert stats.pooled_dice([10, 1, 0], [10, 2, 0], [20, 2, 0]) == pytest.approx(22 / 34)
  assert stats.pooled_dice([0, 0], [0, 0], [0, 0]) == 1.0
  assert stats.pooled_iou([0], [0], [0]) == 1.0


def test_bootstrap_ci_is_reproducible_and_is_the_percentile_interval():
  values = np.random.default_rng(3).random(40)
  ci = stats.bootstrap_ci(values, resamples=500, seed=7)
  assert ci == stats.bootstrap_ci(values, resamples=500, seed=7)
  assert ci != stats.bootstrap_ci(values, resamples=500, seed=8)
  # The same resamples drawn by hand: 500 <= CHUNK, so one draw of (500, 40) indices.
  idx = np.random.default_rng(7).integers(0, 40, size=(500, 40))
  assert ci == pytest.approx(list(np.percentile(values[idx].mean(axis=1), [2.5, 97.5])))
  assert ci[0] < values.mean() < ci[1]
  # More resamples than one chunk give the same interval on every call too.
  assert stats.bootstrap_ci(values, resamples=2000) == stats.bootstrap_ci(values,
                                                                        resamples=2000)


def test_bootstrap_edge_cases():
  assert stats.bootstrap_ci([0.5] * 10, resamples=100) == [0.5, 0.5]
  assert all(math.isnan(x) for x in stats.bootstrap_ci([], resamples=100))
  assert all(math.isnan(x) for x in stats.bootstrap_ci([1.0, 2.0], resamples=0))
  # Non-finite entries (images a rule left out) are dropped, not averaged.
  assert stats.bootstrap_ci([0.5, math.nan, 0.5], resamples=50) == [0.5, 0.5]


def test_pooled_ci_brackets_the_pooled_dice():
  rng = np.random.default_rng(0)
  gt = rng.integers(10, 100, size=30)
  pred = rng.integers(10, 100, size=30)
  inter = np.minimum(gt, pred) // 2
  lo, hi = stats.pooled_ci(inter, pred, gt, resamples=400, seed=1)
  assert lo < stats.pooled_dice(inter, pred, gt) < hi
  lo, hi = stats.pooled_ci(inter, pred, gt, iou=True, resamples=400, seed=1)
  assert lo < stats.pooled_iou(inter, pred, gt) < hi


def test_describe_drops_non_finite_and_counts_what_it_kept():
  out = stats.describe([1.0, 3.0, math.nan, 2.0, 10.0], resamples=100)
  assert out['count'] == 4 and out['mean'] == 4.0 and out['median'] == 2.5
  assert out['std'] == pytest.approx(np.std([1, 3, 2, 10]))
  empty = stats.describe([math.nan], resamples=100)
  assert empty['count'] == 0 and math.isnan(empty['mean']) and math.isnan(empty['median'])


def test_paired_bootstrap_difference():
  b = np.random.default_rng(1).random(25)
  out = stats.paired_bootstrap_diff(b + 0.1, b, resamples=300)
  assert out['diff'] == pytest.approx(0.1) and out['ci95'] == pytest.approx([0.1, 0.1])
  assert out['count'] == 25
  a = b + np.random.default_rng(2).normal(0.05, 0.02, 25)
  out = stats.paired_bootstrap_diff(a, b, resamples=300)
  assert out['ci95'][0] < out['diff'] < out['ci95'][1] and out['ci95'][0] > 0
  # A pair with a missing value on either side leaves.
  out = stats.paired_bootstrap_diff([1.0, math.nan, 3.0], [0.0, 1.0, math.nan], resamples=10)
  assert out['count'] == 1 and out['diff'] == 1.0
  with pytest.raises(ValueError, match='differ in length'):
    stats.paired_bootstrap_diff([1.0], [1.0, 2.0])


def test_wilcoxon_matches_scipy_and_handles_ties():
  rng = np.random.default_rng(4)
  a, b = rng.random(20), rng.random(20)
  assert stats.wilcoxon_p(a, b) == pytest.approx(scipy_stats.wilcoxon(a, b).pvalue)
  assert stats.wilcoxon_p(a, a) == 1.0
  assert math.isnan(stats.wilcoxon_p([math.nan], [1.0]))
  assert stats.wilcoxon_p(a + 1.0, a) < 1e-4


def test_wilcoxon_with_ties_uses_the_normal_approximation():
  a = np.array([5.0, 6, 6, 7, 8, 9, 9, 4])
  b = a - np.array([1.0, 1, 2, 1, 0, 3, 1, -1])  # |1| four times: ties; one zero.
  expected = scipy_stats.wilcoxon([1.0, 1, 2, 1, 3, 1, -1], method='approx').pvalue
  assert stats.wilcoxon_p(a, b) == pytest.approx(expected)
  assert expected != pytest.approx(scipy_stats.wilcoxon([1.0, 1, 2, 1, 3, 1, -1],
                                                        method='exact').pvalue)
