"""Plain PyTorch versions of every op: readable, naive, autograd by PyTorch.

They define what the fused kernels must compute (../SPEC sections in each docstring), and they are
what the tests compare against (run in float64) and what the benchmarks race (eager and under
torch.compile). They take the same arguments as the public ops, minus ``backend``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import _checks

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


def stack_modalities(features: Features) -> torch.Tensor:
    """(B, M, C, *spatial) from either that tensor or a list of M (B, C, *spatial) tensors."""
    if isinstance(features, torch.Tensor):
        return features
    return torch.stack(list(features), dim=1)


def present_mask(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """The (B, M) availability mask as bool, shaped to broadcast against (B, M, C, *spatial)."""
    m = mask != 0
    return m.view(*m.shape, *([1] * (ndim - 2)))


def masked_fusion(
    features: Features,
    mask: torch.Tensor,
    mode: str = "mean",
    weights: Optional[torch.Tensor] = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Masked multi-modal fusion (SPEC section 1).

    - ``zero_concat``: missing modalities become 0, then (B, M*C, *spatial) channel concatenation;
    - ``mean``: sum of the present modalities divided by their count (at least 1);
    - ``weighted``: sum over present k of w[b, k] * f_k (w of shape (B, M) or (B, M, C)), with w
      softmax-normalised over the present modalities when ``normalize`` is true;
    - ``anchor_impute``: a missing modality takes the anchor a_b (weights pi = ``weights``, (M,) or
      (B, M), uniform when None; see :func:`anchor_weights` for when they are refused), then
      (B, M*C, *spatial) channel concatenation.
    A missing modality's features never reach the result, whatever they hold (NaN included), and
    neither does its ``weighted`` weight: a NaN or inf there changes nothing, and that weight gets
    a zero gradient.
    """
    f = stack_modalities(features)
    present = present_mask(mask, f.dim())
    kept = torch.where(present, f, torch.zeros((), dtype=f.dtype, device=f.device))
    if mode == "zero_concat":
        return kept.flatten(1, 2)
    if mode == "mean":
        count = present.sum(dim=1, keepdim=True).clamp_min(1)
        return kept.sum(dim=1) / count.squeeze(1).to(f.dtype)
    if mode == "anchor_impute":
        a = anchor(f, mask, weights, name="weights").unsqueeze(1)
        return torch.where(present, f, a).flatten(1, 2)
    if mode == "weighted":
        w = weights if weights.dim() == 3 else weights.unsqueeze(-1)
        if normalize:
            w = masked_softmax(w, mask)
        else:
            # selected, not multiplied by the mask: 0 * NaN would be NaN
            w = torch.where((mask != 0).unsqueeze(-1), w, torch.zeros((), dtype=w.dtype, device=w.device))
        w = w.to(f.dtype).view(*w.shape, *([1] * (f.dim() - 3)))
        return (kept * w).sum(dim=1)
    raise ValueError(f"mode must be 'zero_concat', 'mean', 'weighted' or 'anchor_impute', got {mode!r}")


