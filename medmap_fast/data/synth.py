"""Synthetic BraTS-like data: four MRI contrasts and a tumour segmentation per case, as NIfTI files.

The data are SYNTHETIC, for tests, demos and benchmarks: no patient data is involved and no model
trained on them means anything clinically. The anatomy comes from the ICBM152 2009a nonlinear
symmetric template (grey- and white-matter probability maps, shipped inside nilearn; read with nibabel,
nothing is downloaded), or, without nilearn, from a geometric phantom: an ellipsoidal head with a
folded grey-matter cortex, white matter, deep grey matter and CSF (the layer under the skull, sulci,
ventricles).

Each case: the anatomy under a random rotation, scaling and shift; tissue contrasts per modality
(T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF dark, GM > WM; T1ce: as T1); one tumour made of
an irregular enhancing rim (label 4, bright on T1ce) round a necrotic core (label 1, dark on T1 and
T1ce, bright-ish on T2) inside oedema (label 2, bright on T2 and FLAIR) that spreads along white
matter; a smooth multiplicative bias field and Rician noise per modality; skull-stripped (0 outside
the brain), int16 like BraTS, in a random on-disk orientation for some cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from .atomic import (OutputPathError, atomic_dir, atomic_write_text, check_output_dir, is_temporary,
                     remove_stale_temporaries, write_error)
from .labels import MODALITIES
from .nifti import voxel_sizes

GENERATOR_VERSION = "1.0"
PREFIX = "SynthBraTS"
DEFAULT_SHAPE = (96, 96, 96)
FIELD_OF_VIEW_MM = 200.0  # the longest template brain axis is 180 mm; room for the random scaling and shift
ANATOMIES = ("auto", "template", "geometric")
TEMPLATE_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}

# Relative signal of each tissue per modality (white matter on T1 = 1). Columns: CSF, GM, WM, then the
# tumour compartments NCR (label 1), ED (label 2), ET (label 4).
TISSUES = ("csf", "gm", "wm", "ncr", "ed", "et")
CONTRAST = {
    "t1":    (0.30, 0.68, 1.00, 0.35, 0.60, 0.72),
    "t1ce":  (0.32, 0.70, 1.00, 0.30, 0.62, 1.65),
    "t2":    (1.00, 0.66, 0.45, 0.85, 0.92, 0.70),
    "flair": (0.15, 0.74, 0.54, 0.50, 1.00, 0.80),
}
_NO_TEMPLATE = ("anatomy='template' needs the ICBM152 2009a maps shipped with nilearn: pip install nilearn "
                "(or medmap_fast[anatomy]), or use anatomy='geometric'")
# On-disk orientations for orientation="mixed": mostly BraTS's own (LPS) and RAS, some others so that
# readers meet flipped and permuted axes.
MIXED_ORIENTATIONS = (("LPS", 0.4), ("RAS", 0.3), ("LAS", 0.1), ("RPI", 0.1), ("ASL", 0.1))


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """Tissue probability maps (CSF, GM, WM) on a grid with a voxel -> RAS mm affine."""

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray
    center: np.ndarray  # the brain's centre of mass, mm
    source: str


@dataclasses.dataclass
class SynthCase:
    """One synthetic case in canonical RAS+ order, before it is written.

    images: float32 (X, Y, Z) per modality (as written, before rounding to int16); label: uint8 {0, 1, 2, 4};
    tissue: uint8 0 background, 1 CSF, 2 GM, 3 WM (where that tissue makes at least 60% of the voxel's healthy
    tissue), 4 mixed;
    affine: voxel -> mm.
    """

    images: Dict[str, np.ndarray]
    label: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> Tuple[float, float, float]:
        return voxel_sizes(self.affine)


# -- anatomy -----------------------------------------------------------------------------------------------


def template_dir() -> Optional[Path]:
    """The folder of nilearn's bundled ICBM152 maps, or None when nilearn (or a map) is absent."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "datasets" / "data"
        if all((d / f).is_file() for f in TEMPLATE_FILES.values()):
            return d
    return None


def _nilearn_version() -> str:
    d = template_dir()
    if d is None:
        return "absent"
    try:
        from importlib.metadata import version

        return version("nilearn")
    except Exception:
        return "unknown"


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    s = [n // f * f for n in a.shape]
    a = a[: s[0], : s[1], : s[2]]
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5), dtype=np.float32)


