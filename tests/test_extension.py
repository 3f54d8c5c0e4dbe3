"""The C++ extension builds (or loads) on this machine, and the info command reports it."""

import subprocess
import sys

import torch

from medmap_fast import _ext


def test_cpu_extension_loads():
    ok, info = _ext.library("cpu")
    assert ok, f"C++ CPU extension unavailable: {info}"
    assert hasattr(torch.ops.medmap_fast_C, "fuse_sum_fwd")


def test_cuda_extension_state_is_explained():
    ok, info = _ext.library("cuda")
    if not torch.cuda.is_available():
        assert not ok and info  # a reason, never an exception


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "medmap_fast.info"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "reference" in out.stdout


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "medmap_fast.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "medmap_fast.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown command" in bad.stderr
