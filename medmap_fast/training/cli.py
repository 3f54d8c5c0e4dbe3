"""medmap-fast train: train a missing-modality segmentation model (SLS, KD or DA framework) with the MedMAP
alignment on BraTS-style cases; writes a run folder that predict and evaluate take as --model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .config import RESUME_OVERRIDES, TrainConfig, add_config_args, config_from_args, given_settings, load_config

PRESETS = {"default": TrainConfig, "small": TrainConfig.small}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medmap-fast train",
        description="Train" + __doc__.split(": train", 1)[1].rstrip(),
        epilog="examples:\n"
               "  medmap-fast train data/ --out runs/sls --preset small --epochs 20\n"
               "  torchrun --nproc-per-node 2 -m medmap_fast.cli train data/ --out runs/ddp\n"
               "  medmap-fast train --resume runs/sls          # continue a run exactly where it stopped\n"
               "  medmap-fast evaluate data/ --model runs/sls/best.pt --out eval/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", nargs="?", metavar="DATA", help="data root of BraTS-style case folders")
    p.add_argument("--out", metavar="RUN", help="run folder to create (config, metrics, curves, checkpoints, eval)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last.pt, with its own settings "
                                                   "(but --on-nonfinite and --num-workers, which may be changed)")
    p.add_argument("--config", metavar="FILE", help="settings as JSON (a run's config.json works); options given "
                                                   "on the command line override them")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="default: 128^3 patches, 32 base channels, 5 levels (a GPU); small: 48^3, 8 channels, "
                        "4 levels (minutes on a CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-epoch lines")
    add_config_args(p.add_argument_group("settings"))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..data.atomic import OutputPathError
    from .trainer import train

    try:
        if args.resume:
            extra = given_settings(args)
            changed = sorted(set(extra) - set(RESUME_OVERRIDES))
            if changed or args.config or args.data or (args.out and Path(args.out) != Path(args.resume)):
                raise ValueError("--resume RUN continues with the run's own settings: give no DATA, --out, --config "
                                 f"or settings with it but {', '.join('--' + o.replace('_', '-') for o in RESUME_OVERRIDES)}"
                                 f" (got {changed or 'DATA/--out/--config'})")
            cfg = load_config(Path(args.resume) / "config.json")
            cfg = TrainConfig.from_json(dict(cfg.to_json(), **extra))
            out, resume = Path(args.resume), True
        else:
            if not args.out:
                raise ValueError("--out RUN is required (the run folder to create)")
            base = load_config(args.config) if args.config else PRESETS[args.preset]()
            cfg = config_from_args(args, base)
            if args.data:
                cfg = TrainConfig.from_json(dict(cfg.to_json(), data=args.data))
            if not cfg.data:
                raise ValueError("DATA is required: the data root of the training cases")
            out, resume = Path(args.out), False
        result = train(cfg, out, resume=resume, quiet=args.quiet)
    except (ValueError, OSError, OutputPathError, FloatingPointError) as e:  # NonFiniteError among the last
        print(f"medmap-fast train: error: {e}", file=sys.stderr)
        return 1
    if result.table is not None and not args.quiet:
        print(f"best mean Dice over the validated subsets {result.best_score:.3f} (step {result.best_step})")
    print(f"run folder: {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
