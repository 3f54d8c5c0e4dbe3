"""The norm + activation kernels (norm_act_fwd / norm_act_bwd) of every backend against the float64
contract reference (tests/norm_act_contract.py), called directly on (B, C, S) views.

Outputs are pre-filled with NaN so that an element a kernel forgets to write shows up. The data sits
far from zero (100 + 50 randn): statistics computed as E[x^2] - E[x]^2 in float32 would fail.
"""

import math
import os

import norm_act_contract as ref
import pytest
import torch
from conftest import FUSED_BACKENDS, fresh_seed, require_backend

from medmap_fast.ops import _backends

NAN = float("nan")
EPS = 1e-5

# Error allowed relative to the scale of each result. float32: the statistics must not cancel.
# float16/bfloat16: statistics and arithmetic in float32, so the output's own rounding dominates.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _interpreted(backend, device):
    return backend == "triton" and device.type == "cpu"


def _layout(t, layout, dtype, device):
    """t (B, C, S, float64) as a (B, C, S) view of dtype on device with the given layout; padding
    around strided views holds NaN."""
    B, C, S = t.shape
    t = t.to(dtype)
    if layout == "ncs":
        return t.to(device).contiguous()
    if layout == "cl":
        return t.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    if layout == "channel_slice":  # channels of a wider NCS tensor: voxels unit stride
        big = torch.full((B, C + 3, S), NAN, dtype=dtype, device=device)
        big[:, 2 : 2 + C] = t.to(device)
        return big[:, 2 : 2 + C]
    if layout == "cl_slice":  # channels of a wider channels-last tensor: channels unit stride
        big = torch.full((B, S, C + 3), NAN, dtype=dtype, device=device)
        v = big[:, :, 1 : 1 + C].transpose(1, 2)
        v.copy_(t.to(device))
        return v
    if layout == "strided":  # neither channels nor voxels unit stride
        big = torch.full((B, S, 2 * C), NAN, dtype=dtype, device=device)
        v = big[:, :, ::2].transpose(1, 2)
        v.copy_(t.to(device))
        return v
    raise ValueError(layout)


def _assert_close(name, got, want, tol, scale=None):
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 1.0
    err = (got - want).abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{name}: max error {err:.3g} > {tol:.2g} x scale {scale:.3g}"


class Problem:
    def __init__(self, B, C, S, G, dtype, layout, mode, slope, device, gen):
        self.B, self.C, self.S, self.G = B, C, S, G
        self.dtype, self.layout, self.mode, self.slope = dtype, layout, mode, slope
        self.device = device
        acc = _acc(dtype)
        x64 = 100 + 50 * torch.randn(B, C, S, generator=gen, dtype=torch.float64)
        r64 = torch.randn(B, C, S, generator=gen, dtype=torch.float64) if mode else None
        dy64 = torch.randn(B, C, S, generator=gen, dtype=torch.float64)
        self.w = torch.randn(C, generator=gen, dtype=torch.float64).to(device, acc)
        self.b = torch.randn(C, generator=gen, dtype=torch.float64).to(device, acc)
        self.x = _layout(x64, layout, dtype, device)
        self.r = _layout(r64, layout, dtype, device) if mode else None
        # act' jumps at z' = 0: where z' is within rounding of zero, a kernel and the float64
        # reference may take different sides, so dy is zero there.
        x_seen = self.x.cpu().double()
        r_seen = self.r.cpu().double() if mode == 1 else None
        z, _, _ = ref.fwd(x_seen, self.w.cpu(), self.b.cpu(), r_seen, G, 1.0, 1 if mode == 1 else 0, EPS)
        dy64[z.abs() < 1e-4 * z.abs().max()] = 0
        self.dy = _layout(dy64, layout, dtype, device)
        # The reference sees exactly the values the kernel sees.
        self.x64 = self.x.cpu().double()
        self.r64 = self.r.cpu().double() if mode else None
        self.dy64 = self.dy.cpu().double()

    def out(self):
        """A NaN-filled output with x's layout."""
        nan = torch.full((self.B, self.C, self.S), NAN, dtype=torch.float64)
        return _layout(nan, self.layout, self.dtype, self.device)

    def forward(self, kern):
        acc = _acc(self.dtype)
        y = self.out()
        mean = torch.full((self.B, self.G), NAN, dtype=acc, device=self.x.device)
        rstd = torch.full_like(mean, NAN)
        kern.norm_act_fwd(self.x, self.w, self.b, self.r, y, mean, rstd, self.G, self.slope, self.mode, EPS)
        return y, mean, rstd

    def backward(self, kern, mean, rstd, with_dres):
        acc = _acc(self.dtype)
        dx = self.out()
        dres = self.out() if (with_dres and self.mode == 1) else None
        dw = torch.full((self.C,), NAN, dtype=acc, device=self.x.device)
        db = torch.full_like(dw, NAN)
        res = self.r if self.mode == 1 else None
        kern.norm_act_bwd(
            self.x, self.w, self.b, res, self.dy, mean, rstd, dx, dres, dw, db, self.G, self.slope, self.mode
        )
        return dx, dres, dw, db

    def check(self, kern, with_dres=True):
        tol = TOL[self.dtype]
        stat_tol = TOL[_acc(self.dtype)] / 10
        y, mean, rstd = self.forward(kern)
        y_ref, mean_ref, rstd_ref = ref.fwd(self.x64, self.w.cpu(), self.b.cpu(), self.r64, self.G, self.slope, self.mode, EPS)
        _assert_close("mean", mean, mean_ref, stat_tol)
        _assert_close("rstd", rstd, rstd_ref, stat_tol)
        # The terms of y are O(1) (w, b, xhat, residual ~ randn), even where they cancel.
        _assert_close("y", y, y_ref, tol, max(y_ref.abs().max().item(), 1.0))

        dx, dres, dw, db = self.backward(kern, mean, rstd, with_dres)
        dx_ref, dres_ref, dw_ref, db_ref = ref.bwd(
            self.x64, self.w.cpu(), self.b.cpu(), self.r64, self.dy64, mean.cpu(), rstd.cpu(), self.G, self.slope, self.mode
        )
        # dx is a difference of terms of size rstd |g w|, which cancel almost entirely when a group
        # holds few voxels: measure it against those terms.
        terms = (rstd.cpu().double().max() * self.w.cpu().double().abs().max() * self.dy64.abs().max()).item()
        _assert_close("dx", dx, dx_ref, tol, max(dx_ref.abs().max().item(), terms))
        dy_scale = self.dy64.abs().max().item()
        _assert_close("dbias", db, db_ref, tol, db_ref.abs().max().item() + dy_scale)
        _assert_close("dweight", dw, dw_ref, tol, dw_ref.abs().max().item() + dy_scale)
        if dres is not None:
            _assert_close("dres", dres, dres_ref, tol)


