"""The alignment kernels (anchor_fwd/bwd, moments_fwd/bwd, gkl_fwd/bwd) of every backend against the
float64 contract reference (tests/alignment_contract.py), called directly on (B, C, S) / (G, R, C) views.

Every input buffer of a missing modality (or dropped gkl group) holds NaN: it must never be read, and
every output that belongs to it must be exactly zero. Outputs are pre-filled with NaN so that an element
a kernel forgets to write shows up.
"""

import math

import alignment_contract as ref
import pytest
import torch
from conftest import FUSED_BACKENDS, fresh_seed, require_backend
from helpers import MASKS, assert_close_to_reference, make_layout, mixed_mask

from medmap_fast.ops import _backends
from medmap_fast.ops._layout import common_bcs

NAN = float("nan")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _close(name, got, exact, dtype):
    """got (any device/dtype) vs the float64 result on the same input values."""
    assert_close_to_reference(name, got.detach().cpu(), exact.detach().cpu().double(), None, dtype)


def _nan_like(t):
    return torch.full_like(t, NAN)


def _mask(kind, B, M, gen):
    return mixed_mask(B, M, gen) if kind == "random" else MASKS[kind](B, M)


def _features(B, M, C, spatial, dtype, device, layout, present, gen, offset=0.0):
    """(B, C, S) views of M modalities in the given layout, as the op layer builds them, with NaN in the
    buffers of missing modalities; plus float64 copies of the same values for the reference."""
    vols = []
    for k in range(M):
        x = (offset + torch.randn(B, C, *spatial, generator=gen, dtype=torch.float64)).to(dtype)
        x[~present[:, k]] = NAN
        vols.append(make_layout(x.to(device), layout))
    views = common_bcs(vols)
    assert all(v.stride() == views[0].stride() for v in views)
    return views, [v.detach().cpu().double() for v in views]


def _other_layout(v):
    """An empty (B, C, S) tensor whose layout differs from v's (outputs may have their own strides)."""
    B, C, S = v.shape
    if v.stride(2) == 1:
        return torch.full((B, S, C), NAN, dtype=v.dtype, device=v.device).transpose(1, 2)
    return torch.full((B, C, S), NAN, dtype=v.dtype, device=v.device)


def _assert_missing_zero(present, per_bk=(), per_k_bcs=()):
    """(B, M, ...) outputs are exactly 0 at missing (b, k); so are the (B, C, S) outputs of modality k."""
    present = present.cpu()
    for t in per_bk:
        t = t.cpu()
        assert (t[:, : present.shape[1]][~present] == 0).all()
    for k, t in enumerate(per_k_bcs):
        assert (t.cpu()[~present[:, k]] == 0).all()


# ---- anchor alignment -----------------------------------------------------------------------------

ANCHOR_CASES = (
    [(torch.float32, layout, mask) for layout in ("contiguous", "channels_last", "channel_slice")
     for mask in ("all", "one", "none", "random")]
    + [(torch.float64, layout, "random") for layout in ("contiguous", "channels_last", "channel_slice")]
    + [(torch.float16, layout, "random") for layout in ("contiguous", "channels_last")]
)


def _case_id(case):
    return "-".join(str(x).replace("torch.", "") for x in case)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", ANCHOR_CASES, ids=_case_id)
