"""The alignment ops: fused vs the naive reference vs torch.compile(reference), in one process.

* anchor_align and moment_matching (anchor target, learned pi = softmax(theta)): B=2, M=4, C=16,
  64^3 on CPU, 128^3 on GPU, every modality present, float32, NCDHW and channels_last_3d. Their
  floor is one read of the features forward; forward + backward adds one more read and the write of
  the feature gradients (3 feature-sized passes in all).
* gaussian_kl to a J=4 mixture with learnable (nu, logtau2, pi): N = 2*4*(size/2)^3 rows, C=16,
  float32, rows contiguous ("rows": (N, C)) or read in place from NCDHW features ("voxels":
  (B, M, D, H, W, C) view with C strided). Peak memory of forward + backward is recorded too.
"""

import pytest
import torch

import _timing
import medmap_fast
from medmap_fast import _bench, reference

B, M, C, J = 2, 4, 16, 4
_compiled = {}


def _compiled_fn(key, fn):
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=False)
    return _compiled[key]


def _features(size, layout, device):
    g = torch.Generator().manual_seed(0)
    feats = []
    for _ in range(M):
        f = torch.randn(B, C, size, size, size, generator=g).to(device)
        if layout == "channels_last":
            f = f.contiguous(memory_format=torch.channels_last_3d)
        feats.append(f.requires_grad_())
    return feats


def _run(benchmark, fn, leaves, device, pass_, group, impl, nbytes, shape):
    run = _timing.runner(fn, leaves, pass_, device, 0.75)  # grad_output != 1
    _timing.time_op(benchmark, run, device, group, impl, nbytes, shape, peak=pass_ == "fwd_bwd")


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("layout", ["ncdhw", "channels_last"])
@pytest.mark.parametrize("op", ["anchor_align", "moment_matching"])
def test_alignment(benchmark, device, size, op, layout, pass_, impl):
    feats = _features(size, layout, device)
    mask = torch.ones(B, M, dtype=torch.bool, device=device)
    theta = torch.zeros(M, device=device, requires_grad=True)
    ref_fn = reference.anchor_align if op == "anchor_align" else reference.moment_matching
    if impl == "fused":
        fused_fn = getattr(medmap_fast, op)
        fn = lambda: fused_fn(feats, mask, theta.softmax(0))
    elif impl == "reference":
        fn = lambda: ref_fn(feats, mask, theta.softmax(0))
    else:
        comp = _compiled_fn((op, layout, pass_), lambda f, m, t: ref_fn(f, m, t.softmax(0)))
        fn = lambda: comp(feats, mask, theta)
    n = B * C * size ** 3 * 4
    nbytes = M * n * (3 if pass_ == "fwd_bwd" else 1)
    _run(benchmark, fn, feats + [theta], device, pass_, f"{op} {layout} {pass_}", impl, nbytes,
         f"B={B} M={M} C={C} {size}^3 fp32")


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("rows", ["rows", "voxels"])
def test_gaussian_kl_mixture(benchmark, device, size, rows, pass_, impl):
    side = max(size // 2, 2)
    N = B * M * side ** 3
    g = torch.Generator().manual_seed(0)
    if rows == "rows":
        mu = torch.randn(N, C, generator=g).to(device).requires_grad_()
        lv = (0.3 * torch.randn(N, C, generator=g)).to(device).requires_grad_()
        mu_v, lv_v = (lambda: mu), (lambda: lv)
    else:
        mu = torch.randn(B, M, C, side, side, side, generator=g).to(device).requires_grad_()
        lv = (0.3 * torch.randn(B, M, C, side, side, side, generator=g)).to(device).requires_grad_()
        mu_v, lv_v = (lambda: mu.movedim(2, -1)), (lambda: lv.movedim(2, -1))
    nu = torch.randn(J, C, generator=g).to(device).requires_grad_()
    lt = torch.zeros(J, C, device=device, requires_grad=True)
    pl = torch.zeros(J, device=device, requires_grad=True)
    if impl == "fused":
        fn = lambda: medmap_fast.gaussian_kl(mu_v(), lv_v(), nu=nu, logtau2=lt, pi_logits=pl)
    elif impl == "reference":
        fn = lambda: reference.gaussian_kl(mu_v(), lv_v(), nu, lt, None, pl)
    else:
        comp = _compiled_fn(("gkl", rows, pass_), lambda a, b, c, d, e: reference.gaussian_kl(a, b, c, d, None, e))
        fn = lambda: comp(mu_v(), lv_v(), nu, lt, pl)
    nbytes = _bench.kl_bytes(N, C, J, 4, pass_ == "fwd_bwd")
    _run(benchmark, fn, [mu, lv, nu, lt, pl], device, pass_, f"gaussian_kl J={J} {rows} {pass_}", impl, nbytes,
         f"N={N} C={C} J={J} fp32")
