"""Fused norm + activation: the op, and a whole Conv3d block, vs eager PyTorch and torch.compile.

* op: ``norm_act`` (instance norm, LeakyReLU 0.01) vs ``F.instance_norm`` + ``F.leaky_relu`` (the
  reference) vs torch.compile of that; B=2, C=16 float32 on CPU (64^3), C=32 bfloat16 on GPU (128^3);
  NCDHW and channels_last_3d. Floor: forward reads x and writes y (2 tensor passes); forward +
  backward adds reading x and dy and writing dx (5 passes). The statistics pass is not in the floor.
* block: ``ConvNormAct3d`` vs the same ``nn.Sequential(Conv3d, InstanceNorm3d(affine), LeakyReLU)``
  eager and compiled, forward + backward, float32 on CPU, bfloat16 autocast on GPU, in both layouts
  and at two shapes: C=32 at size^3 (nnU-Net's first stage) and C=64 at (size/2)^3 (its second).
  The convolution dominates; "bytes" is the norm part's floor only, so GB/s is not meaningful there.
"""

import contextlib

import pytest
import torch
from torch import nn

import _timing
import medmap_fast
from medmap_fast import _bench, reference
from medmap_fast.nn import ConvNormAct3d

B = 2
_compiled = {}


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last_3d) if layout == "channels_last" else t


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("layout", ["ncdhw", "channels_last"])
def test_norm_act_op(benchmark, device, size, layout, pass_, impl):
    C = 32 if device.type == "cuda" else 16
    dtype = _dtype(device)
    g = torch.Generator().manual_seed(0)
    x = _layout(torch.randn(B, C, size, size, size, generator=g).to(device, dtype), layout).requires_grad_()
    w = torch.ones(C, device=device, requires_grad=True)
    b = torch.zeros(C, device=device, requires_grad=True)
    if impl == "fused":
        fn = lambda: medmap_fast.norm_act(x, w, b)  # noqa: E731
    elif impl == "reference":
        fn = lambda: reference.norm_act(x, w, b)  # noqa: E731
    else:
        key = ("op", layout, pass_)
        _compiled.setdefault(key, torch.compile(reference.norm_act, dynamic=False))
        fn = lambda: _compiled[key](x, w, b)  # noqa: E731
    dy = torch.full_like(x, 0.75)  # grad_output != 1
    run = _timing.runner(fn, [x, w, b], pass_, device, dy)
    n = x.numel() * x.element_size()
    _timing.time_op(benchmark, run, device, f"norm_act {layout} {pass_}", impl, (2 if pass_ == "fwd" else 5) * n,
                    tuple(x.shape), pass_ == "fwd_bwd")


def _plain_block(cin, cout):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True),
                         nn.LeakyReLU(0.01))


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("layout", ["ncdhw", "channels_last"])
@pytest.mark.parametrize("stage", ["stage0", "stage1"])
def test_conv_block(benchmark, device, size, stage, layout, impl):
    C, S = (32, size) if stage == "stage0" else (64, max(size // 2, 4))
    torch.manual_seed(0)
    plain = _plain_block(C, C).to(device)
    if impl == "fused":
        model = ConvNormAct3d(C, C).to(device)
        model.load_state_dict(plain.state_dict())
    elif impl == "reference":
        model = plain
    else:
        key = ("block", stage, layout)
        _compiled.setdefault(key, torch.compile(plain.to(memory_format=torch.channels_last_3d)
                                                if layout == "channels_last" else plain, dynamic=False))
        model = _compiled[key]
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last_3d)
    x = _layout(torch.randn(B, C, S, S, S, device=device), layout).requires_grad_()
    params = [p for p in model.parameters()]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def run():
        with amp:
            y = model(x)
        grads = torch.autograd.grad(y, [x] + params, torch.full_like(y, 0.75))
        _bench.synchronize(device)
        return grads

    n = B * C * S**3 * (2 if device.type == "cuda" else 4)
    _timing.time_op(benchmark, run, device, f"block {stage} C={C} {layout} fwd_bwd", impl, 5 * n, (B, C, S, S, S),
                    True)
