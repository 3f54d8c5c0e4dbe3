"""anchor_align, moment_matching and gaussian_kl on every backend against the float64 reference."""

import importlib
import math
import re

import pytest
import torch

import medmap_fast
from medmap_fast import reference

from alignment_cases import (
    compare,
    loss_and_grads,
    make_features,
    make_mask,
    poison_missing,
    to64,
)
from conftest import FUSED_BACKENDS, fresh_seed, require_backend

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (stacked, layout, mask kind, spatial): odd sizes, every mask edge, both forms, the fast layouts.
CASES = [
    (False, "contiguous", "random", (5, 6, 7)),
    (False, "channels_last", "all", (3, 4, 5)),
    (False, "channel_slice", "one", (7, 3, 5)),
    (True, "contiguous", "none", (4, 3, 5)),
    (True, "channels_last", "random", (5, 5, 3)),
    (False, "permuted", "random", (3, 5, 4)),
]


def _lowp(dtype):
    return dtype in (torch.float16, torch.bfloat16)


def _run_both(op, ref_op, inputs, kw, ref_kw, dtype, seed, backend):
    fused = loss_and_grads(op, inputs, seed + 1, backend=backend, **kw)
    exact = loss_and_grads(ref_op, to64(inputs), seed + 1, **ref_kw)
    naive = loss_and_grads(ref_op, inputs, seed + 1, **ref_kw) if _lowp(dtype) else None
    return fused, exact, naive


# ----------------------------------------------------------------------------------------------
# anchor_align
# ----------------------------------------------------------------------------------------------


def _anchor_ref(features, mask, pi=None, sigma2=1.0, **kw):
    return reference.anchor_align(features, mask, pi, kw.pop("anchor"), sigma2, **kw)


def _anchor_op(features, mask, pi=None, sigma2=1.0, **kw):
    return medmap_fast.anchor_align(features, mask, pi, sigma2=sigma2, **kw)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_anchor_align_matches_reference(backend, dtype, case):
    M = 4
    device = require_backend(backend, dtype, M)
    seed = fresh_seed()
    stacked, layout, mask_kind, spatial = CASES[case]
    B, C = 3, (5 if case % 2 else 3)
    feats, _ = make_features(B, M, C, spatial, dtype, device, layout, stacked, seed)
    mask = make_mask(mask_kind, B, M, seed, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed + 3)
    theta = torch.randn(M, generator=g, dtype=acc).to(device)
    # per-channel sigma^2 that is learned, or a plain number; pi per modality or per sample
    sigma2 = (0.5 + torch.rand(C, generator=g, dtype=acc)).to(device) if case % 2 else 0.7
    anchor = "normal" if case == 4 else "mix"
    detach = case == 2
    reduction = ["mean", "sum", "none"][case % 3]
    pi_fn = (lambda t: t.softmax(0)) if case % 3 != 1 else (lambda t: t.softmax(0).expand(B, M) * 2.0)

    def op(features, theta, sigma2, **kw):
        pi = None if anchor == "normal" else pi_fn(theta)
        return _anchor_op(features, mask, pi, sigma2, **kw)

    def ref(features, theta, sigma2, **kw):
        pi = None if anchor == "normal" else pi_fn(theta)
        return _anchor_ref(features, mask, pi, sigma2, **kw)

    inputs = dict(features=feats, theta=theta, sigma2=sigma2 if isinstance(sigma2, torch.Tensor) else None)
    if inputs["sigma2"] is None:
        inputs.pop("sigma2")
        op_, ref_ = (lambda **a: op(sigma2=sigma2, **a)), (lambda **a: ref(sigma2=sigma2, **a))
    else:
        op_, ref_ = op, ref
    kw = dict(anchor=anchor, detach_anchor=detach, reduction=reduction)
    fused, exact, naive = _run_both(op_, ref_, inputs, kw, kw, dtype, seed, backend)
    compare(f"anchor_align[{backend}]", fused, exact, naive, dtype)


