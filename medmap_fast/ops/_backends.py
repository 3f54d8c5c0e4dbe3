"""Where each backend's kernels come from, and why a backend cannot take an input.

The native libraries (``csrc/``) register their kernels under ``torch.ops.medmap_fast_C`` (CPU) and
``torch.ops.medmap_fast_cuda`` (CUDA), with the same names and signatures as the Triton launchers in
``medmap_fast.kernels``, so an op looks its kernels up here by backend name.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _ext
from .. import kernels as _triton_pkg  # never fails: it records why Triton is unusable

MAX_MODALITIES = 8  # pointer slots in the Triton and CUDA kernels
MAX_COMPONENTS = 16  # mixture components unrolled by the Triton and CUDA Gaussian-KL kernels
MAX_KL_CHANNELS = 1024  # one row of channels per tile in the Triton and CUDA Gaussian-KL kernels


class _Native:
    def __init__(self, kind: str, namespace: str):
        self.kind = kind
        self.namespace = namespace

    def __getattr__(self, name):
        ok, why = _ext.library(self.kind)
        if not ok:
            raise RuntimeError(f"the {self.kind} extension is unavailable: {why}")
        return getattr(getattr(torch.ops, self.namespace), name)


_NATIVE = {"cpu": _Native("cpu", "medmap_fast_C"), "cuda": _Native("cuda", "medmap_fast_cuda")}


def triton_module(op_module: str):
    """The Triton kernels module of an op (e.g. ``masked_fusion``): ``medmap_fast.kernels.<op>``."""
    return importlib.import_module(f"medmap_fast.kernels.{op_module}")


def kernels(backend: str, op_module: str = "masked_fusion"):
    if backend == "triton":
        return triton_module(op_module)
    if backend in _NATIVE:
        return _NATIVE[backend]
    raise ValueError(f"backend {backend!r} has no kernels (expected 'triton', 'cuda' or 'cpu')")


def triton_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    pkg = _triton_pkg
    if pkg.TRITON_ERROR:
        return pkg.TRITON_ERROR
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"tensors on {device.type} are not supported"
    if not pkg.INTERPRETED:
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing medmap_fast"
    if dtype == torch.bfloat16:
        return "Triton's interpreter (CPU tensors) has no bfloat16"
    return None


def native_reason(kind: str, device: torch.device) -> Optional[str]:
    if device.type != kind:
        return f"needs {kind.upper()} tensors, got tensors on {device.type}"
    ok, why = _ext.library(kind)
    return None if ok else why


def reason(backend: str, device: torch.device, dtype: torch.dtype, num_modalities: int) -> Optional[str]:
    """None if ``backend`` can run the fusion kernels on this input, else why not."""
    if backend == "reference":
        return None
    if backend in ("triton", "cuda") and num_modalities > MAX_MODALITIES:
        return f"supports at most {MAX_MODALITIES} modalities, got M={num_modalities}"
    if backend == "triton":
        return triton_reason(device, dtype)
    return native_reason(backend, device)


def gkl_reason(backend: str, device: torch.device, dtype: torch.dtype, components: int, channels: int) -> Optional[str]:
    """None if ``backend`` can run the Gaussian-KL kernels on rows of ``channels`` and a ``components``-mixture."""
    if backend == "reference":
        return None
    if backend in ("triton", "cuda"):
        if components > MAX_COMPONENTS:
            return f"supports at most {MAX_COMPONENTS} mixture components, got J={components}"
        if channels > MAX_KL_CHANNELS:
            return f"supports at most {MAX_KL_CHANNELS} channels per row, got C={channels}"
    if backend == "triton":
        return triton_reason(device, dtype)
    return native_reason(backend, device)
