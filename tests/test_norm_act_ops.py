"""medmap_fast.norm_act on every backend against the float64 reference (torch.nn.functional).

The kernel-level contract (csrc/cpu/norm_act_cpu.h) is tested in test_norm_act_kernels.py; these
tests go through the public op: argument handling, layouts, dtypes, autograd and dispatch.
"""

import pytest
import torch

import medmap_fast
from medmap_fast import reference
from medmap_fast.ops import norm_act as _unused  # noqa: F401  (registers the custom ops)

from conftest import FUSED_BACKENDS, LOWP_FLOOR, LOWP_RATIO, fresh_seed, require_backend
from helpers import make_layout

BACKENDS = FUSED_BACKENDS + ["reference"]

# (B, C, spatial, norm kwargs, activation, slope, residual position, layout): odd sizes, every norm
# form, activation and residual placement, the fast layouts and two that must be copied once.
CASES = [
    (2, 6, (5, 6, 7), dict(norm="instance"), "leaky_relu", 0.01, None, "contiguous"),
    (3, 30, (4, 5, 7), dict(norm="group", num_groups=10), "leaky_relu", 0.2, "before_activation", "channels_last"),
    (2, 8, (3, 5, 4), dict(norm="group", num_groups=1), "relu", 0.0, "after_activation", "contiguous"),
    (1, 5, (7, 3, 5), dict(norm="instance"), "identity", 1.0, "before_activation", "channel_slice"),
    (2, 12, (5, 4, 3), dict(norm="group", num_groups=4), "leaky_relu", 0.01, "after_activation", "channels_last"),
    (2, 4, (3, 5, 4), dict(norm="instance"), "relu", 0.0, "before_activation", "permuted"),
    (3, 7, (1, 1, 1), dict(norm="instance"), "leaky_relu", 0.01, None, "contiguous"),
]


def _interpreted(backend, device):
    return backend == "triton" and device.type == "cpu"


def _inputs(B, C, spatial, layout, dtype, device, seed, residual, offset=100.0, scale=50.0):
    g = torch.Generator().manual_seed(seed)
    x = offset + scale * torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)
    w = 1.0 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(C, generator=g, dtype=torch.float64)
    r = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64) if residual else None
    dy = torch.randn(B, C, *spatial, generator=g, dtype=torch.float64)
    # parameters stay float32 for half inputs, as under autocast
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_layout(x.to(dtype), layout).to(device)
    r = make_layout(r.to(dtype), layout).to(device) if r is not None else None
    return x, w.to(pdtype).to(device), b.to(pdtype).to(device), r, dy.to(dtype).to(device)


