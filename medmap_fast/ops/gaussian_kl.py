"""Batched Gaussian KL to an anchor (SPEC section 3): the public op, its registration and autograd.

Rows are diagonal Gaussians N(mu, exp(logvar)) in C dimensions (e.g. one per voxel: N = B*M*S rows).
The forward kernel streams the rows once and gives each row's KL (closed form to N(0, I), or the
variational approximation to a J-component mixture) and, when a backward will follow, the J
responsibilities softmax_j(log pi_j - KL_j): the only per-row state the gradient needs (J floats a
row instead of the (N, J, C) tensor a naive version builds). The backward kernel reads the rows once
more and writes d/d mu and d/d logvar, plus three (J, C) sums from which the mixture parameters'
gradients follow in closed form:
    d/d nu_jc      = -S1_jc / tau2_jc
    d/d logtau2_jc = (S0_j - S2_jc / tau2_jc) / 2
    d/d log pi_j   = -S0_j
with S0_j = sum w r_j, S1_jc = sum w r_j (mu_c - nu_jc), S2_jc = sum w r_j ((mu_c - nu_jc)^2 + var_c).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union  # noqa: F401

import torch
from torch import Tensor

from .. import _checks, _memory, dispatch, reference
from . import _backends, _eager, _layout

# ----------------------------------------------------------------------------------------------
# Custom ops on (G, R, C) row views
# ----------------------------------------------------------------------------------------------


def _loss_like(mu: Tensor, nu: Tensor) -> Tensor:
    return torch.empty(mu.shape[:2], dtype=nu.dtype, device=mu.device)


def _resp_like(mu: Tensor, nu: Tensor, want: bool) -> Tensor:
    shape = (*mu.shape[:2], nu.shape[0]) if want else (0,)
    return torch.empty(shape, dtype=nu.dtype, device=mu.device)


@_eager.custom_op("medmap_fast::gaussian_kl_rows", mutates_args=())
def gaussian_kl_rows(
    mu: Tensor, logvar: Tensor, present: Optional[Tensor], nu: Tensor, logtau2: Tensor, logpi: Tensor,
    want_resp: bool, backend: str,
) -> List[Tensor]:
    """[loss (G, R), resp (G, R, J) or empty]."""
    loss = _loss_like(mu, nu)
    resp = _resp_like(mu, nu, want_resp)
    _backends.kernels(backend, "gaussian_kl").gkl_fwd(mu, logvar, present, nu, logtau2, logpi, loss, resp if want_resp else None)
    return [loss, resp]


@gaussian_kl_rows.register_fake
def _(mu, logvar, present, nu, logtau2, logpi, want_resp, backend):
    return [_loss_like(mu, nu), _resp_like(mu, nu, want_resp)]


def _row_grad(t: Tensor, want: bool) -> Tensor:
    return torch.empty(t.shape if want else (0,), dtype=t.dtype, device=t.device)


@_eager.custom_op("medmap_fast::gaussian_kl_rows_backward", mutates_args=())
def gaussian_kl_rows_backward(
    w: Tensor, mu: Tensor, logvar: Tensor, present: Optional[Tensor], nu: Tensor, logtau2: Tensor,
    resp: Optional[Tensor], need_mu: bool, need_logvar: bool, need_stats: bool, backend: str,
) -> List[Tensor]:
    """[grad_mu, grad_logvar, stats (3, J, C)], each empty when not needed."""
    grad_mu = _row_grad(mu, need_mu)
    grad_lv = _row_grad(mu, need_logvar)
    _memory.prefer_huge_pages(grad_mu, grad_lv)
    stats = nu.new_empty((3, *nu.shape) if need_stats else (0,))
    _backends.kernels(backend, "gaussian_kl").gkl_bwd(
        mu, logvar, present, nu, logtau2, resp, w,
        grad_mu if need_mu else None,
        grad_lv if need_logvar else None,
        stats if need_stats else None,
    )
    return [grad_mu, grad_lv, stats]


@gaussian_kl_rows_backward.register_fake
def _(w, mu, logvar, present, nu, logtau2, resp, need_mu, need_logvar, need_stats, backend):
    return [_row_grad(mu, need_mu), _row_grad(mu, need_logvar), nu.new_empty((3, *nu.shape) if need_stats else (0,))]


def _setup(ctx, inputs, output):
    mu, logvar, present, nu, logtau2, logpi, want_resp, backend = inputs
    ctx.backend = backend
    ctx.has_present = present is not None
    ctx.has_resp = want_resp
    saved = [mu, logvar, nu, logtau2]
    if present is not None:
        saved.append(present)
    if want_resp:
        saved.append(output[1])
    ctx.save_for_backward(*saved)


def _backward(ctx, grads):
    g_loss = grads[0]
    saved = list(ctx.saved_tensors)
    mu, logvar, nu, logtau2 = saved[:4]
    rest = saved[4:]
    present = rest.pop(0) if ctx.has_present else None
    resp = rest.pop(0) if ctx.has_resp else None
    need_mu, need_lv = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    need_params = any(ctx.needs_input_grad[3:6])
    if g_loss is None:
        g_loss = torch.zeros(mu.shape[:2], dtype=nu.dtype, device=mu.device)
    grad_mu, grad_lv, stats = _eager.call(
        gaussian_kl_rows_backward,
        g_loss, mu, logvar, present, nu, logtau2, resp, need_mu, need_lv, need_params, ctx.backend
    )
    g_nu = g_lt = g_logpi = None
    if need_params:
        inv_tau2 = torch.exp(-logtau2)
        g_nu = -stats[1] * inv_tau2
        g_lt = 0.5 * (stats[0] - stats[2] * inv_tau2)
        g_logpi = -stats[0, :, 0]
    return (grad_mu if need_mu else None), (grad_lv if need_lv else None), None, g_nu, g_lt, g_logpi, None, None


_eager.register_autograd("medmap_fast::gaussian_kl_rows", _backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# Views: (..., C) rows as (G, R, C) without copying where the strides allow it
# ----------------------------------------------------------------------------------------------


def _merges(sizes, strides) -> bool:
    """Whether dims of these sizes and strides merge into one strided dim: every dim of size > 1 has
    the stride of the next such dim times that dim's size."""
    prev = None
    for n, st in zip(sizes, strides):
        if n == 1:
            continue
        if prev is not None and prev != st * n:
            return False
        prev = st
    return True


