"""Stride rules of the Triton launchers.

A launcher passes one set of strides for a whole list of tensors (the M modalities, their
gradients), so every tensor of the list must address alike. Only dims of size > 1 count: the stride
of a size-1 dim is never used, and views give it any value (a batch-1 view of a channels-last tensor
gets batch stride C).
"""

from __future__ import annotations

from typing import Sequence

import torch


def same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (same shape) address alike: equal strides on every dim of size > 1."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def check_shared_strides(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Refuses a list whose tensors differ in shape or in the strides that matter from the first one's."""
    ref = tensors[0]
    for k, t in enumerate(tensors[1:], start=1):
        if t.shape != ref.shape or not same_strides(t, ref):
            raise ValueError(
                f"{what}[{k}] has shape {tuple(t.shape)} and strides {t.stride()}, but the kernels address every "
                f"tensor of {what} with {what}[0]'s: shape {tuple(ref.shape)}, strides {ref.stride()}"
            )
