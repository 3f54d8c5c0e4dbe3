"""Normalisation and the training-time augmentation, on numpy arrays (image (4, X, Y, Z), label (X, Y, Z)).

Every random choice is drawn from a ``numpy.random.Generator`` passed in, so that a seeded caller gets
the same patches back.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .labels import MODALITIES


def spatial_size(value, name: str) -> Tuple[int, int, int]:
    """A patch or window size given as one int or 3 ints -> 3 positive ints; errors name ``name``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        value = (value,) * 3
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or 3 positive ints, got {value!r}") from None
    if len(items) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
                                  and v > 0 for v in items):
        raise ValueError(f"{name} must be an int or 3 positive ints, got {value!r}")
    return tuple(int(v) for v in items)


def _check_image(image: np.ndarray, present: np.ndarray, who: str) -> Tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    present = np.asarray(present)
    if image.ndim != 4:
        raise ValueError(f"{who}: image must be (M, X, Y, Z), got shape {image.shape}")
    if present.shape != (image.shape[0],):
        raise ValueError(f"{who}: present must have shape ({image.shape[0]},) to match the image, got {present.shape}")
    if present.dtype != bool:
        if not np.all(np.isin(present, (0, 1))):
            raise ValueError(f"{who}: present must be bool or 0/1, got {present.tolist()}")
        present = present.astype(bool)
    return image, present


def normalize(image: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per present modality, z-score over its brain (the voxels where that modality is non-zero).

    Background stays 0 and a missing modality is all 0. A brain of one constant value becomes 0 (its std
    is 0); an empty one stays 0. Statistics are taken in float64, the result is float32.
    """
    image, present = _check_image(image, present, "normalize")
    out = np.zeros(image.shape, dtype=np.float32)
    for k in range(image.shape[0]):
        if not present[k]:
            continue
        x = image[k]
        brain = x != 0
        n = int(np.count_nonzero(brain))
        if n == 0:
            continue
        values = x[brain].astype(np.float64)
        mean = values.mean()
        std = values.std()
        if not np.isfinite(mean) or not np.isfinite(std):
            raise ValueError(f"normalize: modality {k} ({_name(k)}) has non-finite values")
        scale = 1.0 / std if std > 1e-8 * max(abs(mean), 1.0) else 0.0
        out[k][brain] = ((values - mean) * scale).astype(np.float32)
    return out


def _name(k: int) -> str:
    return MODALITIES[k] if k < len(MODALITIES) else str(k)


def crop_window(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator,
                center: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """Start corner of a patch in a volume of ``shape``: uniform, or as close to centred on ``center`` as
    the volume allows. A start below 0 (volume smaller than the patch) means padding on that side."""
    starts = []
    for axis, (s, p) in enumerate(zip(shape, patch)):
        lo, hi = min(0, s - p), max(0, s - p)
        if center is None:
            starts.append(int(rng.integers(lo, hi + 1)))
        else:
            starts.append(int(np.clip(int(center[axis]) - p // 2, lo, hi)))
    return tuple(starts)


def extract(volume: np.ndarray, start: Sequence[int], patch: Sequence[int], fill=0) -> np.ndarray:
    """``volume[..., start:start+patch]`` over the last len(patch) axes, zero-padded where the window leaves
    the volume. Only the window is read, so a memory-mapped volume is read in part."""
    lead = volume.shape[: volume.ndim - len(patch)]
    spatial = volume.shape[volume.ndim - len(patch):]
    out = np.full(lead + tuple(patch), fill, dtype=volume.dtype)
    src, dst = [], []
    for s, p, a in zip(spatial, patch, start):
        a0, a1 = max(a, 0), min(a + p, s)
        if a1 <= a0:
            return out
        src.append(slice(a0, a1))
        dst.append(slice(a0 - a, a1 - a))
    ellipsis = (slice(None),) * len(lead)
    out[ellipsis + tuple(dst)] = volume[ellipsis + tuple(src)]
    return out


def random_crop(image: np.ndarray, label: Optional[np.ndarray], patch: Sequence[int], rng: np.random.Generator,
                foreground_prob: float = 0.0, foreground: Optional[np.ndarray] = None):
    """A ``patch``-sized crop of image (M, X, Y, Z) and label (X, Y, Z), padded with 0 where the volume is
    smaller. With probability ``foreground_prob`` (and a tumour to aim at) the patch is centred on a random
    tumour voxel; ``foreground`` may give the (N, 3) tumour voxel coordinates precomputed.

    Returns (image patch, label patch or None, start corner).
    """
    patch = tuple(int(p) for p in patch)
    shape = image.shape[1:]
    center = None
    if foreground_prob > 0 and rng.random() < foreground_prob:
        if foreground is None and label is not None:
            foreground = np.argwhere(np.asarray(label) > 0)
        if foreground is not None and len(foreground):
            center = foreground[int(rng.integers(len(foreground)))]
    start = crop_window(shape, patch, rng, center)
    img = extract(image, start, patch)
    lab = extract(label, start, patch) if label is not None else None
    return img, lab, start


def random_flip(image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator, prob: float = 0.5,
                axes: Sequence[int] = (0, 1, 2)):
    """Flip image (M, X, Y, Z) and label (X, Y, Z) together along each spatial axis with probability ``prob``."""
    flipped = [a for a in axes if rng.random() < prob]
    if flipped:
        image = np.flip(image, axis=tuple(a + 1 for a in flipped))
        if label is not None:
            label = np.flip(label, axis=tuple(flipped))
    return np.ascontiguousarray(image), (np.ascontiguousarray(label) if label is not None else None), flipped


def random_intensity(image: np.ndarray, present: np.ndarray, rng: np.random.Generator,
                     scale: Tuple[float, float] = (0.9, 1.1), shift: Tuple[float, float] = (-0.1, 0.1),
                     gamma_prob: float = 0.0, gamma: Tuple[float, float] = (0.7, 1.5)) -> np.ndarray:
    """Per present modality, x -> x * s + t on the brain (non-zero voxels) of a normalised image, after an
    optional gamma on the brain's intensities rescaled to [0, 1]. Missing modalities and background stay 0."""
    image, present = _check_image(image, present, "random_intensity")
    out = np.array(image, dtype=np.float32, copy=True)
    for k in range(out.shape[0]):
        if not present[k]:
            out[k] = 0
            continue
        # drawn for every present modality in the same order, whatever the data, so runs stay reproducible
        s = rng.uniform(*scale)
        t = rng.uniform(*shift)
        do_gamma = gamma_prob > 0 and rng.random() < gamma_prob
        g = rng.uniform(*gamma) if do_gamma else 1.0
        x = out[k]
        background = x == 0
        if background.all():
            continue
        if do_gamma:
            v = x[~background]
            lo, hi = float(v.min()), float(v.max())
            if hi > lo:
                x[~background] = ((v - lo) / (hi - lo)) ** g * (hi - lo) + lo
        # in place over the whole volume, background put back after: cheaper than gathering the brain
        x *= np.float32(s)
        x += np.float32(t)
        # a brain voxel must stay non-zero: 0 marks background for everything downstream
        x[x == 0] = np.float32(1e-6)
        x[background] = 0
    return out


def modality_dropout(present: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
    """Drop each present modality with probability ``prob``, always keeping at least one."""
    present = np.asarray(present, dtype=bool).copy()
    if prob <= 0:
        return present
    idx = np.flatnonzero(present)
    drop = rng.random(len(idx)) < prob
    if drop.all() and len(idx):
        drop[int(rng.integers(len(idx)))] = False
    present[idx[drop]] = False
    return present
