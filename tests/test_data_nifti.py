"""Reading cases and writing segmentations through real NIfTI files, in many orientations and dtypes.

Every volume is made in RAS+ order first (the ground truth), then written by nibabel in another
orientation and dtype; reading must give the RAS+ array back exactly, and a segmentation written with
``save_segmentation`` must land voxel for voxel where the case's own seg file has it.
"""

import errno
import gzip
import os
import pickle

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio

from medmap_fast.data import (MODALITIES, Geometry, case_files, find_cases, load_case, load_segmentation,
                              save_segmentation)

SHAPE = (20, 24, 28)  # distinct sides: a swapped axis cannot go unnoticed


def _ras_affine(zooms=(1.0, 1.0, 1.0), origin=(-10.0, -12.0, -14.0)):
    a = np.diag(list(zooms) + [1.0])
    a[:3, 3] = origin
    return a


def _truth(seed=0, shape=SHAPE):
    """Distinct integer intensities per modality (RAS order) and a label map using 1, 2 and 3."""
    rng = np.random.default_rng(seed)
    images = {m: rng.integers(1, 200, shape).astype(np.float64) * (k + 1) for k, m in enumerate(MODALITIES)}
    for m in MODALITIES:
        images[m][:2] = 0  # some background
    label = np.zeros(shape, dtype=np.uint8)
    label[5:10, 6:12, 7:14] = 2
    label[6:9, 8:10, 9:12] = 3
    label[7, 9, 10] = 1
    return images, label


def _reorient(img, code):
    return img.as_reoriented(nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(code))))


def _save(data, affine, path, code="RAS", dtype=np.int16, endian="<", four_d=False):
    hdr = nib.Nifti1Header(endianness=endian)
    hdr.set_data_dtype(np.dtype(dtype).newbyteorder(endian))
    img = _reorient(nib.Nifti1Image(np.asarray(data).astype(dtype), affine, header=hdr), code)
    if four_d:
        img = nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine, header=img.header)
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def write_case(folder, name="case", code="RAS", dtype=np.int16, zooms=(1.0, 1.0, 1.0), seed=0, ext=".nii.gz",
               endian="<", four_d=False, skip=()):
    folder.mkdir(parents=True, exist_ok=True)
    images, label = _truth(seed)
    aff = _ras_affine(zooms)
    for m in MODALITIES:
        if m not in skip:
            _save(images[m] if dtype != np.uint8 else images[m] % 250, aff, folder / f"{name}_{m}{ext}", code,
                  dtype, endian, four_d)
    _save(label, aff, folder / f"{name}_seg{ext}", code, np.uint8, four_d=four_d)
    if dtype == np.uint8:
        images = {m: v % 250 for m, v in images.items()}
    return images, label, aff


