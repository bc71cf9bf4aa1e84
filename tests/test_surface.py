"""Surface metrics on shapes with hand-computed distances, the empty rules, and MONAI."""

import math
import warnings

import numpy as np
import pytest

from cers_jax import surface
from cers_jax.surface import EmptyRule

R2, R3, R5, R8 = math.sqrt(2), math.sqrt(3), math.sqrt(5), math.sqrt(8)


def _box(shape, *slices) -> np.ndarray:
  mask = np.zeros(shape, bool)
  mask[tuple(slices)] = True
  return mask


def test_surface_is_what_a_cross_erosion_removes_and_the_array_edge_counts():
  mask = _box((6, 6), slice(0, 4), slice(1, 5))
  edge = surface.surface(mask)
  # Interior: rows 1-2, cols 2-3. Row 0 touches the array edge, so it is surface.
  assert edge.sum() == 16 - 4
  assert not edge[1:3, 2:4].any() and edge[0, 1:5].all()


def test_concentric_squares_2d_by_hand():
  # A 16x16 square two pixels inside a 20x20 one. Every prediction surface pixel is 2
  # from the truth's surface; of the truth's 76: 64 at 2, 8 beside corners at sqrt 5 and
  # 4 corners at sqrt 8.
  gt = _box((40, 40), slice(10, 30), slice(10, 30))
  pred = _box((40, 40), slice(12, 28), slice(12, 28))
  out = surface.surface_metrics(pred, gt, tolerance=2.0)
  # p95 of the truth's 76 sorted distances: position 75 * 0.95 = 71.25, between sqrt 5
  # (index 71) and sqrt 8 (index 72).
  assert out['hd95'] == pytest.approx(R5 + 0.25 * (R8 - R5))
  assert out['assd'] == pytest.approx((60 * 2 + 64 * 2 + 8 * R5 + 4 * R8) / 136)
  assert out['nsd'] == pytest.approx(124 / 136)
  assert out['case'] == surface.BOTH_PRESENT
  assert surface.surface_metrics(pred, gt, tolerance=2.5)['nsd'] == pytest.approx(132 / 136)
  assert surface.surface_metrics(pred, gt, tolerance=3.0)['nsd'] == 1.0
  # Symmetric: swapping prediction and truth changes nothing.
  swapped = surface.surface_metrics(gt, pred, tolerance=2.0)
  assert {k: swapped[k] for k in ('hd95', 'assd', 'nsd')} == pytest.approx(
      {k: out[k] for k in ('hd95', 'assd', 'nsd')})


def test_isotropic_spacing_scales_distances_and_the_tolerance_is_in_that_unit():
  gt = _box((40, 40), slice(10, 30), slice(10, 30))
  pred = _box((40, 40), slice(12, 28), slice(12, 28))
  px = surface.surface_metrics(pred, gt, tolerance=2.0)
  mm = surface.surface_metrics(pred, gt, spacing=(0.5, 0.5), tolerance=1.0)
  assert mm['hd95'] == pytest.approx(px['hd95'] / 2) and mm['assd'] == pytest.approx(
      px['assd'] / 2)
  assert mm['nsd'] == pytest.approx(px['nsd'])


def test_anisotropic_spacing_2d_parallel_lines():
  # Two one-pixel lines three rows apart: every surface pixel is 3 rows from the other.
  gt = _box((20, 30), 5, slice(3, 25))
  pred = _box((20, 30), 8, slice(3, 25))
  out = surface.surface_metrics(pred, gt, spacing=(2.0, 0.5), tolerance=5.9)
  assert out['hd95'] == pytest.approx(6.0) and out['assd'] == pytest.approx(6.0)
  assert out['nsd'] == 0.0
  assert surface.surface_metrics(pred, gt, spacing=(2.0, 0.5), tolerance=6.0)['nsd'] == 1.0


def test_concentric_boxes_3d_by_hand():
  # An 8^3 box one voxel inside a 10^3 box. Prediction: 296 surface voxels, all at 1.
  # Truth: 488 = 384 face voxels at 1, 96 edge voxels at sqrt 2, 8 corners at sqrt 3.
  gt = _box((14, 14, 14), slice(2, 12), slice(2, 12), slice(2, 12))
  pred = _box((14, 14, 14), slice(3, 11), slice(3, 11), slice(3, 11))
  out = surface.surface_metrics(pred, gt, tolerance=1.0)
  assert out['hd95'] == pytest.approx(R2)  # Position 487 * 0.95 = 462.65: an edge voxel.
  assert out['assd'] == pytest.approx((296 + 384 + 96 * R2 + 8 * R3) / 784)
  assert out['nsd'] == pytest.approx(680 / 784)


def test_anisotropic_spacing_3d_parallel_slabs():
  gt = _box((10, 8, 8), 2, slice(1, 7), slice(1, 7))
  pred = _box((10, 8, 8), 5, slice(1, 7), slice(1, 7))
  out = surface.surface_metrics(pred, gt, spacing=(3.0, 0.7, 0.7), tolerance=9.0)
  assert out['hd95'] == pytest.approx(9.0) and out['assd'] == pytest.approx(9.0)
  assert out['nsd'] == 1.0


