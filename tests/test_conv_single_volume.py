"""medmap_fast.nn.conv.Conv3d: a single float32 CPU volume goes to oneDNN (PyTorch's own dispatch takes a
much slower im2col path for a batch of one); the values and gradients are nn.Conv3d's, and every other
input takes nn.Conv3d's path unchanged."""

import pytest
import torch
from torch import nn

from medmap_fast.nn.conv import Conv3d, _takes_onednn

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _pair(cin, cout, k, stride, padding, dilation=1, groups=1, bias=True):
    torch.manual_seed(0)
    plain = nn.Conv3d(cin, cout, k, stride, padding, dilation, groups=groups, bias=bias)
    ours = Conv3d(cin, cout, k, stride, padding, dilation, groups=groups, bias=bias)
    ours.load_state_dict(plain.state_dict())
    return plain, ours


@needs_onednn
@pytest.mark.parametrize("shape, k, stride, padding, dilation, groups", [
    ((1, 3, 9, 10, 11), 3, 1, 1, 1, 1),
    ((1, 4, 12, 12, 12), 3, 2, 1, 1, 1),
    ((1, 4, 8, 9, 7), 1, 1, 0, 1, 1),
    ((1, 6, 10, 10, 10), 3, 1, 2, 2, 2),
    ((5, 9, 9, 9), 3, 1, 1, 1, 1),  # unbatched: one volume
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_nn_conv3d_values_and_gradients(shape, k, stride, padding, dilation, groups, layout):
    cin = shape[-4]
    plain, ours = _pair(cin, 6, k, stride, padding, dilation, groups)
    x = torch.randn(shape)
    if layout == "channels_last" and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    assert _takes_onednn(ours, x, ours.weight)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = plain(x1), ours(x2)
    torch.testing.assert_close(y2, y1, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(y1).transpose(-1, -2).contiguous().transpose(-1, -2) * 0.7  # another layout
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-4, rtol=1e-4)
    for p1, p2 in zip(plain.parameters(), ours.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-3, rtol=1e-4)


@needs_onednn
def test_deterministic():
    _, ours = _pair(4, 8, 3, 1, 1)
    x = torch.randn(1, 4, 11, 10, 9, requires_grad=True)
    outs = []
    for _ in range(2):
        x.grad = None
        ours.zero_grad()
        y = ours(x)
        y.square().sum().backward()
        outs.append((y.detach().clone(), x.grad.clone(), ours.weight.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_other_inputs_take_the_plain_path():
    _, ours = _pair(2, 3, 3, 1, 1)
    assert not _takes_onednn(ours, torch.randn(2, 2, 6, 6, 6), ours.weight)  # PyTorch uses oneDNN itself
    assert not _takes_onednn(ours, torch.randn(1, 2, 6, 6, 6, dtype=torch.float64), ours.weight.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _takes_onednn(ours, torch.randn(1, 2, 6, 6, 6), ours.weight)
    reflect = Conv3d(2, 3, 3, padding=1, padding_mode="reflect")
    assert not _takes_onednn(reflect, torch.randn(1, 2, 6, 6, 6), reflect.weight)
    same = Conv3d(2, 3, 3, padding="same")
    assert not _takes_onednn(same, torch.randn(1, 2, 6, 6, 6), same.weight)
    x = torch.randn(1, 2, 6, 6, 6, dtype=torch.float64)
    ours64 = ours.double()
    plain = nn.Conv3d(2, 3, 3, padding=1).double()
    plain.load_state_dict(ours64.state_dict())
    torch.testing.assert_close(ours64(x), plain(x), atol=0, rtol=0)


def test_state_dict_and_gradcheck_through_the_plain_path():
    plain, ours = _pair(2, 3, 3, 1, 1)
    assert plain.state_dict().keys() == ours.state_dict().keys()
    ours = ours.double()
    x = torch.randn(1, 2, 5, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ours, (x,))
