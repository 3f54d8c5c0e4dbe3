"""Masked multi-modal fusion (SPEC section 1): the public op, its torch.library registration and autograd.

The heavy work reduces to two kernels that every native backend provides:

* ``fuse_sum``: out = sum over present modalities k of coef[b, k, c] * f_k, which covers ``mean``
  (coef = 1/count) and ``weighted`` (coef = w, optionally softmax-normalised); the per-sample
  coefficients are tiny (B, M, C) tensors computed here in plain PyTorch, so their own gradients
  (into the weights) come from autograd, and the kernels only ever see the large feature tensors;
* ``masked_copy``: dst_k = f_k where present else 0, which is ``zero_concat`` forward (into channel
  slices of the output) and backward (out of them).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _checks, _memory, dispatch, reference
from . import _backends, _eager, _layout

MODES = ("zero_concat", "mean", "weighted", "anchor_impute")


# ----------------------------------------------------------------------------------------------
# Helpers shared by the custom ops and their fake kernels (metadata only, so both agree on layouts)
# ----------------------------------------------------------------------------------------------


def _modalities(feats: List[Tensor], stacked: bool) -> List[Tensor]:
    if stacked:
        return list(feats[0].unbind(1))
    return list(feats)


def _fused_out(mods: List[Tensor], channels: int) -> Tensor:
    ref = mods[0]
    shape = (ref.shape[0], channels, *ref.shape[2:])
    return _layout.empty(shape, _layout.channels_last(ref), ref)


def _grad_buffers(feats: List[Tensor], stacked: bool):
    """Gradient tensors for the features (same shapes, dense, one shared layout) and their (B, C, S) views."""
    mods = _modalities(feats, stacked)
    cl = _layout.channels_last(mods[0])
    if stacked:
        g = _layout.empty(feats[0].shape, cl, feats[0], channel_dim=2)
        return [g], [_layout.as_bcs(v) for v in g.unbind(1)]
    grads = [_layout.empty(m.shape, cl, m) for m in mods]
    return grads, [_layout.as_bcs(g) for g in grads]


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@_eager.custom_op("medmap_fast::fuse_sum", mutates_args=())
def fuse_sum(feats: List[Tensor], coef: Tensor, present: Tensor, stacked: bool, backend: str) -> Tensor:
    mods = _modalities(feats, stacked)
    out = _fused_out(mods, mods[0].shape[1])
    _memory.prefer_huge_pages(out)
    _backends.kernels(backend).fuse_sum_fwd(_layout.common_bcs(mods), coef, present, _layout.as_bcs(out))
    return out


@fuse_sum.register_fake
def _(feats, coef, present, stacked, backend):
    mods = _modalities(feats, stacked)
    return _fused_out(mods, mods[0].shape[1])


@_eager.custom_op("medmap_fast::fuse_sum_backward", mutates_args=())
def fuse_sum_backward(
    grad: Tensor, feats: List[Tensor], coef: Tensor, present: Tensor, stacked: bool, need_coef_grad: bool, backend: str
) -> List[Tensor]:
    grads, grad_views = _grad_buffers(feats, stacked)
    _memory.prefer_huge_pages(*grads)
    B, M, C = coef.shape
    grad_coef = coef.new_empty((B, M, C) if need_coef_grad else (0,))
    # The features are read only for the weight gradient; otherwise any (B, C, S) views do as
    # placeholders, and features whose layout would need a copy are left alone.
    feat_views = _layout.common_bcs(_modalities(feats, stacked)) if need_coef_grad else grad_views
    _backends.kernels(backend).fuse_sum_bwd(
        _layout.as_bcs(grad),
        feat_views,
        coef,
        present,
        grad_views,
        grad_coef if need_coef_grad else None,
    )
    return [*grads, grad_coef]


@fuse_sum_backward.register_fake
def _(grad, feats, coef, present, stacked, need_coef_grad, backend):
    grads, _ = _grad_buffers(feats, stacked)
    B, M, C = coef.shape
    return [*grads, coef.new_empty((B, M, C) if need_coef_grad else (0,))]


def _fuse_sum_setup(ctx, inputs, output):
    feats, coef, present, stacked, backend = inputs
    ctx.n_feats = len(feats)
    ctx.stacked = stacked
    ctx.backend = backend
    ctx.save_for_backward(*feats, coef, present)


def _fuse_sum_bwd(ctx, grad):
    saved = ctx.saved_tensors
    feats = list(saved[: ctx.n_feats])
    coef, present = saved[ctx.n_feats :]
    need_coef = bool(ctx.needs_input_grad[1])
    res = _eager.call(fuse_sum_backward, grad, feats, coef, present, ctx.stacked, need_coef, ctx.backend)
    return list(res[:-1]), (res[-1] if need_coef else None), None, None, None


_eager.register_autograd("medmap_fast::fuse_sum", _fuse_sum_bwd, setup_context=_fuse_sum_setup)


@_eager.custom_op("medmap_fast::zero_concat", mutates_args=())
def zero_concat(feats: List[Tensor], present: Tensor, stacked: bool, backend: str) -> Tensor:
    mods = _modalities(feats, stacked)
    C = mods[0].shape[1]
    out = _fused_out(mods, len(mods) * C)
    _memory.prefer_huge_pages(out)
    dst = [_layout.as_bcs(out[:, k * C : (k + 1) * C]) for k in range(len(mods))]
    _backends.kernels(backend).masked_copy(_layout.common_bcs(mods), present, dst)
    return out


@zero_concat.register_fake
def _(feats, present, stacked, backend):
    mods = _modalities(feats, stacked)
    return _fused_out(mods, len(mods) * mods[0].shape[1])


@_eager.custom_op("medmap_fast::zero_concat_backward", mutates_args=())
def zero_concat_backward(grad: Tensor, feats: List[Tensor], present: Tensor, stacked: bool, backend: str) -> List[Tensor]:
    grads, grad_views = _grad_buffers(feats, stacked)
    _memory.prefer_huge_pages(*grads)
    M = present.shape[1]
    C = grad.shape[1] // M
    src = _layout.common_bcs([grad[:, k * C : (k + 1) * C] for k in range(M)])
    _backends.kernels(backend).masked_copy(src, present, grad_views)
    return grads


@zero_concat_backward.register_fake
def _(grad, feats, present, stacked, backend):
    return _grad_buffers(feats, stacked)[0]


def _zero_concat_setup(ctx, inputs, output):
    feats, present, stacked, backend = inputs
    ctx.n_feats = len(feats)
    ctx.stacked = stacked
    ctx.backend = backend
    # The features are kept only for their shapes and layout; the backward never reads them.
    ctx.save_for_backward(*feats, present)


def _zero_concat_bwd(ctx, grad):
    saved = ctx.saved_tensors
    feats, present = list(saved[: ctx.n_feats]), saved[ctx.n_feats]
    return _eager.call(zero_concat_backward, grad, feats, present, ctx.stacked, ctx.backend), None, None, None


_eager.register_autograd("medmap_fast::zero_concat", _zero_concat_bwd, setup_context=_zero_concat_setup)


# ----------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------


def fusion_coefficients(
    mode: str, present: Tensor, weights: Optional[Tensor], normalize: bool, channels: int, dtype: torch.dtype
) -> Tensor:
    """The (B, M, C) coefficients of ``fuse_sum`` for modes ``mean`` and ``weighted`` (0 where missing,
    whatever the weight there: NaN and inf included, with a zero gradient into it)."""
    p = present.to(dtype)
    if mode == "mean":
        coef = p / p.sum(dim=1, keepdim=True).clamp_min(1)
        coef = coef.unsqueeze(-1)
    else:
        w = weights.to(dtype)
        w = w if w.dim() == 3 else w.unsqueeze(-1)
        if normalize:
            w = reference.masked_softmax(w, present)
        # selected, not multiplied by the mask: 0 * NaN would be NaN
        coef = torch.where(present.unsqueeze(-1), w, torch.zeros((), dtype=dtype, device=w.device))
    return coef.expand(present.shape[0], present.shape[1], channels).contiguous()


def _check_weights(weights, mode: str, present: Tensor, C: int, device: torch.device) -> None:
    B, M = present.shape
    if mode == "anchor_impute":
        what = "the anchor's weights pi over the modalities"
        _checks.check_weights_vector(weights, [(M,), (B, M)], "weights", device, what, values=False)
        _checks.check_anchor_weights(weights, present, "weights")
        return
    if mode != "weighted":
        if weights is not None:
            raise ValueError(
                f"weights are only used by mode='weighted' and 'anchor_impute', got mode={mode!r} with weights given"
            )
        return
    if weights is None:
        raise ValueError("mode='weighted' needs weights of shape (B, M) or (B, M, C); got weights=None")
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a tensor of shape (B, M) or (B, M, C), got {type(weights).__name__}")
    if tuple(weights.shape) not in ((B, M), (B, M, C)):
        raise ValueError(
            f"weights must have shape (B, M) = ({B}, {M}) or (B, M, C) = ({B}, {M}, {C}), got {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if weights.device != device:
        raise ValueError(f"weights are on {weights.device} but the features are on {device}")


def masked_fusion(
    features: Union[Tensor, Sequence[Tensor]],
    mask: Tensor,
    mode: str = "mean",
    weights: Optional[Tensor] = None,
    normalize: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Fuse the features of the present modalities, per sample.

    Args:
        features: one (B, M, C, *spatial) tensor, or a list of M tensors (B, C, *spatial) as
            per-modality encoders produce them (read in place, never stacked). float32, float16,
            bfloat16 or float64; NCDHW or channels_last_3d (the output keeps the layout).
        mask: (B, M) availability, bool or 0/1 numbers; a missing modality's features are never read.
        mode: ``"mean"`` (mean over present modalities), ``"weighted"`` (sum of w * f over present
            ones), ``"zero_concat"`` (missing ones zeroed, then channel concatenation) or
            ``"anchor_impute"`` (a missing modality takes the per-sample anchor a_b of
            :func:`medmap_fast.anchor_align`, then channel concatenation).
        weights: for ``"weighted"``: (B, M) or (B, M, C); the weights of missing modalities are never
            used (NaN or inf there changes nothing, with or without ``normalize``) and get a zero
            gradient. For ``"anchor_impute"``: the anchor's mixture weights pi, (M,) or (B, M),
            finite and non-negative, None for uniform; a sample with a modality present whose
            present weights sum to 0 has no anchor and raises a ValueError naming it (one (B, M)
            reduction read back, a sync on CUDA), as in :func:`medmap_fast.anchor_align`.
            Gradients flow into them.
        normalize: for ``"weighted"``: softmax the weights over the present modalities first.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"`` or None (automatic; see
            :mod:`medmap_fast.dispatch`).

    Returns:
        (B, C, *spatial) for ``mean``/``weighted``, (B, M*C, *spatial) for ``zero_concat`` and
        ``anchor_impute``, in the features' dtype. A sample with no modality present gives zeros and zero gradient.
    """
    feats, stacked = _checks.modality_list(features)
    ref = feats[0]
    if stacked:
        B, M, C = ref.shape[:3]
    else:
        B, C = ref.shape[:2]
        M = len(feats)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    present = _checks.check_mask(mask, B, M, ref.device)
    _check_weights(weights, mode, present, C, ref.device)
    name = dispatch.select(
        "masked_fusion", ref.device, backend, lambda n: _backends.reason(n, ref.device, ref.dtype, M)
    )
    if name == "reference":
        return reference.masked_fusion(features, mask, mode, weights, normalize)
    if mode == "zero_concat":
        return _eager.call(zero_concat, feats, present, stacked, name)
    acc = _layout.acc_dtype(ref.dtype)
    if mode == "anchor_impute":
        return _anchor_impute(feats, stacked, present, weights, acc, name)
    coef = fusion_coefficients(mode, present, weights, normalize, C, acc)
    return _eager.call(fuse_sum, feats, coef, present, stacked, name)


def _anchor_impute(feats: List[Tensor], stacked: bool, present: Tensor, pi: Optional[Tensor], acc, backend: str) -> Tensor:
    # Composed from the fused fusion kernels: the anchor (one read of the present modalities), the
    # zero-filled concatenation, then the anchor added into the missing modalities' slots.
    B, M = present.shape
    mods = _modalities(feats, stacked)
    C = mods[0].shape[1]
    w = reference.anchor_weights_unchecked(present, pi, acc)  # validated by _check_weights
    a = _eager.call(fuse_sum, feats, w.unsqueeze(-1).expand(B, M, C).contiguous(), present, stacked, backend)
    z = _eager.call(zero_concat, feats, present, stacked, backend).unflatten(1, (M, C))
    missing = (~present).to(z.dtype).view(B, M, *([1] * (z.dim() - 2)))
    return (z + missing * a.unsqueeze(1)).flatten(1, 2)
