"""masked_fusion on every backend against the float64 reference."""

import itertools
import math

import pytest
import torch

import medmap_fast
from medmap_fast import reference

from conftest import FUSED_BACKENDS, fresh_seed, require_backend
from helpers import LAYOUTS, MASKS, assert_close_to_reference, make_layout, mixed_mask

MODES = ["mean", "weighted", "weighted_norm", "zero_concat"]


def _mode_args(mode):
    if mode == "weighted_norm":
        return "weighted", True
    return mode, False


def _make(B, M, C, spatial, dtype, device, layout, stacked, mask_kind, weight_shape, seed):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(B, C, *spatial, generator=g, dtype=torch.float64) for _ in range(M)]
    mask = mixed_mask(B, M, g) if mask_kind == "random" else MASKS[mask_kind](B, M)
    weights = torch.randn(*weight_shape(B, M, C), generator=g, dtype=torch.float64) if weight_shape else None
    if stacked:
        st = torch.stack(base, 1)
        if layout == "channels_last":
            # channels innermost for the stacked form too
            st = st.permute(0, 1, 3, 4, 5, 2).contiguous().permute(0, 1, 5, 2, 3, 4)
        elif layout != "contiguous":
            st = torch.stack([make_layout(b, layout) for b in base], 2).transpose(1, 2)
        feats = st.to(device=device, dtype=dtype)
        feats64 = feats.double()  # the same (rounded) values, so only the computation differs
    else:
        feats = [make_layout(b.to(device=device, dtype=dtype), layout) for b in base]
        feats64 = [f.double() for f in feats]
    return feats, feats64, mask.to(device), (weights.to(device) if weights is not None else None)


def _leaves(feats):
    return [feats] if isinstance(feats, torch.Tensor) else list(feats)


def _requires_grad(feats, weights):
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().requires_grad_()
    else:
        feats = [f.detach().requires_grad_() for f in feats]
    if weights is not None:
        weights = weights.detach().requires_grad_()
    return feats, weights


def _fwd_bwd(fn, feats, mask, mode, weights, normalize, grad_out_seed, grad_dtype, **kw):
    feats, weights = _requires_grad(feats, weights)
    out = fn(feats, mask, mode, weights, normalize, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64)
    g = g.to(grad_dtype).to(out.device, out.dtype)  # grad_output != 1, same values for every run
    leaves = _leaves(feats) + ([weights] if weights is not None else [])
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads


def _check(backend, dtype, B, M, C, spatial, layout, stacked, mask_kind, mode_name, seed):
    device = require_backend(backend, dtype, M)
    mode, normalize = _mode_args(mode_name)
    wshape = None
    if mode == "weighted":
        wshape = (lambda B, M, C: (B, M, C)) if seed % 2 else (lambda B, M, C: (B, M))
    feats, feats64, mask, w64 = _make(B, M, C, spatial, dtype, device, layout, stacked, mask_kind, wshape, seed)
    # weights stay in fp32 with low-precision features (as under autocast), float64 with float64 ones
    w = w64.to(torch.float64 if dtype == torch.float64 else torch.float32) if w64 is not None else None
    w64 = w.double() if w is not None else None
    out, grads = _fwd_bwd(medmap_fast.masked_fusion, feats, mask, mode, w, normalize, seed + 1, dtype, backend=backend)
    out64, grads64 = _fwd_bwd(reference.masked_fusion, feats64, mask, mode, w64, normalize, seed + 1, dtype)
    lowp = dtype in (torch.float16, torch.bfloat16)
    if lowp:
        naive_out, naive_grads = _fwd_bwd(reference.masked_fusion, feats, mask, mode, w, normalize, seed + 1, dtype)
    else:
        naive_out, naive_grads = None, [None] * len(grads)
    assert out.dtype == dtype
    assert_close_to_reference("output", out, out64, naive_out, dtype)
    for i, (a, b, n) in enumerate(zip(grads, grads64, naive_grads)):
        assert_close_to_reference(f"grad[{i}]", a, b, n, dtype)
    # A sample with nothing present: zero output, zero feature gradient, no NaN.
    empty = ~mask.any(1)
    if empty.any():
        assert (out[empty] == 0).all()
        for gf in grads[: len(_leaves(feats))]:
            assert (gf[empty] == 0).all()
    return out


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mask_kind", ["all", "one", "none", "random"])
def test_matches_reference_fp32(backend, mode, layout, mask_kind):
    seed = fresh_seed()
    _check(backend, torch.float32, 3, 4, 5, (3, 5, 7), layout, False, mask_kind, mode, seed)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
