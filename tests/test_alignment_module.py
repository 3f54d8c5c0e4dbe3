"""MedMAPAlign, modality_gap and the alignment ops' input errors."""

import math

import pytest
import torch
from torch import nn

import medmap_fast
from medmap_fast import reference
from medmap_fast.nn import MedMAPAlign

from conftest import fresh_seed, require_backend

COMBOS = [
    ("learned", "kl"),
    ("learned", "moments"),
    ("fixed", "kl"),
    ("fixed", "moments"),
    ("normal", "kl"),
    ("normal", "mixture_kl"),
    ("normal", "moments"),
    ("mixture", "mixture_kl"),
    ("mixture", "moments"),
]


def _feats(B=2, M=4, C=6, spatial=(4, 5, 3), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, *spatial, generator=g, dtype=dtype) + k for k in range(M)]


def _reference_loss(module: MedMAPAlign, feats, mask):
    """The module's loss from the plain PyTorch reference, on the module's own parameters."""
    pi = module.modality_weights()
    if module.loss == "kl":
        kind = "normal" if module.anchor == "normal" else "mix"
        value = reference.anchor_align(feats, mask, pi if kind == "mix" else None, kind, module.sigma2)
    elif module.loss == "moments":
        if module.anchor == "mixture":
            value = reference.moment_matching(
                feats, mask, target="mixture", nu=module.nu, logtau2=module.logtau2, pi_logits=module.pi_logits
            )
        elif module.anchor == "normal":
            value = reference.moment_matching(feats, mask, target="normal")
        else:
            value = reference.moment_matching(feats, mask, pi)
    else:
        mu = torch.stack(feats, 1).movedim(2, -1)
        mix = (module.nu, module.logtau2, None, module.pi_logits) if module.anchor == "mixture" else (None,) * 4
        value = reference.gaussian_kl(mu, math.log(module.sigma2), *mix, mask=mask)
    return value * module.weight


@pytest.mark.parametrize("anchor,loss", COMBOS)
def test_module_matches_reference_and_learns(anchor, loss):
    require_backend("cpu")
    seed = fresh_seed()
    torch.manual_seed(seed)
    feats = [f.requires_grad_() for f in _feats(seed=seed)]
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    module = MedMAPAlign(4, 6, anchor=anchor, loss=loss, weight=0.3, backend="cpu")
    ours = module(feats, mask)
    ref = _reference_loss(module, feats, mask)
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=2e-5, atol=2e-6)
    # list and stacked forms give the same loss
    torch.testing.assert_close(module(torch.stack(feats, 1), mask), ours, rtol=1e-5, atol=1e-6)
    params = list(module.parameters())
    leaves = feats + params
    g_ours = torch.autograd.grad(ours, leaves)
    g_ref = torch.autograd.grad(ref, leaves, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b.to(a.dtype), rtol=1e-4, atol=1e-6)
    if params:
        before = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(module.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            module([f.detach() for f in feats], mask).backward()
            opt.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters())), "parameters did not move"


def test_learned_theta_moves_towards_the_better_modalities():
    """Features that disagree: theta must change under SGD, with the reference gradient."""
    require_backend("cpu")
    feats = _feats(seed=fresh_seed())
    mask = torch.ones(2, 4, dtype=torch.bool)
    module = MedMAPAlign(4, 6, anchor="learned", backend="cpu")
    theta0 = module.theta.detach().clone()
    loss = module(feats, mask)
    (g,) = torch.autograd.grad(loss, [module.theta])
    th = theta0.double().requires_grad_()
    ref = reference.anchor_align([f.double() for f in feats], mask, th.softmax(0))
    (g_ref,) = torch.autograd.grad(ref, [th])
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-7)
    assert g.abs().max() > 0
    # A small step against the gradient lowers the loss (a fixed learning rate could overshoot the
    # minimum for some random features); training then moves theta.
    with torch.no_grad():
        module.theta -= 1e-2 * g / g.abs().max()
        assert module(feats, mask).item() < loss.item()
        module.theta.copy_(theta0)
    opt = torch.optim.Adam(module.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        module(feats, mask).backward()
        opt.step()
    assert not torch.allclose(module.theta.detach(), theta0)


def test_state_dict_names_and_round_trip():
    assert list(MedMAPAlign(4, 8).state_dict()) == ["theta"]
    assert list(MedMAPAlign(4, 8, anchor="fixed", pi=[1, 2, 3, 4]).state_dict()) == ["pi"]
    assert list(MedMAPAlign(4, 8, anchor="mixture", num_components=3).state_dict()) == ["nu", "logtau2", "pi_logits"]
    assert list(MedMAPAlign(4, 8, anchor="normal").state_dict()) == []
    a, b = MedMAPAlign(4, 8, anchor="mixture"), MedMAPAlign(4, 8, anchor="mixture")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.nu, b.nu)
    fixed = MedMAPAlign(4, 8, anchor="fixed", pi=[1, 1, 2, 0])
    torch.testing.assert_close(fixed.pi, torch.tensor([0.25, 0.25, 0.5, 0.0]))


