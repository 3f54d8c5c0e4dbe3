"""Moment matching (SPEC section 4): the public op, its torch.library registration and autograd.

One kernel pass reads the present modalities once and gives, per (b, k, c), the mean and the sum of
squared deviations over the voxels (fp32, merged per chunk with Chan's formula, never
E[x^2] - E[x]^2), for every modality and, when the target is the anchor, for the anchor a_b itself
(computed voxel by voxel, never stored). Everything after that is (B, M + 1, C)-sized PyTorch, so
autograd hands the backward kernel d loss / d mean and d loss / d m2, and the backward kernel needs
one more read of the features.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _checks, _memory, dispatch, reference
from . import _backends, _eager, _layout
from ._layout import acc_dtype
from .anchor_align import anchor_coefficients, check_pi, feature_geometry, reduce_per_modality
from .gaussian_kl import check_mixture
from .masked_fusion import _grad_buffers, _modalities

TARGETS = ("anchor", "normal", "mixture")


def _moment_shape(coef: Optional[Tensor], present: Tensor, C: int):
    B, M = present.shape
    return (B, M + (1 if coef is not None else 0), C)


@_eager.custom_op("medmap_fast::channel_moments", mutates_args=())
def channel_moments(
    feats: List[Tensor], coef: Optional[Tensor], present: Tensor, stacked: bool, backend: str
) -> List[Tensor]:
    """[mean, m2], each (B, M + A, C): per-channel mean and sum of squared deviations over the voxels of
    each present modality (0 for missing ones) and, when coef is given (A = 1), of the anchor."""
    mods = _modalities(feats, stacked)
    shape = _moment_shape(coef, present, mods[0].shape[1])
    acc = acc_dtype(mods[0].dtype)
    mean = torch.empty(shape, dtype=acc, device=present.device)
    m2 = torch.empty(shape, dtype=acc, device=present.device)
    _backends.kernels(backend, "moment_matching").moments_fwd(_layout.common_bcs(mods), coef, present, mean, m2)
    return [mean, m2]


@channel_moments.register_fake
def _(feats, coef, present, stacked, backend):
    mods = _modalities(feats, stacked)
    shape = _moment_shape(coef, present, mods[0].shape[1])
    acc = acc_dtype(mods[0].dtype)
    return [present.new_empty(shape, dtype=acc), present.new_empty(shape, dtype=acc)]


@_eager.custom_op("medmap_fast::channel_moments_backward", mutates_args=())
def channel_moments_backward(
    feats: List[Tensor], coef: Optional[Tensor], present: Tensor, mean: Tensor, alpha: Tensor, beta: Tensor,
    stacked: bool, need_coef_grad: bool, backend: str,
) -> List[Tensor]:
    grads, grad_views = _grad_buffers(feats, stacked)
    _memory.prefer_huge_pages(*grads)
    B, M = present.shape
    grad_coef = mean.new_empty((B, M, mean.shape[2]) if need_coef_grad else (0,))
    _backends.kernels(backend, "moment_matching").moments_bwd(
        _layout.common_bcs(_modalities(feats, stacked)),
        coef,
        present,
        mean,
        alpha.contiguous(),
        beta.contiguous(),
        grad_views,
        grad_coef if need_coef_grad else None,
    )
    return [*grads, grad_coef]


@channel_moments_backward.register_fake
def _(feats, coef, present, mean, alpha, beta, stacked, need_coef_grad, backend):
    grads, _ = _grad_buffers(feats, stacked)
    B, M = present.shape
    return [*grads, mean.new_empty((B, M, mean.shape[2]) if need_coef_grad else (0,))]


def _setup(ctx, inputs, output):
    feats, coef, present, stacked, backend = inputs
    ctx.n_feats = len(feats)
    ctx.has_coef = coef is not None
    ctx.stacked, ctx.backend = stacked, backend
    mods = _modalities(feats, stacked)
    ctx.S = max(math.prod(mods[0].shape[2:]), 1)
    extra = [coef] if coef is not None else []
    ctx.save_for_backward(*feats, present, output[0], *extra)


def _backward(ctx, grads):
    g_mean, g_m2 = grads
    saved = ctx.saved_tensors
    feats = list(saved[: ctx.n_feats])
    present, mean = saved[ctx.n_feats], saved[ctx.n_feats + 1]
    coef = saved[ctx.n_feats + 2] if ctx.has_coef else None
    g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
    g_m2 = torch.zeros_like(mean) if g_m2 is None else g_m2
    need_coef = ctx.has_coef and bool(ctx.needs_input_grad[1])
    # d mean / d x = 1 / S and d m2 / d x = 2 (x - mean): the kernel takes them as alpha + beta (x - mean).
    res = _eager.call(
        channel_moments_backward,
        feats, coef, present, mean, g_mean / ctx.S, 2 * g_m2, ctx.stacked, need_coef, ctx.backend
    )
    return list(res[:-1]), (res[-1] if need_coef else None), None, None, None


_eager.register_autograd("medmap_fast::channel_moments", _backward, setup_context=_setup)


def moments(
    features: Union[Tensor, Sequence[Tensor]],
    mask: Tensor,
    pi: Optional[Tensor] = None,
    *,
    with_anchor: bool = False,
    backend: Optional[str] = None,
):
    """Per-(b, k, c) mean and population variance over the voxels, (B, M, C) each (0 for missing
    modalities); with ``with_anchor``, (B, M + 1, C), the last row being the anchor's (weights ``pi``,
    refused as in :func:`medmap_fast.anchor_align`). Differentiable; float32 statistics for
    half-precision features. Features with no voxel (or no channel) and B > 0 are refused."""
    feats, stacked = _checks.modality_list(features)
    ref = feats[0]
    B, M, C, S = feature_geometry(feats, stacked)
    _checks.check_voxels(ref.shape, B, C, S)
    present = _checks.check_mask(mask, B, M, ref.device)
    if pi is not None and not with_anchor:
        raise ValueError("pi (the anchor's weights over modalities) is only used with with_anchor=True")
    pi = check_pi(pi, present, ref.device)
    name = dispatch.select("moments", ref.device, backend, lambda n: _backends.reason(n, ref.device, ref.dtype, M))
    return _moments(feats, stacked, present, pi, with_anchor, features, mask, name, S)


def _moments(feats, stacked, present, pi, with_anchor, features, mask, name, S):
    ref = feats[0]
    B, M = present.shape
    C = _modalities(feats, stacked)[0].shape[1]
    acc = acc_dtype(ref.dtype)
    if name == "reference":
        f = reference.stack_modalities(features)
        f = torch.where(reference.present_mask(mask, f.dim()), f, torch.zeros((), dtype=f.dtype, device=f.device))
        f = f.reshape(B, M, C, S).to(acc)
        if with_anchor:
            w = reference.anchor_weights_unchecked(present, pi, acc)
            f = torch.cat([f, (f * w.view(B, M, 1, 1)).sum(1, keepdim=True)], 1)
        mean = f.mean(-1)
        var = ((f - mean.unsqueeze(-1)) ** 2).mean(-1)
        keep = torch.cat([present, present.new_ones((B, f.shape[1] - M))], 1).unsqueeze(-1)
        zero = torch.zeros((), dtype=acc, device=ref.device)
        return torch.where(keep, mean, zero), torch.where(keep, var, zero)
    coef = anchor_coefficients(present, pi, C, acc) if with_anchor else None
    mean, m2 = _eager.call(channel_moments, feats, coef, present, stacked, name)
    return mean, m2 / max(S, 1)


def moment_matching(
    features: Union[Tensor, Sequence[Tensor]],
    mask: Tensor,
    pi: Optional[Tensor] = None,
    *,
    target: str = "anchor",
    nu: Optional[Tensor] = None,
    logtau2: Optional[Tensor] = None,
    pi_mix: Optional[Tensor] = None,
    pi_logits: Optional[Tensor] = None,
    detach_anchor: bool = False,
    eps: float = 1e-5,
    reduction: str = "mean",
    check_finite: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Match every present modality's per-channel moments to the anchor's.

    Per present (b, k, c): mu = the mean of f over the voxels and sigma = sqrt(var + eps) (population
    variance, fp32 statistics, one read of the features), against the target (mu*, sigma*):

    * ``target="anchor"``: the moments over the voxels of the per-sample anchor a_b (weights ``pi``
      over the present modalities, as in :func:`medmap_fast.anchor_align`), per sample and channel;
    * ``"normal"``: (0, sqrt(1 + eps));
    * ``"mixture"``: the Gaussian mixture (``nu``, ``logtau2`` of shape (J, C), weights ``pi_mix``
      (J,) or ``softmax(pi_logits)``, uniform by default)'s own mean sum_j pi_j nu_j and variance
      sum_j pi_j (tau_j^2 + nu_j^2) - mean^2; all of them may be learnable.

    L_bk = mean over c of (mu - mu*)^2 + (sigma - sigma*)^2. ``reduction``: ``"mean"`` over the
    present (b, k) (SPEC's L_mm), ``"sum"``, or ``"none"`` ((B, M), 0 where missing).
    ``detach_anchor`` stops the gradient through the anchor's moments. Returns float32 (float64 for
    float64 features); a sample with nothing present adds nothing. ``check_finite``: as in
    :func:`medmap_fast.anchor_align`.

    Refused with a ValueError on every backend: ``pi`` as in :func:`medmap_fast.anchor_align` (a
    sample whose present modalities all have weight 0 has no anchor), ``pi_mix`` that is negative,
    non-finite or all zero (one read-back each, a sync on CUDA), and features with no voxel (or no
    channel) and B > 0, whose moments are undefined (an empty batch gives 0).
    """
    feats, stacked = _checks.modality_list(features)
    ref = feats[0]
    B, M, C, S = feature_geometry(feats, stacked)
    _checks.check_voxels(ref.shape, B, C, S)
    present = _checks.check_mask(mask, B, M, ref.device)
    _checks.check_choice(target, TARGETS, "target")
    _checks.check_reduction(reduction)
    if target != "anchor" and pi is not None:
        raise ValueError(f"pi (the anchor's weights over modalities) is only used by target='anchor', got target={target!r}")
    pi = check_pi(pi, present, ref.device)
    if target == "mixture":
        check_mixture(nu, logtau2, pi_mix, pi_logits, C, ref.device, required=True, pi_name="pi_mix")
    elif any(t is not None for t in (nu, logtau2, pi_mix, pi_logits)):
        raise ValueError(f"nu, logtau2, pi_mix and pi_logits are only used by target='mixture', got target={target!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if check_finite:
        _checks.check_finite_modalities(feats, stacked, present)
    acc = acc_dtype(ref.dtype)
    name = dispatch.select(
        "moment_matching", ref.device, backend, lambda n: _backends.reason(n, ref.device, ref.dtype, M)
    )
    if target == "anchor" and detach_anchor and pi is not None:
        pi = pi.detach()  # the anchor's moments are a constant target: no gradient into pi at all
    mean, var = _moments(feats, stacked, present, pi, target == "anchor", features, mask, name, S)
    sigma = (var[:, :M] + eps).sqrt()
    mu = mean[:, :M]
    if target == "anchor":
        t_mean, t_var = mean[:, M:], var[:, M:]
        if detach_anchor:
            t_mean, t_var = t_mean.detach(), t_var.detach()
        t_sigma = (t_var + eps).sqrt()
    elif target == "normal":
        t_mean = torch.zeros((), dtype=acc, device=ref.device)
        t_sigma = torch.tensor(1.0 + eps, dtype=acc, device=ref.device).sqrt()
    else:
        t_mean, t_var = reference.mixture_moments_unchecked(nu.to(acc), logtau2.to(acc), pi_mix, pi_logits)
        t_sigma = (t_var + eps).sqrt()
    per_c = (mu - t_mean) ** 2 + (sigma - t_sigma) ** 2
    zero = torch.zeros((), dtype=acc, device=ref.device)
    per_bk = torch.where(present.unsqueeze(-1), per_c, zero).mean(dim=-1)
    return reduce_per_modality(per_bk, present, reduction)
