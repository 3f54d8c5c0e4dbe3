"""SLSNet: the shared-latent-space model of the mmFormer / RFNet family.

One encoder per modality (weights not shared), masked fusion of the modality features at every
encoder level, one decoder fed the fused features as skips.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops.masked_fusion import masked_fusion
from ._parts import (
    Decoder,
    Encoder,
    SegOutput,
    SegmentationModel,
    check_input,
    check_positive_int,
    common_config,
    init_weights,
    mask_input,
    presence,
    store_common_args,
)

FUSIONS = ("mean", "weighted", "zero_concat", "anchor_impute")


# ----------------------------------------------------------------------------------------------
# Fusion of one level: ``forward(features, present) -> (B, C, ...)``, features a list of M (B, C, ...)
# ----------------------------------------------------------------------------------------------


class MeanFusion(nn.Module):
    """The mean of the present modalities' features (no parameters)."""

    def __init__(self, num_modalities: int, channels: int, backend: Optional[str]):
        super().__init__()
        self.backend = backend

    def forward(self, features: List[Tensor], present: Tensor) -> Tensor:
        return masked_fusion(features, present, "mean", backend=self.backend)


class WeightedFusion(nn.Module):
    """Learned per-channel weights ``weight`` (M, C), softmaxed over the present modalities of each
    sample. Zeros at the start: the mean of the present modalities."""

    def __init__(self, num_modalities: int, channels: int, backend: Optional[str]):
        super().__init__()
        self.backend = backend
        self.weight = nn.Parameter(torch.zeros(num_modalities, channels))

    def forward(self, features: List[Tensor], present: Tensor) -> Tensor:
        B = present.shape[0]
        weights = self.weight.expand(B, *self.weight.shape)
        return masked_fusion(features, present, "weighted", weights, normalize=True, backend=self.backend)


def _project(proj: nn.Conv3d, concatenated: Tensor) -> Tensor:
    """The 1x1x1 projection, keeping a channels-last input channels-last: single-threaded, torch's CPU
    1x1x1 convolution returns a contiguous output, which the decoder would mix with channels-last ones."""
    out = proj(concatenated)
    if concatenated.is_contiguous(memory_format=torch.channels_last_3d):
        out = out.contiguous(memory_format=torch.channels_last_3d)  # a no-op when it already is
    return out


class ZeroConcatFusion(nn.Module):
    """Missing modalities zeroed, channels concatenated (B, M*C, ...), then a 1x1x1 convolution ``proj`` to C."""

    def __init__(self, num_modalities: int, channels: int, backend: Optional[str]):
        super().__init__()
        self.backend = backend
        self.proj = nn.Conv3d(num_modalities * channels, channels, kernel_size=1)

    def forward(self, features: List[Tensor], present: Tensor) -> Tensor:
        return _project(self.proj, masked_fusion(features, present, "zero_concat", backend=self.backend))


class AnchorImputeFusion(nn.Module):
    """A missing modality takes the per-sample anchor (the pi-weighted mean of the present ones,
    pi = softmax(``theta``), ``theta`` (M,) zeros at the start: uniform), channels concatenated
    (B, M*C, ...), then a 1x1x1 convolution ``proj`` to C."""

    def __init__(self, num_modalities: int, channels: int, backend: Optional[str]):
        super().__init__()
        self.backend = backend
        self.theta = nn.Parameter(torch.zeros(num_modalities))
        self.proj = nn.Conv3d(num_modalities * channels, channels, kernel_size=1)

    def forward(self, features: List[Tensor], present: Tensor) -> Tensor:
        pi = self.theta.softmax(0)
        return _project(self.proj, masked_fusion(features, present, "anchor_impute", pi, backend=self.backend))


FUSION_CLASSES = {
    "mean": MeanFusion,
    "weighted": WeightedFusion,
    "zero_concat": ZeroConcatFusion,
    "anchor_impute": AnchorImputeFusion,
}


def _check_align_levels(align_levels, depth: int) -> Tuple[int, ...]:
    if align_levels is None:
        return (depth - 1,)
    if isinstance(align_levels, (str, bytes)) or not isinstance(align_levels, Sequence):
        raise ValueError(f"align_levels must be a sequence of encoder levels in [0, {depth - 1}] or None, "
                         f"got {align_levels!r}")
    for level in align_levels:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < depth:
            raise ValueError(f"align_levels: every level must be an integer in [0, depth-1] = [0, {depth - 1}], "
                             f"got {list(align_levels)!r}")
    return tuple(sorted(set(align_levels)))


