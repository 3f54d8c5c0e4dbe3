"""Dice and HD95 on hand-made volumes with known answers, and the BraTS empty-region conventions."""

import itertools
import math

import numpy as np
import pytest

from medmap_fast.evaluation import dice, hd95, region_scores, volume_diagonal
from medmap_fast.evaluation.metrics import surface


def cube(shape, start, size):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


@pytest.mark.parametrize("k", [0, 1, 2, 5])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_dice_of_cube_shifted_by_k_voxels(k, axis):
    n = 6
    a = cube((20, 18, 16), (3, 3, 3), n)
    start = [3, 3, 3]
    start[axis] += k
    b = cube((20, 18, 16), start, n)
    assert dice(a, b) == pytest.approx((n - k) / n, abs=1e-12)
    assert dice(b, a) == pytest.approx((n - k) / n, abs=1e-12)


def test_dice_of_cube_shifted_along_two_axes_and_of_nested_cubes():
    a = cube((16, 16, 16), (2, 2, 2), 8)
    b = cube((16, 16, 16), (4, 5, 2), 8)  # overlap 6 x 5 x 8
    assert dice(a, b) == pytest.approx(2 * 6 * 5 * 8 / (2 * 512))
    inner = cube((16, 16, 16), (4, 4, 4), 4)
    assert dice(a, inner) == pytest.approx(2 * 64 / (512 + 64))


def test_dice_empty_conventions():
    empty = np.zeros((5, 6, 7), dtype=bool)
    some = cube((5, 6, 7), (1, 1, 1), 2)
    assert dice(empty, empty) == 1.0  # nothing to find, nothing found
    assert dice(empty, some) == 0.0
    assert dice(some, empty) == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_hd95_of_planes_shifted_by_k_is_k_times_the_spacing_along_that_axis(axis, k):
    # One-voxel-thick planes across the whole volume: every voxel is surface and lies exactly
    # k voxels from the other plane, so every surface distance (and so HD95) is k * spacing[axis].
    spacing = (0.8, 1.5, 2.25)
    shape = (14, 12, 10)
    a = np.zeros(shape, dtype=bool)
    b = np.zeros(shape, dtype=bool)
    idx_a = [slice(None)] * 3
    idx_b = [slice(None)] * 3
    idx_a[axis], idx_b[axis] = 1, 1 + k
    a[tuple(idx_a)] = True
    b[tuple(idx_b)] = True
    assert hd95(a, b, spacing) == pytest.approx(k * spacing[axis], rel=1e-12)
    assert hd95(b, a, spacing) == pytest.approx(k * spacing[axis], rel=1e-12)


def test_hd95_between_single_voxels_is_their_distance_in_mm():
    a = np.zeros((8, 8, 8), dtype=bool)
    b = np.zeros((8, 8, 8), dtype=bool)
    a[1, 1, 1] = True
    b[4, 5, 1] = True
    assert hd95(a, b, (1.0, 2.0, 3.0)) == pytest.approx(math.sqrt(3**2 + 8**2))
    b[4, 5, 1], b[1, 1, 3] = False, True
    assert hd95(a, b, (1.0, 2.0, 3.0)) == pytest.approx(6.0)


def test_hd95_ignores_an_outlier_below_five_percent_but_not_above():
    a = np.zeros((30, 30, 30), dtype=bool)
    a[5, :, :] = True  # 900 surface voxels
    b = a.copy()
    b[25, 0, 0] = True  # one stray voxel 20 mm away: 1/901 of b's surface
    assert hd95(a, b, (1, 1, 1)) == 0.0
    b[25, :, :3] = True  # 90 stray voxels: 9% of b's surface
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(20.0)