def _grouped(t: Tensor, split: int) -> Optional[Tensor]:
    """t (..., C) as a (G, R, C) view with G the leading ``split`` dims, or None when the strides forbid it."""
    lead = t.shape[:-1]
    G = math.prod(lead[:split])
    R = math.prod(lead[split:])
    strides = t.stride()
    if t.numel() and not (_merges(lead[:split], strides[:split]) and _merges(lead[split:], strides[split:-1])):
        # Known to fail: asking view() anyway would cost a C++ exception, about 15 µs each on the
        # 2-core CPU, and _rows tries the splits in turn (60 µs a call for NCDHW features).
        return None
    try:
        return t.view(G, R, t.shape[-1])
    except RuntimeError:
        return None


def _rows(mu: Tensor, logvar: Tensor, split: Optional[int]) -> Tuple[Tensor, Tensor]:
    """(G, R, C) views of mu and logvar; split fixed by a mask, else the first split both allow."""
    splits = [split] if split is not None else range(0, mu.dim())
    for k in splits:
        m3, l3 = _grouped(mu, k), _grouped(logvar, k)
        if m3 is not None and l3 is not None:
            return m3, l3
    k = split if split is not None else 0
    m3 = _grouped(mu, k)
    if m3 is None:
        m3 = _grouped(mu.contiguous(), k)
    l3 = _grouped(logvar, k)
    if l3 is None:
        l3 = _grouped(logvar.contiguous(), k)
    return m3, l3


# ----------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------