def test_concentric_spheres_3d_are_about_their_radius_difference_apart():
  grid = np.indices((33, 33, 33)) - 16
  radius = np.sqrt((grid ** 2).sum(axis=0))
  out = surface.surface_metrics(radius <= 6, radius <= 12, spacing=(1.5, 1.5, 1.5),
                                tolerance=1.0)
  # 6 voxels of 1.5 mm, within what digitising two spheres can shift.
  assert out['assd'] == pytest.approx(9.0, abs=1.0)
  assert out['hd95'] == pytest.approx(9.0, abs=1.5)
  assert out['nsd'] == 0.0


def test_identical_masks_score_zero_distance_and_full_nsd():
  mask = _box((16, 16), slice(0, 5), slice(3, 9))
  assert surface.surface_metrics(mask, mask, tolerance=0.0) == dict(
      hd95=0.0, assd=0.0, nsd=1.0, case=surface.BOTH_PRESENT)


def test_empty_rules():
  empty, lesion = np.zeros((30, 40), bool), _box((30, 40), slice(5, 9), slice(5, 9))
  spacing = (0.5, 2.0)
  diag = math.hypot(30 * 0.5, 40 * 2.0)
  assert surface.diagonal((30, 40), spacing) == pytest.approx(diag)
  both = surface.surface_metrics(empty, empty, spacing=spacing)
  assert both == dict(hd95=0.0, assd=0.0, nsd=1.0, case=surface.BOTH_EMPTY)
  missed = surface.surface_metrics(empty, lesion, spacing=spacing)
  assert missed == dict(hd95=pytest.approx(diag), assd=pytest.approx(diag), nsd=0.0,
                        case=surface.PRED_EMPTY)
  false = surface.surface_metrics(lesion, empty)
  assert false == dict(hd95=pytest.approx(50.0), assd=pytest.approx(50.0), nsd=0.0,
                       case=surface.GT_EMPTY)
  rule = EmptyRule(both_empty='nan', one_empty='nan')
  for pred, gt, case in ((empty, empty, surface.BOTH_EMPTY), (empty, lesion, surface.PRED_EMPTY),
                         (lesion, empty, surface.GT_EMPTY)):
    out = surface.surface_metrics(pred, gt, empty_rule=rule)
    assert out['case'] == case and all(math.isnan(out[k]) for k in surface.KEYS)
  # The rules are independent: 'nan' for both empty keeps the worst case for one empty.
  mixed = EmptyRule(both_empty='nan')
  assert surface.surface_metrics(empty, lesion, empty_rule=mixed)['nsd'] == 0.0
  assert math.isnan(surface.surface_metrics(empty, empty, empty_rule=mixed)['nsd'])
  assert 'image diagonal' in EmptyRule().describe() and 'left out' in rule.describe()


def test_bad_input_is_refused():
  a = np.zeros((4, 4), bool)
  with pytest.raises(ValueError, match='differ in shape'):
    surface.surface_metrics(a, np.zeros((4, 5), bool))
  with pytest.raises(ValueError, match='one positive size per axis'):
    surface.surface_metrics(a, a, spacing=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match='both_empty'):
    EmptyRule(both_empty='one')
  with pytest.raises(ValueError, match='one_empty'):
    EmptyRule(one_empty='zero')
  with pytest.raises(ValueError, match='tolerance'):
    surface.surface_metrics(a, a, tolerance=-1.0)


def _blob(rng, shape, fill) -> np.ndarray:
  """A random smooth blob: smoothed noise above its `fill` quantile."""
  from scipy import ndimage
  field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
  return field > np.quantile(field, 1.0 - fill)


def _monai(pred, gt, spacing, tolerance):
  monai_metrics = pytest.importorskip('monai.metrics')
  torch = pytest.importorskip('torch')
  p = torch.as_tensor(pred[None, None].astype(np.float32))
  g = torch.as_tensor(gt[None, None].astype(np.float32))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    hd95 = monai_metrics.compute_hausdorff_distance(p, g, include_background=True,
                                                     percentile=95, spacing=spacing)
    assd = monai_metrics.compute_average_surface_distance(p, g, include_background=True,
                                                          symmetric=True, spacing=spacing)
    nsd = monai_metrics.compute_surface_dice(p, g, [tolerance], include_background=True,
                                             spacing=spacing)
  return dict(hd95=float(hd95), assd=float(assd), nsd=float(nsd))


@pytest.mark.parametrize('shape,spacing', [((48, 40), None), ((48, 40), (0.8, 1.7)),
                                           ((64, 64), (1.0, 1.0)),
                                           ((16, 20, 18), None),
                                           ((16, 20, 18), (2.5, 0.9, 0.9))])
def test_matches_monai_on_random_shapes(shape, spacing):
  rng = np.random.default_rng(sum(shape))
  for trial in range(3):
    pred = _blob(rng, shape, 0.15 + 0.1 * trial)
    gt = _blob(rng, shape, 0.2)
    ours = surface.surface_metrics(pred, gt, spacing=spacing, tolerance=1.5)
    theirs = _monai(pred, gt, spacing, 1.5)
    # MONAI computes in float32.
    assert {k: ours[k] for k in surface.KEYS} == pytest.approx(theirs, rel=1e-5, abs=1e-5)
