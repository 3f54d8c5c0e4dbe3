"""``medmap-fast evaluate``: Dice (and HD95) per region over the 15 modality subsets, or of given predictions.

With ``--model``: every case of DATA_ROOT is segmented once per modality subset, the model seeing only
that subset (the other channels zeroed and masked), and scored against its ``_seg`` label. A subset that
needs a modality whose file the case lacks is skipped for that case and counted in the "skip" column.

With ``--predictions PRED_DIR``: label files made by any tool are scored. For a case ``<case>``, the
prediction is ``PRED_DIR/<case>.nii.gz`` (or ``.nii``), ``PRED_DIR/<case>_seg.nii.gz`` (or ``.nii``), or
the one NIfTI file in ``PRED_DIR/<case>/`` (when that folder holds several, the one named ``<case>`` or
``<case>_seg``); labels {0, 1, 2, 4}, 3 read as 4, on the case's voxel grid (stored in any voxel
order). A case without a prediction is an error, or scored as all background with
``--missing-as-empty``. When PRED_DIR holds folders named after modality subsets ("T1+FLAIR",
"t1ce,t2", "flairt1cet2", ...), each is scored as that subset's predictions and the table has one row
per such folder; a case without a prediction in a subset folder is skipped (not an error) when it
lacks a modality file of that subset.

A case whose files (or prediction) cannot be read is reported and left out of the table; the others
are scored, and the run ends with exit status 1.

Outputs in OUT: table.txt (also printed), table.csv, table.png (heat map), cases.csv (every case and
subset), config.json (settings, date, versions, the list of these outputs), and with --save-predictions
the folder predictions/. They are one set, made in a hidden temporary folder and moved in at the end:
an interrupted run leaves the previous set as it was (a new OUT appears only when complete). Other
files in OUT are left alone, and so is an earlier predictions/ folder when --save-predictions is not
given. config.json is removed before the others are replaced and written after them: if it is
missing, the set in OUT is incomplete, and running again makes it whole. Hidden temporaries left by
a killed run are removed by the next one. OUT is checked before any work starts: a file where a
folder is needed, or a folder that cannot be written, is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..data import MODALITIES, find_cases, load_case, load_segmentation, modalities_on_disk, save_segmentation
from ..data.atomic import (OutputPathError, WriteError, atomic_set, atomic_write_text, check_output_dir,
                           remove_stale_temporaries, write_error)
from .loading import load_model
from .metrics import region_scores
from .pipeline import (CASE_ERRORS, CaseFailures, InferenceSettings, add_model_args, cli_text, mask_names, run_command,
                       output_of, run_info, segment, settings_from_args)
from .report import build_table, format_table, metric_keys, write_cases_csv, write_heatmap, write_json, write_table_csv
from .subsets import SUBSETS, Subset, parse_subset

_NIFTI = (".nii.gz", ".nii")
SINGLE = "predictions"  # the table row of a flat prediction folder (no subset subfolders)
OUTPUT_FILES = ("table.txt", "table.csv", "table.png", "cases.csv", "config.json")
MARKER = "config.json"  # moved in last: an output folder without it holds an incomplete set
PREDICTIONS = "predictions"  # the folder of --save-predictions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medmap-fast evaluate",
        description=cli_text(__doc__),
        epilog="examples:\n"
        "  medmap-fast evaluate data/ --model unet.pt --out eval/ --window 128 --hd95\n"
        "  medmap-fast evaluate data/ --predictions other_tool_output/ --out eval/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data_root", metavar="DATA_ROOT", help="folder of case folders, each with <case>_seg.nii.gz labels")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the table and per-case results (created if needed; other files in it are kept)")
    p.add_argument(
        "--predictions",
        metavar="PRED_DIR",
        default=None,
        help="score the label files in PRED_DIR instead of running a model",
    )
    p.add_argument(
        "--missing-as-empty",
        action="store_true",
        help="with --predictions: score a case that has no prediction as all background instead of failing",
    )
    p.add_argument(
        "--subsets",
        default="all15",
        metavar="LIST",
        help="with --model: ';'-separated subsets to evaluate, e.g. 'FLAIR;T1+T2' (default: all 15)",
    )
    p.add_argument("--hd95", action="store_true", help="also report HD95 (mm) per region (slower)")
    p.add_argument(
        "--save-predictions",
        action="store_true",
        help="with --model: also write OUT/predictions/<subset>/<case>.nii.gz (readable by --predictions); "
        "an earlier OUT/predictions is replaced as a whole",
    )
    add_model_args(p, required=False)
    return p


def _subsets(text: str) -> List[Subset]:
    if text.strip().lower() in ("all15", "all 15", "15"):
        return list(SUBSETS)
    chosen = [parse_subset(t) for t in text.split(";") if t.strip()]
    if not chosen:
        raise ValueError(f"--subsets {text!r}: expected ';'-separated subsets such as 'FLAIR;T1+T2', or all15")
    names = [s.name for s in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"--subsets {text!r}: a subset is listed twice ({names})")
    order = {s.name: i for i, s in enumerate(SUBSETS)}
    return sorted(chosen, key=lambda s: order[s.name])


def check_out(out_dir, save_predictions: bool = False, argument: str = "out_dir",
              predictions_argument: str = "save_predictions") -> Path:
    """``out_dir`` as a Path if the outputs can be written there; otherwise an ``OutputPathError`` naming
    the argument, what it got and why. Nothing is created.

    argument, predictions_argument: how the caller names the output folder and the option to save
    predictions (``"--out"`` and ``"--save-predictions"`` on the command line).
    """
    out = Path(check_output_dir(out_dir, argument))
    for name in OUTPUT_FILES:
        if os.path.lexists(out / name) and not (out / name).is_file():
            raise OutputPathError(
                f"{argument} {str(out_dir)!r}: {out / name} is a folder, but evaluate writes the file {name} "
                "there; expected no such entry or a file (replaced), so move it or choose another folder"
            )
    pred = out / PREDICTIONS
    if save_predictions and os.path.lexists(pred) and not pred.is_dir():
        raise OutputPathError(
            f"{predictions_argument}: {pred} is a file, but the predictions are written to a folder of that "
            "name; expected no such entry or a folder (replaced as a whole), so move it or choose another --out"
        )
    return out


def _remove_leftovers(out_dir: Path) -> None:
    """Remove the hidden temporaries of an earlier run that was killed while writing into ``out_dir``."""
    absolute = Path(os.path.abspath(out_dir))
    remove_stale_temporaries(absolute.parent, absolute.name)
    remove_stale_temporaries(absolute)


@contextlib.contextmanager
def _named_as_in(out_dir: Path, staged: Path):
    """Errors while writing into ``staged`` name the file's place in ``out_dir``, not the hidden folder."""
    try:
        yield
    except WriteError as e:
        if not e.path.is_relative_to(staged):
            raise
        raise write_error(out_dir / e.path.relative_to(staged), e) from (e.__cause__ or e)


