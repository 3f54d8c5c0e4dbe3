"""Timing and memory helpers shared by the benchmark files (and their script forms).

* :func:`runner`: the timed call of an op, its forward under no_grad or forward + backward;
* :func:`time_op`: the pytest-benchmark run of such a call with its group, bytes moved, bandwidth and
  (optionally) the peak memory of one call, as the op benchmarks record them;
* :func:`step_peak_memory`: the peak memory of one call of anything, torch.compile'd code included,
  on the CPU too (the training-step benchmark and its profile script).
"""

from __future__ import annotations

import gc
from typing import Callable, Optional, Sequence, Union

import torch

from medmap_fast import _bench


def runner(fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], pass_: str, device: torch.device,
           grad_out: Union[None, float, torch.Tensor] = None) -> Callable[[], object]:
    """One timed call of ``fn``: ``pass_ == "fwd"`` the forward under no_grad, else forward + backward
    (the gradients of ``leaves``), synchronised. ``grad_out``, the gradient of the output: a tensor, or a
    number (None: 1) for a tensor of that value made in each call (its fill is then part of the time)."""
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                out = fn()
            _bench.synchronize(device)
            return out
    elif isinstance(grad_out, torch.Tensor):
        def run():
            grads = torch.autograd.grad(fn(), leaves, grad_out)
            _bench.synchronize(device)
            return grads
    else:
        value = 1.0 if grad_out is None else float(grad_out)

        def run():
            out = fn()
            grads = torch.autograd.grad(out, leaves, torch.full_like(out, value))
            _bench.synchronize(device)
            return grads
    return run


def time_op(benchmark, run: Callable[[], object], device: torch.device, group: str, impl: str, nbytes: int,
            shape, peak: bool = False) -> None:
    """Time ``run`` with pytest-benchmark (20 rounds on a GPU, 7 on the CPU; 2 warm-up calls for
    torch.compile, 1 otherwise) and record impl, bytes, shape, GB/s and the fraction of the measured copy
    bandwidth; with ``peak``, also the peak memory of one more call (``_bench.peak_memory``), except for
    compiled code on the CPU: there the peak is counted by a dispatch mode, under which torch.compile
    would not run its compiled code, so no figure rather than the eager one under the compiled name."""
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, bytes=nbytes, shape=shape)
    rounds = 20 if device.type == "cuda" else 7
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2 if impl == "compiled" else 1)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(GBps=nbytes / med / 1e9, fraction_of_copy=nbytes / med / _bench.copy_bandwidth(device))
    if peak and (impl != "compiled" or device.type == "cuda"):
        benchmark.extra_info["peak_bytes"] = _bench.peak_memory(run, device)


def _allocator_peak(prof) -> int:
    """The high-water mark of the bytes allocated (less those freed) during a torch.profiler run with
    ``profile_memory=True``, from its allocation events in time order."""
    from torch._C._profiler import _EventType

    deltas = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            deltas.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, delta in sorted(deltas, key=lambda d: d[0]):
        live += delta
        peak = max(peak, live)
    return peak


def step_peak_memory(fn: Callable[[], object], device: torch.device, before: Optional[Callable[[], None]] = None
                     ) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it.

    CUDA: the caching allocator's peak statistic (``torch.cuda.max_memory_allocated``). CPU: every
    allocation and free of torch's CPU allocator during the call, as torch.profiler records them with
    ``profile_memory=True``: tensors and scratch buffers alike (oneDNN's included), in eager and in
    torch.compile'd code alike (the profiler changes no dispatch). ``before`` runs first, outside the
    measurement (e.g. setting gradients to None, so that their release is not mistaken for the step's).
    """
    if before is not None:
        before()
    gc.collect()
    if device.type == "cuda":
        _bench.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _bench.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _allocator_peak(prof)


def median_seconds(fn: Callable[[], object], rounds: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``rounds`` calls after ``warmup`` calls (CPU scripts: nothing to
    synchronise)."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
