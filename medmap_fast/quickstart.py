"""medmap-fast quickstart: the product end to end in minutes on a CPU. It writes a synthetic BraTS-like data
set, trains SLSNet with the MedMAP alignment on it, scores the held-out cases over the 15 modality subsets
and prints where the run folder is.

The data set is kept and reused by later runs with the same data settings; every run gets a new run
folder, which ``medmap-fast predict``/``evaluate`` take as ``--model`` and ``medmap-fast train --resume``
continues.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

#: what the quickstart trains, chosen so that the whole command stays within ten minutes on two CPU cores
#: and still learns the tumour: 48^3 cases (a 200 mm field of view at about 4 mm), each trained on whole
#: and run as one window, so that the instance norms see the same extent in training and inference; many
#: cases (they cost seconds to make), since more cases did more for the held-out Dice than more steps
DATA_CASES = 96
DATA_SHAPE = (48, 48, 48)
PATCH = (48, 48, 48)
VAL_CASES = 8


def quickstart_config(data: Path, epochs: int, steps_per_epoch: int, seed: int, amp: str, num_workers: int,
                      shape=DATA_SHAPE, patch=PATCH, val_cases: int = VAL_CASES):
    """The training settings of the quickstart: the small preset, SLS with the learned anchor."""
    from .training.config import TrainConfig

    return TrainConfig.small(
        data=str(data),
        patch_size=tuple(patch),
        framework="sls",
        anchor="learned",
        fusion="weighted",
        val_cases=val_cases,
        epochs=epochs,
        iterations_per_epoch=steps_per_epoch,
        lr=1e-2,
        warmup_steps=20,
        amp=amp,
        seed=seed,
        num_workers=num_workers,
        # validation checks all modalities only (seconds); the final table covers all 15 subsets
        val_every=max(1, epochs // 3),
        val_subsets=False,
        val_window=tuple(shape),
    )


def _data_settings(cases: int, seed: int, anatomy: str, shape) -> dict:
    return {"cases": cases, "seed": seed, "shape": list(shape), "anatomy": anatomy}


def prepare_data(folder: Path, cases: int, seed: int, anatomy: str, shape=DATA_SHAPE, log=print) -> Path:
    """The synthetic data set in ``folder``: reused when an earlier quickstart wrote it with the same
    settings, else written anew (a data set with other settings is replaced; anything else is refused)."""
    from .data.synth import resolve_anatomy, write_synthetic_dataset

    wanted = _data_settings(cases, seed, resolve_anatomy(anatomy).source.split(" ")[0], shape)
    stamp = folder / "quickstart.json"
    try:
        if json.loads(stamp.read_text(encoding="utf-8")) == wanted and (folder / "dataset.json").is_file():
            log(f"data: reusing {cases} synthetic cases in {folder}")
            return folder
    except (OSError, ValueError):
        pass
    log(f"data: writing {cases} synthetic cases of {'x'.join(map(str, shape))} voxels to {folder}")
    t0 = time.perf_counter()
    write_synthetic_dataset(folder, cases, seed=seed, shape=shape, anatomy=anatomy, overwrite=True)
    # the stamp is written last: a data set interrupted before it is written again next time
    from .data.atomic import atomic_write_text

    atomic_write_text(stamp, json.dumps(wanted, indent=2) + "\n")
    log(f"data: done in {time.perf_counter() - t0:.0f} s")
    return folder


def _new_run_folder(runs: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = runs / f"sls-learned-{stamp}"
    n = 1
    while run.exists():
        n += 1
        run = runs / f"sls-learned-{stamp}-{n}"
    return run


def _all_modalities_row(table: Sequence[dict]) -> Optional[dict]:
    from .evaluation.report import MEAN_ROW

    full = [r for r in table if r["subset"] != MEAN_ROW and r.get("presence") and "○" not in r["presence"]]
    return full[0] if full else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medmap-fast quickstart",
        description="The" + __doc__.split(": the", 1)[1].split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="afterwards:\n"
               "  medmap-fast evaluate medmap_quickstart/data --model RUN --out eval/   # the table again\n"
               "  medmap-fast predict CASE_DIR --model RUN --out pred/                   # segment cases\n"
               "  medmap-fast train DATA --out RUN --preset small                        # your own run",
    )
    p.add_argument("--out", default="medmap_quickstart", metavar="DIR",
                   help="folder of the data set (DIR/data) and the runs (DIR/runs/...) (default: %(default)s)")
    p.add_argument("--cases", type=int, default=DATA_CASES, metavar="N", help="synthetic cases (default: %(default)s)")
    p.add_argument("--val-cases", type=int, default=VAL_CASES, metavar="N",
                   help="of them, held out for validation and the final table (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=18, help="epochs (default: %(default)s)")
    p.add_argument("--steps-per-epoch", type=int, default=20, metavar="N",
                   help="optimiser steps per epoch, 2 patches each (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default: %(default)s)")
    p.add_argument("--anatomy", choices=("auto", "template", "geometric"), default="geometric",
                   help="synthetic anatomy: a geometric phantom (the same on every machine, so the Dice "
                        "stated in the README is reproducible), the ICBM152 template (needs nilearn), or the "
                        "template when nilearn is installed (auto) (default: %(default)s)")
    p.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                   help="bf16 autocast; auto takes it on GPUs and on CPUs with native bf16, and fp32 on CPUs "
                        "that would only emulate it (many times slower) (default: %(default)s)")
    p.add_argument("--shape", type=int, nargs=3, default=list(DATA_SHAPE), metavar="N",
                   help="voxels of a synthetic case (default: %(default)s)")
    p.add_argument("--patch-size", type=int, nargs=3, default=list(PATCH), metavar="N",
                   help="training patch (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=1, metavar="N",
                   help="data-loader worker processes (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-epoch lines")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .data.atomic import OutputPathError
    from .training.trainer import NonFiniteError, train

    log = (lambda s: None) if args.quiet else print
    t0 = time.perf_counter()
    try:
        if args.val_cases < 1:
            raise ValueError(f"--val-cases: expected a positive int, got {args.val_cases}")
        if args.cases < args.val_cases + 2:
            raise ValueError(f"--cases: expected at least {args.val_cases + 2} ({args.val_cases} are held out), "
                             f"got {args.cases}")
        for name in ("epochs", "steps_per_epoch"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
        for name in ("shape", "patch_size"):
            if any(v < 8 or v % 8 for v in getattr(args, name)):
                raise ValueError(f"--{name.replace('_', '-')}: expected multiples of 8 (the small SLSNet halves "
                                 f"the size three times), got {getattr(args, name)}")
        out = Path(args.out)
        data = prepare_data(out / "data", args.cases, args.seed, args.anatomy, args.shape, log)
        cfg = quickstart_config(data, args.epochs, args.steps_per_epoch, args.seed, args.amp, args.num_workers,
                                args.shape, args.patch_size, args.val_cases)
        run = _new_run_folder(out / "runs")
        log(f"train: SLSNet (small: {cfg.base_channels} base channels, {cfg.depth} levels), MedMAP alignment "
            f"with the learned anchor, {cfg.epochs} x {cfg.iterations_per_epoch} steps of {cfg.batch_size} "
            f"patches of {'x'.join(map(str, cfg.patch_size))}")
        result = train(cfg, run, quiet=args.quiet, log=log)
    except (ValueError, OSError, OutputPathError, NonFiniteError, RuntimeError) as e:
        print(f"medmap-fast quickstart: error: {e}", file=sys.stderr)
        return 1
    full = _all_modalities_row(result.table or [])
    if full is not None:
        dice = " ".join(f"{r} {full[f'dice_{r}']:.3f}" for r in ("WT", "TC", "ET"))
        print(f"held-out cases, all modalities: Dice {dice}")
    from .evaluation.report import MEAN_ROW

    mean = [r for r in (result.table or []) if r["subset"] == MEAN_ROW]
    if mean and not math.isnan(mean[-1].get("dice_mean", math.nan)):
        print(f"held-out cases, mean over the 15 subsets: Dice {mean[-1]['dice_mean']:.3f}")
    print(f"done in {time.perf_counter() - t0:.0f} s; run folder: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