def _load_labelled(case_dir: Path):
    case = load_case(case_dir, allow_missing=True, load_label=True, normalized=True)
    if case.label is None:
        raise ValueError(f"case {case.name} ({case_dir}): no label file <case>_seg.nii.gz to score against")
    return case


def _record(case, subset: str, scores: Optional[Dict[str, float]], status: str, keys) -> dict:
    r = {
        "case": case.name,
        "subset": subset,
        "status": status,
        "scored": scores is not None,
        "case_modalities": mask_names(case.present),
    }
    r.update({k: (scores[k] if scores is not None else float("nan")) for k in keys})
    return r


def evaluate_model(
    model,
    data_root,
    out_dir,
    settings: InferenceSettings,
    subsets: Sequence[Subset] = SUBSETS,
    with_hd95: bool = False,
    save_predictions: bool = False,
    config: Optional[dict] = None,
    log=print,
) -> List[dict]:
    """Run the subset evaluation of ``model`` over the cases under ``data_root``; writes the outputs to
    ``out_dir`` (replaced as one set: see the module doc) and returns the table rows (see
    :func:`medmap_fast.evaluation.report.build_table`).

    ``out_dir`` is checked first (``OutputPathError``). A case whose files cannot be read is left out;
    once the outputs are written, ``CaseFailures`` names every such case.
    """
    out_dir = check_out(out_dir, save_predictions)
    _remove_leftovers(out_dir)
    if isinstance(data_root, (list, tuple)):  # the held-out cases of a training run, say
        case_dirs = [Path(c) for c in data_root]
    else:
        case_dirs = find_cases(data_root)
    with atomic_set(out_dir, MARKER) as staged:
        if save_predictions:
            (staged / PREDICTIONS).mkdir()
        with _named_as_in(out_dir, staged):
            records, failures, seconds = _score_model(model, case_dirs, staged if save_predictions else None,
                                                      settings, subsets, with_hd95, log)
            title = f"Dice per modality subset: {len(case_dirs) - len(failures)} cases"
            cfg = {
                "mode": "model",
                "data_root": (str(Path(data_root).resolve()) if not isinstance(data_root, (list, tuple))
                              else [str(Path(c).resolve()) for c in data_root]),
                "cases": len(case_dirs),
                "subsets": [s.name for s in subsets],
                "hd95": with_hd95,
                "inference": settings.as_json(),
            } | (config or {}) | {"seconds": seconds}
            rows, text, outputs = _write_outputs(staged, records, subsets, with_hd95, title, cfg, failures)
    return _finish(out_dir, rows, text, outputs, log, failures, len(case_dirs))


