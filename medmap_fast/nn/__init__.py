"""nn.Modules built on the fused ops."""

from .align import AlignOutput, MedMAPAlign
from .blocks import ConvNormAct3d, NormActConv3d, ResidualBlock3d
from .fusion import MaskedFusion
from .norm_act import FusedNormAct, convert

__all__ = [
    "MaskedFusion",
    "MedMAPAlign",
    "AlignOutput",
    "FusedNormAct",
    "ConvNormAct3d",
    "NormActConv3d",
    "ResidualBlock3d",
    "convert",
]