def _block_affine(affine: np.ndarray, f: int) -> np.ndarray:
    # voxel i of the coarse grid averages fine voxels f*i .. f*i+f-1, centred on f*i + (f-1)/2
    scale = np.diag([f, f, f, 1.0])
    scale[:3, 3] = (f - 1) / 2
    return affine @ scale


@functools.lru_cache(maxsize=4)
def template_anatomy(factor: int = 1) -> Anatomy:
    """ICBM152 2009a tissue maps from nilearn's data folder, block-averaged by ``factor`` (1, 2 or 4)."""
    d = template_dir()
    if d is None:
        raise RuntimeError(_NO_TEMPLATE)
    imgs = {k: nib.load(str(d / f)) for k, f in TEMPLATE_FILES.items()}
    affine = np.array(imgs["t1"].affine, dtype=np.float64)
    t1 = np.asarray(imgs["t1"].dataobj)
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0
    # The T1 is brain-extracted; grey matter reaching a voxel past its mask still counts as brain.
    brain = ((t1 > 0) | (gm + wm > 0.5)).astype(np.float32)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    gm, wm = gm * brain, wm * brain
    out = [_block_mean(a, factor) for a in (csf, gm, wm)]
    aff = _block_affine(affine, factor)
    return Anatomy(*out, affine=aff, center=_center(out, aff),
                   source=f"ICBM152 2009a nonlinear symmetric template (nilearn {_nilearn_version()})")


def _center(maps, affine) -> np.ndarray:
    total = maps[0] + maps[1] + maps[2]
    idx = np.array(ndimage.center_of_mass(total > 0.5))
    return (affine @ np.append(idx, 1.0))[:3]


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], cell: float) -> np.ndarray:
    """Smooth random field of unit std over ``shape`` with features about ``cell`` voxels across."""
    coarse = tuple(max(2, int(np.ceil(s / cell))) + 3 for s in shape)
    g = rng.standard_normal(coarse).astype(np.float32)
    # fine voxels 0 .. s-1 span coarse nodes 1 .. c-2: the end nodes only shape the spline at the borders
    step = np.array([(c - 3) / max(s - 1, 1) for c, s in zip(coarse, shape)])
    out = ndimage.affine_transform(g, step, offset=1.0, output_shape=tuple(shape), order=3, mode="nearest")
    out -= out.mean()
    sd = out.std()
    return out / sd if sd > 0 else out


@functools.lru_cache(maxsize=4)
def geometric_anatomy(factor: int = 1) -> Anatomy:
    """A geometric phantom brain on a (1.5 * factor) mm grid: ellipsoidal, skull-stripped, with a CSF layer
    under the skull, a folded GM cortex, WM inside, lateral ventricles, deep GM and a midline fissure."""
    h = 1.5 * factor
    n = [int(round(v / h)) for v in (160.0, 196.0, 150.0)]
    rng = np.random.default_rng(20091)  # one fixed phantom: the variety comes from the per-case transforms
    x, y, z = (((np.arange(k) - (k - 1) / 2) * h).astype(np.float32) for k in n)
    X, Y, Z = x[:, None, None], y[None, :, None], z[None, None, :]
    r = np.sqrt((X / 68.0) ** 2 + (Y / 86.0) ** 2 + (Z / 62.0) ** 2)
    folds = _smooth_noise(rng, n, 10.0 / h)
    r = r * (1 + 0.025 * folds)
    cls = np.zeros(n, dtype=np.uint8)  # 0 out, 1 CSF, 2 GM, 3 WM
    cls[r < 1.0] = 1
    cls[r < 0.955] = 2
    cls[r < 0.80] = 3
    # sulci: CSF clefts cutting into the cortex where a second field is high
    sulci = _smooth_noise(rng, n, 6.0 / h)
    cls[(cls == 2) & (sulci > 0.9)] = 1
    cls[(np.abs(X) < 1.5 * max(h, 1.0)) & (r < 1.0) & (r > 0.6) & (Z > -10)] = 1  # interhemispheric fissure
    for sx in (-12.0, 12.0):  # thalami / basal ganglia: deep grey matter
        cls[((X - sx) / 10) ** 2 + ((Y + 6) / 15) ** 2 + ((Z - 2) / 10) ** 2 < 1] = 2
    for sx in (-9.0, 9.0):  # lateral ventricles
        cls[((X - sx) / 6.5) ** 2 + ((Y - 4) / 24) ** 2 + ((Z - 10) / 8) ** 2 < 1] = 1
    maps = [ndimage.gaussian_filter((cls == c).astype(np.float32), 0.8 / h) for c in (1, 2, 3)]
    affine = np.diag([h, h, h, 1.0])
    affine[:3, 3] = [x[0], y[0], z[0]]
    return Anatomy(*maps, affine=affine, center=_center(maps, affine), source="geometric phantom")