def _score_model(model, case_dirs, staged: Optional[Path], settings, subsets, with_hd95, log):
    """(records, failures, seconds) of the subset evaluation; predictions saved under ``staged`` if given."""
    keys = metric_keys(with_hd95)
    records, failures = [], []
    t_start = time.perf_counter()
    for i, case_dir in enumerate(case_dirs, 1):
        t0 = time.perf_counter()
        try:
            case = _load_labelled(case_dir)
        except CASE_ERRORS as e:
            failures.append((case_dir.name, str(e)))
            log(f"[{i}/{len(case_dirs)}] {case_dir.name}: left out, its files cannot be read")
            continue
        done = []
        for s in subsets:
            lacking = s.mask & ~case.present
            if lacking.any():
                records.append(_record(case, s.name, None, f"skipped: no {mask_names(lacking)} file", keys))
                continue
            seg = segment(model, case.image, s.mask, settings)
            scores = region_scores(seg, case.label, case.spacing, with_hd95)
            records.append(_record(case, s.name, scores, "scored", keys))
            done.append(scores["dice_WT"])
            if staged is not None:
                save_segmentation(seg, case.geometry, staged / PREDICTIONS / s.name / f"{case.name}.nii.gz")
        skipped = len(subsets) - len(done)
        log(
            f"[{i}/{len(case_dirs)}] {case.name}: {len(done)} subsets scored"
            + (f", {skipped} skipped (no {','.join(case.missing)} file)" if skipped else "")
            + (f", mean Dice WT {np.mean(done):.3f}" if done else "")
            + f", {time.perf_counter() - t0:.1f} s"
        )
    return records, failures, round(time.perf_counter() - t_start, 2)


def find_prediction(pred_dir: Path, case: str) -> Optional[Path]:
    """The prediction file of ``case`` in ``pred_dir`` (see the module doc for what is accepted), or None."""
    found = [pred_dir / f"{case}{suffix}{ext}" for suffix in ("", "_seg") for ext in _NIFTI]
    found = [f for f in found if f.is_file()]
    sub = pred_dir / case
    if sub.is_dir():
        inside = sorted(
            f for f in sub.iterdir() if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(_NIFTI)
        )
        if len(inside) > 1:
            named = {f"{case}{suffix}{ext}" for suffix in ("", "_seg") for ext in _NIFTI}
            inside = [f for f in inside if f.name in named] or inside
        if len(inside) > 1:
            raise ValueError(
                f"prediction for case {case}: {sub} holds several NIfTI files "
                f"({', '.join(f.name for f in inside)}); keep one, or name it {case}.nii.gz"
            )
        found += inside
    if len(found) > 1:
        raise ValueError(
            f"prediction for case {case}: several candidate files ({', '.join(map(str, found))}); keep one"
        )
    return found[0] if found else None


