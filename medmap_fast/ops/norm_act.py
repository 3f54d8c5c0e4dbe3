"""Fused normalisation + activation (+ residual) (SPEC section 5): the public op, its torch.library
registration and autograd.

Instance norm is group norm with one channel per group, so the kernels only know groups. The forward
saves x and the (B, G) statistics, never the normalised tensor nor the activation: the backward
recomputes both from x in registers, which saves one activation-sized tensor per block and costs no
extra memory traffic (the backward reads x anyway).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from .. import _checks, _memory, dispatch, reference
from . import _backends, _eager, _layout
from ._layout import acc_dtype

NORMS = ("instance", "group")
ACTIVATIONS = ("leaky_relu", "relu", "identity")
RESIDUAL_POSITIONS = ("before_activation", "after_activation")
# residual_mode of the kernels: 0 none, 1 added before the activation, 2 after it
_MODES = {"before_activation": 1, "after_activation": 2}


def _views(x: Tensor, residual: Optional[Tensor]) -> List[Tensor]:
    """(B, C, S) views of x (and the residual, in x's dtype) sharing one set of strides."""
    if residual is None:
        return [_layout.as_bcs(x)]
    return _layout.common_bcs([x, residual.to(x.dtype)])


def _new_like(x: Tensor) -> Tensor:
    """An output shaped like x, in x's layout (channels-last stays channels-last), dense."""
    return _layout.empty(x.shape, _layout.channels_last(x), x)


@_eager.custom_op("medmap_fast::norm_act_forward", mutates_args=())
def norm_act_forward(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], groups: int, slope: float,
    residual_mode: int, eps: float, backend: str,
) -> List[Tensor]:
    """[y, mean, rstd]: y like x; mean and rstd (B, G) in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    views = _views(x, residual)
    y = _new_like(x)
    _memory.prefer_huge_pages(y)
    mean = x.new_empty((x.shape[0], groups), dtype=acc)
    rstd = torch.empty_like(mean)
    _backends.kernels(backend, "norm_act").norm_act_fwd(
        views[0], weight.to(acc).contiguous(), bias.to(acc).contiguous(), views[1] if residual is not None else None,
        _layout.as_bcs(y), mean, rstd, groups, slope, residual_mode, eps,
    )
    return [y, mean, rstd]


@norm_act_forward.register_fake
def _(x, weight, bias, residual, groups, slope, residual_mode, eps, backend):
    acc = acc_dtype(x.dtype)
    stats = x.new_empty((x.shape[0], groups), dtype=acc)
    return [_new_like(x), stats, torch.empty_like(stats)]


@_eager.custom_op("medmap_fast::norm_act_backward", mutates_args=())
def norm_act_backward(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], mean: Tensor, rstd: Tensor,
    groups: int, slope: float, residual_mode: int, need_dres: bool, backend: str,
) -> List[Tensor]:
    """[dx, dres (empty unless residual_mode 1 and need_dres), dweight, dbias]."""
    acc = mean.dtype
    with_res = residual_mode == 1
    views = _layout.common_bcs([x, dy.to(x.dtype)] + ([residual.to(x.dtype)] if with_res else []))
    dx = _new_like(x)
    dres = _new_like(x) if with_res and need_dres else x.new_empty((0,))
    _memory.prefer_huge_pages(dx, dres)
    dweight = torch.empty(weight.shape, dtype=acc, device=x.device)
    dbias = torch.empty_like(dweight)
    _backends.kernels(backend, "norm_act").norm_act_bwd(
        views[0], weight.to(acc).contiguous(), bias.to(acc).contiguous(), views[2] if with_res else None,
        views[1], mean, rstd, _layout.as_bcs(dx), _layout.as_bcs(dres) if dres.numel() else None,
        dweight, dbias, groups, slope, residual_mode,
    )
    return [dx, dres, dweight.to(weight.dtype), dbias.to(bias.dtype)]


@norm_act_backward.register_fake
def _(dy, x, weight, bias, residual, mean, rstd, groups, slope, residual_mode, need_dres, backend):
    dres = _new_like(x) if residual_mode == 1 and need_dres else x.new_empty((0,))
    return [_new_like(x), dres, torch.empty_like(weight), torch.empty_like(bias)]


def _setup(ctx, inputs, output):
    x, weight, bias, residual, groups, slope, residual_mode, eps, backend = inputs
    ctx.groups, ctx.slope, ctx.residual_mode, ctx.backend = groups, slope, residual_mode, backend
    ctx.residual_dtype = residual.dtype if residual is not None else None
    # Mode 1 recomputes z = norm(x) + residual in the backward, so it keeps the residual (usually a
    # tensor autograd holds anyway: the block's input). Mode 2 does not need it.
    keep = [residual] if residual_mode == 1 else []
    ctx.save_for_backward(x, weight, bias, output[1], output[2], *keep)


def _backward(ctx, grads):
    dy = grads[0]
    x, weight, bias, mean, rstd, *keep = ctx.saved_tensors
    residual = keep[0] if keep else None
    if dy is None:
        dy = torch.zeros_like(x)
    need_dres = ctx.residual_mode == 1 and bool(ctx.needs_input_grad[3])
    dx, dres, dweight, dbias = _eager.call(
        norm_act_backward,
        dy, x, weight, bias, residual, mean, rstd, ctx.groups, ctx.slope, ctx.residual_mode, need_dres, ctx.backend
    )
    if ctx.residual_mode == 2 and ctx.needs_input_grad[3]:
        dres = dy.to(ctx.residual_dtype)  # y = act(z) + residual: the residual's gradient is dy itself
    elif need_dres:
        dres = dres.to(ctx.residual_dtype)
    else:
        dres = None
    return dx, dweight, dbias, dres, None, None, None, None, None


_eager.register_autograd("medmap_fast::norm_act_forward", _backward, setup_context=_setup)


#: At most this many elements, on the CPU and with the backend left to choose, the op runs on aten's
#: group-norm kernels and activation instead of the fused kernel (in every mode, so that eager, compiled
#: and traced calls agree). Measured forward and backward on the 2-core CPU, B=2, float32: the fused
#: kernel's fixed cost per call (about 350 µs) makes it slower than eager at 2³-16³, while aten's group
#: norm (one channel per group for instance norm) runs at 0.5-0.75x of F.instance_norm's time from 2³ up
#: to about 2^18 elements, where the fused kernel catches up with it (benchmarks/norm_act_small_sizes.py).
SMALL_CPU_ELEMENTS = 1 << 18


def _small_on_cpu(x, weight, bias, norm, groups, activation, slope, residual, residual_position, eps):
    """The op's contract on eager PyTorch ops: statistics and arithmetic in float32 (float64 for float64),
    the residual cast to x's dtype first, the output in x's dtype and layout (channels-last when x's
    channels are innermost), weight and bias gradients in their own dtypes."""
    acc = acc_dtype(x.dtype)

    def as_acc(t: Optional[Tensor]) -> Optional[Tensor]:
        return t if t is None or t.dtype == acc else t.to(acc)  # a call to .to costs ~5 µs even as a no-op

    r = None if residual is None else as_acc(residual if residual.dtype == x.dtype else residual.to(x.dtype))
    # Instance norm as group norm with one channel per group: the same statistics, and on small CPU
    # tensors aten's fused group-norm kernels run forward and backward in half the time of
    # F.instance_norm's batch-norm route.
    z = torch.group_norm(reference._group_norm_input(as_acc(x)), groups, as_acc(weight), as_acc(bias), eps, False)
    y = reference.activate_with_residual(z, activation, slope, r, residual_position)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if _layout.channels_last(x):  # channels innermost, as the kernel writes them
        return y.movedim(1, -1).contiguous().movedim(-1, 1)
    return y.contiguous()


def _check_number(value, name: str, lo: float, strict: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < lo or (strict and value == lo):
        expected = f"a finite number {'>' if strict else '>='} {lo}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _check_affine(t: Optional[Tensor], name: str, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({x.shape[1]},) or None, got {type(t).__name__}")
    if t.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape (C,) = ({x.shape[1]},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}; x is read as (B, C, *spatial): one unbatched sample "
                         f"(C, *spatial) needs x.unsqueeze(0)")
    _checks._check_float(t, name)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all must match")


def _check_inputs(x, weight, bias, norm, num_groups, activation, negative_slope, residual, residual_position, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (B, C, *spatial), got {type(x).__name__}")
    if x.dim() < 3:
        raise ValueError(f"x must be (B, C, *spatial) with at least one spatial dim, got shape {tuple(x.shape)}")
    _checks._check_float(x, "x")
    _check_affine(weight, "weight", x)
    _check_affine(bias, "bias", x)
    _checks.check_choice(norm, NORMS, "norm")
    activation = "identity" if activation is None else activation
    _checks.check_choice(activation, ACTIVATIONS, "activation")
    _checks.check_choice(residual_position, RESIDUAL_POSITIONS, "residual_position")
    C = x.shape[1]
    if norm == "group":
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
            raise ValueError(f"num_groups must be a positive integer dividing C={C} for norm='group', "
                             f"got {num_groups!r}")
        groups = num_groups
    else:
        if num_groups is not None:
            raise ValueError(f"num_groups is only used by norm='group', got num_groups={num_groups!r} "
                             f"with norm={norm!r}")
        groups = C
    slope = {"relu": 0.0, "identity": 1.0}.get(activation)
    if slope is None:
        slope = _check_number(negative_slope, "negative_slope", -math.inf)
    _check_number(eps, "eps", 0.0)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a tensor shaped like x or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _checks._check_float(residual, "residual")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}: all must match")
    if math.prod(x.shape[2:]) == 0 or C == 0:
        raise ValueError(f"x must have at least one channel and one voxel per sample, got shape {tuple(x.shape)}")
    return activation, groups, slope


def norm_act(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    norm: str = "instance",
    num_groups: Optional[int] = None,
    activation: Optional[str] = "leaky_relu",
    negative_slope: float = 0.01,
    residual: Optional[Tensor] = None,
    eps: float = 1e-5,
    backend: Optional[str] = None,
    *,
    residual_position: str = "before_activation",
) -> Tensor:
    """Instance or group normalisation (affine), then LeakyReLU / ReLU / identity, with an optional
    residual, forward and backward in one fused pass each (after one statistics pass).

    ``x``: (B, C, *spatial), float32 / float16 / bfloat16 / float64, NCDHW or channels_last_3d (or
    any strides: other layouts are copied once). The output has x's dtype and layout. Statistics
    (mean and biased variance, as ``nn.InstanceNorm3d`` / ``nn.GroupNorm``) are computed in float32
    (float64 for float64) without cancellation, so data far from zero normalise accurately.

    ``norm``: ``"instance"`` (per sample and channel) or ``"group"`` (``num_groups`` groups of
    consecutive channels). ``weight``, ``bias``: (C,) or None (no affine); any float dtype, their
    gradients come back in it. ``activation``: ``"leaky_relu"`` (slope ``negative_slope``),
    ``"relu"`` or ``"identity"`` (or None). ``residual``: a tensor shaped like x, added to the
    normalised tensor before the activation (ResNet blocks) or, with
    ``residual_position="after_activation"``, after it; it is cast to x's dtype.

    The backward recomputes the activation from x and the statistics (nothing activation-sized is
    saved besides x) and gives deterministic weight and bias gradients.
    """
    activation, groups, slope = _check_inputs(
        x, weight, bias, norm, num_groups, activation, negative_slope, residual, residual_position, eps
    )
    if backend is None and x.device.type == "cpu" and 0 < x.numel() <= SMALL_CPU_ELEMENTS:
        return _small_on_cpu(x, weight, bias, norm, groups, activation, slope, residual, residual_position, eps)
    name = dispatch.select("norm_act", x.device, backend, lambda n: _backends.reason(n, x.device, x.dtype, 1))
    if name == "reference" or x.shape[0] == 0:
        return reference.norm_act(x, weight, bias, norm, groups if norm == "group" else None, activation,
                                  slope, residual, residual_position, eps)
    C = x.shape[1]
    acc = acc_dtype(x.dtype)
    w = weight if weight is not None else torch.ones((C,), dtype=acc, device=x.device)
    b = bias if bias is not None else torch.zeros((C,), dtype=acc, device=x.device)
    mode = _MODES[residual_position] if residual is not None else 0
    y, _, _ = _eager.call(norm_act_forward, x, w, b, residual, groups, slope, mode, float(eps), name)
    return y
