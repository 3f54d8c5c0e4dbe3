"""Dice and 95th-percentile Hausdorff distance per BraTS region, with the challenge's empty-region rules.

Conventions (the BraTS evaluation's, stated once here and followed everywhere):

* Dice = 2 |P ∩ L| / (|P| + |L|) of boolean masks P (prediction) and L (label).
* HD95, symmetric and surface-based, in mm: the surface of a mask is its voxels with at least one of
  their 6 face neighbours outside the mask (a voxel on the edge of the image counts as surface: the
  region ends there). For every surface voxel of P, the Euclidean distance (voxel spacing applied) to
  the nearest surface voxel of L, and the other way round; HD95 is the larger of the two 95th
  percentiles (numpy's linear interpolation), so neither direction can hide the other.
* Empty regions: label and prediction both empty -> Dice 1, HD95 0 (nothing to find, nothing found).
  Exactly one empty -> Dice 0, HD95 = ``empty_penalty``, by default the diagonal of the image in mm,
  sqrt(sum((n_i * s_i)^2)): for the BraTS 240 x 240 x 155 grid at 1 mm that is the 373.13 mm the
  challenge uses, and it is finite, so HD95 means stay computable.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import ndimage

from ..data.labels import REGIONS, region_masks

REGION_NAMES = tuple(REGIONS)  # ("WT", "TC", "ET")


def _as_bool(mask, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a boolean (or 0/1) array, got dtype {arr.dtype}")
        bad = (arr != 0) & (arr != 1)
        if bad.any():
            raise ValueError(f"{name} must hold only 0 and 1 (or be bool), got {arr[bad].flat[0].item()!r}")
        arr = arr != 0
    if arr.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    return arr


def _check_pair(pred, label, spacing=None):
    p = _as_bool(pred, "pred")
    lab = _as_bool(label, "label")
    if p.shape != lab.shape:
        raise ValueError(f"pred has shape {p.shape} but label has {lab.shape}: they must match")
    if spacing is None:
        return p, lab, None
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError:
        raise TypeError(f"spacing must be a sequence of {p.ndim} positive numbers (mm), got {spacing!r}") from None
    if len(sp) != p.ndim or not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing must be {p.ndim} finite positive numbers (mm per voxel), got {spacing!r}")
    return p, lab, sp


def volume_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The diagonal of an image of ``shape`` voxels at ``spacing`` mm: the default HD95 penalty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice(pred, label) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (BraTS convention), 0.0 when only one is."""
    p, lab, _ = _check_pair(pred, label)
    total = np.count_nonzero(p) + np.count_nonzero(lab)
    if total == 0:
        return 1.0
    return float(2.0 * np.count_nonzero(p & lab) / total)


def surface(mask: np.ndarray) -> np.ndarray:
    """The voxels of a boolean mask with a face neighbour outside it (image edges count as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred, label, spacing) -> tuple:
    """(distances from pred's surface to label's, from label's to pred's), in mm; both masks non-empty."""
    p, lab, sp = _check_pair(pred, label, spacing)
    if not p.any() or not lab.any():
        raise ValueError("surface_distances needs two non-empty masks; hd95 handles the empty cases")
    # Every surface voxel of either mask lies inside the bounding box of their union, and outside it
    # both masks are all background, so the distance transforms on the crop are exact and much smaller.
    both = p | lab
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(both))
    sp_p, sp_l = surface(p[box]), surface(lab[box])
    to_l = ndimage.distance_transform_edt(~sp_l, sampling=sp)
    to_p = ndimage.distance_transform_edt(~sp_p, sampling=sp)
    return to_l[sp_p], to_p[sp_l]


def hd95(pred, label, spacing, empty_penalty: Optional[float] = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two boolean masks.

    The larger of the 95th percentiles of the two directed surface-distance sets. Both masks empty:
    0.0. Exactly one empty: ``empty_penalty`` (default: the image diagonal in mm, see
    :func:`volume_diagonal`; 373.13 for BraTS' 240 x 240 x 155 at 1 mm).
    """
    p, lab, sp = _check_pair(pred, label, spacing)
    has_p, has_l = bool(p.any()), bool(lab.any())
    if not has_p and not has_l:
        return 0.0
    if has_p != has_l:
        return float(volume_diagonal(p.shape, sp) if empty_penalty is None else empty_penalty)
    d_pl, d_lp = surface_distances(p, lab, sp)
    return float(max(np.percentile(d_pl, 95), np.percentile(d_lp, 95)))


def _canonical(labels, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    ok = np.isin(arr, (0, 1, 2, 4))
    if not ok.all():
        raise ValueError(
            f"{name} must be a canonical label map with values in {{0, 1, 2, 4}} "
            f"(medmap_fast.data.canonical_labels converts 3 to 4), got {arr[~ok].flat[0].item()!r}"
        )
    return arr


def region_scores(
    pred_labels,
    label,
    spacing: Optional[Sequence[float]] = None,
    with_hd95: bool = False,
    empty_penalty: Optional[float] = None,
) -> Dict[str, float]:
    """Dice (and HD95) of WT, TC and ET between two canonical label maps (values in {0, 1, 2, 4}).

    Returns {"dice_WT", "dice_TC", "dice_ET"} (and "hd95_WT", "hd95_TC", "hd95_ET" in mm when
    ``with_hd95``, which needs ``spacing``), each region following the empty-region conventions above.
    """
    pred_labels, label = _canonical(pred_labels, "prediction"), _canonical(label, "label")
    if pred_labels.shape != label.shape:
        raise ValueError(f"prediction has shape {pred_labels.shape} but label has {label.shape}: they must match")
    if with_hd95 and spacing is None:
        raise ValueError("with_hd95=True needs spacing (mm per voxel along each axis), got None")
    pm, lm = region_masks(pred_labels), region_masks(label)
    out = {f"dice_{r}": dice(pm[r], lm[r]) for r in REGION_NAMES}
    if with_hd95:
        out.update({f"hd95_{r}": hd95(pm[r], lm[r], spacing, empty_penalty) for r in REGION_NAMES})
    return out
