"""Memory layouts: every kernel sees a tensor (B, C, *spatial) as a (B, C, S) view.

Two layouts are fast on every backend: NCS (voxels innermost: NCDHW-contiguous, and channel or batch
slices of it) and channels-last (channels innermost: channels_last_3d). Anything whose spatial dims
cannot be flattened into one strided axis is copied once into a dense layout.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype of the kernels: float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channels_last(t: torch.Tensor) -> bool:
    """Whether (B, C, *spatial) ``t`` keeps its channels innermost (and so should its outputs)."""
    spatial = 1
    for s in t.shape[2:]:
        spatial *= s
    return t.dim() >= 3 and t.stride(1) == 1 and t.shape[1] > 1 and spatial > 1


def dense_strides(shape: Sequence[int], channels_last_: bool, channel_dim: int = 1) -> List[int]:
    """Dense strides for (..., C, *spatial) with C at ``channel_dim``: contiguous, or C innermost
    (then the spatial dims, then the leading dims, as channels_last_3d orders them)."""
    shape = list(shape)
    order = list(range(len(shape) - 1, -1, -1))  # innermost first
    if channels_last_:
        order.remove(channel_dim)
        order.insert(0, channel_dim)
    strides = [0] * len(shape)
    running = 1
    for d in order:
        strides[d] = running
        running *= shape[d]
    return strides


def empty(shape, channels_last_: bool, like: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    strides = dense_strides(shape, channels_last_, channel_dim)
    return torch.empty_strided(tuple(shape), strides, dtype=like.dtype, device=like.device)


def as_bcs(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C, S), a view when the spatial dims collapse, else a dense copy."""
    if t.dim() == 3:
        return t
    B, C = t.shape[:2]
    S = math.prod(t.shape[2:])  # explicit: view(B, C, -1) is ambiguous for empty tensors
    try:
        return t.view(B, C, S)
    except RuntimeError:
        # Spatial dims that do not collapse (e.g. a permuted or sliced volume): copy once.
        return empty(t.shape, channels_last(t), t).copy_(t).view(B, C, S)


def common_bcs(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """(B, C, S) views of same-shaped tensors that share one set of strides (copying only outliers)."""
    views = [as_bcs(t) for t in tensors]
    if all(v.stride() == views[0].stride() for v in views):
        return views
    cl = channels_last(tensors[0])
    target = tuple(dense_strides(views[0].shape, cl))
    return [v if v.stride() == target else empty(v.shape, cl, v).copy_(v) for v in views]
