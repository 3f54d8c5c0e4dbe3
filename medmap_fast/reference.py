"""Plain PyTorch versions of every op: readable, naive, autograd by PyTorch.

They define what the fused kernels must compute (../SPEC sections in each docstring), and they are
what the tests compare against (run in float64) and what the benchmarks race (eager and under
torch.compile). They take the same arguments as the public ops, minus ``backend``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

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
      (B, M), uniform when None), then (B, M*C, *spatial) channel concatenation.
    A missing modality's features never reach the result, whatever they hold (NaN included).
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
        a = anchor(f, mask, weights).unsqueeze(1)
        return torch.where(present, f, a).flatten(1, 2)
    if mode == "weighted":
        w = weights if weights.dim() == 3 else weights.unsqueeze(-1)
        if normalize:
            w = masked_softmax(w, mask)
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


def anchor_weights(mask: torch.Tensor, pi: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The (B, M) anchor coefficients m_bk pi_k / sum_j m_bj pi_j (all 0 for a sample with nothing present).

    ``pi`` is (M,) or (B, M) (non-negative mixture weights over modalities), or None for uniform.
    """
    B, M = mask.shape
    p = (mask != 0).to(dtype)
    w = p if pi is None else p * pi.to(dtype).expand(B, M)
    total = w.sum(dim=1, keepdim=True)
    # A sample with nothing present: its weights are 0 (and their gradient too), not 0/0.
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(w))


def anchor(features: Features, mask: torch.Tensor, pi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-sample anchor a_b = sum_k m_bk pi_k f_bk / sum_k m_bk pi_k, shape (B, C, *spatial)."""
    f = stack_modalities(features)
    present = present_mask(mask, f.dim())
    kept = torch.where(present, f, torch.zeros((), dtype=f.dtype, device=f.device))
    w = anchor_weights(mask, pi, f.dtype)
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
    """
    f = stack_modalities(features)
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


def _mixture_log_weights(J: int, pi: Optional[torch.Tensor], pi_logits: Optional[torch.Tensor], like) -> torch.Tensor:
    if pi_logits is not None:
        return torch.log_softmax(pi_logits.to(like.dtype), dim=0)
    if pi is not None:
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
    sum_j pi_j N(nu_j, diag exp(logtau2_j)) (nu, logtau2 of shape (J, C); weights ``pi`` or
    ``softmax(pi_logits)``, uniform by default), by the variational approximation
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


def mixture_moments(nu, logtau2, pi=None, pi_logits=None):
    """Per-channel mean and variance of the mixture sum_j pi_j N(nu_j, exp(logtau2_j)), each (C,)."""
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
    """
    f = stack_modalities(features)
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
        mm, mv = mixture_moments(nu.to(f.dtype), logtau2.to(f.dtype), pi_mix, pi_logits)
        t_mean, t_sigma = mm, (mv + eps).sqrt()
    else:
        raise ValueError(f"target must be 'anchor', 'normal' or 'mixture', got {target!r}")
    per_c = (mean - t_mean) ** 2 + (sigma - t_sigma) ** 2
    present = (mask != 0).unsqueeze(-1)
    per_bk = torch.where(present, per_c, torch.zeros((), dtype=f.dtype, device=f.device)).mean(dim=-1)
    return _reduce_modalities(per_bk, mask, reduction)


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
    elif norm == "instance":  # F.instance_norm refuses one voxel; the statistics are still defined
        z = F.group_norm(x, x.shape[1], weight=weight, bias=bias, eps=eps)
    else:
        z = F.group_norm(x, num_groups, weight=weight, bias=bias, eps=eps)
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