def masked_softmax(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of w (B, M, ...) over dim 1 among present modalities; 0 for missing ones.

    A sample with nothing present gets all zeros (and zero gradient), not NaN.
    """
    present = (mask != 0).view(*mask.shape, *([1] * (w.dim() - 2)))
    anyp = present.any(dim=1, keepdim=True)
    neg_inf = torch.full((), float("-inf"), dtype=w.dtype, device=w.device)
    logits = torch.where(present, w, neg_inf)
    # Rows with nothing present would be all -inf (NaN softmax, NaN gradient): use finite logits there.
    logits = torch.where(anyp, logits, torch.zeros((), dtype=w.dtype, device=w.device))
    return torch.where(present, logits.softmax(dim=1), torch.zeros((), dtype=w.dtype, device=w.device))


# ------------------------------------------------------------------------------------------------
# The MedMAP alignment (SPEC sections 2-4)
# ------------------------------------------------------------------------------------------------

REDUCTIONS = ("none", "mean", "sum")


def anchor_weights(
    mask: torch.Tensor, pi: Optional[torch.Tensor], dtype: torch.dtype, name: str = "pi"
) -> torch.Tensor:
    """The (B, M) anchor coefficients m_bk pi_k / sum_j m_bj pi_j (all 0 for a sample with nothing present).

    ``pi`` is (M,) or (B, M) (non-negative mixture weights over modalities), or None for uniform.
    Refused with a ValueError naming ``name``: a negative or non-finite weight, and a sample with at
    least one modality present whose present weights sum to 0 (its anchor, a weighted mean with no
    weight, is undefined; it must not quietly become a = 0, the P_N objective). The check reads one
    (B, M) reduction back to the host; while tracing (torch.compile) it is skipped and such a sample
    gives NaN (0/0) instead.
    """
    _checks.check_anchor_weights(pi, mask, name)
    return anchor_weights_unchecked(mask, pi, dtype)


def anchor_weights_unchecked(mask: torch.Tensor, pi: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """:func:`anchor_weights` for weights already validated against this mask (the ops check them once)."""
    B, M = mask.shape
    present = mask != 0
    p = present.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    w = p if pi is None else torch.where(present, pi.to(dtype).expand(B, M), zero)
    total = w.sum(dim=1, keepdim=True)
    # Only a sample with nothing present is spared the division (its weights and their gradient are 0):
    # one whose present weights sum to 0 gets 0/0 = NaN, never a silent a = 0.
    anyp = present.any(dim=1, keepdim=True)
    return torch.where(present, w / torch.where(anyp, total, torch.ones_like(total)), zero)


def anchor(
    features: Features, mask: torch.Tensor, pi: Optional[torch.Tensor] = None, name: str = "pi"
) -> torch.Tensor:
    """The per-sample anchor a_b = sum_k m_bk pi_k f_bk / sum_k m_bk pi_k, shape (B, C, *spatial).

    ``pi`` as in :func:`anchor_weights` (``name`` is what its errors call it)."""
    f = stack_modalities(features)
    present = present_mask(mask, f.dim())
    kept = torch.where(present, f, torch.zeros((), dtype=f.dtype, device=f.device))
    w = anchor_weights(mask, pi, f.dtype, name)
    return (kept * w.view(*w.shape, *([1] * (f.dim() - 2)))).sum(dim=1)


def _channel_view(x: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """A per-channel tensor (C,) (or a scalar) shaped to broadcast along ``channel_dim`` of an ndim tensor."""
    if not isinstance(x, torch.Tensor):
        return float(x)  # a Python number keeps full precision in any dtype
    if x.dim() == 0:
        return x
    shape = [1] * ndim
    shape[channel_dim] = x.shape[0]
    return x.reshape(shape)


def _reduce_modalities(per_bk: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, M) per-modality losses (0 where missing) -> the requested reduction."""
    if reduction == "none":
        return per_bk
    if reduction == "sum":
        return per_bk.sum()
    if reduction == "mean":
        count = (mask != 0).sum().clamp_min(1).to(per_bk.dtype)
        return per_bk.sum() / count
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def anchor_align(
    features: Features,
    mask: torch.Tensor,
    pi: Optional[torch.Tensor] = None,
    anchor_kind: str = "mix",
    sigma2=1.0,
    detach_anchor: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """The alignment loss of SPEC section 2.

    Per present (b, k), L_bk = mean over (c, voxels) of (f_bk - a_b)^2 / (2 sigma2_c), where a_b is the
    anchor (``anchor_kind="mix"``: weights ``pi`` over the present modalities; ``"normal"``: a = 0).
    ``reduction="none"`` gives the (B, M) L_bk (0 where missing); ``"mean"`` their mean over the present
    (b, k), which is SPEC's 1/(2 sigma^2) sum m ||f - a||^2 / (C S sum m); ``"sum"`` their sum.
    Features with no voxel or no channel (and B > 0) are refused: a mean over nothing is undefined.
    ``pi`` is refused as in :func:`anchor_weights`.
    """
    f = stack_modalities(features)
    _check_voxels(f)
    present = present_mask(mask, f.dim())
    if anchor_kind == "mix":
        a = anchor(f, mask, pi)
        if detach_anchor:
            a = a.detach()
        diff = f - a.unsqueeze(1)
    elif anchor_kind == "normal":
        diff = f
    else:
        raise ValueError(f"anchor_kind must be 'mix' or 'normal', got {anchor_kind!r}")
    sq = torch.where(present, diff, torch.zeros((), dtype=f.dtype, device=f.device)) ** 2
    s2 = _channel_view(sigma2, f.dim(), 2)
    sq = sq / (2 * (s2.to(f.dtype) if isinstance(s2, torch.Tensor) else s2))
    per_bk = sq.flatten(2).mean(dim=2)
    return _reduce_modalities(per_bk, mask, reduction)


def _check_voxels(f: torch.Tensor) -> None:
    _checks.check_voxels(f.shape, f.shape[0], f.shape[2], math.prod(f.shape[3:]))


def _mixture_log_weights(
    J: int, pi: Optional[torch.Tensor], pi_logits: Optional[torch.Tensor], like, name: str = "pi"
) -> torch.Tensor:
    if pi_logits is not None:
        return torch.log_softmax(pi_logits.to(like.dtype), dim=0)
    if pi is not None:
        _checks.check_weight_values(pi, name, "mixture weights", positive_sum=True)
        return safe_log(pi.to(like.dtype) / pi.to(like.dtype).sum())
    return torch.full((J,), -math.log(J), dtype=like.dtype, device=like.device)


def gaussian_kl(
    mu: torch.Tensor,
    logvar=None,
    nu: Optional[torch.Tensor] = None,
    logtau2: Optional[torch.Tensor] = None,
    pi: Optional[torch.Tensor] = None,
    pi_logits: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL from the diagonal Gaussians N(mu, exp(logvar)) (rows of shape (..., C)) to an anchor (SPEC section 3).

    With ``nu`` None the anchor is P_N = N(0, I) (closed form); otherwise the J-component mixture
    sum_j pi_j N(nu_j, diag exp(logtau2_j)) (nu, logtau2 of shape (J, C); weights ``pi`` (finite,
    non-negative, with a positive sum: refused otherwise) or ``softmax(pi_logits)``, uniform by
    default), by the variational approximation
    KL_var = -log sum_j pi_j exp(-KL(q || p_j)). This naive version builds the (N, J, C) tensor.
    ``mask`` (a prefix of mu's leading dims, e.g. (B, M) for mu of shape (B, M, *spatial, C)) drops
    rows; ``reduction``: "none" (the per-row KL, 0 for dropped rows), "mean" (over kept rows), "sum".
    """
    if logvar is None:
        logvar = torch.zeros((), dtype=mu.dtype, device=mu.device)
    logvar = torch.as_tensor(logvar, dtype=mu.dtype, device=mu.device).expand(mu.shape)
    lead = mu.shape[:-1]
    if mask is not None:
        # Dropped rows are never read: zeroed first, so that NaN there cannot reach any gradient.
        keep_c = (mask != 0).view(*mask.shape, *([1] * (mu.dim() - mask.dim())))
        zero = torch.zeros((), dtype=mu.dtype, device=mu.device)
        mu, logvar = torch.where(keep_c, mu, zero), torch.where(keep_c, logvar, zero)
    var = logvar.exp()
    if nu is None:
        per_row = 0.5 * (mu * mu + var - 1 - logvar).sum(dim=-1)
    else:
        J = nu.shape[0]
        m = mu.unsqueeze(-2)  # (..., 1, C)
        v = var.unsqueeze(-2)
        lv = logvar.unsqueeze(-2)
        lt = logtau2.to(mu.dtype)
        kl_j = 0.5 * ((v + (m - nu.to(mu.dtype)) ** 2) / lt.exp() - 1 - lv + lt).sum(dim=-1)  # (..., J)
        logw = _mixture_log_weights(J, pi, pi_logits, mu)
        per_row = -torch.logsumexp(logw - kl_j, dim=-1)
    if mask is None:
        keep = torch.ones(lead, dtype=torch.bool, device=mu.device)
    else:
        keep = (mask != 0).view(*mask.shape, *([1] * (len(lead) - mask.dim()))).expand(lead)
    per_row = torch.where(keep, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / keep.sum().clamp_min(1).to(per_row.dtype)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def safe_log(p: torch.Tensor) -> torch.Tensor:
    """log p with log 0 = -inf and a zero (not NaN) gradient there: a component of weight 0 drops out."""
    pos = p > 0
    return torch.where(pos, torch.log(torch.where(pos, p, torch.ones_like(p))), torch.full_like(p, float("-inf")))


def mixture_moments(nu, logtau2, pi=None, pi_logits=None, name: str = "pi"):
    """Per-channel mean and variance of the mixture sum_j pi_j N(nu_j, exp(logtau2_j)), each (C,).

    ``pi`` (called ``name`` in errors) must be finite and non-negative with a positive sum."""
    _checks.check_weight_values(pi, name, "mixture weights", positive_sum=True)
    return mixture_moments_unchecked(nu, logtau2, pi, pi_logits)


def mixture_moments_unchecked(nu, logtau2, pi=None, pi_logits=None):
    """:func:`mixture_moments` for weights already validated (the ops check them once, up front)."""
    if pi is not None:
        w = pi.to(nu.dtype) / pi.to(nu.dtype).sum()
    else:
        w = _mixture_log_weights(nu.shape[0], None, pi_logits, nu).exp()
    w = w.unsqueeze(-1)
    mean = (w * nu).sum(0)
    # sum pi (tau^2 + nu^2) - mean^2, written without the cancellation of its two large terms
    return mean, (w * (logtau2.exp() + (nu - mean) ** 2)).sum(0)


def moment_matching(
    features: Features,
    mask: torch.Tensor,
    pi: Optional[torch.Tensor] = None,
    target: str = "anchor",
    nu: Optional[torch.Tensor] = None,
    logtau2: Optional[torch.Tensor] = None,
    pi_mix: Optional[torch.Tensor] = None,
    pi_logits: Optional[torch.Tensor] = None,
    detach_anchor: bool = False,
    eps: float = 1e-5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Moment matching (SPEC section 4).

    Per present (b, k, c): mu = mean of f over the voxels, sigma = sqrt(var + eps) (population variance),
    matched to the target's (mu*, sigma*): ``"anchor"``, the moments over the voxels of the per-sample
    anchor a_b (weights ``pi``; per sample and channel); ``"normal"``, (0, 1); ``"mixture"``, the
    mixture (nu, logtau2, weights ``pi_mix`` or ``softmax(pi_logits)``)'s own mean and variance.
    L_bk = mean over c of (mu - mu*)^2 + (sigma - sigma*)^2; reductions as in :func:`anchor_align`.
    Features with no voxel or no channel (and B > 0) are refused: their moments are undefined.
    ``pi`` is refused as in :func:`anchor_weights`; ``pi_mix`` as in :func:`mixture_moments`.
    """
    f = stack_modalities(features)
    _check_voxels(f)
    B, M, C = f.shape[:3]
    # A missing modality is never read: zeroed first, so that NaN there cannot reach any gradient.
    f = torch.where(present_mask(mask, f.dim()), f, torch.zeros((), dtype=f.dtype, device=f.device))
    x = f.reshape(B, M, C, math.prod(f.shape[3:]))
    mean = x.mean(dim=-1)
    var = ((x - mean.unsqueeze(-1)) ** 2).mean(dim=-1)
    sigma = (var + eps).sqrt()
    if target == "anchor":
        a = anchor(f, mask, pi).reshape(B, C, x.shape[-1])
        if detach_anchor:
            a = a.detach()
        t_mean = a.mean(dim=-1).unsqueeze(1)
        t_sigma = (((a - t_mean.squeeze(1).unsqueeze(-1)) ** 2).mean(dim=-1) + eps).sqrt().unsqueeze(1)
    elif target == "normal":
        t_mean = torch.zeros((), dtype=f.dtype, device=f.device)
        t_sigma = torch.sqrt(torch.tensor(1.0 + eps, dtype=f.dtype, device=f.device))
    elif target == "mixture":
        mm, mv = mixture_moments(nu.to(f.dtype), logtau2.to(f.dtype), pi_mix, pi_logits, name="pi_mix")
        t_mean, t_sigma = mm, (mv + eps).sqrt()
    else:
        raise ValueError(f"target must be 'anchor', 'normal' or 'mixture', got {target!r}")
    per_c = (mean - t_mean) ** 2 + (sigma - t_sigma) ** 2
    present = (mask != 0).unsqueeze(-1)
    per_bk = torch.where(present, per_c, torch.zeros((), dtype=f.dtype, device=f.device)).mean(dim=-1)
    return _reduce_modalities(per_bk, mask, reduction)


class _DenseGradient(torch.autograd.Function):
    """Identity whose backward hands the incoming gradient on in the contiguous layout.

    ``F.instance_norm`` runs batch norm on a (1, B*C, *spatial) view of its input. With B = 1 that view
    has the input's own shape, so the backward receives the caller's gradient as is; a channels-last
    gradient arrives with a batch stride that the view recomputes as C (the stride of a size-1 dim is
    free), and torch's CPU batch-norm backward (seen in torch 2.13) then returns a wrong input gradient
    (relative error ~1.4). A contiguous gradient takes the path that is right; every other layout, and
    B >= 2, already does.
    """

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _group_norm_input(x: torch.Tensor) -> torch.Tensor:
    """x as ``F.group_norm`` can take it. torch's CPU group-norm backward (seen in torch 2.13) crashes
    the process on a channels-last input that needs no gradient while the weight or bias does (it
    writes an input gradient nobody asked for); a contiguous copy of such an input takes the path that
    works. Inputs that need a gradient, and contiguous ones, are passed as they are."""
    if x.device.type == "cpu" and not x.requires_grad and not x.is_contiguous():
        return x.contiguous()
    return x


def norm_act(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    norm: str = "instance",
    num_groups: Optional[int] = None,
    activation: Optional[str] = "leaky_relu",
    negative_slope: float = 0.01,
    residual: Optional[torch.Tensor] = None,
    residual_position: str = "before_activation",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Normalisation, activation and an optional residual (SPEC section 5), as eager PyTorch runs it.

    ``norm="instance"`` is ``F.instance_norm`` (statistics per sample and channel), ``"group"`` is
    ``F.group_norm`` with ``num_groups`` groups; both affine when ``weight``/``bias`` are given. The
    residual is added to the normalised tensor before the activation (ResNet blocks) or, with
    ``residual_position="after_activation"``, to the activation's output.
    """
    F = torch.nn.functional
    if norm == "instance" and math.prod(x.shape[2:]) > 1:
        z = F.instance_norm(x, weight=weight, bias=bias, eps=eps)
        if x.shape[0] == 1 and z.requires_grad:
            z = _DenseGradient.apply(z)
    else:
        # F.instance_norm refuses one voxel, and F.group_norm one value per group; the statistics are
        # still defined (variance 0), so the op behind F.group_norm runs without that check.
        groups = x.shape[1] if norm == "instance" else num_groups
        z = torch.group_norm(_group_norm_input(x), groups, weight, bias, eps, torch.backends.cudnn.enabled)
    return activate_with_residual(z, activation, negative_slope, residual, residual_position)


def activate_with_residual(
    z: torch.Tensor,
    activation: Optional[str],
    negative_slope: float,
    residual: Optional[torch.Tensor],
    residual_position: str,
) -> torch.Tensor:
    """The part of ``norm_act`` after the normalisation: the residual before or after the activation."""
    F = torch.nn.functional
    if residual is not None and residual_position == "before_activation":
        z = z + residual
    if activation == "leaky_relu":
        y = F.leaky_relu(z, negative_slope)
    elif activation == "relu":
        y = F.relu(z)
    else:
        y = z
    if residual is not None and residual_position == "after_activation":
        y = y + residual
    return y
