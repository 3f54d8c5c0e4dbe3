"""``medmap-fast predict``: segment BraTS cases with a model, one NIfTI label file per case.

Each case is read with its missing modality files allowed, z-scored inside the brain, and segmented
by sliding-window inference with the modalities that are both asked for (``--modalities``) and on disk;
the labels {0, 1, 2, 4} are written to ``OUT/<case>.nii.gz`` in the case's own orientation, affine and
header. A case with none of the asked-for modalities stops the run before any inference; a case whose
files cannot be read is reported and skipped, and the run ends with exit status 1.

OUT is checked before any work starts: a file where the folder (or a case's file) should be, or a folder
that cannot be written, is an error. Each file appears whole or not at all (written under a hidden
temporary name, then renamed); a killed run's hidden temporaries are removed by the next run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..data import MODALITIES, find_cases, load_case, modalities_on_disk, save_segmentation
from ..data.atomic import OutputPathError, check_output_dir, remove_stale_temporaries
from .loading import load_model
from .pipeline import (CASE_ERRORS, CaseFailures, InferenceSettings, add_model_args, cli_text, mask_names,
                       output_of, run_command, segment, settings_from_args)
from .subsets import parse_subset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medmap-fast predict",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=cli_text(__doc__),
        epilog="example:\n  medmap-fast predict data/ --model unet.pt --out pred/ --window 128 --amp bf16",
    )
    p.add_argument(
        "input",
        metavar="DATA_ROOT_or_CASE",
        help="a case folder (<case>_t1.nii.gz, _t1ce, _t2, _flair) or a folder of such case folders",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the segmentations (created if needed)")
    p.add_argument(
        "--modalities",
        default="all",
        metavar="LIST",
        help="modalities the model may use, e.g. t1,t2 or T1+FLAIR (default all); a case lacking one "
        "of them is segmented with the rest",
    )
    add_model_args(p)
    return p


def check_out(out_dir, case_dirs=(), argument: str = "out_dir") -> Path:
    """``out_dir`` as a Path if the segmentations of ``case_dirs`` can be written there; otherwise an
    ``OutputPathError`` naming ``argument`` (``"--out"`` on the command line), the path and why."""
    out = Path(check_output_dir(out_dir, argument))
    for case_dir in case_dirs:
        dest = out / f"{Path(case_dir).name}.nii.gz"
        if os.path.lexists(dest) and not dest.is_file():
            raise OutputPathError(
                f"{argument} {str(out_dir)!r}: {dest} is a folder, but the segmentation of case "
                f"{Path(case_dir).name} is written to a file of that name; expected no such entry or a file "
                "(replaced), so move it or choose another folder"
            )
    return out


def predict_cases(
    model, case_dirs: List[Path], out_dir: Path, settings: InferenceSettings, modalities=MODALITIES, log=print
) -> List[Path]:
    """Segment each case folder into ``out_dir/<case>.nii.gz``; returns the paths written.

    ``out_dir`` is checked before any case is read (``OutputPathError``). A case whose files cannot be
    read is reported and left out; the others are segmented, and then ``CaseFailures`` names every case
    left out and why.
    """
    wanted = np.array([m in modalities for m in MODALITIES], dtype=bool)
    names = [Path(c).name for c in case_dirs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        clash = [str(c) for c in case_dirs if Path(c).name in dupes]
        raise ValueError(f"several case folders share the name {dupes[0]!r} and would write one output file: {clash}")
    for case_dir in case_dirs:
        # a directory listing per case: fail before hours of inference, not at the case that cannot run
        on_disk = modalities_on_disk(case_dir)
        if not (wanted & on_disk).any():
            raise ValueError(
                f"case {Path(case_dir).name} ({case_dir}): has none of the requested modalities "
                f"({mask_names(wanted)}); its files give {mask_names(on_disk)}"
            )
    out_dir = check_out(out_dir, case_dirs)
    remove_stale_temporaries(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, failures = [], []
    for i, case_dir in enumerate(case_dirs, 1):
        t0 = time.perf_counter()
        try:
            case = load_case(case_dir, allow_missing=True, load_label=False, normalized=True)
        except CASE_ERRORS as e:
            failures.append((Path(case_dir).name, str(e)))
            log(f"[{i}/{len(case_dirs)}] {Path(case_dir).name}: not segmented, its files cannot be read")
            continue
        use = wanted & case.present
        seg = segment(model, case.image, use, settings)
        path = save_segmentation(seg, case.geometry, out_dir / f"{case.name}.nii.gz")
        written.append(path)
        note = "" if (use == wanted).all() else f" (no file for {mask_names(wanted & ~case.present)})"
        log(
            f"[{i}/{len(case_dirs)}] {case.name}: modalities {mask_names(use)}{note}, "
            f"{time.perf_counter() - t0:.1f} s -> {path}"
        )
    if failures:
        raise CaseFailures("segmented", failures, len(case_dirs))
    return written


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body():
        check_out(args.out, argument="--out")
        modalities = parse_subset(args.modalities).modalities
        settings = settings_from_args(args)
        case_dirs = find_cases(args.input)
        check_out(args.out, case_dirs, "--out")
        model = load_model(args.model, args.checkpoint, settings.device)
        settings.output = output_of(model, args.output)
        predict_cases(model, case_dirs, Path(args.out), settings, modalities)

    return run_command("medmap-fast predict", body)


if __name__ == "__main__":
    sys.exit(main())
