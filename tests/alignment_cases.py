"""Inputs and the compare-with-float64 harness shared by the alignment op tests."""

import torch

from helpers import MASKS, assert_close_to_reference, make_layout, mixed_mask


def make_features(B, M, C, spatial, dtype, device, layout, stacked, seed, offset=0.0, scale=1.0):
    """Features in the requested form and layout, plus the same values in float64 (same form)."""
    g = torch.Generator().manual_seed(seed)
    base = [offset + scale * torch.randn(B, C, *spatial, generator=g, dtype=torch.float64) for _ in range(M)]
    if stacked:
        st = torch.stack(base, 1)
        if layout == "channels_last":
            st = st.movedim(2, -1).contiguous().movedim(-1, 2)
        elif layout != "contiguous":
            st = torch.stack([make_layout(b, layout) for b in base], 2).transpose(1, 2)
        feats = st.to(device=device, dtype=dtype)
        return feats, feats.double()
    feats = [make_layout(b.to(device=device, dtype=dtype), layout) for b in base]
    return feats, [f.double() for f in feats]


def make_mask(kind, B, M, seed, device):
    g = torch.Generator().manual_seed(seed + 7)
    m = mixed_mask(B, M, g) if kind == "random" else MASKS[kind](B, M)
    return m.to(device)


def poison_missing(feats, mask):
    """NaN into every missing modality's features (they must never be read)."""
    with torch.no_grad():
        if isinstance(feats, torch.Tensor):
            feats[~mask.bool()] = float("nan")
        else:
            for k, f in enumerate(feats):
                f[~mask[:, k].bool()] = float("nan")
    return feats


def leaves_of(feats):
    return [feats] if isinstance(feats, torch.Tensor) else list(feats)


def with_grad(x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_()
    return [t.detach().clone().requires_grad_() for t in x]


def loss_and_grads(fn, leaves_in, grad_seed, **kw):
    """Run fn(**leaves, **kw) with every tensor in ``leaves_in`` (a dict) requiring grad; backprop a
    random (not all-ones) grad_output; return (loss, {name: grad})."""
    leaves = {k: with_grad(v) for k, v in leaves_in.items()}
    out = fn(**leaves, **kw)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64) + 0.5
    g = g.to(out.device, out.dtype)
    flat, names = [], []
    for k, v in leaves.items():
        if v is None:
            continue
        for i, t in enumerate(leaves_of(v)):
            flat.append(t)
            names.append(f"{k}[{i}]" if isinstance(v, list) else k)
    grads = torch.autograd.grad(out, flat, g, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(flat, grads)]
    return out.detach(), dict(zip(names, grads))


def to64(d):
    out = {}
    for k, v in d.items():
        if v is None:
            out[k] = None
        elif isinstance(v, torch.Tensor):
            out[k] = v.double()
        else:
            out[k] = [t.double() for t in v]
    return out


def compare(name, fused, exact, naive=None, dtype=torch.float32):
    """fused = (loss, grads) vs exact (float64) with the low-precision ratio rule via ``naive``."""
    loss, grads = fused
    loss64, grads64 = exact
    lowp = dtype in (torch.float16, torch.bfloat16)
    # Losses and small-parameter gradients come out in fp32 for half inputs: judged as fp32 values
    # unless a naive half-precision run is given to set the bar.
    assert_close_to_reference(f"{name}: loss", loss, loss64, naive[0] if naive else None, dtype if lowp else None)
    for k in grads64:
        g, g64 = grads[k], grads64[k]
        ng = naive[1][k] if naive else None
        assert_close_to_reference(f"{name}: grad {k}", g, g64, ng, dtype if lowp else None)