def resolve_anatomy(anatomy: str, spacing: float = 2.0) -> Anatomy:
    """The anatomy for ``anatomy`` ('auto' takes the template when nilearn is there), at a resolution
    matching ``spacing`` mm (coarser source maps for coarser output: cheaper, and no aliasing)."""
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}")
    if anatomy == "auto":
        anatomy = "template" if template_dir() is not None else "geometric"
    if anatomy == "template":
        if template_dir() is None:  # checked here too: template_anatomy's results are cached
            raise RuntimeError(_NO_TEMPLATE)
        factor = 4 if spacing >= 4 else (2 if spacing >= 2 else 1)
        return template_anatomy(factor)
    factor = 2 if spacing >= 3 else 1
    return geometric_anatomy(factor)


# -- one case ----------------------------------------------------------------------------------------------


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _case_grid(rng, shape, spacing, anatomy: Anatomy):
    """Output voxel -> mm affine (axis-aligned, RAS) and the output voxel -> anatomy voxel matrix."""
    sp = np.full(3, float(spacing))
    if rng.random() < 0.3:  # thick slices, as in many clinical acquisitions
        sp[2] *= rng.uniform(1.2, 1.6)
    sp *= rng.uniform(0.96, 1.04, 3)
    sp = np.round(sp, 3)
    out_affine = np.diag(np.append(sp, 1.0))
    centre_vox = (np.array(shape) - 1) / 2
    out_affine[:3, 3] = -sp * centre_vox + rng.uniform(-4, 4, 3)
    # world_out -> world_anatomy: rotate and scale about the brain centre, shift
    a = _rotation(rng, 8.0) * rng.uniform(0.92, 1.05) * rng.uniform(0.97, 1.03, 3)[None, :]
    t = anatomy.center + rng.uniform(-6, 6, 3)
    world = np.eye(4)
    world[:3, :3] = a
    world[:3, 3] = t
    to_anatomy = np.linalg.inv(anatomy.affine) @ world @ out_affine
    return out_affine, to_anatomy


def _resample(vol: np.ndarray, matrix: np.ndarray, shape) -> np.ndarray:
    return ndimage.affine_transform(vol, matrix[:3, :3], offset=matrix[:3, 3], output_shape=tuple(shape),
                                    order=1, mode="constant", cval=0.0).astype(np.float32)


