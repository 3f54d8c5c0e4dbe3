"""Test set-up shared by every test file.

Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before medmap_fast (and so Triton) is first imported; hence this runs at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import medmap_fast  # noqa: E402,F401
from medmap_fast.ops import _backends  # noqa: E402

# Tolerances, in one place. fp32/fp64: absolute and relative error against the float64 reference.
# fp16/bf16: the fused op's error must stay within LOWP_RATIO times the error of the naive reference
# run in the same low precision, plus a floor of a few units in the last place of the output.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
}
LOWP_RATIO = 2.0
LOWP_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def backend_device(backend: str) -> torch.device:
    """The device a backend is tested on here."""
    if backend == "cuda":
        return torch.device("cuda")
    if backend == "triton":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cpu")


def require_backend(backend: str, dtype=torch.float32, num_modalities: int = 4) -> torch.device:
    """The device to test ``backend`` on; skips when this machine cannot run it (GPU-only backends)."""
    dev = backend_device(backend)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{backend} needs a GPU")
    why = _backends.reason(backend, dev, dtype, num_modalities)
    if why is not None:
        if backend in ("cpu", "reference") or (backend == "triton" and dev.type == "cpu" and dtype != torch.bfloat16):
            # These must work on every machine, CI included: fail loudly rather than skip.
            pytest.fail(f"backend {backend} unavailable on {dev}: {why}")
        pytest.skip(f"backend {backend} on {dev}: {why}")
    return dev


FUSED_BACKENDS = ["cpu", "triton", "cuda"]


# The base seed of the differential test (tests/test_differential.py): fresh every run unless given,
# and printed in pytest's header so that any failing case can be replayed.
FUZZ_SEED = int(os.environ.get("MEDMAP_FAST_FUZZ_SEED", "0")) or int.from_bytes(os.urandom(4), "little")


def pytest_report_header(config):
    return f"differential test: MEDMAP_FAST_FUZZ_SEED={FUZZ_SEED}"


def fresh_seed() -> int:
    """A new seed every run (fresh random inputs), printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed = {seed}")
    return seed