def test_layouts(backend, mode, layout, stacked):
    seed = fresh_seed()
    _check(backend, torch.float32, 2, 3, 6, (4, 3, 5), layout, stacked, "random", mode, seed)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes(backend, dtype, mode, layout):
    seed = fresh_seed()
    _check(backend, dtype, 2, 4, 7, (5, 6, 7), layout, False, "random", mode, seed)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize(
    "B,M,C,spatial",
    [(1, 1, 1, (1, 1, 1)), (1, 5, 3, (2, 9, 1)), (2, 2, 33, (3, 3, 3)), (1, 8, 2, (17,)), (2, 3, 4, (6, 5))],
)
def test_odd_shapes(backend, B, M, C, spatial):
    seed = fresh_seed()
    for mode in MODES:
        _check(backend, torch.float32, B, M, C, spatial, "contiguous", False, "random", mode, seed)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(backend, mode):
    device = require_backend(backend, torch.float64)
    m, normalize = _mode_args(mode)
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(2, 3, 2, 3, 2, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(3)]
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool, device=device)
    inputs = list(feats)
    if m == "weighted":
        w = torch.randn(2, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
        inputs.append(w)

        def fn(*xs):
            return medmap_fast.masked_fusion(list(xs[:-1]), mask, m, xs[-1], normalize, backend=backend)
    else:

        def fn(*xs):
            return medmap_fast.masked_fusion(list(xs), mask, m, backend=backend)

    # The Triton interpreter is slow per call: fast mode (random projections) keeps it to seconds.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_missing_modality_is_never_read(backend):
    device = require_backend(backend)
    feats = [torch.randn(2, 3, 4, 4, 4, device=device) for _ in range(3)]
    feats[1][0] = float("nan")  # sample 0 misses modality 1, whose buffer holds garbage
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], device=device)
    w = torch.rand(2, 3, device=device, requires_grad=True)
    for mode in ("mean", "weighted", "zero_concat"):
        fs = [f.clone().requires_grad_() for f in feats]
        out = medmap_fast.masked_fusion(fs, mask, mode, w if mode == "weighted" else None, backend=backend)
        assert torch.isfinite(out).all(), mode
        out.square().sum().backward()
        assert all(torch.isfinite(f.grad).all() for f in fs), mode
        if mode == "weighted":
            assert torch.isfinite(w.grad).all()
        assert (fs[1].grad[0] == 0).all()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_deterministic(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 16, 9, 10, 11, generator=g).to(device) for _ in range(4)]
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], device=device)
    w = torch.randn(2, 4, 16, generator=g).to(device)
    gout = torch.randn(2, 16, 9, 10, 11, generator=g).to(device)

    def run():
        fs = [f.clone().requires_grad_() for f in feats]
        ww = w.clone().requires_grad_()
        out = medmap_fast.masked_fusion(fs, mask, "weighted", ww, True, backend=backend)
        out.backward(gout)
        return [out.detach()] + [f.grad for f in fs] + [ww.grad]

    first = run()
    threads = torch.get_num_threads()
    try:
        if backend == "cpu":
            torch.set_num_threads(1)  # the CPU reduction must not depend on the thread count either
        second = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_opcheck(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(2, 3, 3, 4, 5, generator=g).to(device).requires_grad_() for _ in range(3)]
    present = torch.tensor([[True, False, True], [False, False, False]], device=device)
    coef = torch.rand(2, 3, 3, generator=g).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.medmap_fast.fuse_sum.default, (feats, coef, present, False, backend))
    torch.library.opcheck(torch.ops.medmap_fast.zero_concat.default, (feats, present, False, backend))
    stacked = torch.randn(2, 3, 3, 4, 5, 2, generator=g).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.medmap_fast.fuse_sum.default, ([stacked], coef, present, True, backend))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile(backend):
    device = require_backend(backend)
    g = torch.Generator().manual_seed(11)
    feats = [torch.randn(2, 4, 3, 4, 5, generator=g).to(device) for _ in range(3)]
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], device=device, dtype=torch.bool)
    w = torch.randn(2, 3, generator=g).to(device)

    def step(fs, ww):
        a = medmap_fast.masked_fusion(fs, mask, "weighted", ww, True, backend=backend)
        b = medmap_fast.masked_fusion(fs, mask, "zero_concat", backend=backend)
        return (a.sin().sum() + b.square().mean()) * 3

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        fs = [f.clone().requires_grad_() for f in feats]
        ww = w.clone().requires_grad_()
        loss = fn(fs, ww)
        loss.backward()
        results.append([loss.detach()] + [f.grad for f in fs] + [ww.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_module():
    fusion = medmap_fast.nn.MaskedFusion("weighted", normalize=True)
    feats = [torch.randn(2, 3, 4, 4, 4) for _ in range(4)]
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 0]])
    w = torch.randn(2, 4)
    torch.testing.assert_close(fusion(feats, mask, w), reference.masked_fusion(feats, mask, "weighted", w, True))
    assert "weighted" in repr(fusion)