def _forward_backward(fn, x, w, b, r, dy, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    y = fn(leaves[0], leaves[1], leaves[2], residual=leaves[3], **kw)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return [y] + list(grads)


def _run(backend, x, w, b, r, dy, kw):
    return _forward_backward(lambda *a, **k: medmap_fast.norm_act(*a, backend=backend, **k), x, w, b, r, dy, **kw)


def _exact(x, w, b, r, dy, kw):
    to64 = [t.detach().double() if t is not None else None for t in (x, w, b, r, dy)]
    return _forward_backward(reference.norm_act, *to64, **kw)


def _kwargs(norm_kw, activation, slope, position):
    kw = dict(norm_kw, activation=activation, negative_slope=slope)
    if position is not None:
        kw["residual_position"] = position
    return kw


NAMES = ["y", "dx", "dweight", "dbias", "dresidual"]


def _compare(got, exact, dtype, naive=None, dx_gain=1.0):
    """dx_gain: how much dx's rounding is amplified (1/sqrt(eps) when every group has one element:
    the variance is 0, x - mean is exactly 0, and dx is rstd times a difference of rounded terms)."""
    for k, (a, e) in enumerate(zip(got, exact)):
        name = NAMES[k]
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a.double().cpu() - e.cpu()).abs().max().item()
        size = max(e.abs().max().item(), 1.0) * (dx_gain if name == "dx" else 1.0)
        if dtype == torch.float64:
            assert err <= 1e-10 * size, f"{name}: error {err:.3g}"
        elif dtype == torch.float32:
            assert err <= 5e-5 * size, f"{name}: error {err:.3g} (relative to {size:.3g})"
        else:
            nerr = (naive[k].double().cpu() - e.cpu()).abs().max().item()
            limit = LOWP_RATIO * nerr + LOWP_FLOOR[dtype] * size
            assert err <= limit, f"{name}: error {err:.3g} > {LOWP_RATIO} x naive {nerr:.3g} + floor"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_norm_act_matches_reference(backend, dtype, case):
    device = require_backend(backend, dtype)
    B, C, spatial, norm_kw, activation, slope, position, layout = CASES[case]
    if dtype in (torch.float16, torch.bfloat16) and backend == "reference":
        pytest.skip("the reference is the naive baseline itself")
    if backend == "reference" and dtype == torch.float32 and spatial == (1, 1, 1):
        pytest.skip("torch's float32 norm of one voxel leaves mean-rounding noise times 1/sqrt(eps)")
    seed = fresh_seed()
    # Large offset and scale: E[x^2] - E[x]^2 statistics would lose every digit in float32.
    lowp = dtype in (torch.float16, torch.bfloat16)
    x, w, b, r, dy = _inputs(B, C, spatial, layout, dtype, device, seed, position is not None,
                             offset=2.0 if lowp else 100.0, scale=3.0 if lowp else 50.0)
    kw = _kwargs(norm_kw, activation, slope, position)
    got = _run(backend, x, w, b, r, dy, kw)
    naive = _forward_backward(reference.norm_act, x, w, b, r, dy, **kw) if lowp else None
    one_voxel_groups = spatial == (1, 1, 1) and kw.get("norm") == "instance"
    _compare(got, _exact(x, w, b, r, dy, kw), dtype, naive, dx_gain=1e-5 ** -0.5 if one_voxel_groups else 1.0)
    assert got[0].dtype == dtype
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last_3d), "channels-last in, channels-last out"
        assert got[1].is_contiguous(memory_format=torch.channels_last_3d)
    elif layout == "contiguous":
        assert got[0].is_contiguous() and got[1].is_contiguous()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_odd_volume_large_offset(backend, layout):
    """C = 30 over a 37 x 41 x 43 volume of 100 + 50 randn, float32: odd sizes far from zero."""
    device = require_backend(backend)
    seed = fresh_seed()
    # Triton's CPU interpreter is slow (~1e4 elements/s here): a smaller odd volume there.
    spatial = (5, 7, 9) if _interpreted(backend, device) else (37, 41, 43)
    x, w, b, r, dy = _inputs(2, 30, spatial, layout, torch.float32, device, seed, True)
    kw = dict(norm="instance", negative_slope=0.01)
    # Among 4M values some pre-activations lie within float32 rounding of the LeakyReLU's kink
    # (|z| ~ 1e-7), where the two precisions may legitimately take different slopes. No gradient
    # flows from those voxels (grad_output 0 there), so the slope chosen there changes nothing.
    z = reference.norm_act(*(t.detach().double().cpu() for t in (x, w, b)), activation="identity") + r.double().cpu()
    dy = dy.masked_fill((z.abs() < 1e-5).to(device), 0)
    _compare(_run(backend, x, w, b, r, dy, kw), _exact(x, w, b, r, dy, kw), torch.float32)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_statistics_do_not_cancel(backend):
    """A constant offset 1e4 times the spread: float32 sums of squares would be pure rounding noise."""
    device = require_backend(backend)
    seed = fresh_seed()
    x, w, b, _, dy = _inputs(2, 3, (9, 10, 11), "contiguous", torch.float32, device, seed, False,
                             offset=1e4, scale=1.0)
    kw = dict(norm="group", num_groups=1, activation="identity")
    got = _run(backend, x, w, b, None, dy, kw)
    exact = _exact(x, w, b, None, dy, kw)
    assert (got[0].double().cpu() - exact[0]).abs().max().item() < 2e-2  # naive E[x^2]-E[x]^2: O(1) or NaN


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("position", [None, "before_activation", "after_activation"])
def test_gradcheck(backend, position):
    device = require_backend(backend, torch.float64)
    seed = fresh_seed()
    x, w, b, r, _ = _inputs(2, 6, (3, 4, 3), "channels_last", torch.float64, device, seed, position is not None,
                            offset=3.0, scale=2.0)
    kw = dict(norm="group", num_groups=3, negative_slope=0.2)
    if position is not None:
        kw["residual_position"] = position
    inputs = [t.detach().clone().requires_grad_() for t in (x, w, b) + ((r,) if r is not None else ())]

    def fn(*a):
        return medmap_fast.norm_act(a[0], a[1], a[2], residual=a[3] if len(a) > 3 else None, backend=backend, **kw)

    # The interpreter is slow: fast mode checks a random projection of the Jacobian.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=_interpreted(backend, device))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_deterministic(backend):
    device = require_backend(backend)
    seed = fresh_seed()
    spatial = (5, 7, 6) if _interpreted(backend, device) else (9, 17, 13)
    x, w, b, r, dy = _inputs(2, 12, spatial, "channels_last", torch.float32, device, seed, True)
    kw = dict(norm="group", num_groups=4)
    first = _run(backend, x, w, b, r, dy, kw)
    second = _run(backend, x, w, b, r, dy, kw)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


