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
    groups = {}
    for bench in session.benchmarks:
        if bench.has_error or not bench.stats:
            continue
        groups.setdefault(bench.group, {})[bench.extra_info.get("impl", bench.name)] = bench
    dev = bench_device()
    tr = terminalreporter
    tr.section(f"medmap_fast summary on {dev} (medians; GB/s of the fused op vs measured copy bandwidth)")
    tr.write_line(f"copy bandwidth: {_bench.copy_bandwidth(dev) / 1e9:.1f} GB/s")
    tr.write_line(f"{'group':40s} {'fused ms':>9s} {'ref ms':>9s} {'compile ms':>10s} {'vs ref':>7s} {'vs comp':>7s} {'GB/s':>7s} {'of copy':>7s}")
    for group, impls in sorted(groups.items()):
        med = {k: b.stats.get("median") for k, b in impls.items()}
        fused = med.get("fused")
        if fused is None:
            continue
        ref, comp = med.get("reference"), med.get("compiled")
        nbytes = impls["fused"].extra_info.get("bytes", 0)
        bw = nbytes / fused / 1e9
        tr.write_line(
            f"{group:40s} {fused * 1e3:9.2f} {ref * 1e3 if ref else float('nan'):9.2f} "
            f"{comp * 1e3 if comp else float('nan'):10.2f} {ref / fused if ref else float('nan'):6.1f}x "
            f"{comp / fused if comp else float('nan'):6.2f}x {bw:7.1f} {bw * 1e9 / _bench.copy_bandwidth(dev):7.0%}"
        )