def _tumour(rng, brain: np.ndarray, wm: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Label map (0, 1, 2, 4) of one irregular tumour inside ``brain``; every label present."""
    shape = brain.shape
    vox = float(spacing.max())
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    fov = float(min(s * h for s, h in zip(shape, spacing)))
    for _ in range(30):
        # sizes in mm, then kept large enough in voxels for every compartment to show at coarse spacing
        r_wt = rng.uniform(16.0, 34.0) * min(1.0, fov / 180.0)
        r_tc = max(r_wt * rng.uniform(0.45, 0.7), 3.2 * vox)
        r_nc = max(r_tc * rng.uniform(0.35, 0.65), 1.6 * vox)
        r_tc = max(r_tc, r_nc + 1.6 * vox)
        r_wt = max(r_wt, r_tc + 2.2 * vox)
        ok = (depth > 0.6 * r_tc) & (wm > 0.3)
        if not ok.any():
            ok = depth >= np.percentile(depth[brain], 95)
        cands = np.argwhere(ok)
        c = cands[int(rng.integers(len(cands)))] * spacing
        # bounding box around the tumour only: the fields below cost per voxel
        lo = np.maximum(((c - 1.6 * r_wt) / spacing).astype(int), 0)
        hi = np.minimum(((c + 1.6 * r_wt) / spacing).astype(int) + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        bshape = tuple(hi - lo)
        grids = np.meshgrid(*[(np.arange(a, b) * h - cc).astype(np.float32)
                              for a, b, h, cc in zip(lo, hi, spacing, c)], indexing="ij")
        rot = _rotation(rng, 90.0)
        axes = rng.uniform(0.75, 1.3, 3)
        axes /= np.cbrt(axes.prod())
        q = [sum(rot[i, j] * grids[j] for j in range(3)) / axes[i] for i in range(3)]
        rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
        cell = max(2.0, 0.5 * r_tc / vox)
        core_noise = _smooth_noise(rng, bshape, cell)
        ed_noise = _smooth_noise(rng, bshape, max(2.0, 0.6 * r_wt / vox))
        amp_core, amp_ed = rng.uniform(0.12, 0.25), rng.uniform(0.15, 0.3)
        rho_core = rho * (1 + amp_core * core_noise)
        b = brain[box]
        core = (rho_core < r_tc) & b
        # the necrotic core is enclosed by enhancing tissue, even where the tumour meets the brain's edge
        nec = (rho_core < r_nc) & ndimage.binary_erosion(core)
        # oedema reaches further along white matter than into grey matter
        wt = ((rho * (1 + amp_ed * ed_noise) < r_wt * (0.8 + 0.35 * wm[box])) & b) | core
        # oedema surrounds the tumour: drop islands that the noise left apart from it
        parts, _ = ndimage.label(wt)
        wt = np.isin(parts, np.unique(parts[core]))
        lab = np.zeros(bshape, dtype=np.uint8)
        lab[wt] = 2
        lab[core] = 4
        lab[nec] = 1
        counts = [int(np.count_nonzero(lab == v)) for v in (1, 2, 4)]
        if min(counts) >= 4:
            out = np.zeros(shape, dtype=np.uint8)
            out[box] = lab
            return out
    raise RuntimeError("could not place a tumour with all three compartments; use a larger shape")


def synth_case(rng: np.random.Generator, anatomy: Anatomy, shape: Sequence[int] = DEFAULT_SHAPE,
               spacing: Optional[float] = None) -> SynthCase:
    """One synthetic case from ``rng`` in canonical RAS+ order (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    spacing = FIELD_OF_VIEW_MM / max(shape) if spacing is None else float(spacing)
    out_affine, to_anatomy = _case_grid(rng, shape, spacing, anatomy)
    sp = np.sqrt((out_affine[:3, :3] ** 2).sum(axis=0))
    csf, gm, wm = (_resample(m, to_anatomy, shape) for m in (anatomy.csf, anatomy.gm, anatomy.wm))
    total = csf + gm + wm
    brain = total > 0.5
    # fractions of the healthy tissue in each brain voxel (partial volume at the edges kept inside)
    inv = np.where(brain, 1.0 / np.maximum(total, 1e-6), 0.0).astype(np.float32)
    frac = {"csf": csf * inv, "gm": gm * inv, "wm": wm * inv}
    tissue = np.zeros(shape, dtype=np.uint8)
    fractions = np.stack([frac["csf"], frac["gm"], frac["wm"]])[:, brain]
    # only voxels mostly of one tissue get a class: coarse voxels mix tissues at every border
    tissue[brain] = np.where(fractions.max(axis=0) >= 0.6, 1 + np.argmax(fractions, axis=0), 4).astype(np.uint8)

    label = _tumour(rng, brain, frac["wm"], sp)
    # soft tumour compartments: partial volume at their borders, as in real images
    soft = {k: np.clip(ndimage.gaussian_filter((label == v).astype(np.float32), 0.6), 0, 1) * brain
            for k, v in (("ncr", 1), ("ed", 2), ("et", 4))}
    tumour = np.clip(soft["ncr"] + soft["ed"] + soft["et"], 0, 1)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0)
    texture /= max(float(texture.std()), 1e-6)
    # heterogeneous lesions; the field is made over the tumour's bounding box only (it costs per voxel)
    lesion_texture = np.zeros(shape, dtype=np.float32)
    nz = np.argwhere(tumour > 0)
    lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    lesion_texture[box] = _smooth_noise(rng, tuple(hi - lo), 3.0)

    # a smooth multiplicative field: a random quadratic polynomial in the normalised coordinates, exp'd
    coords = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    images = {}
    for m in MODALITIES:
        c = dict(zip(TISSUES, np.array(CONTRAST[m]) * rng.uniform(0.96, 1.04, len(TISSUES))))
        healthy = frac["csf"] * c["csf"] + frac["gm"] * c["gm"] + frac["wm"] * c["wm"]
        lesion = soft["ncr"] * c["ncr"] + soft["ed"] * c["ed"] + soft["et"] * c["et"]
        lesion = lesion * (1 + 0.10 * lesion_texture)
        img = ((1 - tumour) * healthy * (1 + 0.03 * texture) + lesion).astype(np.float32)
        p = rng.normal(0, 0.12, 9)
        x, y, z = coords
        bias = np.exp(p[0] * x + p[1] * y + p[2] * z + p[3] * x * y + p[4] * y * z + p[5] * x * z
                      + p[6] * (x * x - 1 / 3) + p[7] * (y * y - 1 / 3) + p[8] * (z * z - 1 / 3))
        gain = rng.uniform(400.0, 1200.0)
        img = img * bias * gain
        sigma = rng.uniform(0.01, 0.03) * gain
        n1 = rng.normal(0, sigma, shape).astype(np.float32)
        n2 = rng.normal(0, sigma, shape).astype(np.float32)
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # Rician: the magnitude of complex Gaussian noise
        # skull-stripped like BraTS: exactly 0 outside the brain, at least 1 inside once rounded
        img = np.where(brain, np.maximum(img, 1.0), 0.0).astype(np.float32)
        images[m] = img
    return SynthCase(images=images, label=label, tissue=tissue, affine=out_affine)


# -- writing -----------------------------------------------------------------------------------------------


def _pick_orientation(rng: np.random.Generator, orientation: str) -> str:
    if orientation == "mixed":
        codes, weights = zip(*MIXED_ORIENTATIONS)
        return codes[int(rng.choice(len(codes), p=np.array(weights) / sum(weights)))]
    return orientation


def _check_orientation(orientation: str) -> str:
    if orientation == "mixed":
        return orientation
    code = str(orientation).upper()
    try:
        ornt = nio.axcodes2ornt(tuple(code))
    except Exception:
        ornt = None
    if len(code) != 3 or ornt is None or np.isnan(ornt).any() or len(set(ornt[:, 0])) != 3:
        raise ValueError(f"orientation must be 'mixed' or 3 axis codes such as 'LPS' or 'RAS', got {orientation!r}")
    return code


def _write_volume(data: np.ndarray, affine: np.ndarray, code: str, path: Path, dtype) -> None:
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img = img.as_reoriented(nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(code))))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_data_dtype(dtype)
    nib.save(img, str(path))


