"""medmap-fast ablation: train one model per (anchor, seed) with everything else identical, score each on
the same held-out cases over the 15 modality subsets, and report the differences against no alignment
with 95% intervals."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..training.config import ANCHORS, TrainConfig, add_config_args, config_from_args, load_config
from .plan import WEIGHTS, Plan, parse_anchors, seeds_from

#: what the ablation changes in the preset unless the options say otherwise: validation only at the end of
#: training, on all modalities (the arms are scored on all 15 subsets afterwards)
ABLATION_DEFAULTS = {"val_every": 0, "val_subsets": False}


def build_parser() -> argparse.ArgumentParser:
    from ..training.cli import PRESETS

    p = argparse.ArgumentParser(
        prog="medmap-fast ablation",
        description="Train" + __doc__.split(": train", 1)[1].rstrip(),
        epilog="examples:\n"
               "  medmap-fast ablation data/ --out ablation/ --preset small --epochs 20\n"
               "  medmap-fast ablation data/ --out ablation/ --framework kd --anchors none,learned --seeds 2\n"
               "  medmap-fast ablation data/ --out ablation/ --preset small   # again: resumes, then reports\n"
               "  torchrun --nproc-per-node 4 -m medmap_fast.cli ablation data/ --out ablation/  # arms spread",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", metavar="DATA", help="data root of BraTS-style case folders")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="ablation folder: ablation.csv/.md/.png, features.png, runs/<anchor>-seed<k>/")
    p.add_argument("--anchors", default="none,normal,fixed,learned", type=parse_anchors,
                   help=f"comma-separated anchors, one arm each per seed, from {','.join(ANCHORS)} "
                        "(default: none,normal,fixed,learned)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per anchor: --seed, --seed + 1, ... (default 3)")
    p.add_argument("--test-data", metavar="DIR",
                   help="score every arm on these cases (default: the held-out validation split of DATA)")
    p.add_argument("--weights", choices=WEIGHTS, default="last",
                   help="the weights scored: last (the end of training, default) or best (chosen on the "
                        "validation cases: with the default held-out split these are the scored cases too)")
    p.add_argument("--config", metavar="FILE", help="shared settings as JSON (a run's config.json works)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="default: 128^3 patches, 32 base channels, 5 levels (a GPU); small: 48^3, 8 channels, 4 "
                        "levels (a CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines")
    add_config_args(p.add_argument_group("shared training settings (as for medmap-fast train)"), exclude=("anchor",))
    return p


def plan_from_args(args: argparse.Namespace) -> Plan:
    from ..training.cli import PRESETS

    base = load_config(args.config) if args.config else PRESETS[args.preset]()
    defaults = {k: v for k, v in ABLATION_DEFAULTS.items() if getattr(args, k, None) is None and not args.config}
    base = TrainConfig.from_json(dict(base.to_json(), **defaults))
    base = config_from_args(args, base)
    # the arms are scored by the ablation itself, on the weights it chooses
    base = TrainConfig.from_json(dict(base.to_json(), data=args.data, final_eval=False,
                                      anchor=args.anchors[0] if args.anchors else base.anchor))
    return Plan(base, list(args.anchors), seeds_from(args.seeds, base.seed), test_data=args.test_data,
                weights=args.weights)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..data.atomic import OutputPathError
    from .runner import run_ablation

    try:
        plan = plan_from_args(args)
        run_ablation(plan, args.out, quiet=args.quiet)
    except (ValueError, OSError, OutputPathError, FloatingPointError) as e:
        print(f"medmap-fast ablation: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
