"""Choosing a backend for an op.

Every op has up to four backends:

* ``triton``: Triton kernels, for CUDA tensors (and for CPU tensors when ``TRITON_INTERPRET=1`` was set
  before the first import of medmap_fast: that is how the kernels are tested without a GPU);
* ``cuda``: the CUDA C++ extension (``csrc/cuda``);
* ``cpu``: the C++ extension for the CPU (``csrc/cpu``);
* ``reference``: the plain PyTorch version in :mod:`medmap_fast.reference`, always available.

``backend=None`` (the default) picks the first backend in the device's preference order that can take
the input. The environment variable ``MEDMAP_FAST_BACKEND`` sets the backend for every call that does
not name one. A backend that cannot take an input says why; when nothing can, the error lists every
backend's reason.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")

# Auto-selection order per device type. The Triton interpreter is far too slow to be chosen on its own
# for CPU tensors, so on the CPU it is only used when asked for by name.
PREFERENCE = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

ENV_VAR = "MEDMAP_FAST_BACKEND"


class BackendError(RuntimeError):
    """No backend (or not the requested one) can run this op on this input."""


def _validate_name(backend: Optional[str], source: str) -> Optional[str]:
    if backend is None:
        return None
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The backend asked for by the call, else by ``MEDMAP_FAST_BACKEND``, else None (automatic)."""
    if backend is not None:
        return _validate_name(backend, "backend")
    env = os.environ.get(ENV_VAR, "").strip()
    return _validate_name(env, f"environment variable {ENV_VAR}") if env else None


def select(
    op: str,
    device: torch.device,
    backend: Optional[str],
    reason_for: Callable[[str], Optional[str]],
    order: Optional[Sequence[str]] = None,
) -> str:
    """Pick a backend for ``op``.

    ``reason_for(name)`` returns None when backend ``name`` can take the input, else a short reason.
    """
    wanted = requested_backend(backend)
    if wanted is not None:
        why = reason_for(wanted)
        if why is None:
            return wanted
        others = _reasons(BACKENDS, reason_for)
        raise BackendError(
            f"{op}: backend {wanted!r} cannot take this input: {why}.\n"
            f"All backends:\n{_format(others)}"
        )
    candidates = order if order is not None else PREFERENCE.get(device.type, ("reference",))
    reasons: Dict[str, Optional[str]] = {}
    for name in candidates:
        reasons[name] = reason_for(name)
        if reasons[name] is None:
            return name
    raise BackendError(f"{op}: no backend can take this input:\n{_format(_reasons(BACKENDS, reason_for))}")


def _reasons(names: Sequence[str], reason_for: Callable[[str], Optional[str]]) -> Dict[str, Optional[str]]:
    return {n: reason_for(n) for n in names}


def _format(reasons: Dict[str, Optional[str]]) -> str:
    return "\n".join(f"  - {n}: {r if r is not None else 'available'}" for n, r in reasons.items())