def test_anchor(backend, case):
    dtype, layout, mask_kind = case
    M = 3
    device = require_backend(backend, dtype, M)
    kern = _backends.kernels(backend, "anchor_align")
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, C, spatial = 3, 5, (7, 5, 3)
    acc = _acc(dtype)
    present = _mask(mask_kind, B, M, g)
    feats, f64 = _features(B, M, C, spatial, dtype, device, layout, present, g)
    coef = torch.rand(B, M, C, generator=g, dtype=torch.float64) * present.unsqueeze(-1)
    G = torch.randn(B, M, C, generator=g, dtype=torch.float64)
    pres = present.to(device)
    coef_d, G_d = coef.to(device, acc), G.to(device, acc)

    sq_ref, a_ref = ref.anchor_fwd(f64, coef_d.cpu(), present)
    for with_anchor in (True, False):
        sq = torch.full((B, M, C), NAN, dtype=acc, device=device)
        anchor = _other_layout(feats[0]) if with_anchor else None
        kern.anchor_fwd(feats, coef_d, pres, sq, anchor)
        _close("sq", sq, sq_ref, dtype)
        _assert_missing_zero(present, per_bk=[sq])
        if with_anchor:
            _close("anchor", anchor, a_ref, dtype)

    for detach, with_gc in ((False, True), (True, False)):
        gf = [_nan_like(f) for f in feats]
        gc = torch.full((B, M, C), NAN, dtype=acc, device=device) if with_gc else None
        kern.anchor_bwd(feats, coef_d, pres, G_d, detach, gf, gc)
        gf_ref, gc_ref = ref.anchor_bwd(f64, coef_d.cpu(), present, G_d.cpu(), detach)
        for k in range(M):
            _close(f"grad_feats[{k}]", gf[k], gf_ref[k], dtype)
        _assert_missing_zero(present, per_k_bcs=gf)
        if with_gc:
            _close("grad_coef", gc, gc_ref, dtype)
            _assert_missing_zero(present, per_bk=[gc])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_anchor_bwd_options(backend):
    """The other detach / grad_coef combinations, with more modalities and odd sizes."""
    M = 5
    device = require_backend(backend, torch.float32, M)
    kern = _backends.kernels(backend, "anchor_align")
    g = torch.Generator().manual_seed(fresh_seed())
    B, C, spatial = 2, 3, (5, 6, 7)
    present = _mask("random", B, M, g)
    feats, f64 = _features(B, M, C, spatial, torch.float32, device, "channels_last", present, g)
    coef = (torch.rand(B, M, C, generator=g) * present.unsqueeze(-1)).to(device)
    G = torch.randn(B, M, C, generator=g).to(device)
    for detach, with_gc in ((True, True), (False, False)):
        gf = [_nan_like(f) for f in feats]
        gc = torch.full((B, M, C), NAN, device=device) if with_gc else None
        kern.anchor_bwd(feats, coef, present.to(device), G, detach, gf, gc)
        gf_ref, gc_ref = ref.anchor_bwd(f64, coef.cpu(), present, G.cpu(), detach)
        for k in range(M):
            _close(f"grad_feats[{k}]", gf[k], gf_ref[k], torch.float32)
        if with_gc:
            _close("grad_coef", gc, gc_ref, torch.float32)


# ---- moment matching ------------------------------------------------------------------------------

MOMENT_CASES = ANCHOR_CASES


