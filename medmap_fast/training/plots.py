"""The training curves of a run folder, as one PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..data.atomic import atomic_write


def _read(path: Path):
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows, key):
    xs, ys = [], []
    for r in rows:
        v = r.get(key, "")
        if v not in ("", None):
            y = float(v)
            if math.isfinite(y):
                xs.append(float(r["step"]))
                ys.append(y)
    return xs, ys


def _smooth(ys, n):
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= n:
            acc -= ys[i - n]
        out.append(acc / min(i + 1, n))
    return out


def write_curves(metrics_csv: Path, validation_csv: Path, out_png: Path, title: str = "") -> None:
    """Loss terms per step (moving average), validation Dice and the modality gap against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, vals = _read(metrics_csv), _read(validation_csv)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    window = max(1, len(steps) // 50)
    for key in ("loss", "seg", "align", "kd", "feat", "adv"):
        xs, ys = _series(steps, key)
        if xs:
            axes[0].plot(xs, _smooth(ys, window), label=key)
    axes[0].set(title="training loss", xlabel="step")
    axes[0].set_yscale("log")
    for key, label in (("dice_WT", "train WT (batch)"), ("dice_WT_all", "val WT, all modalities"),
                       ("dice_all", "val mean, all modalities"), ("dice_subsets", "val mean, 15 subsets")):
        xs, ys = _series(vals if key != "dice_WT" else steps, key)
        if xs:
            axes[1].plot(xs, _smooth(ys, window) if key == "dice_WT" else ys, label=label,
                         marker=None if key == "dice_WT" else "o")
    axes[1].set(title="Dice", xlabel="step", ylim=(0, 1))
    for rows, label in ((steps, "train (batch)"), (vals, "validation")):
        xs, ys = _series(rows, "gap")
        if xs:
            axes[2].plot(xs, _smooth(ys, window) if rows is steps else ys, label=label)
    axes[2].set(title="modality gap of the aligned features", xlabel="step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    finally:
        plt.close(fig)