@pytest.mark.parametrize(
    "code,dtype,endian,zooms,ext",
    [
        ("RAS", np.int16, "<", (1.0, 1.0, 1.0), ".nii.gz"),
        ("LPS", np.int16, "<", (0.9, 1.2, 3.0), ".nii.gz"),  # BraTS's own orientation, anisotropic voxels
        ("LAS", np.uint8, "<", (1.0, 1.0, 1.0), ".nii"),
        ("ASL", np.float32, ">", (0.8, 1.0, 2.5), ".nii.gz"),  # permuted axes, big-endian floats
        ("PIR", np.float64, "<", (1.5, 1.5, 1.0), ".nii"),
        ("SLA", np.int16, ">", (1.0, 2.0, 3.0), ".nii.gz"),
    ],
)
def test_round_trip_orientations_and_dtypes(tmp_path, code, dtype, endian, zooms, ext):
    images, label, aff = write_case(tmp_path / "c1", code=code, dtype=dtype, endian=endian, zooms=zooms, ext=ext)
    disk = nib.load(str(tmp_path / "c1" / f"case_t1{ext}"))
    assert "".join(nio.aff2axcodes(disk.affine)) == code
    assert disk.header.endianness == endian and disk.get_data_dtype() == np.dtype(dtype).newbyteorder(endian)

    case = load_case(tmp_path / "c1")
    assert case.name == "c1"
    assert case.image.dtype == np.float32 and case.image.shape == (4,) + SHAPE
    for k, m in enumerate(MODALITIES):
        np.testing.assert_array_equal(case.image[k], images[m].astype(np.float32))
    assert case.present.dtype == bool and case.present.all()
    assert case.label.dtype == np.uint8
    np.testing.assert_array_equal(case.label, np.where(label == 3, 4, label))
    np.testing.assert_allclose(case.spacing, zooms, atol=1e-6)
    np.testing.assert_allclose(case.geometry.canonical_affine, aff, atol=1e-5)
    canonical = nib.as_closest_canonical(disk)
    np.testing.assert_allclose(canonical.affine, case.geometry.canonical_affine, atol=1e-5)
    np.testing.assert_array_equal(canonical.get_fdata().reshape(SHAPE), case.image[0])
    assert "".join(case.geometry.axcodes) == code

    # predictions written back land where the case's own seg file has its labels, in its voxel order
    geometry = pickle.loads(pickle.dumps(case.geometry))
    out = save_segmentation(case.label, geometry, tmp_path / "pred" / f"c1_pred{ext}")
    written, original = nib.load(str(out)), nib.load(str(tmp_path / "c1" / f"case_seg{ext}"))
    raw_written = np.asarray(written.dataobj)
    assert raw_written.dtype == np.uint8 and written.get_data_dtype() == np.uint8
    raw_original = np.asarray(original.dataobj).reshape(original.shape[:3])
    np.testing.assert_array_equal(raw_written, np.where(raw_original == 3, 4, raw_original))
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)
    assert written.header.get_slope_inter() in ((None, None), (1.0, 0.0))
    assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 1
    np.testing.assert_array_equal(load_segmentation(out, geometry), case.label)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file left behind


def _rotation(ax, ay, az):
    cx, cy, cz = np.cos(np.deg2rad([ax, ay, az]))
    sx, sy, sz = np.sin(np.deg2rad([ax, ay, az]))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(linear, origin=(7.0, -3.0, 12.0)):
    a = np.eye(4)
    a[:3, :3] = linear
    a[:3, 3] = origin
    return a


@pytest.mark.parametrize(
    "affine",
    [
        _affine(_rotation(30, -20, 40) @ np.diag([0.9, 1.3, 2.5])),  # oblique, anisotropic
        _affine(np.diag([-1.0, -1.0, 1.0]) @ _rotation(4, -6, 3) @ np.diag([1.0, 1.0, 3.0])),  # tilted LPS
        _affine(_rotation(44.0, 46.0, 10.0) @ np.diag([1.0, 1.5, 2.0])),  # near 45 degrees
        _affine(np.array([[0.3, -1.0, 0.0], [0.0, 0.2, 1.2], [-2.0, 0.0, 0.1]])),  # sheared, permuted
    ],
    ids=["oblique", "tilted-LPS", "near-45", "sheared"],
)
def test_oblique_and_sheared_affines(tmp_path, affine):
    """Every voxel keeps its world position through the reorientation, and a segmentation written back
    lands on the voxels it came from."""
    shape = (6, 7, 8)
    values = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)  # every voxel its own value
    label = np.array([0, 1, 2, 4], np.uint8)[values % 4]
    folder = tmp_path / "c"
    folder.mkdir()
    for m in MODALITIES:
        nib.save(nib.Nifti1Image(values + 1, affine), str(folder / f"c_{m}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(folder / "c_seg.nii.gz"))

    case = load_case(folder)
    geometry = case.geometry
    assert "".join(nio.aff2axcodes(geometry.canonical_affine)) == "RAS"
    canon = case.image[0].astype(np.int64) - 1
    disk_index = np.stack(np.unravel_index(canon, shape), axis=-1).reshape(-1, 3)
    can_index = np.indices(canon.shape).reshape(3, -1).T
    world_disk = nib.affines.apply_affine(affine, disk_index)
    world_can = nib.affines.apply_affine(geometry.canonical_affine, can_index)
    np.testing.assert_allclose(world_can, world_disk, atol=1e-4)
    # the spacing is the distance between neighbours along each canonical axis
    for axis in range(3):
        step = np.zeros(3, int)
        step[axis] = 1
        far = nib.affines.apply_affine(geometry.canonical_affine, step) - geometry.canonical_affine[:3, 3]
        assert case.spacing[axis] == pytest.approx(np.linalg.norm(far), rel=1e-6)
    np.testing.assert_array_equal(case.label, np.array([0, 1, 2, 4], np.uint8)[canon % 4])

    out = save_segmentation(case.label, geometry, tmp_path / "pred.nii.gz")
    written = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(written.dataobj), label)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)