def _entry_case(entry: Path) -> str:
    name = entry.name
    for ext in _NIFTI:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return name.removesuffix("_seg")


def prediction_layout(pred_dir: Path) -> Dict[str, Path]:
    """{subset name: folder} when ``pred_dir`` holds folders named after modality subsets, else {}."""
    if not pred_dir.is_dir():
        raise NotADirectoryError(f"--predictions {str(pred_dir)!r}: no such folder")
    layout: Dict[str, Path] = {}
    for d in sorted(pred_dir.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        try:
            s = parse_subset(d.name)
        except ValueError:
            continue
        if s.name in layout:
            raise ValueError(
                f"--predictions {str(pred_dir)!r}: folders {layout[s.name].name!r} and {d.name!r} "
                f"both name the subset {s.name}; keep one"
            )
        layout[s.name] = d
    return layout


def evaluate_predictions(
    data_root,
    pred_dir,
    out_dir,
    with_hd95: bool = False,
    missing_as_empty: bool = False,
    config: Optional[dict] = None,
    log=print,
) -> List[dict]:
    """Score the predictions in ``pred_dir`` against the labels of the cases under ``data_root``; writes
    the outputs to ``out_dir`` (as one set) and returns the table rows. ``out_dir`` is checked first; a
    case whose files or prediction cannot be read is left out, as in :func:`evaluate_model`."""
    pred_dir, out_dir = Path(pred_dir), check_out(out_dir)
    _remove_leftovers(out_dir)
    t_start = time.perf_counter()
    layout = prediction_layout(pred_dir)
    if layout:
        subsets = [s for s in SUBSETS if s.name in layout]
        folders = [(s, layout[s.name]) for s in subsets]
        log(f"{pred_dir}: {len(subsets)} subset folders ({', '.join(s.name for s in subsets)})")
        loose = [f.name for f in pred_dir.iterdir() if f.is_file() and f.name.lower().endswith(_NIFTI)]
        if loose:
            log(
                f"note: {len(loose)} NIfTI file(s) directly in {pred_dir} are not in a subset folder and were not "
                f"scored: {', '.join(sorted(loose)[:5])}"
            )
    else:
        subsets = [Subset(SINGLE, ())]
        folders = [(None, pred_dir)]
    case_dirs = find_cases(data_root)
    # Every prediction is looked up before any case is read, so that a missing or ambiguous file
    # stops the run at once rather than after most of the data set has been scored.
    plan = []
    for case_dir in case_dirs:
        on_disk = modalities_on_disk(case_dir)
        todo = []
        for s, folder in folders:
            name = s.name if s is not None else SINGLE
            path = find_prediction(folder, case_dir.name)
            if path is None:
                lacking = s.mask & ~on_disk if s is not None else np.zeros(len(MODALITIES), bool)
                if lacking.any():
                    todo.append((name, None, f"skipped: no {mask_names(lacking)} file"))
                    continue
                if not missing_as_empty:
                    raise ValueError(
                        f"no prediction for case {case_dir.name} in {folder} (looked for {case_dir.name}.nii.gz, "
                        f"{case_dir.name}_seg.nii.gz, .nii, or one NIfTI file in {case_dir.name}/); "
                        "pass --missing-as-empty to score missing predictions as all background"
                    )
                todo.append((name, None, "scored: no prediction, taken as empty"))
            else:
                todo.append((name, path, "scored"))
        plan.append((case_dir, todo))
    keys = metric_keys(with_hd95)
    records, failures = [], []
    for i, (case_dir, todo) in enumerate(plan, 1):
        mine = []
        try:
            case = _load_labelled(case_dir)
            for name, path, status in todo:
                if status.startswith("skipped"):
                    mine.append(_record(case, name, None, status, keys))
                    continue
                seg = load_segmentation(path, case.geometry) if path is not None else np.zeros_like(case.label)
                mine.append(_record(case, name, region_scores(seg, case.label, case.spacing, with_hd95), status, keys))
        except CASE_ERRORS as e:
            # the whole case goes, so that every row of the table covers the same cases
            failures.append((case_dir.name, str(e)))
            log(f"[{i}/{len(plan)}] {case_dir.name}: left out, a file cannot be read")
            continue
        records += mine
        log(f"[{i}/{len(plan)}] {case.name}: {sum(p is not None for _, p, _ in todo)} prediction(s) scored")
    known = {c.name for c in case_dirs}
    extra = sorted(
        {
            _entry_case(f)
            for _, folder in folders
            for f in folder.iterdir()
            if not f.name.startswith(".") and (f.is_dir() or f.name.lower().endswith(_NIFTI))
        }
        - known
    )
    if extra:
        log(
            f"note: {len(extra)} prediction(s) match no case under {data_root} and were not scored: "
            f"{', '.join(extra[:10])}"
        )
    title = (
        f"Dice per modality subset: {len(case_dirs) - len(failures)} cases, predictions from {pred_dir}"
        if layout
        else f"Dice of the predictions in {pred_dir}: {len(case_dirs) - len(failures)} cases"
    )
    cfg = {
        "mode": "predictions",
        "data_root": str(Path(data_root).resolve()),
        "predictions": str(pred_dir.resolve()),
        "cases": len(case_dirs),
        "subsets": [s.name for s in subsets] if layout else None,
        "hd95": with_hd95,
        "missing_as_empty": missing_as_empty,
    }
    cfg.update(config or {})
    with atomic_set(out_dir, MARKER) as staged, _named_as_in(out_dir, staged):
        cfg["seconds"] = round(time.perf_counter() - t_start, 2)
        rows, text, outputs = _write_outputs(staged, records, subsets, with_hd95, title, cfg, failures)
    return _finish(out_dir, rows, text, outputs, log, failures, len(case_dirs))


def _write_outputs(folder: Path, records, subsets, with_hd95, title, cfg, failures):
    """(table rows, table text, names of the outputs): the outputs written to ``folder``, the marker last."""
    rows = build_table(records, subsets, with_hd95)
    text = format_table(rows, with_hd95, title)
    if failures:
        text += f"left out, files that cannot be read: {', '.join(name for name, _ in failures)}\n"
    cfg["left_out"] = dict(failures)
    cfg["outputs"] = list(OUTPUT_FILES) + ([PREDICTIONS + "/"] if (folder / PREDICTIONS).is_dir() else [])
    write_table_csv(folder / "table.csv", rows, with_hd95)
    write_cases_csv(folder / "cases.csv", records, with_hd95)
    write_heatmap(folder / "table.png", rows, with_hd95, title)
    atomic_write_text(folder / "table.txt", text)
    write_json(folder / MARKER, cfg | run_info())
    return rows, text, cfg["outputs"]


def _finish(out_dir: Path, rows, text, outputs, log, failures, total) -> List[dict]:
    """Report the outputs now in ``out_dir``; then, if some cases were left out, raise ``CaseFailures``."""
    log(text + f"written to {out_dir}: {', '.join(outputs)}")
    if failures:
        raise CaseFailures("scored", failures, total)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.model is None) == (args.predictions is None):
        p.error("give exactly one of --model M (run a model over the 15 subsets) or --predictions PRED_DIR")
    wrong = (
        [o for o, given in (("--checkpoint", args.checkpoint), ("--save-predictions", args.save_predictions),
                            ("--subsets", args.subsets != "all15")) if given]
        if args.predictions is not None
        else (["--missing-as-empty"] if args.missing_as_empty else [])
    )
    if wrong:
        needs = "--model" if args.predictions is not None else "--predictions"
        p.error(f"{', '.join(wrong)}: only with {needs}")

    def body():
        check_out(args.out, args.save_predictions, "--out", "--save-predictions")
        if args.predictions is not None:
            evaluate_predictions(args.data_root, args.predictions, args.out, args.hd95, args.missing_as_empty)
            return
        settings = settings_from_args(args)
        subsets = _subsets(args.subsets)
        model = load_model(args.model, args.checkpoint, settings.device)
        settings.output = output_of(model, args.output)
        evaluate_model(model, args.data_root, args.out, settings, subsets, args.hd95, args.save_predictions,
                       config={"model": args.model, "checkpoint": args.checkpoint})

    return run_command("medmap-fast evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
