"""Input validation shared by the ops: every error names the argument, what it got and what it expects."""

from __future__ import annotations

import math
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


def first_bad_index(bad: torch.Tensor) -> tuple:
    """The index of the first true element of a bool tensor, as a tuple of ints."""
    return tuple(int(i) for i in bad.nonzero()[0]) if bad.dim() else ()


def check_binary_values(mask: torch.Tensor, name: str) -> None:
    """A non-bool mask must hold only 0 and 1 (a data-dependent check, skipped while tracing)."""
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or real 0/1 numbers, got {mask.dtype}")
    if mask.dtype != torch.bool and _values_checkable():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            idx = first_bad_index(bad)
            raise ValueError(f"{name} must hold only 0 and 1 (or be bool), got {mask[idx].item()} at index {idx}")


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
    check_binary_values(mask, name)
    return (mask != 0).contiguous()


REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_choice(value, choices, name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _values_checkable() -> bool:
    # Data-dependent checks read values back to Python: skipped while tracing (they would break the graph).
    return not torch.compiler.is_compiling()


def check_weights_vector(
    pi, shapes: Sequence[tuple], name: str, device: torch.device, what: str, values: bool = True
):
    """A non-negative weight tensor (e.g. mixture weights over modalities) of one of ``shapes``; None passes.

    ``values=False`` leaves the value check to the caller (who folds it into a check of its own, so
    that the values are read back once).
    """
    if pi is None:
        return None
    if not isinstance(pi, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {' or '.join(map(str, shapes))} ({what}), got {type(pi).__name__}")
    if tuple(pi.shape) not in [tuple(s) for s in shapes]:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))} ({what}), got {tuple(pi.shape)}")
    if not pi.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {pi.dtype}")
    if pi.device != device:
        raise ValueError(f"{name} is on {pi.device} but the features are on {device}")
    if values:
        check_weight_values(pi, name)
    return pi


def _raise_bad_weight(pi: torch.Tensor, bad: torch.Tensor, name: str) -> None:
    idx = first_bad_index(bad)
    raise ValueError(f"{name} must be finite and non-negative, got {pi[idx].item()} at index {idx}")


def check_weight_values(pi: torch.Tensor, name: str, what: str = "", positive_sum: bool = False) -> None:
    """Every weight finite and >= 0; with ``positive_sum``, not all zero (a mixture needs some weight).

    One reduction read back to the host (a device sync on CUDA); skipped while tracing.
    """
    if pi is None or not _values_checkable():
        return
    p = pi.detach()
    bad = ~(torch.isfinite(p) & (p >= 0))
    flag = bad.any()
    if positive_sum:
        flag = flag | ~(p.sum() > 0)
    if not bool(flag):
        return
    if bool(bad.any()):
        _raise_bad_weight(p, bad, name)
    raise ValueError(
        f"{name}{f' ({what})' if what else ''} must have a positive sum, got all zeros {p.tolist()}: "
        "normalised by their sum they define no distribution"
    )


def check_anchor_weights(pi, mask: torch.Tensor, name: str = "pi") -> None:
    """The anchor's weights over the modalities, pi (M,) or (B, M), against the (B, M) mask.

    Every weight must be finite and non-negative, and every sample with at least one modality present
    needs a positive weight on one of them: the anchor is the pi-weighted mean of the present
    modalities, which weights summing to 0 leave undefined (a sample with nothing present needs
    nothing). CPU tensors are tested on their host values; on other devices one reduction on (B, M)
    is read back to the host (a device sync on CUDA). Skipped while tracing. None (uniform weights)
    always passes.
    """
    if pi is None or not _values_checkable():
        return
    p = pi.detach()
    if _anchor_weights_pass_on_host(p, mask):
        return
    # Reached on the CPU only when the check fails (then this builds the error message).
    present = mask != 0
    bad = ~(torch.isfinite(p) & (p >= 0))
    row = p.expand(present.shape)
    total = torch.where(present, row, torch.zeros((), dtype=p.dtype, device=p.device)).sum(dim=1)
    undefined = present.any(dim=1) & ~(total > 0)
    if not bool(bad.any() | undefined.any()):
        return
    if bool(bad.any()):
        _raise_bad_weight(p, bad, name)
    samples = undefined.nonzero().flatten().tolist()
    b = samples[0]
    shown = ", ".join(map(str, samples[:8])) + (", ..." if len(samples) > 8 else "")
    here = present[b].nonzero().flatten().tolist()
    raise ValueError(
        f"{name}: the weights of the present modalities sum to 0 in sample(s) [{shown}] "
        f"({len(samples)} of {present.shape[0]}); e.g. sample {b} has modalities {here} present and "
        f"{name}{f'[{b}]' if p.dim() == 2 else ''} = {row[b].tolist()}, so its anchor (the weighted mean "
        f"of its present modalities) is undefined. Expected a positive weight on at least one present "
        f"modality of every sample that has one (e.g. give per-sample weights of shape (B, M))"
    )


