"""Does the alignment help on your data? One model per (anchor, seed), everything else identical, scored on
the same held-out cases over the 15 modality subsets, with paired intervals against no alignment
(docs: ablation).

    medmap-fast ablation data/ --out ablation/ --preset small --anchors none,normal,fixed,learned --seeds 3
"""

from .plan import Arm, Plan
from .runner import run_ablation, run_arm
from .stats import paired_interval, summarise

__all__ = ["Arm", "Plan", "run_ablation", "run_arm", "paired_interval", "summarise"]
