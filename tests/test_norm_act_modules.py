"""The fused blocks and convert(): state dicts, outputs and gradients against plain torch.nn models."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from medmap_fast.nn import ConvNormAct3d, FusedNormAct, NormActConv3d, ResidualBlock3d, convert

from conftest import fresh_seed, require_backend

TOL = dict(atol=1e-4, rtol=1e-4)


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return module


def _outputs_and_grads(model, x):
    """One forward (so that running statistics, where a model has them, move once) and a backward
    with a fixed random grad_output."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return y.detach(), x.grad, grads


def _assert_same(plain, fused, x, tol=TOL):
    y0, dx0, g0 = _outputs_and_grads(plain, x)
    y1, dx1, g1 = _outputs_and_grads(fused, x)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(dx1, dx0, **tol)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **tol, msg=lambda m: f"grad of {name}: {m}")


class PlainResidualBlock(nn.Module):
    """What ResidualBlock3d computes, in torch.nn modules with the same parameter names."""

    def __init__(self, cin, cout, stride=1, slope=0.01):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.act = nn.LeakyReLU(slope)
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, 0, bias=False), nn.InstanceNorm3d(cout,
                                                                                                       affine=True))
        else:
            self.skip = nn.Identity()

    def forward(self, x):
        out = self.conv2(self.act(self.norm1(self.conv1(x))))
        return self.act(self.norm2(out) + self.skip(x))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_norm_act_equals_plain_sequential_both_ways(backend, layout):
    require_backend(backend)
    seed = fresh_seed()
    plain = _randomise(nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.InstanceNorm3d(6, affine=True),
                                     nn.LeakyReLU(0.01)), seed)
    fused = ConvNormAct3d(3, 6, backend=backend)
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    back = nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.InstanceNorm3d(6, affine=True), nn.LeakyReLU())
    back.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 7, 6, 5, generator=torch.Generator().manual_seed(seed))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
        plain, fused = plain.to(memory_format=torch.channels_last_3d), fused.to(memory_format=torch.channels_last_3d)
        assert fused(x).is_contiguous(memory_format=torch.channels_last_3d)
    _assert_same(plain, fused, x)
    _assert_same(back, fused, x)


