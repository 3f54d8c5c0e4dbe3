"""The torch Dataset over BraTS-style case folders, its DataLoader, and whole normalised cases for inference.

Training samples are patches: cropped (biased towards the tumour), flipped and intensity-jittered.
Reading a case means decompressing four or five .nii.gz files, which costs far more than the patch;
with ``cache`` set, each case is decompressed and normalised once and kept as memory-mappable .npy
files, so that a patch reads only its own window from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .atomic import atomic_dir
from .labels import MODALITIES
from .nifti import ROLES, Case, PathLike, case_files, find_cases, load_case
from .transforms import modality_dropout, random_crop, random_flip, random_intensity, spatial_size

CACHE_FORMAT = 1  # bump when what a cache entry holds changes: old entries are then ignored


def default_cache_dir() -> Path:
    """``$MEDMAP_FAST_CACHE_DIR/data``, by default ``~/.cache/medmap_fast/data``."""
    return Path(os.environ.get("MEDMAP_FAST_CACHE_DIR", Path.home() / ".cache" / "medmap_fast")) / "data"


def _case_list(cases: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    if isinstance(cases, (str, os.PathLike)):
        return find_cases(cases)
    out = [Path(c) for c in cases]
    if not out:
        raise ValueError("no cases given: pass a data root or a non-empty list of case folders")
    for c in out:
        if not c.is_dir():
            raise FileNotFoundError(f"case folder {c} does not exist")
    return out


def _range(value, name: str, low: float = -np.inf) -> Tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (min, max), got {value!r}") from None
    if not (low <= a <= b):
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {tuple(value)!r}")
    return a, b


def _prob(value, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


class BraTSDataset(Dataset):
    """Patches (or whole volumes) of BraTS-style cases, normalised, as torch tensors.

    cases: a data root (searched with ``find_cases``) or a list of case folders.
    patch_size: int or 3 ints; None gives whole volumes (no crop, no padding), for evaluation.
    augment: random flips on each axis (``flip_prob``), per-modality intensity scale and shift
        (``intensity_scale``, ``intensity_shift``, on the z-scored brain), gamma with probability
        ``gamma_prob``, and dropping present modalities with probability ``modality_dropout``.
    allow_missing: load cases that lack modality files (those channels are 0, ``mask`` False).
    foreground_prob: probability that a patch is centred on a random tumour voxel (else uniform).
    seed: makes the samples reproducible (see ``make_loader``, which seeds the workers from it).
    cache: None/False (read the NIfTI files each time), True (``default_cache_dir()``) or a folder:
        normalised cases kept as .npy there, rebuilt when a source file's size or mtime changes.

    Each item is a dict: image float32 (4, *patch), mask bool (4,), label uint8 (*patch) in
    {0, 1, 2, 4}, name str; in whole-volume mode also has_label (False for a case without a seg file,
    whose label is then all 0).
    """

    def __init__(
        self,
        cases: Union[PathLike, Sequence[PathLike]],
        patch_size: Optional[Union[int, Sequence[int]]] = (128, 128, 128),
        augment: bool = True,
        allow_missing: bool = True,
        foreground_prob: float = 0.33,
        seed: Optional[int] = None,
        cache: Union[None, bool, PathLike] = None,
        flip_prob: float = 0.5,
        intensity_scale: Tuple[float, float] = (0.9, 1.1),
        intensity_shift: Tuple[float, float] = (-0.1, 0.1),
        gamma_prob: float = 0.0,
        gamma_range: Tuple[float, float] = (0.7, 1.5),
        modality_dropout: float = 0.0,
    ):
        self.cases = _case_list(cases)
        self.patch_size = None if patch_size is None else spatial_size(patch_size, "patch_size")
        self.augment = bool(augment)
        self.allow_missing = bool(allow_missing)
        self.foreground_prob = _prob(foreground_prob, "foreground_prob")
        self.flip_prob = _prob(flip_prob, "flip_prob")
        self.intensity_scale = _range(intensity_scale, "intensity_scale", 0.0)
        self.intensity_shift = _range(intensity_shift, "intensity_shift")
        self.gamma_prob = _prob(gamma_prob, "gamma_prob")
        self.gamma_range = _range(gamma_range, "gamma_range", 0.0)
        self.modality_dropout = _prob(modality_dropout, "modality_dropout")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        if cache is None or cache is False:
            self.cache_dir = None
        elif cache is True:
            self.cache_dir = default_cache_dir()
        else:
            self.cache_dir = Path(cache).expanduser()
        self._rng: Optional[np.random.Generator] = None
        self._rng_owner = None

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (f"BraTSDataset({len(self)} cases, patch_size={self.patch_size}, augment={self.augment}, "
                f"foreground_prob={self.foreground_prob}, cache={str(self.cache_dir) if self.cache_dir else None})")

    # -- randomness ---------------------------------------------------------------------------------------

    def _generator(self) -> np.random.Generator:
        """This process's generator. A DataLoader worker seeds its own from the seed torch gives it (distinct
        per worker, and drawn from the loader's generator, so fixed when that is seeded); the main process
        uses ``seed``. Checked on every call because forked workers inherit the parent's generator."""
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else info.seed)
        if self._rng is None or self._rng_owner != owner:
            self._rng = np.random.default_rng(self.seed if info is None else info.seed)
            self._rng_owner = owner
        return self._rng

    # -- loading ------------------------------------------------------------------------------------------

    def load(self, index: int) -> Dict:
        """The normalised case: dict(image (4, X, Y, Z) float32, present (4,), label uint8 or None,
        foreground (N, 3) tumour voxel coordinates or None, name). From the cache when it is set."""
        case_dir = self.cases[index]
        if self.cache_dir is None:
            case = load_case(case_dir, allow_missing=self.allow_missing, normalized=True)
            return dict(image=case.image, present=case.present, label=case.label, foreground=None, name=case.name)
        return self._cached(case_dir)

    def build_cache(self) -> None:
        """Fill the cache for every case now (in this process) rather than on first use."""
        if self.cache_dir is None:
            raise ValueError("build_cache: this dataset has no cache (pass cache=True or a folder)")
        for c in self.cases:
            self._cached(c)

    def _cache_key(self, case_dir: Path) -> Tuple[str, str]:
        files = case_files(case_dir)
        missing = [m for m in MODALITIES if m not in files]
        if missing and not self.allow_missing:
            load_case(case_dir, allow_missing=False)  # raises the usual error, naming the case and files
        where = hashlib.sha256(str(case_dir.resolve()).encode()).hexdigest()[:10]
        h = hashlib.sha256(f"format {CACHE_FORMAT}".encode())
        for role in ROLES:
            if role in files:
                st = files[role].stat()
                h.update(f"|{role}:{files[role].name}:{st.st_size}:{st.st_mtime_ns}".encode())
        prefix = f"{case_dir.name}-{where}"
        return prefix, f"{prefix}-{h.hexdigest()[:16]}"

    def _cached(self, case_dir: Path) -> Dict:
        prefix, key = self._cache_key(case_dir)
        entry = self.cache_dir / key
        if not entry.is_dir():
            self._write_entry(case_dir, prefix, entry)
        meta = json.loads((entry / "meta.json").read_text())
        has_label = meta["has_label"]
        return dict(
            image=np.load(entry / "image.npy", mmap_mode="r"),
            present=np.array(meta["present"], dtype=bool),
            label=np.load(entry / "label.npy", mmap_mode="r") if has_label else None,
            foreground=np.load(entry / "foreground.npy") if has_label else None,
            name=meta["name"],
        )

    def _write_entry(self, case_dir: Path, prefix: str, entry: Path) -> None:
        case = load_case(case_dir, allow_missing=self.allow_missing, normalized=True)
        # whole or not at all; when two workers build the same entry at once, the first one stays
        with atomic_dir(entry) as tmp:
            np.save(tmp / "image.npy", case.image)
            if case.label is not None:
                np.save(tmp / "label.npy", case.label)
                # coordinates of every tumour voxel, so that tumour-centred crops need not scan the volume
                np.save(tmp / "foreground.npy", np.argwhere(case.label > 0).astype(np.int32))
            meta = dict(name=case.name, present=case.present.tolist(), has_label=case.label is not None,
                        spacing=list(case.spacing), shape=list(case.image.shape[1:]), source=str(case_dir))
            (tmp / "meta.json").write_text(json.dumps(meta))
        # entries of this case made from older versions of its files
        for old in self.cache_dir.iterdir():
            if old.name.startswith(prefix + "-") and old.name != entry.name:
                shutil.rmtree(old, ignore_errors=True)

    # -- items --------------------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> Dict:
        return self.sample(index, self._generator())

    def sample(self, index: int, rng: np.random.Generator) -> Dict:
        """Item ``index`` with its crop and augmentation drawn from ``rng``: a trainer that seeds one
        generator per item gets the same item whichever worker makes it, so a run can be resumed exactly."""
        case = self.load(index)
        image, present, label = case["image"], case["present"], case["label"]
        if self.patch_size is None:
            has_label = label is not None
            image = np.array(image, dtype=np.float32)
            label = np.array(label) if has_label else np.zeros(image.shape[1:], dtype=np.uint8)
        else:
            if label is None:
                raise ValueError(f"case {case['name']} has no segmentation file (*_seg.nii.gz): patches for "
                                 "training need labels; use patch_size=None for whole unlabelled volumes")
            image, label, _ = random_crop(image, label, self.patch_size, rng, self.foreground_prob,
                                          case["foreground"])
        if self.augment:
            image, label, _ = random_flip(image, label, rng, self.flip_prob)
            present = modality_dropout(present, rng, self.modality_dropout)
            image = random_intensity(image, present, rng, self.intensity_scale, self.intensity_shift,
                                     self.gamma_prob, self.gamma_range)
        item = dict(image=torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                    mask=torch.from_numpy(np.asarray(present, dtype=bool).copy()),
                    label=torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8)),
                    name=case["name"])
        if self.patch_size is None:
            item["has_label"] = has_label
        return item


