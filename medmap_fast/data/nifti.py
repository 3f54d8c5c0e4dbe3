"""Reading BraTS-style cases from NIfTI files and writing segmentations back.

A case is a folder of NIfTI files named ``<anything>_t1``, ``_t1ce``, ``_t2``, ``_flair`` and ``_seg``
(``.nii`` or ``.nii.gz``). Inside the library every volume is in the closest canonical orientation, RAS+
(what ``nibabel.as_closest_canonical`` gives): axis 0 runs to the subject's Right, 1 to Anterior,
2 to Superior. ``Geometry`` remembers what the files looked like on disk, so that a segmentation
computed in canonical order is written back voxel for voxel in the original order.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from .atomic import atomic_write
from .labels import MODALITIES, canonical_labels
from .transforms import normalize

PathLike = Union[str, os.PathLike]

SEG = "seg"
ROLES: Tuple[str, ...] = MODALITIES + (SEG,)
# ``_t1ce`` must never be taken for ``_t1``: the suffix is matched whole, up to the extension.
_FILE_RE = re.compile(r"^(?P<stem>.*)_(?P<role>t1ce|t1|t2|flair|seg)\.nii(?:\.gz)?$", re.IGNORECASE)
AFFINE_TOL_MM = 1e-3


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a case's voxels sit on disk: enough to write a canonical array back in the original order.

    affine, header, shape: those of the reference file (the first modality present) as stored on disk;
    ornt: nibabel orientation (3, 2) that takes the on-disk voxel order to canonical RAS+;
    canonical_shape and canonical_affine: the same grid after reorientation.
    """

    affine: np.ndarray
    header: nib.Nifti1Header
    shape: Tuple[int, ...]
    ornt: np.ndarray
    canonical_shape: Tuple[int, int, int]
    canonical_affine: np.ndarray
    source: str = ""

    @property
    def axcodes(self) -> Tuple[str, str, str]:
        """On-disk orientation as nibabel axis codes, e.g. ('L', 'P', 'S')."""
        return tuple(nio.aff2axcodes(self.affine))

    @property
    def spacing(self) -> Tuple[float, float, float]:
        return voxel_sizes(self.canonical_affine)


@dataclasses.dataclass
class Case:
    """One case in canonical RAS+ order.

    image: float32 (4, X, Y, Z), modalities in ``MODALITIES`` order, raw intensities unless
    ``normalized`` (zeros where a modality is missing); present: bool (4,); label: uint8 (X, Y, Z) in
    {0, 1, 2, 4} or None; spacing: voxel size in mm along the canonical axes.
    """

    name: str
    image: np.ndarray
    present: np.ndarray
    label: Optional[np.ndarray]
    spacing: Tuple[float, float, float]
    geometry: Geometry
    normalized: bool = False

    @property
    def missing(self) -> List[str]:
        return [m for m, p in zip(MODALITIES, self.present) if not p]


def case_files(case_dir: PathLike) -> Dict[str, Path]:
    """The case's files by role ("t1", "t1ce", "t2", "flair", "seg"); only the roles found are keys."""
    case_dir = Path(case_dir)
    found: Dict[str, Path] = {}
    for entry in sorted(os.scandir(case_dir), key=lambda e: e.name):
        m = _FILE_RE.match(entry.name)
        if m is None or entry.name.startswith(".") or not entry.is_file():
            continue
        role = m.group("role").lower()
        if role in found:
            raise ValueError(
                f"case {case_dir.name}: two files for {role!r}: {found[role].name} and {entry.name}; keep one"
            )
        found[role] = Path(entry.path)
    return found


def modalities_on_disk(case_dir: PathLike) -> np.ndarray:
    """bool (4,) in ``MODALITIES`` order: which modality files the case folder holds (no file is read)."""
    files = case_files(case_dir)
    return np.array([m in files for m in MODALITIES], dtype=bool)