# (B, C, S, G, dtype, layout, residual_mode, slope, dres given)
F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
CASES = [
    (2, 8, 1500, 8, F32, "ncs", 0, 0.01, False),  # instance norm
    (2, 8, 1500, 8, F32, "cl", 0, 0.01, False),
    (2, 6, 1200, 1, F32, "ncs", 1, 0.2, True),  # one group
    (2, 6, 1200, 1, F32, "cl", 2, 0.0, False),
    (2, 30, 250, 10, F32, "channel_slice", 1, 1.0, False),  # 3 channels per group
    (2, 30, 250, 10, F32, "cl_slice", 2, 0.2, False),
    (2, 6, 700, 3, F32, "strided", 1, 0.01, True),
    (1, 3, 2000, 1, F32, "cl", 1, 0.0, True),  # B = 1
    (2, 4, 1, 2, F32, "ncs", 0, 0.2, False),  # S = 1
    (2, 4, 1, 4, F32, "cl", 1, 0.01, True),
    (2, 30, 250, 10, F64, "ncs", 1, 0.01, True),
    (2, 30, 250, 10, F64, "cl", 2, 0.2, False),
    (2, 8, 1500, 8, F16, "ncs", 0, 0.01, False),
    (2, 30, 250, 10, F16, "cl", 1, 0.2, True),
    (2, 6, 700, 1, F16, "channel_slice", 2, 0.0, False),
    (2, 8, 1500, 8, BF16, "ncs", 1, 0.01, True),
    (2, 30, 250, 10, BF16, "cl", 0, 1.0, False),
]


def _case_id(case):
    B, C, S, G, dtype, layout, mode, slope, dres = case
    return f"B{B}-C{C}-S{S}-G{G}-{str(dtype).replace('torch.', '')}-{layout}-mode{mode}-slope{slope}" + (
        "-dres" if dres else ""
    )


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_contract(backend, case):
    B, C, S, G, dtype, layout, mode, slope, dres = case
    device = require_backend(backend, dtype)
    kern = _backends.kernels(backend, "norm_act")
    gen = torch.Generator().manual_seed(fresh_seed())
    Problem(B, C, S, G, dtype, layout, mode, slope, device, gen).check(kern, dres)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("layout", ["ncs", "cl"])