# ----------------------------------------------------------------------------------------------
# moment_matching
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_moment_matching_matches_reference(backend, dtype, case):
    M = 4
    device = require_backend(backend, dtype, M)
    seed = fresh_seed()
    stacked, layout, mask_kind, spatial = CASES[case]
    B, C, J = 3, (5 if case % 2 else 3), 3
    feats, _ = make_features(B, M, C, spatial, dtype, device, layout, stacked, seed, offset=0.5, scale=1.5)
    mask = make_mask(mask_kind, B, M, seed, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed + 3)
    target = ["anchor", "anchor", "mixture", "normal", "anchor", "mixture"][case]
    reduction = ["mean", "sum", "none"][case % 3]
    inputs = dict(features=feats)
    kw = dict(target=target, reduction=reduction, detach_anchor=case == 4, eps=1e-5)
    if target == "anchor":
        inputs["theta"] = torch.randn(M, generator=g, dtype=acc).to(device)
    if target == "mixture":
        inputs["nu"] = torch.randn(J, C, generator=g, dtype=acc).to(device)
        inputs["logtau2"] = (0.3 * torch.randn(J, C, generator=g, dtype=acc)).to(device)
        inputs["pi_logits"] = torch.randn(J, generator=g, dtype=acc).to(device)

    def make(fn):
        def run(features, theta=None, **rest):
            pi = theta.softmax(0) if theta is not None else None
            return fn(features, mask, pi, **rest)

        return run

    fused, exact, naive = _run_both(
        make(medmap_fast.moment_matching), make(reference.moment_matching), inputs, kw, kw, dtype, seed, backend
    )
    compare(f"moment_matching[{backend}]", fused, exact, naive, dtype)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_moments_accurate_with_large_offset(backend):
    """x = 100 + 50 randn in fp32: E[x^2] - E[x]^2 would lose the variance; ours must not."""
    device = require_backend(backend, torch.float32, 2)
    seed = fresh_seed()
    feats, feats64 = make_features(2, 2, 3, (9, 8, 7), torch.float32, device, "contiguous", True, seed, 100.0, 50.0)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool, device=device)
    mean, var = medmap_fast.ops.moments(feats, mask, with_anchor=True, backend=backend)
    x = feats64.reshape(2, 2, 3, -1).cpu()
    a = reference.anchor(x, mask.cpu()).unsqueeze(1)
    full = torch.cat([x, a], 1)
    m64, v64 = full.mean(-1), full.var(-1, unbiased=False)
    keep = torch.cat([mask.cpu(), torch.ones(2, 1, dtype=torch.bool)], 1).unsqueeze(-1)
    torch.testing.assert_close(mean.cpu().double(), m64 * keep, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(var.cpu().double(), v64 * keep, rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# gaussian_kl
# ----------------------------------------------------------------------------------------------

KL_CASES = [
    # (target, logvar form, mask, layout of the rows)
    ("normal", "full", None, "rows"),
    ("mixture", "full", "prefix", "permuted"),
    ("mixture", "scalar", None, "rows"),
    ("mixture", "channel", "prefix", "rows"),
    ("normal", "none", "prefix", "permuted"),
    ("mixture", "full", "prefix2", "rows"),
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(KL_CASES)))
def test_gaussian_kl_matches_reference(backend, dtype, case):
    device = require_backend(backend, dtype, 1)
    seed = fresh_seed()
    target, lv_form, mask_form, layout = KL_CASES[case]
    g = torch.Generator().manual_seed(seed)
    B, M, C, J = 2, 3, (5 if case % 2 else 7), (1 if case == 5 else 3)
    spatial = (3, 4, 5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if layout == "permuted":
        # (B, M, C, *spatial) features read as rows (B, M, *spatial, C): C strided, voxels unit stride
        base = torch.randn(B, M, C, *spatial, generator=g, dtype=torch.float64)
        mu = base.to(dtype).to(device).movedim(2, -1)
    else:
        mu = torch.randn(B, M, *spatial, C, generator=g, dtype=torch.float64).to(dtype).to(device)
    inputs = dict(mu=mu)
    if lv_form == "full":
        inputs["logvar"] = (0.5 * torch.randn(mu.shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
    elif lv_form == "channel":
        inputs["logvar"] = (0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype).to(device)
    kw = dict(reduction=["mean", "sum", "none"][case % 3])
    if mask_form == "prefix":
        mask = make_mask("random", B, M, seed, device)
    elif mask_form == "prefix2":
        mask = torch.rand(B, M, spatial[0], generator=g) < 0.6
        mask = mask.to(device)
    else:
        mask = None
    if target == "mixture":
        inputs["nu"] = torch.randn(J, C, generator=g, dtype=acc).to(device)
        inputs["logtau2"] = (0.3 * torch.randn(J, C, generator=g, dtype=acc)).to(device)
        inputs["pi_logits"] = torch.randn(J, generator=g, dtype=acc).to(device)
    const_lv = -0.4 if lv_form == "scalar" else None

    def make(fn, is_ref):
        def run(mu, logvar=None, nu=None, logtau2=None, pi_logits=None, **rest):
            lv = const_lv if logvar is None and const_lv is not None else logvar
            if is_ref:
                return fn(mu, lv, nu, logtau2, None, pi_logits, mask, **rest)
            return fn(mu, lv, nu=nu, logtau2=logtau2, pi_logits=pi_logits, mask=mask, **rest)

        return run

    fused, exact, naive = _run_both(
        make(medmap_fast.gaussian_kl, False), make(reference.gaussian_kl, True), inputs, kw, kw, dtype, seed, backend
    )
    compare(f"gaussian_kl[{backend}]", fused, exact, naive, dtype)


def test_mixture_kl_against_monte_carlo():
    """Well-separated components: KL_var is close to the true KL(q || mixture) (Monte Carlo)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    C, J, N = 3, 3, 4
    nu = torch.tensor([[-8.0, 0, 0], [8.0, 0, 0], [0, 8.0, 0]], dtype=torch.float64)
    logtau2 = 0.2 * torch.randn(J, C, generator=g, dtype=torch.float64)
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    # each q sits near one component, so one term dominates the mixture wherever q has mass
    mu = nu[torch.arange(N) % J] + 0.3 * torch.randn(N, C, generator=g, dtype=torch.float64)
    logvar = 0.3 * torch.randn(N, C, generator=g, dtype=torch.float64)
    ours = medmap_fast.gaussian_kl(mu, logvar, nu=nu, logtau2=logtau2, pi=pi, reduction="none", backend="cpu")
    D = torch.distributions
    comp = D.Independent(D.Normal(nu, (0.5 * logtau2).exp()), 1)
    mix = D.MixtureSameFamily(D.Categorical(probs=pi), comp)
    for n in range(N):
        q = D.Independent(D.Normal(mu[n], (0.5 * logvar[n]).exp()), 1)
        x = q.sample((200_000,))
        mc = (q.log_prob(x) - mix.log_prob(x)).mean()
        se = (q.log_prob(x) - mix.log_prob(x)).std() / math.sqrt(x.shape[0])
        assert abs(ours[n].item() - mc.item()) < 5 * se.item() + 2e-3, (n, ours[n].item(), mc.item(), se.item())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_mixture_kl_below_weighted_component_kls(backend):
    """KL_var(q || p) <= sum_j pi_j KL(q || p_j) on random cases (Jensen)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    N, C, J = 64, 4, 5
    mu = 2 * torch.randn(N, C, generator=g, dtype=torch.float64)
    logvar = torch.randn(N, C, generator=g, dtype=torch.float64)
    nu = 2 * torch.randn(J, C, generator=g, dtype=torch.float64)
    logtau2 = torch.randn(J, C, generator=g, dtype=torch.float64)
    pi = torch.rand(J, generator=g, dtype=torch.float64) + 0.05
    pi = pi / pi.sum()
    kl_var = medmap_fast.gaussian_kl(mu, logvar, nu=nu, logtau2=logtau2, pi=pi, reduction="none", backend=backend)
    per_comp = torch.stack(
        [
            reference.gaussian_kl(mu, logvar, nu[j : j + 1], logtau2[j : j + 1], reduction="none")
            for j in range(J)
        ],
        -1,
    )
    bound = (per_comp * pi).sum(-1)
    assert (kl_var <= bound + 1e-10).all()


# ----------------------------------------------------------------------------------------------
# Edge cases shared by the three ops
# ----------------------------------------------------------------------------------------------


def _three_ops(feats, mask, backend, **kw):
    """Each op's loss on the features (gaussian_kl per voxel, stacked view)."""
    st = torch.stack(list(feats), 1) if not isinstance(feats, torch.Tensor) else feats
    C = st.shape[2]
    nu = torch.zeros(2, C, dtype=torch.float32, device=st.device)
    nu[1] += 1
    return {
        "anchor_align": medmap_fast.anchor_align(feats, mask, backend=backend, **kw),
        "moment_matching": medmap_fast.moment_matching(feats, mask, backend=backend, **kw),
        "gaussian_kl": medmap_fast.gaussian_kl(
            st.movedim(2, -1), nu=nu, logtau2=torch.zeros_like(nu), mask=mask, backend=backend, **kw
        ),
    }


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_sample_with_nothing_present_adds_nothing(backend):
    device = require_backend(backend)
    seed = fresh_seed()
    feats, _ = make_features(3, 4, 3, (4, 3, 5), torch.float32, device, "contiguous", False, seed)
    mask = make_mask("random", 3, 4, seed, device)
    mask[0] = False
    poison_missing(feats, mask)
    feats = [f.requires_grad_() for f in feats]
    losses = _three_ops(feats, mask, backend, reduction="sum")
    trimmed = _three_ops([f[1:].detach() for f in feats], mask[1:], backend, reduction="sum")
    for name, loss in losses.items():
        assert torch.isfinite(loss), name
        torch.testing.assert_close(loss, trimmed[name], rtol=1e-5, atol=1e-6, msg=name)
        grads = torch.autograd.grad(loss, feats)
        for k, gk in enumerate(grads):
            assert torch.isfinite(gk[mask[:, k]]).all(), name
            assert (gk[~mask[:, k]] == 0).all(), f"{name}: missing modality {k} got a gradient"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_finite_input_gives_nan_or_clear_error(backend):
    feats = [torch.randn(2, 3, 4, 4, 4) for _ in range(3)]
    mask = torch.ones(2, 3, dtype=torch.bool)
    feats[1][1, 2, 3, 0, 1] = float("nan")
    for name, loss in _three_ops(feats, mask, backend).items():
        assert torch.isnan(loss), f"{name} should be NaN like PyTorch's losses, got {loss}"
    with pytest.raises(ValueError, match=r"features\[1\].*\(1, 2, 3, 0, 1\)"):
        medmap_fast.anchor_align(feats, mask, check_finite=True, backend=backend)
    with pytest.raises(ValueError, match=r"features\[1\].*\(1, 2, 3, 0, 1\)"):
        medmap_fast.moment_matching(feats, mask, check_finite=True, backend=backend)
    mu = torch.randn(5, 4)
    mu[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"mu.*\(3, 2\)"):
        medmap_fast.gaussian_kl(mu, check_finite=True, backend=backend)
    # a non-finite value in a missing modality is not an error: it is never read
    mask[1, 1] = False
    medmap_fast.anchor_align(feats, mask, check_finite=True, backend=backend)


@pytest.mark.parametrize("op", ["anchor_align", "moment_matching", "gaussian_kl"])
def test_deterministic(op):
    """Two runs, bitwise equal losses and gradients (reductions without atomics)."""
    require_backend("cpu")
    seed = fresh_seed()
    feats, _ = make_features(2, 4, 16, (24, 20, 18), torch.float32, torch.device("cpu"), "contiguous", False, seed)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    theta = torch.randn(4)
    nu, lt, pl = torch.randn(4, 16), torch.zeros(4, 16), torch.zeros(4)

    def run():
        fs = [f.detach().clone().requires_grad_() for f in feats]
        th = theta.clone().requires_grad_()
        params = [nu.clone().requires_grad_(), lt.clone().requires_grad_(), pl.clone().requires_grad_()]
        if op == "anchor_align":
            loss = medmap_fast.anchor_align(fs, mask, th.softmax(0), backend="cpu")
            leaves = fs + [th]
        elif op == "moment_matching":
            loss = medmap_fast.moment_matching(fs, mask, th.softmax(0), backend="cpu")
            leaves = fs + [th]
        else:
            mu = torch.stack(fs, 1).movedim(2, -1)
            loss = medmap_fast.gaussian_kl(mu, nu=params[0], logtau2=params[1], pi_logits=params[2], mask=mask, backend="cpu")
            leaves = fs + params
        return [loss, *torch.autograd.grad(loss * 3.0, leaves)]

    a, b = run(), run()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# Autograd, torch.library, torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck(backend):
    device = require_backend(backend, torch.float64)
    # Triton's interpreter runs each launch in Python: its slow mode would take minutes.
    fast = backend == "triton" and device.type == "cpu"
    gradcheck = lambda fn, args: torch.autograd.gradcheck(fn, args, fast_mode=fast)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 3, 3, 2, 2, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(3)]
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool, device=device)
    theta = torch.randn(3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    sigma2 = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()

    def aa(*args):
        *fs, th, s2 = args
        return medmap_fast.anchor_align(list(fs), mask, th.softmax(0), sigma2=s2, reduction="none", backend=backend)

    assert gradcheck(aa, (*feats, theta, sigma2))

    def mm(*args):
        *fs, th = args
        return medmap_fast.moment_matching(list(fs), mask, th.softmax(0), reduction="none", backend=backend)

    assert gradcheck(mm, (*feats, theta))
    mu = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    lv = (0.3 * torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    nu = torch.randn(3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    lt = (0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    pl = torch.randn(3, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def kl(mu, lv, nu, lt, pl):
        return medmap_fast.gaussian_kl(mu, lv, nu=nu, logtau2=lt, pi_logits=pl, mask=mask, reduction="none", backend=backend)

    assert gradcheck(kl, (mu, lv, nu, lt, pl))


def test_opcheck_custom_ops():
    require_backend("cpu")
    # the modules, not the public functions of the same names that medmap_fast.ops exports
    aa_mod = importlib.import_module("medmap_fast.ops.anchor_align")
    kl_mod = importlib.import_module("medmap_fast.ops.gaussian_kl")
    mm_mod = importlib.import_module("medmap_fast.ops.moment_matching")

    feats = [torch.randn(2, 3, 4, 5, requires_grad=True) for _ in range(3)]
    present = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    coef = aa_mod.anchor_coefficients(present, None, 3, torch.float32).requires_grad_()
    torch.library.opcheck(aa_mod.anchor_sq, (feats, coef, present, False, False, "cpu"))
    torch.library.opcheck(mm_mod.channel_moments, (feats, coef, present, False, "cpu"))
    mu = torch.randn(2, 7, 4, requires_grad=True)
    lv = torch.randn(2, 7, 4, requires_grad=True)
    nu, lt = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    logpi = torch.log_softmax(torch.randn(3), 0).requires_grad_()
    torch.library.opcheck(kl_mod.gaussian_kl_rows, (mu, lv, present[:, 0].clone(), nu, lt, logpi, True, "cpu"))


def test_torch_compile_fullgraph():
    require_backend("cpu")
    feats = [torch.randn(2, 4, 3, 4, 5, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    theta = torch.zeros(3, requires_grad=True)
    nu, lt = torch.randn(2, 4, requires_grad=True), torch.zeros(2, 4, requires_grad=True)

    def losses(fs, th, nu, lt):
        st = torch.stack(fs, 1).movedim(2, -1)
        return (
            medmap_fast.anchor_align(fs, mask, th.softmax(0), backend="cpu")
            + medmap_fast.moment_matching(fs, mask, th.softmax(0), backend="cpu")
            + medmap_fast.gaussian_kl(st, nu=nu, logtau2=lt, mask=mask, backend="cpu")
        )

    eager = losses(feats, theta, nu, lt)
    g_eager = torch.autograd.grad(eager, [*feats, theta, nu, lt])
    compiled = torch.compile(losses, fullgraph=True)(feats, theta, nu, lt)
    g_comp = torch.autograd.grad(compiled, [*feats, theta, nu, lt])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# anchor_impute fusion mode and return_anchor
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_anchor_impute_and_returned_anchor(backend, layout):
    dtype = torch.float32
    device = require_backend(backend, dtype, 4)
    seed = fresh_seed()
    feats, _ = make_features(3, 4, 5, (3, 4, 5), dtype, device, layout, False, seed)
    mask = make_mask("random", 3, 4, seed, device)
    theta = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def impute(features, theta, fn, **kw):
        return fn(features, mask, "anchor_impute", theta.softmax(0), **kw)

    fused = loss_and_grads(lambda **a: impute(fn=medmap_fast.masked_fusion, backend=backend, **a),
                           dict(features=feats, theta=theta.float().to(device)), seed + 1)
    exact = loss_and_grads(lambda **a: impute(fn=reference.masked_fusion, **a), to64(dict(features=feats, theta=theta)), seed + 1)
    compare("anchor_impute", fused, exact)
    if layout == "channels_last":
        assert fused[0].is_contiguous(memory_format=torch.channels_last_3d)
    # the anchor returned by anchor_align: differentiable (checked against the reference's gradient),
    # and from the single-read inference path when nothing needs a gradient
    a64 = reference.anchor([f.double() for f in feats], mask, theta.softmax(0))
    g_a = torch.rand(a64.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    fs = [f.detach().clone().requires_grad_() for f in feats]
    th = theta.float().to(device).requires_grad_()
    loss, a = medmap_fast.anchor_align(fs, mask, th.softmax(0), return_anchor=True, backend=backend)
    torch.testing.assert_close(a.double(), a64, rtol=2e-5, atol=2e-5)
    grads = torch.autograd.grad(a, fs + [th], g_a.to(a.dtype))
    fs64 = [f.detach().double().requires_grad_() for f in feats]
    th64 = theta.detach().clone().requires_grad_()
    grads64 = torch.autograd.grad(reference.anchor(fs64, mask, th64.softmax(0)), fs64 + [th64], g_a)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=2e-5, atol=2e-5)
    with torch.no_grad():
        _, a_inf = medmap_fast.anchor_align(feats, mask, theta.float().softmax(0).to(device), return_anchor=True, backend=backend)
    torch.testing.assert_close(a_inf.double(), a64, rtol=2e-5, atol=2e-5)


def test_cpu_portable_path_without_avx2(monkeypatch):
    """The CPU kernels' portable code (taken on machines without AVX2/FMA) against the float64 reference."""
    require_backend("cpu")
    monkeypatch.setenv("MEDMAP_FAST_CPU_NO_AVX2", "1")
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    feats, feats64 = make_features(2, 3, 5, (6, 5, 7), torch.float32, torch.device("cpu"), "channels_last", False, seed)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    pi = torch.rand(3, generator=g) + 0.1
    for op in ("anchor_align", "moment_matching"):
        ours = getattr(medmap_fast, op)(feats, mask, pi, backend="cpu")
        ref = getattr(reference, op)(feats64, mask, pi.double())
        torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=2e-6)
    mu = torch.randn(2, 3, 40, 5, generator=g)
    lv = 0.5 * torch.randn(2, 3, 40, 5, generator=g)
    nu, lt = torch.randn(4, 5, generator=g), 0.3 * torch.randn(4, 5, generator=g)
    ours = medmap_fast.gaussian_kl(mu, lv, nu=nu, logtau2=lt, mask=mask, reduction="none", backend="cpu")
    ref = reference.gaussian_kl(mu.double(), lv.double(), nu.double(), lt.double(), mask=mask, reduction="none")
    torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=2e-5)


def test_edge_inputs():
    """Empty batches, zero mixture weights, half-precision reference fallback, large-offset mixtures."""
    require_backend("cpu")
    for backend in ("cpu", "reference"):
        empty = torch.randn(0, 3, 4, 2, 2)
        assert medmap_fast.anchor_align(empty, torch.ones(0, 3), backend=backend, reduction="sum") == 0
        assert medmap_fast.moment_matching(empty, torch.ones(0, 3), backend=backend, reduction="sum") == 0
        # a component of weight 0 drops out, with finite gradients for every weight
        pi = torch.tensor([0.5, 0.5, 0.0], requires_grad=True)
        nu = torch.randn(3, 4)
        kl = medmap_fast.gaussian_kl(torch.randn(10, 4), nu=nu, logtau2=torch.zeros(3, 4), pi=pi, backend=backend)
        (g,) = torch.autograd.grad(kl, [pi])
        assert torch.isfinite(kl) and torch.isfinite(g).all()
        two = medmap_fast.gaussian_kl(torch.randn(10, 4), nu=nu[:2], logtau2=torch.zeros(2, 4), pi=pi[:2].detach(), backend=backend)
        assert torch.isfinite(two)
    # half-precision input that overflows if summed in half: the reference path widens first
    big = [300 * torch.randn(2, 4, 3, 4, 5).half() for _ in range(3)]
    ones = torch.ones(2, 3, dtype=torch.bool)
    ref = medmap_fast.anchor_align(big, ones, backend="reference")
    fused = medmap_fast.anchor_align(big, ones, backend="cpu")
    assert torch.isfinite(ref) and torch.isfinite(fused)
    torch.testing.assert_close(ref, fused, rtol=1e-4, atol=0)
    # mixture target moments far from 0: variance from centred terms, not E[x^2] - E[x]^2
    nu = torch.tensor([[3000.0], [3000.5]])
    lt = torch.full((2, 1), -2.0)
    f = 3000 + torch.randn(2, 2, 1, 5, 5, 5)
    ours = medmap_fast.moment_matching(f, torch.ones(2, 2), target="mixture", nu=nu, logtau2=lt, backend="cpu")
    exact = reference.moment_matching(f.double(), torch.ones(2, 2), target="mixture", nu=nu.double(), logtau2=lt.double())
    torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Inputs that define no anchor, no mixture or no statistic: one error on every backend
# ----------------------------------------------------------------------------------------------

UNDEFINED_BACKENDS = ["cpu", "triton", "reference"]


def _t1_missing_case(device):
    """Sample 1 lacks modality 0 (T1); sample 2 has nothing present; pi puts all weight on T1."""
    g = torch.Generator().manual_seed(fresh_seed())
    feats = [torch.randn(3, 2, 3, 2, 2, generator=g).to(device) for _ in range(4)]
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool, device=device)
    return feats, mask, torch.tensor([1.0, 0.0, 0.0, 0.0], device=device)


def _anchor_users(backend):
    """Every public entry point that builds the anchor from weights over the modalities."""
    return {
        "anchor_align": lambda f, m, pi: medmap_fast.anchor_align(f, m, pi, backend=backend),
        "anchor_align(return_anchor)": lambda f, m, pi: medmap_fast.anchor_align(
            f, m, pi, return_anchor=True, backend=backend
        ),
        "moment_matching": lambda f, m, pi: medmap_fast.moment_matching(f, m, pi, backend=backend),
        "moments": lambda f, m, pi: medmap_fast.ops.moments(f, m, pi, with_anchor=True, backend=backend),
        "masked_fusion(anchor_impute)": lambda f, m, pi: medmap_fast.masked_fusion(
            f, m, "anchor_impute", pi, backend=backend
        ),
    }


@pytest.mark.parametrize("backend", UNDEFINED_BACKENDS)
def test_weights_summing_to_zero_on_the_present_modalities_are_refused(backend):
    device = require_backend(backend)
    feats, mask, pi = _t1_missing_case(device)
    for name, call in _anchor_users(backend).items():
        arg = "weights" if "masked_fusion" in name else "pi"
        with pytest.raises(ValueError) as info:
            call(feats, mask, pi)
        msg = str(info.value)
        # the argument, the sample, its present modalities and the weights got, what is expected
        for words in (f"{arg}:", "sum to 0 in sample(s) [1] (1 of 3)", "sample 1 has modalities [1, 2] present",
                      f"{arg} = [1.0, 0.0, 0.0, 0.0]", "Expected a positive weight"):
            assert words in msg, f"{name}: {words!r} not in {msg!r}"
    # per-sample weights: the error shows that sample's row
    pi_bm = torch.ones(3, 4, device=device)
    pi_bm[0, [0, 1, 3]] = 0.0
    with pytest.raises(ValueError, match=r"sample\(s\) \[0\].*pi\[0\] = \[0\.0, 0\.0, 1\.0, 0\.0\]"):
        medmap_fast.anchor_align(feats, mask, pi_bm, backend=backend)
    # all zero: every sample with something present is named, the empty one is not
    with pytest.raises(ValueError, match=r"sample\(s\) \[0, 1\] \(2 of 3\)"):
        medmap_fast.moment_matching(feats, mask, torch.zeros(4, device=device), backend=backend)


@pytest.mark.parametrize("backend", UNDEFINED_BACKENDS)
def test_zero_weights_that_still_define_every_anchor_are_fine(backend):
    """Zero weights are legal where each sample keeps a positive weight on a present modality, and a
    sample with nothing present needs no weight at all (it adds nothing, gradient 0)."""
    device = require_backend(backend)
    feats, mask, _ = _t1_missing_case(device)
    pi = torch.tensor([1.0, 0.0, 2.0, 0.0], device=device)
    pi_bm = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], device=device)
    f64 = [f.double().cpu() for f in feats]
    for p in (pi, pi_bm):
        for name, call in _anchor_users(backend).items():
            call(feats, mask, p)
        ours = medmap_fast.anchor_align(feats, mask, p, reduction="none", backend=backend)
        exact = reference.anchor_align(f64, mask.cpu(), p.double().cpu(), reduction="none")
        torch.testing.assert_close(ours.double().cpu(), exact, rtol=2e-5, atol=2e-6)
        assert (ours[2] == 0).all()
        fs = [f.clone().requires_grad_() for f in feats]
        grads = torch.autograd.grad(medmap_fast.moment_matching(fs, mask, p, backend=backend), fs)
        assert all(torch.isfinite(g).all() and (g[2] == 0).all() for g in grads)


@pytest.mark.parametrize("backend", UNDEFINED_BACKENDS)
@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_negative_or_non_finite_anchor_weights_are_refused(backend, value):
    device = require_backend(backend)
    feats, mask, _ = _t1_missing_case(device)
    pi = torch.ones(4, device=device)
    pi[2] = value
    for name, call in _anchor_users(backend).items():
        arg = "weights" if "masked_fusion" in name else "pi"
        with pytest.raises(ValueError, match=rf"{arg} must be finite and non-negative, got {value} at index \(2,\)"):
            call(feats, mask, pi)


def test_reference_defines_the_same_refusals():
    feats, mask, pi = _t1_missing_case(torch.device("cpu"))
    for call in (
        lambda: reference.anchor(feats, mask, pi),
        lambda: reference.anchor_align(feats, mask, pi),
        lambda: reference.moment_matching(feats, mask, pi),
    ):
        with pytest.raises(ValueError, match=r"pi: the weights .* sum to 0 in sample\(s\) \[1\]"):
            call()
    with pytest.raises(ValueError, match=r"weights: .* sample\(s\) \[1\]"):
        reference.masked_fusion(feats, mask, "anchor_impute", pi)
    # untraced checks aside, the arithmetic itself never turns such a sample into a = 0
    w = reference.anchor_weights_unchecked(mask, pi, torch.float64)
    assert torch.isnan(w[1, 1:3]).all() and (w[1, [0, 3]] == 0).all()
    assert (w[2] == 0).all() and w[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_zero_anchor_weights_under_torch_compile_give_nan_not_a_zero_anchor():
    """Value checks are skipped while tracing; the sample then gives NaN, never the P_N objective."""
    require_backend("cpu")
    feats, mask, pi = _t1_missing_case(torch.device("cpu"))
    fn = torch.compile(lambda f, m, p: medmap_fast.anchor_align(f, m, p, reduction="none", backend="cpu"),
                       backend="aot_eager", fullgraph=True)
    per_bk = fn(feats, mask, pi)
    assert torch.isnan(per_bk[1, 1:3]).all() and (per_bk[1, [0, 3]] == 0).all()
    assert torch.isfinite(per_bk[0]).all() and (per_bk[2] == 0).all()


@pytest.mark.parametrize("backend", UNDEFINED_BACKENDS)
def test_mixture_weights_must_have_a_positive_sum(backend):
    device = require_backend(backend)
    C = 3
    nu, lt = torch.zeros(2, C, device=device), torch.zeros(2, C, device=device)
    mu = torch.randn(5, C, device=device)
    all_zero = r"pi \(mixture weights\) must have a positive sum, got all zeros \[0\.0, 0\.0\]"
    with pytest.raises(ValueError, match=all_zero):
        medmap_fast.gaussian_kl(mu, nu=nu, logtau2=lt, pi=torch.zeros(2, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"pi must be finite and non-negative, got -1\.0 at index \(1,\)"):
        medmap_fast.gaussian_kl(mu, nu=nu, logtau2=lt, pi=torch.tensor([1.0, -1.0], device=device), backend=backend)
    feats = torch.randn(2, 2, C, 2, 2, 2, device=device)
    ones = torch.ones(2, 2, device=device)
    with pytest.raises(ValueError, match=r"pi_mix \(mixture weights\) must have a positive sum, got all zeros"):
        medmap_fast.moment_matching(feats, ones, target="mixture", nu=nu, logtau2=lt,
                                    pi_mix=torch.zeros(2, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"pi_mix must be finite and non-negative, got nan"):
        medmap_fast.moment_matching(feats, ones, target="mixture", nu=nu, logtau2=lt,
                                    pi_mix=torch.tensor([float("nan"), 1.0], device=device), backend=backend)
    # a zero entry is fine (its component drops out), and pi_logits has no such constraint
    one_zero = torch.tensor([0.0, 2.0], device=device)
    assert torch.isfinite(medmap_fast.gaussian_kl(mu, nu=nu, logtau2=lt, pi=one_zero, backend=backend))
    logits = torch.tensor([-30.0, 0.0], device=device)
    assert torch.isfinite(medmap_fast.gaussian_kl(mu, nu=nu, logtau2=lt, pi_logits=logits, backend=backend))
    with pytest.raises(ValueError, match=r"pi \(mixture weights\) must have a positive sum"):
        reference.gaussian_kl(mu.cpu(), None, nu.cpu(), lt.cpu(), torch.zeros(2))
    with pytest.raises(ValueError, match=r"pi_mix \(mixture weights\) must have a positive sum"):
        reference.moment_matching(feats.cpu(), ones.cpu(), target="mixture", nu=nu.cpu(), logtau2=lt.cpu(),
                                  pi_mix=torch.zeros(2))


@pytest.mark.parametrize("backend", UNDEFINED_BACKENDS)
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
def test_zero_voxels_are_refused(backend, stacked):
    """A mean over zero voxels is undefined: the same ValueError on every backend, reference included."""
    device = require_backend(backend)
    B, M, C = 2, 4, 3
    for spatial, (c, s) in (((0, 4, 4), (C, 0)), ((4, 0, 2), (C, 0))):
        st = torch.randn(B, M, C, *spatial, device=device)
        feats = st if stacked else list(st.unbind(1))
        mask = torch.ones(B, M, dtype=torch.bool, device=device)
        # the shape as given: one stacked tensor, or each (B, C, *spatial) tensor of the list
        shape = tuple(st.shape) if stacked else (B, C, *spatial)
        calls = {
            "anchor_align": lambda: medmap_fast.anchor_align(feats, mask, backend=backend),
            "anchor_align(normal)": lambda: medmap_fast.anchor_align(feats, mask, anchor="normal", backend=backend),
            "moment_matching": lambda: medmap_fast.moment_matching(feats, mask, backend=backend),
            "moments": lambda: medmap_fast.ops.moments(feats, mask, with_anchor=True, backend=backend),
        }
        words = rf"have C = {c} channel\(s\) and {s} voxel\(s\) per modality: .* undefined"
        for name, call in calls.items():
            with pytest.raises(ValueError, match=rf"features of shape {re_shape(shape)} {words}"):
                call()
        for call in (lambda: reference.anchor_align(feats, mask), lambda: reference.moment_matching(feats, mask)):
            with pytest.raises(ValueError, match=rf"features of shape {re_shape(st.shape)} {words}"):
                call()
    # no channel is refused too; an empty batch is not (no statistic is asked for)
    with pytest.raises(ValueError, match=r"C = 0 channel\(s\)"):
        medmap_fast.anchor_align(torch.randn(B, M, 0, 2, 2, 2, device=device), mask, backend=backend)
    empty = torch.randn(0, M, C, 0, 4, 4, device=device)
    none = torch.ones(0, M, dtype=torch.bool, device=device)
    assert medmap_fast.anchor_align(empty, none, backend=backend) == 0
    assert medmap_fast.moment_matching(empty, none, backend=backend) == 0


def re_shape(shape):
    return re.escape(str(tuple(shape)))
