"""Timing and roofline helpers shared by the demo and the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional

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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes above the starting level while ``fn()`` runs; None where it cannot be measured.

    CUDA: the caching allocator's peak statistic. CPU (Linux): the process's resident-set high-water
    mark, reset just before the call (/proc/self/clear_refs), minus the resident set at the start;
    large CPU tensors are mapped and unmapped directly, so this follows tensor memory closely.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        start = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - start) * 1024
    except (OSError, KeyError):
        return None


def kl_bytes(N: int, C: int, J: int, itemsize: int, backward: bool) -> int:
    """Bytes the fused Gaussian KL must move: mu and logvar read, per-row loss written; backward also
    the J responsibilities written and read back, mu and logvar read again, their gradients written."""
    rows = 2 * N * C * itemsize + N * 4
    if backward:
        rows += 2 * N * J * 4 + 4 * N * C * itemsize
    return rows