def find_cases(root: PathLike) -> List[Path]:
    """Sorted case folders at or under ``root``: folders holding at least one ``*_t1/_t1ce/_t2/_flair/_seg``
    ``.nii``/``.nii.gz`` file. Hidden folders (temporary or cache folders start with a dot) are skipped."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data root {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data root {root} is not a folder")
    cases, seen = [], set()
    # data sets are often assembled from symbolic links to case folders: follow them, once each
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(_FILE_RE.match(f) and not f.startswith(".") for f in filenames):
            cases.append(Path(dirpath))
    if not cases:
        raise FileNotFoundError(
            f"no cases under {root}: expected folders holding files named like <case>_t1.nii.gz, _t1ce, _t2, "
            "_flair (and _seg for labels), .nii or .nii.gz"
        )
    return sorted(cases)


def voxel_sizes(affine: np.ndarray) -> Tuple[float, float, float]:
    """Voxel size in mm along each voxel axis of ``affine`` (the lengths of its columns)."""
    return tuple(float(v) for v in nib.affines.voxel_sizes(np.asarray(affine, dtype=np.float64)))


def _read(path: Path, what: str):
    """(image, spatial shape) of a NIfTI file, its header read and its shape checked; errors name the file."""
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for truncated or foreign files
        raise ValueError(f"cannot read {what} file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{what} file {path} is not NIfTI (got {type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    # A trailing axis of length 1 (X, Y, Z, 1) is a 3-D volume stored as 4-D; anything else is not one volume.
    spatial = shape[:3] if len(shape) >= 3 and all(s == 1 for s in shape[3:]) else None
    if spatial is None or len(shape) < 3:
        raise ValueError(f"{what} file {path} has shape {shape}: expected a 3-D volume (X, Y, Z) or (X, Y, Z, 1)")
    if min(spatial) < 1:
        raise ValueError(f"{what} file {path} has an empty shape {shape}")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise ValueError(f"{what} file {path} has a degenerate affine:\n{img.affine}")
    return img, spatial


def _data(img, spatial, path: Path, what: str, dtype=np.float32) -> np.ndarray:
    try:
        # get_fdata applies scl_slope/scl_inter; 'unchanged' keeps nibabel from holding a second copy
        data = img.get_fdata(dtype=dtype, caching="unchanged") if dtype is not None else np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip stream, short file, ...
        raise ValueError(f"cannot read the data of {what} file {path}: {type(e).__name__}: {e}") from e
    data = np.asarray(data).reshape(spatial)
    # integers (scaled by a finite slope) cannot be NaN: only float files need the scan
    if img.get_data_dtype().kind == "f" and not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise ValueError(f"{what} file {path} holds {bad} non-finite values (NaN or inf)")
    return data


def _to_canonical(data: np.ndarray, ornt: np.ndarray, contiguous: bool = True) -> np.ndarray:
    if np.array_equal(ornt, nio.axcodes2ornt("RAS")):
        return data
    view = nio.apply_orientation(data, ornt)
    return np.ascontiguousarray(view) if contiguous else view


def load_case(case_dir: PathLike, allow_missing: bool = False, load_label: bool = True,
              normalized: bool = False) -> Case:
    """Load one case folder as a ``Case`` in canonical RAS+ order (scaling applied).

    A missing modality file is an error unless ``allow_missing`` (then its channel is zeros and
    ``present`` False). Every modality file must share the reference file's shape and affine (to
    1e-3 mm); the seg file its voxel grid, in any voxel order (see ``load_segmentation``).
    normalized: z-score each modality inside its brain (see ``normalize``), as networks take it;
    otherwise the intensities are those on disk.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise FileNotFoundError(f"case folder {case_dir} does not exist")
    files = case_files(case_dir)
    missing = [m for m in MODALITIES if m not in files]
    if len(missing) == len(MODALITIES):
        raise ValueError(
            f"case {case_dir.name}: no modality file found in {case_dir} (expected <case>_t1, _t1ce, _t2, _flair "
            ".nii or .nii.gz)"
        )
    if missing and not allow_missing:
        stem = _FILE_RE.match(next(iter(files.values())).name).group("stem")
        names = ", ".join(f"{stem}_{m}.nii.gz" for m in missing)
        raise ValueError(
            f"case {case_dir.name}: missing modality file(s) {names} in {case_dir}; "
            "pass allow_missing=True to load the case with those modalities masked"
        )
    geometry: Optional[Geometry] = None
    image: Optional[np.ndarray] = None
    present = np.zeros(len(MODALITIES), dtype=bool)
    for k, m in enumerate(MODALITIES):
        if m not in files:
            continue
        path = files[m]
        img, spatial = _read(path, m)
        if geometry is None:
            geometry = _geometry(img, spatial, path)
            image = np.zeros((len(MODALITIES),) + geometry.canonical_shape, dtype=np.float32)
        else:
            _on_grid(img, spatial, path, geometry)
        image[k] = _to_canonical(_data(img, spatial, path, m), geometry.ornt, contiguous=False)  # copied here
        present[k] = True
    label = None
    if load_label and SEG in files:
        label = load_segmentation(files[SEG], geometry)
    if normalized:
        image = normalize(image, present)
    return Case(name=case_dir.name, image=image, present=present, label=label, spacing=geometry.spacing,
                geometry=geometry, normalized=normalized)


def _canonical_grid(affine: np.ndarray, spatial) -> Tuple[np.ndarray, np.ndarray, Tuple[int, int, int]]:
    """(orientation to RAS+, affine and shape in RAS+ voxel order) of a grid."""
    ornt = nio.io_orientation(affine)
    canonical_shape = tuple(int(spatial[int(ax)]) for ax in np.argsort(ornt[:, 0]))
    return ornt, affine @ nio.inv_ornt_aff(ornt, spatial), canonical_shape


