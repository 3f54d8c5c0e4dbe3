"""Timing and roofline helpers shared by the demo and the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable, List

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeat: int = 5) -> List[float]:
    """Wall-clock seconds of ``fn()`` per repeat, synchronised, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(xs: List[float]) -> float:
    return statistics.median(xs)


_COPY_BW: dict = {}


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted), cached per device."""
    key = str(device)
    if key not in _COPY_BW:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        t = median(time_call(lambda: dst.copy_(src), device, warmup=3, repeat=9))
        _COPY_BW[key] = 2 * nbytes / t
    return _COPY_BW[key]


def fusion_bytes(mode: str, B: int, M: int, C: int, S: int, itemsize: int, backward: bool, weight_grad: bool) -> int:
    """Bytes a masked fusion must move with every modality present (the floor, no intermediates)."""
    n = B * C * S * itemsize
    if mode == "zero_concat":
        return 2 * M * n * (2 if backward else 1)
    total = (M + 1) * n  # read M modalities, write the fused tensor
    if backward:
        total += (M + 1) * n  # read grad, write M feature grads
        if weight_grad:
            total += M * n  # re-read the features for the weight gradient
    return total