def test_written_header_describes_labels(tmp_path):
    """The segmentation keeps the reference image's geometry and units, not what describes its intensities."""
    folder = tmp_path / "c"
    folder.mkdir()
    aff = _ras_affine((0.9, 1.1, 3.0))
    for m in MODALITIES:
        img = nib.Nifti1Image(np.full(SHAPE, 10, np.int16), aff)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_intent("t test", (12,))
        img.header["cal_min"], img.header["cal_max"] = -5, 900
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=4)
        path = folder / f"c_{m}.nii"
        nib.save(img, str(path))
        with open(path, "r+b") as f:  # nibabel recomputes the scaling of arrays it saves: patch it on disk
            hdr = nib.Nifti1Header.from_fileobj(f)
            hdr["scl_slope"], hdr["scl_inter"] = 0.5, -3.0
            f.seek(0)
            f.write(hdr.binaryblock)
    case = load_case(folder)
    assert case.image.max() == 2.0  # 10 * 0.5 - 3
    label = np.zeros(SHAPE, np.uint8)
    label[3:5, 4:9, 1:2] = 4
    written = nib.load(str(save_segmentation(label, case.geometry, tmp_path / "p.nii")))
    np.testing.assert_array_equal(np.asarray(written.dataobj), label)  # no scaling applied on the way
    h = written.header
    assert written.get_data_dtype() == np.uint8 and h.get_slope_inter() in ((None, None), (1.0, 0.0))
    assert h.get_intent()[0] == "label" and (float(h["cal_min"]), float(h["cal_max"])) == (0.0, 4.0)
    assert h.get_xyzt_units() == ("mm", "sec") and int(h["qform_code"]) == 1 and int(h["sform_code"]) == 4
    np.testing.assert_allclose(h.get_zooms(), (0.9, 1.1, 3.0), rtol=1e-6)


def test_scaled_int16(tmp_path):
    """scl_slope / scl_inter are applied (and raw intensities are not normalised)."""
    folder = tmp_path / "scaled"
    images, label, aff = write_case(folder, ext=".nii", code="LPS")
    slope, inter = 0.25, -3.0
    for m in MODALITIES:
        path = folder / f"case_{m}.nii"
        # patch the header on disk: nibabel recomputes the scaling of arrays it saves
        with open(path, "r+b") as f:
            hdr = nib.Nifti1Header.from_fileobj(f)
            hdr["scl_slope"], hdr["scl_inter"] = slope, inter
            f.seek(0)
            f.write(hdr.binaryblock)
    assert nib.load(str(folder / "case_t1.nii")).dataobj.slope == slope
    case = load_case(folder)
    for k, m in enumerate(MODALITIES):
        np.testing.assert_allclose(case.image[k], images[m] * slope + inter, rtol=1e-6)


def test_four_d_trailing_one(tmp_path):
    images, label, _ = write_case(tmp_path / "c4", code="LAS", four_d=True)
    on_disk = nib.load(str(tmp_path / "c4" / "case_t1.nii.gz")).shape
    assert len(on_disk) == 4 and on_disk[3] == 1
    case = load_case(tmp_path / "c4")
    np.testing.assert_array_equal(case.image[3], images["flair"])
    np.testing.assert_array_equal(case.label, np.where(label == 3, 4, label))
    out = save_segmentation(case.label, case.geometry, tmp_path / "p.nii.gz")
    assert nib.load(str(out)).shape == nib.load(str(tmp_path / "c4" / "case_seg.nii.gz")).shape[:3]


