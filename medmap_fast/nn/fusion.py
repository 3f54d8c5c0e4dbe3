"""Module form of :func:`medmap_fast.masked_fusion`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.masked_fusion import MODES, masked_fusion


class MaskedFusion(nn.Module):
    """Fuse per-modality features with an availability mask.

    ``MaskedFusion("mean")(features, mask)``; for ``"weighted"``, pass ``weights`` to ``forward``
    (e.g. the output of a small gating network, as RFNet's region-aware fusion does); for
    ``"anchor_impute"``, optionally the anchor's weights pi over the modalities (e.g.
    ``MedMAPAlign.modality_weights()``, so imputation uses the learned anchor).
    """

    def __init__(self, mode: str = "mean", normalize: bool = False, backend: Optional[str] = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.normalize = normalize
        self.backend = backend

    def forward(self, features, mask: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return masked_fusion(features, mask, self.mode, weights, self.normalize, self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, normalize={self.normalize}, backend={self.backend!r}"