def _moments_check(kern, feats, f64, coef, present, device, dtype, g):
    B, C, _ = feats[0].shape
    M = len(feats)
    acc = _acc(dtype)
    A = int(coef is not None)
    mean = torch.full((B, M + A, C), NAN, dtype=acc, device=device)
    m2 = _nan_like(mean)
    coef_d = coef.to(device, acc) if coef is not None else None
    pres = present.to(device)
    kern.moments_fwd(feats, coef_d, pres, mean, m2)
    mean_ref, m2_ref = ref.moments_fwd(f64, coef_d.cpu() if A else None, present)
    _close("mean", mean, mean_ref, dtype)
    _close("m2", m2, m2_ref, dtype)
    _assert_missing_zero(present, per_bk=[mean, m2])
    return mean, m2, mean_ref, m2_ref


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", MOMENT_CASES, ids=_case_id)
def test_moments(backend, case):
    dtype, layout, mask_kind = case
    M = 3
    device = require_backend(backend, dtype, M)
    kern = _backends.kernels(backend, "moment_matching")
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, C, spatial = 3, 5, (7, 5, 3)
    acc = _acc(dtype)
    present = _mask(mask_kind, B, M, g)
    feats, f64 = _features(B, M, C, spatial, dtype, device, layout, present, g)
    coef = torch.rand(B, M, C, generator=g, dtype=torch.float64) * present.unsqueeze(-1)
    # coef given with and without grad_coef, and no coef (no anchor row): alternating over the cases
    for use_coef, with_gc in ((True, True), (True, False) if MOMENT_CASES.index(case) % 2 else (False, False)):
        cf = coef if use_coef else None
        mean, _, _, _ = _moments_check(kern, feats, f64, cf, present, device, dtype, g)
        K = M + int(use_coef)
        alpha = torch.randn(B, K, C, generator=g, dtype=torch.float64).to(device, acc)
        beta = torch.randn(B, K, C, generator=g, dtype=torch.float64).to(device, acc)
        gf = [_nan_like(f) for f in feats]
        gc = torch.full((B, M, C), NAN, dtype=acc, device=device) if with_gc else None
        cf_d = cf.to(device, acc) if use_coef else None
        kern.moments_bwd(feats, cf_d, present.to(device), mean, alpha, beta, gf, gc)
        gf_ref, gc_ref = ref.moments_bwd(
            f64, cf_d.cpu() if use_coef else None, present, mean.cpu(), alpha.cpu(), beta.cpu()
        )
        for k in range(M):
            _close(f"grad_feats[{k}]", gf[k], gf_ref[k], dtype)
        _assert_missing_zero(present, per_k_bcs=gf)
        if with_gc:
            _close("grad_coef", gc, gc_ref, dtype)
            _assert_missing_zero(present, per_bk=[gc])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_moments_offset_data(backend, layout):
    """100 + randn in fp32: m2 must come out at fp32 accuracy (no sum(x^2) - S mean^2 cancellation)."""
    M = 3
    device = require_backend(backend, torch.float32, M)
    kern = _backends.kernels(backend, "moment_matching")
    g = torch.Generator().manual_seed(fresh_seed())
    B, C, spatial = 2, 3, (7, 11, 13)
    present = torch.tensor([[True, False, True], [True, True, True]])
    feats, f64 = _features(B, M, C, spatial, torch.float32, device, layout, present, g, offset=100.0)
    coef = torch.full((B, M, C), 1.0 / M, dtype=torch.float64) * present.unsqueeze(-1)
    _, m2, _, m2_ref = _moments_check(kern, feats, f64, coef, present, device, torch.float32, g)
    # The variance itself (m2 / S ~ 1), not only m2, is accurate.
    S = math.prod(spatial)
    torch.testing.assert_close((m2.cpu().double() / S), m2_ref / S, atol=1e-5, rtol=1e-5)


# ---- Gaussian KL ----------------------------------------------------------------------------------

GKL_CASES = [
    # dtype, mu layout, logvar kind, J, present kind, w kind
    (torch.float32, "c_unit", "full", 3, "random", "full"),
    (torch.float32, "r_unit", "full", 3, "random", "full"),
    (torch.float32, "c_unit", "scalar", 1, None, "scalar"),
    (torch.float32, "r_unit", "channel", 1, "random", "transposed"),
    (torch.float32, "r_unit", "scalar", 4, None, "scalar"),
    (torch.float32, "c_unit", "full", 2, "all", "full"),
    (torch.float32, "c_unit", "full", 2, "none", "full"),
    (torch.float64, "c_unit", "full", 3, "random", "full"),
    (torch.float64, "r_unit", "channel", 1, "random", "scalar"),
    (torch.float16, "c_unit", "full", 3, "random", "full"),
    (torch.float16, "r_unit", "scalar", 1, None, "full"),
]