def _independent_surface(m):
    p = np.pad(m, 1)
    inner = np.ones_like(m)
    for axis, step in itertools.product(range(3), (-1, 1)):
        inner &= np.roll(p, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return m & ~inner


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_pairwise_surface_distances(seed):
    rng = np.random.default_rng(seed)
    shape = (13, 11, 9)
    spacing = (0.7, 1.3, 2.1)
    from scipy import ndimage

    def blob():
        return ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.15

    a, b = blob(), blob()
    assert a.any() and b.any()
    sa, sb = _independent_surface(a), _independent_surface(b)
    np.testing.assert_array_equal(surface(a), sa)
    pa = np.argwhere(sa) * np.array(spacing)
    pb = np.argwhere(sb) * np.array(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    want = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    assert hd95(a, b, spacing) == pytest.approx(want, rel=1e-9)


def test_hd95_empty_conventions_and_penalty():
    shape, spacing = (10, 12, 14), (1.0, 1.5, 2.0)
    empty = np.zeros(shape, dtype=bool)
    some = cube(shape, (2, 2, 2), 3)
    assert hd95(empty, empty, spacing) == 0.0
    diag = math.sqrt(10**2 + 18**2 + 28**2)
    assert volume_diagonal(shape, spacing) == pytest.approx(diag)
    assert hd95(empty, some, spacing) == pytest.approx(diag)
    assert hd95(some, empty, spacing) == pytest.approx(diag)
    assert hd95(some, empty, spacing, empty_penalty=373.13) == 373.13
    assert hd95(some, some, spacing) == 0.0
    # the value BraTS uses is the diagonal of its 240 x 240 x 155 grid at 1 mm
    assert volume_diagonal((240, 240, 155), (1, 1, 1)) == pytest.approx(373.13, abs=5e-3)


def test_region_scores_per_region():
    label = np.zeros((12, 12, 12), dtype=np.uint8)
    label[2:10, 2:10, 2:10] = 2  # oedema
    label[4:8, 4:8, 4:8] = 1  # core
    label[5:7, 5:7, 5:7] = 4  # enhancing
    spacing = (1.0, 1.0, 1.0)
    same = region_scores(label, label, spacing, with_hd95=True)
    assert same == {"dice_WT": 1.0, "dice_TC": 1.0, "dice_ET": 1.0, "hd95_WT": 0.0, "hd95_TC": 0.0, "hd95_ET": 0.0}

    no_et = np.where(label == 4, 1, label).astype(np.uint8)  # ET predicted as core
    s = region_scores(no_et, label, spacing, with_hd95=True)
    assert (s["dice_WT"], s["dice_TC"], s["dice_ET"]) == (1.0, 1.0, 0.0)
    assert s["hd95_ET"] == pytest.approx(volume_diagonal(label.shape, spacing))

    label_no_et = no_et  # a case without enhancing tumour, predicted without: ET both empty
    s = region_scores(no_et, label_no_et, spacing, with_hd95=True)
    assert s["dice_ET"] == 1.0 and s["hd95_ET"] == 0.0

    only_wt = np.where(label > 0, 2, 0).astype(np.uint8)
    s = region_scores(only_wt, label)
    assert set(s) == {"dice_WT", "dice_TC", "dice_ET"}
    assert s["dice_WT"] == 1.0 and s["dice_TC"] == 0.0 and s["dice_ET"] == 0.0


def test_errors_name_the_argument():
    a = np.zeros((4, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"pred has shape \(4, 4, 4\) but label has \(4, 4, 5\)"):
        dice(a, np.zeros((4, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="spacing must be 3 finite positive numbers"):
        hd95(a, a, (1, 1))
    with pytest.raises(ValueError, match="spacing must be 3 finite positive numbers"):
        hd95(a, a, (1, 0, 1))
    with pytest.raises(ValueError, match="pred must hold only 0 and 1"):
        dice(np.full((4, 4, 4), 2), a)
    with pytest.raises(ValueError, match=r"prediction must be a canonical label map .* got 3"):
        region_scores(np.full((4, 4, 4), 3, np.uint8), np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="with_hd95=True needs spacing"):
        region_scores(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), with_hd95=True)


@pytest.mark.parametrize("code", ["RAS", "ASL", "SLP"])
def test_hd95_of_files_uses_the_spacing_of_the_canonical_axes(tmp_path, code):
    """Label and prediction on disk in a permuted orientation: planes 2 voxels apart along the axis with
    2.5 mm voxels are 5 mm apart, whichever position that axis has in the files."""
    import nibabel as nib
    from nibabel import orientations as nio

    from medmap_fast.data import MODALITIES
    from medmap_fast.evaluation.evaluate import evaluate_predictions

    shape, spacing = (10, 12, 14), (0.8, 1.5, 2.5)  # RAS+, the truth
    affine = np.diag(spacing + (1.0,))

    def save(array, path):
        img = nib.Nifti1Image(array, affine)
        nib.save(img.as_reoriented(nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(code)))),
                 str(path))

    label, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    label[:, :, 3], pred[:, :, 5] = 2, 2
    case = tmp_path / "data" / "c"
    case.mkdir(parents=True)
    for m in MODALITIES:
        save(np.ones(shape, np.int16), case / f"c_{m}.nii.gz")
    save(label, case / "c_seg.nii.gz")
    (tmp_path / "pred").mkdir()
    save(pred, tmp_path / "pred" / "c.nii.gz")
    rows = evaluate_predictions(tmp_path / "data", tmp_path / "pred", tmp_path / "out", with_hd95=True,
                                log=lambda *a: None)
    assert rows[0]["hd95_WT"] == pytest.approx(5.0) and rows[0]["dice_WT"] == 0.0
    assert rows[0]["hd95_ET"] == 0.0 and rows[0]["dice_ET"] == 1.0  # both empty
