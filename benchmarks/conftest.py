"""Benchmark set-up: sizes, versions in the saved JSON, and a summary of speed-ups and bandwidth.

    pytest benchmarks/ --benchmark-only                      # full size (64^3 on CPU, 128^3 on GPU)
    MEDMAP_FAST_BENCH_SIZE=16 pytest benchmarks/ --benchmark-only   # small, as CI runs it
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json   # keep the raw numbers

The JSON (always autosaved under .benchmarks/ unless --benchmark-json is given) records torch,
triton, cuDNN, the GPU and the measured copy bandwidth next to pytest-benchmark's CPU info.
"""

import os

import torch

import pytest  # noqa: E402

from medmap_fast import _bench, info  # noqa: E402

for _name in ("recompile_limit", "cache_size_limit"):
    # one compiled reference per (mode, layout, pass): more than dynamo's default of 8 recompiles
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_size() -> int:
    if os.environ.get("MEDMAP_FAST_BENCH_SIZE"):
        return int(os.environ["MEDMAP_FAST_BENCH_SIZE"])
    return 128 if bench_device().type == "cuda" else 64


def pytest_configure(config):
    if getattr(config.option, "benchmark_json", None) is None and hasattr(config.option, "benchmark_autosave"):
        config.option.benchmark_autosave = True


def pytest_benchmark_update_machine_info(config, machine_info):
    dev = bench_device()
    machine_info["medmap_fast"] = dict(info.versions(), device=str(dev), bench_size=bench_size(),
                                       copy_bandwidth_GBps=round(_bench.copy_bandwidth(dev) / 1e9, 2))


@pytest.fixture(scope="session")
def device():
    return bench_device()


@pytest.fixture(scope="session")
def size():
    return bench_size()


@pytest.fixture(scope="session")
def copy_bw(device):
    return _bench.copy_bandwidth(device)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    from summarize import own_table, size_rows, size_table, step_rows, step_table, table

    done = [b for b in session.benchmarks if not b.has_error and b.stats]
    rows = [
        dict(group=b.group, impl=b.extra_info.get("impl", b.name), median=b.stats.median,
             bytes=b.extra_info.get("bytes", 0), peak=b.extra_info.get("peak_bytes"))
        for b in done
        if not own_table(b.extra_info)  # test_bench_op_sizes.py and the training step have tables of their own
    ]
    dev = bench_device()
    if rows:
        terminalreporter.section(f"medmap_fast summary on {dev} (medians; fused GB/s vs measured copy bandwidth)")
        for line in table(rows, _bench.copy_bandwidth(dev)):
            terminalreporter.write_line(line)
    sized = size_rows((b.extra_info, b.stats.median) for b in done)
    if sized:
        terminalreporter.section(f"medmap_fast per-op speed by size on {dev} (medians; fused/eager < 1: fused faster)")
        for line in size_table(sized):
            terminalreporter.write_line(line)
    steps = step_rows((b.group, b.extra_info, b.stats.median) for b in done)
    if steps:
        terminalreporter.section(f"medmap_fast training step on {dev} (medians; peak memory of a step above its "
                                 "starting state)")
        for line in step_table(steps):
            terminalreporter.write_line(line)
