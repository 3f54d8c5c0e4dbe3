"""Anchor alignment (SPEC section 2): the public op, its torch.library registration and autograd.

The kernels do the part that touches the features: per (b, k, c) the sum over voxels of
(f_k - a)^2, with the anchor a = sum_k coef[b, k, c] f_k recomputed on the fly (never stored), and,
backward, the gradient into the features and into the anchor coefficients in one more read. The
anchor weights, sigma^2 and the reduction live in plain PyTorch on (B, M, C) tensors, so autograd
carries the gradient from the loss to the per-(b, k, c) sums and from the coefficients on to pi
(and to theta when pi = softmax(theta)).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _checks, _memory, dispatch, reference
from . import _backends, _eager, _layout
from ._layout import acc_dtype
from .masked_fusion import _grad_buffers, _modalities, masked_fusion

ANCHORS = ("mix", "normal")


def _sums(coef: Tensor) -> Tensor:
    return coef.new_empty(coef.shape)


@_eager.custom_op("medmap_fast::anchor_sq", mutates_args=())
def anchor_sq(feats: List[Tensor], coef: Tensor, present: Tensor, stacked: bool, detach: bool, backend: str) -> Tensor:
    """(B, M, C): sum over voxels of (f_k - a)^2 for present k (0 for missing ones)."""
    sq = _sums(coef)
    _backends.kernels(backend, "anchor_align").anchor_fwd(
        _layout.common_bcs(_modalities(feats, stacked)), coef, present, sq, None
    )
    return sq


@anchor_sq.register_fake
def _(feats, coef, present, stacked, detach, backend):
    return _sums(coef)


@_eager.custom_op("medmap_fast::anchor_sq_backward", mutates_args=())
def anchor_sq_backward(
    G: Tensor, feats: List[Tensor], coef: Tensor, present: Tensor, stacked: bool, detach: bool, need_coef_grad: bool,
    backend: str,
) -> List[Tensor]:
    grads, grad_views = _grad_buffers(feats, stacked)
    _memory.prefer_huge_pages(*grads)
    grad_coef = coef.new_empty(coef.shape if need_coef_grad else (0,))
    _backends.kernels(backend, "anchor_align").anchor_bwd(
        _layout.common_bcs(_modalities(feats, stacked)),
        coef,
        present,
        G.contiguous(),
        detach,
        grad_views,
        grad_coef if need_coef_grad else None,
    )
    return [*grads, grad_coef]


@anchor_sq_backward.register_fake
def _(G, feats, coef, present, stacked, detach, need_coef_grad, backend):
    grads, _ = _grad_buffers(feats, stacked)
    return [*grads, coef.new_empty(coef.shape if need_coef_grad else (0,))]


def _setup(ctx, inputs, output):
    feats, coef, present, stacked, detach, backend = inputs
    ctx.n_feats = len(feats)
    ctx.stacked, ctx.detach, ctx.backend = stacked, detach, backend
    ctx.save_for_backward(*feats, coef, present)


def _backward(ctx, G):
    saved = ctx.saved_tensors
    feats = list(saved[: ctx.n_feats])
    coef, present = saved[ctx.n_feats :]
    need_coef = bool(ctx.needs_input_grad[1]) and not ctx.detach
    res = _eager.call(anchor_sq_backward, G, feats, coef, present, ctx.stacked, ctx.detach, need_coef, ctx.backend)
    return list(res[:-1]), (res[-1] if need_coef else None), None, None, None, None


_eager.register_autograd("medmap_fast::anchor_sq", _backward, setup_context=_setup)


@_eager.custom_op("medmap_fast::anchor_sq_with_anchor", mutates_args=())
def anchor_sq_with_anchor(
    feats: List[Tensor], coef: Tensor, present: Tensor, stacked: bool, backend: str
) -> List[Tensor]:
    """Inference only (no autograd): the sums and the anchor itself from the same single read."""
    mods = _modalities(feats, stacked)
    sq = _sums(coef)
    a = _layout.empty(mods[0].shape, _layout.channels_last(mods[0]), mods[0])
    _memory.prefer_huge_pages(a)
    _backends.kernels(backend, "anchor_align").anchor_fwd(_layout.common_bcs(mods), coef, present, sq, _layout.as_bcs(a))
    return [sq, a]


@anchor_sq_with_anchor.register_fake
def _(feats, coef, present, stacked, backend):
    mods = _modalities(feats, stacked)
    return [_sums(coef), _layout.empty(mods[0].shape, _layout.channels_last(mods[0]), mods[0])]


# ----------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------


def check_pi(pi, present: Tensor, device: torch.device, name: str = "pi"):
    """The anchor's weights over the modalities against the (B, M) bool mask ``present``: shape, dtype,
    device, then the values (finite, non-negative, a positive weight on some present modality of every
    sample that has one) with a single read-back of a (B, M) reduction."""
    B, M = present.shape
    _checks.check_weights_vector(pi, [(M,), (B, M)], name, device, "mixture weights over the modalities", values=False)
    _checks.check_anchor_weights(pi, present, name)
    return pi


def anchor_coefficients(present: Tensor, pi: Optional[Tensor], channels: int, dtype: torch.dtype) -> Tensor:
    """The (B, M, C) anchor coefficients m_bk pi_k / sum_j m_bj pi_j, differentiable in pi (validated
    by :func:`check_pi`)."""
    w = reference.anchor_weights_unchecked(present, pi, dtype)
    return w.unsqueeze(-1).expand(*w.shape, channels).contiguous()


def feature_geometry(feats: List[Tensor], stacked: bool):
    """(B, M, C, S) of validated features."""
    ref = feats[0]
    if stacked:
        B, M, C = ref.shape[:3]
        S = math.prod(ref.shape[3:])
    else:
        B, C = ref.shape[:2]
        M = len(feats)
        S = math.prod(ref.shape[2:])
    return B, M, C, S


def reduce_per_modality(per_bk: Tensor, present: Tensor, reduction: str) -> Tensor:
    return reference._reduce_modalities(per_bk, present, reduction)


def anchor_align(
    features: Union[Tensor, Sequence[Tensor]],
    mask: Tensor,
    pi: Optional[Tensor] = None,
    *,
    anchor: str = "mix",
    sigma2: Union[float, Tensor] = 1.0,
    detach_anchor: bool = False,
    reduction: str = "mean",
    return_anchor: bool = False,
    check_finite: bool = False,
    backend: Optional[str] = None,
):
    """The MedMAP alignment loss: every present modality's features pulled towards the per-sample anchor.

    Per sample b, the anchor is a_b = sum_k m_bk pi_k f_bk / sum_k m_bk pi_k over the present
    modalities only (``anchor="mix"``: P_mix with weights ``pi``), or a_b = 0 (``anchor="normal"``:
    the standard-normal anchor P_N). Each present (b, k) costs
    L_bk = mean over channels and voxels of (f_bk - a_b)^2 / (2 sigma2_c), the KL between the
    isotropic Gaussians N(f, sigma2) and N(a, sigma2).

    Args:
        features: one (B, M, C, *spatial) tensor or a list of M (B, C, *spatial) tensors (read in
            place); float32/float16/bfloat16/float64, NCDHW or channels_last_3d.
        mask: (B, M) availability, bool or 0/1.
        pi: mixture weights over the modalities, (M,) or (B, M), finite and non-negative (they are
            renormalised over each sample's present modalities); None for uniform. Pass
            ``softmax(theta)`` for the learned anchor P*_mix: the gradient reaches theta. A sample
            with a modality present but weight 0 on all of its present modalities has no anchor:
            a ValueError names it (and its weights) rather than silently aligning it to a = 0.
            Checking this reads one (B, M) reduction back to the host (a sync on CUDA; skipped
            under torch.compile, where such a sample gives NaN). For a fallback of your own, pass
            (B, M) weights, e.g. uniform for such samples.
        anchor: ``"mix"`` or ``"normal"``.
        sigma2: the Gaussians' variance: a positive number, or a () or (C,) tensor (may require grad).
        detach_anchor: stop the gradient through the anchor (then pi gets no gradient).
        reduction: ``"mean"`` (over present (b, k): SPEC's L_align), ``"sum"`` (of the L_bk) or
            ``"none"`` (the (B, M) L_bk, 0 where missing).
        return_anchor: also return the anchor (B, C, *spatial) (differentiable, features' dtype).
        check_finite: raise a ValueError naming the first non-finite feature value of a present
            modality instead of returning NaN.
        backend: see :mod:`medmap_fast.dispatch`.

    Returns:
        The loss, float32 (float64 for float64 features); with ``return_anchor``, (loss, anchor).
        A sample with no modality present adds nothing (and gets zero gradient), never NaN.
        Features with no voxel (or no channel) are refused with a ValueError on every backend: the
        mean over them is undefined (an empty batch, B = 0, is fine and gives 0).
    """
    feats, stacked = _checks.modality_list(features)
    ref = feats[0]
    B, M, C, S = feature_geometry(feats, stacked)
    _checks.check_voxels(ref.shape, B, C, S)
    present = _checks.check_mask(mask, B, M, ref.device)
    _checks.check_choice(anchor, ANCHORS, "anchor")
    _checks.check_reduction(reduction)
    if anchor == "normal" and pi is not None:
        raise ValueError("pi is only used by anchor='mix'; anchor='normal' has a = 0")
    pi = check_pi(pi, present, ref.device)
    _checks.check_positive(sigma2, "sigma2", C, ref.device)
    if check_finite:
        _checks.check_finite_modalities(feats, stacked, present)
    acc = acc_dtype(ref.dtype)
    name = dispatch.select(
        "anchor_align", ref.device, backend, lambda n: _backends.reason(n, ref.device, ref.dtype, M)
    )
    if name == "reference":
        # in the accumulation precision: half-precision squares and sums overflow
        wide = features.to(acc) if stacked else [f.to(acc) for f in feats]
        loss = reference.anchor_align(wide, mask, pi, anchor, _as_acc(sigma2, acc, ref.device), detach_anchor, reduction)
        if return_anchor:
            return loss, anchor_tensor(features, mask, pi, anchor, backend=name)
        return loss
    if anchor == "mix":
        coef = anchor_coefficients(present, pi, C, acc)
    else:
        coef = torch.zeros((B, M, C), dtype=acc, device=ref.device)
    anchor_out = None
    grad_needed = torch.is_grad_enabled() and (
        any(f.requires_grad for f in feats)
        or coef.requires_grad
        or (isinstance(sigma2, Tensor) and sigma2.requires_grad)
    )
    if return_anchor and anchor == "mix" and not grad_needed:
        sq, anchor_out = _eager.call(anchor_sq_with_anchor, feats, coef, present, stacked, name)
    else:
        sq = _eager.call(anchor_sq, feats, coef, present, stacked, bool(detach_anchor), name)
    inv = 0.5 / _as_acc(sigma2, acc, ref.device)
    per_bk = (sq * inv).sum(dim=-1) / max(C * S, 1)
    loss = reduce_per_modality(per_bk, present, reduction)
    if not return_anchor:
        return loss
    if anchor_out is None:
        anchor_out = anchor_tensor(features, mask, pi, anchor, backend=name)
    return loss, anchor_out


def _as_acc(sigma2, acc: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(sigma2, Tensor):
        return sigma2.to(acc)
    return torch.tensor(float(sigma2), dtype=acc, device=device)


def anchor_tensor(features, mask, pi, anchor: str = "mix", backend: Optional[str] = None) -> Tensor:
    """The anchor (B, C, *spatial), differentiable: a weighted fusion with the anchor weights
    (``anchor="mix"``), or zeros (``"normal"``). ``pi`` must already have passed :func:`check_pi`
    against this mask (the callers' loss did): checked again here, it would cost a second device sync."""
    feats, stacked = _checks.modality_list(features)
    mods = _modalities(feats, stacked)
    if anchor == "normal":
        return torch.zeros_like(mods[0])
    w = reference.anchor_weights_unchecked((mask != 0), pi, acc_dtype(mods[0].dtype))
    return masked_fusion(features, mask, "weighted", w, normalize=False, backend=backend)
