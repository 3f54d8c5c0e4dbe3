"""Pieces shared by the segmentation models: conv blocks, the U-Net encoder and decoder, argument checks.

Every piece is built either from the fused medmap_fast blocks (``fused=True``) or from plain
``torch.nn`` modules (``fused=False``) with the same structure and the same state_dict keys, so a
checkpoint of one loads strictly into the other.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..dispatch import BACKENDS
from ..nn import ConvNormAct3d


class SegOutput(NamedTuple):
    """Everything a segmentation model computes, for training with deep supervision and alignment."""

    logits: List[Tensor]  # (B, num_classes, ...) per decoder level, highest resolution first
    features: Dict[int, Tensor]  # level -> (B, C, d, h, w) encoder (UNet3D) or fused (SLSNet) features
    modality_features: Dict[int, Tensor]  # level -> (B, M, C, d, h, w) per-modality features (SLSNet only)


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_negative_slope(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"negative_slope must be a number in [0, 1), got {value!r}")
    return float(value)


def check_backend(value) -> Optional[str]:
    if value is not None and value not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (automatic), got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class SegmentationModel(nn.Module):
    """What the segmentation models share besides their pieces: the small CPU configuration."""

    #: the widths of :meth:`small`: 8 base channels, 4 levels, at most 64 channels
    SMALL = dict(base_channels=8, depth=4, max_channels=64)

    @classmethod
    def small(cls, **overrides):
        """A configuration for CPU demos and tests: 8 base channels, 4 levels, at most 64 channels."""
        return cls(**{**cls.SMALL, **overrides})


COMMON_ARGS = ("num_classes", "base_channels", "depth", "max_channels", "deep_supervision", "negative_slope",
               "fused", "backend")


def store_common_args(model: nn.Module, args: Dict[str, object]) -> None:
    """Check the constructor arguments every model shares (:data:`COMMON_ARGS`, taken from ``args``) and
    store them on ``model``, with ``model.channels``, the widths of its levels."""
    model.num_classes = check_positive_int("num_classes", args["num_classes"])
    model.base_channels = check_positive_int("base_channels", args["base_channels"])
    model.depth = check_positive_int("depth", args["depth"], minimum=2)
    model.max_channels = check_positive_int("max_channels", args["max_channels"])
    model.deep_supervision = check_flag("deep_supervision", args["deep_supervision"])
    model.negative_slope = check_negative_slope(args["negative_slope"])
    model.fused = check_flag("fused", args["fused"])
    model.backend = check_backend(args["backend"])
    model.channels = level_channels(model.base_channels, model.depth, model.max_channels)


def common_config(model: nn.Module) -> Dict[str, object]:
    """The stored :data:`COMMON_ARGS` of ``model``, for its ``config()``."""
    return {name: getattr(model, name) for name in COMMON_ARGS}


def level_channels(base_channels: int, depth: int, max_channels: int) -> List[int]:
    """Channels of every level: doubled per level from ``base_channels``, capped at ``max_channels``."""
    return [min(base_channels * 2 ** i, max_channels) for i in range(depth)]


def check_input(x, channels: int, depth: int, what: str) -> None:
    """``x`` must be (B, channels, D, H, W) with every spatial size divisible by 2**(depth-1).

    Only shapes are read (no tensor values), so the check costs nothing under torch.compile.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor (B, {channels}, D, H, W), got {type(x).__name__}")
    if x.dim() != 5 or x.shape[1] != channels:
        raise ValueError(f"x must have shape (B, {channels}, D, H, W) ({what}), got {tuple(x.shape)}")
    factor = 2 ** (depth - 1)
    sizes = tuple(x.shape[2:])
    if any(s % factor for s in sizes):
        raise ValueError(
            f"x: spatial size {sizes} must be divisible by 2**(depth-1) = {factor} (depth={depth}); "
            f"pad or crop the volume to a multiple of {factor}"
        )


