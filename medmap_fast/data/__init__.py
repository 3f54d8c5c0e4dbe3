"""BraTS-style data: NIfTI cases, normalisation and augmentation, the torch Dataset, synthetic data."""

from .atomic import atomic_dir, atomic_write, atomic_write_text
from .labels import LABELS, MODALITIES, REGIONS, canonical_labels, region_masks
from .nifti import (Case, Geometry, case_files, find_cases, load_case, load_segmentation, modalities_on_disk,
                    save_segmentation, voxel_sizes)
from .transforms import normalize, spatial_size
from .dataset import BraTSDataset, default_cache_dir, iter_cases, make_loader

__all__ = [
    "atomic_dir", "atomic_write", "atomic_write_text",
    "LABELS", "MODALITIES", "REGIONS", "canonical_labels", "region_masks",
    "Case", "Geometry", "case_files", "find_cases", "load_case", "load_segmentation", "modalities_on_disk",
    "save_segmentation", "voxel_sizes",
    "normalize", "spatial_size",
    "BraTSDataset", "default_cache_dir", "iter_cases", "make_loader",
]