def _anchor_weights_pass_on_host(p: torch.Tensor, mask: torch.Tensor) -> bool:
    """check_anchor_weights' test, in Python on the host values, for CPU tensors (reading them is no
    sync there): every weight finite and >= 0, and every sample with a modality present has a
    positive weight on one of them. The same test as eight small torch ops on (B, M) tensors costs
    65-145 µs a call on the 2-core CPU (as much as an 8³ kernel); this, a few µs for B·M <= 64.
    False means "failed, or not decided here" (other devices, unexpected shapes): the caller then
    runs the torch version, which raises the error."""
    if p.device.type != "cpu" or mask.device.type != "cpu" or mask.dim() != 2 or not p.is_floating_point():
        return False
    if tuple(p.shape) not in (tuple(mask.shape), tuple(mask.shape[1:])):
        return False
    weights, present = p.tolist(), mask.tolist()
    if not all(math.isfinite(w) and w >= 0 for row in (weights if p.dim() == 2 else [weights]) for w in row):
        return False
    rows = weights if p.dim() == 2 else [weights] * len(present)
    for row, here in zip(rows, present):
        if any(m != 0 for m in here) and not any(m != 0 and w > 0 for w, m in zip(row, here)):
            return False
    return True


def check_voxels(shape: Sequence[int], B: int, C: int, S: int, name: str = "features") -> None:
    """Per-(b, k) statistics over channels and voxels need at least one of each; an empty batch needs none."""
    if B > 0 and (C == 0 or S == 0):
        raise ValueError(
            f"{name} of shape {tuple(shape)} have C = {C} channel(s) and {S} voxel(s) per modality: their "
            "mean over the channels and voxels is undefined; expected C >= 1 and at least one voxel "
            "(an empty batch, B = 0, is allowed)"
        )


def check_positive(value, name: str, channels: int, device: torch.device):
    """sigma^2-like argument: a positive number, a 0-d tensor, or a (C,) tensor of positive values."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a positive number or a tensor of shape () or (C,) = ({channels},), got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if tuple(value.shape) not in ((), (channels,)):
            raise ValueError(f"{name} must have shape () or (C,) = ({channels},), got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the features are on {device}")
        if _values_checkable():
            bad = ~(value > 0)
            if bool(bad.any()):
                idx = first_bad_index(bad)
                raise ValueError(f"{name} must be positive, got {value[idx].item()} at index {idx}")
        return value
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return value


def check_finite(t: torch.Tensor, name: str, keep=None) -> None:
    """Raise naming ``name`` and the first non-finite index of ``t`` (only where ``keep``, broadcastable, is true)."""
    if not _values_checkable():
        return
    bad = ~torch.isfinite(t)
    if keep is not None:
        bad = bad & keep
    if bool(bad.any()):
        idx = first_bad_index(bad)
        raise ValueError(f"{name} has a non-finite value ({t[idx].item()}) at index {idx} (check_finite=True)")


def check_finite_modalities(feats: List[torch.Tensor], stacked: bool, present: torch.Tensor, name: str = "features") -> None:
    """check_finite over the present modalities only (a missing modality may hold anything)."""
    if stacked:
        f = feats[0]
        keep = present.view(*present.shape, *([1] * (f.dim() - 2)))
        check_finite(f, name, keep)
        return
    for k, f in enumerate(feats):
        keep = present[:, k].view(-1, *([1] * (f.dim() - 1)))
        check_finite(f, f"{name}[{k}]", keep)
