"""Segmentation and distillation losses (docs: training).

Every loss here is a mean over samples of a per-sample value, so that the mean over processes of
equal local batches is the loss of the global batch: training on k processes follows the
one-process run with the same global batch.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.labels import LABELS, REGIONS


def region_targets(label: Tensor) -> Tensor:
    """(B, 3, ...) float WT, TC, ET masks of a (B, ...) label map in {0, 1, 2, 4}."""
    # a few comparisons: torch.isin sorts, and cost ~2 % of a CPU training step at 64^3
    masks = []
    for values in REGIONS.values():
        m = label == values[0]
        for v in values[1:]:
            m = m | (label == v)
        masks.append(m)
    return torch.stack(masks, 1).float()


def class_targets(label: Tensor) -> Tensor:
    """(B, ...) int64 class indices 0..3 of a label map in {0, 1, 2, 4}."""
    index = torch.zeros(max(LABELS) + 1, dtype=torch.long, device=label.device)
    index[torch.tensor(LABELS, device=label.device)] = torch.arange(len(LABELS), device=label.device)
    return index[label.long()]


def soft_dice(prob: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Per-sample soft Dice loss, 1 - mean over channels of 2|P.T| / (|P| + |T|): (B,)."""
    dims = tuple(range(2, prob.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (denom + smooth)).mean(1)


def seg_loss(logits: Tensor, label: Tensor, output: str) -> Tensor:
    """Per-sample soft Dice + cross-entropy, (B,), in float32.

    regions: sigmoid and binary cross-entropy on WT, TC, ET (region-based nnU-Net); classes: softmax
    and cross-entropy on the labels 0, 1, 2, 4, Dice over the three tumour classes.
    """
    logits = logits.float()
    if output == "regions":
        target = region_targets(label)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
        return ce + soft_dice(torch.sigmoid(logits), target)
    target = class_targets(label)
    ce = F.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)
    prob = torch.softmax(logits, 1)[:, 1:]
    onehot = F.one_hot(target, len(LABELS)).movedim(-1, 1)[:, 1:].float()
    return ce + soft_dice(prob, onehot)


def supervision_weights(n: int) -> List[float]:
    """2^-level for each output, highest resolution first, normalised to sum 1."""
    w = [0.5 ** i for i in range(n)]
    total = sum(w)
    return [v / total for v in w]


def downsample_label(label: Tensor, shape: Sequence[int]) -> Tensor:
    """Nearest-neighbour label map at ``shape`` (a power-of-two reduction of the label's)."""
    if tuple(label.shape[1:]) == tuple(shape):
        return label
    steps = [s // t for s, t in zip(label.shape[1:], shape)]
    return label[:, ::steps[0], ::steps[1], ::steps[2]]


def deep_supervision_loss(logits: Sequence[Tensor], label: Tensor, output: str) -> Tensor:
    """Per-sample weighted sum of :func:`seg_loss` over the outputs (highest resolution first): (B,)."""
    weights = supervision_weights(len(logits))
    total = 0
    for w, out in zip(weights, logits):
        total = total + w * seg_loss(out, downsample_label(label, out.shape[2:]), output)
    return total


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float, output: str) -> Tensor:
    """Per-sample T^2 * KL(teacher || student) of the tempered outputs, averaged over voxels: (B,).

    classes: the softmax distributions; regions: each region's Bernoulli (sigmoid) distribution.
    """
    t = temperature
    s, q = student.float() / t, teacher.float() / t
    if output == "classes":
        kl = (torch.softmax(q, 1) * (torch.log_softmax(q, 1) - torch.log_softmax(s, 1))).sum(1)
    else:
        pq, log_pq, log_1pq = torch.sigmoid(q), F.logsigmoid(q), F.logsigmoid(-q)
        kl = (pq * (log_pq - F.logsigmoid(s)) + (1 - pq) * (log_1pq - F.logsigmoid(-s))).sum(1)
    return kl.flatten(1).mean(1) * t * t


def feature_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-sample mean squared distance between two feature maps: (B,)."""
    return (student.float() - teacher.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def hard_dice(logits: Tensor, label: Tensor, output: str) -> Tuple[float, float, float]:
    """Batch Dice of WT, TC, ET of the thresholded / argmax prediction (for the training log)."""
    if output == "regions":
        pred = torch.sigmoid(logits.float()) > 0.5
        # nested as logits_to_labels decodes them: ET implies TC implies WT
        et = pred[:, 2]
        tc = pred[:, 1] | et
        wt = pred[:, 0] | tc
        pred = torch.stack([wt, tc, et], 1)
    else:
        cls = logits.argmax(1)
        pred = torch.stack([cls > 0, (cls == 1) | (cls == 3), cls == 3], 1)
    target = region_targets(label).bool()
    inter = (pred & target).sum((0, 2, 3, 4)).double()
    denom = (pred.sum((0, 2, 3, 4)) + target.sum((0, 2, 3, 4))).double()
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return tuple(float(v) for v in dice)
