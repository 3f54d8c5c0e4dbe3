"""Backend choice: automatic, per call, by environment variable, and the errors that list every reason."""

import pytest
import torch

import medmap_fast
from medmap_fast import dispatch
from medmap_fast.ops import _backends


def _inputs(M=3):
    return [torch.randn(2, 3, 2, 3, 4) for _ in range(M)], torch.ones(2, M)


def test_auto_picks_cpu_extension_on_cpu():
    assert dispatch.select("x", torch.device("cpu"), None, lambda n: _backends.reason(n, torch.device("cpu"), torch.float32, 4)) == "cpu"


def test_env_var_overrides(monkeypatch):
    feats, mask = _inputs()
    monkeypatch.setenv("MEDMAP_FAST_BACKEND", "reference")
    assert dispatch.requested_backend(None) == "reference"
    assert dispatch.requested_backend("cpu") == "cpu"  # a per-call choice beats the environment
    torch.testing.assert_close(medmap_fast.masked_fusion(feats, mask), medmap_fast.reference.masked_fusion(feats, mask))
    monkeypatch.setenv("MEDMAP_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MEDMAP_FAST_BACKEND.*'fastest'"):
        medmap_fast.masked_fusion(feats, mask)


def test_requested_backend_that_cannot_take_input_lists_all_reasons():
    feats, mask = _inputs()
    with pytest.raises(medmap_fast.BackendError) as info:
        medmap_fast.masked_fusion(feats, mask, backend="cuda")
    msg = str(info.value)
    assert "backend 'cuda' cannot take this input" in msg
    for name in dispatch.BACKENDS:
        assert f"- {name}:" in msg


def test_too_many_modalities_for_pointer_kernels():
    why = _backends.reason("triton", torch.device("cpu"), torch.float32, 9)
    assert why is not None and "at most 8 modalities" in why
    # the CPU backend takes any M
    feats, mask = _inputs(9)
    out = medmap_fast.masked_fusion(feats, mask, backend="cpu")
    torch.testing.assert_close(out, medmap_fast.reference.masked_fusion(feats, mask))


def test_no_backend_error_lists_everything():
    def nothing(name):
        return f"{name} says no"

    with pytest.raises(dispatch.BackendError) as info:
        dispatch.select("masked_fusion", torch.device("cpu"), None, nothing)
    msg = str(info.value)
    assert "no backend can take this input" in msg
    assert all(f"{n} says no" in msg for n in dispatch.BACKENDS)


def test_triton_on_cpu_bf16_reason():
    why = _backends.reason("triton", torch.device("cpu"), torch.bfloat16, 4)
    if torch.cuda.is_available():
        pytest.skip("interpreter not in use on a GPU machine")
    assert why is not None and "bfloat16" in why