def _gkl_inputs(G, R, C, J, dtype, device, mu_layout, lv_kind, present_kind, w_kind, gen):
    acc = _acc(dtype)
    if mu_layout == "c_unit":
        mu = torch.randn(G, R, C, generator=gen, dtype=torch.float64).to(dtype)
    else:  # rows innermost: a permuted view, as (B, C, S) features seen as (B, S, C)
        mu = torch.randn(G, C, R, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
    if lv_kind == "full":
        lv = (0.5 * torch.randn(G, R, C, generator=gen, dtype=torch.float64)).to(dtype)
        if mu_layout == "r_unit":
            lv = lv.transpose(1, 2).contiguous().transpose(1, 2)
    elif lv_kind == "channel":
        lv = (0.5 * torch.randn(C, generator=gen, dtype=torch.float64)).to(dtype).expand(G, R, C)
    else:
        lv = (0.3 * torch.randn((), generator=gen, dtype=torch.float64)).to(dtype).expand(G, R, C)
    present = None
    if present_kind is not None:
        present = _mask(present_kind, 1, G, gen)[0] if present_kind != "random" else torch.rand(G, generator=gen) < 0.6
        if present_kind == "random":
            present[0], present[-1] = False, True
        mu = mu.clone()  # keeps the strides (dense)
        mu[~present] = NAN
        if lv_kind == "full":
            lv = lv.clone()
            lv[~present] = NAN
    nu = torch.randn(J, C, generator=gen, dtype=torch.float64).to(acc)
    logtau2 = (0.3 * torch.randn(J, C, generator=gen, dtype=torch.float64)).to(acc)
    logpi = torch.log_softmax(torch.randn(J, generator=gen, dtype=torch.float64), 0).to(acc)
    if w_kind == "full":
        w = torch.randn(G, R, generator=gen, dtype=torch.float64).to(acc)
    elif w_kind == "transposed":
        w = torch.randn(R, G, generator=gen, dtype=torch.float64).to(acc).t()
    else:
        w = torch.tensor(0.7, dtype=acc).expand(G, R)
    return tuple(t.to(device) if t is not None else None for t in (mu, lv, present, nu, logtau2, logpi, w))


def _clean(t, present):
    """A copy with the dropped groups zeroed: the reference's backward multiplies by the mask, so
    NaN there would leak into it (the kernels never read those rows)."""
    if present is None:
        return t.cpu()
    return torch.where(present.cpu().view(-1, 1, 1), t.cpu(), torch.zeros((), dtype=t.dtype))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", GKL_CASES, ids=_case_id)
def test_gkl(backend, case):
    dtype, mu_layout, lv_kind, J, present_kind, w_kind = case
    device = require_backend(backend, dtype)
    kern = _backends.kernels(backend, "gaussian_kl")
    g = torch.Generator().manual_seed(fresh_seed())
    G, R, C = 4, 35, 5
    acc = _acc(dtype)
    mu, lv, present, nu, lt, logpi, w = _gkl_inputs(G, R, C, J, dtype, device, mu_layout, lv_kind, present_kind,
                                                    w_kind, g)
    pres_cpu = present.cpu() if present is not None else None
    keep = pres_cpu if pres_cpu is not None else torch.ones(G, dtype=torch.bool)

    loss_ref, resp_ref = ref.gkl_fwd(mu.cpu(), lv.cpu(), pres_cpu, nu.cpu(), lt.cpu(), logpi.cpu())
    for with_resp in (True, False):
        loss = torch.full((G, R), NAN, dtype=acc, device=device)
        resp = torch.full((G, R, J), NAN, dtype=acc, device=device) if with_resp else None
        kern.gkl_fwd(mu, lv, present, nu, lt, logpi, loss, resp)
        _close("loss", loss, loss_ref, dtype)
        assert (loss.cpu()[~keep] == 0).all()
        if with_resp:
            _close("resp", resp, resp_ref, dtype)
            assert (resp.cpu()[~keep] == 0).all()

    # The backward on the reference's resp (cast to acc), so that it is checked on its own.
    resp_in = resp_ref.to(device, acc) if J > 1 else None
    gm_ref, gl_ref, st_ref = ref.gkl_bwd(_clean(mu, present), _clean(lv, present), pres_cpu, nu.cpu(), lt.cpu(),
                                         resp_in.cpu() if resp_in is not None else None, w.cpu())
    options = [(True, True, True), (True, False, False), (False, True, True)]
    for want_gm, want_gl, want_st in options:
        gm = _nan_like(mu) if want_gm else None
        # grad_logvar always full-size, in a layout of its own (logvar may be a zero-stride broadcast)
        gl = torch.full((G, C, R), NAN, dtype=dtype, device=device).transpose(1, 2) if want_gl else None
        st = torch.full((3, J, C), NAN, dtype=acc, device=device) if want_st else None
        kern.gkl_bwd(mu, lv, present, nu, lt, resp_in, w, gm, gl, st)
        if want_gm:
            _close("grad_mu", gm, gm_ref, dtype)
            assert (gm.cpu()[~keep] == 0).all()
        if want_gl:
            _close("grad_logvar", gl, gl_ref, dtype)
            assert (gl.cpu()[~keep] == 0).all()
        if want_st:
            _close("stats", st, st_ref, dtype)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_gkl_wide_rows(backend):
    """More channels than one block holds (rows split over channel blocks) and many components."""
    device = require_backend(backend, torch.float32)
    kern = _backends.kernels(backend, "gaussian_kl")
    g = torch.Generator().manual_seed(fresh_seed())
    for mu_layout, C, J in (("c_unit", 300, 5), ("r_unit", 37, 16)):
        G, R = 2, 5
        mu, lv, present, nu, lt, logpi, w = _gkl_inputs(G, R, C, J, torch.float32, device, mu_layout, "full",
                                                        "random", "full", g)
        pres_cpu = present.cpu()
        loss = torch.full((G, R), NAN, device=device)
        resp = torch.full((G, R, J), NAN, device=device)
        kern.gkl_fwd(mu, lv, present, nu, lt, logpi, loss, resp)
        loss_ref, resp_ref = ref.gkl_fwd(mu.cpu(), lv.cpu(), pres_cpu, nu.cpu(), lt.cpu(), logpi.cpu())
        _close("loss", loss, loss_ref, torch.float32)
        # resp_j moves with z_j - z_i, sums of C terms: an absolute error that grows with C in fp32.
        torch.testing.assert_close(resp.cpu().double(), resp_ref, atol=2e-6 * C, rtol=0)
        gm, gl, st = _nan_like(mu), _nan_like(lv), torch.full((3, J, C), NAN, device=device)
        kern.gkl_bwd(mu, lv, present, nu, lt, resp, w, gm, gl, st)
        gm_ref, gl_ref, st_ref = ref.gkl_bwd(_clean(mu, present), _clean(lv, present), pres_cpu, nu.cpu(), lt.cpu(),
                                             resp.cpu(), w.cpu())
        _close("grad_mu", gm, gm_ref, torch.float32)
        _close("grad_logvar", gl, gl_ref, torch.float32)
        _close("stats", st, st_ref, torch.float32)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_gkl_nan_in_kept_row_propagates(backend):
    device = require_backend(backend, torch.float32)
    kern = _backends.kernels(backend, "gaussian_kl")
    g = torch.Generator().manual_seed(fresh_seed())
    G, R, C, J = 2, 6, 4, 3
    mu, lv, _, nu, lt, logpi, _ = _gkl_inputs(G, R, C, J, torch.float32, device, "c_unit", "full", None, "full", g)
    mu = mu.clone()
    mu[1, 2, 3] = NAN
    lv = lv.clone()
    lv[0, 4, 0] = float("-inf")  # var = 0, -logvar = +inf
    loss = torch.full((G, R), NAN, device=device)
    resp = torch.full((G, R, J), NAN, device=device)
    kern.gkl_fwd(mu, lv, None, nu, lt, logpi, loss, resp)
    loss = loss.cpu()
    assert torch.isnan(loss[1, 2]) and torch.isnan(resp.cpu()[1, 2]).all()
    assert loss[0, 4] == float("inf")  # KL_j = +inf for every j: -logsumexp(-inf, ...) = +inf (as torch)
    finite = torch.ones(G, R, dtype=torch.bool)
    finite[1, 2] = finite[0, 4] = False
    assert torch.isfinite(loss[finite]).all()


# ---- empty extents, reproducibility, the Triton chunking --------------------------------------------


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_empty_spatial(backend):
    device = require_backend(backend)
    B, M, C = 2, 2, 3
    feats = [torch.empty(B, C, 0, device=device) for _ in range(M)]
    present = torch.ones(B, M, dtype=torch.bool, device=device)
    coef = torch.full((B, M, C), 0.5, device=device)
    sq = torch.full((B, M, C), NAN, device=device)
    _backends.kernels(backend, "anchor_align").anchor_fwd(feats, coef, present, sq, None)
    assert (sq == 0).all()
    mean = torch.full((B, M + 1, C), NAN, device=device)
    m2 = _nan_like(mean)
    _backends.kernels(backend, "moment_matching").moments_fwd(feats, coef, present, mean, m2)
    assert (mean == 0).all() and (m2 == 0).all()
    mu = torch.empty(2, 0, C, device=device)
    stats = torch.full((3, 1, C), NAN, device=device)
    nu = torch.zeros(1, C, device=device)
    _backends.kernels(backend, "gaussian_kl").gkl_bwd(
        mu, mu, None, nu, nu, None, torch.ones(2, 0, device=device), None, None, stats
    )
    assert (stats == 0).all()


def _all_kernel_outputs(backend, device, g):
    """Every output of every kernel on inputs big enough for several programs / partial sums."""
    B, M, C, spatial = 2, 4, 3, (5, 6, 11)
    present = torch.tensor([[True, False, True, True], [True, True, True, True]])
    feats, _ = _features(B, M, C, spatial, torch.float32, device, "contiguous", present, g)
    cl, _ = _features(B, M, C, spatial, torch.float32, device, "channels_last", present, g)
    coef = (torch.rand(B, M, C, generator=g) * present.unsqueeze(-1)).to(device)
    pres = present.to(device)
    ka, km = _backends.kernels(backend, "anchor_align"), _backends.kernels(backend, "moment_matching")
    sq = torch.empty(B, M, C, device=device)
    ka.anchor_fwd(feats, coef, pres, sq, None)
    gf = [torch.empty_like(f) for f in feats]
    gc = torch.empty(B, M, C, device=device)
    ka.anchor_bwd(feats, coef, pres, torch.ones(B, M, C, device=device), False, gf, gc)
    mean, m2 = torch.empty(B, M + 1, C, device=device), torch.empty(B, M + 1, C, device=device)
    km.moments_fwd(cl, coef, pres, mean, m2)
    gf2 = [torch.empty_like(f) for f in cl]
    gc2 = torch.empty(B, M, C, device=device)
    km.moments_bwd(cl, coef, pres, mean, torch.ones_like(mean), torch.full_like(mean, 0.5), gf2, gc2)
    outs = [sq, gc, mean, m2, gc2] + gf + gf2
    G, R, C, J = 3, 300, 5, 3
    mu, lv, present, nu, lt, logpi, w = _gkl_inputs(G, R, C, J, torch.float32, device, "r_unit", "full", "random",
                                                    "full", g)
    kg = _backends.kernels(backend, "gaussian_kl")
    loss, resp = torch.empty(G, R, device=device), torch.empty(G, R, J, device=device)
    kg.gkl_fwd(mu, lv, present, nu, lt, logpi, loss, resp)
    gm, gl, st = torch.empty_like(mu), torch.empty_like(lv), torch.empty(3, J, C, device=device)
    kg.gkl_bwd(mu, lv, present, nu, lt, resp, w, gm, gl, st)
    return outs + [loss, resp, gm, gl, st]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_deterministic(backend):
    device = require_backend(backend, torch.float32, 4)
    seed = fresh_seed()
    first = _all_kernel_outputs(backend, device, torch.Generator().manual_seed(seed))
    threads = torch.get_num_threads()
    try:
        if backend == "cpu":
            torch.set_num_threads(1)  # the reductions must not depend on the thread count either
        second = _all_kernel_outputs(backend, device, torch.Generator().manual_seed(seed))
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two runs"


def test_triton_multi_tile_programs(monkeypatch):
    """Programs that walk several tiles (large inputs on a GPU) merge their sums correctly; forced
    here by asking for very few programs."""
    device = require_backend("triton", torch.float32, 3)
    from medmap_fast.kernels import anchor_align, gaussian_kl, moment_matching

    monkeypatch.setattr(anchor_align, "TARGET_PROGRAMS", 1)
    monkeypatch.setattr(gaussian_kl, "TARGET_PROGRAMS", 1)
    monkeypatch.setattr(anchor_align, "MAX_TILES_PER_PROGRAM", 4)
    monkeypatch.setattr(gaussian_kl, "MAX_TILES_PER_PROGRAM", 3)
    g = torch.Generator().manual_seed(fresh_seed())
    B, M, C, spatial = 2, 3, 3, (5, 7, 41)  # S = 1435: several tiles per program, a partial one, an empty one
    present = torch.tensor([[True, False, True], [True, True, True]])
    for layout in ("contiguous", "channels_last"):
        feats, f64 = _features(B, M, C, spatial, torch.float32, device, layout, present, g, offset=10.0)
        assert anchor_align.spatial_grid(feats[0])[2] > 1
        coef = (torch.rand(B, M, C, generator=g) * present.unsqueeze(-1)).to(device)
        sq = torch.empty(B, M, C, device=device)
        anchor_align.anchor_fwd(feats, coef, present.to(device), sq, None)
        _close("sq", sq, ref.anchor_fwd(f64, coef.cpu(), present)[0], torch.float32)
        gf = [torch.empty_like(f) for f in feats]
        gc = torch.empty(B, M, C, device=device)
        G = torch.randn(B, M, C, generator=g).to(device)
        anchor_align.anchor_bwd(feats, coef, present.to(device), G, False, gf, gc)
        _close("grad_coef", gc, ref.anchor_bwd(f64, coef.cpu(), present, G.cpu(), False)[1], torch.float32)
        _moments_check(moment_matching, feats, f64, coef, present, device, torch.float32, g)
    G_, R, C, J = 2, 1100, 4, 2
    mu, lv, present, nu, lt, logpi, w = _gkl_inputs(G_, R, C, J, torch.float32, device, "c_unit", "full", "random",
                                                    "full", g)
    _, resp_ref = ref.gkl_fwd(mu.cpu(), lv.cpu(), present.cpu(), nu.cpu(), lt.cpu(), logpi.cpu())
    resp = resp_ref.float().to(device)
    st = torch.empty(3, J, C, device=device)
    gaussian_kl.gkl_bwd(mu, lv, present, nu, lt, resp, w, None, None, st)
    st_ref = ref.gkl_bwd(_clean(mu, present), _clean(lv, present), present.cpu(), nu.cpu(), lt.cpu(), resp.cpu(),
                         w.cpu())[2]
    _close("stats", st, st_ref, torch.float32)


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_limits(backend):
    device = require_backend(backend)
    from medmap_fast.kernels import anchor_align, gaussian_kl

    feats = [torch.zeros(1, 2, 3, device=device) for _ in range(9)]
    present = torch.ones(1, 9, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="modalities"):
        anchor_align.anchor_fwd(feats, torch.zeros(1, 9, 2, device=device), present, torch.empty(1, 9, 2), None)
    mu = torch.zeros(1, 2, 3, device=device)
    with pytest.raises(ValueError, match="components"):
        nu = torch.zeros(17, 3, device=device)
        gaussian_kl.gkl_fwd(mu, mu, None, nu, nu, torch.zeros(17, device=device), torch.empty(1, 2), None)
    with pytest.raises(ValueError, match="channels"):
        big = torch.zeros(1, 2, 1025, device=device)
        nu = torch.zeros(1, 1025, device=device)
        gaussian_kl.gkl_fwd(big, big, None, nu, nu, torch.zeros(1, device=device), torch.empty(1, 2), None)
    with pytest.raises(ValueError, match="J == 1"):
        nu = torch.zeros(2, 3, device=device)
        gaussian_kl.gkl_bwd(mu, mu, None, nu, nu, None, torch.ones(1, 2), mu.clone(), None, None)


def test_triton_launchers_refuse_modalities_that_address_differently():
    """The Triton launchers address every modality with the first one's strides: a list whose
    strides differ on a dim of size > 1 must be refused (the ops never pass one, direct calls
    could); strides that differ only on size-1 dims address alike and are accepted."""
    device = require_backend("triton", torch.float64)
    from medmap_fast.kernels import anchor_align as ka
    from medmap_fast.kernels import masked_fusion as kf

    gen = torch.Generator().manual_seed(fresh_seed())
    base = [torch.randn(2, 3, 5, generator=gen, dtype=torch.float64).to(device) for _ in range(2)]
    mixed = [base[0], base[1].transpose(1, 2).contiguous().transpose(1, 2)]  # NCS and channels-last
    present = torch.ones(2, 2, dtype=torch.bool, device=device)
    coef = torch.full((2, 2, 3), 0.5, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"feats\[1\].*strides"):
        kf.fuse_sum_fwd(mixed, coef, present, torch.empty(2, 3, 5, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"feats\[1\].*strides"):
        ka.anchor_fwd(mixed, coef, present, torch.empty(2, 2, 3, dtype=torch.float64, device=device), None)
    # batch 1: the batch stride is free; 7 instead of 15 addresses the same elements
    one = [t[:1] for t in base]
    odd = [one[0], one[1].as_strided(one[1].shape, (7, 5, 1))]
    out = torch.empty(1, 3, 5, dtype=torch.float64, device=device)
    kf.fuse_sum_fwd(odd, coef[:1], present[:1], out)
    torch.testing.assert_close(out, 0.5 * (one[0] + one[1]))