def test_layouts_and_dtypes_of_outputs():
    x = torch.randn(2, 4, 3, 5, 6).to(memory_format=torch.channels_last_3d)
    r = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)  # another dtype and layout than x
    w = torch.ones(4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    rr = r.clone().requires_grad_()
    y = medmap_fast.norm_act(x, w, b, residual=rr)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last_3d)
    y.sum().backward()
    assert w.grad.dtype == torch.float64 and rr.grad.dtype == torch.float64
    expected = reference.norm_act(x.double(), w.detach(), b.detach(), residual=r)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_lower_rank_inputs_and_empty_batch():
    for shape in [(2, 4, 9), (2, 4, 5, 6)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(medmap_fast.norm_act(x), reference.norm_act(x), atol=1e-5, rtol=1e-5)
    x = torch.randn(0, 4, 3, 3, 3, requires_grad=True)
    y = medmap_fast.norm_act(x, norm="group", num_groups=2)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_custom_ops_pass_opcheck():
    from medmap_fast.ops.norm_act import norm_act_backward, norm_act_forward

    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(2, 6, 3, 4, 5, generator=g).to(memory_format=torch.channels_last_3d)
    w, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    r = torch.randn(2, 6, 3, 4, 5, generator=g)
    for mode, res in [(0, None), (1, r), (2, r)]:
        args = (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(),
                res.clone().requires_grad_() if res is not None else None, 3, 0.01, mode, 1e-5, "cpu")
        torch.library.opcheck(norm_act_forward, args)
        y, mean, rstd = norm_act_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        torch.library.opcheck(norm_act_backward, (torch.randn_like(y), x, w, b, res if mode == 1 else None, mean,
                                                  rstd, 3, 0.01, mode, mode == 1, "cpu"))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(2, 8, 5, 6, 7, generator=g).to(memory_format=torch.channels_last_3d)
    w = torch.randn(8, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)

    def fn(x, w, b):
        return medmap_fast.norm_act(x * 2.0, w, b, norm="group", num_groups=2, negative_slope=0.1)

    compiled = torch.compile(fn, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = fn(xe, w, b), compiled(xc, w, b)
    torch.testing.assert_close(yc, ye)
    dy = torch.randn_like(ye)
    ge = torch.autograd.grad(ye, [xe, w, b], dy)
    gc = torch.autograd.grad(yc, [xc, w, b], dy)
    for a, c in zip(ge, gc):
        torch.testing.assert_close(c, a)


def test_backend_is_chosen_per_device():
    x = torch.randn(1, 2, 4)
    assert medmap_fast.dispatch.select("norm_act", x.device, None, lambda n: None) == "cpu"


BAD = [
    (dict(norm="batch"), ValueError, "norm"),
    (dict(norm="group"), ValueError, "num_groups"),
    (dict(norm="group", num_groups=3), ValueError, "num_groups"),
    (dict(norm="instance", num_groups=2), ValueError, "num_groups"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(negative_slope=float("nan")), ValueError, "negative_slope"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(weight=torch.ones(5)), ValueError, "weight"),
    (dict(bias=torch.ones(4, 1)), ValueError, "bias"),
    (dict(weight=torch.ones(4, dtype=torch.int64)), TypeError, "weight"),
    (dict(residual=torch.ones(2, 4, 3, 3, 2)), ValueError, "residual"),
    (dict(residual=torch.ones(2, 4, 3, 3, 3), residual_position="middle"), ValueError, "residual_position"),
    (dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("kw,exc,word", BAD, ids=[w for _, _, w in BAD])
def test_bad_arguments_name_the_argument(kw, exc, word):
    x = torch.randn(2, 4, 3, 3, 3)
    with pytest.raises(exc, match=word):
        medmap_fast.norm_act(x, **kw)


def test_bad_tensors():
    with pytest.raises(ValueError, match="x must be"):
        medmap_fast.norm_act(torch.randn(2, 4))
    with pytest.raises(TypeError, match="x"):
        medmap_fast.norm_act(torch.ones(2, 4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="voxel"):
        medmap_fast.norm_act(torch.randn(2, 4, 0, 3, 3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        medmap_fast.norm_act([1.0, 2.0])


def _manual_group_norm(x, groups, eps):
    """Group norm from elementary float64 ops: an oracle that shares no kernel with torch's norms."""
    v = x.reshape(x.shape[0], groups, -1)
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return ((v - mean) / torch.sqrt(var + eps)).reshape(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("g_layout", ["channels_last", "view_of_channels_last", "permuted"])
def test_batch_one_gradient_in_any_layout(backend, x_layout, g_layout):
    """Batch 1, no activation: the incoming gradient reaches the norm as it is. torch's
    F.instance_norm (the reference's kernel) got this wrong for channels-last gradients, whose
    batch stride a view sets to C; every backend must match the elementary formula."""
    device = require_backend(backend, torch.float64)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 8, 5, 6, 7, generator=g, dtype=torch.float64)
    dy = torch.randn(1, 8, 5, 6, 7, generator=g, dtype=torch.float64)
    x = make_layout(x, x_layout).to(device)
    dy = dy.contiguous(memory_format=torch.channels_last_3d) if g_layout != "permuted" else make_layout(dy, "permuted")
    if g_layout == "view_of_channels_last":
        dy = dy.view(dy.shape)  # batch stride C, as autograd's view backward hands it on
    dy = dy.to(device)
    got, want = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    medmap_fast.norm_act(got, None, None, activation="identity", backend=backend).backward(dy)
    _manual_group_norm(want, 8, 1e-5).backward(dy.contiguous())
    torch.testing.assert_close(got.grad, want.grad, atol=1e-10, rtol=1e-10)


def test_reference_group_norm_input_without_gradient():
    """A channels-last input that needs no gradient while the weight does: torch's CPU group-norm
    backward crashed the process here; the reference must give the weight's gradient."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 3, 4, 5, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 6, 3, 4, 5, generator=g, dtype=torch.float64)
    (dw,) = torch.autograd.grad(reference.norm_act(x, w, None, norm="group", num_groups=2, activation="identity"),
                                [w], dy)
    w2 = w.detach().clone().requires_grad_()
    want = _manual_group_norm(x.contiguous(), 2, 1e-5) * w2.view(1, 6, 1, 1, 1)
    (dw2,) = torch.autograd.grad(want, [w2], dy)
    torch.testing.assert_close(dw, dw2, atol=1e-10, rtol=1e-10)