def test_four_d_with_volumes_is_an_error(tmp_path):
    write_case(tmp_path / "c")
    bad = tmp_path / "c" / "case_t2.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(SHAPE + (2,), np.int16), _ras_affine()), str(bad))
    with pytest.raises(ValueError, match=r"case_t2\.nii\.gz.*\(20, 24, 28, 2\)"):
        load_case(tmp_path / "c")


def test_missing_modality(tmp_path):
    images, _, _ = write_case(tmp_path / "BraTS_007", name="BraTS_007", code="LPS", skip=("t1ce",))
    with pytest.raises(ValueError) as info:
        load_case(tmp_path / "BraTS_007")
    msg = str(info.value)
    assert "BraTS_007" in msg and "BraTS_007_t1ce" in msg and "allow_missing" in msg
    case = load_case(tmp_path / "BraTS_007", allow_missing=True)
    assert case.present.tolist() == [True, False, True, True]
    assert case.missing == ["t1ce"]
    assert not case.image[1].any()
    np.testing.assert_array_equal(case.image[2], images["t2"])
    assert load_case(tmp_path / "BraTS_007", allow_missing=True, load_label=False).label is None


def test_no_modality_at_all(tmp_path):
    write_case(tmp_path / "c", skip=MODALITIES)
    assert list(case_files(tmp_path / "c")) == ["seg"]
    with pytest.raises(ValueError, match="no modality file"):
        load_case(tmp_path / "c", allow_missing=True)


def test_no_seg_file(tmp_path):
    write_case(tmp_path / "c")
    (tmp_path / "c" / "case_seg.nii.gz").unlink()
    assert load_case(tmp_path / "c").label is None


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_corrupt_file_names_it(tmp_path, how):
    write_case(tmp_path / "c")
    path = tmp_path / "c" / "case_t2.nii.gz"
    blob = path.read_bytes()
    if how == "garbage":
        path.write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    elif how == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"case_t2\.nii\.gz"):
        load_case(tmp_path / "c")


def test_non_finite_values_name_the_file(tmp_path):
    write_case(tmp_path / "c", dtype=np.float32)
    data = np.ones(SHAPE, np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, _ras_affine()), str(tmp_path / "c" / "case_flair.nii.gz"))
    with pytest.raises(ValueError, match=r"case_flair\.nii\.gz.*non-finite"):
        load_case(tmp_path / "c")


def test_shape_mismatch(tmp_path):
    write_case(tmp_path / "c")
    nib.save(nib.Nifti1Image(np.ones((20, 24, 27), np.int16), _ras_affine()), str(tmp_path / "c" / "case_t1ce.nii.gz"))
    with pytest.raises(ValueError, match=r"case_t1ce\.nii\.gz.*shape \(20, 24, 27\).*case_t1\.nii\.gz"):
        load_case(tmp_path / "c")


def test_seg_shape_mismatch(tmp_path):
    write_case(tmp_path / "c")
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 29), np.uint8), _ras_affine()), str(tmp_path / "c" / "case_seg.nii.gz"))
    with pytest.raises(ValueError, match=r"case_seg\.nii\.gz"):
        load_case(tmp_path / "c")
    assert load_case(tmp_path / "c", load_label=False).label is None


@pytest.mark.parametrize("shift,ok", [(1e-5, True), (0.01, False), (2.0, False)])
def test_affine_mismatch(tmp_path, shift, ok):
    images, _, aff = write_case(tmp_path / "c")
    moved = aff.copy()
    moved[1, 3] += shift
    _save(images["t2"], moved, tmp_path / "c" / "case_t2.nii.gz")
    if ok:
        load_case(tmp_path / "c")
    else:
        with pytest.raises(ValueError, match=r"case_t2\.nii\.gz.*affine"):
            load_case(tmp_path / "c")


