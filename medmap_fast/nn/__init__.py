"""nn.Modules built on the fused ops."""

from .fusion import MaskedFusion

__all__ = ["MaskedFusion"]
