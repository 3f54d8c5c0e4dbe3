"""Sliding-window inference of a segmentation model over whole volumes, and logits to BraTS labels.

The model interface: any callable ``model(x, mask) -> logits`` with

* ``x``: (n, M, d, h, w) image windows (M = 4 modalities in the order t1, t1ce, t2, flair,
  z-scored inside the brain, zeros where a modality is missing);
* ``mask``: (n, M) bool, True where a modality is present;
* ``logits``: (n, K, d, h, w) floating point, K = 4 class scores in the label order (0, 1, 2, 4)
  (``output="classes"``) or K = 3 region scores WT, TC, ET (``output="regions"``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .._checks import check_mask, first_bad_index
from ..data.transforms import spatial_size

CLASS_LABELS = (0, 1, 2, 4)  # channel k of a K=4 output scores label CLASS_LABELS[k]
OUTPUTS = ("classes", "regions")
AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)
# per axis, relative to the peak: far Gaussian tails stay > 0 (at least 1e-12 over three axes), so that a
# voxel only the edge of one window covers still gets that window's value
_AXIS_FLOOR = 1e-4


def _check_overlap(overlap) -> float:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise ValueError(
            f"overlap must be a number in [0, 1) (fraction of the window shared by neighbours), got {overlap!r}"
        )
    return float(overlap)


def window_starts(size: int, win: int, overlap: float) -> List[int]:
    """Start offsets along one axis of ``size`` voxels (already padded to >= ``win``).

    Neighbouring windows are at most ``win * (1 - overlap)`` apart; the windows are spread evenly so that
    the first starts at 0 and the last ends at ``size``.
    """
    if size <= win:
        return [0]
    # the epsilon: 40 * (1 - 0.8) is 7.999... in floating point, and must not cost a window
    step = max(1, int(win * (1 - overlap) + 1e-9))
    n = math.ceil((size - win) / step) + 1
    return [round(i * (size - win) / (n - 1)) for i in range(n)]


def window_positions(shape: Sequence[int], window, overlap: float = 0.5) -> List[Tuple[int, int, int]]:
    """Start corners of every window over a volume of spatial ``shape`` (padded up to the window)."""
    win = spatial_size(window, "window")
    overlap = _check_overlap(overlap)
    padded = [max(s, w) for s, w in zip(shape, win)]
    return list(itertools.product(*(window_starts(s, w, overlap) for s, w in zip(padded, win))))


def _axis_weights(window: Sequence[int], sigma_scale: Optional[float]) -> List[torch.Tensor]:
    """The importance map's 1-D factors, float64: it is their outer product."""
    if not sigma_scale:
        return [torch.ones(w, dtype=torch.float64) for w in window]
    if isinstance(sigma_scale, bool) or not isinstance(sigma_scale, (int, float)) or not 0 < sigma_scale < math.inf:
        raise ValueError(f"sigma_scale must be a positive number or None (uniform weights), got {sigma_scale!r}")
    factors = []
    for w in window:
        r = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
        g = torch.exp(-0.5 * (r / (sigma_scale * w)) ** 2)
        factors.append((g / g.max()).clamp_min(_AXIS_FLOOR))
    return factors