def test_norm_act_conv_and_group_norm_state_dicts():
    seed = fresh_seed()
    plain = _randomise(nn.Sequential(nn.GroupNorm(2, 6), nn.LeakyReLU(0.2), nn.Conv3d(6, 4, 3, padding=1)), seed)
    fused = NormActConv3d(6, 4, norm="group", num_groups=2, negative_slope=0.2)
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    _assert_same(plain, fused, torch.randn(2, 6, 5, 4, 6, generator=torch.Generator().manual_seed(seed)))
    gplain = _randomise(nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU()), seed)
    gfused = ConvNormAct3d(3, 8, norm="group", num_groups=4, activation="relu")
    gfused.load_state_dict(gplain.state_dict())
    _assert_same(gplain, gfused, torch.randn(2, 3, 5, 4, 6, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("stride,cin,cout", [(1, 4, 4), (2, 4, 6), (1, 3, 5)])
def test_residual_block_equals_plain_block(stride, cin, cout):
    seed = fresh_seed()
    plain = _randomise(PlainResidualBlock(cin, cout, stride), seed)
    fused = ResidualBlock3d(cin, cout, stride=stride)
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, cin, 7, 8, 6, generator=torch.Generator().manual_seed(seed))
    _assert_same(plain, fused, x.to(memory_format=torch.channels_last_3d))


class Encoder(nn.Module):
    """A model built only from torch.nn, the way users write them: Sequential stages, a norm whose
    activation is called in forward(), a GroupNorm pair and a norm with running statistics."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True),
                                  nn.LeakyReLU(0.01, inplace=True))
        self.down = nn.Sequential(
            nn.Conv3d(8, 12, 3, stride=2, padding=1), nn.GroupNorm(3, 12), nn.ReLU(inplace=True),
            nn.InstanceNorm3d(12, affine=True), nn.LeakyReLU(0.2), nn.Conv3d(12, 12, 1),
        )
        self.norm = nn.InstanceNorm3d(12)
        self.act = nn.LeakyReLU(0.01)
        self.tracked = nn.InstanceNorm3d(12, track_running_stats=True)

    def forward(self, x):
        y = self.act(self.norm(self.down(self.stem(x))))
        return self.tracked(y)


def test_convert_keeps_outputs_gradients_and_keys():
    seed = fresh_seed()
    # float64: in float32 a ReLU input within rounding of 0 may take the other slope in one of the two
    # models, a legitimate difference of one element that the comparison would report
    plain = _randomise(Encoder(), seed).double()
    model = copy.deepcopy(plain)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    assert convert(model) is model
    assert list(model.state_dict()) == keys, "convert must keep state_dict keys"
    assert all(params[n] is p for n, p in model.named_parameters()), "parameters are shared, not copied"
    assert isinstance(model.stem[1], FusedNormAct) and isinstance(model.stem[2], nn.Identity)
    assert model.down[1].activation == "relu" and model.down[3].negative_slope == 0.2
    assert model.norm.activation == "identity" and type(model.act) is nn.LeakyReLU
    assert type(model.tracked) is nn.InstanceNorm3d, "running statistics are not fused"
    x = torch.randn(2, 4, 9, 8, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _assert_same(plain, model, x)
    _assert_same(plain.eval(), model.eval(), x)


def test_convert_a_lone_norm_and_errors():
    fused = convert(nn.GroupNorm(2, 4))
    assert isinstance(fused, FusedNormAct) and fused.norm == "group"
    with pytest.raises(TypeError, match="model"):
        convert("not a model")
    with pytest.raises(ValueError, match="track_running_stats"):
        FusedNormAct.from_modules(nn.InstanceNorm3d(4, track_running_stats=True))
    with pytest.raises(ValueError, match="activation"):
        FusedNormAct.from_modules(nn.InstanceNorm3d(4), nn.GELU())
    with pytest.raises(ValueError, match="num_groups"):
        FusedNormAct(6, norm="group", num_groups=4)
    with pytest.raises(ValueError, match="num_channels"):
        FusedNormAct(0)
    with pytest.raises(ValueError, match="odd kernel"):
        ConvNormAct3d(2, 2, kernel_size=2)


def test_channels_last_flows_through_blocks_and_compile():
    seed = fresh_seed()
    model = nn.Sequential(ConvNormAct3d(4, 8), ResidualBlock3d(8, 8), NormActConv3d(8, 6, norm="group",
                                                                                   num_groups=2))
    model = _randomise(model, seed).to(memory_format=torch.channels_last_3d)
    seen = []
    for m in model.modules():
        if isinstance(m, (FusedNormAct, nn.Conv3d)):
            m.register_forward_hook(lambda mod, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last_3d)))
    x = torch.randn(2, 4, 6, 7, 5, generator=torch.Generator().manual_seed(seed)).to(
        memory_format=torch.channels_last_3d)
    y = model(x)
    assert seen and all(seen), "every block output stays channels-last"
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), y, **TOL)


def test_autocast_bfloat16_blocks():
    seed = fresh_seed()
    model = _randomise(nn.Sequential(ConvNormAct3d(4, 8), ResidualBlock3d(8, 8)), seed)
    x = torch.randn(2, 4, 6, 7, 5, generator=torch.Generator().manual_seed(seed))
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    err = (y.float() - ref).abs().max().item()
    assert err < 0.1 * ref.abs().max().item(), f"bf16 autocast drifted: {err}"


def test_state_dict_loads_into_plain_sequential_with_names():
    fused = nn.Sequential(OrderedDict(enc=ConvNormAct3d(2, 4), dec=NormActConv3d(4, 2)))
    plain = nn.Sequential(OrderedDict(
        enc=nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU()),
        dec=nn.Sequential(nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(), nn.Conv3d(4, 2, 3, padding=1)),
    ))
    plain.load_state_dict(fused.state_dict())
    fused.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("D", [8, 5])  # D == C once: a layout mix-up would then pass the weight's shape check
def test_unbatched_input_is_one_sample_as_in_torch(D):
    seed = fresh_seed()
    plain = _randomise(nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True),
                                     nn.LeakyReLU(0.01)), seed)
    fused = ConvNormAct3d(4, 8)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(4, D, 6, 7, generator=torch.Generator().manual_seed(seed))
    _assert_same(plain, fused, x)
    converted = convert(copy.deepcopy(plain))
    _assert_same(plain, converted, x)
    torch.testing.assert_close(fused(x), fused(x.unsqueeze(0))[0], atol=0, rtol=0)
    # the residual block (residual added inside the fused norm) and the pre-activation block too
    res = _randomise(ResidualBlock3d(4, 6, stride=2), seed)
    torch.testing.assert_close(res(x), res(x.unsqueeze(0))[0], atol=0, rtol=0)
    pre = _randomise(NormActConv3d(4, 3), seed)
    torch.testing.assert_close(pre(x), pre(x.unsqueeze(0))[0], atol=0, rtol=0)


def test_unbatched_rank_rules():
    for norm, dims in ((nn.InstanceNorm1d(3), 1), (nn.InstanceNorm2d(3), 2), (nn.InstanceNorm3d(3), 3)):
        fused = convert(norm)
        assert fused.spatial_dims == dims
        x = torch.randn(3, *[5] * dims)
        torch.testing.assert_close(fused(x), norm(x), **TOL)
        with pytest.raises(ValueError, match=rf"{dims + 2}-D \(B, C, \*spatial\).*got a {dims}-D"):
            fused(torch.randn(*[3] * dims))
    # GroupNorm has no unbatched form in torch; the fused module keeps that contract
    assert convert(nn.GroupNorm(1, 3)).spatial_dims is None
    with pytest.raises(ValueError, match="spatial_dims"):
        FusedNormAct(4, spatial_dims=0)
    with pytest.raises(ValueError, match="unsqueeze"):
        import medmap_fast
        medmap_fast.norm_act(torch.randn(4, 8, 6, 6), torch.ones(4))
