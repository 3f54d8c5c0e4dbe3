"""medmap_fast: fast, fused PyTorch ops for missing-modality brain-tumour segmentation.

    import medmap_fast
    fused = medmap_fast.masked_fusion([t1, t1ce, t2, flair], mask, mode="mean")
    loss = medmap_fast.anchor_align([t1, t1ce, t2, flair], mask, pi=theta.softmax(0))

Run ``python -m medmap_fast.info`` to see which backends this machine has.
"""

__version__ = "0.1.0"

from . import dispatch, reference  # noqa: E402
from .dispatch import BackendError  # noqa: E402
from .ops import anchor_align, gaussian_kl, masked_fusion, moment_matching, norm_act  # noqa: E402
from . import metrics, nn, ops  # noqa: E402

__all__ = [
    "masked_fusion",
    "anchor_align",
    "gaussian_kl",
    "moment_matching",
    "norm_act",
    "BackendError",
    "dispatch",
    "reference",
    "ops",
    "nn",
    "metrics",
    "__version__",
]
