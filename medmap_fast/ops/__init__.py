"""The fused ops. Each takes ``backend=None`` (automatic) or a backend name; see medmap_fast.dispatch."""

from .masked_fusion import masked_fusion

__all__ = ["masked_fusion"]