def _outer(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    a, b, c = factors
    return a[:, None, None] * b[None, :, None] * c[None, None, :]


def importance_map(window, sigma_scale: Optional[float] = 0.125, device=None) -> torch.Tensor:
    """(d, h, w) float32 weights peaking at 1 in the centre: a Gaussian of std ``sigma_scale * window`` per axis.

    Predictions near a window's border see less context and are less reliable, so they count less where
    windows overlap. ``sigma_scale=None`` (or 0) gives uniform weights.
    """
    factors = _axis_weights(spatial_size(window, "window"), sigma_scale)
    return _outer(factors).to(device=device, dtype=torch.float32)


def _check_inputs(image, mask) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a (B, M, D, H, W) tensor, got {type(image).__name__}")
    if image.dim() != 5:
        raise ValueError(f"image must be (B, M, D, H, W), got a {image.dim()}-D tensor of shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be floating point, got {image.dtype}")
    if image.numel() == 0:
        raise ValueError(f"image must hold at least one case, modality and voxel, got shape {tuple(image.shape)}")
    return check_mask(mask, image.shape[0], image.shape[1], image.device)


def sliding_window_inference(
    model,
    image: torch.Tensor,
    mask: torch.Tensor,
    window=(128, 128, 128),
    overlap: float = 0.5,
    sigma_scale: Optional[float] = 0.125,
    batch_size: int = 2,
    autocast: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    out_device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Logits of ``model`` over whole volumes, from overlapping windows blended with Gaussian weights.

    Args:
        model: callable ``(x (n, M, d, h, w), mask (n, M) bool) -> logits (n, K, d, h, w)``; run under
            ``torch.no_grad()``; its train/eval mode is left as it is (call ``model.eval()`` first).
        image: (B, M, D, H, W) floating point volumes (B cases).
        mask: (B, M) bool (or 0/1), the modalities the model may use for each case.
        window: (d, h, w) or one int; a volume smaller than the window along an axis is zero-padded
            (centred) to the window and the result cropped back.
        overlap: fraction in [0, 1) of a window shared with its neighbour along each axis.
        sigma_scale: Gaussian importance weights of std ``sigma_scale * window``; None for uniform.
        batch_size: windows per model call, taken across positions and cases alike.
        autocast: None (the model's own precision), ``torch.float16`` or ``torch.bfloat16``.
        device: where the model runs (default: the image's device); windows are moved there.
        out_device: where the logits are accumulated and returned (default: the image's device).

    Returns:
        (B, K, D, H, W) float32 logits, the weighted mean of every window's logits at each voxel,
        accumulated in float32.
    """
    mask = _check_inputs(image, mask)
    win = spatial_size(window, "window")
    overlap = _check_overlap(overlap)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (windows per model call), got {batch_size!r}")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, torch.float16 or torch.bfloat16, got {autocast!r}")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, mask), got {type(model).__name__}")
    device = image.device if device is None else torch.device(device)
    out_device = image.device if out_device is None else torch.device(out_device)

    B, _, *shape = image.shape
    padded = [max(s, w) for s, w in zip(shape, win)]
    before = [(p - s) // 2 for p, s in zip(padded, shape)]
    if padded != shape:
        pads = []
        for s, p, b in reversed(list(zip(shape, padded, before))):
            pads += [b, p - s - b]
        image = F.pad(image, pads)

    factors = _axis_weights(win, sigma_scale)
    weight = _outer(factors).to(device=out_device, dtype=torch.float32)
    starts = [window_starts(p, w, overlap) for p, w in zip(padded, win)]
    positions = list(itertools.product(*starts))
    # The weights are a product over the axes and the windows a product of per-axis starts, so the sum
    # of the weights at each voxel is the product of per-axis sums: no pass over the volume per window.
    coverage = []
    for size, w, axis_starts, f in zip(padded, win, starts, factors):
        total = torch.zeros(size, dtype=torch.float64)
        for a in axis_starts:
            total[a : a + w] += f
        coverage.append(total)
    norm = _outer(coverage).to(device=out_device, dtype=torch.float32)

    jobs = [(b, pos) for b in range(B) for pos in positions]
    out = None
    amp = torch.autocast(device_type=device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            x = torch.stack([image[b, :, z : z + win[0], y : y + win[1], xx : xx + win[2]] for b, (z, y, xx) in chunk])
            m = mask[torch.tensor([b for b, _ in chunk], device=mask.device)]
            with amp:
                logits = model(x.to(device), m.to(device))
            _check_logits(logits, len(chunk), win, None if out is None else out.shape[1])
            if out is None:
                out = torch.zeros((B, logits.shape[1], *padded), dtype=torch.float32, device=out_device)
            logits = logits.to(device=out_device, dtype=torch.float32)
            for i, (b, (z, y, xx)) in enumerate(chunk):
                out[b, :, z : z + win[0], y : y + win[1], xx : xx + win[2]].addcmul_(logits[i], weight)
        if padded != shape:
            crop = tuple(slice(b, b + s) for b, s in zip(before, shape))
            return out[(slice(None), slice(None)) + crop] / norm[crop]
        return out.div_(norm)


def _check_logits(logits, n: int, win, channels: Optional[int]) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model output must be a (n, K, d, h, w) logits tensor, got {type(logits).__name__}")
    want = f"({n}, K, {win[0]}, {win[1]}, {win[2]})"
    if logits.dim() != 5 or logits.shape[0] != n or tuple(logits.shape[2:]) != win:
        raise ValueError(
            f"model output must be logits of shape {want} for a batch of {n} windows of {win}, "
            f"got {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"model output must be floating point logits, got {logits.dtype}")
    if channels is not None and logits.shape[1] != channels:
        raise ValueError(f"model output has {logits.shape[1]} channels but an earlier window gave {channels}")


def logits_to_labels(logits: torch.Tensor, output: str = "classes", threshold: float = 0.5) -> torch.Tensor:
    """(B, K, *spatial) logits -> (B, *spatial) uint8 BraTS labels in {0, 1, 2, 4}.

    ``output="classes"``: K = 4 class scores in the label order (0, 1, 2, 4); the label is the argmax
    (the softmax is monotonic, so it is not computed; ties go to the lower label).
    ``output="regions"``: K = 3 sigmoid scores of the nested regions WT, TC, ET, as region-based
    training uses; a region is on where its sigmoid exceeds ``threshold``, and the most specific region
    that is on sets the label: ET -> 4, else TC -> 1, else WT -> 2, else 0.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or not logits.is_floating_point():
        got = (
            f"shape {tuple(logits.shape)}, dtype {logits.dtype}"
            if isinstance(logits, torch.Tensor)
            else type(logits).__name__
        )
        raise ValueError(f"logits must be a floating point (B, K, *spatial) tensor, got {got}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    want = 4 if output == "classes" else 3
    if logits.shape[1] != want:
        what = "class scores for labels (0, 1, 2, 4)" if output == "classes" else "region scores (WT, TC, ET)"
        raise ValueError(f"output={output!r} needs K = {want} {what}, got logits of shape {tuple(logits.shape)}")
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        idx = first_bad_index(bad)
        raise ValueError(f"logits has a non-finite value ({logits[idx].item()}) at index {idx}")
    if output == "classes":
        lut = torch.tensor(CLASS_LABELS, dtype=torch.uint8, device=logits.device)
        return lut[logits.argmax(dim=1)]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold!r}")
    cut = math.log(threshold / (1 - threshold))  # sigmoid(x) > t  <=>  x > logit(t)
    on = logits > cut
    labels = torch.zeros(logits.shape[:1] + logits.shape[2:], dtype=torch.uint8, device=logits.device)
    labels[on[:, 0]] = 2
    labels[on[:, 1]] = 1
    labels[on[:, 2]] = 4
    return labels
