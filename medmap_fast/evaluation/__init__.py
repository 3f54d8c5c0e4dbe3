"""Inference and evaluation: sliding windows, Dice and HD95, the 15-subset table."""

from .inference import importance_map, logits_to_labels, sliding_window_inference, window_positions
from .loading import load_model
from .metrics import dice, hd95, region_scores, volume_diagonal
from .subsets import SUBSETS, Subset, parse_subset

__all__ = [
    "sliding_window_inference",
    "logits_to_labels",
    "importance_map",
    "window_positions",
    "load_model",
    "dice",
    "hd95",
    "region_scores",
    "volume_diagonal",
    "SUBSETS",
    "Subset",
    "parse_subset",
]
