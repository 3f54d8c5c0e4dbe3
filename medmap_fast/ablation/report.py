"""The ablation's outputs: ``ablation.csv``, ``ablation.md``, ``ablation.png`` (subset x anchor heat map of
mean Dice; modality gap against Dice) and ``features.png`` (the aligned features of the held-out cases,
one point per case and modality, in their first two principal components, one panel per anchor)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np

from ..data.atomic import atomic_write, atomic_write_text
from ..data.labels import MODALITIES
from .plan import Arm, Plan, run_dir
from .runner import ARM_DIR, ARM_DONE, FEATURES, HELDOUT
from .stats import BASELINE, COLUMNS, MEAN_ROW, METRICS, ROWS, ArmScores, read_case_scores, significant, summarise

OUTPUTS = ("ablation.csv", "ablation.md", "ablation.png", "features.png")
_MODALITY_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


def collect(plan: Plan, out: Path, case_names: Sequence[str]) -> Dict[str, ArmScores]:
    """Every anchor's (seeds, cases, 16, 4) Dice and (seeds, cases) gaps, in the plan's seed order."""
    scores = {}
    for anchor in plan.anchors:
        dice, gaps = [], []
        for seed in plan.seeds:
            folder = run_dir(out, Arm(anchor, seed))
            dice.append(read_case_scores(folder / HELDOUT / "cases.csv", case_names))
            with np.load(folder / ARM_DIR / FEATURES) as f:
                by_case = dict(zip(f["case"].tolist(), f["gap"].tolist()))
            gaps.append([by_case.get(c, math.nan) for c in case_names])
        scores[anchor] = ArmScores(np.stack(dice), np.array(gaps, dtype=np.float64))
    return scores


def _csv_text(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else ("" if isinstance(v, float)
                                                                                      else v)) for k, v in r.items()})
    return buf.getvalue()


def _pm(mean: float, sd: float, scale: float = 100.0, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {sd * scale:.{digits}f}" if math.isfinite(sd) else "")


def _diff(row: dict, key: str, scale: float = 100.0, digits: int = 1) -> str:
    mean, low, high = row[f"diff_{key}"], row[f"diff_{key}_low"], row[f"diff_{key}_high"]
    if not math.isfinite(mean):
        return "-"
    text = f"{mean * scale:+.{digits}f}"
    if math.isfinite(low):
        text += f" [{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]"
        if significant(low, high):
            text += " *"
    return text


def _gap(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else "-"


def markdown(plan: Plan, rows: List[dict], arms: List[dict], case_names: Sequence[str]) -> str:
    cfg = plan.base
    by = {(r["anchor"], r["subset"]): r for r in rows}
    has_base = BASELINE in plan.anchors
    train_s = sum(a.get("train_seconds", 0.0) for a in arms)
    lines = [
        f"# MedMAP ablation: {cfg.framework.upper()} framework",
        "",
        f"{len(plan.anchors)} anchors ({', '.join(plan.anchors)}) x {len(plan.seeds)} seeds "
        f"({', '.join(map(str, plan.seeds))}); every arm shares the data split, the batches, the modality masks "
        f"and, per seed, the initial weights. Scored on {len(case_names)} held-out cases "
        + (f"from {plan.test_data}" if plan.test_data else f"(the validation split, split seed {cfg.split_seed})")
        + f" with the {plan.weights} weights of each run, on all 15 modality subsets. Training: "
        f"{cfg.epochs} epochs x {cfg.iterations_per_epoch or 'one pass'} steps of {cfg.batch_size} patches of "
        f"{'x'.join(map(str, cfg.patch_size))}, {cfg.base_channels} base channels, {cfg.depth} levels, fusion "
        f"{cfg.fusion}, lambda {cfg.align_weight}; {train_s / 60:.1f} min of training in all.",
        "",
        "Dice in %, mean ± sd over seeds of the mean over the held-out cases. Δ: the paired difference against "
        "`none` (same case, same seed), mean and 95% interval over all (case, seed) pairs; * marks an interval "
        "that excludes 0 (with 16 rows per anchor, about one interval in twenty excludes 0 by chance alone, so "
        "read single subsets with care and the mean row first). The modality gap: the mean symmetric KL between the per-channel moments of the "
        "aligned features of each pair of modalities (`medmap_fast.metrics.modality_gap`), on a centre crop of "
        "each held-out case with all its modalities.",
        "",
        "## Mean over the 15 subsets",
        "",
        "| anchor | WT | TC | ET | mean | Δ mean vs none | modality gap | Δ gap vs none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in plan.anchors:
        r = by[(a, MEAN_ROW)]
        lines.append(f"| {a} | " + " | ".join(_pm(r[f"dice_{m}"], r[f"dice_{m}_sd"]) for m in METRICS)
                     + f" | {_diff(r, 'mean')} | {_gap(r['gap'])}"
                     + (f" ± {_gap(r['gap_sd'])}" if math.isfinite(r["gap_sd"]) else "")
                     + f" | {_diff(r, 'gap', 1.0, 3) if a != BASELINE else '-'} |")
    lines += ["", "## Mean Dice per subset", "", "| subset | " + " | ".join(plan.anchors) + " |",
              "|---|" + "---|" * len(plan.anchors)]
    for s in ROWS:
        lines.append(f"| {s} | " + " | ".join(_pm(by[(a, s)]["dice_mean"], by[(a, s)]["dice_mean_sd"])
                                              for a in plan.anchors) + " |")
    others = [a for a in plan.anchors if a != BASELINE]
    if has_base and others:
        lines += ["", "## Δ mean Dice against none per subset (95% interval)", "",
                  "| subset | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for s in ROWS:
            lines.append(f"| {s} | " + " | ".join(_diff(by[(a, s)], "mean") for a in others) + " |")
    lines += ["", "## Arms", "", "| arm | weights (step) | training min | held-out gap |", "|---|---|---|---|"]
    for a in arms:
        lines.append(f"| {a['arm']} | {a['weights']} ({a['step']}) | {a.get('train_seconds', math.nan) / 60:.1f} | "
                     f"{_gap(a['gap'])} |")
    return "\n".join(lines) + "\n"


def _heatmap_and_gap(path: Path, plan: Plan, rows: List[dict], scores: Dict[str, ArmScores]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by = {(r["anchor"], r["subset"]): r for r in rows}
    grid = np.array([[by[(a, s)]["dice_mean"] * 100 for a in plan.anchors] for s in ROWS])
    fig = Figure(figsize=(4.5 + 1.0 * len(plan.anchors), 7.0))
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(2, len(plan.anchors)), 3]})
    lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=lo, vmax=hi)
    ax.set_xticks(range(len(plan.anchors)), plan.anchors, rotation=45, ha="right")
    ax.set_yticks(range(len(ROWS)), ROWS, fontsize=7)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                bright = hi > lo and (grid[i, j] - lo) / (hi - lo) > 0.6  # viridis turns yellow: dark text
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6, color="k" if bright else "w")
    ax.set_title("mean Dice (%) per subset")
    fig.colorbar(im, ax=ax, shrink=0.6)
    for a in plan.anchors:
        arm = scores[a]
        gap = np.nanmean(arm.gap, axis=1)
        dice = np.nanmean(arm.dice[:, :, -1, -1], axis=1) * 100
        ax2.scatter(gap, dice, label=a, s=30)
    from matplotlib.ticker import MaxNLocator

    ax2.ticklabel_format(useOffset=False)
    ax2.xaxis.set_major_locator(MaxNLocator(4))
    ax2.set_xlabel("modality gap (held-out cases)")
    ax2.set_ylabel("mean Dice over the 15 subsets (%)")
    ax2.set_title("one point per run")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), suffix=".png")


def _features_picture(path: Path, plan: Plan, out: Path) -> None:
    """First two principal components of each anchor's per-case, per-modality feature means (first seed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(plan.anchors)
    fig = Figure(figsize=(3.2 * n, 3.4))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, anchor in zip(axes, plan.anchors):
        with np.load(run_dir(out, Arm(anchor, plan.seeds[0])) / ARM_DIR / FEATURES) as f:
            means, present = f["channel_means"], f["present"]
        points = means[present]  # (P, C)
        modality = np.nonzero(present)[1]
        if points.shape[0] >= 2:
            centred = points - points.mean(0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            xy = centred @ vt[:2].T if vt.shape[0] >= 2 else np.c_[centred @ vt[:1].T, np.zeros(len(centred))]
            for k, m in enumerate(MODALITIES):
                sel = modality == k
                ax.scatter(xy[sel, 0], xy[sel, 1], s=12, label=_MODALITY_NAMES[m])
        ax.set_title(f"{anchor} (seed {plan.seeds[0]})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7)
    fig.suptitle("aligned features of the held-out cases: channel means per case and modality, PCA", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), suffix=".png")


def write_report(plan: Plan, out: Path, cases: Sequence[Path], log: Callable[[str], None] = print) -> Dict:
    """Write the four outputs from the finished arms; returns {"rows": ..., "arms": ...}."""
    out = Path(out)
    case_names = [Path(c).name for c in cases]
    scores = collect(plan, out, case_names)
    rows = summarise(scores, plan.anchors)
    arms = [json.loads((run_dir(out, a) / ARM_DIR / ARM_DONE).read_text(encoding="utf-8")) for a in plan.arms]
    atomic_write_text(out / "ablation.csv", _csv_text(rows))
    text = markdown(plan, rows, arms, case_names)
    atomic_write_text(out / "ablation.md", text)
    _heatmap_and_gap(out / "ablation.png", plan, rows, scores)
    _features_picture(out / "features.png", plan, out)
    log(text)
    log(f"ablation outputs: {', '.join(str(out / o) for o in OUTPUTS)}")
    return {"rows": rows, "arms": arms}
