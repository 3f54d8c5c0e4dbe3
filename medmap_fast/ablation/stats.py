"""The ablation's numbers: per arm, mean and spread over seeds; against ``none``, paired differences with 95%
intervals (docs: ablation).

Scores come from each arm's ``heldout/cases.csv`` (Dice per case, subset and region) and the modality gap
from its ``ablation/features.npz``. For every anchor the arrays are (seeds, cases, 16, 4): the 15
subsets then their per-case mean (the row named ``mean``), and the regions WT, TC, ET then their mean.

Paired differences. For anchor a, seed s and case c, d = score(a, s, c) - score(none, s, c): the same case,
the same seed (hence the same initial weights, batches and masks), only the anchor changed. The interval is
the t interval of the mean of the d over every (seed, case) pair, mean +- t(0.975, n - 1) * sd / sqrt(n).
It treats the pairs as independent; pairs of one case under different seeds are not quite, so with few
cases read it as a lower bound on the uncertainty.
"""

from __future__ import annotations

import contextlib
import csv
import math
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from ..evaluation.subsets import SUBSETS

REGIONS = ("WT", "TC", "ET")
METRICS = REGIONS + ("mean",)
MEAN_ROW = "mean"
ROWS = tuple(s.name for s in SUBSETS) + (MEAN_ROW,)
BASELINE = "none"


class Interval(NamedTuple):
    mean: float
    low: float
    high: float
    n: int


def paired_interval(diffs: np.ndarray, level: float = 0.95) -> Interval:
    """Mean of the finite paired differences and its t interval (NaN bounds with fewer than 2 pairs)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    n = d.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def read_case_scores(path: Path, cases: Sequence[str]) -> np.ndarray:
    """(cases, 16, 4) Dice of one run's ``cases.csv`` (NaN for a subset a case could not be scored on)."""
    index = {c: i for i, c in enumerate(cases)}
    rows = {name: j for j, name in enumerate(ROWS[:-1])}
    out = np.full((len(cases), len(ROWS), len(METRICS)), np.nan)
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            i, j = index.get(r["case"]), rows.get(r["subset"])
            if i is None or j is None or r["status"] != "scored":
                continue
            vals = [float(r[f"dice_{g}"]) for g in REGIONS]
            out[i, j, :3] = vals
            out[i, j, 3] = float(np.mean(vals))
    with _quiet_nan_mean():
        out[:, -1, :] = np.nanmean(out[:, :-1, :], axis=1)
    return out


@contextlib.contextmanager
def _quiet_nan_mean():
    """nanmean of an all-NaN slice is NaN, which is what a case without any scored subset should give."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _mean_sd(per_seed: np.ndarray):
    finite = per_seed[np.isfinite(per_seed)]
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan


class ArmScores(NamedTuple):
    dice: np.ndarray  # (seeds, cases, 16, 4)
    gap: np.ndarray  # (seeds, cases)


def summarise(scores: Dict[str, ArmScores], anchors: Sequence[str]) -> List[dict]:
    """One row per (anchor, subset or the mean): mean and sd over seeds of the case-mean Dice per region, the
    difference against ``none`` with its interval, and (on the mean row) the modality gap likewise."""
    base = scores.get(BASELINE)
    rows = []
    for anchor in anchors:
        arm = scores[anchor]
        seeds = arm.dice.shape[0]
        for j, subset in enumerate(ROWS):
            row = {"anchor": anchor, "subset": subset, "seeds": seeds, "cases": arm.dice.shape[1]}
            with _quiet_nan_mean():
                per_seed = np.nanmean(arm.dice[:, :, j, :], axis=1)  # (seeds, 4)
            for k, metric in enumerate(METRICS):
                row[f"dice_{metric}"], row[f"dice_{metric}_sd"] = _mean_sd(per_seed[:, k])
                diff = (paired_interval(arm.dice[:, :, j, k] - base.dice[:, :, j, k])
                        if base is not None and anchor != BASELINE else Interval(math.nan, math.nan, math.nan, 0))
                row[f"diff_{metric}"], row[f"diff_{metric}_low"], row[f"diff_{metric}_high"] = diff[:3]
                row["pairs"] = diff.n
            gap = [math.nan] * 5
            if subset == MEAN_ROW:
                with _quiet_nan_mean():
                    gap[:2] = _mean_sd(np.nanmean(arm.gap, axis=1))
                if base is not None and anchor != BASELINE:
                    gap[2:] = paired_interval(arm.gap - base.gap)[:3]
            row.update(zip(("gap", "gap_sd", "diff_gap", "diff_gap_low", "diff_gap_high"), gap))
            rows.append(row)
    return rows


COLUMNS = (["anchor", "subset", "seeds", "cases", "pairs"]
           + [f"{p}{m}{s}" for m in METRICS for p, s in (("dice_", ""), ("dice_", "_sd"), ("diff_", ""),
                                                          ("diff_", "_low"), ("diff_", "_high"))]
           + ["gap", "gap_sd", "diff_gap", "diff_gap_low", "diff_gap_high"])


def significant(low: float, high: float) -> Optional[bool]:
    """Whether an interval excludes 0 (None when it is undefined)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return low > 0 or high < 0