def test_mean_is_mean_of_present():
    feats = [torch.full((1, 1, 2, 2, 2), float(k)) for k in range(4)]
    mask = torch.tensor([[0, 1, 0, 1]])
    out = medmap_fast.masked_fusion(feats, mask, "mean")
    assert torch.equal(out, torch.full((1, 1, 2, 2, 2), 2.0))
    zc = medmap_fast.masked_fusion(feats, mask, "zero_concat")
    assert zc.shape == (1, 4, 2, 2, 2)
    assert zc[0, :, 0, 0, 0].tolist() == [0.0, 1.0, 0.0, 3.0]
    assert math.isclose(out.sum().item(), 16.0)


def test_channels_last_output_stays_channels_last():
    feats = [torch.randn(2, 8, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d) for _ in range(2)]
    mask = torch.ones(2, 2)
    for mode in ("mean", "zero_concat"):
        out = medmap_fast.masked_fusion(feats, mask, mode)
        assert out.is_contiguous(memory_format=torch.channels_last_3d), mode


def test_all_modes_all_masks_exhaustive_small():
    """Every one of the 16 masks per sample for M=4 (the 15 subsets plus none)."""
    B, M = 16, 4
    mask = torch.tensor(list(itertools.product([0, 1], repeat=M)), dtype=torch.bool)
    feats = [torch.randn(B, 2, 2, 2, 3, dtype=torch.float64) for _ in range(M)]
    w = torch.randn(B, M, dtype=torch.float64)
    for mode, w_ in (("mean", None), ("weighted", w), ("zero_concat", None)):
        torch.testing.assert_close(
            medmap_fast.masked_fusion(feats, mask, mode, w_, backend="cpu"),
            reference.masked_fusion(feats, mask, mode, w_),
        )


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["BM", "BMC"])
def test_weights_of_missing_modalities_never_reach_the_result(backend, normalize, per_channel):
    """NaN/inf weights of missing modalities change nothing: not the output, not the feature gradients,
    and their own gradient is 0, on every backend (the reference included)."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(fresh_seed())
    B, M, C = 3, 4, 5
    feats = [torch.randn(B, C, 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(M)]
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    clean = torch.randn(B, M, *((C,) if per_channel else ()), generator=g, dtype=torch.float64)
    poisoned = clean.clone()
    bad = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.float64)
    missing = (~mask).nonzero().tolist()
    for i, (b, k) in enumerate(missing):
        poisoned[b, k] = bad[i % 3]
    gout = torch.randn(B, C, 3, 4, 5, generator=g, dtype=torch.float64)

    def run(w, fn, dtype, **kw):
        fs = [f.to(device, dtype).requires_grad_() for f in feats]
        ww = w.to(device, dtype).requires_grad_()
        out = fn(fs, mask.to(device), "weighted", ww, normalize, **kw)
        grads = torch.autograd.grad(out, fs + [ww], gout.to(device, dtype))
        return [out.detach().cpu()] + [t.cpu() for t in grads]

    kw = {} if backend == "reference" else {"backend": backend}
    ours = run(poisoned, medmap_fast.masked_fusion if kw else reference.masked_fusion, torch.float32, **kw)
    same_input_clean = run(clean, medmap_fast.masked_fusion if kw else reference.masked_fusion, torch.float32, **kw)
    exact = run(clean, reference.masked_fusion, torch.float64)
    for i, (a, c, e) in enumerate(zip(ours, same_input_clean, exact)):
        assert torch.isfinite(a).all(), f"output/grad {i} not finite"
        if i < len(ours) - 1:
            assert torch.equal(a, c), f"output/grad {i}: the missing weights' values changed the result"
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5)
    w_grad = ours[-1]
    assert (w_grad[~mask] == 0).all(), "a missing modality's weight got a gradient"
    torch.testing.assert_close(w_grad[mask], same_input_clean[-1][mask])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fuse_sum_kernels_ignore_coefficients_of_missing_modalities(backend):
    """The kernels' own contract, under the op layer's zeroing: out sums present modalities only."""
    from medmap_fast.ops import _backends

    device = require_backend(backend)
    g = torch.Generator().manual_seed(fresh_seed())
    B, M, C, S = 2, 3, 4, 50
    present = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool, device=device)
    feats = [torch.randn(B, C, S, generator=g).to(device) for _ in range(M)]
    coef = torch.rand(B, M, C, generator=g).to(device)
    zeroed = torch.where(present.unsqueeze(-1), coef, 0.0)
    nan_coef = torch.where(present.unsqueeze(-1), coef, float("nan"))
    grad = torch.randn(B, C, S, generator=g).to(device)
    k = _backends.kernels(backend)
    results = []
    for c in (zeroed, nan_coef):
        out = torch.full((B, C, S), float("nan"), device=device)
        k.fuse_sum_fwd(feats, c, present, out)
        gf = [torch.full((B, C, S), float("nan"), device=device) for _ in range(M)]
        gc = torch.full((B, M, C), float("nan"), device=device)
        k.fuse_sum_bwd(grad, feats, c, present, gf, gc)
        results.append([out, *gf, gc])
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)