def check_mixture(
    nu, logtau2, pi, pi_logits, C: int, device: torch.device, required: bool, pi_name: str = "pi"
) -> Optional[int]:
    """Validate a diagonal Gaussian mixture (nu, logtau2 (J, C); pi or pi_logits (J,)); returns J.

    ``pi`` (called ``pi_name`` in errors) must be finite and non-negative with a positive sum: the
    weights are normalised by their sum, which all zeros leave undefined (the KL would be inf)."""
    if nu is None and logtau2 is None:
        if required:
            raise ValueError("a mixture target needs nu and logtau2 of shape (J, C); got nu=None, logtau2=None")
        if pi is not None or pi_logits is not None:
            raise ValueError(f"{pi_name} / pi_logits are mixture weights: give nu and logtau2 (J, C) too")
        return None
    for name, t in (("nu", nu), ("logtau2", logtau2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a (J, C) tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[1] != C or t.shape[0] < 1:
            raise ValueError(f"{name} must have shape (J, C) with C = {C} and J >= 1, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but mu is on {device}")
    if nu.shape != logtau2.shape:
        raise ValueError(f"nu and logtau2 must have the same shape (J, C), got {tuple(nu.shape)} and {tuple(logtau2.shape)}")
    J = nu.shape[0]
    if pi is not None and pi_logits is not None:
        raise ValueError(f"give the mixture weights as {pi_name} or as pi_logits, not both")
    if pi is not None:
        _checks.check_weights_vector(pi, [(J,)], pi_name, device, "mixture weights", values=False)
        _checks.check_weight_values(pi, pi_name, "mixture weights", positive_sum=True)
    if pi_logits is not None:
        if not isinstance(pi_logits, Tensor) or tuple(pi_logits.shape) != (J,) or not pi_logits.is_floating_point():
            got = tuple(pi_logits.shape) if isinstance(pi_logits, Tensor) else type(pi_logits).__name__
            raise ValueError(f"pi_logits must be a float tensor of shape (J,) = ({J},), got {got}")
        if pi_logits.device != device:
            raise ValueError(f"pi_logits is on {pi_logits.device} but mu is on {device}")
    return J


def _log_weights(J: int, pi, pi_logits, acc, device) -> Tensor:
    if pi_logits is not None:
        return torch.log_softmax(pi_logits.to(acc), dim=0)
    if pi is not None:
        p = pi.to(acc)
        return reference.safe_log(p / p.sum())
    return torch.full((J,), -math.log(J), dtype=acc, device=device)


def _check_mask(mask, lead, device) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor over the leading dims of mu {tuple(lead)}, got {type(mask).__name__}")
    if mask.dim() > len(lead) or tuple(mask.shape) != tuple(lead[: mask.dim()]):
        raise ValueError(
            f"mask must have a prefix of mu's leading shape {tuple(lead)} (e.g. (B, M)), got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but mu is on {device}")
    _checks.check_binary_values(mask, "mask")
    return mask


def _logvar_tensor(logvar, mu: Tensor) -> Tensor:
    if logvar is None:
        return torch.zeros((), dtype=mu.dtype, device=mu.device).expand(mu.shape)
    if isinstance(logvar, (int, float)) and not isinstance(logvar, bool):
        return torch.tensor(float(logvar), dtype=mu.dtype, device=mu.device).expand(mu.shape)
    if not isinstance(logvar, Tensor):
        raise TypeError(f"logvar must be None, a number or a tensor broadcastable to mu {tuple(mu.shape)}, got {type(logvar).__name__}")
    if not logvar.is_floating_point():
        raise TypeError(f"logvar must be floating point, got {logvar.dtype}")
    if logvar.device != mu.device:
        raise ValueError(f"logvar is on {logvar.device} but mu is on {mu.device}")
    try:
        return logvar.to(mu.dtype).expand(mu.shape)
    except RuntimeError:
        raise ValueError(f"logvar of shape {tuple(logvar.shape)} does not broadcast to mu's shape {tuple(mu.shape)}") from None


def gaussian_kl(
    mu: Tensor,
    logvar: Union[None, float, Tensor] = None,
    *,
    nu: Optional[Tensor] = None,
    logtau2: Optional[Tensor] = None,
    pi: Optional[Tensor] = None,
    pi_logits: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    reduction: str = "mean",
    check_finite: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """KL from diagonal Gaussians N(mu, exp(logvar)), one per row of (..., C), to an anchor.

    * ``nu`` None: to P_N = N(0, I), in closed form 1/2 sum_c (mu^2 + var - 1 - logvar).
    * ``nu``, ``logtau2`` (J, C) (and weights ``pi`` (J,) or ``softmax(pi_logits)``, uniform when
      neither is given; ``pi`` is normalised by its sum, so it must be finite and non-negative with a
      positive sum, else a ValueError: all zeros define no mixture; a zero entry drops its
      component): to the mixture sum_j pi_j N(nu_j, diag exp(logtau2_j)), by the variational
      approximation KL_var = -log sum_j pi_j exp(-KL(q || N(nu_j, tau_j^2))) (Hershey and Olsen
      2007), with a max-shifted log-sum-exp. It lies below sum_j pi_j KL(q || p_j). All mixture
      parameters may require grad.

    Args:
        mu: (..., C) means, any strides (e.g. ``f.movedim(2, -1)`` of (B, M, C, D, H, W) features:
            read in place). float32/float16/bfloat16/float64.
        logvar: log-variances broadcastable to mu (a number, a (C,) tensor, or mu's shape); None
            for unit variance.
        mask: drops rows: a bool or 0/1 tensor whose shape is a prefix of mu's leading dims (e.g.
            (B, M) for mu of shape (B, M, D, H, W, C)). Dropped rows are never read.
        reduction: ``"mean"`` over the kept rows, ``"sum"``, or ``"none"`` (mu.shape[:-1], 0 for
            dropped rows).
        check_finite: raise a ValueError naming the first non-finite value of a kept row instead of
            returning NaN.

    Returns float32 (float64 for float64 inputs). The fused backends never build the (N, J, C)
    tensor: they save only the J responsibilities per row for the backward.
    """
    if not isinstance(mu, Tensor):
        raise TypeError(f"mu must be a tensor (..., C), got {type(mu).__name__}")
    if mu.dim() < 1:
        raise ValueError("mu must have at least one dim (..., C), got a 0-d tensor")
    _checks._check_float(mu, "mu")
    C = mu.shape[-1]
    lead = mu.shape[:-1]
    J = check_mixture(nu, logtau2, pi, pi_logits, C, mu.device, required=False)
    _checks.check_reduction(reduction)
    mask = _check_mask(mask, lead, mu.device)
    lv = _logvar_tensor(logvar, mu)
    if check_finite:
        keep = None
        if mask is not None:
            keep = (mask != 0).view(*mask.shape, *([1] * (mu.dim() - mask.dim())))
        _checks.check_finite(mu, "mu", keep)
        _checks.check_finite(lv, "logvar", keep)
    acc = _layout.acc_dtype(mu.dtype)
    comps = 1 if J is None else J
    name = dispatch.select(
        "gaussian_kl", mu.device, backend, lambda n: _backends.gkl_reason(n, mu.device, mu.dtype, comps, C)
    )
    if name == "reference":
        # in the accumulation precision: half-precision squares and sums overflow
        return reference.gaussian_kl(mu.to(acc), lv.to(acc), nu, logtau2, pi, pi_logits, mask, reduction)
    if J is None:
        nu_a = torch.zeros((1, C), dtype=acc, device=mu.device)
        lt_a = torch.zeros((1, C), dtype=acc, device=mu.device)
        logpi = torch.zeros((1,), dtype=acc, device=mu.device)
    else:
        nu_a, lt_a = nu.to(acc).contiguous(), logtau2.to(acc).contiguous()
        logpi = _log_weights(J, pi, pi_logits, acc, mu.device).contiguous()
    split = mask.dim() if mask is not None else None
    mu3, lv3 = _rows(mu, lv, split)
    present = (mask != 0).reshape(-1).contiguous() if mask is not None else None
    grad_needed = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (mu, lv, nu, logtau2, pi, pi_logits)
    )
    loss, _ = _eager.call(gaussian_kl_rows, mu3, lv3, present, nu_a, lt_a, logpi, grad_needed and comps > 1, name)
    if reduction == "none":
        return loss.reshape(lead)
    total = loss.sum()
    if reduction == "sum":
        return total
    if present is None:
        count = max(loss.numel(), 1)
        return total / count
    return total / (present.sum() * loss.shape[1]).clamp_min(1).to(acc)
