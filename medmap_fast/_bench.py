"""Timing and roofline helpers shared by the demo and the benchmarks."""

from __future__ import annotations

import statistics
import time
import weakref
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


class _LiveTensorBytes:
    """Counts the bytes of the tensor storages that ops create while active, and their peak.

    Every op's outputs pass through ``__torch_dispatch__``; a storage is counted once (views share
    it) and uncounted when the last tensor seen on it is freed. Scratch memory an op allocates and
    frees inside its own kernel is not seen.
    """

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._refs = {}

    def _release(self, key):
        count, nbytes = self._refs[key]
        if count > 1:
            self._refs[key] = (count - 1, nbytes)
        else:
            del self._refs[key]
            self.live -= nbytes

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        count, nbytes = self._refs.get(key, (0, storage.nbytes()))
        if count == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._refs[key] = (count + 1, nbytes)
        weakref.finalize(t, self._release, key)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors created while ``fn()`` runs, above what existed before.

    CUDA: the caching allocator's peak statistic. CPU, which keeps no such statistic: the tensors the
    ops create (autograd's saved tensors and gradients included), tracked from their creation to
    their release (see ``_LiveTensorBytes``).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    counter = _LiveTensorBytes()

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    counter.track(t)
            return out

    with _Mode():
        fn()
    return counter.peak


def kl_bytes(N: int, C: int, J: int, itemsize: int, backward: bool) -> int:
    """Bytes the fused Gaussian KL must move: mu and logvar read, per-row loss written; backward also
    the J responsibilities written and read back, mu and logvar read again, their gradients written."""
    rows = 2 * N * C * itemsize + N * 4
    if backward:
        rows += 2 * N * J * 4 + 4 * N * C * itemsize
    return rows