class _ForeignNet(nn.Module):
    """A small multi-encoder segmentation network written with torch.nn only (not by this library)."""

    def __init__(self, M=4, C=8):
        super().__init__()
        self.encoders = nn.ModuleList(
            nn.Sequential(nn.Conv3d(1, C, 3, padding=1), nn.InstanceNorm3d(C, affine=True), nn.LeakyReLU(0.01))
            for _ in range(M)
        )
        self.head = nn.Conv3d(M * C, 3, 1)

    def forward(self, x, mask):
        feats = [enc(x[:, k : k + 1]) for k, enc in enumerate(self.encoders)]
        fused = torch.cat([f * mask[:, k].view(-1, 1, 1, 1, 1) for k, f in enumerate(feats)], 1)
        return self.head(fused)


def test_forward_hooks_on_a_foreign_model():
    """The README recipe: hooks collect each encoder's output, MedMAPAlign turns them into a loss."""
    require_backend("cpu")
    torch.manual_seed(fresh_seed())
    net = _ForeignNet()
    align = MedMAPAlign(num_modalities=4, channels=8, anchor="learned", weight=0.1)
    captured = {}
    hooks = [enc.register_forward_hook(lambda mod, inp, out, k=k: captured.__setitem__(k, out)) for k, enc in enumerate(net.encoders)]
    opt = torch.optim.SGD(list(net.parameters()) + list(align.parameters()), lr=0.05)
    x = torch.randn(2, 4, 6, 6, 6)
    y = torch.randint(0, 3, (2, 6, 6, 6))
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    theta0 = align.theta.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        logits = net(x, mask.float())
        loss = nn.functional.cross_entropy(logits, y) + align([captured[k] for k in range(4)], mask)
        loss.backward()
        assert net.encoders[0][0].weight.grad is not None and align.theta.grad is not None
        opt.step()
    for h in hooks:
        h.remove()
    assert not torch.equal(theta0, align.theta.detach())


def test_module_returns_anchor_and_imputed():
    require_backend("cpu")
    feats = _feats(seed=fresh_seed())
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    module = MedMAPAlign(4, 6, anchor="fixed", pi=[1, 2, 3, 4], backend="cpu")
    out = module(feats, mask, return_anchor=True, return_imputed=True)
    a_ref = reference.anchor([f.double() for f in feats], mask, module.pi.double())
    torch.testing.assert_close(out.anchor.double(), a_ref, rtol=1e-5, atol=1e-6)
    assert out.imputed.shape == (2, 4, 6, 4, 5, 3)
    torch.testing.assert_close(out.imputed[0, 1], out.anchor[0])
    torch.testing.assert_close(out.imputed[0, 2], feats[2][0])
    assert (out.imputed[1] == 0).all()


def test_modality_gap():
    require_backend("cpu")
    g = torch.Generator().manual_seed(fresh_seed())
    base = torch.randn(3, 5, 6, 7, 8, generator=g)
    same = [base.clone() for _ in range(3)]
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    gap = medmap_fast.metrics.modality_gap(same, mask)
    assert gap.gap.abs() < 1e-6 and torch.isfinite(gap.gap)
    # one modality shifted by d in every channel: D = 1/4 * d^2 * 2/s, s its (equal) variance + eps
    shifted = [base, base + 2.0, base]
    gap = medmap_fast.metrics.modality_gap(shifted, mask)
    x = base.reshape(3, 5, -1).double()
    s = x.var(-1, unbiased=False) + 1e-5
    d01 = (0.25 * 4.0 * 2 / s).mean(-1)  # per sample
    torch.testing.assert_close(gap.pairs[0, 1].double(), d01[0], rtol=1e-4, atol=1e-6)
    assert torch.isnan(medmap_fast.metrics.modality_gap(shifted, torch.eye(3, dtype=torch.bool)).gap)
    expected_gap = torch.stack([(2 * d01[0] + 0) / 3, torch.zeros((), dtype=torch.float64)]).mean()
    torch.testing.assert_close(gap.gap.double(), expected_gap, rtol=1e-4, atol=1e-6)
    assert gap.samples[0, 1] == 1 and gap.samples[0, 2] == 2


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda f, m: medmap_fast.anchor_align(f, m, reduction="avg"), "reduction must be one of"),
        (lambda f, m: medmap_fast.anchor_align(f, m, anchor="gauss"), "anchor must be one of"),
        (lambda f, m: medmap_fast.anchor_align(f, m, torch.ones(3)), r"pi must have shape \(4,\) or \(2, 4\)"),
        (lambda f, m: medmap_fast.anchor_align(f, m, torch.tensor([1.0, -1, 1, 1])), "non-negative.*index"),
        (lambda f, m: medmap_fast.anchor_align(f, m, sigma2=0.0), "sigma2 must be a finite positive"),
        (lambda f, m: medmap_fast.anchor_align(f, m, sigma2=torch.ones(5)), r"sigma2 must have shape"),
        (lambda f, m: medmap_fast.anchor_align(f, m[:1]), r"mask must have shape \(B, M\) = \(2, 4\)"),
        (lambda f, m: medmap_fast.moment_matching(f, m, target="mixture"), "needs nu and logtau2"),
        (lambda f, m: medmap_fast.moment_matching(f, m, target="normal", nu=torch.zeros(2, 6)), "only used by target='mixture'"),
        (lambda f, m: medmap_fast.moment_matching(f, m, eps=-1.0), "eps must be"),
        (lambda f, m: medmap_fast.gaussian_kl(f[0], nu=torch.zeros(2, 4), logtau2=torch.zeros(2, 4)), r"nu must have shape \(J, C\) with C = 3"),
        (lambda f, m: medmap_fast.gaussian_kl(f[0].movedim(1, -1), mask=m.t()), "mask must have a prefix"),
        (lambda f, m: medmap_fast.gaussian_kl(f[0].movedim(1, -1), logvar=torch.zeros(5)), "does not broadcast"),
        (lambda f, m: MedMAPAlign(4, 6, anchor="mixture", loss="kl"), "does not go with"),
        (lambda f, m: MedMAPAlign(4, 6)(f[:3], m), "expected M=4"),
        (lambda f, m: MedMAPAlign(4, 6, anchor="fixed", pi=[1, -1, 0, 0]), "non-negative"),
        (lambda f, m: MedMAPAlign(4, 6, sigma2=torch.ones(6)), "sigma2 must be a positive number"),
        (lambda f, m: medmap_fast.gaussian_kl(f[0].movedim(1, -1), mask=m[:, 0] * 2), "only 0 and 1"),
    ],
)
def test_clear_errors(call, match):
    feats = _feats(C=6)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises((ValueError, TypeError), match=match):
        call(feats, mask)