def write_synthetic_dataset(
    out: Union[str, os.PathLike],
    cases: int,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    anatomy: str = "auto",
    missing_prob: float = 0.0,
    spacing: Optional[float] = None,
    orientation: str = "mixed",
    overwrite: bool = False,
    first_index: int = 1,
    verbose: bool = False,
) -> List[Path]:
    """Write ``cases`` synthetic cases under ``out`` (BraTS layout) and ``out/dataset.json``; returns the
    case folders.

    shape: voxels per case; spacing: mm (default: a 200 mm field of view over the longest side), jittered
    per case, some cases with thicker slices. anatomy: 'template' (ICBM152 from nilearn), 'geometric',
    or 'auto'. missing_prob: probability that a case lacks one modality file. orientation: 'mixed'
    (LPS, RAS and some odd ones, drawn per case) or axis codes such as 'LPS' for every case.
    Case i depends only on (seed, i): the same seed gives the same files.

    The data set is written whole into a hidden temporary folder beside ``out``, which then takes the
    place of ``out``: a reader sees the old data set or the new one, never a mix, and a run that is
    killed leaves the old one (or no ``out``) as it was; the next run removes its hidden leftovers. So
    ``out`` must be new, empty, or hold an earlier synthetic data set (and then ``overwrite``) and
    nothing else: an ``OutputPathError`` otherwise, raised before anything is generated, as it is for
    a path that cannot be a writable folder.
    """
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < 1:
        raise ValueError(f"cases must be a positive int, got {cases!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 ints, each at least 16, got {shape}")
    if not 0.0 <= float(missing_prob) <= 1.0:
        raise ValueError(f"missing_prob must be in [0, 1], got {missing_prob}")
    if spacing is not None and not float(spacing) > 0:
        raise ValueError(f"spacing must be positive (mm), got {spacing}")
    orientation = _check_orientation(orientation)
    target = check_out(out, overwrite)
    names = [f"{PREFIX}_{first_index + i:05d}" for i in range(cases)]
    spacing_mm = FIELD_OF_VIEW_MM / max(shape) if spacing is None else float(spacing)
    anat = resolve_anatomy(anatomy, spacing_mm)
    t0 = time.perf_counter()
    with atomic_dir(target, replace=True) as tmp:
        records = _write_cases(tmp, Path(out), names, seed, first_index, anat, shape, spacing_mm, orientation,
                               missing_prob, verbose)
        meta = _metadata(records, seed, anat, anatomy, shape, spacing_mm, missing_prob, orientation)
        try:
            atomic_write_text(tmp / "dataset.json", json.dumps(meta, indent=2) + "\n")
        except OSError as e:
            raise write_error(Path(out) / "dataset.json", e) from (e.__cause__ or e)
    if verbose:
        print(f"wrote {cases} cases to {out} in {time.perf_counter() - t0:.1f} s ({anat.source})")
    return [Path(out) / name for name in names]