def test_odd_sizes(backend, layout):
    """Odd batch, channel and volume sizes: ragged ends of every block and chunk."""
    device = require_backend(backend)
    kern = _backends.kernels(backend, "norm_act")
    gen = torch.Generator().manual_seed(fresh_seed())
    # Triton's interpreter runs every program in Python: a smaller odd volume keeps it fast.
    spatial = (5, 7, 9) if _interpreted(backend, device) else (37, 41, 43)
    mode, slope = (1, 0.01) if layout == "ncs" else (2, 0.2)
    Problem(3, 30, math.prod(spatial), 10, torch.float32, layout, mode, slope, device, gen).check(kern, True)


def _run_all(problem, kern):
    y, mean, rstd = problem.forward(kern)
    dx, dres, dw, db = problem.backward(kern, mean, rstd, True)
    return [y, mean, rstd, dx, dres, dw, db]


def _same_bits(run_a, run_b):
    for a, b in zip(run_a, run_b):
        if a is None:
            assert b is None
            continue
        # NaN-free outputs: equal values with equal signs are equal bits for float tensors.
        ca, cb = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        assert torch.equal(ca.view(torch.uint8), cb.view(torch.uint8))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("layout", ["ncs", "cl"])
def test_deterministic(backend, layout):
    device = require_backend(backend)
    kern = _backends.kernels(backend, "norm_act")
    gen = torch.Generator().manual_seed(fresh_seed())
    S = 500 if _interpreted(backend, device) else 3000
    p = Problem(2, 12, S, 4, torch.float32, layout, 1, 0.01, device, gen)
    _same_bits(_run_all(p, kern), _run_all(p, kern))


@pytest.mark.parametrize("layout", ["ncs", "cl", "strided"])
def test_cpu_thread_count_independent(layout):
    """Fixed chunking and combine order: 1 and 2 threads give the same bits. With B * G = 3, one
    thread runs a group per task and two threads run phases over all chunks, which must agree too."""
    device = require_backend("cpu")
    kern = _backends.kernels("cpu", "norm_act")
    gen = torch.Generator().manual_seed(fresh_seed())
    p = Problem(3, 8, 9000, 1, torch.float32, layout, 1, 0.2, device, gen)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all(p, kern)
        torch.set_num_threads(2)
        two = _run_all(p, kern)
    finally:
        torch.set_num_threads(saved)
    _same_bits(one, two)


@pytest.mark.parametrize("layout", ["ncs", "cl"])
def test_cpu_portable_path(layout, monkeypatch):
    """The portable loops (used without AVX2) against the contract, on this AVX2 machine too."""
    device = require_backend("cpu")
    kern = _backends.kernels("cpu", "norm_act")
    monkeypatch.setenv("MEDMAP_FAST_CPU_NO_AVX2", "1")
    gen = torch.Generator().manual_seed(fresh_seed())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        Problem(2, 30, 250, 10, dtype, layout, 1, 0.01, device, gen).check(kern, True)
    assert os.environ["MEDMAP_FAST_CPU_NO_AVX2"] == "1"


def test_cpu_rejects_bad_arguments():
    device = require_backend("cpu")
    kern = _backends.kernels("cpu", "norm_act")
    x = torch.randn(2, 6, 10, device=device)
    w, b = torch.ones(6, device=device), torch.zeros(6, device=device)
    y = torch.empty_like(x)
    mean, rstd = torch.empty(2, 3, device=device), torch.empty(2, 3, device=device)
    with pytest.raises(RuntimeError, match="groups"):
        kern.norm_act_fwd(x, w, b, None, y, mean, rstd, 4, 0.0, 0, EPS)
    with pytest.raises(RuntimeError, match="residual"):
        kern.norm_act_fwd(x, w, b, None, y, mean, rstd, 3, 0.0, 1, EPS)
    with pytest.raises(RuntimeError, match="weight"):
        kern.norm_act_fwd(x, w.double(), b, None, y, mean, rstd, 3, 0.0, 0, EPS)
    with pytest.raises(RuntimeError, match="mean"):
        kern.norm_act_fwd(x, w, b, None, y, torch.empty(2, 6), rstd, 3, 0.0, 0, EPS)
    dx, dw, db = torch.empty_like(x), torch.empty(6), torch.empty(6)
    with pytest.raises(RuntimeError, match="residual"):
        kern.norm_act_bwd(x, w, b, x, x, mean, rstd, dx, None, dw, db, 3, 0.0, 2)
    with pytest.raises(RuntimeError, match="dres"):
        kern.norm_act_bwd(x, w, b, None, x, mean, rstd, dx, torch.empty_like(x), dw, db, 3, 0.0, 0)
