"""What alignment does to the features: the modality gap.

The MedMAP papers show the gap between modalities shrinking with t-SNE plots. ``modality_gap`` puts
one number on it that is cheap enough to log every few steps of training.

Definition. For sample b and present modality k, summarise the features f_bk (C channels, S voxels)
by their per-channel moment Gaussians q_bkc = N(mu_bkc, var_bkc + eps) (mean and population
variance over the voxels, fp32). For two modalities k, l present in sample b,

    D_b(k, l) = 1/C sum_c 1/2 [KL(q_bkc || q_blc) + KL(q_blc || q_bkc)]
              = 1/C sum_c 1/4 [s_k/s_l + s_l/s_k - 2 + (mu_k - mu_l)^2 (1/s_k + 1/s_l)],   s = var + eps,

the symmetric KL per channel (0 when the two modalities have the same moments, growing with the
difference of their means in units of their spread and with the ratio of their spreads). Then

* ``pairs[k, l]``: D_b(k, l) averaged over the samples in which both k and l are present (NaN where
  no sample has both; 0 on the diagonal);
* ``gap``: per sample, the mean of D_b over its present pairs k < l, averaged over the samples with
  at least two modalities present (NaN when there is none).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .ops.moment_matching import moments


class ModalityGap(NamedTuple):
    gap: Tensor  # () float: the mean symmetric KL between present modalities, averaged over samples
    pairs: Tensor  # (M, M) float: per pair of modalities, averaged over the samples with both present
    samples: Tensor  # (M, M) int64: how many samples each entry of ``pairs`` averages


def pairwise_divergence(mean: Tensor, var: Tensor, eps: float = 1e-5) -> Tensor:
    """(B, M, M) channel-averaged symmetric KL between the moment Gaussians of (B, M, C) mean/var."""
    s = var + eps
    sk, sl = s.unsqueeze(2), s.unsqueeze(1)  # (B, M, 1, C), (B, 1, M, C)
    d2 = (mean.unsqueeze(2) - mean.unsqueeze(1)) ** 2
    per_c = 0.25 * (sk / sl + sl / sk - 2 + d2 * (1 / sk + 1 / sl))
    return per_c.mean(dim=-1)


@torch.no_grad()
def modality_gap(
    features: Union[Tensor, Sequence[Tensor]],
    mask: Tensor,
    eps: float = 1e-5,
    backend: Optional[str] = None,
) -> ModalityGap:
    """How far apart the present modalities' feature distributions are (see the module docstring).

    Args:
        features: one (B, M, C, *spatial) tensor or a list of M (B, C, *spatial) tensors.
        mask: (B, M) availability, bool or 0/1; missing modalities are never read.
        eps: added to the variances (keeps constant channels finite).
        backend: for the moment computation (one fused read of the features).
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    mean, var = moments(features, mask, backend=backend)
    present = mask != 0
    B, M = present.shape
    div = pairwise_divergence(mean.double(), var.double(), eps)
    both = present.unsqueeze(2) & present.unsqueeze(1)
    off_diag = ~torch.eye(M, dtype=torch.bool, device=present.device)
    both_off = both & off_diag
    zero = torch.zeros((), dtype=torch.float64, device=div.device)
    div = torch.where(both_off, div, zero)
    samples = both_off.sum(0)
    pairs = div.sum(0) / samples.clamp_min(1)
    pairs = torch.where(samples > 0, pairs, torch.full((), float("nan"), dtype=torch.float64, device=div.device))
    pairs = torch.where(off_diag, pairs, zero)
    n_pairs = both_off.sum((1, 2))  # ordered pairs, twice the unordered ones: D is symmetric
    per_sample = div.sum((1, 2)) / n_pairs.clamp_min(1)
    counted = n_pairs > 0
    if bool(counted.any()):
        gap = per_sample[counted].mean()
    else:
        gap = torch.full((), float("nan"), dtype=torch.float64, device=div.device)
    samples = torch.where(off_diag, samples, present.sum(0).diag())
    return ModalityGap(gap.float(), pairs.float(), samples.long())