def check_out(out, overwrite: bool = False, argument: str = "out") -> Path:
    """The folder that a data set for ``out`` is written to (``out`` itself, or what the link ``out``
    points to), after the checks that :func:`write_synthetic_dataset` describes; the leftovers of an
    interrupted run are removed first. argument: how the caller names ``out`` (``"OUT"`` on the command
    line), for the messages."""
    check_output_dir(out, argument, replaced=True)
    # the data set replaces the folder itself: a link to a folder keeps pointing at it
    target = Path(os.path.realpath(out))
    remove_stale_temporaries(target.parent, target.name)
    if not target.exists():
        return target
    if os.path.ismount(target):
        raise OutputPathError(
            f"{argument} {str(out)!r}: is a mount point, which cannot be replaced by a new folder; "
            f"expected a folder inside it, such as {Path(out) / 'synth'}"
        )
    entries = [e for e in os.listdir(target) if not is_temporary(e)]
    ours = [e for e in entries if e == "dataset.json" or (e.startswith(PREFIX + "_") and (target / e).is_dir())]
    foreign = sorted(set(entries) - set(ours))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputPathError(
            f"{argument} {str(out)!r}: holds {shown}, not written by synth; the data set replaces the whole "
            "folder, so expected a new or empty folder or an earlier synthetic data set: choose another folder"
        )
    if ours and not overwrite:
        cases = sum(e != "dataset.json" for e in ours)
        raise FileExistsError(
            f"{out} already holds a synthetic data set ({cases} {PREFIX}_* folders); "
            "pass overwrite=True (--overwrite) to replace it"
        )
    return target


def _write_cases(folder: Path, out: Path, names, seed, first_index, anat, shape, spacing_mm, orientation,
                 missing_prob, verbose) -> List[dict]:
    """Generate and write the cases into ``folder``; returns their records for dataset.json. Errors name
    the files' places in ``out``."""
    records = []
    for i, name in enumerate(names):
        rng = np.random.default_rng([int(seed), first_index + i])
        # a stream of its own, so that missing_prob changes which files exist and nothing else
        rng_missing = np.random.default_rng([int(seed), first_index + i, 1])
        case = synth_case(rng, anat, shape, spacing_mm)
        code = _pick_orientation(rng, orientation)
        missing = []
        if rng_missing.random() < missing_prob:
            missing = [MODALITIES[int(rng_missing.integers(len(MODALITIES)))]]
        _write_case(folder, out, name, case, code, missing)
        vox_ml = float(np.prod(case.spacing)) / 1000.0
        records.append(dict(name=name, orientation=code, spacing_mm=[round(v, 3) for v in case.spacing],
                            shape=list(shape), missing=missing,
                            volume_ml={k: round(float(np.count_nonzero(case.label == v)) * vox_ml, 2)
                                       for k, v in (("NCR", 1), ("ED", 2), ("ET", 4))}))
        if verbose:
            print(f"{name}: {code}, spacing {tuple(round(v, 2) for v in case.spacing)} mm"
                  + (f", missing {', '.join(missing)}" if missing else ""), flush=True)
    return records