def test_flipped_affine_is_a_mismatch(tmp_path):
    """Same shape, same data, another orientation: not the same grid."""
    images, _, aff = write_case(tmp_path / "c", code="RAS")
    _save(images["t2"], aff, tmp_path / "c" / "case_t2.nii.gz", code="LAS")
    with pytest.raises(ValueError, match=r"case_t2\.nii\.gz"):
        load_case(tmp_path / "c")


def test_labels_three_and_four(tmp_path):
    write_case(tmp_path / "c")
    a, b = tmp_path / "three.nii.gz", tmp_path / "four.nii.gz"
    lab = np.zeros(SHAPE, np.uint8)
    lab[1, 2, 3], lab[4, 5, 6], lab[7, 8, 9] = 1, 2, 3
    nib.save(nib.Nifti1Image(lab, _ras_affine()), str(a))
    nib.save(nib.Nifti1Image(np.where(lab == 3, 4, lab).astype(np.uint8), _ras_affine()), str(b))
    geometry = load_case(tmp_path / "c").geometry
    np.testing.assert_array_equal(load_segmentation(a, geometry), load_segmentation(b, geometry))
    assert set(np.unique(load_segmentation(a)).tolist()) == {0, 1, 2, 4}
    lab[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(lab, _ras_affine()), str(a))
    with pytest.raises(ValueError, match=r"three\.nii\.gz.*\[5\]"):
        load_segmentation(a)


def test_float_labels(tmp_path):
    lab = np.zeros(SHAPE, np.float32)
    lab[2, 3, 4] = 3.0
    nib.save(nib.Nifti1Image(lab, _ras_affine()), str(tmp_path / "f.nii.gz"))
    assert load_segmentation(tmp_path / "f.nii.gz")[2, 3, 4] == 4
    lab[2, 3, 4] = 1.5
    nib.save(nib.Nifti1Image(lab, _ras_affine()), str(tmp_path / "f.nii.gz"))
    with pytest.raises(ValueError, match=r"f\.nii\.gz.*non-integer"):
        load_segmentation(tmp_path / "f.nii.gz")


def test_load_segmentation_checks_the_grid(tmp_path):
    _, label, aff = write_case(tmp_path / "c", code="LPS")
    geometry = load_case(tmp_path / "c").geometry
    other = tmp_path / "other.nii.gz"
    # the same voxels stored in another order (a tool that writes RAS+, or permutes axes) are on the grid
    for code in ("RAS", "SAR"):
        _save(label, aff, other, code=code, dtype=np.uint8)
        np.testing.assert_array_equal(load_segmentation(other, geometry), np.where(label == 3, 4, label))
    moved = aff.copy()
    moved[0, 3] += 0.5
    _save(label, moved, other, code="RAS", dtype=np.uint8)
    with pytest.raises(ValueError, match=r"other\.nii\.gz.*affine.*RAS\+ voxel order by up to 0\.5 mm"):
        load_segmentation(other, geometry)
    _save(np.zeros(SHAPE, np.uint8), _ras_affine(zooms=(1.0, 1.0, 1.1)), other, code="LPS", dtype=np.uint8)
    with pytest.raises(ValueError, match=r"other\.nii\.gz.*affine"):
        load_segmentation(other, geometry)
    load_segmentation(other)  # on its own it is a fine label file
    _save(np.zeros((20, 24, 30), np.uint8), _ras_affine(), other, code="LPS", dtype=np.uint8)
    with pytest.raises(ValueError, match=r"other\.nii\.gz.*shape"):
        load_segmentation(other, geometry)