def make_loader(dataset: Dataset, batch_size: Optional[int] = None, num_workers: int = 2,
                pin_memory: Optional[bool] = None, persistent_workers: Optional[bool] = None,
                prefetch_factor: Optional[int] = None, shuffle: Optional[bool] = None, drop_last: bool = False,
                seed: Optional[int] = None) -> DataLoader:
    """A DataLoader over ``dataset`` with sensible defaults for 3-D patches.

    batch_size: None gives 2 for patches and 1 for whole volumes (cases differ in shape, so they cannot
    be stacked). pin_memory: None pins when CUDA is available. persistent_workers: None keeps workers
    alive between epochs when there are any (a worker's start re-imports torch). shuffle: None shuffles
    patch datasets and keeps whole-volume ones in order. seed (default: the dataset's) seeds the
    shuffling and the workers' generators, so that a seeded run gives the same batches for the same
    ``num_workers``; without workers the crops and augmentation follow the dataset's own ``seed``.
    """
    whole = isinstance(dataset, BraTSDataset) and dataset.patch_size is None
    if batch_size is None:
        batch_size = 1 if whole else 2
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if shuffle is None:
        shuffle = not whole
    if seed is None:
        seed = getattr(dataset, "seed", None)
    kwargs = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else bool(persistent_workers)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = int(prefetch_factor)
    elif persistent_workers or prefetch_factor is not None:
        raise ValueError("persistent_workers and prefetch_factor need num_workers > 0")
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last, generator=generator, **kwargs)


def iter_cases(cases: Union[PathLike, Sequence[PathLike]], allow_missing: bool = True,
               load_label: bool = True) -> Iterator[Case]:
    """Whole cases for inference, one at a time: each ``Case`` has its image normalised
    (``normalized`` True), keeps its geometry for ``save_segmentation``, and its label when asked."""
    for case_dir in _case_list(cases):
        yield load_case(case_dir, allow_missing=allow_missing, load_label=load_label, normalized=True)
