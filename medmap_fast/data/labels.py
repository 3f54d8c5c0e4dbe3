"""BraTS modalities, labels and evaluation regions (SPEC section 6).

Labels on disk: 0 background, 1 necrotic / non-enhancing core (NCR/NET), 2 peritumoural oedema (ED),
4 enhancing tumour (ET) in BraTS 2018-2020. Some later releases write the enhancing tumour as 3; it is
read as 4, so every array inside the library uses {0, 1, 2, 4}.

Regions, nested: whole tumour WT = {1, 2, 4}, tumour core TC = {1, 4}, enhancing tumour ET = {4}.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

MODALITIES: Tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
LABELS: Tuple[int, ...] = (0, 1, 2, 4)
LABEL_NAMES: Dict[int, str] = {0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"}
REGIONS: Dict[str, Tuple[int, ...]] = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
ENHANCING_ALIASES: Tuple[int, ...] = (3,)  # written as 3 by some releases, read as 4


def canonical_labels(label: np.ndarray, source: str = "label") -> np.ndarray:
    """``label`` as uint8 in {0, 1, 2, 4} (3 read as 4); any other value is an error naming ``source``."""
    arr = np.asarray(label)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{source}: labels must be whole numbers in {{0, 1, 2, 3, 4}}, got non-integer values")
    values = np.unique(arr)
    bad = [v for v in values.tolist() if v not in LABELS and v not in ENHANCING_ALIASES]
    if bad:
        raise ValueError(f"{source}: labels must be in {{0, 1, 2, 4}} (or 3 for enhancing tumour), got {bad[:10]}")
    out = arr.astype(np.uint8)
    for alias in ENHANCING_ALIASES:
        out[out == alias] = 4
    return out


def region_masks(label: np.ndarray) -> Dict[str, np.ndarray]:
    """Boolean WT, TC and ET masks of a canonical label map (values in {0, 1, 2, 4})."""
    return {name: np.isin(label, values) for name, values in REGIONS.items()}
