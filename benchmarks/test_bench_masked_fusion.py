"""masked_fusion: fused vs the naive reference vs torch.compile(reference), in one process.

Shapes: B=2, M=4, C=16, 64^3 on CPU, 128^3 on GPU (MEDMAP_FAST_BENCH_SIZE overrides), float32,
every modality present (the most bytes). Bytes moved are the op's floor: each input read once,
each output written once (see medmap_fast._bench.fusion_bytes).
"""

import pytest
import torch

import _timing
import medmap_fast
from medmap_fast import _bench, reference

B, M, C = 2, 4, 16
_compiled = {}


def _compiled_reference(key):
    # One compiled function per configuration, static shapes, so each gets its best code.
    if key not in _compiled:
        _compiled[key] = torch.compile(lambda f, m, mode, w: reference.masked_fusion(f, m, mode, w), dynamic=False)
    return _compiled[key]


def _inputs(size, layout, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    feats = []
    for _ in range(M):
        f = torch.randn(B, C, size, size, size, generator=g).to(device=device, dtype=dtype)
        if layout == "channels_last":
            f = f.contiguous(memory_format=torch.channels_last_3d)
        feats.append(f.requires_grad_())
    mask = torch.ones(B, M, dtype=torch.bool, device=device)
    w = torch.randn(B, M, generator=g).to(device).requires_grad_()
    return feats, mask, w


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("layout", ["ncdhw", "channels_last"])
@pytest.mark.parametrize("mode", ["mean", "weighted", "zero_concat"])
def test_masked_fusion(benchmark, device, size, mode, layout, pass_, impl):
    feats, mask, w = _inputs(size, layout, device)
    weights = w if mode == "weighted" else None
    if impl == "fused":
        fn = lambda: medmap_fast.masked_fusion(feats, mask, mode, weights)
    elif impl == "reference":
        fn = lambda: reference.masked_fusion(feats, mask, mode, weights)
    else:
        comp = _compiled_reference((mode, layout, pass_))
        fn = lambda: comp(feats, mask, mode, weights)
    grad_out = torch.randn_like(fn().detach())
    leaves = feats + ([w] if weights is not None else [])
    run = _timing.runner(fn, leaves, pass_, device, grad_out)
    nbytes = _bench.fusion_bytes(mode, B, M, C, size ** 3, 4, pass_ == "fwd_bwd", weights is not None)
    _timing.time_op(benchmark, run, device, f"masked_fusion {mode} {layout} {pass_}", impl, nbytes,
                    f"B={B} M={M} C={C} {size}^3 fp32")
