"""What each training step sees: the train/validation split, the order of the samples, each sample's crop,
augmentation and modality mask (docs: training).

Everything random about sample p of epoch e is drawn from a generator seeded with (seed, e, p), and the
order of epoch e from one seeded with (seed, e). So a batch does not depend on which loader worker made
it, on how many workers there are, or on where a run was interrupted: a resumed run sees exactly the
batches the uninterrupted one would have, and k processes together see the batches of one process with
the same global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..evaluation.subsets import SUBSETS

# the 15 non-empty subsets of the 4 modalities, as (15, 4) bool
SUBSET_MASKS = np.stack([s.mask for s in SUBSETS])


def split_cases(cases: Sequence[Path], val_cases: float, seed: int) -> Tuple[List[Path], List[Path]]:
    """(train, validation) case folders: ``val_cases`` a count (>= 1) or a fraction (< 1), at least one each."""
    cases = sorted(cases)
    n = len(cases)
    if n < 2:
        raise ValueError(f"training needs at least 2 cases (one to train on, one to validate), found {n}")
    n_val = int(val_cases) if val_cases >= 1 else max(1, int(round(n * val_cases)))
    if n_val >= n:
        raise ValueError(f"val_cases: {val_cases} leaves no case to train on out of {n}")
    order = np.random.default_rng([seed, 7919]).permutation(n)
    val = sorted(cases[i] for i in order[:n_val])
    train = sorted(cases[i] for i in order[n_val:])
    return train, val


def draw_mask(rng: np.random.Generator, present: np.ndarray, full_prob: float) -> np.ndarray:
    """A training mask: all modalities with probability ``full_prob``, else one of the 15 non-empty subsets
    uniformly; restricted to the modalities the case has (the case's own set if nothing is left)."""
    if rng.random() < full_prob:
        mask = np.ones(4, dtype=bool)
    else:
        mask = SUBSET_MASKS[rng.integers(len(SUBSET_MASKS))].copy()
    mask &= present
    return mask if mask.any() else present.copy()


class SeededItems(Dataset):
    """Items of a :class:`~medmap_fast.data.BraTSDataset` keyed by (epoch, position, case index)."""

    def __init__(self, dataset, seed: int, full_prob: float):
        self.dataset, self.seed, self.full_prob = dataset, int(seed), float(full_prob)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        epoch, position, index = key
        rng = np.random.default_rng([self.seed, 1, epoch, position])
        item = self.dataset.sample(index, rng)
        present = item["mask"].numpy()
        item["present"] = item["mask"]
        item["mask"] = torch.from_numpy(draw_mask(rng, present, self.full_prob))
        return item


class StepSampler(Sampler):
    """Keys (epoch, position, case) of this process's samples, from a given step to the end of training.

    Epoch e's order is a concatenation of seeded permutations of the cases, cut to steps_per_epoch *
    global_batch positions; in each step, process r takes the r-th of the equal slices of the global batch.
    """

    def __init__(self, num_cases: int, seed: int, steps_per_epoch: int, epochs: int, global_batch: int,
                 rank: int = 0, world_size: int = 1, start_step: int = 0):
        if global_batch % world_size:
            raise ValueError(f"batch_size: {global_batch} samples per step cannot be split evenly over "
                             f"{world_size} processes")
        self.num_cases, self.seed = num_cases, int(seed)
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.start_step = start_step

    def order(self, epoch: int) -> np.ndarray:
        need = self.steps_per_epoch * self.global_batch
        rng = np.random.default_rng([self.seed, 0, epoch])
        reps = -(-need // self.num_cases)
        return np.concatenate([rng.permutation(self.num_cases) for _ in range(reps)])[:need]

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch * self.epochs - self.start_step) * self.local_batch

    def __iter__(self) -> Iterator[Tuple[int, int, int]]:
        for step in range(self.start_step, self.steps_per_epoch * self.epochs):
            epoch, within = divmod(step, self.steps_per_epoch)
            order = self.order(epoch)
            first = within * self.global_batch + self.rank * self.local_batch
            for p in range(first, first + self.local_batch):
                yield (epoch, p, int(order[p]))
