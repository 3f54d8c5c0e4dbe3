"""norm_act on small CPU tensors: with the backend left to choose, up to SMALL_CPU_ELEMENTS elements run on
aten's norm and activation (whose per-call cost is lower than the kernel's there), keeping the op's
contract: float32 statistics, output in x's dtype and layout, residual cast to x's dtype, weight and bias
gradients in their own dtypes. Above the threshold, or with a backend named, the kernel runs."""

import pytest
import torch

import medmap_fast
from medmap_fast import reference
from medmap_fast.ops.norm_act import SMALL_CPU_ELEMENTS

from conftest import fresh_seed


def _kernel_ran(y) -> bool:
    return type(y.grad_fn).__name__ == "_DirectBackward"


def _ref64(x, w, b, r, **kw):
    return reference.norm_act(x.double(), w.double(), b.double(), residual=None if r is None else
                              r.to(x.dtype).double(), **kw)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("kw", [{}, {"norm": "group", "num_groups": 2, "activation": "relu"},
                                {"residual_position": "after_activation"}])
def test_small_cpu_path_keeps_the_contract(dtype, tol, layout, kw):
    g = torch.Generator().manual_seed(fresh_seed())
    x = (torch.randn(2, 4, 5, 6, 3, generator=g) * 3 + 2).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "permuted":
        x = x.permute(0, 1, 4, 3, 2)
    x.requires_grad_()
    w = torch.randn(4, generator=g, dtype=torch.float64).float().requires_grad_()  # another dtype than x
    b = torch.randn(4, generator=g).requires_grad_()
    r = torch.randn(x.shape, generator=g, dtype=torch.float64)  # cast to x's dtype first, as the kernel does
    use_res = "residual_position" in kw or not kw
    y = medmap_fast.norm_act(x, w, b, residual=r if use_res else None, **kw)
    assert not _kernel_ran(y)
    assert y.dtype == dtype
    expected_cl = layout == "channels_last"
    assert y.stride(1) == 1 if expected_cl else y.is_contiguous()
    torch.testing.assert_close(y.double(), _ref64(x.detach(), w.detach(), b.detach(), r if use_res else None, **kw),
                               atol=tol * 10, rtol=tol)
    go = torch.randn(y.shape, generator=g).to(dtype).transpose(2, 4).contiguous().transpose(2, 4)
    y.backward(go)
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    # the kernel's gradients, for comparison
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y2 = medmap_fast.norm_act(x2, w2, b2, residual=r if use_res else None, backend="cpu", **kw)
    assert _kernel_ran(y2)
    y2.backward(go)
    torch.testing.assert_close(y, y2, atol=tol * 10, rtol=tol)
    for a, c in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(a.float(), c.float(), atol=tol * 50, rtol=tol * 5)


def test_threshold_and_named_backend():
    n = SMALL_CPU_ELEMENTS
    small = torch.randn(2, 8, n // 16, requires_grad=True)  # exactly the threshold
    big = torch.randn(2, 8, n // 16 + 1, requires_grad=True)
    assert not _kernel_ran(medmap_fast.norm_act(small))
    assert _kernel_ran(medmap_fast.norm_act(big))
    assert _kernel_ran(medmap_fast.norm_act(small, backend="cpu"))


def test_small_cpu_path_is_deterministic_and_errors_stay_the_ops():
    x = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    runs = []
    for _ in range(2):
        x.grad = None
        medmap_fast.norm_act(x).square().sum().backward()
        runs.append(x.grad.clone())
    assert torch.equal(*runs)
    with pytest.raises(ValueError, match="num_groups"):
        medmap_fast.norm_act(x, norm="group", num_groups=2)
