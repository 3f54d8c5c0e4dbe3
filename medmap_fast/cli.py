"""The ``medmap-fast`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "fused ops vs the naive reference on realistic shapes: errors and speed",
        "info": "versions and the backends this machine can use (compiles the C++ extension if needed)",
        "build-ext": "compile the C++ (and CUDA, when possible) extensions now instead of on first use",
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