class SLSNet(SegmentationModel):
    """Shared-latent-space segmentation network for incomplete MRI (mmFormer / RFNet family).

    Each modality has its own encoder (1 input channel; the stage structure of :class:`UNet3D`'s encoder;
    weights not shared). At every encoder level the M modality features are fused with the per-sample
    availability mask by :func:`medmap_fast.masked_fusion`, and one decoder (that of :class:`UNet3D`)
    takes the fused features as skips.

    Defaults are for 128^3 BraTS crops on a GPU; ``SLSNet.small()`` (8 base channels, 4 levels, at most
    64 channels) runs on a CPU.

    Args:
        num_modalities: M, the input channels (t1, t1ce, t2, flair).
        num_classes: output channels: 3 sigmoid regions (WT, TC, ET) or 4 softmax classes (0, 1, 2, 4).
        base_channels, depth, max_channels: as for :class:`UNet3D` (depth >= 2).
        fusion: ``"mean"``, ``"weighted"`` (learned per-channel weights ``fusion.<level>.weight`` (M, C),
            softmaxed over the present modalities), ``"zero_concat"`` (concatenation with zeros for the
            missing, then the 1x1x1 convolution ``fusion.<level>.proj``) or ``"anchor_impute"``
            (concatenation with the anchor, pi = softmax(``fusion.<level>.theta``), for the missing,
            then ``fusion.<level>.proj``).
        align_levels: the encoder levels whose per-modality features ``forward(..., return_all=True)``
            returns in ``modality_features`` (default: the bottleneck, ``depth - 1``).
        deep_supervision, negative_slope, fused, backend: as for :class:`UNet3D`; with ``fused=False``
            the fusion runs on the ``"reference"`` backend.

    ``forward(x, mask=None, return_all=False)``: x (B, M, D, H, W), D, H, W divisible by 2**(depth-1);
    mask (B, M), True where a modality is present (None: all). Returns the full-resolution logits
    (B, num_classes, D, H, W), or with ``return_all`` a :class:`SegOutput` whose ``features`` are the
    fused features of every level and whose ``modality_features`` hold, for each of ``align_levels``,
    the (B, M, C, d, h, w) encoder features of every modality (missing ones included; the alignment
    ops ignore them through the mask).
    """

    def __init__(
        self,
        num_modalities: int = 4,
        num_classes: int = 3,
        base_channels: int = 32,
        depth: int = 5,
        max_channels: int = 320,
        fusion: str = "mean",
        align_levels: Optional[Sequence[int]] = None,
        deep_supervision: bool = True,
        negative_slope: float = 0.01,
        fused: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.num_modalities = check_positive_int("num_modalities", num_modalities)
        store_common_args(self, locals())
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion_mode = fusion
        self.align_levels = _check_align_levels(align_levels, depth)

        block_backend = backend if fused else None
        op_backend = backend if fused else "reference"
        self.encoders = nn.ModuleList(
            Encoder(1, self.channels, self.negative_slope, fused, block_backend) for _ in range(num_modalities)
        )
        self.fusion = nn.ModuleList(
            FUSION_CLASSES[fusion](num_modalities, c, op_backend) for c in self.channels
        )
        self.decoder = Decoder(self.channels, num_classes, deep_supervision, self.negative_slope, fused,
                               block_backend)
        init_weights(self, self.negative_slope)

    def config(self) -> Dict[str, Any]:
        """The constructor arguments (JSON-serialisable): ``build_model("slsnet", **model.config())``."""
        return dict(num_modalities=self.num_modalities, fusion=self.fusion_mode,
                    align_levels=list(self.align_levels), **common_config(self))

    def encode(self, x: Tensor) -> List[List[Tensor]]:
        """Per-level lists of the M modality features (B, C, d, h, w), full resolution first.

        Modality k's encoder sees channel k of x only; x is not masked here.
        """
        per_modality = [encoder(x[:, k:k + 1]) for k, encoder in enumerate(self.encoders)]
        return [list(level) for level in zip(*per_modality)]

    def fuse(self, modality_features: Sequence[Sequence[Tensor]], mask: Tensor) -> List[Tensor]:
        """Fused features (B, C, d, h, w) of every level from :meth:`encode`'s output and the (B, M) mask."""
        return [fusion(list(feats), mask) for fusion, feats in zip(self.fusion, modality_features)]

    def decode(self, skips: Sequence[Tensor]) -> List[Tensor]:
        """Logits of every head, highest resolution first, from the fused features of :meth:`fuse`."""
        return self.decoder(skips)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, return_all: bool = False
                ) -> Union[Tensor, SegOutput]:
        check_input(x, self.num_modalities, self.depth, "one channel per modality")
        present = presence(mask, x, self.num_modalities)
        per_level = self.encode(mask_input(x, present))
        # The encoder outputs go to the fusion as a list: read in place, no stacked copy.
        fused = self.fuse(per_level, present)
        # Inference needs only the full-resolution head: the others are not computed.
        logits = self.decoder(fused, all_heads=return_all)
        if not return_all:
            return logits[0]
        modality_features = {level: torch.stack(per_level[level], dim=1) for level in self.align_levels}
        return SegOutput(logits, dict(enumerate(fused)), modality_features)