def test_module_logvar_forms_agree():
    """Per-voxel log-variances given stacked or as a list, with listed or stacked features (B == M)."""
    require_backend("cpu")
    g = torch.Generator().manual_seed(fresh_seed())
    feats = [torch.randn(3, 6, 3, 4, 2, generator=g) for _ in range(3)]
    logvar = [0.3 * torch.randn(3, 6, 3, 4, 2, generator=g) for _ in range(3)]
    mask = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    module = MedMAPAlign(3, 6, anchor="mixture", backend="cpu")
    values = [
        module(f, mask, logvar=lv)
        for f in (feats, torch.stack(feats, 1))
        for lv in (logvar, torch.stack(logvar, 1))
    ]
    for v in values[1:]:
        torch.testing.assert_close(v, values[0], rtol=1e-5, atol=1e-6)
    bad = [t.clone() for t in feats]
    bad[2][0, 1, 2, 3, 1] = float("nan")
    checking = MedMAPAlign(3, 6, anchor="mixture", check_finite=True, backend="cpu")
    with pytest.raises(ValueError, match=r"features\[2\].*\(0, 1, 2, 3, 1\)"):
        checking(bad, mask)


@pytest.mark.parametrize("loss", ["kl", "moments"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_fixed_anchor_with_zero_weights_on_a_sample_raises(loss, backend):
    """pi=[1, 0, 0, 0] on a sample without T1: no anchor is defined there, so a clear error, never a
    silent switch to the P_N objective (alignment to zero)."""
    require_backend(backend)
    feats = _feats(B=3, seed=fresh_seed())
    module = MedMAPAlign(4, 6, anchor="fixed", pi=[1, 0, 0, 0], loss=loss, backend=backend)
    with_t1 = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    value = module(feats, with_t1)  # every sample with something present has T1 (or nothing at all)
    torch.testing.assert_close(value, _reference_loss(module, feats, with_t1).float(), rtol=1e-5, atol=1e-6)
    without_t1 = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    for call in (
        lambda: module(feats, without_t1),
        lambda: module(feats, without_t1, return_imputed=True),
    ):
        with pytest.raises(ValueError, match=r"sum to 0 in sample\(s\) \[1\].*= \[1\.0, 0\.0, 0\.0, 0\.0\]"):
            call()


@pytest.mark.parametrize("anchor,loss", COMBOS)
def test_zero_voxels_raise_for_every_loss(anchor, loss):
    require_backend("cpu")
    module = MedMAPAlign(4, 6, anchor=anchor, loss=loss, backend="cpu")
    feats = [torch.randn(2, 6, 0, 4, 4) for _ in range(4)]
    mask = torch.ones(2, 4, dtype=torch.bool)
    for f in (feats, torch.stack(feats, 1)):
        with pytest.raises(ValueError, match=r"features of shape .* have C = 6 channel\(s\) and 0 voxel\(s\)"):
            module(f, mask)