def _metadata(records, seed, anat, anatomy, shape, spacing_mm, missing_prob, orientation) -> dict:
    return dict(
        name=PREFIX,
        description=("SYNTHETIC BraTS-like MRI data for tests, demos and benchmarks: not patient data, no "
                     "clinical meaning. Made by medmap_fast.data.synth."),
        synthetic=True,
        generator="medmap_fast.data.synth",
        generator_version=GENERATOR_VERSION,
        seed=int(seed),
        anatomy=anat.source,
        anatomy_option=anatomy,
        shape=list(shape),
        spacing_mm=round(spacing_mm, 3),
        missing_prob=float(missing_prob),
        orientation=orientation,
        modalities=list(MODALITIES),
        labels={"0": "background", "1": "necrotic core (NCR)", "2": "oedema (ED)", "4": "enhancing tumour (ET)"},
        file_pattern="<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz",
        cases=records,
    )


def _write_case(folder: Path, out: Path, name: str, case: SynthCase, code: str, missing: Sequence[str]) -> None:
    (folder / name).mkdir()
    volumes = [(m, np.round(case.images[m]), np.int16) for m in MODALITIES if m not in missing]
    for role, data, dtype in volumes + [("seg", case.label, np.uint8)]:
        filename = f"{name}_{role}.nii.gz"
        try:
            _write_volume(data, case.affine, code, folder / name / filename, dtype)
        except OSError as e:
            raise write_error(out / name / filename, e) from e


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="medmap-fast synth",
        description="Write a SYNTHETIC BraTS-like data set: <OUT>/SynthBraTS_00001/SynthBraTS_00001_{t1,t1ce,t2,"
                    "flair,seg}.nii.gz and <OUT>/dataset.json. Anatomy from the ICBM152 2009a template shipped "
                    "with nilearn, or a geometric phantom; tumours with a necrotic core (label 1), oedema (2) and "
                    "an enhancing rim (4). Not patient data. The data set is written into a hidden folder "
                    "beside OUT and then replaces OUT in one step, so OUT must be new, empty, or an earlier "
                    "synthetic data set (with --overwrite); an interrupted run leaves the old data set as it was.",
        epilog="example: medmap-fast synth data/ --cases 20 --shape 128 128 96 --missing-prob 0.2",
    )
    p.add_argument("out", metavar="OUT",
                   help="folder to write the cases into: new, empty, or an earlier synthetic data set (replaced "
                        "as a whole with --overwrite)")
    p.add_argument("--cases", type=int, default=10, metavar="N", help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files (default 0)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=list(DEFAULT_SHAPE),
                   help="voxels per case (default 96 96 96)")
    p.add_argument("--spacing", type=float, default=None,
                   help="voxel size in mm (default: a 200 mm field of view over the longest side)")
    p.add_argument("--anatomy", choices=ANATOMIES, default="auto",
                   help="template: ICBM152 2009a from nilearn; geometric: a phantom; auto: template if nilearn "
                        "is installed (default)")
    p.add_argument("--missing-prob", type=float, default=0.0,
                   help="probability that a case lacks one modality file (default 0)")
    p.add_argument("--orientation", default="mixed",
                   help="on-disk orientation: 'mixed' (drawn per case, default) or axis codes such as LPS or RAS")
    p.add_argument("--overwrite", action="store_true", help="replace a synthetic data set already in OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    args = p.parse_args(argv)
    try:
        check_out(args.out, args.overwrite, "OUT")
        paths = write_synthetic_dataset(args.out, args.cases, seed=args.seed, shape=args.shape,
                                        anatomy=args.anatomy, missing_prob=args.missing_prob, spacing=args.spacing,
                                        orientation=args.orientation, overwrite=args.overwrite,
                                        verbose=not args.quiet)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"medmap-fast synth: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{len(paths)} cases in {args.out} (synthetic data; see dataset.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
