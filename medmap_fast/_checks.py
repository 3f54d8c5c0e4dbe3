"""Input validation shared by the ops: every error names the argument, what it got and what it expects."""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def modality_list(
    features: Union[torch.Tensor, Sequence[torch.Tensor]], name: str = "features"
) -> Tuple[List[torch.Tensor], bool]:
    """Validate features given as one (B, M, C, *spatial) tensor or a list of M (B, C, *spatial) tensors.

    Returns (tensors, stacked): ``[features]`` and True for the stacked form, the list and False otherwise.
    """
    if isinstance(features, torch.Tensor):
        if features.dim() < 4:
            raise ValueError(
                f"{name}: a single tensor must be (B, M, C, *spatial) with at least one spatial dim, "
                f"got {features.dim()}-D tensor of shape {tuple(features.shape)}"
            )
        _check_float(features, name)
        return [features], True
    if not isinstance(features, (list, tuple)):
        raise TypeError(
            f"{name} must be a tensor (B, M, C, *spatial) or a list of M tensors (B, C, *spatial), "
            f"got {type(features).__name__}"
        )
    if len(features) == 0:
        raise ValueError(f"{name}: got an empty list; expected M >= 1 tensors of shape (B, C, *spatial)")
    first = features[0]
    for k, f in enumerate(features):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{name}[{k}] must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() < 3:
            raise ValueError(
                f"{name}[{k}] must be (B, C, *spatial) with at least one spatial dim, "
                f"got shape {tuple(f.shape)}"
            )
        _check_float(f, f"{name}[{k}]")
        if f.shape != first.shape:
            raise ValueError(
                f"{name}[{k}] has shape {tuple(f.shape)} but {name}[0] has {tuple(first.shape)}: "
                "all modalities must have the same shape"
            )
        if f.dtype != first.dtype:
            raise TypeError(f"{name}[{k}] has dtype {f.dtype} but {name}[0] has {first.dtype}: all must match")
        if f.device != first.device:
            raise ValueError(f"{name}[{k}] is on {f.device} but {name}[0] is on {first.device}: all must match")
    return list(features), False


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_mask(mask, B: int, M: int, device: torch.device, name: str = "mask") -> torch.Tensor:
    """Validate a (B, M) availability mask (bool, or 0/1 numbers); returns it as a contiguous bool tensor."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a (B, M) = ({B}, {M}) tensor of bool or 0/1, got {type(mask).__name__}")
    if mask.dim() != 2 or tuple(mask.shape) != (B, M):
        raise ValueError(f"{name} must have shape (B, M) = ({B}, {M}) to match the features, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the features are on {device}: they must be on one device")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or real 0/1 numbers, got {mask.dtype}")
    if mask.dtype != torch.bool and not torch.compiler.is_compiling():
        # A data-dependent check: skipped while tracing, where it would break the graph.
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name} must hold only 0 and 1 (or be bool), got {mask[idx].item()} at index {idx}")
    return (mask != 0).contiguous()