def _geometry(img, spatial, path: Path) -> Geometry:
    affine = np.array(img.affine, dtype=np.float64)
    ornt, canonical_affine, canonical_shape = _canonical_grid(affine, spatial)
    return Geometry(affine=affine, header=img.header.copy(), shape=tuple(spatial), ornt=ornt,
                    canonical_shape=canonical_shape, canonical_affine=canonical_affine, source=str(path))


def _on_grid(img, spatial, path: Path, geometry: Geometry, any_order: bool = False) -> np.ndarray:
    """The orientation that takes a file on the case's voxel grid to RAS+; an error naming it otherwise.

    any_order: the file may hold the same voxels in another order (flipped or permuted axes).
    """
    affine = np.asarray(img.affine, dtype=np.float64)
    if tuple(spatial) == geometry.shape and np.allclose(affine, geometry.affine, rtol=0, atol=AFFINE_TOL_MM):
        # the case's own reorientation: for an oblique affine a hair away, io_orientation could round otherwise
        return geometry.ornt
    ref = Path(geometry.source).name
    if any_order:
        ornt, mine, shape = _canonical_grid(affine, spatial)
        theirs, their_shape, order = geometry.canonical_affine, geometry.canonical_shape, " in RAS+ voxel order"
    else:
        ornt, mine, shape = None, affine, tuple(spatial)
        theirs, their_shape, order = geometry.affine, geometry.shape, ""
    if shape != tuple(their_shape):
        raise ValueError(
            f"{path} has shape {tuple(spatial)} but {ref} has {geometry.shape}"
            + (f" ({shape} and {tuple(their_shape)}{order})" if any_order else "")
            + ": every file of a case must share one voxel grid"
        )
    diff = float(np.abs(mine - theirs).max())
    if diff > AFFINE_TOL_MM:
        raise ValueError(
            f"{path} has an affine that differs from that of {ref}{order} by up to {diff:.4g} mm "
            f"(tolerance {AFFINE_TOL_MM} mm): every file of a case must share one voxel grid\n"
            f"{path.name}:\n{affine}\n{ref}:\n{geometry.affine}"
        )
    return ornt


def load_segmentation(path: PathLike, geometry: Optional[Geometry] = None) -> np.ndarray:
    """A label file as uint8 in {0, 1, 2, 4} (3 read as 4), canonical RAS+ order.

    With ``geometry`` (a case's), the file must lie on that case's voxel grid (affine to 1e-3 mm), in the
    case's voxel order or any other: a tool may have written its prediction in RAS+, say.
    """
    path = Path(path)
    img, spatial = _read(path, "segmentation")
    if geometry is not None:
        ornt = _on_grid(img, spatial, path, geometry, any_order=True)
    else:
        ornt = nio.io_orientation(img.affine)
    raw = _data(img, spatial, path, "segmentation", dtype=None)
    return _to_canonical(canonical_labels(raw, source=str(path)), ornt)


def from_canonical(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Undo the canonical reorientation: a canonical (X, Y, Z) array in the case's on-disk voxel order."""
    to_disk = nio.ornt_transform(nio.axcodes2ornt("RAS"), geometry.ornt)
    return np.ascontiguousarray(nio.apply_orientation(array, to_disk))


def save_segmentation(seg: np.ndarray, geometry: Geometry, path: PathLike) -> Path:
    """Write canonical labels (X, Y, Z) in {0, 1, 2, 4} to ``path`` (.nii or .nii.gz) in the case's original
    orientation, affine and header, as uint8 without scaling. The file appears whole or not at all.

    Missing folders on the way are made. A failure to write (full disk, read-only file system, no
    permission, a file where a folder should be) raises :class:`~medmap_fast.data.atomic.WriteError`, an
    OSError whose message names ``path`` and the cause, with the underlying error as ``__cause__``.
    """
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"save_segmentation: {path} must end in .nii or .nii.gz")
    seg = np.asarray(seg)
    if seg.shape != tuple(geometry.canonical_shape):
        raise ValueError(
            f"save_segmentation: seg has shape {seg.shape} but the case's canonical shape is "
            f"{tuple(geometry.canonical_shape)}"
        )
    if seg.dtype.kind not in "iuf":
        raise TypeError(f"save_segmentation: seg must hold integer labels {{0, 1, 2, 4}}, got dtype {seg.dtype}")
    labels = canonical_labels(seg, source="save_segmentation: seg")
    disk = from_canonical(labels, geometry)
    header = geometry.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(disk.shape)
    header.set_slope_inter(1.0, 0.0)
    # the reference is an image: what its header says about intensities (display range, a statistic's
    # intent) would misdescribe a label map
    header["cal_min"], header["cal_max"] = 0, 4
    header.set_intent("label")
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(disk, geometry.affine, header=header)
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)), suffix=ext)