def test_save_segmentation_errors_and_replacement(tmp_path, monkeypatch):
    write_case(tmp_path / "c", code="ASL")
    case = load_case(tmp_path / "c")
    target = tmp_path / "deep" / "er" / "p.nii.gz"
    with pytest.raises(ValueError, match="shape"):
        save_segmentation(case.label[:-1], case.geometry, target)
    with pytest.raises(ValueError, match=r"\.nii"):
        save_segmentation(case.label, case.geometry, tmp_path / "p.png")
    bad = case.label.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        save_segmentation(bad, case.geometry, target)
    assert not target.exists()

    save_segmentation(case.label, case.geometry, target)
    before = target.read_bytes()

    def broken_save(img, filename):  # dies half-way through writing
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_segmentation(np.zeros_like(case.label), case.geometry, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["p.nii.gz"]
    save_segmentation(np.zeros_like(case.label), case.geometry, target)  # replaces the old file
    assert not np.asarray(nib.load(str(target)).dataobj).any()


def test_geometry_pickles(tmp_path):
    write_case(tmp_path / "c", code="PIR")
    g = load_case(tmp_path / "c").geometry
    g2 = pickle.loads(pickle.dumps(g))
    assert isinstance(g2, Geometry)
    np.testing.assert_array_equal(g2.affine, g.affine)
    assert g2.shape == g.shape and g2.canonical_shape == g.canonical_shape == SHAPE
    assert g2.header.binaryblock == g.header.binaryblock


def test_find_cases(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_cases(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no cases"):
        find_cases(tmp_path / "empty")
    root = tmp_path / "root"
    write_case(root / "b_case", name="b_case")
    write_case(root / "batch" / "a_case", name="a_case", skip=("t1", "t2", "flair"))
    write_case(root / ".cache" / "z", name="z")  # hidden: a cache or a temporary folder
    (root / "other").mkdir()
    (root / "other" / "x_t1.txt").write_text("not nifti")
    assert find_cases(root) == [root / "b_case", root / "batch" / "a_case"]


def test_t1_does_not_match_t1ce(tmp_path):
    write_case(tmp_path / "c", skip=("t1", "t2", "flair"))
    files = case_files(tmp_path / "c")
    assert sorted(files) == ["seg", "t1ce"]
    case = load_case(tmp_path / "c", allow_missing=True)
    assert case.present.tolist() == [False, True, False, False]


def test_duplicate_files(tmp_path):
    write_case(tmp_path / "c")
    _save(_truth()[0]["t1"], _ras_affine(), tmp_path / "c" / "case_t1.nii")
    with pytest.raises(ValueError, match=r"case_t1\.nii and case_t1\.nii\.gz"):
        load_case(tmp_path / "c")


# -- failures while writing a segmentation name the destination and the cause -----------------------------


@pytest.fixture
def geometry(tmp_path):
    write_case(tmp_path / "c")
    return load_case(tmp_path / "c").geometry


def _failing_save(code):
    def save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(code, os.strerror(code), filename)  # as the OS names it: the temporary file

    return save


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_write_failure_names_the_destination(tmp_path, geometry, monkeypatch, code):
    from medmap_fast.data.atomic import WriteError

    monkeypatch.setattr(nib, "save", _failing_save(code))
    dest = tmp_path / "pred" / "c.nii.gz"
    with pytest.raises(WriteError) as e:
        save_segmentation(np.zeros(SHAPE, np.uint8), geometry, dest)
    assert str(e.value) == f"cannot write {dest}: {os.strerror(code)}"
    assert isinstance(e.value, OSError) and e.value.errno == code and e.value.filename == str(dest)
    assert isinstance(e.value.__cause__, OSError) and ".tmp" in e.value.__cause__.filename
    assert list((tmp_path / "pred").iterdir()) == []  # the half-written temporary is gone


def test_a_file_where_a_folder_should_be(tmp_path, geometry):
    (tmp_path / "pred").write_text("a file")
    for dest in (tmp_path / "pred" / "c.nii.gz", tmp_path / "pred" / "sub" / "c.nii.gz"):
        with pytest.raises(OSError) as e:
            save_segmentation(np.zeros(SHAPE, np.uint8), geometry, dest)
        assert str(e.value) == f"cannot write {dest}: {tmp_path / 'pred'} is a file, not a folder"
        assert e.value.__cause__ is not None
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(OSError, match=rf"^cannot write {tmp_path / 'dir.nii.gz'}: it is a folder$"):
        save_segmentation(np.zeros(SHAPE, np.uint8), geometry, tmp_path / "dir.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "dir.nii.gz", "pred"]
