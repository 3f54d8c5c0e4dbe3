"""The fused ops. Each takes ``backend=None`` (automatic) or a backend name; see medmap_fast.dispatch."""

from .anchor_align import anchor_align
from .gaussian_kl import gaussian_kl
from .masked_fusion import masked_fusion
from .moment_matching import moment_matching, moments
from .norm_act import norm_act

__all__ = ["masked_fusion", "anchor_align", "gaussian_kl", "moment_matching", "moments", "norm_act"]
