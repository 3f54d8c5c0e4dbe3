"""nn.Modules built on the fused ops."""

from .align import AlignOutput, MedMAPAlign
from .fusion import MaskedFusion

__all__ = ["MaskedFusion", "MedMAPAlign", "AlignOutput"]
