"""The subset table: per-case scores -> one row per modality subset, as text, CSV and a heat-map PNG.

Every file is written through a temporary file moved into place, so a reader (or an interrupted run)
never sees half a table.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..data import MODALITIES, atomic_write, atomic_write_text
from .metrics import REGION_NAMES
from .subsets import DISPLAY, Subset

MEAN_ROW = "mean"


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def metric_keys(with_hd95: bool) -> List[str]:
    keys = [f"dice_{r}" for r in REGION_NAMES]
    return keys + [f"hd95_{r}" for r in REGION_NAMES] if with_hd95 else keys


def build_table(records: Sequence[dict], subsets: Sequence[Subset], with_hd95: bool = False) -> List[dict]:
    """One row per subset (in the given order) and a final "mean" row.

    ``records``: per (case, subset) dicts with "subset" (name), "scored" (False for a skipped case) and
    the metric keys. A row holds n (cases scored), skipped, the mean of each metric over
    its cases, and dice_mean (and hd95_mean) over the three regions. The mean row averages the subset
    rows that scored at least one case (an all-skipped subset has NaN and is left out of it).
    """
    keys = metric_keys(with_hd95)
    rows = []
    for s in subsets:
        mine = [r for r in records if r["subset"] == s.name]
        scored = [r for r in mine if r["scored"]]
        row = {
            "subset": s.name,
            "presence": s.presence if s.modalities else "",
            "n": len(scored),
            "skipped": len(mine) - len(scored),
        }
        for k in keys:
            row[k] = _mean([r[k] for r in scored])
        row["dice_mean"] = _mean([row[f"dice_{r}"] for r in REGION_NAMES])
        if with_hd95:
            row["hd95_mean"] = _mean([row[f"hd95_{r}"] for r in REGION_NAMES])
        rows.append(row)
    mean = {
        "subset": MEAN_ROW,
        "presence": "",
        "n": sum(r["n"] for r in rows),
        "skipped": sum(r["skipped"] for r in rows),
    }
    used = [r for r in rows if r["n"] > 0]
    for k in keys + ["dice_mean"] + (["hd95_mean"] if with_hd95 else []):
        mean[k] = _mean([r[k] for r in used])
    return rows + [mean]


def table_columns(with_hd95: bool) -> List[str]:
    cols = [f"dice_{r}" for r in REGION_NAMES] + ["dice_mean"]
    if with_hd95:
        cols += [f"hd95_{r}" for r in REGION_NAMES] + ["hd95_mean"]
    return cols


def format_table(rows: Sequence[dict], with_hd95: bool = False, title: Optional[str] = None) -> str:
    """The table as aligned text: Dice in percent (as papers print it), HD95 in mm, "-" where undefined."""
    marks = " ".join(f"{DISPLAY[m]:>5s}" for m in MODALITIES)
    width = max(len("subset"), max(len(r["subset"]) for r in rows))
    head = (
        f"{'subset':<{width}s}  {marks}  {'n':>4s} {'skip':>4s}  "
        + " ".join(f"{'Dice ' + r:>8s}" for r in REGION_NAMES)
        + f" {'mean':>8s}"
    )
    if with_hd95:
        head += "  " + " ".join(f"{'HD95 ' + r:>8s}" for r in REGION_NAMES) + f" {'mean':>8s}"
    lines = ([title] if title else []) + [head, "-" * len(head)]

    def num(v, scale):
        return f"{'-':>8s}" if v is None or math.isnan(v) else f"{v * scale:8.2f}"

    for r in rows:
        if r["subset"] == MEAN_ROW:
            lines.append("-" * len(head))
        marks = r["presence"] or " " * len(MODALITIES)
        pres = " ".join(f"{c:>5s}" for c in marks)
        line = f"{r['subset']:<{width}s}  {pres}  {r['n']:>4d} {r['skipped']:>4d}  "
        line += " ".join(num(r[f"dice_{g}"], 100) for g in REGION_NAMES) + " " + num(r["dice_mean"], 100)
        if with_hd95:
            line += "  " + " ".join(num(r[f"hd95_{g}"], 1) for g in REGION_NAMES) + " " + num(r["hd95_mean"], 1)
        lines.append(line)
    lines.append("Dice in %, HD95 in mm; n: cases scored; skip: cases lacking a modality of the subset")
    return "\n".join(lines) + "\n"


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return buf.getvalue()


def write_table_csv(path: Path, rows: Sequence[dict], with_hd95: bool = False) -> None:
    """Table CSV: subset, one 0/1 column per modality, n, skipped, Dice as fractions in [0, 1], HD95 in mm."""
    cols = table_columns(with_hd95)
    header = ["subset"] + list(MODALITIES) + ["n", "skipped"] + cols
    body = []
    for r in rows:
        pres = [int(c == "●") for c in r["presence"]] if r["presence"] else [""] * len(MODALITIES)
        body.append([r["subset"]] + pres + [r["n"], r["skipped"]] + [r[c] for c in cols])
    atomic_write_text(path, _csv_text(header, body))


def write_cases_csv(path: Path, records: Sequence[dict], with_hd95: bool = False) -> None:
    """Per-case CSV: case, subset, status, the case's modalities on disk, and the metrics (empty when skipped)."""
    keys = metric_keys(with_hd95)
    header = ["case", "subset", "status", "case_modalities"] + keys
    body = [
        [r["case"], r["subset"], r["status"], r.get("case_modalities", "")] + [r.get(k, math.nan) for k in keys]
        for r in records
    ]
    atomic_write_text(path, _csv_text(header, body))


def write_json(path: Path, obj: Dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_heatmap(path: Path, rows: Sequence[dict], with_hd95: bool = False, title: str = "") -> None:
    """Heat map of the table (Dice in %, and HD95 in mm beside it), each cell annotated with its value."""
    # The object API with an explicit Agg canvas: no pyplot, so no global backend is switched or needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r["subset"] for r in rows]
    panels = [("Dice (%)", [f"dice_{g}" for g in REGION_NAMES] + ["dice_mean"], 100.0, "viridis", (0, 100))]
    if with_hd95:
        panels.append(("HD95 (mm)", [f"hd95_{g}" for g in REGION_NAMES] + ["hd95_mean"], 1.0, "magma_r", None))
    fig = Figure(figsize=(3.2 * len(panels) + 1.6, 0.36 * len(rows) + 1.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, cols, scale, cmap, limits) in zip(axes, panels):
        values = np.array([[r[c] * scale for c in cols] for r in rows], dtype=float)
        finite = values[np.isfinite(values)]
        vmin, vmax = limits if limits else ((float(finite.min()), float(finite.max())) if finite.size else (0, 1))
        if vmax <= vmin:
            vmax = vmin + 1
        im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(cols)), [c.split("_")[1] for c in cols])
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
        ax.set_title(label, fontsize=10)
        ax.axhline(len(rows) - 1.5, color="white", linewidth=2)  # sets the mean row apart
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = values[i, j]
                text = "-" if not np.isfinite(v) else f"{v:.1f}"
                # black text on light cells, white on dark ones, whatever the colour map
                r, g, b, _ = im.cmap(im.norm(v)) if np.isfinite(v) else (1.0, 1.0, 1.0, 1.0)
                light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if light else "white")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120), suffix=".png")
