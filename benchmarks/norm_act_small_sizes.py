"""norm_act forward+backward at the small U-Net's shapes against the bare eager composition
``F.leaky_relu(F.instance_norm(x, w, b))``, B=2, float32, CPU; the two alternate in blocks of 15 calls,
three times, and the smallest median of each is printed, with the page faults per call.

    python benchmarks/norm_act_small_sizes.py [THREADS] [--keep-freed-memory]

``--keep-freed-memory`` applies the allocator setting of the command-line tools
(``medmap_fast._memory.keep_freed_memory``). Without it, glibc may hand a freed output back to Linux and
fault it in again on the next call (one fault per 4 KiB), which at 48³ costs more than the op itself and
falls on whichever variant's allocation order triggers it: the faults column shows when it happened.
"""

from __future__ import annotations

import os
import resource
import sys

import torch
import torch.nn.functional as F

import medmap_fast
import medmap_fast._memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (benchmarks/_timing.py, beside this file)

SHAPES = [(8, 48), (8, 32), (32, 16), (8, 24), (8, 16), (16, 12), (16, 8), (32, 6), (32, 4), (64, 3), (64, 2)]  # (C, size)


def median_us(fn, rounds: int = 15) -> float:
    return 1e6 * _timing.median_seconds(fn, rounds, warmup=3)


def faults_per_call(fn, calls: int = 10) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if args:
        torch.set_num_threads(int(args[0]))
    kept = "--keep-freed-memory" in sys.argv and medmap_fast._memory.keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward+backward, B=2, float32; "
          f"freed memory kept: {kept}")
    print(f"{'C x size^3':>12s} {'elements':>9s} {'norm_act us':>12s} {'eager us':>9s} {'ratio':>6s} "
          f"{'faults/call':>16s}")
    for C, S in SHAPES:
        x = torch.randn(2, C, S, S, S, requires_grad=True)
        w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
        g = torch.randn(2, C, S, S, S)

        def fused():
            medmap_fast.norm_act(x, w, b).backward(g)

        def eager():
            F.leaky_relu(F.instance_norm(x, weight=w, bias=b), 0.01).backward(g)

        fs, es = [], []
        for _ in range(3):  # alternated, so that load from other jobs falls on both
            fs.append(median_us(fused))
            es.append(median_us(eager))
        f, e = min(fs), min(es)
        faults = f"{faults_per_call(fused):.0f} / {faults_per_call(eager):.0f}"
        print(f"{f'{C} x {S}^3':>12s} {x.numel():9d} {f:12.0f} {e:9.0f} {f / e:6.2f} {faults:>16s}")


if __name__ == "__main__":
    main()
