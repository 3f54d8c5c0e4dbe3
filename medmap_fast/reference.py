"""Plain PyTorch versions of every op: readable, naive, autograd by PyTorch.

They define what the fused kernels must compute (../SPEC sections in each docstring), and they are
what the tests compare against (run in float64) and what the benchmarks race (eager and under
torch.compile). They take the same arguments as the public ops, minus ``backend``.
"""

from __future__ import annotations

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
      softmax-normalised over the present modalities when ``normalize`` is true.
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
    if mode == "weighted":
        w = weights if weights.dim() == 3 else weights.unsqueeze(-1)
        if normalize:
            w = masked_softmax(w, mask)
        w = w.to(f.dtype).view(*w.shape, *([1] * (f.dim() - 3)))
        return (kept * w).sum(dim=1)
    raise ValueError(f"mode must be 'zero_concat', 'mean' or 'weighted', got {mode!r}")


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
