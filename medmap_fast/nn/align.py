"""MedMAPAlign: the alignment loss as a module to drop into any missing-modality segmentation model.

    align = medmap_fast.nn.MedMAPAlign(num_modalities=4, channels=128, anchor="learned", weight=0.1)
    loss = seg_loss + align(per_modality_features, mask)     # features: list of M (B, C, D, H, W)

Anchors (SPEC section 2): ``"learned"`` (P*_mix, pi = softmax(theta), theta a parameter initialised
from N(0, 0.1^2)), ``"fixed"`` (P^k_mix with the given pi, uniform by default), ``"normal"`` (P_N:
a = 0, unit variance), ``"mixture"`` (a J-component diagonal Gaussian mixture in the C-dimensional
feature space, all of its parameters learnable).

Losses:
* ``"kl"``: :func:`medmap_fast.anchor_align`, the KL between N(f, sigma2 I) and N(a, sigma2 I),
  i.e. ||f - a||^2 / (2 sigma2) (anchors learned, fixed, normal);
* ``"mixture_kl"``: :func:`medmap_fast.gaussian_kl` of every voxel's feature vector, as the Gaussian
  N(f, sigma2 I) (or N(f, exp(logvar)) when the model gives log-variances), to the anchor (normal or
  mixture), averaged over the voxels of the present modalities;
* ``"moments"``: :func:`medmap_fast.moment_matching` of per-channel means and standard deviations
  to the anchor's (learned, fixed, normal or mixture).

The state_dict holds ``theta`` (learned), ``pi`` (fixed, a buffer), ``nu``, ``logtau2`` and
``pi_logits`` (mixture): stable names, so checkpoints load across versions.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.anchor_align import anchor_align, anchor_tensor
from ..ops.gaussian_kl import gaussian_kl
from ..ops.masked_fusion import masked_fusion
from ..ops.moment_matching import moment_matching

ANCHORS = ("learned", "fixed", "normal", "mixture")
LOSSES = ("kl", "mixture_kl", "moments")
_VALID = {
    "learned": ("kl", "moments"),
    "fixed": ("kl", "moments"),
    "normal": ("kl", "mixture_kl", "moments"),
    "mixture": ("mixture_kl", "moments"),
}


class AlignOutput(NamedTuple):
    loss: Tensor  # the weighted alignment loss
    anchor: Optional[Tensor]  # (B, C, *spatial) per-sample anchor (P_mix anchors; zeros for "normal")
    imputed: Optional[Tensor]  # (B, M, C, *spatial): present features, the anchor where missing


class MedMAPAlign(nn.Module):
    """Align every present modality's features to a distribution anchor (MedMAP).

    Args:
        num_modalities: M.
        channels: C, the channels of the aligned features.
        anchor: ``"learned"`` (default), ``"fixed"``, ``"normal"`` or ``"mixture"``.
        loss: ``"kl"`` (default; ``"mixture_kl"`` for the mixture anchor), ``"mixture_kl"`` or ``"moments"``.
        weight: lambda, the factor on the returned loss.
        sigma2: the variance of the point features' Gaussians (``"kl"``, ``"mixture_kl"``).
        pi: the fixed anchor's weights over modalities, (M,) (``anchor="fixed"``; uniform by default),
            non-negative with a positive sum. Zeros are allowed, but a sample whose present
            modalities all have weight 0 has no anchor: ``forward`` then raises a ValueError naming
            the sample (it is never silently aligned to a = 0 instead).
        num_components: J for the mixture anchor.
        detach_anchor: stop the gradient through the anchor (P_mix anchors).
        eps: variance floor of ``"moments"``.
        theta_std: the standard deviation of theta's initialisation (learned anchor).
        reduction: ``"mean"`` (default) or ``"sum"``. ``"sum"`` adds the ops' own terms: per present
            (b, k) means for ``kl`` and ``moments``, but per-voxel KLs for ``mixture_kl`` (about S
            times larger): prefer ``"mean"`` when comparing losses.
        check_finite: raise on non-finite features of present modalities instead of returning NaN.
        backend: the ops' backend (None: automatic).
    """

    def __init__(
        self,
        num_modalities: int,
        channels: int,
        anchor: str = "learned",
        loss: Optional[str] = None,
        weight: float = 1.0,
        sigma2: float = 1.0,
        pi: Optional[Sequence[float]] = None,
        num_components: int = 4,
        detach_anchor: bool = False,
        eps: float = 1e-5,
        theta_std: float = 0.1,
        reduction: str = "mean",
        check_finite: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        for name, v in (("num_modalities", num_modalities), ("channels", channels), ("num_components", num_components)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _checks.check_choice(anchor, ANCHORS, "anchor")
        if loss is None:
            loss = "mixture_kl" if anchor == "mixture" else "kl"
        _checks.check_choice(loss, LOSSES, "loss")
        if loss not in _VALID[anchor]:
            raise ValueError(
                f"loss={loss!r} does not go with anchor={anchor!r}; anchor={anchor!r} takes loss in {_VALID[anchor]}"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if isinstance(sigma2, bool) or not isinstance(sigma2, (int, float)):
            raise TypeError(f"sigma2 must be a positive number, got {type(sigma2).__name__}")
        _checks.check_positive(sigma2, "sigma2", channels, torch.device("cpu"))
        if pi is not None and anchor != "fixed":
            raise ValueError(f"pi is the fixed anchor's weights: it needs anchor='fixed', got anchor={anchor!r}")
        self.num_modalities, self.channels = num_modalities, channels
        self.anchor, self.loss = anchor, loss
        self.weight, self.sigma2, self.eps = float(weight), float(sigma2), float(eps)
        self.detach_anchor, self.reduction = bool(detach_anchor), reduction
        self.check_finite, self.backend = bool(check_finite), backend
        self.theta_std = float(theta_std)
        if anchor == "learned":
            self.theta = nn.Parameter(torch.empty(num_modalities))
        elif anchor == "fixed":
            w = torch.ones(num_modalities) if pi is None else torch.as_tensor(pi, dtype=torch.float32).clone()
            if tuple(w.shape) != (num_modalities,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not w.sum() > 0:
                raise ValueError(f"pi must be {num_modalities} non-negative weights with a positive sum, got {pi!r}")
            self.register_buffer("pi", w / w.sum())
        elif anchor == "mixture":
            self.nu = nn.Parameter(torch.empty(num_components, channels))
            self.logtau2 = nn.Parameter(torch.empty(num_components, channels))
            self.pi_logits = nn.Parameter(torch.empty(num_components))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.anchor == "learned":
                self.theta.normal_(0.0, self.theta_std)
            elif self.anchor == "mixture":
                # Components spread around the origin, unit variance, equal weights.
                self.nu.normal_(0.0, 1.0)
                self.logtau2.zero_()
                self.pi_logits.zero_()

    def extra_repr(self) -> str:
        return (
            f"num_modalities={self.num_modalities}, channels={self.channels}, anchor={self.anchor!r}, "
            f"loss={self.loss!r}, weight={self.weight}"
        )

    def modality_weights(self) -> Optional[Tensor]:
        """pi over the modalities (learned: softmax(theta); fixed: the buffer); None for other anchors."""
        if self.anchor == "learned":
            return torch.softmax(self.theta, dim=0)
        if self.anchor == "fixed":
            return self.pi
        return None

    def forward(
        self,
        features: Union[Tensor, Sequence[Tensor]],
        mask: Tensor,
        logvar: Union[None, Tensor, Sequence[Tensor]] = None,
        return_anchor: bool = False,
        return_imputed: bool = False,
    ):
        """The weighted alignment loss of the present modalities' features.

        Args:
            features: a list of M (B, C, *spatial) tensors (one per modality encoder), or one
                (B, M, C, *spatial) tensor.
            mask: (B, M) availability, bool or 0/1.
            logvar: for ``loss="mixture_kl"`` only: per-voxel log-variances shaped like features
                (VAE-style heads); None uses ``sigma2``.
            return_anchor, return_imputed: also return the anchor and the imputed features.

        Returns:
            The loss (float32; float64 for float64 features), or an :class:`AlignOutput` when
            ``return_anchor`` or ``return_imputed`` is set. Features with no voxel (and B > 0) raise
            a ValueError, whichever the loss.
        """
        feats = features if isinstance(features, Tensor) else list(features)
        M = feats.shape[1] if isinstance(feats, Tensor) else len(feats)
        C = feats.shape[2] if isinstance(feats, Tensor) else (feats[0].shape[1] if feats else None)
        if M != self.num_modalities or (C is not None and C != self.channels):
            raise ValueError(
                f"features: expected M={self.num_modalities} modalities of C={self.channels} channels, got M={M}, C={C}"
            )
        if C is not None:
            # every loss (mixture_kl's too) is a mean over the voxels: without any, one error whichever the loss
            shape = feats[0].shape if not isinstance(feats, Tensor) else feats.shape
            spatial = shape[2:] if not isinstance(feats, Tensor) else shape[3:]
            _checks.check_voxels(shape, shape[0], C, math.prod(spatial))
        if logvar is not None and self.loss != "mixture_kl":
            raise ValueError(f"logvar is only used by loss='mixture_kl', got loss={self.loss!r}")
        if self.check_finite:
            # here rather than in the ops, so that errors name features[k] in the caller's indexing
            mods, stacked = _checks.modality_list(feats)
            present = _checks.check_mask(mask, mods[0].shape[0], M, mods[0].device)
            _checks.check_finite_modalities(mods, stacked, present)
            if logvar is not None:
                lv_mods, lv_stacked = _checks.modality_list(logvar, "logvar")
                _checks.check_finite_modalities(lv_mods, lv_stacked, present, "logvar")
        pi = self.modality_weights()
        common = dict(reduction=self.reduction, check_finite=False, backend=self.backend)
        if self.loss == "kl":
            kind = "normal" if self.anchor == "normal" else "mix"
            value = anchor_align(
                feats, mask, pi, anchor=kind, sigma2=self.sigma2, detach_anchor=self.detach_anchor, **common
            )
        elif self.loss == "moments":
            if self.anchor in ("learned", "fixed"):
                value = moment_matching(feats, mask, pi, target="anchor", detach_anchor=self.detach_anchor, eps=self.eps, **common)
            elif self.anchor == "normal":
                value = moment_matching(feats, mask, target="normal", eps=self.eps, **common)
            else:
                value = moment_matching(
                    feats, mask, target="mixture", nu=self.nu, logtau2=self.logtau2, pi_logits=self.pi_logits,
                    eps=self.eps, **common,
                )
        else:
            value = self._voxel_kl(feats, mask, logvar, common)
        value = value * self.weight
        if not (return_anchor or return_imputed):
            return value
        anchor_t = self._anchor(feats, mask, pi) if return_anchor else None
        imputed = None
        if return_imputed:
            if self.anchor not in ("learned", "fixed", "normal"):
                raise ValueError("return_imputed needs a per-sample anchor: anchor 'learned', 'fixed' or 'normal'")
            if self.anchor == "normal":
                fused = masked_fusion(feats, mask, "zero_concat", backend=self.backend)
            else:
                fused = masked_fusion(feats, mask, "anchor_impute", pi, backend=self.backend)
            imputed = fused.unflatten(1, (M, self.channels))
        return AlignOutput(value, anchor_t, imputed)

    def _anchor(self, feats, mask, pi) -> Tensor:
        if self.anchor == "mixture":
            raise ValueError("return_anchor needs a per-sample anchor: anchor 'learned', 'fixed' or 'normal'")
        kind = "normal" if self.anchor == "normal" else "mix"
        return anchor_tensor(feats, mask, pi, kind, backend=self.backend)

    def _voxel_kl(self, feats, mask, logvar, common) -> Tensor:
        mixture = {}
        if self.anchor == "mixture":
            mixture = dict(nu=self.nu, logtau2=self.logtau2, pi_logits=self.pi_logits)
        const_lv = math.log(self.sigma2)
        if isinstance(feats, Tensor):
            mu = feats.movedim(2, -1)  # (B, M, *spatial, C): rows are voxels, read in place
            lv = const_lv if logvar is None else _as_stacked(logvar).movedim(2, -1)
            return gaussian_kl(mu, lv, mask=mask, **mixture, **common)
        # One call per modality (each encoder's tensor read in place); the mean is over all kept rows.
        total = None
        kept = 0
        for k, f in enumerate(feats):
            if logvar is None:
                lv = const_lv
            elif isinstance(logvar, Tensor):  # stacked (B, M, C, ...) log-variances with listed features
                lv = logvar[:, k].movedim(1, -1)
            else:
                lv = logvar[k].movedim(1, -1)
            part = gaussian_kl(f.movedim(1, -1), lv, mask=mask[:, k], **mixture, **{**common, "reduction": "sum"})
            total = part if total is None else total + part
            kept = kept + (mask[:, k] != 0).sum() * math.prod(f.shape[2:])
        if self.reduction == "sum":
            return total
        return total / torch.as_tensor(kept, device=total.device).clamp_min(1).to(total.dtype)


def _as_stacked(logvar) -> Tensor:
    if isinstance(logvar, Tensor):
        return logvar
    return torch.stack(list(logvar), dim=1)
