"""The ``medmap-fast`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "quickstart": "synthesise a small data set, train SLSNet with the MedMAP alignment, print the 15-subset "
                      "Dice table (minutes on a CPU)",
        "demo": "fused ops vs the naive reference on realistic shapes: errors and speed",
        "info": "versions and the backends this machine can use (compiles the C++ extension if needed)",
        "build-ext": "compile the C++ (and CUDA, when possible) extensions now instead of on first use",
        "synth": "write a synthetic BraTS-like data set (NIfTI, BraTS folder layout)",
        "predict": "sliding-window inference of a model on BraTS cases; writes segmentation NIfTI files",
        "evaluate": "Dice (and HD95) per region over the 15 modality subsets, or of a folder of predictions",
        "train": "train a missing-modality model (SLS, KD or DA framework) with the MedMAP alignment",
        "ablation": "does the alignment help? one model per (anchor, seed), the 15-subset Dice with paired "
                    "95%% intervals against no alignment",
    }
    # subcommands with options of their own: module whose main(argv) -> int parses them
    with_options = {
        "quickstart": "medmap_fast.quickstart",
        "synth": "medmap_fast.data.synth",
        "predict": "medmap_fast.evaluation.predict",
        "evaluate": "medmap_fast.evaluation.evaluate",
        "train": "medmap_fast.training.cli",
        "ablation": "medmap_fast.ablation.cli",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        p = argparse.ArgumentParser(prog="medmap-fast", description="medmap_fast command line")
        sub = p.add_subparsers(dest="command", metavar="COMMAND")
        for name, helptext in commands.items():
            sub.add_parser(name, help=helptext)
        if argv and argv[0] not in ("-h", "--help"):
            p.error(f"unknown command {argv[0]!r}; choose from {', '.join(commands)}")
        p.print_help()
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("quickstart", "train", "ablation", "predict", "evaluate", "demo"):
        from ._memory import keep_freed_memory

        keep_freed_memory()  # these commands free and reallocate the same tensor sizes many times
    if cmd in with_options:
        import importlib

        return importlib.import_module(with_options[cmd]).main(rest)
    if cmd == "demo":
        from . import demo

        demo.main(rest)
    elif cmd == "info":
        from . import info

        info.main()
    elif cmd == "build-ext":
        from . import _ext

        results = _ext.build_all()
        return 0 if results["cpu"][0] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