def presence(mask: Optional[Tensor], x: Tensor, modalities: int) -> Tensor:
    """The (B, M) bool availability mask; None means every modality is present."""
    B = x.shape[0]
    if mask is None:
        return torch.ones(B, modalities, dtype=torch.bool, device=x.device)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a (B, M) = ({B}, {modalities}) tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != (B, modalities):
        raise ValueError(f"mask must have shape (B, M) = ({B}, {modalities}), got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def mask_input(x: Tensor, present: Tensor) -> Tensor:
    """Zero the channels of missing modalities.

    Selected rather than multiplied by the mask: 0 * NaN is NaN, and a missing modality's values
    must never reach the output, whatever they are.
    """
    keep = present.view(*present.shape, 1, 1, 1)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


def conv_block(in_channels: int, out_channels: int, stride: int, negative_slope: float, fused: bool,
               backend: Optional[str]) -> nn.Module:
    """Conv3d(3x3x3) -> InstanceNorm3d(affine) -> LeakyReLU, keys ``0.*`` (conv) and ``1.*`` (norm)."""
    if fused:
        return ConvNormAct3d(in_channels, out_channels, 3, stride=stride, negative_slope=negative_slope,
                             backend=backend)
    return nn.Sequential(OrderedDict([
        ("0", nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)),
        ("1", nn.InstanceNorm3d(out_channels, affine=True)),
        ("2", nn.LeakyReLU(negative_slope)),
    ]))


def stage(in_channels: int, out_channels: int, first_stride: int, negative_slope: float, fused: bool,
          backend: Optional[str]) -> nn.Sequential:
    """Two conv blocks; the first may be strided (nnU-Net downsamples with strided convolutions)."""
    return nn.Sequential(
        conv_block(in_channels, out_channels, first_stride, negative_slope, fused, backend),
        conv_block(out_channels, out_channels, 1, negative_slope, fused, backend),
    )


class Encoder(nn.Module):
    """The nnU-Net encoder: stage 0 at full resolution, every further stage halves the resolution.

    ``forward(x)`` returns the features of every level, full resolution first, bottleneck last.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], negative_slope: float, fused: bool,
                 backend: Optional[str]):
        super().__init__()
        inputs = [in_channels, *channels[:-1]]
        self.stages = nn.ModuleList(
            stage(cin, cout, 1 if i == 0 else 2, negative_slope, fused, backend)
            for i, (cin, cout) in enumerate(zip(inputs, channels))
        )

    def forward(self, x: Tensor) -> List[Tensor]:
        features = []
        for block in self.stages:
            x = block(x)
            features.append(x)
        return features


class Decoder(nn.Module):
    """The nnU-Net decoder: from the bottleneck up, transposed-conv upsampling to the skip's channels,
    concatenation with the skip, two conv blocks, and a 1x1x1 segmentation head.

    Modules are indexed by the level they output (0 = full resolution): ``upsamples[i]`` takes level
    i+1 to level i, ``stages[i]`` and ``heads[i]`` work at level i. With deep supervision every
    decoder level has a head (not the bottleneck, as in nnU-Net); without, only level 0.
    """

    def __init__(self, channels: Sequence[int], num_classes: int, deep_supervision: bool, negative_slope: float,
                 fused: bool, backend: Optional[str]):
        super().__init__()
        levels = range(len(channels) - 1)
        self.upsamples = nn.ModuleList(
            nn.ConvTranspose3d(channels[i + 1], channels[i], kernel_size=2, stride=2) for i in levels
        )
        self.stages = nn.ModuleList(
            stage(2 * channels[i], channels[i], 1, negative_slope, fused, backend) for i in levels
        )
        head_levels = levels if deep_supervision else range(1)
        self.heads = nn.ModuleList(nn.Conv3d(channels[i], num_classes, kernel_size=1) for i in head_levels)

    def forward(self, skips: Sequence[Tensor], all_heads: bool = True) -> List[Tensor]:
        """Logits of every head (``all_heads``) or of the full-resolution one only, highest resolution first."""
        x = skips[-1]
        logits: List[Tensor] = []
        for i in reversed(range(len(self.stages))):
            x = self.upsamples[i](x)
            # nnU-Net's order: the upsampled features first, then the skip
            x = self.stages[i](torch.cat([x, skips[i]], dim=1))
            if i < len(self.heads) and (all_heads or i == 0):
                logits.append(self.heads[i](x))
        logits.reverse()
        return logits


def init_weights(model: nn.Module, negative_slope: float) -> None:
    """nnU-Net's InitWeights_He: Kaiming-normal convolution weights (for LeakyReLU(negative_slope)), zero biases.

    Modules are visited in registration order, so the fused and the plain form of a model (same
    convolutions, same order) draw the same weights from the same seed.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, a=negative_slope)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
